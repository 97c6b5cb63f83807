"""The target-sparsity schedule: from ``start_head_sparsity`` to ``end_head_sparsity`` over a warmup.

With ``W = ceil(sparsity_warmup_ratio * total_steps)`` warmup steps, the target at optimizer step
``step`` (0-based: the step being computed) is

- linear: ``start + (end - start) * step / W``;
- logarithmic: linear in ``log(1 - target)``, i.e. the *density* ``1 - target`` shrinks by the same
  factor every step: ``1 - (1 - start) * ((1 - end) / (1 - start)) ** (step / W)``;

and ``end`` from step ``W`` on (``W = 0``: ``end`` from the first step). PruLong's reference
ignored the start sparsity and the warmup; here both are honoured.

Example:
    >>> from sparseattn.training.schedule import SparsitySchedule
    >>> schedule = SparsitySchedule(start=0.0, end=0.5, warmup_ratio=0.5, kind="linear")
    >>> [round(schedule(step, total_steps=8), 3) for step in range(8)]
    [0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5]
    >>> log = SparsitySchedule(start=0.0, end=0.75, warmup_ratio=1.0, kind="logarithmic")
    >>> round(log(2, total_steps=4), 3)  # halfway: density sqrt(1 * 0.25) = 0.5
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SCHEDULE_KINDS", "SparsitySchedule"]

SCHEDULE_KINDS = ("linear", "logarithmic")
_ALIASES = {"log": "logarithmic", "lin": "linear"}


@dataclass(frozen=True)
class SparsitySchedule:
    """Target head sparsity per optimizer step.

    Args:
        start: target at step 0 (``start_head_sparsity``), in [0, 1).
        end: target after the warmup (``end_head_sparsity``), in [0, 1] (``< 1`` when logarithmic).
        warmup_ratio: fraction of the run's steps over which the target moves (``sparsity_warmup_ratio``), in [0, 1].
        kind: ``"linear"`` or ``"logarithmic"`` (PruLong's ``warmup_type``; ``"log"`` is accepted).
    """

    start: float = 0.0
    end: float = 0.5
    warmup_ratio: float = 0.5
    kind: str = "linear"

    def __post_init__(self):
        kind = _ALIASES.get(self.kind, self.kind)
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"warmup_type must be one of {list(SCHEDULE_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "kind", kind)
        for name, value, upper in (("start_head_sparsity", self.start, 1.0),
                                   ("end_head_sparsity", self.end, 1.0 if kind == "linear" else 1.0 - 1e-12),
                                   ("sparsity_warmup_ratio", self.warmup_ratio, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= upper:
                raise ValueError(f"{name} must be a number in [0, {upper:g}], got {value!r}")
        if self.start >= 1.0:
            raise ValueError(f"start_head_sparsity must be < 1, got {self.start!r}")
        if kind == "logarithmic" and self.end >= 1.0:
            raise ValueError("end_head_sparsity must be < 1 with a logarithmic schedule (log of the density 1 - end)")

    def warmup_steps(self, total_steps: int) -> int:
        """``ceil(warmup_ratio * total_steps)``."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        return math.ceil(self.warmup_ratio * total_steps - 1e-9)

    def __call__(self, step: int, total_steps: int) -> float:
        """The target sparsity at optimizer step ``step`` (0-based) of ``total_steps``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        warmup = self.warmup_steps(total_steps)
        if step >= warmup:
            return float(self.end)
        frac = step / warmup
        if self.kind == "linear":
            return float(self.start + (self.end - self.start) * frac)
        log_density = math.log1p(-self.start) + (math.log1p(-self.end) - math.log1p(-self.start)) * frac
        return float(1.0 - math.exp(log_density))
