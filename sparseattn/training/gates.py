"""Hard-concrete (L0) gates, one per (layer, KV head): how much of a head stays full attention.

A gate ``z`` in [0, 1] mixes a head's two outputs, ``z * full + (1 - z) * streaming`` (see
:mod:`sparseattn.training.attention`). Training samples ``z`` from the hard-concrete distribution
of Louizos et al. (2018), which puts real probability mass on exactly 0 and exactly 1 and is
differentiable in its parameter ``log_alpha`` through the reparameterization::

    u ~ U(0, 1)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)      # binary concrete, temperature beta
    z = clamp(s * (r - l) + l, 0, 1)                            # stretched to (l, r) = (-0.1, 1.1), clamped

Closed forms used for the sparsity constraint and for evaluation (``beta = 2/3``):

- ``P(z > 0) = sigmoid(log_alpha - beta * log(-l / r))``: the expected L0 norm of one gate;
- ``P(z = 1) = sigmoid(log_alpha - beta * log((1 - l) / (r - 1)))``;
- deterministic (test-time) gate: ``clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)``;
- expected sparsity: ``1 - mean(P(z > 0))`` over all gates.

``log_alpha`` starts at +4 so every head starts (almost surely) full: ``P(z > 0) = 0.996``.

Example:
    >>> import torch
    >>> from sparseattn.training.gates import HardConcreteGates
    >>> gates = HardConcreteGates(num_layers=2, num_kv_heads=3)
    >>> z = gates.sample()
    >>> tuple(z.shape), bool(((z >= 0) & (z <= 1)).all())
    ((2, 3), True)
    >>> round(gates.expected_sparsity().item(), 4)
    0.0037
    >>> bool(gates.eval()().eq(1).all())  # eval mode: the deterministic gate
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["DEFAULT_INIT", "STRETCH", "TEMPERATURE", "HardConcreteGates"]

TEMPERATURE = 2.0 / 3.0
STRETCH = (-0.1, 1.1)
DEFAULT_INIT = 4.0
# Uniform noise is kept inside (EPS, 1 - EPS) so log(u) and log(1 - u) stay finite.
_EPS = 1e-6


class HardConcreteGates(nn.Module):
    """A `[num_layers, num_kv_heads]` grid of hard-concrete gates.

    Args:
        num_layers: decoder layers.
        num_kv_heads: KV heads per layer (GQA: all query heads of a KV head share its gate).
        init: initial ``log_alpha`` (default 4.0: every head starts full).
        temperature: ``beta`` of the concrete distribution (default 2/3).
        stretch: the interval ``(l, r)`` the concrete sample is stretched to before clamping
            (default ``(-0.1, 1.1)``); ``l < 0 < 1 < r``.

    Calling the module gives a fresh sample in training mode and the deterministic gate in eval
    mode, both `[num_layers, num_kv_heads]` float32.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, *, init: float = DEFAULT_INIT,
                 temperature: float = TEMPERATURE, stretch: tuple[float, float] = STRETCH):
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        left, right = stretch
        if not (left < 0.0 and right > 1.0):
            raise ValueError(f"stretch must be (l, r) with l < 0 and r > 1, got {stretch!r}")
        if not math.isfinite(init):
            raise ValueError(f"init must be a finite number, got {init!r}")
        self.temperature = float(temperature)
        self.left, self.right = float(left), float(right)
        self.log_alpha = nn.Parameter(torch.full((num_layers, num_kv_heads), float(init), dtype=torch.float32))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.log_alpha.shape)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A training sample `z [layers, kv_heads]` in [0, 1], differentiable in ``log_alpha``."""
        u = torch.rand(self.log_alpha.shape, generator=generator, device=self.log_alpha.device,
                       dtype=torch.float32).clamp_(_EPS, 1.0 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha.float()) / self.temperature)
        return (s * (self.right - self.left) + self.left).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The test-time gate `clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)`, `[layers, kv_heads]`."""
        return (torch.sigmoid(self.log_alpha.float()) * (self.right - self.left) + self.left).clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """`P(z > 0)` per gate (its expected L0 norm), `[layers, kv_heads]`."""
        return torch.sigmoid(self.log_alpha.float() - self.temperature * math.log(-self.left / self.right))

    def prob_one(self) -> torch.Tensor:
        """`P(z = 1)` per gate, `[layers, kv_heads]`."""
        shift = self.temperature * math.log((1.0 - self.left) / (self.right - 1.0))
        return torch.sigmoid(self.log_alpha.float() - shift)

    def expected_sparsity(self) -> torch.Tensor:
        """Scalar `1 - mean(P(z > 0))`: the expected fraction of streaming heads (differentiable)."""
        return 1.0 - self.prob_nonzero().mean()

    def deterministic_sparsity(self) -> torch.Tensor:
        """Scalar `1 - mean(deterministic gate)` (no gradient needed; for logging)."""
        return 1.0 - self.deterministic().mean()

    def forward(self) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic()

    def extra_repr(self) -> str:
        return (f"num_layers={self.shape[0]}, num_kv_heads={self.shape[1]}, temperature={self.temperature:.4g}, "
                f"stretch=({self.left}, {self.right})")
