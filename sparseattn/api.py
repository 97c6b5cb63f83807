"""The unified entry point: ``sparse_attention(q, k, v, method=..., config=..., **overrides)``.

Flow: validate -> resolve the method's config -> select (or take the caller's index) -> attend.
Attention over a ``BlockIndex`` runs on the shared Triton kernel on a GPU and on the fp32
reference on a CPU (the Triton interpreter is for tests, far too slow for real inputs).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import build_config, load_config
from .index import BlockIndex, VerticalSlashIndex
from .methods import get_method
from .methods.full import dense_attention
from .reference.attention import reference_vertical_slash_attention
from .validation import check_choice, check_qkv, check_scale

logger = logging.getLogger("sparseattn")

_BACKENDS = {"auto", "triton", "reference"}
_warned_cpu = False


@dataclass(frozen=True)
class AttentionStats:
    """What a sparse call computed.

    Attributes:
        density: `[B, Hq]` fraction of the allowed (causal) blocks computed, per head; for
            MInference's vertical-slash index, the fraction of allowed (query, key) pairs.
        index: the ``BlockIndex`` / ``VerticalSlashIndex`` used, or None for dense attention.
        method: the method's name.
    """

    density: torch.Tensor
    index: BlockIndex | VerticalSlashIndex | None
    method: str


def _backend() -> str:
    return check_choice("SPARSEATTN_BACKEND", os.environ.get("SPARSEATTN_BACKEND", "auto"), _BACKENDS)


def _use_triton(q: torch.Tensor) -> bool:
    global _warned_cpu
    backend = _backend()
    if backend == "reference":
        return False
    if backend == "triton":
        return True
    if q.is_cuda:
        from .kernels import kernels_available

        return kernels_available()
    if not _warned_cpu:
        logger.warning("sparseattn: no CUDA tensors; using the fp32 reference path (exact but slow)")
        _warned_cpu = True
    return False


def resolve_config(method: str, config: Any = None, **overrides):
    """The method's config from ``config`` (None, a config instance, a dict or a JSON path) and overrides."""
    spec = get_method(method)
    if spec.config_cls is None:
        if overrides:
            raise ValueError(f"method {method!r} takes no options, got {sorted(overrides)}")
        return None
    if config is None:
        return build_config(spec.config_cls, {}, **overrides)
    if isinstance(config, (str, os.PathLike)):
        config = load_config(Path(config))[method]
    if isinstance(config, spec.config_cls):
        if not overrides:
            return config
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return build_config(spec.config_cls, fields, **overrides)
    if isinstance(config, Mapping):
        return build_config(spec.config_cls, config, **overrides)
    raise TypeError(
        f"config for method {method!r} must be None, a {spec.config_cls.__name__}, a dict or a JSON path; "
        f"got {type(config).__name__}"
    )


def _check_index(index, B, Hq, Lq, Lk):
    if not isinstance(index, (BlockIndex, VerticalSlashIndex)):
        raise TypeError(f"block_index must be a BlockIndex or VerticalSlashIndex, got {type(index).__name__}")
    heads = index.indices.shape[:2] if isinstance(index, BlockIndex) else index.range_starts.shape[:2]
    if tuple(heads) != (B, Hq) or (index.q_len, index.k_len) != (Lq, Lk):
        raise ValueError(
            f"block_index is for (batch, heads, q_len, k_len) = {(*tuple(heads), index.q_len, index.k_len)}, "
            f"but the inputs are {(B, Hq, Lq, Lk)}"
        )


def attend(q, k, v, index, *, causal: bool = True, scale: float | None = None, out: torch.Tensor | None = None):
    """Attention of validated inputs over ``index`` (None = dense).

    ``out``: a buffer of q's shape and dtype (e.g. a head slice of a larger output) that receives
    the result; the kernels write into it directly (forward only, no autograd), other paths copy.
    """
    if out is not None:
        if isinstance(index, VerticalSlashIndex) and causal and _use_triton(q):
            from .kernels.vertical_slash import vertical_slash_forward

            return vertical_slash_forward(q, k, v, index, scale=scale, out=out)[0]
        if (index is None or isinstance(index, BlockIndex)) and _use_triton(q):
            # Dense too (a chunk of all-full heads): SDPA has no output argument, and its result
            # copied would hold a second output of the chunk's size.
            from .kernels.block_sparse import block_sparse_forward

            return block_sparse_forward(q, k, v, index, causal=causal, scale=scale, out=out)[0]
        return out.copy_(attend(q, k, v, index, causal=causal, scale=scale))
    if index is None:
        return dense_attention(q, k, v, causal=causal, scale=scale)
    if isinstance(index, VerticalSlashIndex):
        # The vertical-slash kernel is causal-only; a non-causal call takes the exact reference.
        if causal and _use_triton(q):
            from .kernels.vertical_slash import vertical_slash_attention

            return vertical_slash_attention(q, k, v, index, scale=scale)
        if not causal and q.is_cuda:
            logger.warning("sparseattn: the vertical-slash kernel is causal-only; non-causal MInference runs the "
                           "exact fp32 reference (slow, O(Lq x Lk) memory)")
        return reference_vertical_slash_attention(q, k, v, index, causal=causal, scale=scale)
    if _use_triton(q):
        from .kernels.block_sparse import block_sparse_attention

        return block_sparse_attention(q, k, v, index, causal=causal, scale=scale)
    return _masked_sdpa(q, k, v, index, causal=causal, scale=scale)


# BENCHMARKS.md bounds what a call holds beyond its output to 10% of the q + k + v bytes. The index
# is the largest such buffer ([B, Hq, nq, width] int32, O((L / block)^2) per head: 768 MiB for
# MInference's default sizes at 128K with 32 heads, against 154 MiB of budget). When a method's
# ``index_bytes`` bound exceeds the budget, ``sparse_attention`` selects and attends a few whole GQA
# groups at a time, writing each group's rows into one output; per-head selections are independent,
# so the result is the same.
INDEX_BUDGET = 0.10
# ... but never below this many bytes: at short prompts the bound is a few MiB, where chunks would
# only multiply launches (MInference at 8K on SmolLM2 went from 0.13 to 0.59 s of prefill when each
# layer ran as three chunks; NOTES.md, run 19j).
INDEX_BUDGET_FLOOR = 64 << 20


def _index_budget(q, k, v) -> float:
    return max(INDEX_BUDGET * sum(t.numel() * t.element_size() for t in (q, k, v)), INDEX_BUDGET_FLOOR)


def _call_bytes(spec, cfg, q, k, g0: int, g1: int) -> int:
    """What selecting and attending KV heads ``[g0, g1)`` holds: ``index_bytes`` of their config
    (``head_slice``) plus the kernels' fp32 log-sum-exp."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if (g0, g1) != (0, Hkv) and spec.head_slice is not None:
        cfg = spec.head_slice(cfg, g0 * G, g1 * G, G)
    extra = {name: value for name, value in (("head_dim", D), ("kv_heads", g1 - g0))
             if _takes_keyword(spec.index_bytes, name)}
    return spec.index_bytes(cfg, B, (g1 - g0) * G, Lq, Lk, **extra) + 4 * B * (g1 - g0) * G * Lq


def kv_heads_per_chunk(spec, cfg, q, k, v) -> int:
    """KV heads to select and attend together so that the index, the selection's per-head buffers and the
    attention's log-sum-exp stay within ``INDEX_BUDGET`` of the q + k + v bytes (or
    ``INDEX_BUDGET_FLOOR`` bytes, whichever is larger)."""
    Hkv = k.shape[1]
    if spec.index_bytes is None or Hkv == 1:
        return Hkv
    total = _call_bytes(spec, cfg, q, k, 0, Hkv)
    budget = _index_budget(q, k, v)
    if total <= budget:
        return Hkv
    return max(1, min(Hkv, int(budget // (total / Hkv))))


def packed_chunk_bounds(spec, cfg, q, k, v) -> list[tuple[int, int]]:
    """Chunks of consecutive KV heads, each as long as its own bytes (``index_bytes`` of its heads'
    config) fit the budget: where heads differ (a per-head table whose few vertical-slash heads make a
    wide index), the narrow heads go together and the wide ones alone, not every chunk sized for the
    widest. A KV head over the budget on its own is a chunk of one."""
    Hkv = k.shape[1]
    budget = _index_budget(q, k, v)
    bounds, g0 = [], 0
    while g0 < Hkv:
        g1 = g0 + 1
        while g1 < Hkv and _call_bytes(spec, cfg, q, k, g0, g1 + 1) <= budget:
            g1 += 1
        bounds.append((g0, g1))
        g0 = g1
    return bounds


@functools.lru_cache(maxsize=64)
def _takes_keyword(fn, name: str) -> bool:
    """Whether ``fn`` accepts the keyword ``name`` (hooks written before it existed do not)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# False: uniform chunks of ``kv_heads_per_chunk`` KV heads even where a method's heads differ (an A/B
# switch for benchmarks/profile_minference_call.py).
PACK_CHUNKS = True


def _chunk_bounds(spec, cfg, q, k, v, per_chunk: int) -> list[tuple[int, int]]:
    Hkv = k.shape[1]
    if spec.chunk_bounds is not None:
        return spec.chunk_bounds(cfg, Hkv, per_chunk)
    if spec.head_slice is not None and PACK_CHUNKS:  # heads may differ: chunks packed by their own bytes
        return packed_chunk_bounds(spec, cfg, q, k, v)
    return [(g0, min(Hkv, g0 + per_chunk)) for g0 in range(0, Hkv, per_chunk)]


def _chunk_selections(q, k, spec, cfg, bounds, causal: bool):
    """``(g0, g1, index)`` per chunk of KV heads ``[g0, g1)``: the selection of its query heads."""
    if spec.select_chunks is not None:
        yield from spec.select_chunks(q, k, cfg, bounds, causal=causal)
        return
    G = q.shape[1] // k.shape[1]
    for g0, g1 in bounds:
        h0, h1 = g0 * G, g1 * G
        cfg_c = spec.head_slice(cfg, h0, h1, G) if spec.head_slice is not None else cfg
        yield g0, g1, spec.select(q[:, h0:h1], k[:, g0:g1], cfg_c, causal=causal)


def selection_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str = "xattention", config=None, *,
                     causal: bool = True, **overrides):
    """The selections ``sparse_attention`` makes for these inputs, without attending: one
    ``(kv_head_start, kv_head_stop, index)`` per chunk of KV heads (one chunk of all heads when the
    call is not memory-bounded). Used to time a call's estimation and index building as it runs them.

    Example:
        >>> q, k = torch.randn(1, 4, 256, 32), torch.randn(1, 2, 256, 32)
        >>> [(g0, g1, type(index).__name__) for g0, g1, index in selection_chunks(q, k, k, "streaming")]
        [(0, 2, 'BlockIndex')]
    """
    check_qkv(q, k, v, causal=causal, names=("q", "k", "v"))
    spec = get_method(method)
    cfg = resolve_config(method, config, **overrides)
    Hkv = k.shape[1]
    per_chunk = kv_heads_per_chunk(spec, cfg, q, k, v)
    bounds = _chunk_bounds(spec, cfg, q, k, v, per_chunk) if per_chunk < Hkv else [(0, Hkv)]
    yield from _chunk_selections(q, k, spec, cfg, bounds, causal)


def _head_chunks(q, k, v, spec, cfg, per_chunk: int, causal: bool, scale, return_stats: bool):
    """Select and attend ``per_chunk`` KV heads (and their query heads) at a time into one output."""
    Hq, Hkv = q.shape[1], k.shape[1]
    G = Hq // Hkv
    # NaN-filled under the tests' SPARSEATTN_NAN_FILL=1 (kernels.block_sparse.NAN_FILL_ENV), so a
    # head no chunk writes fails the comparison.
    poison = os.environ.get("SPARSEATTN_NAN_FILL") == "1"
    out = torch.full_like(q, float("nan")) if poison else torch.empty_like(q)
    densities = []
    for g0, g1, index in _chunk_selections(q, k, spec, cfg, _chunk_bounds(spec, cfg, q, k, v, per_chunk), causal):
        h0, h1 = g0 * G, g1 * G
        qc, kc, vc = q[:, h0:h1], k[:, g0:g1], v[:, g0:g1]
        attend(qc, kc, vc, index, causal=causal, scale=scale, out=out[:, h0:h1])
        if return_stats:
            densities.append(_stats(index, spec.name, q.shape[0], h1 - h0, causal, q.device).density)
        index = None  # freed before the next chunk's selection
    if return_stats:
        return out, AttentionStats(density=torch.cat(densities, 1), index=None, method=spec.name)
    return out


_MASK_CHUNK_ELEMENTS = 1 << 26


def _masked_sdpa(q, k, v, index: BlockIndex, *, causal: bool, scale: float | None):
    """CPU path: SDPA over the index's element mask, built one query chunk at a time.

    Exact (same softmax over the same pairs as the kernel; tested against the fp32 reference) and
    several times faster on a CPU than the reference's explicit matmuls.
    """
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    blocks = index.to_mask()  # [B, Hq, nq, nk]
    col_block = torch.arange(Lk, device=q.device) // index.block_k
    kpos = torch.arange(Lk, device=q.device)
    step = max(index.block_q, _MASK_CHUNK_ELEMENTS // max(1, B * Hq * Lk) // index.block_q * index.block_q)
    out = torch.empty_like(q)
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        rows = torch.arange(r0, r1, device=q.device)
        mask = blocks[:, :, rows // index.block_q][..., col_block]  # [B, Hq, rows, Lk]
        if causal:
            mask = mask & (kpos[None, :] <= rows[:, None] + (Lk - Lq))
        out[:, :, r0:r1] = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, r0:r1], k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != k.shape[1])
    return out


def _stats(index, method, B, Hq, causal, device):
    if index is None:
        density = torch.ones(B, Hq, device=device)
    else:
        density = index.density(causal)
    return AttentionStats(density=density, index=index, method=method)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str = "xattention",
                     config: Any = None, *, causal: bool = True, scale: float | None = None,
                     block_index: BlockIndex | VerticalSlashIndex | None = None, return_stats: bool = False,
                     cu_seqlens: torch.Tensor | None = None, **overrides):
    """Sparse attention with any registered method.

    Args:
        q: `[B, Hq, Lq, D]`; the queries are the last `Lq` of the `Lk` positions.
        k, v: `[B, Hkv, Lk, D]`, `Hq % Hkv == 0`.
        method: a name in ``sparseattn.METHODS`` (``"xattention"``, ``"flexprefill"``,
            ``"minference"``, ``"streaming"``, ``"full"``, or one you registered).
        config: the method's config dataclass, a dict of its fields, or a JSON config path.
        causal: causal attention (default True).
        scale: softmax scale, default `1/sqrt(D)`.
        block_index: a precomputed index; skips selection.
        return_stats: also return :class:`AttentionStats` (per-head density and the index; the
            index is None when the heads were processed in chunks, see ``INDEX_BUDGET``).
        cu_seqlens: `[N + 1]` int32 cumulative lengths for packed sequences in `q [1, Hq, total, D]`
            (`Lq == Lk` per sequence); each sequence is selected and attended on its own.
        **overrides: fields of the method's config, e.g. ``threshold=0.9``.

    Returns:
        `[B, Hq, Lq, D]` in q's dtype, and the stats when ``return_stats``.

    Example:
        >>> import torch
        >>> from sparseattn import sparse_attention
        >>> q, k, v = torch.randn(1, 8, 700, 64), torch.randn(1, 2, 700, 64), torch.randn(1, 2, 700, 64)
        >>> out, stats = sparse_attention(q, k, v, method="xattention", threshold=0.9, stride=8,
        ...                               block_size=64, return_stats=True)
        >>> out.shape, stats.density.shape
        (torch.Size([1, 8, 700, 64]), torch.Size([1, 8]))
    """
    B, Hq, Hkv, Lq, Lk, D = check_qkv(q, k, v, causal=causal, names=("q", "k", "v"))
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_scale(scale)
    if cu_seqlens is not None:
        return _varlen(q, k, v, method, config, causal, scale, return_stats, cu_seqlens, block_index, overrides)
    spec = get_method(method)
    cfg = resolve_config(method, config, **overrides)
    if block_index is None:
        per_chunk = kv_heads_per_chunk(spec, cfg, q, k, v)
        if per_chunk < Hkv and not _needs_grad(q, k, v):
            return _head_chunks(q, k, v, spec, cfg, per_chunk, causal, scale, return_stats)
        block_index = spec.select(q, k, cfg, causal=causal)
    else:
        _check_index(block_index, B, Hq, Lq, Lk)
    out = attend(q, k, v, block_index, causal=causal, scale=scale)
    if return_stats:
        return out, _stats(block_index, method, B, Hq, causal, q.device)
    return out


def _varlen(q, k, v, method, config, causal, scale, return_stats, cu_seqlens, block_index, overrides):
    """Packed sequences: select and attend each one alone (reads the lengths back once)."""
    if block_index is not None:
        raise ValueError("block_index cannot be combined with cu_seqlens; pass one index per sequence instead")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q must be packed as [1, heads, total, head_dim], got batch {q.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"with cu_seqlens, q and k must have the same total length, got {q.shape[2]} and {k.shape[2]}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [num_seqs + 1] of cumulative lengths starting at 0")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[2] or any(b >= a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(
            f"cu_seqlens must start at 0, increase strictly and end at the total length {q.shape[2]}; got {bounds}"
        )
    outs, densities = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        res = sparse_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], method, config,
                               causal=causal, scale=scale, return_stats=True, **overrides)
        outs.append(res[0])
        densities.append(res[1].density)
    out = torch.cat(outs, dim=2)
    if return_stats:
        return out, AttentionStats(density=torch.cat(densities, 0), index=None, method=method)
    return out
