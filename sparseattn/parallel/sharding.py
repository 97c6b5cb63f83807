"""Splitting a batch along the sequence for sequence parallelism, and putting it back together.

Order matters: labels are shifted (the target of position ``t`` is token ``t + 1``) on the whole
sequence *before* it is cut, so the target of each shard's last position, which lives on the next
rank, is not lost. The sequence is then padded at the end to a multiple of the degree ``P`` (padding
never reaches a real token under causal attention, and its labels are ``ignore_index``), cut into
``P`` consecutive shards, and each shard keeps its global position ids (RoPE needs them).

Packed rows (several documents in one ``[1, L]`` row, positions restarting at each document,
``cu_seqlens`` boundaries) keep their per-document positions; the padding becomes one more
document, and the shard carries the *global* boundaries: after the Ulysses all-to-all every rank
attends over the whole row, so the attention function needs the whole row's ``cu_seqlens``.

Example:
    >>> import torch
    >>> ids = torch.arange(10, 15)[None]  # one sequence of 5 tokens, 2 ranks
    >>> shard = shard_batch(ids, seq_parallel_rank=1, seq_parallel_size=2)
    >>> shard.input_ids.tolist(), shard.position_ids.tolist(), shard.labels.tolist()
    ([[13, 14, 0]], [[3, 4, 5]], [[14, -100, -100]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..index import cdiv
from .comm import all_gather, group_rank, group_size

__all__ = ["SequenceShard", "gather_sequence", "pad_to_multiple", "shard_batch", "shard_sequence", "shift_labels"]


@dataclass(frozen=True)
class SequenceShard:
    """One rank's part of a batch.

    Attributes:
        input_ids: `[B, padded_len / P]` token ids.
        position_ids: `[B, padded_len / P]` this shard's slice of the global position ids
            (``start .. start + padded_len / P - 1`` unless the row is packed).
        labels: `[B, padded_len / P]` targets already shifted (``ignore_index`` where none).
        seq_len: real length of the sequence before padding.
        padded_len: length after padding to a multiple of ``P``.
        start: index in the padded row of this shard's first token.
        cu_seqlens: packed rows only: `[N + 1]` int32 document boundaries of the whole padded row
            (the same on every rank), else None.
        max_seqlen: packed rows only: the longest document of the padded row.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    seq_len: int
    padded_len: int
    start: int
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None

    def model_inputs(self) -> dict:
        """Keyword arguments for a Hugging Face model's forward: ids, positions, ``use_cache=False``
        and, for a packed row, the boundaries under the names transformers' flash-attention path
        uses (``cu_seq_lens_q/k``, ``max_length_q/k``). No ``labels``: compute the loss with
        :func:`sparseattn.parallel.sequence_parallel_loss` on ``self.labels``."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        if self.cu_seqlens is not None:
            inputs.update(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                          max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)
        return inputs


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """`[B, L]` -> `[B, L]` with ``out[:, t] = labels[:, t + 1]`` and ``ignore_index`` at the end."""
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def pad_to_multiple(x: torch.Tensor, multiple: int, value, dim: int = -1) -> torch.Tensor:
    """``x`` padded with ``value`` at the end of ``dim`` to a multiple of ``multiple`` (``x`` itself if it is one)."""
    length = x.shape[dim]
    padded = cdiv(length, multiple) * multiple
    if padded == length:
        return x
    shape = list(x.shape)
    shape[dim] = padded - length
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _check_right_padding(attention_mask: torch.Tensor, shape) -> torch.Tensor:
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(shape)}, got {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if not bool((mask.cummin(dim=-1).values == mask).all()):
        raise ValueError(
            "sequence parallelism supports right padding only (each attention_mask row is ones then zeros): "
            "left or inner padding would let real tokens attend to padding under plain causal attention"
        )
    return mask


def _check_packing(cu_seqlens, position_ids, shape) -> torch.Tensor:
    if shape[0] != 1:
        raise ValueError(f"cu_seqlens describes one packed row, so input_ids must be [1, total]; got {tuple(shape)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [num_docs + 1] of cumulative lengths starting at 0")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != shape[1] or any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must start at 0, increase strictly and end at the row length {shape[1]}; "
                         f"got {bounds}")
    if position_ids is None:
        raise ValueError("a packed row (cu_seqlens) needs its position_ids (restarting at each document)")
    return cu_seqlens.to(torch.int32)


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, seq_parallel_rank: int,
                seq_parallel_size: int, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                pad_token_id: int = 0, ignore_index: int = -100) -> SequenceShard:
    """This rank's shard of a causal-LM batch (every rank of the group passes the same batch).

    Args:
        input_ids: `[B, L]` token ids.
        labels: `[B, L]` unshifted targets (Hugging Face convention: ``labels[t]`` is token ``t``,
            ``ignore_index`` where no loss); default ``input_ids``.
        seq_parallel_rank, seq_parallel_size: this rank and the degree ``P``
            (``ParallelGroups.seq_parallel_rank`` / ``.seq_parallel_size``).
        attention_mask: optional `[B, L]` right-padding mask (1 = token); padded positions get no loss.
        position_ids: optional `[B, L]` global positions (default ``0 .. L - 1``); required for a
            packed row, where they restart at each document.
        cu_seqlens: a packed row's `[N + 1]` document boundaries (``input_ids`` `[1, L]`). Loss
            across documents is the caller's business, as in one process (e.g. the first token of
            each document labelled ``ignore_index``, as ``sparseattn.training.data`` does).
        pad_token_id: the id used to pad to a multiple of ``P``.
        ignore_index: the label of positions without a target.

    Returns:
        :class:`SequenceShard`.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq_len] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    P, r = seq_parallel_size, seq_parallel_rank
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise ValueError(f"seq_parallel_size must be an int >= 1, got {P!r}")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < P:
        raise ValueError(f"seq_parallel_rank must be an int in [0, {P}), got {r!r}")
    if labels is None:
        labels = input_ids
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    if attention_mask is not None:
        labels = labels.masked_fill(~_check_right_padding(attention_mask, input_ids.shape), ignore_index)
    B, seq_len = input_ids.shape
    if position_ids is not None and position_ids.shape[-1] != seq_len:
        raise ValueError(f"position_ids must have {seq_len} positions like input_ids, got shape {tuple(position_ids.shape)}")
    if cu_seqlens is not None:
        cu_seqlens = _check_packing(cu_seqlens, position_ids, input_ids.shape)
    shifted = pad_to_multiple(shift_labels(labels, ignore_index), P, ignore_index)
    ids = pad_to_multiple(input_ids, P, pad_token_id)
    padded_len = ids.shape[1]
    pad = padded_len - seq_len
    arange = torch.arange(padded_len, device=input_ids.device)
    if position_ids is None:
        positions = arange.expand(B, -1)
    elif cu_seqlens is None:
        # Padding continues the positions (it sits after every real token, so it is never seen).
        tail = position_ids[..., -1:] + 1 + arange[:pad]
        positions = torch.cat([position_ids.expand(B, -1), tail.expand(B, -1)], dim=-1)
    else:
        # Padding is a document of its own, positions from 0.
        positions = torch.cat([position_ids.reshape(1, -1), arange[:pad][None]], dim=-1)
    max_seqlen = None
    if cu_seqlens is not None:
        if pad:
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([padded_len])])
        max_seqlen = int(cu_seqlens.diff().max())
    local = padded_len // P
    start = r * local
    return SequenceShard(input_ids=ids[:, start:start + local], position_ids=positions[:, start:start + local],
                         labels=shifted[:, start:start + local], seq_len=seq_len, padded_len=padded_len, start=start,
                         cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """This rank's consecutive chunk of ``x`` along ``dim`` (whose length must be a multiple of ``P``)."""
    P, r = group_size(group), group_rank(group)
    if x.shape[dim] % P != 0:
        raise ValueError(f"shard_sequence: length {x.shape[dim]} along dim {dim} is not a multiple of {P}; "
                         "pad it first (pad_to_multiple)")
    local = x.shape[dim] // P
    return x.narrow(dim, r * local, local)


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1,
                    length: int | None = None) -> torch.Tensor:
    """Every rank's shard concatenated along ``dim`` (differentiable), cut back to ``length`` (drops padding)."""
    out = all_gather(x, group, dim=dim)
    if length is not None:
        if not 0 < length <= out.shape[dim]:
            raise ValueError(f"gather_sequence: length must be in [1, {out.shape[dim]}], got {length}")
        out = out.narrow(dim % out.dim(), 0, length)
    return out
