"""The shared block-sparse attention kernel: forward and backward, dense mode, GQA, varlen.

Four levels (STYLE.md): ``@triton.jit`` kernels -> host launchers (``block_sparse_forward``,
``block_sparse_backward``) -> ``_BlockSparseAttention`` (autograd) -> ``block_sparse_attention``
(validation and the full docstring).

Layout. ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``, any strides with a contiguous last dim.
Query head ``h`` reads KV head ``h // (Hq // Hkv)``; K/V are never repeated. Queries are the last
``Lq`` of the ``Lk`` positions. Varlen packs sequences as ``[1, H, total, D]`` with ``cu_seqlens``;
each program finds its sequence's rows from ``cu_seqlens`` and exits when its tile lies past them.

Tiles. A program owns ``BLOCK_M`` query rows and walks key tiles of ``BLOCK_N`` keys. In sparse
mode ``BLOCK_M`` divides ``block_q`` and ``BLOCK_N`` divides ``block_k`` (both powers of two), so a
selected key block is ``block_k // BLOCK_N`` consecutive key tiles and the math stays exact.
(128-row tiles over pairs of 64-row selection blocks, walking the union of their key blocks, were
measured slower than 64-row tiles in every configuration and removed: benchmarks/NOTES.md, run 8.
Persistent programs, one an SM computing rows in turn with the next row's index data loaded a row
ahead, were 6-11% slower at 5% density and 15-20% slower over every causal block, and removed: run 24.)

Masking. Dense mode splits the key loop: full tiles first with no element mask, then the tiles
that straddle the causal diagonal or the end of the keys, with a constexpr ``MASK``. Sparse mode
walks the index in one loop and applies the element mask only to tiles whose scalar test says they
straddle the diagonal or the end (loads stay outside the branch so the loop still pipelines).

Backward. ``delta = rowsum(dO * O)``; dK/dV: one program per (key tile, KV head) that loops over
the ``G`` query heads of its group and, through the key-major transpose of the index, over the
query tiles that read the tile: dK/dV are written once, without atomics, so the backward is
deterministic. dQ: one program per query tile, walking the same key tiles as the forward.

No host synchronization in any launch path (CUDA-graph capturable), except computing
``max_seqlen`` when a varlen caller does not pass it.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..validation import check_qkv, check_scale
from ..index import BlockIndex, KeyMajorIndex

__all__ = [
    "AttentionConfigs",
    "KernelConfig",
    "alloc_output",
    "block_sparse_attention",
    "block_sparse_backward",
    "block_sparse_forward",
    "check_out",
    "default_configs",
    "cached_key_major_index",
    "key_major_index",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)  # kernels may only read constexpr globals
_LN2 = tl.constexpr(LN2)
# Set to "1" (the tests do) to allocate every kernel output filled with NaN, so a row a kernel
# forgets to write fails the comparison instead of passing on leftover memory.
NAN_FILL_ENV = "SPARSEATTN_NAN_FILL"


# ==================================================================================================
# Triton kernels
# ==================================================================================================


@triton.jit
def _warp_uniform(x, ENABLE: tl.constexpr):
    """``x``, an int32 scalar every thread holds (e.g. a loaded count), re-read from lane 0.

    ptxas treats a value loaded from global memory as possibly different per thread, so a loop
    whose trip count is one runs with a "divergent" back edge: its stage counters and wgmma
    descriptors live in vector registers and are moved to uniform ones every tile (~90 extra
    instructions before each tile's first matmul, NOTES.md run 19e). A ``shfl.sync.idx`` from lane
    0 is warp-uniform by construction, which ptxas knows. ``ENABLE`` is False in the interpreter,
    which has no inline assembly.
    """
    if ENABLE:
        x = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, 0, 0x1f, 0xffffffff;", "=r,r", [x],
                                      dtype=tl.int32, is_pure=True, pack=1)
    return x


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    # PREC = "ieee" for fp32 inputs (exact, as the fp32 tests need), "tf32" (the default) otherwise.
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _softmax_update(acc, l_i, m_i, qk, v, qk_scale, GUARD: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over a key tile. ``qk`` is the raw, masked (-inf) score tile; the
    scale (with log2(e) folded in) is applied inside one FMA: ``exp2(qk * qk_scale - m)``.

    ``GUARD``: the tile may hold rows that are fully masked so far (max = -inf); subtract 0
    instead of -inf there so no NaN appears.
    """
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # [BLOCK_M], log2 units
    if GUARD:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.math.exp2(m_i - m_sub)  # [BLOCK_M]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC)  # [BLOCK_M, BLOCK_D]
    return acc, l_i, m_new


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, k_tile_offs, v_tile_offs, offs_n, d_ok,
              q_pos, k_bound, qk_scale, stride_kn, stride_vn,
              MODE: tl.constexpr, IS_CAUSAL: tl.constexpr, PAD_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Attend one key tile starting at ``start_n``.

    MODE 0: full tile (in bounds, below the diagonal): no load mask, no element mask.
    MODE 1: masked (tiles that reach the causal diagonal or the end of the keys).
    """
    k_pos = start_n + offs_n  # [BLOCK_N]
    start = tl.cast(start_n, tl.int64)
    k_ptrs = k_base + start * stride_kn + k_tile_offs  # [BLOCK_N, BLOCK_D]
    v_ptrs = v_base + start * stride_vn + v_tile_offs
    if MODE == 0:
        if PAD_D:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=(k_pos[:, None] < k_bound) & d_ok[None, :], other=0.0)
    qk = _dot(q, tl.trans(k), DOT_PREC)  # [BLOCK_M, BLOCK_N], unscaled
    if MODE != 0:
        keep = k_pos[None, :] < k_bound
        if IS_CAUSAL:
            keep = keep & (k_pos[None, :] <= q_pos[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    if MODE == 0:
        if PAD_D:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=(k_pos[:, None] < k_bound) & d_ok[None, :], other=0.0)
    return _softmax_update(acc, l_i, m_i, qk, v, qk_scale, MODE != 0, DOT_PREC)


@triton.jit
def _query_program(num_heads, group_size, REVERSE: tl.constexpr, KV_MAJOR: tl.constexpr):
    """``(b, h, kvh, pid_m)`` of a query-tile program (forward, dQ, vertical-slash).

    ``KV_MAJOR``: the grid is ``(group_size * n_m, B * Hkv)`` with the G query heads of a KV head
    fastest, then the query tiles: the ~100+ programs resident at once all read one KV head, so a
    K/V tile fetched from HBM serves every resident program that selected it (L2 reuse across the
    group and across query tiles). Otherwise ``(B * Hq, n_m)`` with all heads of a few query tiles
    resident together. ``REVERSE`` (causal) starts the last, heaviest query tiles first.
    """
    if KV_MAJOR:
        pid_g = tl.program_id(0)
        pid_bk = tl.program_id(1).to(tl.int64)
        num_kv = num_heads // group_size
        b = pid_bk // num_kv
        kvh = pid_bk % num_kv
        h = kvh * group_size + pid_g % group_size
        pid_m = pid_g // group_size
        n_m = tl.num_programs(0) // group_size
    else:
        pid_bh = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1)
        n_m = tl.num_programs(1)
        b = pid_bh // num_heads
        h = pid_bh % num_heads
        kvh = h // group_size
    if REVERSE:
        pid_m = n_m - 1 - pid_m
    return b, h, kvh, pid_m


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, Indices, Counts, CuSeqlens,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    num_heads, group_size, q_len, k_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SEL_BLOCK_Q: tl.constexpr, SEL_BLOCK_K: tl.constexpr,
    IS_CAUSAL: tl.constexpr, SPARSE: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PREC: tl.constexpr, MAX_MASKED: tl.constexpr, SPLIT_MASKED: tl.constexpr, KV_MAJOR: tl.constexpr,
    UNIFORM: tl.constexpr,
):
    b, h, kvh, pid_m = _query_program(num_heads, group_size, REVERSE, KV_MAJOR)
    if VARLEN:
        seq_start = tl.load(CuSeqlens + b).to(tl.int64)
        q_len = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.int32)
        k_len = q_len
        q_base = Q + seq_start * stride_qm + h * stride_qh
        k_base = K + seq_start * stride_kn + kvh * stride_kh
        v_base = V + seq_start * stride_vn + kvh * stride_vh
        o_base = Out + seq_start * stride_om + h * stride_oh
        lse_base = Lse + seq_start + h * stride_lh
    else:
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        o_base = Out + b * stride_ob + h * stride_oh
        lse_base = Lse + b * stride_lb + h * stride_lh
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    off = k_len - q_len  # absolute position of query row 0

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    row_ok = (start_m + offs_m) < q_len
    q_pos = off + start_m + offs_m  # [BLOCK_M] absolute positions
    q_ptrs = q_base + tl.cast(start_m, tl.int64) * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_tile_offs = offs_n[:, None] * stride_kn + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    v_tile_offs = offs_n[:, None] * stride_vn + offs_d[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    q_first = off + start_m
    q_end = off + tl.minimum(start_m + BLOCK_M, q_len)  # one past the last real query position

    if SPARSE:
        SUB_N: tl.constexpr = SEL_BLOCK_K // BLOCK_N
        qb = start_m // SEL_BLOCK_Q
        row = Indices + b * stride_ib + h * stride_ih + qb * stride_iq
        count = _warp_uniform(tl.load(Counts + b * stride_cb + h * stride_ch + qb * stride_cq), UNIFORM)
        # Selection blocks that need an element mask (they reach this tile's causal diagonal or
        # the partial last key block) have the highest indices, so they are a suffix of the
        # ascending row: walk the prefix with plain loads and no mask, like dense mode.
        mask_from = k_len // SEL_BLOCK_K
        if IS_CAUSAL:
            mask_from = tl.minimum(mask_from, (q_first + 1) // SEL_BLOCK_K)
        tail = count - 1 - tl.arange(0, MAX_MASKED)  # [MAX_MASKED] the last entries of the row
        tail_blocks = tl.load(row + tail * stride_ik, mask=tail >= 0, other=-1)
        n_plain = _warp_uniform(count - tl.sum((tail_blocks >= mask_from).to(tl.int32), axis=0), UNIFORM)
        if not SPLIT_MASKED:
            n_plain = 0
        # The index entry of tile t + 1 is loaded in iteration t and carried in a register. Loaded
        # in its own iteration, the pipeliner gives the entry a cp.async stage of its own and the
        # K/V tiles only two buffers (a prefetch distance of one tile); loaded a step ahead it is
        # plain arithmetic to the pipeliner, the tiles get three buffers, and the load's latency
        # hides behind a whole tile of work (benchmarks/NOTES.md, runs 16 and 19).
        j_next = tl.load(row, mask=count > 0, other=0)
        for t in range(0, n_plain * SUB_N):
            j = j_next
            j_next = tl.load(row + (tl.minimum(t + 1, count * SUB_N - 1) // SUB_N) * stride_ik)
            start_n = j * SEL_BLOCK_K + (t % SUB_N) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, k_tile_offs, v_tile_offs,
                                      offs_n, d_ok, q_pos, k_len, qk_scale, stride_kn, stride_vn,
                                      0, IS_CAUSAL, PAD_D, DOT_PREC)
        for t in range(n_plain * SUB_N, count * SUB_N):
            j = tl.load(row + (t // SUB_N) * stride_ik)
            start_n = j * SEL_BLOCK_K + (t % SUB_N) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, k_tile_offs, v_tile_offs,
                                      offs_n, d_ok, q_pos, k_len, qk_scale, stride_kn, stride_vn,
                                      1, IS_CAUSAL, PAD_D, DOT_PREC)
    else:
        if IS_CAUSAL:
            n_full = tl.minimum((q_first + 1) // BLOCK_N, k_len // BLOCK_N)
            n_end = tl.cdiv(q_end, BLOCK_N)
        else:
            n_full = k_len // BLOCK_N
            n_end = tl.cdiv(k_len, BLOCK_N)
        for n in range(0, n_full):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, n * BLOCK_N, k_tile_offs, v_tile_offs,
                                      offs_n, d_ok, q_pos, k_len, qk_scale, stride_kn, stride_vn,
                                      0, IS_CAUSAL, PAD_D, DOT_PREC)
        for n in range(n_full, n_end):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, n * BLOCK_N, k_tile_offs, v_tile_offs,
                                      offs_n, d_ok, q_pos, k_len, qk_scale, stride_kn, stride_vn,
                                      1, IS_CAUSAL, PAD_D, DOT_PREC)

    # Rows with no allowed key (only rows past q_len, or an invalid index) write 0 and lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * _LN2
    o_ptrs = o_base + tl.cast(start_m, tl.int64) * stride_om + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_base + start_m + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(Out, DO, Delta, DoScale, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
                           num_heads, rows,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           HAS_SCALE: tl.constexpr):
    """``delta[b, h, i] = sum_d dO * O`` in fp32 (``Delta`` is contiguous ``[B, H, rows]``); with
    ``HAS_SCALE`` the incoming gradient is ``DoScale[h] * dO`` (see ``block_sparse_backward``)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < rows) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_SCALE:
        delta = delta * tl.load(DoScale + h)
    tl.store(Delta + pid_bh * rows + offs_m, delta, mask=offs_m < rows)


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, need_mask,
                   offs_m, offs_d, d_ok, k_pos, q_len, off, qk_scale, stride_qm, stride_dom, do_scale,
                   MODE: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Accumulate one query tile's contribution to the dK/dV of this key tile (transposed math)."""
    rows = start_m + offs_m  # [BLOCK_M]
    row_ok = rows < q_len
    start = tl.cast(start_m, tl.int64)
    q = tl.load(q_base + start * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(do_base + start * stride_dom + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_SCALE:
        do = (do * do_scale).to(q.dtype)
    # lse = +inf makes p = 0 for rows past q_len and for rows the forward found empty (lse = -inf).
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * _LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    qk_t = _dot(k, tl.trans(q), DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
    p_t = tl.math.exp2(qk_t - lse[None, :])
    if MODE == 1:
        if IS_CAUSAL:
            p_t = tl.where(k_pos[:, None] <= (off + rows)[None, :], p_t, 0.0)
    elif MODE == 2:
        if need_mask:
            p_t = tl.where(k_pos[:, None] <= (off + rows)[None, :], p_t, 0.0)
    dv += _dot(p_t.to(do.dtype), do, DOT_PREC)  # [BLOCK_N, BLOCK_D]
    dp_t = _dot(v, tl.trans(do), DOT_PREC)  # [BLOCK_N, BLOCK_M]
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, KIndices, KCounts, CuSeqlens, DoScale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    stride_ib, stride_ih, stride_ik, stride_iq,
    stride_cb, stride_ch, stride_ck,
    num_kv_heads, group_size, q_len, k_len, qk_scale, sm_scale, split_len, stride_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SEL_BLOCK_Q: tl.constexpr, SEL_BLOCK_K: tl.constexpr,
    IS_CAUSAL: tl.constexpr, SPARSE: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    # Sparse: program (b, kv head, key tile, split) takes entries [split x split_len, + split_len) of
    # each key block's query-block list and writes its partial dK/dV at DK/DV + split x stride_split
    # (_sum_splits_kernel sums the splits). A long list, such as the sink block's that every query block reads,
    # is spread over several programs instead of being the critical path.
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    DK += pid_s.to(tl.int64) * stride_split
    DV += pid_s.to(tl.int64) * stride_split
    b = pid_bh // num_kv_heads
    kvh = pid_bh % num_kv_heads
    if VARLEN:
        seq_start = tl.load(CuSeqlens + b).to(tl.int64)
        q_len = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.int32)
        k_len = q_len
        q_row0 = seq_start * stride_qm
        do_row0 = seq_start * stride_dom
        lse_row0 = seq_start
        k_base = K + seq_start * stride_kn + kvh * stride_kh
        v_base = V + seq_start * stride_vn + kvh * stride_vh
        dk_base = DK + seq_start * stride_dkn + kvh * stride_dkh
        dv_base = DV + seq_start * stride_dvn + kvh * stride_dvh
    else:
        q_row0 = b * stride_qb
        do_row0 = b * stride_dob
        lse_row0 = b * stride_lb
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        dk_base = DK + b * stride_dkb + kvh * stride_dkh
        dv_base = DV + b * stride_dvb + kvh * stride_dvh
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return
    off = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_pos = start_n + offs_n
    col_ok = k_pos < k_len
    start = tl.cast(start_n, tl.int64)
    k = tl.load(k_base + start * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_base + start * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for g in range(0, group_size):  # the query heads that share this KV head
        h = kvh * group_size + g
        q_base = Q + q_row0 + h * stride_qh
        do_base = DO + do_row0 + h * stride_doh
        lse_base = Lse + lse_row0 + h * stride_lh
        delta_base = Delta + lse_row0 + h * stride_lh
        do_scale = 1.0
        if HAS_SCALE:
            do_scale = tl.load(DoScale + h)
        if SPARSE:
            SUB_M: tl.constexpr = SEL_BLOCK_Q // BLOCK_M
            kb = start_n // SEL_BLOCK_K
            row = KIndices + b * stride_ib + h * stride_ih + kb * stride_ik
            count = tl.load(KCounts + b * stride_cb + h * stride_ch + kb * stride_ck)
            first = pid_s * split_len
            last = tl.minimum(count, first + split_len)
            i_next = tl.load(row + first * stride_iq, mask=first < last, other=0)  # one entry ahead
            for t in range(first * SUB_M, last * SUB_M):
                i = i_next
                i_next = tl.load(row + (tl.minimum(t + 1, last * SUB_M - 1) // SUB_M) * stride_iq)
                start_m = i * SEL_BLOCK_Q + (t % SUB_M) * BLOCK_M
                if IS_CAUSAL:
                    need_mask = off + start_m < start_n + BLOCK_N - 1
                else:
                    need_mask = False
                dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, need_mask,
                                        offs_m, offs_d, d_ok, k_pos, q_len, off, qk_scale, stride_qm, stride_dom,
                                        do_scale, 2, IS_CAUSAL, DOT_PREC, HAS_SCALE)
        else:
            num_m = tl.cdiv(q_len, BLOCK_M)
            if IS_CAUSAL:
                # Query tiles before m_first see none of these keys; from m_full on they see all.
                m_first = tl.maximum(start_n - off, 0) // BLOCK_M
                m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - off, 0), BLOCK_M)
                m_mid = tl.minimum(tl.maximum(m_full, m_first), num_m)
            else:
                m_first = 0
                m_mid = 0
            for m in range(m_first, m_mid):
                dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, m * BLOCK_M, True,
                                        offs_m, offs_d, d_ok, k_pos, q_len, off, qk_scale, stride_qm, stride_dom,
                                        do_scale, 1, IS_CAUSAL, DOT_PREC, HAS_SCALE)
            for m in range(m_mid, num_m):
                dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, m * BLOCK_M, False,
                                        offs_m, offs_d, d_ok, k_pos, q_len, off, qk_scale, stride_qm, stride_dom,
                                        do_scale, 0, IS_CAUSAL, DOT_PREC, HAS_SCALE)

    dk = dk * sm_scale
    out_mask = col_ok[:, None] & d_ok[None, :]
    dk_ptrs = dk_base + start * stride_dkn + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = dv_base + start * stride_dvn + offs_n[:, None] * stride_dvn + offs_d[None, :]
    if ACCUMULATE:  # add to the gradients already there (another branch's, see block_sparse_backward)
        dk += tl.load(dk_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        dv += tl.load(dv_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, start_n, need_mask, k_tile_offs, v_tile_offs, offs_n,
                 d_ok, q_pos, k_len, qk_scale, stride_kn, stride_vn,
                 MODE: tl.constexpr, IS_CAUSAL: tl.constexpr, PAD_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate one key tile's contribution to this query tile's dQ (MODE as in ``_fwd_tile``)."""
    k_pos = start_n + offs_n
    start = tl.cast(start_n, tl.int64)
    k_ptrs = k_base + start * stride_kn + k_tile_offs
    v_ptrs = v_base + start * stride_vn + v_tile_offs
    if MODE == 0:
        if PAD_D:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
    else:
        kv_ok = (k_pos[:, None] < k_len) & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    qk = _dot(q, tl.trans(k), DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
    p = tl.math.exp2(qk - lse[:, None])
    if MODE == 1:
        keep = k_pos[None, :] < k_len
        if IS_CAUSAL:
            keep = keep & (k_pos[None, :] <= q_pos[:, None])
        p = tl.where(keep, p, 0.0)
    elif MODE == 2:
        if need_mask:
            keep = k_pos[None, :] < k_len
            if IS_CAUSAL:
                keep = keep & (k_pos[None, :] <= q_pos[:, None])
            p = tl.where(keep, p, 0.0)
    dp = _dot(do, tl.trans(v), DOT_PREC)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, DOT_PREC)  # [BLOCK_M, BLOCK_D]
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Indices, Counts, CuSeqlens, DoScale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    num_heads, group_size, q_len, k_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SEL_BLOCK_Q: tl.constexpr, SEL_BLOCK_K: tl.constexpr,
    IS_CAUSAL: tl.constexpr, SPARSE: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    DOT_PREC: tl.constexpr, KV_MAJOR: tl.constexpr, HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    b, h, kvh, pid_m = _query_program(num_heads, group_size, REVERSE, KV_MAJOR)
    if VARLEN:
        seq_start = tl.load(CuSeqlens + b).to(tl.int64)
        q_len = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.int32)
        k_len = q_len
        q_base = Q + seq_start * stride_qm + h * stride_qh
        k_base = K + seq_start * stride_kn + kvh * stride_kh
        v_base = V + seq_start * stride_vn + kvh * stride_vh
        do_base = DO + seq_start * stride_dom + h * stride_doh
        dq_base = DQ + seq_start * stride_dqm + h * stride_dqh
        lse_base = Lse + seq_start + h * stride_lh
        delta_base = Delta + seq_start + h * stride_lh
    else:
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        do_base = DO + b * stride_dob + h * stride_doh
        dq_base = DQ + b * stride_dqb + h * stride_dqh
        lse_base = Lse + b * stride_lb + h * stride_lh
        delta_base = Delta + b * stride_lb + h * stride_lh
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    off = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    rows = start_m + offs_m
    row_ok = rows < q_len
    q_pos = off + rows
    start = tl.cast(start_m, tl.int64)
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + start * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :], mask=io_mask, other=0.0)
    do = tl.load(do_base + start * stride_dom + offs_m[:, None] * stride_dom + offs_d[None, :], mask=io_mask,
                 other=0.0)
    if HAS_SCALE:
        do = (do * tl.load(DoScale + h)).to(q.dtype)
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * _LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    k_tile_offs = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_tile_offs = offs_n[:, None] * stride_vn + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q_first = off + start_m
    q_end = off + tl.minimum(start_m + BLOCK_M, q_len)

    if SPARSE:
        SUB_N: tl.constexpr = SEL_BLOCK_K // BLOCK_N
        qb = start_m // SEL_BLOCK_Q
        row = Indices + b * stride_ib + h * stride_ih + qb * stride_iq
        count = tl.load(Counts + b * stride_cb + h * stride_ch + qb * stride_cq)
        j_next = tl.load(row, mask=count > 0, other=0)  # one entry ahead, as in the forward
        for t in range(0, count * SUB_N):
            j = j_next
            j_next = tl.load(row + (tl.minimum(t + 1, count * SUB_N - 1) // SUB_N) * stride_ik)
            start_n = j * SEL_BLOCK_K + (t % SUB_N) * BLOCK_N
            need_mask = start_n + BLOCK_N > k_len
            if IS_CAUSAL:
                need_mask = need_mask | (start_n + BLOCK_N - 1 > q_first)
            dq = _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, start_n, need_mask, k_tile_offs, v_tile_offs,
                              offs_n, d_ok, q_pos, k_len, qk_scale, stride_kn, stride_vn,
                              2, IS_CAUSAL, PAD_D, DOT_PREC)
    else:
        if IS_CAUSAL:
            n_full = tl.minimum((q_first + 1) // BLOCK_N, k_len // BLOCK_N)
            n_end = tl.cdiv(q_end, BLOCK_N)
        else:
            n_full = k_len // BLOCK_N
            n_end = tl.cdiv(k_len, BLOCK_N)
        for n in range(0, n_full):
            dq = _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, n * BLOCK_N, False, k_tile_offs, v_tile_offs,
                              offs_n, d_ok, q_pos, k_len, qk_scale, stride_kn, stride_vn,
                              0, IS_CAUSAL, PAD_D, DOT_PREC)
        for n in range(n_full, n_end):
            dq = _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, n * BLOCK_N, True, k_tile_offs, v_tile_offs,
                              offs_n, d_ok, q_pos, k_len, qk_scale, stride_kn, stride_vn,
                              1, IS_CAUSAL, PAD_D, DOT_PREC)

    dq = dq * sm_scale
    dq_ptrs = dq_base + start * stride_dqm + offs_m[:, None] * stride_dqm + offs_d[None, :]
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _sum_splits_kernel(Parts, DK, DV, splits, stride_which, stride_split, stride_pb, stride_ph, stride_pl,
                       stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, num_heads, length,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                       ACCUMULATE: tl.constexpr):
    """dK (grid axis 2 = 0) or dV (= 1) of a split dK/dV pass: the ``splits`` fp32 partials summed in
    a fixed order (deterministic), cast and stored in the gradient's own layout (added to what is
    there with ``ACCUMULATE``). ``Parts [2, splits, B, H, L, D]``."""
    pid_bh = tl.program_id(0).to(tl.int64)
    which = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    rows = (tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < length)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src = Parts + which * stride_which + b * stride_pb + h * stride_ph + rows[:, None] * stride_pl + offs_d[None, :]
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for split in range(0, splits):
        acc += tl.load(src + split * stride_split, mask=mask, other=0.0)
    if which == 0:
        dst = DK + b * stride_kb + h * stride_kh + rows[:, None] * stride_kl + offs_d[None, :]
        if ACCUMULATE:
            acc += tl.load(dst, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, acc.to(DK.dtype.element_ty), mask=mask)
    else:
        dst = DV + b * stride_vb + h * stride_vh + rows[:, None] * stride_vl + offs_d[None, :]
        if ACCUMULATE:
            acc += tl.load(dst, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, acc.to(DV.dtype.element_ty), mask=mask)


# ==================================================================================================
# Host launchers
# ==================================================================================================


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel.

    In sparse mode ``block_m`` / ``block_n`` are capped at the index's ``block_q`` / ``block_k``
    (so a tile never spans two selection blocks); in dense mode they are used as given.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    split_masked: bool = True  # sparse forward: unmasked prefix loop + masked suffix loop (else one masked loop)
    # Query-tile kernels (forward, dQ, vertical-slash): launch the programs of one KV head together
    # (its G query heads fastest, then the query tiles) instead of all heads of a few query tiles,
    # so the resident programs share K/V tiles in L2 (see _query_program; NOTES.md, run 10).
    kv_major: bool = True

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {value}")


@dataclass(frozen=True)
class AttentionConfigs:
    """Configs of the three kernels: forward, backward dK/dV and backward dQ.

    ``forward_narrow``: the forward tile for indices whose selection blocks are shorter than
    ``forward.block_m`` (e.g. 64-row blocks under a 128-row tile); ``None`` caps ``forward``.
    """

    forward: KernelConfig
    backward_dkdv: KernelConfig
    backward_dq: KernelConfig
    forward_narrow: KernelConfig | None = None

    def forward_for(self, block_index) -> KernelConfig:
        if block_index is not None and self.forward_narrow is not None and block_index.block_q < self.forward.block_m:
            return self.forward_narrow
        return self.forward


def _uniform_hints(t: torch.Tensor) -> bool:
    """Whether the kernels mark loaded loop bounds warp-uniform (``_warp_uniform``): compiled NVIDIA CUDA
    only (the hint is PTX; ROCm builds of torch also report ``is_cuda``)."""
    return t.is_cuda and torch.version.hip is None and not _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_configs(head_dim: int, dtype: torch.dtype, interpret: bool | None = None) -> AttentionConfigs:
    """The fixed config table: one entry per (head_dim, dtype) class; the only place tiles are chosen.

    GPU entries target the H100 (triton 3.6); a benchmark can sweep others by passing ``config=``
    to :func:`block_sparse_forward` / :func:`block_sparse_backward`. Under ``TRITON_INTERPRET=1``
    tiles are small so the interpreter stays fast.
    """
    if interpret is None:
        interpret = _interpreting()
    return _default_configs(head_dim, dtype, interpret)


@functools.lru_cache(maxsize=None)
def _default_configs(head_dim: int, dtype: torch.dtype, interpret: bool) -> AttentionConfigs:
    # Cached: every launch asks, and the table is fixed.
    if interpret:
        tile = KernelConfig(32, 32, num_warps=4, num_stages=1)
        return AttentionConfigs(tile, tile, tile)
    if dtype == torch.float32:  # exact fp32 dots run on CUDA cores: small tiles (tests, not speed)
        small = KernelConfig(16, 16, num_warps=4, num_stages=1)
        return AttentionConfigs(KernelConfig(32, 32, num_warps=4 if head_dim <= 64 else 8, num_stages=1), small, small)
    # fp16/bf16 on H100 (register and shared-memory use checked with ptxas for sm_90a; no spills
    # except a few bytes in the D=256 dQ kernel).
    if head_dim <= 64:
        return AttentionConfigs(
            forward=KernelConfig(128, 64, num_warps=4, num_stages=3),
            backward_dkdv=KernelConfig(32, 128, num_warps=8, num_stages=2),
            backward_dq=KernelConfig(128, 64, num_warps=8, num_stages=2),
        )
    if head_dim <= 128:
        # Measured on the H100 (benchmarks/NOTES.md, sweep): 128x128 forward tiles are 0.82x cuDNN
        # dense vs 0.78x for 128x64; dK/dV with 4 warps and 3 stages halves the backward time.
        # 64-row selection blocks: 64x64 tiles with 4 warps are 1.4x faster than with 8 and than
        # 128-row tiles over row pairs (run 8).
        return AttentionConfigs(
            forward=KernelConfig(128, 128, num_warps=8, num_stages=3),
            backward_dkdv=KernelConfig(32, 64, num_warps=4, num_stages=3),
            backward_dq=KernelConfig(128, 64, num_warps=8, num_stages=2),
            forward_narrow=KernelConfig(64, 64, num_warps=4, num_stages=3),
        )
    # head_dim 256: correct first; smaller tiles keep shared memory and registers in budget.
    return AttentionConfigs(
        forward=KernelConfig(64, 32, num_warps=8, num_stages=2),
        backward_dkdv=KernelConfig(32, 32, num_warps=8, num_stages=1),
        backward_dq=KernelConfig(32, 32, num_warps=8, num_stages=1),
    )


def check_out(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A caller's output buffer for ``like``'s result: same shape, dtype and device, unit last stride."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be {tuple(like.shape)} {like.dtype} on {like.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if out.stride(-1) != 1:
        raise ValueError(f"out must have a contiguous last dimension, got strides {out.stride()}")
    return out


def alloc_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """An output buffer: ``empty`` normally, NaN-filled when ``SPARSEATTN_NAN_FILL=1`` (tests).

    Without ``shape`` it copies ``like``'s layout (``empty_like``), so outputs keep q's strides.
    """
    poison = os.environ.get(NAN_FILL_ENV) == "1"
    if shape is None:
        return torch.full_like(like, float("nan"), dtype=dtype) if poison else torch.empty_like(like, dtype=dtype)
    dtype = dtype or like.dtype
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _sparse_tiles(cfg: KernelConfig, block_index: BlockIndex | None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, SEL_BLOCK_Q, SEL_BLOCK_K); the selection blocks are 1 (unused) when dense."""
    if block_index is None:
        return cfg.block_m, cfg.block_n, 1, 1
    return (min(cfg.block_m, block_index.block_q), min(cfg.block_n, block_index.block_k),
            block_index.block_q, block_index.block_k)


def _varlen_dims(q, cu_seqlens, max_seqlen):
    """(batch for the grid, q_len, k_len) in both layouts."""
    if cu_seqlens is None:
        return q.shape[0], q.shape[2], None
    if max_seqlen is None:  # one host read; pass max_seqlen to stay capturable
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return cu_seqlens.numel() - 1, max_seqlen, max_seqlen


def block_sparse_forward(q, k, v, block_index: BlockIndex | None = None, *, causal: bool = True,
                         scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                         max_seqlen: int | None = None, config: KernelConfig | None = None,
                         out: torch.Tensor | None = None):
    """Launch the forward kernel on validated inputs; returns ``(out, lse)``.

    ``out`` has q's shape, dtype and (when dense) strides; ``lse [B, Hq, Lq]`` fp32 natural log
    (``[1, Hq, total]`` for varlen). ``config`` overrides the table (for sweeps). ``out``: write
    into this buffer (q's shape and dtype, any strides with a unit last one, e.g. a head slice of a
    larger output) instead of a new one.
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    _, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cfg = config or default_configs(D, q.dtype, interpret=q.device.type == "cpu").forward_for(block_index)
    BLOCK_M, BLOCK_N, SEL_Q, SEL_K = _sparse_tiles(cfg, block_index)
    batch, grid_len, varlen_len = _varlen_dims(q, cu_seqlens, max_seqlen)
    out = alloc_output(q) if out is None else check_out(out, q)
    lse = alloc_output(q, (q.shape[0], Hq, Lq), torch.float32)
    if Lq == 0:
        return out, lse
    indices, counts = _index_tensors(block_index, q.device)
    grid = _query_grid(batch, Hq, Hkv, triton.cdiv(grid_len, BLOCK_M), cfg.kv_major)
    _fwd_kernel[grid](
        q, k, v, out, lse, indices, counts, cu_seqlens if cu_seqlens is not None else counts,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out), lse.stride(0), lse.stride(1),
        *indices.stride(), *counts.stride(),
        Hq, Hq // Hkv, varlen_len or Lq, varlen_len or Lk, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=_padded_head_dim(D), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        SEL_BLOCK_Q=SEL_Q, SEL_BLOCK_K=SEL_K,
        IS_CAUSAL=causal, SPARSE=block_index is not None, VARLEN=cu_seqlens is not None, REVERSE=causal,
        DOT_PREC=_dot_precision(q.dtype), MAX_MASKED=_max_masked_blocks(BLOCK_M, SEL_K),
        # Measured (NOTES.md, run 3): the split pays when a tile is a whole selection block and
        # costs 15% when each block is several tiles; split only in the first case.
        SPLIT_MASKED=cfg.split_masked and BLOCK_N == SEL_K, KV_MAJOR=cfg.kv_major, UNIFORM=_uniform_hints(q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _query_grid(batch: int, q_heads: int, kv_heads: int, num_tiles: int, kv_major: bool) -> tuple[int, int]:
    """The launch grid of a query-tile kernel, in ``_query_program``'s two layouts."""
    if kv_major:
        return (q_heads // kv_heads * num_tiles, batch * kv_heads)
    return (batch * q_heads, num_tiles)


def _max_masked_blocks(block_m: int, sel_block_k: int) -> int:
    """Bound on the selection blocks one query tile can need masks for, as a power of two.

    The tile's positions span at most ``cdiv(block_m, sel_block_k) + 1`` key blocks (the causal
    diagonal), and the partial last key block is among them or is the only one (non-causal).
    """
    return triton.next_power_of_2(-(-block_m // sel_block_k) + 1)


def _bhl(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of the batch, head and sequence dims of a `[B, H, L, D]` tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _index_tensors(index, device):
    """(indices, counts) of a Block/KeyMajor index, or 1-element dummies (never read) in dense mode."""
    if index is None:
        dummy = torch.empty(1, 1, 1, 1, dtype=torch.int32, device=device)
        return dummy, dummy[0]
    return index.indices, index.counts


def key_major_index(block_index: BlockIndex) -> KeyMajorIndex:
    """Transpose a ``BlockIndex`` on its device with no host sync: for each key block, the query
    blocks that read it, ascending. ``indices [B, H, nk, nq]`` int32 (-1 padded), ``counts [B, H, nk]``.

    Built from the block mask with a cumulative-sum scatter (no sort); works on ``B*H`` slices of
    bounded size so the temporaries stay small at long context.
    """
    indices, counts = block_index.indices, block_index.counts
    B, H, nq, width = indices.shape
    nk = block_index.num_k_blocks
    device = indices.device
    flat_idx = indices.reshape(B * H, nq, width)
    flat_cnt = counts.reshape(B * H, nq)
    out_idx = torch.empty(B * H, nk, nq, dtype=torch.int32, device=device)
    out_cnt = torch.empty(B * H, nk, dtype=torch.int32, device=device)
    chunk = max(1, (1 << 24) // max(1, nq * (nk + 1)))
    q_ids = torch.arange(nq, dtype=torch.int32, device=device)
    for s in range(0, B * H, chunk):
        idx = flat_idx[s:s + chunk]
        valid = torch.arange(width, device=device) < flat_cnt[s:s + chunk, :, None]
        # Invalid entries scatter into an extra column nk that is cut off afterwards.
        target = torch.where(valid, idx.long(), torch.full_like(idx, nk, dtype=torch.long))
        mask = torch.zeros(idx.shape[0], nq, nk + 1, dtype=torch.bool, device=device)
        mask.scatter_(-1, target, True)
        mask_t = mask[:, :, :nk].transpose(1, 2)  # [c, nk, nq]
        out_cnt[s:s + chunk] = mask_t.sum(-1, dtype=torch.int32)
        slot = torch.cumsum(mask_t.to(torch.int32), dim=-1, dtype=torch.int32) - 1
        slot = torch.where(mask_t, slot, torch.full_like(slot, nq)).long()
        packed = torch.full((idx.shape[0], nk, nq + 1), -1, dtype=torch.int32, device=device)
        packed.scatter_(-1, slot, q_ids.expand(idx.shape[0], nk, nq))
        out_idx[s:s + chunk] = packed[:, :, :nq]
    return KeyMajorIndex(out_idx.view(B, H, nk, nq), out_cnt.view(B, H, nk), block_index.block_q,
                         block_index.block_k, block_index.q_len, block_index.k_len)


# dK/dV of a sparse backward: key blocks whose query-block lists are long (the sink block's holds
# every query block) are split over programs of at most DKDV_SPLIT_ENTRIES list entries, in at most
# DKDV_MAX_SPLITS splits, while the fp32 partials stay under DKDV_SPLIT_BYTES.
DKDV_SPLIT_ENTRIES = 32
DKDV_MAX_SPLITS = 8
DKDV_SPLIT_BYTES = 1 << 30


def dkdv_splits(key_major: KeyMajorIndex, k: torch.Tensor) -> tuple[int, int]:
    """``(splits, entries per split)`` of the sparse dK/dV kernel, from shapes only (no host sync).

    The longest list is at most ``nq`` (all query blocks), so ``ceil(nq / DKDV_SPLIT_ENTRIES)``
    splits bound every program's work; programs past a list's end store zeros.
    """
    nq = max(1, key_major.indices.shape[-1])
    splits = min(DKDV_MAX_SPLITS, triton.cdiv(nq, DKDV_SPLIT_ENTRIES))
    partial_bytes = 2 * 4 * k.numel()  # one split's fp32 dK and dV
    splits = max(1, min(splits, DKDV_SPLIT_BYTES // max(1, partial_bytes)))
    return splits, triton.cdiv(nq, splits)


def block_sparse_backward(do, q, k, v, out, lse, block_index: BlockIndex | None = None, *, causal: bool = True,
                          scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                          max_seqlen: int | None = None, configs: AttentionConfigs | None = None,
                          key_major: KeyMajorIndex | None = None, do_scale: torch.Tensor | None = None,
                          accumulate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Launch the backward kernels; returns ``(dq, dk, dv)`` in the input dtypes.

    ``do_scale [Hq]`` fp32: the incoming gradient of query head ``h`` is ``do_scale[h] * do`` (a
    gated branch's share, applied as the kernels load ``do``; nothing is materialized).
    ``accumulate = (dq, dk, dv)``: add to these gradients (last dim contiguous, shapes of q, k, v)
    instead of allocating new ones, e.g. a second branch's gradients onto the first's, without
    extra sum kernels. Both are for ``sparseattn.training.attention``'s mixed attention.
    """
    q, k, v, out, do = (_last_dim_contiguous(t) for t in (q, k, v, out, do))
    _, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    configs = configs or default_configs(D, q.dtype, interpret=q.device.type == "cpu")
    batch, grid_len, varlen_len = _varlen_dims(q, cu_seqlens, max_seqlen)
    BLOCK_D = _padded_head_dim(D)
    if accumulate is not None:
        dq, dk, dv = accumulate
        if Lq == 0:
            return dq, dk, dv
    else:
        dq, dk, dv = alloc_output(q), alloc_output(k), alloc_output(v)
        if Lq == 0:
            return dq, dk.zero_(), dv.zero_()
    scaled = dict(HAS_SCALE=do_scale is not None)
    do_scale = do_scale if do_scale is not None else lse  # never read without HAS_SCALE
    common = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, IS_CAUSAL=causal, SPARSE=block_index is not None,
                  VARLEN=cu_seqlens is not None, DOT_PREC=_dot_precision(q.dtype))
    cu = cu_seqlens if cu_seqlens is not None else lse

    delta = alloc_output(lse)  # same [B, Hq, Lq] fp32 contiguous layout as lse
    pre_m = 32 if q.device.type == "cpu" else 64
    _bwd_preprocess_kernel[(q.shape[0] * Hq, triton.cdiv(Lq, pre_m))](
        out, do, delta, do_scale, *_bhl(out), *_bhl(do), Hq, Lq, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=pre_m,
        **scaled,
    )

    if block_index is not None and key_major is None:
        key_major = key_major_index(block_index)
    cfg = configs.backward_dkdv
    BLOCK_M, BLOCK_N, SEL_Q, SEL_K = _sparse_tiles(cfg, block_index)
    k_idx, k_cnt = _index_tensors(key_major, q.device)
    splits, split_len = (1, max(1, k_idx.shape[-1])) if key_major is None else dkdv_splits(key_major, k)
    if splits > 1:  # fp32 partials [2 (dK, dV), splits, *dk.shape], summed in a fixed order: deterministic
        parts = torch.empty((2, splits, *dk.shape), dtype=torch.float32, device=dk.device)
        dk_dst, dv_dst = parts[0, 0], parts[1, 0]
    else:
        dk_dst, dv_dst = dk, dv
    grid = (batch * Hkv, triton.cdiv(varlen_len or Lk, BLOCK_N), splits)
    _bwd_dkdv_kernel[grid](
        q, k, v, do, lse, delta, dk_dst, dv_dst, k_idx, k_cnt, cu, do_scale,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(do), *_bhl(dk_dst), *_bhl(dv_dst), lse.stride(0), lse.stride(1),
        *k_idx.stride(), *k_cnt.stride(),
        Hkv, Hq // Hkv, varlen_len or Lq, varlen_len or Lk, scale * LOG2E, scale, split_len,
        parts.stride(1) if splits > 1 else 0,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SEL_BLOCK_Q=SEL_Q, SEL_BLOCK_K=SEL_K,
        ACCUMULATE=accumulate is not None and splits == 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common, **scaled,
    )
    if splits > 1:
        red_l = 32 if q.device.type == "cpu" else 64
        _sum_splits_kernel[(dk.shape[0] * Hkv, triton.cdiv(dk.shape[2], red_l), 2)](
            parts, dk, dv, splits, parts.stride(0), parts.stride(1), *parts.stride()[2:5], *_bhl(dk), *_bhl(dv),
            Hkv, dk.shape[2], HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_L=red_l, ACCUMULATE=accumulate is not None,
        )

    cfg = configs.backward_dq
    BLOCK_M, BLOCK_N, SEL_Q, SEL_K = _sparse_tiles(cfg, block_index)
    indices, counts = _index_tensors(block_index, q.device)
    grid = _query_grid(batch, Hq, Hkv, triton.cdiv(grid_len, BLOCK_M), cfg.kv_major)
    _bwd_dq_kernel[grid](
        q, k, v, do, lse, delta, dq, indices, counts, cu, do_scale,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(do), *_bhl(dq), lse.stride(0), lse.stride(1),
        *indices.stride(), *counts.stride(),
        Hq, Hq // Hkv, varlen_len or Lq, varlen_len or Lk, scale * LOG2E, scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SEL_BLOCK_Q=SEL_Q, SEL_BLOCK_K=SEL_K, REVERSE=causal,
        KV_MAJOR=cfg.kv_major, ACCUMULATE=accumulate is not None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **common, **scaled,
    )
    return dq, dk, dv


# ==================================================================================================
# Autograd
# ==================================================================================================


def cached_key_major_index(block_index: BlockIndex) -> KeyMajorIndex:
    """:func:`key_major_index` of ``block_index``, computed once and kept on it.

    A ``BlockIndex`` is immutable, so its transpose is too: an index reused by many backward passes
    (training's sink + window index serves every layer of every step) is transposed once, which
    saves about fifteen small kernel launches per backward.
    """
    cached = block_index.__dict__.get("_key_major")
    if cached is None:
        cached = key_major_index(block_index)
        object.__setattr__(block_index, "_key_major", cached)  # a cache on a frozen dataclass
    return cached


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_index, causal, scale, cu_seqlens, max_seqlen):
        out, lse = block_sparse_forward(q, k, v, block_index, causal=causal, scale=scale,
                                        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.block_index, ctx.causal, ctx.scale, ctx.max_seqlen = block_index, causal, scale, max_seqlen
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        block_index = ctx.block_index
        key_major = None if block_index is None else cached_key_major_index(block_index)
        dq, dk, dv = block_sparse_backward(dout, q, k, v, out, lse, block_index, causal=ctx.causal,
                                           scale=ctx.scale, cu_seqlens=cu_seqlens, max_seqlen=ctx.max_seqlen,
                                           key_major=key_major)
        return dq, dk, dv, None, None, None, None, None


# ==================================================================================================
# Public function
# ==================================================================================================


def _is_pow2_at_least_16(x: int) -> bool:
    return x >= 16 and x & (x - 1) == 0


def _validate(q, k, v, block_index, causal, scale, cu_seqlens, max_seqlen):
    B, Hq, Hkv, Lq, Lk, D = check_qkv(q, k, v, causal=causal, names=("q", "k", "v"))
    check_scale(scale)
    if q.device.type == "cpu" and not _interpreting():
        raise RuntimeError("block_sparse_attention runs Triton kernels: it needs CUDA tensors, or TRITON_INTERPRET=1 "
                           "for CPU tensors (slow; sparseattn.sparse_attention falls back to the reference on CPU)")
    if D > 256:
        raise ValueError(f"head_dim must be <= 256, got {D}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor [num_seqs + 1] of cumulative lengths")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
        if B != 1 or Lq != Lk:
            raise ValueError(f"with cu_seqlens, q and k must be packed as [1, H, total, D] with one total length; "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if not causal:
            raise ValueError("cu_seqlens supports causal attention only (causal=True)")
        if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen <= 0):
            raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    elif max_seqlen is not None:
        raise ValueError("max_seqlen is only meaningful with cu_seqlens")
    if block_index is None:
        return
    if not isinstance(block_index, BlockIndex):
        raise TypeError(f"block_index must be a BlockIndex or None, got {type(block_index).__name__}")
    for name in ("block_q", "block_k"):
        if not _is_pow2_at_least_16(getattr(block_index, name)):
            raise ValueError(f"block_index.{name} must be a power of two >= 16, got {getattr(block_index, name)}")
    if block_index.device != q.device or block_index.counts.device != q.device:
        raise ValueError(f"block_index is on {block_index.device}, q on {q.device}")
    num_seqs = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if block_index.batch != num_seqs or block_index.num_heads != Hq:
        raise ValueError(f"block_index has (batch, heads) = {(block_index.batch, block_index.num_heads)}, expected "
                         f"{(num_seqs, Hq)} ({'sequences' if cu_seqlens is not None else 'batch'}, query heads)")
    if cu_seqlens is None:
        if (block_index.q_len, block_index.k_len) != (Lq, Lk):
            raise ValueError(f"block_index is for (q_len, k_len) = {(block_index.q_len, block_index.k_len)}, "
                             f"inputs have {(Lq, Lk)}")
    else:
        if block_index.q_len != block_index.k_len:
            raise ValueError("with cu_seqlens the block_index must have q_len == k_len (per-sequence blocks)")
        if max_seqlen is not None and (triton.cdiv(max_seqlen, block_index.block_q) != block_index.num_q_blocks
                                       or max_seqlen > block_index.k_len):
            raise ValueError(f"with cu_seqlens the block_index must have nq = ceil(max_seqlen / block_q) = "
                             f"{triton.cdiv(max_seqlen, block_index.block_q)} and k_len >= max_seqlen; got "
                             f"nq = {block_index.num_q_blocks}, k_len = {block_index.k_len}")


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: BlockIndex | None = None,
                           *, causal: bool = True, scale: float | None = None, return_lse: bool = False,
                           cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                           deterministic: bool = False):
    """Exact softmax attention over the key blocks of a ``BlockIndex`` (or all of them: dense mode).

    Args:
        q: `[B, Hq, Lq, D]` (fp16/bf16 on GPU; fp32 too, and CPU tensors under ``TRITON_INTERPRET=1``);
            the queries are the last `Lq` of the `Lk` positions (`Lq <= Lk` when causal). Any
            strides; head_dim <= 256.
        k, v: `[B, Hkv, Lk, D]`, `Hq % Hkv == 0`; query head `h` reads KV head `h // (Hq // Hkv)`.
        block_index: for query block `i` of `block_index.block_q` rows, the key blocks of
            `block_index.block_k` keys it attends to (`[B, Hq, nq, max_k]` ascending + counts);
            `None` (default) = dense attention, the fast path with no index.
        causal: mask `key_pos > query_pos` (default True).
        scale: softmax scale, default `1 / sqrt(D)`.
        return_lse: also return the natural-log log-sum-exp `[B, Hq, Lq]` fp32.
        cu_seqlens: `[N + 1]` int32 cumulative lengths of N sequences packed in `q, k, v [1, H, total, D]`
            (causal within each sequence). A ``block_index`` then has one row per sequence
            (`B == N`, `nq = ceil(max_seqlen / block_q)`, query-relative blocks).
        max_seqlen: longest sequence with ``cu_seqlens``; pass it to avoid a host sync.
        deterministic: accepted for API compatibility; the backward is always deterministic
            (dK/dV are accumulated per KV head without atomics).

    Returns:
        `out` with q's shape and dtype; with ``return_lse``, `(out, lse)`.
        Differentiable in q, k, v (dq, dk, dv over the same blocks).

    Example:
        >>> import torch
        >>> from sparseattn.index import BlockIndex
        >>> from sparseattn.kernels.block_sparse import block_sparse_attention
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU needs TRITON_INTERPRET=1
        >>> dt = torch.bfloat16 if dev == "cuda" else torch.float32
        >>> q = torch.randn(1, 4, 100, 64, device=dev, dtype=dt)
        >>> k, v = torch.randn(2, 1, 2, 100, 64, device=dev, dtype=dt)
        >>> index = BlockIndex.dense(1, 4, 100, 100, 64, 64, device=dev)
        >>> out = block_sparse_attention(q, k, v, index)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(
        ...     q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), is_causal=True)
        >>> bool(((out.float() - ref).norm() / ref.norm()) < 1e-2)
        True
    """
    _validate(q, k, v, block_index, causal, scale, cu_seqlens, max_seqlen)
    if cu_seqlens is not None and max_seqlen is None and block_index is not None:
        max_seqlen = block_index.q_len
    out, lse = _BlockSparseAttention.apply(q, k, v, block_index, causal, scale, cu_seqlens, max_seqlen)
    return (out, lse) if return_lse else out
