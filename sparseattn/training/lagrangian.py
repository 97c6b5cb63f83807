"""The sparsity constraint as a Lagrangian: ``lambda1 (s - t) + lambda2 (s - t)^2``.

Training solves ``min_{weights, gates} max_{lambda1, lambda2} lm_loss + lambda1 (s - t) + lambda2 (s - t)^2``
(Wang et al. 2020, CoFi, Sheared-LLaMA, PruLong): the gates and weights descend, the two
multipliers **ascend**. Their gradients are ``d/d lambda1 = s - t`` and ``d/d lambda2 = (s - t)^2``,
so while the model is less sparse than the target (``s < t``) ascent drives ``lambda1`` negative,
which in turn rewards sparsity in the descent of the gates, and ``lambda2`` only grows, penalizing
any gap. The ascent is done by the optimizer: the multipliers get their own parameter group with
``maximize=True`` (:func:`ascent_param_group`), so no gradient is negated by hand.

Example:
    >>> import torch
    >>> from sparseattn.training.lagrangian import SparsityLagrangian, ascent_param_group
    >>> lagrangian = SparsityLagrangian()
    >>> opt = torch.optim.SGD([ascent_param_group(lagrangian, lr=1.0)])
    >>> lagrangian(torch.tensor(0.2), 0.5).backward()  # sparsity 0.2 below the target 0.5
    >>> opt.step()
    >>> round(lagrangian.lambda1.item(), 3), round(lagrangian.lambda2.item(), 3)
    (-0.3, 0.09)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SparsityLagrangian", "ascent_param_group"]


class SparsityLagrangian(nn.Module):
    """The multipliers ``lambda1``, ``lambda2`` (scalars, start at 0) and the penalty they weigh.

    Args:
        linear_term: keep the ``lambda1 (s - t)`` term (default True); False freezes ``lambda1``
            at 0 (PruLong's ``disable_linear_regularization_term``).
    """

    def __init__(self, linear_term: bool = True):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=bool(linear_term))
        self.lambda2 = nn.Parameter(torch.zeros((), dtype=torch.float32))

    def forward(self, sparsity: torch.Tensor, target: float | torch.Tensor) -> torch.Tensor:
        """``lambda1 (s - t) + lambda2 (s - t)^2`` as a scalar tensor."""
        gap = sparsity.float() - target
        return self.lambda1 * gap + self.lambda2 * gap * gap


def ascent_param_group(lagrangian: SparsityLagrangian, lr: float) -> dict:
    """The optimizer parameter group of the multipliers: gradient **ascent** (``maximize=True``), no weight decay."""
    params = [p for p in lagrangian.parameters() if p.requires_grad]
    return {"params": params, "lr": lr, "weight_decay": 0.0, "maximize": True}
