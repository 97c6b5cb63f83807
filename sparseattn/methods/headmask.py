"""Head-mask attention: per KV head, full causal attention or streaming (sink + local window).

The prefill side of trained head masks (PruLong / DuoAttention): a full head keeps every causal
block, a streaming head keeps the blocks of the ``streaming`` method (key block 0 and the first
``sink`` tokens, the last ``window`` tokens of each query, the diagonal), block-granular exactly as
``method="streaming"``. With GQA all query heads of a KV head share its choice. The selector builds
one ``BlockIndex`` with both kinds of rows, so the shared Triton kernel runs the whole layer in
one launch; an all-full layer returns ``None`` (dense attention: cuDNN SDPA on a GPU).

The mask of one layer is the config's ``full_heads``; a model's `[layers, kv_heads]` mask comes
from :func:`sparseattn.headmask.load_head_mask`, and
:mod:`sparseattn.integrations.headmask_attention` applies it per layer in a Hugging Face model
(prefill here, decode with a KV cache that keeps only sink + window for streaming heads).

Example:
    >>> import torch
    >>> from sparseattn.methods.headmask import head_mask_attention
    >>> q = torch.randn(1, 4, 300, 16)
    >>> k, v = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    >>> out, stats = head_mask_attention(q, k, v, full_heads=[True, False], sink=16, window=64,
    ...                                  block_size=64, return_stats=True)
    >>> out.shape, [round(d, 2) for d in stats.density[0].tolist()]
    (torch.Size([1, 4, 300, 16]), [1.0, 1.0, 0.8, 0.8])
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ..index import BlockIndex, causal_block_mask
from ..reference.streaming import streaming_select
from ..validation import check_block_size, check_positive_int
from . import block_index_bytes, register_method

__all__ = ["HeadMaskConfig", "head_mask_attention", "select_blocks"]


def _normalize_full_heads(value) -> tuple[bool, ...] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.numel() == 0:
            raise ValueError(f"full_heads must be a 1-D per-KV-head mask, got shape {tuple(value.shape)}")
        if value.dtype != torch.bool and not ((value == 0) | (value == 1)).all():
            raise ValueError(f"full_heads must hold only 0/1 or bools (1 = full head), got {value.tolist()}")
        return tuple(bool(v) for v in value.tolist())
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("full_heads must not be empty (one entry per KV head)")
        out = []
        for entry in value:
            if isinstance(entry, bool) or (isinstance(entry, int) and entry in (0, 1)):
                out.append(bool(entry))
            else:
                raise ValueError(f"full_heads entries must be bools or 0/1 (1 = full head), got {entry!r}")
        return tuple(out)
    raise TypeError(f"full_heads must be None, a list/tuple of bools or a 1-D tensor, got {type(value).__name__}")


@dataclass(frozen=True)
class HeadMaskConfig:
    """Options of head-mask attention for one layer.

    Args:
        full_heads: per KV head, True (or 1) = full attention, False (0) = streaming; a list,
            tuple or 1-D tensor of length ``Hkv`` (stored as a tuple of bools). ``None`` (default)
            makes every head full, i.e. dense attention.
        sink: first tokens a streaming head attends to (default 128, as ``streaming``).
        window: most recent tokens a streaming head attends to, itself included (default 1024).
        block_size: selection block (default 64); block-granular, so a streaming query may see up
            to one block more than ``sink``/``window`` tokens (as the ``streaming`` method).
    """

    full_heads: torch.Tensor | tuple[bool, ...] | None = None
    sink: int = 128
    window: int = 1024
    block_size: int = 64

    def __post_init__(self):
        object.__setattr__(self, "full_heads", _normalize_full_heads(self.full_heads))
        check_positive_int("sink", self.sink, allow_zero=True)
        check_positive_int("window", self.window)
        check_block_size("block_size", self.block_size)


@functools.lru_cache(maxsize=4)
def _row_tables(Lq: int, Lk: int, bs: int, sink: int, window: int, causal: bool, device: str):
    """Shape-only row tables, shared by every layer and call of one prompt shape: full rows `[nq, nk]`,
    their counts `[nq]`, streaming rows padded to `nk`, their counts, and the streaming rows at their
    own width (all int32). Building them is ~40 small torch ops (a sort among them), which a model
    prefill used to pay in every patched layer (1.8 ms of host time per layer at 8K, NOTES.md run
    16). The two `nq x nk` tables are 32 MiB at 128K with 64-blocks; the last 4 shapes are kept.
    """
    stream = streaming_select(Lq, Lk, 1, 1, sink=sink, window=window, block_size=bs, causal=causal, device=device)
    allowed = causal_block_mask(Lq, Lk, bs, bs, causal, device=device)  # [nq, nk]
    nk = allowed.shape[1]
    dense = BlockIndex.from_mask(allowed[None, None], block_q=bs, block_k=bs, q_len=Lq, k_len=Lk, max_k=nk)
    stream_wide = torch.nn.functional.pad(stream.indices[0, 0], (0, nk - stream.indices.shape[-1]), value=-1)
    return dense.indices[0, 0], dense.counts[0, 0], stream_wide.contiguous(), stream.counts[0, 0], stream.indices[0, 0]


@functools.lru_cache(maxsize=256)
def _head_flags(full: tuple[bool, ...], group: int, device: str) -> torch.Tensor:
    """`[Hq]` bool on the device (query head h follows KV head h // G): no host-to-device copy per call."""
    return torch.tensor(full, dtype=torch.bool).repeat_interleave(group).to(device)


def select_blocks(q: torch.Tensor, k: torch.Tensor, config: HeadMaskConfig, *,
                  causal: bool = True) -> BlockIndex | None:
    """Blocks of `q [B, Hq, Lq, D]` against `k [B, Hkv, Lk, D]`: all causal ones for full heads, sink + window
    for streaming heads; ``None`` (dense) when every head is full.

    Shapes only: no data-dependent host synchronization. The row tables of a shape are built once
    and reused (a model's layers differ only in which heads are full), so a call is one
    ``torch.where`` on the device.
    """
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    full = config.full_heads
    if full is None or all(full):
        return None
    if len(full) != Hkv:
        raise ValueError(f"full_heads has {len(full)} entries but k has {Hkv} KV heads; give one entry per KV head")
    bs = config.block_size
    dense_rows, dense_counts, stream_rows, stream_counts, stream_narrow = _row_tables(
        Lq, Lk, bs, config.sink, config.window, causal, str(q.device))
    if not any(full):
        return BlockIndex(stream_narrow.expand(B, Hq, -1, -1), stream_counts.expand(B, Hq, -1), bs, bs, Lq, Lk)
    full_q = _head_flags(full, Hq // Hkv, str(q.device))
    indices = torch.where(full_q[:, None, None], dense_rows, stream_rows)  # [Hq, nq, nk]
    counts = torch.where(full_q[:, None], dense_counts, stream_counts)  # [Hq, nq]
    return BlockIndex(indices.expand(B, -1, -1, -1), counts.expand(B, -1, -1), bs, bs, Lq, Lk)


def head_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, full_heads, *, sink: int = 128,
                        window: int = 1024, block_size: int = 64, causal: bool = True, scale: float | None = None,
                        return_stats: bool = False):
    """Attention with full heads and streaming heads (one layer of a trained head mask).

    Args:
        q: `[B, Hq, Lq, D]`, the last `Lq` of `Lk` positions.
        k, v: `[B, Hkv, Lk, D]`, `Hq % Hkv == 0`.
        full_heads: `[Hkv]` bools or 0/1 (True = full head); all query heads of a KV head share it.
        sink: sink tokens of streaming heads (default 128).
        window: local-window tokens of streaming heads (default 1024).
        block_size: selection block (default 64).
        causal: causal attention (default True).
        scale: softmax scale, default `1/sqrt(D)`.
        return_stats: also return the :class:`sparseattn.AttentionStats` (per-head density, index).

    Returns:
        `[B, Hq, Lq, D]` in q's dtype (and the stats). GPU: the shared Triton kernel (cuDNN SDPA
        when every head is full); CPU: the exact fallback of :func:`sparseattn.sparse_attention`.
    """
    from ..api import sparse_attention

    config = HeadMaskConfig(full_heads=full_heads, sink=sink, window=window, block_size=block_size)
    return sparse_attention(q, k, v, method="headmask", config=config, causal=causal, scale=scale,
                            return_stats=return_stats)


def index_bytes(config: HeadMaskConfig, batch: int, q_heads: int, q_len: int, k_len: int) -> int:
    """What ``select_blocks`` allocates per call: a `[B, Hq, nq, nk]` index when full and streaming
    heads are mixed; nothing otherwise (dense attention, or views of the cached streaming rows)."""
    full = config.full_heads
    if full is None or all(full) or not any(full):
        return 0
    return block_index_bytes(batch, q_heads, q_len, k_len, config.block_size)


def head_slice(config: HeadMaskConfig, start: int, stop: int, group: int) -> HeadMaskConfig:
    """The config of query heads ``[start, stop)``: their KV heads' entries of ``full_heads``."""
    if config.full_heads is None:
        return config
    return dataclasses.replace(config, full_heads=config.full_heads[start // group:stop // group])


def chunk_bounds(config: HeadMaskConfig, kv_heads: int, per_chunk: int) -> list[tuple[int, int]]:
    """Chunks of a memory-bounded call that never mix full and streaming heads (each run of equal
    heads cut into pieces of ``per_chunk``): a chunk of full heads is then dense attention on the
    dense mode's 128x128 tiles, rather than index rows on the 64-row blocks' 64x64 tiles.

    >>> chunk_bounds(HeadMaskConfig(full_heads=[1, 1, 1, 0, 0, 1]), 6, 2)
    [(0, 2), (2, 3), (3, 5), (5, 6)]
    """
    full = config.full_heads or (True,) * kv_heads
    bounds, g0 = [], 0
    for g in range(1, kv_heads + 1):
        if g == kv_heads or full[g] != full[g0] or g - g0 == per_chunk:
            bounds.append((g0, g))
            g0 = g
    return bounds


register_method("headmask", select_blocks, HeadMaskConfig, index_bytes=index_bytes, head_slice=head_slice,
                chunk_bounds=chunk_bounds,
                description="trained head mask: full heads + streaming (sink + window) heads")
