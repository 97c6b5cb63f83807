"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards around attention.

Each of the ``P`` ranks of a sequence-parallel group holds ``L / P`` consecutive positions of every
head. Before attention one all-to-all gives each rank the *whole* sequence of ``Hq / P`` query heads
and their KV heads; any attention function then runs unchanged (full, streaming, sparse selectors
that look at the whole sequence, learned per-head gates), and a second all-to-all returns the
output to sequence shards:

    q [B, Hq, L/P, D]  --all-to-all-->  [B, Hq/P, L, D]  --attention-->  [B, Hq/P, L, D]  --all-to-all-->  [B, Hq, L/P, D]
    k [B, Hkv, L/P, D] --all-to-all-->  [B, Hkv/P, L, D]     (Hkv >= P)
    k [B, Hkv, L/P, D] --repeat P/Hkv--> [B, P, L/P, D] --all-to-all--> [B, 1, L, D]   (Hkv < P)

KV heads are repeated only when the degree exceeds them (then ``P / Hkv`` consecutive ranks share a
KV head, and each rank's ``Hq / P`` query heads all belong to that head's GQA group). Requirements:
``Hq % P == 0`` and ``Hkv % P == 0`` or ``P % Hkv == 0``.

Example (one process; with a real group the same call runs sequence-parallel):
    >>> import torch
    >>> from sparseattn import sparse_attention
    >>> q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    >>> def gated(q, k, v, gate):  # z * full + (1 - z) * streaming, one z per KV head
    ...     z = gate.repeat_interleave(q.shape[1] // k.shape[1])[None, :, None, None]
    ...     full = sparse_attention(q, k, v, method="full")
    ...     local = sparse_attention(q, k, v, method="streaming", sink=16, window=16, block_size=16)
    ...     return z * full + (1 - z) * local
    >>> out = ulysses_attention(q, k, v, gated, None, per_kv_head={"gate": torch.tensor([1.0, 0.25])})
    >>> out.shape
    torch.Size([1, 4, 64, 16])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import all_gather, all_to_all, group_rank, group_size

__all__ = ["HeadShard", "check_heads", "gather_heads", "gather_kv_heads", "head_shard", "scatter_heads",
           "ulysses_attention"]


def check_heads(num_heads: int, num_kv_heads: int, seq_parallel_size: int) -> None:
    """Raise ValueError unless ``num_heads`` query and ``num_kv_heads`` KV heads split over ``seq_parallel_size`` ranks."""
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("seq_parallel_size", seq_parallel_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    P = seq_parallel_size
    if num_heads % P != 0:
        raise ValueError(
            f"Ulysses splits the {num_heads} query heads over seq_parallel_size ({P}) ranks, so seq_parallel_size "
            f"must divide {num_heads}"
        )
    if num_kv_heads % P != 0 and P % num_kv_heads != 0:
        raise ValueError(
            f"Ulysses needs num_kv_heads ({num_kv_heads}) to be a multiple of seq_parallel_size ({P}) or a divisor "
            f"of it (then KV heads are repeated); {num_kv_heads} KV heads cannot be split over {P} ranks"
        )


@dataclass(frozen=True)
class HeadShard:
    """The heads one rank of a sequence-parallel group attends over, between the two all-to-alls.

    Attributes:
        rank, size: the rank in the group and the group size ``P``.
        num_heads, num_kv_heads: the layer's global head counts ``Hq``, ``Hkv``.
        q_heads: this rank's query heads, a slice of ``range(Hq)``.
        kv_heads: this rank's KV heads, a slice of ``range(Hkv)`` (one head when ``P > Hkv``).
        kv_repeat: ranks that share each KV head (``P / Hkv`` when ``P > Hkv``, else 1).
    """

    rank: int
    size: int
    num_heads: int
    num_kv_heads: int
    q_heads: slice
    kv_heads: slice
    kv_repeat: int

    def query(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's part of a per-query-head tensor (heads along ``dim``, ``Hq`` long)."""
        return self._take(tensor, dim, self.q_heads, self.num_heads, "query")

    def kv(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's part of a per-KV-head tensor (heads along ``dim``, ``Hkv`` long), e.g. gates."""
        return self._take(tensor, dim, self.kv_heads, self.num_kv_heads, "KV")

    @staticmethod
    def _take(tensor, dim, heads: slice, count: int, kind: str) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or tensor.shape[dim] != count:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"a per-{kind}-head tensor must have {count} entries along dim {dim}, got {shape}")
        return tensor.narrow(dim, heads.start, heads.stop - heads.start)


def head_shard(num_heads: int, num_kv_heads: int, group: dist.ProcessGroup | None) -> HeadShard:
    """This rank's :class:`HeadShard` for a layer of ``num_heads`` query / ``num_kv_heads`` KV heads."""
    P, r = group_size(group), group_rank(group)
    check_heads(num_heads, num_kv_heads, P)
    q_per_rank = num_heads // P
    if num_kv_heads >= P:
        kv_per_rank = num_kv_heads // P
        return HeadShard(r, P, num_heads, num_kv_heads, slice(r * q_per_rank, (r + 1) * q_per_rank),
                         slice(r * kv_per_rank, (r + 1) * kv_per_rank), 1)
    repeat = P // num_kv_heads
    kv = r // repeat
    return HeadShard(r, P, num_heads, num_kv_heads, slice(r * q_per_rank, (r + 1) * q_per_rank),
                     slice(kv, kv + 1), repeat)


def scatter_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: dist.ProcessGroup | None,
                  *, head_dim: int = 1, seq_dim: int = 2):
    """Sequence shards -> head shards (the first all-to-all); differentiable.

    Args:
        query: `[B, Hq, L/P, D]` (default layout; ``head_dim`` and ``seq_dim`` name others).
        key, value: `[B, Hkv, L/P, D]`.
        group: the sequence-parallel group (None: nothing to do).

    Returns:
        ``(query [B, Hq/P, L, D], key [B, max(Hkv/P, 1), L, D], value, HeadShard)``.
    """
    if not (query.dim() == key.dim() == value.dim()) or key.shape != value.shape:
        raise ValueError(f"query, key and value must have the same rank and key/value one shape, got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if query.shape[seq_dim] != key.shape[seq_dim]:
        raise ValueError(f"sequence-parallel attention needs query and key shards of one length (no KV cache), got "
                         f"{query.shape[seq_dim]} and {key.shape[seq_dim]}")
    shard = head_shard(query.shape[head_dim], key.shape[head_dim], group)
    if shard.size == 1:
        return query, key, value, shard
    if shard.kv_repeat > 1:
        key = key.repeat_interleave(shard.kv_repeat, dim=head_dim)
        value = value.repeat_interleave(shard.kv_repeat, dim=head_dim)
    query, key, value = (all_to_all(t, group, scatter_dim=head_dim, gather_dim=seq_dim) for t in (query, key, value))
    return query, key, value, shard


def gather_heads(out: torch.Tensor, group: dist.ProcessGroup | None, *, head_dim: int = 1,
                 seq_dim: int = 2) -> torch.Tensor:
    """Head shards -> sequence shards (the second all-to-all): `[B, Hq/P, L, D]` -> `[B, Hq, L/P, D]`."""
    return all_to_all(out, group, scatter_dim=seq_dim, gather_dim=head_dim)


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_fn: Callable[..., torch.Tensor], group: dist.ProcessGroup | None, *,
                      per_kv_head: Mapping[str, torch.Tensor] | None = None,
                      per_q_head: Mapping[str, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    """Sequence-parallel attention: all-to-all, ``attention_fn`` on whole sequences, all-to-all back.

    Args:
        query: `[B, Hq, L/P, D]`, this rank's consecutive positions of the sequence.
        key, value: `[B, Hkv, L/P, D]`, the same positions.
        attention_fn: ``attention_fn(q, k, v, **sliced, **kwargs) -> [B, Hq/P, L, D]`` on
            `q [B, Hq/P, L, D]`, `k, v [B, Hkv', L, D]`; causal over the whole sequence.
        group: the sequence-parallel group (None: one process, ``attention_fn`` on the inputs).
        per_kv_head: tensors with ``Hkv`` entries along dim 0 (e.g. gates); each is passed on,
            under its name, sliced to this rank's KV heads.
        per_q_head: the same for tensors with ``Hq`` entries along dim 0.
        **kwargs: passed to ``attention_fn`` unchanged.

    Returns:
        `[B, Hq, L/P, D]`, this rank's positions of every head.
    """
    q, k, v, shard = scatter_heads(query, key, value, group)
    sliced = {name: shard.kv(t) for name, t in (per_kv_head or {}).items()}
    for name, t in (per_q_head or {}).items():
        if name in sliced:
            raise ValueError(f"{name!r} is given both per_kv_head and per_q_head")
        sliced[name] = shard.query(t)
    out = attention_fn(q, k, v, **sliced, **kwargs)
    if out.shape != q.shape[:-1] + v.shape[-1:]:
        raise ValueError(f"attention_fn returned shape {tuple(out.shape)}, expected {tuple(q.shape[:-1] + v.shape[-1:])}")
    return gather_heads(out, group)


def gather_kv_heads(local: torch.Tensor, group: dist.ProcessGroup | None, num_kv_heads: int,
                    dim: int = -1) -> torch.Tensor:
    """Every rank's per-KV-head values, differentiably: `[..., Hkv_local]` -> `[..., Hkv]` on every rank.

    For per-head statistics such as the gate sparsity ``1 - mean(z)`` when each rank computed ``z``
    only for its own KV heads. When ``P > Hkv`` several ranks hold one head; their copies are
    averaged (they are equal when the ranks sampled the same gate noise). Gradients reach every
    rank's ``local`` (see :mod:`sparseattn.parallel.comm` for the averaging convention), which
    ``torch.distributed.all_gather`` would drop.

    Args:
        local: this rank's values, its KV heads along ``dim`` (``HeadShard.kv`` of a `[Hkv]` tensor).
        group: the sequence-parallel group (None: returns ``local``).
        num_kv_heads: the layer's ``Hkv``.
        dim: the head dimension of ``local``.
    """
    P = group_size(group)
    # The query-head count does not matter here; any multiple of P and of num_kv_heads will do.
    check_heads(num_kv_heads * P, num_kv_heads, P)
    dim = dim % local.dim()
    expected = max(num_kv_heads // P, 1)
    if local.shape[dim] != expected:
        raise ValueError(f"gather_kv_heads: local has {local.shape[dim]} heads along dim {dim}, expected "
                         f"{expected} (num_kv_heads {num_kv_heads} over {P} ranks)")
    gathered = all_gather(local, group, dim=dim)  # [..., P * Hkv_local, ...]
    if P <= num_kv_heads:
        return gathered
    return gathered.unflatten(dim, (num_kv_heads, P // num_kv_heads)).mean(dim + 1)
