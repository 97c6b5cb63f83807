"""The language-model loss of a sequence split over ranks, equal to the one-process loss.

Each rank sums the cross-entropy of its own tokens and counts them; both sums are reduced over the
sequence-parallel group, so every rank gets the mean over *all* tokens of the sequence(s) - the
number a single process would compute - and back-propagates it. Gradients are then averaged over
the group (see :mod:`sparseattn.parallel.comm`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import all_reduce_sum, group_size

__all__ = ["sequence_parallel_loss"]


def sequence_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup | None,
                           ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy over the whole sequence-parallel group, identical on every rank.

    Args:
        logits: `[B, L/P, V]` this rank's logits.
        labels: `[B, L/P]` this rank's targets, already shifted (:func:`shard_batch` does it).
        group: the sequence-parallel group (None: one process).
        ignore_index: label of positions without a target.

    Returns:
        A scalar fp32 tensor: sum of token losses over the group / number of target tokens in the
        group (0 when there are none).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [batch, seq, vocab] and labels [batch, seq] of the same batch and seq, "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    token_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                                reduction="sum")
    count = (labels != ignore_index).sum().to(torch.float32)
    if group_size(group) > 1:
        with torch.no_grad():
            dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
        token_sum = all_reduce_sum(token_sum, group)
    return token_sum / count.clamp(min=1)
