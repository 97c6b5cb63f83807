"""MInference (Jiang et al., NeurIPS 2024): vertical-slash, A-shape and block-sparse head patterns.

Selection: the vertical-and-slash index is built by ``kernels.minference_index`` (on a GPU: Triton
estimation + closed-form index building, no host sync; on a CPU: fp32 estimation + the same
building in torch), equal to the fp32 reference, which runs for non-causal calls. Per-head
patterns (``head_patterns``) come from the offline search (``sparseattn.search``), stored as a
versioned JSON file per model and loaded with :func:`load_minference_patterns`.

Pattern file (``format: "sparseattn.minference_patterns"``, ``version: 1``)::

    {"format": "sparseattn.minference_patterns", "version": 1,
     "model": "SmolLM2-135M-Instruct", "aliases": ["smollm2", "default"],
     "num_layers": 30, "num_heads": 9,
     "entry": ["pattern", "v", "s", "recall"],
     "search": {... how it was made: command, calibration text, length, budget, candidates ...},
     "layers": {"0": {"0": ["vertical_and_slash", 64, 512, 0.97], "1": ["a_shape", 64, 256, 0.99], ...}, ...}}

Each head entry is ``[pattern, v, s, recall]``: ``vertical_and_slash`` -> ``v`` verticals and ``s``
slashes (tokens); ``a_shape`` -> ``v`` sink and ``s`` window tokens; ``block_sparse`` -> ``v`` key
blocks per query block (``s`` unused, 0). ``recall`` is the exact attention mass the pattern kept
on the calibration text (informative only). Heads are query heads, layers are ``layer_idx``.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..index import BlockIndex, VerticalSlashIndex, cdiv, diagonal_block_range
from ..reference.minference import (a_shape_select, adaptive_sizes, last_query_scores, minference_select,
                                   per_head_sizes, selection_sizes)
from ..reference.xattention import check_qk
from ..validation import check_block_size, check_choice, check_positive_int, check_qkv, check_unit_interval
from . import register_method

__all__ = ["MInferenceConfig", "MInferencePatterns", "Minference_prefill", "PATTERNS", "block_sparse_select_fast",
           "load_minference_patterns", "minference_layer_configs", "select_blocks"]

PATTERNS = {"vertical_and_slash", "a_shape", "block_sparse"}
PATTERN_FORMAT = "sparseattn.minference_patterns"
PATTERN_VERSION = 1
PATTERN_DIR = Path(__file__).resolve().parent.parent / "data" / "minference"


def _head_pattern(entry, where: str) -> tuple[str, int, int]:
    """``[pattern, v, s]`` or ``[pattern, v, s, score]`` -> a validated ``(pattern, v, s)``."""
    if not isinstance(entry, (list, tuple)) or len(entry) not in (3, 4):
        raise ValueError(f"{where} must be [pattern, v, s] or [pattern, v, s, score], got {entry!r}")
    pattern, v, s = entry[:3]
    check_choice(f"{where} pattern", pattern, PATTERNS)
    for name, value in (("v", v), ("s", s)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where} {name} must be a non-negative int, got {value!r} in {entry!r}")
    if pattern == "vertical_and_slash" and (v < 1 or s < 1):
        raise ValueError(f"{where}: vertical_and_slash needs v >= 1 verticals and s >= 1 slashes, got {entry!r}")
    if pattern == "a_shape" and s < 1:
        raise ValueError(f"{where}: a_shape needs a window s >= 1 token, got {entry!r}")
    if len(entry) == 4 and (isinstance(entry[3], bool) or not isinstance(entry[3], (int, float))):
        raise ValueError(f"{where} score must be a number, got {entry[3]!r}")
    return pattern, int(v), int(s)


@dataclass(frozen=True)
class MInferenceConfig:
    """Options of MInference.

    Args:
        pattern: ``"vertical_and_slash"`` (default), ``"a_shape"`` or ``"block_sparse"``.
        vertical_size: key columns kept (default 1000).
        slash_size: diagonals kept (default 6096).
        adaptive_budget: if set, a fraction of the key length: total budget ``adaptive_budget x Lk``
            tokens, 20% verticals and 80% slashes (overrides the two sizes).
        last_q: queries used for the online estimate (default 64).
        block_size: query block of the index (default 64).
        sink, window: tokens of the ``a_shape`` pattern.
        top_k: key blocks per query block of the ``block_sparse`` pattern.
        head_patterns: per query head ``(pattern, v, s)`` (see the module docstring; a 4th score
            element is accepted and dropped), e.g. one layer of a searched pattern file
            (:func:`minference_layer_configs`). When given, it replaces ``pattern`` and the sizes;
            empty (default) means every head uses ``pattern``.
    """

    pattern: str = "vertical_and_slash"
    vertical_size: int = 1000
    slash_size: int = 6096
    adaptive_budget: float | None = None
    last_q: int = 64
    block_size: int = 64
    sink: int = 128
    window: int = 1024
    top_k: int = 100
    head_patterns: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self):
        check_choice("pattern", self.pattern, PATTERNS)
        check_positive_int("vertical_size", self.vertical_size)
        check_positive_int("slash_size", self.slash_size)
        if self.adaptive_budget is not None:
            check_unit_interval("adaptive_budget", self.adaptive_budget, allow_tensor=False)
        check_positive_int("last_q", self.last_q)
        check_block_size("block_size", self.block_size)
        check_positive_int("sink", self.sink, allow_zero=True)
        check_positive_int("window", self.window)
        check_positive_int("top_k", self.top_k)
        if not isinstance(self.head_patterns, (list, tuple)):
            raise TypeError(f"head_patterns must be a list of [pattern, v, s] per query head, got "
                            f"{type(self.head_patterns).__name__}")
        heads = tuple(_head_pattern(e, f"head_patterns[{i}]") for i, e in enumerate(self.head_patterns))
        object.__setattr__(self, "head_patterns", heads)
        if heads and self.adaptive_budget is not None:
            raise ValueError("adaptive_budget and head_patterns exclude each other: head_patterns sets every "
                             "head's sizes")


# ---- selection ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _device_ints(values: tuple, device: torch.device) -> torch.Tensor:
    """A cached int64 device tensor of host constants (a fresh copy per call would wait for the GPU)."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def _fast_selector():
    """``minference_select_fast``, or None where Triton is not installed (then the reference runs)."""
    try:
        from ..kernels.minference_index import minference_select_fast
    except ImportError:  # pragma: no cover - platforms without Triton
        return None
    return minference_select_fast


def _vertical_and_slash(q, k, vertical_size, slash_size, config: MInferenceConfig, causal: bool):
    """``vertical_size``/``slash_size``: ints or one per query head.

    Causal: ``minference_select_fast`` (Triton on CUDA; on a CPU the reference's fp32 estimation
    and the torch index builder), equal to the reference. Non-causal: the fp32 reference.
    """
    fast = _fast_selector() if causal else None
    if fast is not None:
        return fast(q, k, vertical_size=vertical_size, slash_size=slash_size, adaptive_budget=config.adaptive_budget,
                    last_q=config.last_q, block_size=config.block_size)
    return minference_select(q, k, vertical_size=vertical_size, slash_size=slash_size,
                             adaptive_budget=config.adaptive_budget, last_q=config.last_q,
                             block_size=config.block_size, causal=causal)


def _vertical_and_slash_reference(q, k, heads, vertical_sizes, slash_sizes, config: MInferenceConfig,
                                  causal: bool) -> VerticalSlashIndex:
    """The fp32 reference's vertical-slash index of query heads ``heads`` only (a mix's non-causal
    vertical-slash heads; causal ones take ``_vertical_and_slash_tables``)."""
    G, device = q.shape[1] // k.shape[1], q.device
    idx, kv_idx = _device_ints(tuple(heads), device), _device_ints(tuple(h // G for h in heads), device)
    return minference_select(q.index_select(1, idx), k.index_select(1, kv_idx), vertical_size=vertical_sizes,
                             slash_size=slash_sizes, last_q=config.last_q, block_size=config.block_size, causal=causal)


def _vertical_and_slash_tables(q, k, heads, vertical_sizes, slash_sizes, config: MInferenceConfig, backend: str):
    """The vertical-slash tables of query heads ``heads`` only (causal; ``fill_vertical_slash_index``
    writes their index): the estimation reads those heads' last ``last_q`` rows (a copy of
    ``[B, len(heads), last_q, D]``) against their KV heads (no copy of k), so its cost follows the
    vertical-slash heads, not the KV groups they span."""
    from ..kernels.minference_index import HAS_GATHER, last_query_scores_fast, vertical_slash_tables

    B, Hq, Lq, D = q.shape
    Lk, G = k.shape[2], Hq // k.shape[1]
    kv = [h // G for h in heads]
    n = min(config.last_q, Lq)
    q_last = q[:, :, Lq - n:].index_select(1, _device_ints(tuple(heads), q.device))  # [B, len(heads), n, D]
    def scores():
        if backend == "triton" and HAS_GATHER:
            return last_query_scores_fast(q_last, k, n, causal=True, kv_heads=kv)[:2]
        # the reference's fp32 estimation (CPU: the KV heads copied)
        return last_query_scores(q_last, k.index_select(1, _device_ints(tuple(kv), q.device)), n, causal=True)[:2]

    # The scores are ours: forced in place, and freed once their top-k is taken (no name holds them).
    return vertical_slash_tables(*scores(), vertical_sizes=vertical_sizes, slash_sizes=slash_sizes,
                                 q_len=Lq, k_len=Lk, block_size=config.block_size, overwrite=True, backend=backend)


def block_sparse_select_fast(q: torch.Tensor, k: torch.Tensor, *, top_k, block_size: int = 64, causal: bool = True,
                             heads: list[int] | None = None, backend: str = "auto") -> BlockIndex:
    """MInference's block_sparse pattern without a full sort; equal to ``reference.block_sparse_select``.

    The pooled block scores are computed a chunk of heads at a time (``torch.bmm``, at most
    ``BLOCK_SPARSE_CHUNK_ELEMENTS`` fp32, ``BLOCK_SPARSE_GROUP_CHUNK_ELEMENTS`` when ``k`` has one KV
    head); each chunk's rows are then selected by the Triton kernel
    behind ``kernels.minference_index.block_top_k_`` (a bisected cut, no sort), or, with the torch
    backend, by a stable sort of each row and a sort of the few candidates.

    Args:
        q: `[B, Hq, Lq, D]`; k: `[B, Hkv, Lk, D]`.
        top_k: key blocks per query block, an int or one per selected head.
        block_size: query and key block size (default 64).
        causal: causal attention (default True).
        heads: the query heads to select for (default all); the index has ``len(heads)`` heads.
        backend: ``"triton"`` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``), ``"torch"``, or
            ``"auto"`` (default: Triton on CUDA, torch otherwise).

    Returns:
        ``BlockIndex`` of width ``min(max top_k + 3, nk)`` (top blocks, block 0, diagonal blocks).

    Example:
        >>> q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16)
        >>> index = block_sparse_select_fast(q, k, top_k=1)  # 1 top block + block 0 + diagonal
        >>> index.indices.shape, bool((index.counts <= 3).all())
        (torch.Size([1, 2, 4, 4]), True)
    """
    B, Hq, Hkv, Lq, Lk, D = check_qk(q, k, "block_sparse_select_fast")
    heads = list(range(Hq)) if heads is None else list(heads)
    top = per_head_sizes("top_k", top_k, len(heads), allow_zero=True)
    return _block_sparse_rows(q, k, top, heads, block_size, causal, backend)


def _block_sparse_rows(q, k, top, heads, bs, causal, backend, into=None) -> BlockIndex | None:
    """``block_sparse_select_fast`` on checked arguments. ``into``: ``(range_starts, range_counts)``
    of a per-head ``VerticalSlashIndex`` whose query heads ``heads`` get the rows as block-aligned
    ranges (written by the kernel on the Triton path: no ``BlockIndex`` in between); returns None."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    H, G, device = len(heads), Hq // Hkv, q.device
    nq, nk = cdiv(Lq, bs), cdiv(Lk, bs)
    if into is not None and _top_k_backend(backend, device, nk) != "triton":
        index = _block_sparse_rows(q, k, top, heads, bs, causal, backend)
        starts, counts = into
        idx = _device_ints(tuple(heads), device)
        starts.index_copy_(1, idx, _as_ranges(index, starts.shape[-1]))
        counts.index_copy_(1, idx, index.counts)
        return None
    # fp32 block means of the span of heads selected for (views of q and k: no copy), then the heads.
    lo, hi = min(heads), max(heads) + 1
    q_pool = _block_mean_pool(q[:, lo:hi], bs)  # [B, hi - lo, nq, D]
    k_pool = _block_mean_pool(k[:, lo // G:(hi - 1) // G + 1], bs)  # [B, its KV heads, nk, D]
    out_heads = heads
    heads = [h - lo for h in heads]
    if _top_k_backend(backend, device, nk) == "triton":
        return _block_sparse_triton(q_pool, k_pool, heads, top, Lq, Lk, bs, causal, G, lo % G,
                                    into=into and (*into, out_heads), chunk_elements=_score_chunk_elements(Hkv))
    if heads != list(range(hi - lo)):
        q_pool = q_pool.index_select(1, _device_ints(tuple(heads), device))
    kv = _device_ints(tuple((h + lo % G) // G for h in heads), device)
    k_pool_t = k_pool.index_select(1, kv).transpose(-1, -2)  # [B, H, D, nk]
    width_top = min(max(max(top), 1), nk)
    limit = _device_ints(tuple(top), device)[:, None, None]  # [H, 1, 1]
    width = block_sparse_width(top, nk)
    first, last = diagonal_block_range(Lq, Lk, bs, bs, device=device)
    # Block numbers fit int16 up to 2M tokens at 64-blocks: a 16-bit radix sort is 4x shorter than int64's.
    small = torch.int16 if nk < 2 ** 15 - 1 else torch.int32
    forced = torch.stack([torch.zeros_like(first), first, last], dim=-1).to(small)  # [nq, 3]
    indices = torch.empty(B, H, nq, width, dtype=torch.int32, device=device)
    counts = torch.empty(B, H, nq, dtype=torch.int32, device=device)
    cols = torch.arange(nk, device=device)
    blocks_per_chunk = max(1, _score_chunk_elements(Hkv) // (B * H * nk))
    for qb0 in range(0, nq, blocks_per_chunk):
        qb1 = min(nq, qb0 + blocks_per_chunk)
        scores = torch.matmul(q_pool[:, :, qb0:qb1], k_pool_t).div_(math.sqrt(D))  # [B, H, c, nk]
        if causal:
            scores.masked_fill_(cols > last[qb0:qb1, None], float("-inf"))
        # A stable sort, not topk: ties at the cut go to the lower block, as in the reference.
        values, picked = torch.sort(scores, dim=-1, descending=True, stable=True)
        values, picked = values[..., :width_top], picked[..., :width_top]
        keep = (torch.arange(width_top, device=device) < limit) & (values > float("-inf"))
        cand = torch.cat([torch.where(keep, picked, nk).to(small), forced[qb0:qb1].expand(B, H, -1, -1)], dim=-1)
        cand = torch.sort(cand, dim=-1).values
        # Drop repeats and the "none" marker nk, keeping ascending order: a prefix sum places each
        # kept block; the others go to a spare last column (no second sort).
        first_seen = torch.ones_like(cand, dtype=torch.bool)
        first_seen[..., 1:] = cand[..., 1:] != cand[..., :-1]
        valid = first_seen & (cand < nk)
        place = torch.where(valid, valid.cumsum(-1) - 1, width)
        row = torch.full((*cand.shape[:-1], width + 1), -1, dtype=torch.int32, device=device)
        row.scatter_(-1, place, cand.to(torch.int32))
        indices[:, :, qb0:qb1] = row[..., :width]
        counts[:, :, qb0:qb1] = valid.sum(-1, dtype=torch.int32)
    return BlockIndex(indices, counts, bs, bs, Lq, Lk)


# Pooled scores per chunk of block_sparse_select_fast (64 MiB of fp32: four heads at 128K on 64-blocks,
# counted by ``index_bytes``). Each chunk is one bmm and one top-k launch, ~100 us of host time on the
# H100 machine against ~80 us of GPU work a head (NOTES.md run 22g): one head a chunk (16 MiB, before
# run 22h) left tables of many block-sparse heads bound by the host.
BLOCK_SPARSE_CHUNK_ELEMENTS = 1 << 24
# ... and in a call of one KV head (16 MiB: one head at 128K). The API cuts a call down to one KV
# group when a group's index alone nears the budget (a wide vertical-slash head beside block-sparse
# ones): there the scratch stays small (run 22h: 189 MiB with 64 MiB of scores, budget 154).
BLOCK_SPARSE_GROUP_CHUNK_ELEMENTS = 1 << 22


def _score_chunk_elements(kv_heads: int) -> int:
    """Pooled scores per chunk of a block-sparse selection in a call of ``kv_heads`` KV heads."""
    return BLOCK_SPARSE_CHUNK_ELEMENTS if kv_heads > 1 else min(BLOCK_SPARSE_CHUNK_ELEMENTS,
                                                                BLOCK_SPARSE_GROUP_CHUNK_ELEMENTS)


def _head_rows(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """``x[:, heads]``: a view when the heads are one run of consecutive heads, else a copy."""
    h0 = heads[0]
    if heads == list(range(h0, h0 + len(heads))):
        return x[:, h0:h0 + len(heads)]
    return x.index_select(1, _device_ints(tuple(heads), x.device))


def _top_k_backend(backend: str, device: torch.device, nk: int) -> str:
    """``"triton"`` or ``"torch"`` for ``block_sparse_select_fast`` (``"auto"``: Triton on CUDA when
    installed and the rows fit the kernel's registers)."""
    check_choice("backend", backend, ("auto", "triton", "torch"))
    try:
        from ..kernels.minference_index import MAX_TOP_K_BLOCKS, _backend
    except ImportError:  # pragma: no cover - platforms without Triton
        if backend == "triton":
            raise RuntimeError("block_sparse_select_fast: backend='triton' needs Triton installed") from None
        return "torch"
    chosen = _backend(backend, device)
    if chosen == "triton" and nk > MAX_TOP_K_BLOCKS:
        if backend == "triton":
            raise ValueError(f"block_sparse_select_fast: backend='triton' takes at most {MAX_TOP_K_BLOCKS} key "
                             f"blocks per row, got {nk}; use a larger block_size or backend='torch'")
        return "torch"
    return chosen


def _block_sparse_triton(q_pool, k_pool, heads, top, Lq, Lk, bs, causal, G, shift, into=None,
                         chunk_elements: int = BLOCK_SPARSE_CHUNK_ELEMENTS) -> BlockIndex | None:
    """``block_sparse_select_fast``'s Triton path: scores a chunk of whole heads at a time (rows of one
    head where a head alone exceeds the chunk), each chunk's rows selected by one kernel launch.
    ``heads`` index ``q_pool``; query head ``h`` reads KV head ``(h + shift) // G`` of ``k_pool``.
    ``into``: ``(range_starts, range_counts, output heads)``, written as ranges (returns None).
    Holds the pools, one chunk of ``chunk_elements`` scores and the chunk's heads of the pools
    (``index_bytes``)."""
    from ..kernels.minference_index import _alloc, block_top_k_

    B, _, nq, D = q_pool.shape
    H, nk, device = len(heads), k_pool.shape[2], q_pool.device
    if into is None:
        width = block_sparse_width(top, nk)
        indices = _alloc(B, H, nq, width, dtype=torch.int32, device=device)  # poisoned under SPARSEATTN_NAN_FILL=1
        counts = _alloc(B, H, nq, dtype=torch.int32, device=device)
        out_heads = _device_ints(tuple(range(H)), device)
    else:
        indices, counts, out_heads = into[0], into[1], _device_ints(tuple(into[2]), device)
    top_t = _device_ints(tuple(top), device)
    rows = nq if B * nq * nk <= chunk_elements else max(1, chunk_elements // (B * nk))
    per = max(1, chunk_elements // (B * nq * nk)) if rows == nq else 1
    buf = torch.empty(B * min(per, H) * rows * nk, dtype=torch.float32, device=device)
    for h0 in range(0, H, per):
        chunk = heads[h0:h0 + per]
        qp = _head_rows(q_pool, chunk)
        kv = [(h + shift) // G for h in chunk]
        if len(set(kv)) == 1:  # heads of one KV head read its pool with a zero batch stride, not a copy
            kp_t = k_pool[:, kv[0]:kv[0] + 1].expand(B, len(chunk), nk, D).transpose(-1, -2)
        else:
            kp_t = _head_rows(k_pool, kv).transpose(-1, -2)  # [B, c, D, nk]
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            scores = buf[:B * len(chunk) * (r1 - r0) * nk].view(B, len(chunk), r1 - r0, nk)
            if B == 1:  # bmm on 3-D views: matmul's 4-D path spent ~70 us of host a call (run 22b); the
                # expanded pool costs ~25 us of host against ~41 with its copy, or ~35 for one mm (run 23d)
                torch.bmm(qp[0, :, r0:r1], kp_t[0], out=scores[0])
            else:
                torch.matmul(qp[:, :, r0:r1], kp_t, out=scores)
            block_top_k_(scores, top_t, indices, counts, head0=h0, row0=r0, q_len=Lq, k_len=Lk, block_size=bs,
                         causal=causal, head_dim=D, out_heads=out_heads, as_ranges=into is not None)
    return None if into is not None else BlockIndex(indices, counts, bs, bs, Lq, Lk)


def block_sparse_width(top: list[int], nk: int) -> int:
    """Index width of block-sparse rows: the largest top-k, block 0 and two diagonal blocks."""
    return min(min(max(max(top), 1), nk) + 3, nk)


def _block_mean_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``reference.block_mean_pool`` without its fp32 copy of ``x``: the block sums accumulate in fp32
    straight from bf16/fp16 (``sum(dtype=)``), the partial last block on its own."""
    B, H, L, D = x.shape
    full = L // block_size
    parts = []
    if full:
        parts.append(x[:, :, :full * block_size].reshape(B, H, full, block_size, D).sum(3, dtype=torch.float32)
                     / block_size)
    if full * block_size < L:
        parts.append(x[:, :, full * block_size:].sum(2, keepdim=True, dtype=torch.float32) / (L - full * block_size))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _block_sparse(q, k, top_k, config: MInferenceConfig, causal: bool, heads=None) -> BlockIndex:
    return block_sparse_select_fast(q, k, top_k=top_k, block_size=config.block_size, causal=causal, heads=heads)


def _as_ranges(index: BlockIndex, width: int) -> torch.Tensor:
    """A BlockIndex's key blocks as range starts (``block * bs``, -1 padded) of ``width`` columns."""
    starts = torch.where(index.indices >= 0, index.indices * index.block_k, torch.full_like(index.indices, -1))
    return torch.nn.functional.pad(starts, (0, width - starts.shape[-1]), value=-1)


@functools.lru_cache(maxsize=32)
def _a_shape_ranges(q_len: int, k_len: int, sink: int, window: int, bs: int, device: torch.device):
    """A-shape's rows as block-aligned ranges, ``[nq, width]`` starts and ``[nq]`` counts, built once per
    shape: the pattern is static, and building it is ~30 small launches that every chunk of every
    call would repeat (a few KiB on the device at 128K)."""
    index = a_shape_select(q_len, k_len, 1, 1, sink=sink, window=window, block_size=bs, device=device)
    return _as_ranges(index, index.indices.shape[-1])[0, 0], index.counts[0, 0]


def _alloc(*shape, dtype, device) -> torch.Tensor:
    """``kernels.minference_index._alloc`` (poisoned under ``SPARSEATTN_NAN_FILL=1``), or ``torch.empty``
    where Triton is not installed."""
    try:
        from ..kernels.minference_index import _alloc as alloc
    except ImportError:  # pragma: no cover - platforms without Triton
        return torch.empty(shape, dtype=dtype, device=device)
    return alloc(*shape, dtype=dtype, device=device)


def _select_backend(device: torch.device) -> str:
    """``SELECT_BACKEND`` resolved for ``device`` (``"triton"`` or ``"torch"``)."""
    from ..kernels.minference_index import _backend

    return _backend(SELECT_BACKEND, device)


# The backend of per-head mixes' block-sparse and vertical-slash heads and of chunked vertical-slash
# calls ("auto": Triton on CUDA; tests set "triton" to run those paths in the interpreter).
SELECT_BACKEND = "auto"


def _select_head_patterns(q, k, config: MInferenceConfig, causal: bool, vs_tables=None):
    """One index for heads of different patterns: a ``VerticalSlashIndex`` whose block-pattern heads have
    block-aligned ranges and no columns (no per-head Python loop: one call per pattern kind).
    ``vs_tables``: ``(VerticalSlashTables, rows)``, the vertical-slash heads' tables, already built
    (``select_chunks``: ``rows`` slices this chunk's heads out of the call's)."""
    B, Hq, Lq, _ = q.shape
    Lk, bs = k.shape[2], config.block_size
    patterns = config.head_patterns
    if len(patterns) != Hq:
        raise ValueError(f"head_patterns has {len(patterns)} entries, but the query has {Hq} heads")
    kinds = {p for p, _, _ in patterns}
    if kinds == {"vertical_and_slash"}:
        if vs_tables is not None:
            from ..kernels.minference_index import fill_vertical_slash_index

            return fill_vertical_slash_index(*vs_tables, backend=_select_backend(q.device))
        return _vertical_and_slash(q, k, [v for _, v, _ in patterns], [s for _, _, s in patterns], config, causal)
    if kinds == {"block_sparse"}:
        return _block_sparse(q, k, [v for _, v, _ in patterns], config, causal)
    if len(set(patterns)) == 1 and kinds == {"a_shape"}:
        _, sink, window = patterns[0]
        return a_shape_select(Lq, Lk, B, Hq, sink=sink, window=window, block_size=bs, device=q.device)

    # One index for every head, each kind writing its heads: the vertical-slash heads' rows by the fill
    # kernel, A-shape's static rows as block-aligned ranges, block-sparse rows into the ranges by its
    # top-k kernel (no index in between); the heads of the block patterns have no columns.
    parts: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
    sparse_heads = [h for h, (p, _, _) in enumerate(patterns) if p == "block_sparse"]
    sparse_top = [patterns[h][1] for h in sparse_heads]
    widths = [block_sparse_width(sparse_top, -(-Lk // bs))] if sparse_heads else []
    shapes = sorted({(v, s) for p, v, s in patterns if p == "a_shape"})
    for sink, window in shapes:  # one static row set per distinct (sink, window), not per head
        heads = [h for h, e in enumerate(patterns) if e == ("a_shape", sink, window)]
        parts.append((heads, *_a_shape_ranges(Lq, Lk, sink, window, bs, q.device)))
    vs_heads = [h for h, (p, _, _) in enumerate(patterns) if p == "vertical_and_slash"]
    nq = -(-Lq // bs)
    vs = None
    width_r, width_c = 0, 1
    if vs_heads:
        # The vertical-slash heads are estimated alone. Causal: their tables, filled straight into
        # the table's index below; non-causal: the reference's index of those heads, copied in.
        v_sizes, s_sizes = [patterns[h][1] for h in vs_heads], [patterns[h][2] for h in vs_heads]
        if vs_tables is None and causal:
            vs_tables = (_vertical_and_slash_tables(q, k, vs_heads, v_sizes, s_sizes, config,
                                                    _select_backend(q.device)), slice(None))
        if vs_tables is not None:
            from ..kernels.minference_index import fill_vertical_slash_index, fill_widths

            width_r, width_c = fill_widths(*vs_tables)
        else:
            vs = _vertical_and_slash_reference(q, k, vs_heads, v_sizes, s_sizes, config, causal)
            width_r, width_c = vs.range_starts.shape[-1], vs.columns.shape[-1]
    width = max([width_r] + [r.shape[-1] for _, r, _ in parts] + widths)
    # Unfilled (poisoned under the tests' SPARSEATTN_NAN_FILL=1): every head's count and its rows up to
    # its kind's width are written below, so only what no writer reaches is filled here: the columns of
    # the heads without any, and the -1 tails of rows narrower than the index. (A -1 memset of the
    # whole index was 0.33 ms of a 128K seed-L-like mix's 3.76 ms of GPU, NOTES.md run 23c.)
    starts, counts, columns, column_counts = (_alloc(*shape, dtype=torch.int32, device=q.device) for shape in (
        (B, Hq, nq, width), (B, Hq, nq), (B, Hq, nq, width_c), (B, Hq, nq)))
    vs_set = set(vs_heads)
    others = [h for h in range(Hq) if h not in vs_set]
    if others:
        idx = _device_ints(tuple(others), q.device)
        columns.index_fill_(1, idx, -1)
        column_counts.index_fill_(1, idx, 0)
    if vs_heads and width_r < width:
        starts.narrow(-1, width_r, width - width_r).index_fill_(1, _device_ints(tuple(vs_heads), q.device), -1)
    if vs_tables is not None:
        fill_vertical_slash_index(*vs_tables, backend=_select_backend(q.device), into=(
            VerticalSlashIndex(starts, counts, columns, column_counts, bs, bs, Lq, Lk), vs_heads))
    elif vs is not None:
        idx = _device_ints(tuple(vs_heads), q.device)
        starts.narrow(-1, 0, width_r).index_copy_(1, idx, vs.range_starts)
        counts.index_copy_(1, idx, vs.range_counts)
        columns.index_copy_(1, idx, vs.columns)
        column_counts.index_copy_(1, idx, vs.column_counts)
        vs = None
    for heads, ranges, n in parts:
        idx = _device_ints(tuple(heads), q.device)
        w = ranges.shape[-1]
        starts.narrow(-1, 0, w).index_copy_(1, idx, ranges.expand(B, len(heads), -1, -1))
        if w < width:
            starts.narrow(-1, w, width - w).index_fill_(1, idx, -1)
        counts.index_copy_(1, idx, n.expand(B, len(heads), -1))
    if sparse_heads:
        _block_sparse_rows(q, k, sparse_top, sparse_heads, bs, causal, SELECT_BACKEND, into=(starts, counts))
    return VerticalSlashIndex(starts, counts, columns, column_counts, bs, bs, Lq, Lk)


def select_blocks(q: torch.Tensor, k: torch.Tensor, config: MInferenceConfig, *,
                  causal: bool = True) -> VerticalSlashIndex | BlockIndex:
    """MInference's index for `q [B, Hq, Lq, D]`, `k [B, Hkv, Lk, D]` under ``config``.

    ``vertical_and_slash`` -> ``VerticalSlashIndex`` (causal: ``minference_select_fast``;
    non-causal: the fp32 reference); ``a_shape`` / ``block_sparse`` -> ``BlockIndex``; per-head
    ``head_patterns`` -> one ``VerticalSlashIndex`` for all heads (block patterns as block-aligned
    ranges), or a ``BlockIndex`` when every head is ``block_sparse`` or the same ``a_shape``.
    """
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    if config.head_patterns:
        return _select_head_patterns(q, k, config, causal)
    if config.pattern == "a_shape":
        return a_shape_select(Lq, Lk, B, Hq, sink=config.sink, window=config.window,
                              block_size=config.block_size, device=q.device)
    if config.pattern == "block_sparse":
        return _block_sparse(q, k, config.top_k, config, causal)
    return _vertical_and_slash(q, k, config.vertical_size, config.slash_size, config, causal)


# ---- searched pattern files ---------------------------------------------------------------------


@dataclass(frozen=True)
class MInferencePatterns:
    """A searched per-(layer, head) pattern table (the module docstring has the file format).

    Attributes:
        model: the model's name.
        layers: ``{layer_idx: ((pattern, v, s), ...)}``, one entry per query head.
        scores: ``{layer_idx: (recall, ...)}``, the calibration recall of each head's pattern.
        aliases: other names the file is found by.
        search: how the table was made (free-form, recorded for provenance).
        source: where it was loaded from.

    Example:
        >>> from sparseattn.methods.minference import load_minference_patterns
        >>> patterns = load_minference_patterns("smollm2")
        >>> len(patterns.head_patterns(0)), sorted(patterns.layer_configs())[:3]
        (9, [0, 1, 2])
    """

    model: str
    layers: dict[int, tuple[tuple[str, int, int], ...]]
    scores: dict[int, tuple[float, ...]] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    search: dict = field(default_factory=dict)
    source: str = ""

    def head_patterns(self, layer_idx: int) -> tuple[tuple[str, int, int], ...]:
        """The per-head patterns of layer ``layer_idx``."""
        if layer_idx not in self.layers:
            raise KeyError(f"the {self.model} patterns ({self.source or 'in memory'}) have no layer {layer_idx}; "
                           f"layers are {sorted(self.layers)}")
        return self.layers[layer_idx]

    def layer_configs(self) -> dict[int, dict[str, Any]]:
        """``{layer_idx: {"head_patterns": ...}}`` for ``patch(model, method="minference", layer_configs=...)``."""
        return {layer: {"head_patterns": heads} for layer, heads in sorted(self.layers.items())}

    def to_json(self) -> dict:
        """The file's JSON object."""
        layers = {}
        for layer, heads in sorted(self.layers.items()):
            scores = self.scores.get(layer, ())
            layers[str(layer)] = {str(h): [p, v, s] + ([round(float(scores[h]), 6)] if h < len(scores) else [])
                                  for h, (p, v, s) in enumerate(heads)}
        num_heads = sorted({len(h) for h in self.layers.values()})
        return {"format": PATTERN_FORMAT, "version": PATTERN_VERSION, "model": self.model,
                "aliases": list(self.aliases), "num_layers": len(self.layers),
                "num_heads": num_heads[0] if len(num_heads) == 1 else num_heads,
                "entry": ["pattern", "v", "s", "recall"], "search": self.search, "layers": layers}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file (parent folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=1)
        # One line per head entry (and per candidate): lists of scalars are collapsed.
        text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + ", ".join(
            x.strip() for x in m.group(1).split(",\n")) + "]", text)
        path.write_text(text + "\n")
        return path

    @classmethod
    def from_json(cls, data: Mapping, source: str = "") -> "MInferencePatterns":
        """Validate a file's JSON object; errors name the file and the offending entry."""
        where = source or "MInference patterns"
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != PATTERN_FORMAT:
            raise ValueError(f"{where}: format must be {PATTERN_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != PATTERN_VERSION:
            raise ValueError(f"{where}: version {data.get('version')!r} is not supported (this sparseattn reads "
                             f"version {PATTERN_VERSION}); upgrade sparseattn or re-run `sparseattn search`")
        model, layers_in = data.get("model"), data.get("layers")
        if not isinstance(model, str) or not model:
            raise ValueError(f"{where}: 'model' must be a non-empty string, got {model!r}")
        if not isinstance(layers_in, Mapping) or not layers_in:
            raise ValueError(f"{where}: 'layers' must be a non-empty object {{layer: {{head: entry}}}}")
        layers, scores = {}, {}
        for layer_key, heads_in in layers_in.items():
            if not str(layer_key).isdigit() or not isinstance(heads_in, Mapping) or not heads_in:
                raise ValueError(f"{where}: layers[{layer_key!r}] must map head indices to entries")
            keys = sorted(heads_in, key=lambda h: int(h) if str(h).isdigit() else -1)
            if [str(h) for h in keys] != [str(i) for i in range(len(keys))]:
                raise ValueError(f"{where}: layer {layer_key} heads must be 0..{len(keys) - 1}, got {sorted(heads_in)}")
            entries = [heads_in[h] for h in keys]
            layers[int(layer_key)] = tuple(_head_pattern(e, f"{where}: layer {layer_key} head {h}")
                                           for h, e in zip(keys, entries))
            scores[int(layer_key)] = tuple(float(e[3]) if len(e) == 4 else float("nan") for e in entries)
        aliases = data.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"{where}: 'aliases' must be a list of strings, got {aliases!r}")
        search = data.get("search", {})
        return cls(model, layers, scores, tuple(aliases), dict(search) if isinstance(search, Mapping) else {}, source)


def model_key(name: str) -> str:
    """A model name, path or file -> a lookup key: base name, lower case, no ``.json``/``.gguf`` or quant tag.

    Example:
        >>> model_key("~/.cache/sparseattn/SmolLM2-135M-Instruct.Q4_1.gguf")
        'smollm2-135m-instruct'
    """
    key = re.split(r"[\\/]", str(name).rstrip("/\\"))[-1].lower()
    key = re.sub(r"\.(json|gguf)$", "", key)
    return re.sub(r"[.-](q\d[\w]*|f16|bf16|f32|fp16|fp32)$", "", key)


def _pattern_files() -> dict[str, Path]:
    """Every shipped pattern file by each of its keys (model, aliases, file name)."""
    found: dict[str, Path] = {}
    for path in sorted(PATTERN_DIR.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        names = [path.stem, str(data.get("model", ""))] + [a for a in data.get("aliases", []) if isinstance(a, str)]
        for name in names:
            if name:
                found.setdefault(model_key(name), path)
    return found


def load_minference_patterns(name_or_path: str | os.PathLike | MInferencePatterns) -> MInferencePatterns:
    """A searched pattern table, by JSON path or by model name (shipped files in ``sparseattn/data/minference/``).

    Names are matched after :func:`model_key` (base name, case, ``.gguf`` and quant tags ignored),
    against each shipped file's ``model``, ``aliases`` and file name: ``"smollm2"``, ``"default"``,
    ``"SmolLM2-135M-Instruct"`` and ``".../SmolLM2-135M-Instruct.Q4_1.gguf"`` all find the
    embedded model's table.

    Raises:
        FileNotFoundError: no such file and no shipped table for that name (the message lists them).
        ValueError: the file is not a valid pattern file (format, version or entries).
    """
    if isinstance(name_or_path, MInferencePatterns):
        return name_or_path
    path = Path(os.path.expanduser(str(name_or_path)))
    if not path.is_file():
        shipped = _pattern_files()
        path = shipped.get(model_key(str(name_or_path)))
        if path is None:
            raise FileNotFoundError(
                f"no MInference pattern file {str(name_or_path)!r}: not a file, and no shipped table for that model "
                f"(shipped: {sorted(shipped) or 'none'}); run `sparseattn search --model ...` to make one")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    return MInferencePatterns.from_json(data, source=str(path))


def minference_layer_configs(name_or_path, model=None) -> dict[int, dict[str, Any]]:
    """``{layer_idx: {"head_patterns": ...}}`` of a pattern file, for the integration's ``layer_configs``.

    With ``model`` (a Hugging Face model or its config), the table's layers and heads are checked
    against ``num_hidden_layers`` and ``num_attention_heads``.

    Example:
        >>> configs = minference_layer_configs("smollm2")
        >>> configs[0]["head_patterns"][0][0] in PATTERNS
        True
    """
    table = load_minference_patterns(name_or_path)
    if model is not None:
        config = getattr(model, "config", model)
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        bad = sorted(i for i in table.layers if not 0 <= i < layers)
        wrong = sorted(i for i, h in table.layers.items() if len(h) != heads)
        if bad or wrong:
            raise ValueError(f"the {table.model} patterns ({table.source or 'in memory'}) do not fit this model "
                             f"({layers} layers, {heads} query heads): layers out of range {bad}, layers with another "
                             f"head count {wrong}")
    return table.layer_configs()


# ---- the seed's function --------------------------------------------------------------------------


def Minference_prefill(query_states, key_states, value_states, vertical_size=1000, slash_size=6096,
                       adaptive_budget=None, *, pattern="vertical_and_slash", last_q=64, causal=True,
                       scale=None, return_stats=False, head_patterns=None, patterns=None, layer_idx=None):
    """MInference sparse prefill (the seed's API).

    Args:
        query_states: `[B, Hq, Lq, D]`.
        key_states, value_states: `[B, Hkv, Lk, D]` with `Hq % Hkv == 0`.
        vertical_size: key columns kept per head (default 1000).
        slash_size: diagonals kept per head (default 6096).
        adaptive_budget: fraction of the key length as total budget (20% vertical / 80% slash);
            overrides the sizes when set (default None).
        pattern: ``"vertical_and_slash"``, ``"a_shape"`` or ``"block_sparse"``.
        last_q: queries of the online estimate (default 64).
        causal: causal attention (queries are the last `Lq` positions).
        scale: softmax scale, default `1/sqrt(D)`.
        return_stats: also return :class:`sparseattn.AttentionStats`.
        head_patterns: per query head ``[pattern, v, s]`` (replaces ``pattern`` and the sizes).
        patterns: a searched pattern table (model name, JSON path or :class:`MInferencePatterns`);
            with ``layer_idx``, that layer's ``head_patterns`` are used.
        layer_idx: the layer these states belong to (needed with ``patterns``).

    Returns:
        `[B, Hq, Lq, D]` in the query's dtype (and the stats).

    Example:
        >>> import torch
        >>> from sparseattn import Minference_prefill
        >>> q = k = v = torch.randn(1, 4, 512, 64)
        >>> Minference_prefill(q, k, v, vertical_size=64, slash_size=128).shape
        torch.Size([1, 4, 512, 64])
    """
    from ..api import sparse_attention

    check_qkv(query_states, key_states, value_states, causal=causal)  # errors name the seed's arguments
    if patterns is not None:
        if head_patterns is not None:
            raise ValueError("pass either patterns (with layer_idx) or head_patterns, not both")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise ValueError(f"patterns needs layer_idx (an int), got {layer_idx!r}")
        head_patterns = load_minference_patterns(patterns).head_patterns(layer_idx)
    head_patterns = () if head_patterns is None else tuple(head_patterns)
    return sparse_attention(query_states, key_states, value_states, method="minference", causal=causal,
                            scale=scale, return_stats=return_stats, vertical_size=vertical_size,
                            slash_size=slash_size, adaptive_budget=adaptive_budget, pattern=pattern,
                            last_q=last_q, head_patterns=head_patterns)


def index_bytes(config: MInferenceConfig, batch: int, q_heads: int, q_len: int, k_len: int, *,
                head_dim: int = 128, kv_heads: int | None = None) -> int:
    """Bytes ``select_blocks`` holds: the index, from the widths its builders allocate; with
    vertical-slash heads, the estimation's fp32 score rows of those heads (vertical and slash scores
    and their working copies, ``[B, H, Lk]`` each; a mix's vertical-slash rows are written straight
    into its index); with block-sparse heads, ``block_sparse_select_fast``'s fp32 pooled q and k
    (``head_dim`` wide; ``kv_heads`` defaults to ``q_heads``), one chunk of scores and the chunk's
    heads of the pools. That is its Triton path (CUDA, causal). The torch path, which CPU tensors
    and rows over ``MAX_TOP_K_BLOCKS`` blocks take, also holds per-query-head pools and the top-k
    candidates of a chunk: counted when the rows are that long. Not counted: the torch index builder
    (CPU) and a mix's non-causal vertical-slash heads (the reference's selection), which build their
    own index before it is copied in."""
    kv_heads = q_heads if kv_heads is None else kv_heads
    # The module's knobs are arguments of the cached arithmetic, so a changed knob is a new entry.
    return _index_bytes(config, batch, q_heads, q_len, k_len, head_dim, kv_heads, _score_chunk_elements(kv_heads),
                        _max_top_k_blocks())


@functools.lru_cache(maxsize=1024)
def _index_bytes(config: MInferenceConfig, batch: int, q_heads: int, q_len: int, k_len: int, head_dim: int,
                 kv_heads: int, chunk_elements: int, max_top_k_blocks: int) -> int:
    """``index_bytes``' arithmetic, cached: a call plans its chunks from ~10-20 of these, each a
    Python loop over a table's heads (NOTES run 23b: ~1 ms of host a call before the cache)."""
    bs = config.block_size
    nq, nk = cdiv(q_len, bs), cdiv(k_len, bs)
    patterns = config.head_patterns
    if not patterns:
        if config.pattern == "a_shape":
            patterns = (("a_shape", config.sink, config.window),)
        elif config.pattern == "block_sparse":
            patterns = (("block_sparse", config.top_k, 0),)
        elif config.adaptive_budget is not None:
            patterns = (("vertical_and_slash", *adaptive_sizes(config.adaptive_budget, k_len)),)
        else:
            patterns = (("vertical_and_slash", config.vertical_size, config.slash_size),)
        patterns = patterns * q_heads
    width_r = width_c = width_vs = 1
    estimation = scratch = 0
    sparse = sum(p == "block_sparse" for p, _, _ in patterns)
    vs_heads = sum(p == "vertical_and_slash" for p, _, _ in patterns)
    for pattern, a, b in set(patterns):
        if pattern == "vertical_and_slash":
            nv, ns = selection_sizes(a, b, k_len, k_len)
            width_vs, width_c = max(width_vs, min(2 * ns, nk)), max(width_c, nv)
            width_r = max(width_r, width_vs)
            estimation = 16 * batch * vs_heads * k_len
        elif pattern == "a_shape":
            width_r = max(width_r, min(nk, cdiv(a, bs) + cdiv(b, bs) + 2))
        else:
            width_r = max(width_r, min(nk, a + 3))
            if nk <= max_top_k_blocks:
                # Triton path: the pools, a chunk of scores (whole heads, or rows of one) and its heads' pools.
                heads = min(sparse, max(1, chunk_elements // (batch * nq * nk)))
                chunk = min(chunk_elements, batch * sparse * nq * nk)
                scratch = 4 * (batch * head_dim * (q_heads * nq + kv_heads * nk + heads * (nq + nk)) + chunk)
            else:
                # torch path: per-query-head pools, one chunk of scores and, per chunk row, its top-k
                # values / indices, candidates, sort and prefix sums (~40 bytes per candidate).
                rows = min(batch * q_heads * nq, max(1, chunk_elements // nk))
                pools = 4 * batch * head_dim * (2 * q_heads * nq + q_heads * nk)
                scratch = max(scratch, pools + 4 * rows * nk + 40 * rows * min(nk, a + 3))
    return 4 * batch * q_heads * nq * (width_r + width_c + 2) + estimation + scratch


def _max_top_k_blocks() -> int:
    try:
        from ..kernels.minference_index import MAX_TOP_K_BLOCKS
    except ImportError:  # pragma: no cover - platforms without Triton
        return 0
    return MAX_TOP_K_BLOCKS


def head_slice(config: MInferenceConfig, start: int, stop: int, group: int) -> MInferenceConfig:
    """The config of query heads ``[start, stop)``: per-head ``head_patterns`` are sliced."""
    if config.head_patterns:
        return _head_slice(config, start, stop)
    return config


@functools.lru_cache(maxsize=1024)
def _head_slice(config: MInferenceConfig, start: int, stop: int) -> MInferenceConfig:
    """A slice of an already validated table, not validated again: ``dataclasses.replace`` re-ran
    ``__post_init__`` over every head, ~0.1 ms a slice, ~10 slices a chunked call (NOTES run 23b)."""
    sliced = copy.copy(config)
    object.__setattr__(sliced, "head_patterns", config.head_patterns[start:stop])
    return sliced


def select_chunks(q: torch.Tensor, k: torch.Tensor, config: MInferenceConfig, bounds, *, causal: bool = True):
    """``(g0, g1, index)`` per chunk of KV heads of a memory-bounded call (``sparse_attention``).

    A vertical-and-slash config (every head vertical-and-slash, causal) estimates, takes the top-k and
    builds the cluster tables of all heads once (``minference_tables_fast``: small next to the
    index), then writes each chunk's index in one launch; a selection's ~240 small launches are paid
    once per call instead of once per chunk. A per-head mix does the same for its vertical-slash
    heads and selects its block-pattern heads chunk by chunk. Non-causal calls select chunk by chunk.
    Each chunk's index is as wide as its own heads need (as if selected alone: ``index_bytes`` of its
    config); the call also holds its vertical-slash heads' tables, chiefly a ``[B, H, Lk]`` int32
    cluster map (0.5 MiB a head at 128K)."""
    G = q.shape[1] // k.shape[1]
    patterns = config.head_patterns
    if causal and (all(p == "vertical_and_slash" for p, _, _ in patterns) if patterns
                   else config.pattern == "vertical_and_slash"):
        from ..kernels.minference_index import fill_vertical_slash_index, minference_tables_fast

        backend = _select_backend(q.device)
        sizes = ([v for _, v, _ in patterns], [s for _, _, s in patterns]) if patterns else (
            config.vertical_size, config.slash_size)
        tables = minference_tables_fast(q, k, vertical_size=sizes[0], slash_size=sizes[1],
                                        adaptive_budget=None if patterns else config.adaptive_budget,
                                        last_q=config.last_q, block_size=config.block_size, backend=backend)
        for g0, g1 in bounds:
            yield g0, g1, fill_vertical_slash_index(tables, slice(g0 * G, g1 * G), backend=backend)
        return
    vs_heads = [h for h, (p, _, _) in enumerate(patterns) if p == "vertical_and_slash"]
    if causal and vs_heads:
        # A mix: its vertical-slash heads' tables once, each chunk's rows of them filled per chunk.
        tables = _vertical_and_slash_tables(q, k, vs_heads, [patterns[h][1] for h in vs_heads],
                                            [patterns[h][2] for h in vs_heads], config, _select_backend(q.device))
        for g0, g1 in bounds:
            h0, h1 = g0 * G, g1 * G
            rows = [i for i, h in enumerate(vs_heads) if h0 <= h < h1]  # consecutive
            index = _select_head_patterns(q[:, h0:h1], k[:, g0:g1], head_slice(config, h0, h1, G), causal,
                                          vs_tables=(tables, slice(rows[0], rows[-1] + 1)) if rows else None)
            yield g0, g1, index
            index = None  # released by the caller: not held through the next chunk's selection
        return
    for g0, g1 in bounds:
        yield g0, g1, select_blocks(q[:, g0 * G:g1 * G], k[:, g0:g1], head_slice(config, g0 * G, g1 * G, G),
                                    causal=causal)


register_method("minference", select_blocks, MInferenceConfig, index_bytes=index_bytes, head_slice=head_slice,
                select_chunks=select_chunks,
                description="vertical-slash / A-shape / block-sparse head patterns (Jiang et al. 2024)")
