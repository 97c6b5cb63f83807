"""Per-head budget allocation: the cheapest per-head choices that keep a target share of a layer's attention.

Calibration (XAttention's thresholds, ``sparseattn profile``) and search (MInference's patterns,
``sparseattn search``) measure, per query head ``h`` and candidate ``g``, the exact attention mass
the candidate keeps (``recall[g, h]``, in [0, 1]) and what it costs (``cost[g, h]``: density or
FLOPs). Asking every head to reach a target is expensive: a head whose attention is spread out
must take a dense candidate, while a concentrated head over-delivers for free. What the layer's
output loses is, to first order, the mass lost over all its heads, so :func:`allocate_mean` asks
for the *mean* recall over heads instead and spends the cost where it buys most mass:

    minimize   mean_h cost[c_h, h]   subject to   mean_h recall[c_h, h] >= target.

This is a multiple-choice knapsack; its Lagrangian relaxation is solved exactly per head: for a
price ``lam >= 0`` each head takes ``argmax_g recall - lam * cost`` (ties: cheaper, then earlier),
which walks each head along the upper convex hull of its (cost, recall) points, and the mean recall
falls as ``lam`` grows. A bisection finds the largest price whose choices still reach the target.
At the prices where some head changes its choice the answer is the exact optimum; between them it
can overshoot the target by what the heads changing at that price add, over the number of heads
(the knapsack's integrality gap: with 2 heads it can matter, with 32 it is small).

Example:
    >>> import torch
    >>> recall = torch.tensor([[0.80, 0.50], [0.99, 0.98]])  # 2 candidates x 2 heads
    >>> cost = torch.tensor([[0.10, 0.10], [0.30, 0.50]])
    >>> allocate_mean(recall, cost, 0.85).tolist()  # head 1 buys +0.48 for 0.4: a better price than head 0's
    [0, 1]
    >>> allocate_mean(recall, cost, 0.6).tolist()  # the cheap candidates already average 0.65
    [0, 0]
"""

from __future__ import annotations

import torch

__all__ = ["allocate_mean"]


def _pick(recall, cost, allowed, order, lam: float) -> torch.Tensor:
    # Lexicographic on (recall - lam * cost, -cost, -order) among allowed candidates: score, then cheaper, then earlier.
    score = torch.where(allowed, recall - lam * cost, torch.full_like(cost, -float("inf")))
    best = score.max(0, keepdim=True).values
    tie = allowed & (score >= best - 1e-12)
    key = torch.where(tie, -cost - order * 1e-12, torch.full_like(cost, -float("inf")))
    return key.argmax(0)


def allocate_mean(recall: torch.Tensor, cost: torch.Tensor, target: float, *, allowed: torch.Tensor | None = None,
                  iterations: int = 64) -> torch.Tensor:
    """Per head, the candidate of the cheapest allocation whose mean recall over heads reaches ``target``.

    Args:
        recall: `[G, H]` share of each head's exact attention mass each candidate keeps.
        cost: `[G, H]` what each candidate costs that head (any unit that adds over heads).
        target: mean recall over the heads to reach, in (0, 1].
        allowed: optional `[G, H]` bool, candidates a head may take (e.g. within a FLOPs budget);
            a head with none allowed may take any.
        iterations: bisection steps on the price.

    Returns:
        `[H]` long, candidate index per head. If even the best recall of every head misses the
        target, each head takes its highest-recall candidate (cheapest among equals).
    """
    if recall.shape != cost.shape or recall.dim() != 2:
        raise ValueError(f"recall and cost must both be [candidates, heads], got {tuple(recall.shape)} and "
                         f"{tuple(cost.shape)}")
    if isinstance(target, bool) or not 0 < float(target) <= 1:
        raise ValueError(f"target must be a mean recall in (0, 1], got {target!r}")
    recall, cost = recall.double(), cost.double()
    if allowed is None:
        allowed = torch.ones_like(recall, dtype=torch.bool)
    allowed = allowed.to(recall.device) | ~allowed.to(recall.device).any(0, keepdim=True)
    heads = torch.arange(recall.shape[1], device=recall.device)
    order = torch.arange(recall.shape[0], dtype=torch.float64, device=recall.device)[:, None]

    def pick(lam):
        return _pick(recall, cost, allowed, order, lam)

    def mean_recall(choice):
        return recall[choice, heads].mean().item()

    choice = pick(0.0)  # the most recall each head can have
    if mean_recall(choice) < target:
        return choice
    # Above this price every head takes its cheapest allowed candidate.
    span = (recall.max() - recall.min()).item()
    hi = 2.0 * max(span, 1e-12) / _min_positive_gap(cost)
    cheapest = pick(hi)
    if mean_recall(cheapest) >= target:
        return cheapest
    lo = 0.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if mean_recall(pick(mid)) >= target:
            lo = mid
        else:
            hi = mid
    return pick(lo)


def _min_positive_gap(cost: torch.Tensor) -> float:
    """Smallest positive difference between two costs of one head (the price scale that separates them)."""
    srt = cost.sort(0).values
    gaps = srt[1:] - srt[:-1]
    gaps = gaps[gaps > 0]
    return max(gaps.min().item(), 1e-12) if gaps.numel() else 1.0
