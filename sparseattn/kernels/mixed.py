"""Fused mixed attention for PruLong training: dense causal and sink + window attention of packed
rows, both from one ``Q K^T`` per tile, forward and backward.

For query head ``h`` of KV head ``h // G`` and gate share ``s = gate[h // G]``:
``out = s * full + (1 - s) * local``, where ``full`` is causal attention within each document and
``local`` is block-granular streaming attention: query block ``i`` (``block_size`` rows) reads key
block ``j`` when ``j <= i`` and (``j < sink_blocks`` or ``j >= i - window_blocks``), with the causal
element mask; exactly the blocks of ``streaming_select`` for one document (see
:func:`streaming_blocks`). The set is arithmetic, so no index tensor is read.

Levels: ``@triton.jit`` kernels -> host launchers (:func:`mixed_forward`, :func:`mixed_backward`);
the autograd node and the public function are ``sparseattn.training.attention``'s
``_MixedAttention`` and ``mixed_attention``.

Forward (one launch): a program owns ``BLOCK_M`` rows of one query head of one document and walks
its causal key tiles with two online-softmax states; the tiles of the streaming set update both
from the same scores. The key loop is split into ranges so that only the tiles that straddle the
sink end, a window start or the causal diagonal build element masks, and the tiles between the sink
and the window touch the dense state only.

Backward (two launches). dQ: per query tile, first ``delta = rowsum(dO * full)`` and
``rowsum(dO * local)`` of its rows (stored for dK/dV) and the tile's share of ``dL/dgate``, then
``dS = s P_f (dP - delta_f) + (1 - s) P_l (dP - delta_l)`` over the same key ranges as the forward,
with ``dP = dO V^T`` computed once and the shares folded into the log-sum-exps. dK/dV: one program
per (key tile, KV head) loops over the ``G`` query heads and the query tiles that read the tile
(written once, no atomics: deterministic); ``dV += (s P_f + (1 - s) P_l)^T dO``. The programs of
key tile 0 of document 0 also reduce the ``dL/dgate`` partials in a fixed order.

Launch cost. The training step is bound by the host's launch cost, which grows with the argument
count, so the kernels take no strides: every tensor is ``[1, H, total, D]`` either head-major
(contiguous) or sequence-major (a ``[1, total, H, D]`` buffer transposed, what transformers'
projections give), chosen by one constexpr. Other layouts are copied into the head-major one.
Varlen only (``cu_seqlens``); no host synchronization.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .block_sparse import (
    _LN2,
    _LOG2E,
    LOG2E,
    KernelConfig,
    _dot,
    _dot_precision,
    _padded_head_dim,
    _query_grid,
    _query_program,
    _softmax_update,
    alloc_output,
)

__all__ = ["MixedConfigs", "default_mixed_configs", "mixed_backward", "mixed_forward", "streaming_blocks"]

_DGATE_BLOCK = 256  # partials summed per step by the dL/dgate reduction


# ==================================================================================================
# Triton kernels
# ==================================================================================================


@triton.jit
def _fwd_tile(acc_f, l_f, m_f, acc_l, l_l, m_l, q, k_base, v_base, start_n, tile_offs, offs_n, d_ok, rows,
              stream_lo, doc_len, qk_scale, stride_m,
              BOTH: tl.constexpr, MASK: tl.constexpr, SINK_END: tl.constexpr, PAD_D: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """One key tile: the dense state always, the streaming state too when ``BOTH``.

    ``MASK``: the tile straddles the causal diagonal, the end of the document, the sink end or a
    window start; otherwise every score of the tile is kept (by both states when ``BOTH``). No
    guard against fully masked rows is needed: tile 0 comes first and key 0 is in both sets.
    """
    k_pos = start_n + offs_n  # [BLOCK_N] document positions
    start = tl.cast(start_n, tl.int64) * stride_m
    if MASK:
        kv_ok = (k_pos < doc_len)[:, None] & d_ok[None, :]
        k = tl.load(k_base + start + tile_offs, mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
    elif PAD_D:
        k = tl.load(k_base + start + tile_offs, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_base + start + tile_offs)
    qk = _dot(q, tl.trans(k), DOT_PREC)  # [BLOCK_M, BLOCK_N], unscaled
    if MASK:
        # Masks in tile-relative form: per-row vectors against offs_n, nothing loop-invariant of
        # tile size for the compiler to hoist (and keep in registers) out of the key loop.
        causal = offs_n[None, :] <= (rows - start_n)[:, None]  # implies k_pos < doc_len for stored rows
        qk_f = tl.where(causal, qk, float("-inf"))
        v = tl.load(v_base + start + tile_offs, mask=kv_ok, other=0.0)
    else:
        qk_f = qk
        if PAD_D:
            v = tl.load(v_base + start + tile_offs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_base + start + tile_offs)
    acc_f, l_f, m_f = _softmax_update(acc_f, l_f, m_f, qk_f, v, qk_scale, False, DOT_PREC)
    if BOTH:
        if MASK:
            stream = causal & ((k_pos < SINK_END)[None, :] | (offs_n[None, :] >= (stream_lo - start_n)[:, None]))
            qk_l = tl.where(stream, qk, float("-inf"))
        else:
            qk_l = qk
        acc_l, l_l, m_l = _softmax_update(acc_l, l_l, m_l, qk_l, v, qk_scale, False, DOT_PREC)
    return acc_f, l_f, m_f, acc_l, l_l, m_l


@triton.jit
def _key_ranges(start_m, doc_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEL_BLOCK: tl.constexpr,
                SINK_BLOCKS: tl.constexpr, WINDOW_BLOCKS: tl.constexpr):
    """Key-tile ranges of a query tile: ``[0, e1)`` sink (both states, masked), ``[e1, e2)`` dense
    only (unmasked), ``[e2, e3)`` window starts (both, masked), ``[e3, e4)`` window (both,
    unmasked), ``[e4, n_end)`` diagonal (both, masked)."""
    SINK_TILES: tl.constexpr = (SINK_BLOCKS * SEL_BLOCK + BLOCK_N - 1) // BLOCK_N
    q_last = tl.minimum(start_m + BLOCK_M, doc_len) - 1
    n_end = q_last // BLOCK_N + 1
    n_full = (start_m + 1) // BLOCK_N  # tiles whose keys all precede the tile's first row
    # Window starts (key positions) of the tile's first and last rows; every row's lies between.
    lo_first = tl.maximum((start_m // SEL_BLOCK - WINDOW_BLOCKS) * SEL_BLOCK, 0)
    lo_last = tl.maximum((q_last // SEL_BLOCK - WINDOW_BLOCKS) * SEL_BLOCK, 0)
    e1 = tl.minimum(n_end, SINK_TILES)
    e2 = tl.maximum(e1, tl.minimum(lo_first // BLOCK_N, n_end))
    e3 = tl.maximum(e2, tl.minimum(tl.cdiv(lo_last, BLOCK_N), n_end))
    e4 = tl.maximum(e3, tl.minimum(n_full, n_end))
    return e1, e2, e3, e4, n_end


@triton.jit
def _mixed_fwd_kernel(
    Q, K, V, Out, Branches, Lse, Gate, CuSeqlens, total, qk_scale,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEL_BLOCK: tl.constexpr, SINK_BLOCKS: tl.constexpr,
    WINDOW_BLOCKS: tl.constexpr, SEQ_MAJOR: tl.constexpr, KV_MAJOR: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Q, Out, Branches (full then local) [.., NUM_HEADS, total, HEAD_DIM]; K, V [1, NUM_HEADS // GROUP,
    # total, HEAD_DIM]; Lse [2, NUM_HEADS, total] fp32 natural log (full, local); Gate [NUM_HEADS // GROUP].
    b, h, kvh, pid_m = _query_program(NUM_HEADS, GROUP, True, KV_MAJOR)
    doc_start = tl.load(CuSeqlens + b).to(tl.int64)
    doc_len = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.int32)
    start_m = pid_m * BLOCK_M
    if start_m >= doc_len:
        return
    tot = tl.cast(total, tl.int64)
    if SEQ_MAJOR:
        stride_qh = HEAD_DIM
        stride_qm = NUM_HEADS * HEAD_DIM
        stride_kh = HEAD_DIM
        stride_km = (NUM_HEADS // GROUP) * HEAD_DIM
    else:
        stride_qh = tot * HEAD_DIM
        stride_qm = HEAD_DIM
        stride_kh = tot * HEAD_DIM
        stride_km = HEAD_DIM
    q_off = doc_start * stride_qm + h * stride_qh  # same layout for Q, Out and each branch
    k_base = K + doc_start * stride_km + kvh * stride_kh
    v_base = V + doc_start * stride_km + kvh * stride_kh

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    SINK_END: tl.constexpr = SINK_BLOCKS * SEL_BLOCK
    rows = start_m + offs_m  # [BLOCK_M] document positions
    row_ok = rows < doc_len
    io_mask = row_ok[:, None] & d_ok[None, :]
    row_offs = tl.cast(start_m, tl.int64) * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(Q + q_off + row_offs, mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    stream_lo = (rows // SEL_BLOCK - WINDOW_BLOCKS) * SEL_BLOCK  # [BLOCK_M] first window key of each row
    tile_offs = offs_n[:, None] * stride_km + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    acc_f = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_f = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_f = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc_l = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_l = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    e1, e2, e3, e4, n_end = _key_ranges(start_m, doc_len, BLOCK_M, BLOCK_N, SEL_BLOCK, SINK_BLOCKS, WINDOW_BLOCKS)
    for n in range(0, e1):
        acc_f, l_f, m_f, acc_l, l_l, m_l = _fwd_tile(
            acc_f, l_f, m_f, acc_l, l_l, m_l, q, k_base, v_base, n * BLOCK_N, tile_offs, offs_n, d_ok, rows,
            stream_lo, doc_len, qk_scale, stride_km, True, True, SINK_END, PAD_D, DOT_PREC)
    for n in range(e1, e2):
        acc_f, l_f, m_f, acc_l, l_l, m_l = _fwd_tile(
            acc_f, l_f, m_f, acc_l, l_l, m_l, q, k_base, v_base, n * BLOCK_N, tile_offs, offs_n, d_ok, rows,
            stream_lo, doc_len, qk_scale, stride_km, False, False, SINK_END, PAD_D, DOT_PREC)
    for n in range(e2, e3):
        acc_f, l_f, m_f, acc_l, l_l, m_l = _fwd_tile(
            acc_f, l_f, m_f, acc_l, l_l, m_l, q, k_base, v_base, n * BLOCK_N, tile_offs, offs_n, d_ok, rows,
            stream_lo, doc_len, qk_scale, stride_km, True, True, SINK_END, PAD_D, DOT_PREC)
    for n in range(e3, e4):
        acc_f, l_f, m_f, acc_l, l_l, m_l = _fwd_tile(
            acc_f, l_f, m_f, acc_l, l_l, m_l, q, k_base, v_base, n * BLOCK_N, tile_offs, offs_n, d_ok, rows,
            stream_lo, doc_len, qk_scale, stride_km, True, False, SINK_END, PAD_D, DOT_PREC)
    for n in range(e4, n_end):
        acc_f, l_f, m_f, acc_l, l_l, m_l = _fwd_tile(
            acc_f, l_f, m_f, acc_l, l_l, m_l, q, k_base, v_base, n * BLOCK_N, tile_offs, offs_n, d_ok, rows,
            stream_lo, doc_len, qk_scale, stride_km, True, True, SINK_END, PAD_D, DOT_PREC)

    # Every row has key 0 in both sets, so l_f, l_l > 0.
    full = acc_f / l_f[:, None]
    local = acc_l / l_l[:, None]
    share = tl.load(Gate + kvh).to(tl.float32)
    out = local + share * (full - local)
    branch = NUM_HEADS * tot * HEAD_DIM
    ty = Out.dtype.element_ty
    tl.store(Out + q_off + row_offs, out.to(ty), mask=io_mask)
    tl.store(Branches + q_off + row_offs, full.to(ty), mask=io_mask)
    tl.store(Branches + branch + q_off + row_offs, local.to(ty), mask=io_mask)
    lse_ptrs = Lse + h * tot + doc_start + rows
    tl.store(lse_ptrs, (m_f + tl.math.log2(l_f)) * _LN2, mask=row_ok)
    tl.store(lse_ptrs + NUM_HEADS * tot, (m_l + tl.math.log2(l_l)) * _LN2, mask=row_ok)


@triton.jit
def _dq_tile(dq, q, do, lse_f, lse_l, delta_f, delta_l, k_base, v_base, start_n, tile_offs, offs_n, d_ok, rows,
             stream_lo, doc_len, qk_scale, stride_m,
             BOTH: tl.constexpr, MASK: tl.constexpr, SINK_END: tl.constexpr, PAD_D: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """One key tile's contribution to dQ (``BOTH`` / ``MASK`` as in ``_fwd_tile``). The log-sum-exps
    are in log2 units with the shares folded in: ``P_f`` here is ``s * softmax``."""
    k_pos = start_n + offs_n
    start = tl.cast(start_n, tl.int64) * stride_m
    if MASK:
        kv_ok = (k_pos < doc_len)[:, None] & d_ok[None, :]
        k = tl.load(k_base + start + tile_offs, mask=kv_ok, other=0.0)
        v = tl.load(v_base + start + tile_offs, mask=kv_ok, other=0.0)
    elif PAD_D:
        k = tl.load(k_base + start + tile_offs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + start + tile_offs, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_base + start + tile_offs)
        v = tl.load(v_base + start + tile_offs)
    qk = _dot(q, tl.trans(k), DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    p_f = tl.math.exp2(qk - lse_f[:, None])
    if BOTH:
        p_l = tl.math.exp2(qk - lse_l[:, None])
    if MASK:  # tile-relative, as in _fwd_tile
        causal = offs_n[None, :] <= (rows - start_n)[:, None]
        p_f = tl.where(causal, p_f, 0.0)
        if BOTH:
            stream = causal & ((k_pos < SINK_END)[None, :] | (offs_n[None, :] >= (stream_lo - start_n)[:, None]))
            p_l = tl.where(stream, p_l, 0.0)
    dp = _dot(do, tl.trans(v), DOT_PREC)  # [BLOCK_M, BLOCK_N]
    if BOTH:
        ds = p_f * (dp - delta_f[:, None]) + p_l * (dp - delta_l[:, None])
    else:
        ds = p_f * (dp - delta_f[:, None])
    dq += _dot(ds.to(k.dtype), k, DOT_PREC)  # [BLOCK_M, BLOCK_D]
    return dq


@triton.jit
def _mixed_bwd_dq_kernel(
    Q, K, V, DO, Branches, Lse, Stats, DQ, Gate, CuSeqlens, total, sm_scale,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEL_BLOCK: tl.constexpr, SINK_BLOCKS: tl.constexpr,
    WINDOW_BLOCKS: tl.constexpr, SEQ_MAJOR: tl.constexpr, KV_MAJOR: tl.constexpr, DOT_PREC: tl.constexpr,
    DGATE_ONLY: tl.constexpr,
):
    # Stats (fp32, written here): delta_f [NUM_HEADS, total], delta_l [NUM_HEADS, total], then the
    # dL/dgate partials [NUM_HEADS, documents x query tiles], one per program.
    b, h, kvh, pid_m = _query_program(NUM_HEADS, GROUP, True, KV_MAJOR)
    if KV_MAJOR:
        n_m = tl.num_programs(0) // GROUP
        num_docs = tl.num_programs(1) // (NUM_HEADS // GROUP)
    else:
        n_m = tl.num_programs(1)
        num_docs = tl.num_programs(0) // NUM_HEADS
    tot = tl.cast(total, tl.int64)
    partial = Stats + 2 * NUM_HEADS * tot + h * (num_docs * n_m) + b * n_m + pid_m
    doc_start = tl.load(CuSeqlens + b).to(tl.int64)
    doc_len = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.int32)
    start_m = pid_m * BLOCK_M
    if start_m >= doc_len:
        tl.store(partial, 0.0)
        return
    if SEQ_MAJOR:
        stride_qh = HEAD_DIM
        stride_qm = NUM_HEADS * HEAD_DIM
        stride_kh = HEAD_DIM
        stride_km = (NUM_HEADS // GROUP) * HEAD_DIM
    else:
        stride_qh = tot * HEAD_DIM
        stride_qm = HEAD_DIM
        stride_kh = tot * HEAD_DIM
        stride_km = HEAD_DIM
    q_off = doc_start * stride_qm + h * stride_qh  # Q, DO, DQ and each branch
    k_base = K + doc_start * stride_km + kvh * stride_kh
    v_base = V + doc_start * stride_km + kvh * stride_kh

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    SINK_END: tl.constexpr = SINK_BLOCKS * SEL_BLOCK
    rows = start_m + offs_m
    row_ok = rows < doc_len
    io_mask = row_ok[:, None] & d_ok[None, :]
    row_offs = tl.cast(start_m, tl.int64) * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :]
    do = tl.load(DO + q_off + row_offs, mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    full = tl.load(Branches + q_off + row_offs, mask=io_mask, other=0.0).to(tl.float32)
    local = tl.load(Branches + NUM_HEADS * tot * HEAD_DIM + q_off + row_offs, mask=io_mask, other=0.0)
    delta_f = tl.sum(do.to(tl.float32) * full, 1)  # [BLOCK_M]
    delta_l = tl.sum(do.to(tl.float32) * local.to(tl.float32), 1)
    stat_ptrs = Stats + h * tot + doc_start + rows
    tl.store(stat_ptrs, delta_f, mask=row_ok)
    tl.store(stat_ptrs + NUM_HEADS * tot, delta_l, mask=row_ok)
    tl.store(partial, tl.sum(delta_f - delta_l, 0))  # rows past the document load zeros
    if not DGATE_ONLY:  # else only dL/dgate is needed (q, k, v need no gradient)
        q = tl.load(Q + q_off + row_offs, mask=io_mask, other=0.0)
        share = tl.load(Gate + kvh).to(tl.float32)
        qk_scale = sm_scale * _LOG2E
        # s * exp2(x - lse) = exp2(x - (lse - log2 s)); a share of 0 gives +inf, so P = 0 exactly.
        lse_ptrs = Lse + h * tot + doc_start + rows
        lse_f = tl.load(lse_ptrs, mask=row_ok, other=float("inf")) * _LOG2E - tl.math.log2(share)
        lse_l = tl.load(lse_ptrs + NUM_HEADS * tot, mask=row_ok, other=float("inf")) * _LOG2E \
            - tl.math.log2(1.0 - share)
        stream_lo = (rows // SEL_BLOCK - WINDOW_BLOCKS) * SEL_BLOCK
        tile_offs = offs_n[:, None] * stride_km + offs_d[None, :]
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        e1, e2, e3, e4, n_end = _key_ranges(start_m, doc_len, BLOCK_M, BLOCK_N, SEL_BLOCK, SINK_BLOCKS, WINDOW_BLOCKS)
        for n in range(0, e1):
            dq = _dq_tile(dq, q, do, lse_f, lse_l, delta_f, delta_l, k_base, v_base, n * BLOCK_N, tile_offs, offs_n,
                          d_ok, rows, stream_lo, doc_len, qk_scale, stride_km, True, True, SINK_END, PAD_D, DOT_PREC)
        for n in range(e1, e2):
            dq = _dq_tile(dq, q, do, lse_f, lse_l, delta_f, delta_l, k_base, v_base, n * BLOCK_N, tile_offs, offs_n,
                          d_ok, rows, stream_lo, doc_len, qk_scale, stride_km, False, False, SINK_END, PAD_D, DOT_PREC)
        for n in range(e2, e3):
            dq = _dq_tile(dq, q, do, lse_f, lse_l, delta_f, delta_l, k_base, v_base, n * BLOCK_N, tile_offs, offs_n,
                          d_ok, rows, stream_lo, doc_len, qk_scale, stride_km, True, True, SINK_END, PAD_D, DOT_PREC)
        for n in range(e3, e4):
            dq = _dq_tile(dq, q, do, lse_f, lse_l, delta_f, delta_l, k_base, v_base, n * BLOCK_N, tile_offs, offs_n,
                          d_ok, rows, stream_lo, doc_len, qk_scale, stride_km, True, False, SINK_END, PAD_D, DOT_PREC)
        for n in range(e4, n_end):
            dq = _dq_tile(dq, q, do, lse_f, lse_l, delta_f, delta_l, k_base, v_base, n * BLOCK_N, tile_offs, offs_n,
                          d_ok, rows, stream_lo, doc_len, qk_scale, stride_km, True, True, SINK_END, PAD_D, DOT_PREC)
        tl.store(DQ + q_off + row_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, branch_rows, start_m, offs_m, offs_d, d_ok,
               k_pos, stream_hi, doc_len, qk_scale, log2_share_f, log2_share_l, stride_m,
               BOTH: tl.constexpr, MASK: tl.constexpr, SINK_END: tl.constexpr, DOT_PREC: tl.constexpr):
    """One query tile's contribution to this key tile's dK/dV (transposed: ``[BLOCK_N, BLOCK_M]``).

    ``MASK``: the tile straddles the causal diagonal or the window end of some key; rows past the
    document load lse = +inf, so they contribute nothing without a mask.
    """
    rows = start_m + offs_m  # [BLOCK_M]
    row_ok = rows < doc_len
    io_mask = row_ok[:, None] & d_ok[None, :]
    row_offs = tl.cast(start_m, tl.int64) * stride_m + offs_m[:, None] * stride_m + offs_d[None, :]
    q = tl.load(q_base + row_offs, mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(do_base + row_offs, mask=io_mask, other=0.0)
    lse_f = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * _LOG2E - log2_share_f
    delta_f = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    if BOTH:
        lse_l = tl.load(lse_base + branch_rows + rows, mask=row_ok, other=float("inf")) * _LOG2E - log2_share_l
        delta_l = tl.load(delta_base + branch_rows + rows, mask=row_ok, other=0.0)
    qk_t = _dot(k, tl.trans(q), DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M], log2 units
    pf_t = tl.math.exp2(qk_t - lse_f[None, :])  # s * P_f^T
    if BOTH:
        pl_t = tl.math.exp2(qk_t - lse_l[None, :])  # (1 - s) * P_l^T
    if MASK:
        causal_t = k_pos[:, None] <= rows[None, :]
        pf_t = tl.where(causal_t, pf_t, 0.0)
        if BOTH:
            stream_t = causal_t & ((k_pos[:, None] < SINK_END) | (rows[None, :] < stream_hi[:, None]))
            pl_t = tl.where(stream_t, pl_t, 0.0)
    if BOTH:
        dv += _dot((pf_t + pl_t).to(do.dtype), do, DOT_PREC)  # [BLOCK_N, BLOCK_D]
    else:
        dv += _dot(pf_t.to(do.dtype), do, DOT_PREC)
    dp_t = _dot(v, tl.trans(do), DOT_PREC)  # [BLOCK_N, BLOCK_M]
    if BOTH:
        ds_t = pf_t * (dp_t - delta_f[None, :]) + pl_t * (dp_t - delta_l[None, :])
    else:
        ds_t = pf_t * (dp_t - delta_f[None, :])
    dk += _dot(ds_t.to(q.dtype), q, DOT_PREC)
    return dk, dv


@triton.jit
def _mixed_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Stats, DK, DV, Gate, DGate, CuSeqlens, total, sm_scale, num_partials,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEL_BLOCK: tl.constexpr, SINK_BLOCKS: tl.constexpr,
    WINDOW_BLOCKS: tl.constexpr, SEQ_MAJOR: tl.constexpr, DOT_PREC: tl.constexpr, DGATE_BLOCK: tl.constexpr,
):
    # Grid (documents x KV heads, key tiles of the longest document). Runs after the dQ kernel,
    # whose Stats (deltas and dL/dgate partials) it reads.
    NUM_KV: tl.constexpr = NUM_HEADS // GROUP
    pid_bk = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = pid_bk // NUM_KV
    kvh = pid_bk % NUM_KV
    tot = tl.cast(total, tl.int64)
    if (pid_bk < NUM_KV) & (pid_n == 0):
        # dL/dgate[kvh]: the partials of its G query heads are contiguous; summed in a fixed order.
        parts = Stats + 2 * NUM_HEADS * tot + kvh * GROUP * num_partials
        count = GROUP * num_partials
        offs = tl.arange(0, DGATE_BLOCK)
        acc = tl.zeros([DGATE_BLOCK], dtype=tl.float32)
        for i in range(0, count, DGATE_BLOCK):
            acc += tl.load(parts + i + offs, mask=i + offs < count, other=0.0)
        tl.store(DGate + kvh, tl.sum(acc, 0).to(DGate.dtype.element_ty))
    doc_start = tl.load(CuSeqlens + b).to(tl.int64)
    doc_len = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.int32)
    start_n = pid_n * BLOCK_N
    if start_n >= doc_len:
        return
    if SEQ_MAJOR:
        stride_qh = HEAD_DIM
        stride_qm = NUM_HEADS * HEAD_DIM
        stride_kh = HEAD_DIM
        stride_km = NUM_KV * HEAD_DIM
    else:
        stride_qh = tot * HEAD_DIM
        stride_qm = HEAD_DIM
        stride_kh = tot * HEAD_DIM
        stride_km = HEAD_DIM

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    SINK_END: tl.constexpr = SINK_BLOCKS * SEL_BLOCK
    k_pos = start_n + offs_n  # [BLOCK_N]
    col_ok = k_pos < doc_len
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k_off = doc_start * stride_km + kvh * stride_kh + tl.cast(start_n, tl.int64) * stride_km
    kv_offs = offs_n[:, None] * stride_km + offs_d[None, :]
    k = tl.load(K + k_off + kv_offs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + k_off + kv_offs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    share = tl.load(Gate + kvh).to(tl.float32)
    log2_share_f = tl.math.log2(share)
    log2_share_l = tl.math.log2(1.0 - share)
    qk_scale = sm_scale * _LOG2E
    # Query row r reads key c in the streaming branch when c is a sink key or r < stream_hi[c].
    stream_hi = (k_pos // SEL_BLOCK + WINDOW_BLOCKS + 1) * SEL_BLOCK  # [BLOCK_N]

    # Query-tile ranges: [m_first, m_mid) diagonal (both, masked), [m_mid, mb) window (both,
    # unmasked), [mb, mc) window ends (both, masked), [mc, num_m) dense only (unmasked).
    n_last = start_n + BLOCK_N - 1
    num_m = tl.cdiv(doc_len, BLOCK_M)
    m_first = start_n // BLOCK_M
    m_mid = tl.minimum(tl.maximum(tl.cdiv(n_last, BLOCK_M), m_first), num_m)
    hi_min = (start_n // SEL_BLOCK + WINDOW_BLOCKS + 1) * SEL_BLOCK
    hi_max = (n_last // SEL_BLOCK + WINDOW_BLOCKS + 1) * SEL_BLOCK
    mb = tl.where(n_last < SINK_END, num_m, hi_min // BLOCK_M)
    mb = tl.minimum(tl.maximum(mb, m_mid), num_m)
    mc = tl.where(start_n < SINK_END, num_m, tl.cdiv(hi_max, BLOCK_M))
    mc = tl.minimum(tl.maximum(mc, mb), num_m)

    branch_rows = NUM_HEADS * tot
    for g in range(0, GROUP):  # the query heads that share this KV head
        h = kvh * GROUP + g
        q_base = Q + doc_start * stride_qm + h * stride_qh
        do_base = DO + doc_start * stride_qm + h * stride_qh
        lse_base = Lse + h * tot + doc_start
        delta_base = Stats + h * tot + doc_start
        for m in range(m_first, m_mid):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, branch_rows, m * BLOCK_M,
                                offs_m, offs_d, d_ok, k_pos, stream_hi, doc_len, qk_scale, log2_share_f,
                                log2_share_l, stride_qm, True, True, SINK_END, DOT_PREC)
        for m in range(m_mid, mb):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, branch_rows, m * BLOCK_M,
                                offs_m, offs_d, d_ok, k_pos, stream_hi, doc_len, qk_scale, log2_share_f,
                                log2_share_l, stride_qm, True, False, SINK_END, DOT_PREC)
        for m in range(mb, mc):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, branch_rows, m * BLOCK_M,
                                offs_m, offs_d, d_ok, k_pos, stream_hi, doc_len, qk_scale, log2_share_f,
                                log2_share_l, stride_qm, True, True, SINK_END, DOT_PREC)
        for m in range(mc, num_m):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, branch_rows, m * BLOCK_M,
                                offs_m, offs_d, d_ok, k_pos, stream_hi, doc_len, qk_scale, log2_share_f,
                                log2_share_l, stride_qm, False, False, SINK_END, DOT_PREC)
    tl.store(DK + k_off + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + k_off + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ==================================================================================================
# Host launchers
# ==================================================================================================


@dataclass(frozen=True)
class MixedConfigs:
    """Tiles of the three mixed kernels (``KernelConfig``: ``block_m`` query rows, ``block_n`` keys).

    Tiles need no relation to the streaming block size: tiles that straddle a sink or window edge
    build element masks. ``split_masked`` is unused; ``kv_major`` orders the forward and dQ grids.
    """

    forward: KernelConfig
    backward_dq: KernelConfig
    backward_dkdv: KernelConfig


@functools.lru_cache(maxsize=None)
def default_mixed_configs(head_dim: int, dtype: torch.dtype, interpret: bool) -> MixedConfigs:
    """The config table, one entry per (head_dim, dtype) class (cached: every launch asks).

    GPU entries are first choices for the H100, to be swept by passing ``configs=`` to the
    launchers; fp32 and the interpreter use small tiles.
    """
    if interpret:
        tile = KernelConfig(32, 32, num_warps=4, num_stages=1)
        return MixedConfigs(tile, tile, tile)
    if dtype == torch.float32:  # exact fp32 dots on CUDA cores: tests, not speed
        small = KernelConfig(16, 16, num_warps=4, num_stages=1)
        return MixedConfigs(KernelConfig(32, 32, num_warps=4, num_stages=1), small, small)
    # bf16/fp16 on the H100. D = 64 measured (benchmarks/sweep_mixed_configs.py, NOTES.md run 15,
    # SmolLM2's layer: 9/3 heads, sink 128, window 1024, block 64, 8K as one document / 4 documents):
    # 4 warps everywhere; forward 64x64 0.36 / 0.19 ms (8 warps: 0.67 / 0.31), dQ 64x64 1.98 / 0.69
    # (with the dK/dV launch), dK/dV 32 rows x 64 keys 1.82 / 0.74. The other head dims are first
    # choices by ptxas's spill report for sm_90a (triton 3.6), not timed: two accumulators in the
    # forward and two P tiles everywhere make these kernels tighter on registers than block_sparse's.
    if head_dim <= 64:
        return MixedConfigs(
            forward=KernelConfig(64, 64, num_warps=4, num_stages=3),
            backward_dq=KernelConfig(64, 64, num_warps=4, num_stages=2),
            backward_dkdv=KernelConfig(32, 64, num_warps=4, num_stages=3),
        )
    if head_dim <= 128:
        return MixedConfigs(
            forward=KernelConfig(32, 32, num_warps=4, num_stages=2),  # 0 (64x16: 72 B; 64x32: 176 B)
            backward_dq=KernelConfig(32, 32, num_warps=4, num_stages=2),  # 0
            backward_dkdv=KernelConfig(32, 32, num_warps=4, num_stages=2),  # 0 (16x64: 264 B)
        )
    return MixedConfigs(  # head_dim 256: correct first
        forward=KernelConfig(32, 32, num_warps=4, num_stages=1),
        backward_dq=KernelConfig(32, 32, num_warps=4, num_stages=1),
        backward_dkdv=KernelConfig(16, 32, num_warps=4, num_stages=1),
    )


def streaming_blocks(sink: int, window: int, block_size: int) -> tuple[int, int]:
    """``(sink_blocks, window_blocks)``: query block ``i`` of a document reads key block ``j <= i``
    when ``j < sink_blocks`` or ``j >= i - window_blocks``.

    Equal to ``streaming_select(L, L, ..., causal=True)`` for every ``L``: block 0 is always kept,
    the sink keeps the blocks overlapping ``[0, sink)``, and the window of row ``p`` is
    ``[p - window + 1, p]``, which overlaps key block ``j`` for some row of block ``i`` exactly when
    ``(j + 1) * block_size - 1 >= i * block_size - window + 1``.
    """
    return max(1, -(-sink // block_size)), 1 + (window - 2) // block_size


def _fits(t: torch.Tensor, seq_major: bool) -> bool:
    """Whether ``t [..., H, T, D]`` has the strides the kernels derive for the layout."""
    H, T, D = t.shape[-3:]
    s_h, s_m, s_d = t.stride()[-3:]
    if s_d != 1:
        return False
    if seq_major:
        return (H == 1 or s_h == D) and (T == 1 or s_m == H * D)
    return (H == 1 or s_h == T * D) and (T == 1 or s_m == D)


def _in_layout(t: torch.Tensor, seq_major: bool) -> torch.Tensor:
    if _fits(t, seq_major):
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2) if seq_major else t.contiguous()


def _layout(q, k, v) -> tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layout of the call (q's, when it is one of the two) and q, k, v in it."""
    seq_major = _fits(q, True) and not _fits(q, False)
    return seq_major, _in_layout(q, seq_major), _in_layout(k, seq_major), _in_layout(v, seq_major)


@functools.lru_cache(maxsize=64)
def _constexprs(q_heads: int, kv_heads: int, head_dim: int, sink: int, window: int, block_size: int,
                seq_major: bool, dtype: torch.dtype) -> dict:
    sink_blocks, window_blocks = streaming_blocks(sink, window, block_size)
    return dict(NUM_HEADS=q_heads, GROUP=q_heads // kv_heads, HEAD_DIM=head_dim,
                BLOCK_D=_padded_head_dim(head_dim), SEL_BLOCK=block_size, SINK_BLOCKS=sink_blocks,
                WINDOW_BLOCKS=window_blocks, SEQ_MAJOR=seq_major, DOT_PREC=_dot_precision(dtype))


def _configs(q: torch.Tensor, configs: MixedConfigs | None) -> MixedConfigs:
    return configs or default_mixed_configs(q.shape[-1], q.dtype, q.device.type == "cpu")


def mixed_forward(q, k, v, gate, *, sink: int, window: int, block_size: int, cu_seqlens: torch.Tensor,
                  max_seqlen: int, scale: float | None = None, configs: MixedConfigs | None = None):
    """Launch the forward kernel on validated packed inputs; returns ``(out, branches, lse)``.

    Args:
        q: `[1, Hq, total, D]`; k, v: `[1, Hkv, total, D]` (head- or sequence-major, see the module).
        gate: `[Hkv]` shares of the dense branch, in [0, 1] (any float dtype; read on the device).
        sink, window, block_size: the streaming branch (``StreamingConfig``'s fields).
        cu_seqlens: `[N + 1]` int32 document boundaries; max_seqlen: the longest document.
        scale: softmax scale, default `1/sqrt(D)`.
        configs: tiles (default :func:`default_mixed_configs`).

    Returns:
        ``out`` like q; ``branches [2, 1, Hq, total, D]`` (full, local) in q's dtype and layout;
        ``lse [2, 1, Hq, total]`` fp32 natural-log log-sum-exps of the two branches.
    """
    seq_major, q, k, v = _layout(q, k, v)
    gate = gate if gate.stride(0) == 1 else gate.contiguous()
    _, Hq, total, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    shape = (2, total, Hq, D) if seq_major else (2, Hq, total, D)
    branches = alloc_output(q, shape)
    branches = branches.transpose(1, 2).unsqueeze(1) if seq_major else branches.unsqueeze(1)
    out = alloc_output(q)
    lse = alloc_output(q, (2, 1, Hq, total), torch.float32)
    cfg = _configs(q, configs).forward
    grid = _query_grid(cu_seqlens.numel() - 1, Hq, Hkv, triton.cdiv(max_seqlen, cfg.block_m), cfg.kv_major)
    _mixed_fwd_kernel[grid](
        q, k, v, out, branches, lse, gate, cu_seqlens, total, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, KV_MAJOR=cfg.kv_major, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **_constexprs(Hq, Hkv, D, sink, window, block_size, seq_major, q.dtype),
    )
    return out, branches, lse


def mixed_backward(dout, q, k, v, gate, branches, lse, *, sink: int, window: int, block_size: int,
                   cu_seqlens: torch.Tensor, max_seqlen: int, scale: float | None = None,
                   configs: MixedConfigs | None = None, qkv_grads: bool = True):
    """Launch the backward kernels; returns ``(dq, dk, dv, dgate)``.

    ``branches`` and ``lse`` as :func:`mixed_forward` returned them for the same ``q, k, v, gate``.
    ``dgate [Hkv]`` (gate's dtype) is ``sum(dout * (full - local))`` over each KV head's query heads
    and positions. ``qkv_grads=False``: only ``dgate`` (dq, dk, dv are None): the dQ kernel's
    prologue and one small sum.
    """
    seq_major, q, k, v = _layout(q, k, v)
    if not _fits(branches, seq_major):
        raise ValueError("branches must be mixed_forward's output for the same q")
    dout = _in_layout(dout, seq_major)
    gate = gate if gate.stride(0) == 1 else gate.contiguous()
    _, Hq, total, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    configs = _configs(q, configs)
    num_docs = cu_seqlens.numel() - 1
    cfg = configs.backward_dq
    grid = _query_grid(num_docs, Hq, Hkv, triton.cdiv(max_seqlen, cfg.block_m), cfg.kv_major)
    num_partials = num_docs * triton.cdiv(max_seqlen, cfg.block_m)  # per query head
    stats = alloc_output(lse, (Hq * (2 * total + num_partials),))
    constexprs = _constexprs(Hq, Hkv, D, sink, window, block_size, seq_major, q.dtype)
    dq = alloc_output(q) if qkv_grads else stats  # never written without qkv_grads
    _mixed_bwd_dq_kernel[grid](
        q, k, v, dout, branches, lse, stats, dq, gate, cu_seqlens, total, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, KV_MAJOR=cfg.kv_major, DGATE_ONLY=not qkv_grads,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constexprs,
    )
    if not qkv_grads:
        partials = stats[2 * Hq * total:].view(Hkv, -1)
        return None, None, None, partials.sum(1).to(gate.dtype)
    cfg = configs.backward_dkdv
    dk, dv, dgate = alloc_output(k), alloc_output(v), alloc_output(gate)
    _mixed_bwd_dkdv_kernel[(num_docs * Hkv, triton.cdiv(max_seqlen, cfg.block_n))](
        q, k, v, dout, lse, stats, dk, dv, gate, dgate, cu_seqlens, total, scale, num_partials,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DGATE_BLOCK=_DGATE_BLOCK, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **constexprs,
    )
    return dq, dk, dv, dgate
