"""MInference's selection on the GPU: last-query estimation (Triton) and index building (torch + Triton).

The fp32 ground truth is ``sparseattn.reference.minference``; on inputs without near-ties the
indices built here are equal to it, entry for entry. Nothing here reads a value back to the host:
every shape is fixed by the input shapes and the configured sizes.

Levels (STYLE.md; selection has no gradient, so no autograd level): the ``@triton.jit`` kernels
``_row_lse_kernel``, ``_vertical_slash_sums_kernel`` (or ``_vertical_slash_sums_loop_kernel``),
(``_row_top_k_kernel``,) ``_cluster_scan_kernel``, ``_cluster_lookup_kernel`` and ``_fill_index_kernel``
-> their launchers (``last_query_scores_fast``, ``_top_sorted_fast``, ``_cluster_tables_triton``,
``fill_vertical_slash_index``) ->
``minference_select_fast`` (the public selector). MInference's block_sparse pattern:
``_block_top_k_kernel`` -> ``block_top_k_``, called by ``methods.minference.block_sparse_select_fast``
on chunks of pooled scores (section 4).

1. Estimation (two Triton launches). The last ``n = min(last_q, Lq)`` queries of each head against
   all keys, exactly as the reference: scale ``1/sqrt(D)``, causal, fp32 softmax. Launch one
   computes each row's log-sum-exp (online, key range split over programs, partials combined in
   torch). Launch two recomputes the scores and writes ``vertical[j] = sum_t p[t, j]`` and
   ``slash[o] = sum_t p[t, pos_t - o]`` without atomics: a program owns ``BLOCK_O`` consecutive
   keys ``J`` and the ``BLOCK_O`` offsets ``o = Lk - 1 - J`` (the offsets whose key *for the last
   row* is one of its keys). Row ``t`` meets offset ``o`` at key ``J - (n - 1 - t)``, so the
   program scores the window ``[J0 - BLOCK_O, J0 + BLOCK_O)`` and sums each diagonal with one
   ``tl.gather`` (row ``t`` shifted by ``n - 1 - t``). Scores cost ``2 x 2 Hq n Lk D`` FLOPs:
   2 x 69 GFLOP at 128K (Hq 32, D 128), ~0.3-0.5 ms of tensor-core time; nothing ``L x L`` exists.
   ``_vertical_slash_sums_loop_kernel`` (``SUMS_LOOP``, off until measured on the GPU) scores each
   key once: a program takes a run of blocks, and a block's diagonals gather from its own
   probabilities and the previous block's, carried over from the last iteration.

2. Top-k (torch). Forced keys/offsets set to +inf as the reference; ``torch.topk`` of the largest
   size over heads, then per-head sizes by masking; sorted ascending, padded with a sentinel.
   ``_row_top_k_kernel`` (``TOP_K_KERNEL``, off until measured on the GPU) does the same in one
   launch a score tensor: a radix select of each row's cut (three histogram passes), then the kept
   positions written in order, so no sort.

3. Index building. The reference merges, per query block, the ranges ``[p1 - o - bs + 1, +bs)`` of
   the sorted offsets into *clusters* (a new cluster where two starts differ by ``>= 2 bs``) and
   tiles each cluster on its own grid. Two facts make this cheap:

   - A cluster's kept tiles are *contiguous*: gaps inside a cluster are shorter than a tile, so
     every grid tile between its first and last range touches one. A cluster is therefore one
     run of ``n_c = floor((O_max - o_min + bs - 1) / bs) + 1`` tiles starting at its largest
     offset's range.
   - Cluster boundaries depend on offset gaps only, not on the query block. Written in
     ``kappa = p1 - key`` coordinates, every cluster's run is the same for every query block,
     except at the low-key edge: offsets ``> p1`` are invalid and offsets in
     ``(p1 - bs + 1, p1]`` clip to key 0 (anchoring that cluster at key 0, which can also merge
     it with the next cluster down).

   So per head (``O(ns)``): cluster ids, ``o_min``/``O_max`` per cluster, tile counts and their
   prefix sums, the list of every cluster's tiles (ascending ``kappa``), and a map
   ``kappa -> cluster id`` of the runs. Per query block (``O(nq log ns)``): two searches of the
   sorted offsets give the valid and the clipped offsets, from which
   the edge cluster's run (start ``A_e``, ``n_e`` tiles) and the number ``N_int`` of interior
   tiles (all clusters below the edge, a prefix of the tile list) follow in closed form. The Triton
   fill kernel then writes, per (head, query block), the ranges ``A_e + r bs`` (edge) and
   ``p1 - tau - bs + 1`` (interior tiles, read from the list) and the columns: the verticals
   ``j <= p1`` that lie neither in the edge run nor in an interior run (one lookup in the map),
   compacted with a prefix sum. Its cost is the output itself: ``B Hq nq (min(2 ns, nk) + nv)``
   int32 written once (800 MB at 128K with the default sizes and bs 64, ~0.3 ms of HBM time).
   On the GPU the tables are two launches (``_cluster_tables_triton``): one program per head holds
   its offsets in registers and derives the per-cluster values by prefix scans (a cluster of ``m``
   offsets spans at most ``2 m`` tiles, so its ``j``-th offset writes tiles ``2 j`` and ``2 j + 1``);
   then one program per 1024 positions bisects those for the map and the per-block values. The
   torch builders (``_cluster_tables``, ``_block_params``: ~80 small ops, a difference array and
   ``searchsorted``) serve CPU tensors and more than ``MAX_SCAN_OFFSETS`` slashes a head.

4. Block-sparse top-k (one Triton launch per chunk of pooled scores). A row of ``nk`` block scores
   (``mean(q block) . mean(k block) / sqrt(D)``, fp32) is held in registers as order-preserving int32
   keys; the ``top``-th largest key is found by bisection (at most 32 counting passes, no sort), the
   ties at that cut are taken lowest block first with a prefix sum (the reference's stable order),
   block 0 and the diagonal blocks are added, and the row is written ascending with one more prefix
   sum. At 128K on 64-blocks a row is 2048 keys, 16 per thread; ``torch.topk`` and the sorts it
   replaced spent ~15 launches per chunk (run 20f: host-bound at 19 ms for 32 heads).

Measured at 128K (H100, Hq 32, D 128, defaults; NOTES.md run 22): ~45 launches, 3.6 ms of GPU time
(1.4-1.5% of cuDNN dense), of which the vertical and slash sums are ~1.1 ms, the log-sum-exp
0.14 ms, ``torch.topk`` and the sorts ~0.4 ms, and the fill ~0.3 ms.

``backend="torch"`` (the default for CPU tensors) runs the same building with torch gathers instead
of the fill kernel, after the reference's fp32 estimation: exact and fast for short inputs, memory
``O(B Hq nq (nk + nv))``. ``tl.gather`` needs Triton >= 3.3; with an older Triton the estimation
falls back to the reference's (torch) sums.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..index import VerticalSlashIndex, cdiv
from ..reference.minference import (
    FORCED_SLASHES,
    FORCED_VERTICALS,
    adaptive_sizes,
    last_query_scores,
    per_head_sizes,
    selection_sizes,
)
from ..reference.xattention import check_qk

__all__ = ["VerticalSlashTables", "block_top_k_", "fill_vertical_slash_index", "last_query_scores_fast",
           "minference_select_fast", "minference_tables_fast", "vertical_slash_index_fast", "vertical_slash_tables"]

LOG2E = 1.4426950408889634
_BIG_OFFSET = 1 << 40  # sorts after every real offset; gaps to it start a new (empty) cluster
BIG_OFFSET: tl.constexpr = tl.constexpr(_BIG_OFFSET)  # the same, inside kernels
_BIG_KEY = 1 << 30  # padding of the sorted vertical keys (int32), after every real key
# tl.gather (the diagonal sums) exists from Triton 3.3; older Tritons estimate in torch instead.
HAS_GATHER = hasattr(tl, "gather")


# Same switch as block_sparse.py: "1" allocates outputs poisoned (NaN, or -2**31 for ints) so tests
# catch any entry a kernel never writes.
NAN_FILL_ENV = "SPARSEATTN_NAN_FILL"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _alloc(*shape, dtype, device) -> torch.Tensor:
    if os.environ.get(NAN_FILL_ENV) != "1":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -2**31, dtype=dtype, device=device)


# ==================================================================================================
# Triton kernels
# ==================================================================================================


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs need "ieee" to match the fp32 reference (tf32 keeps 10 mantissa bits); bf16/fp16
    # products are exact in fp32 with the default precision.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _row_lse_kernel(
    Q, K, KvHead, MaxOut, SumOut,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    num_heads, q_first, n_rows, k_len, keys_per_split, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, N_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):
    """Online max / sum (log2 units) of ``ROWS`` estimation rows over one split of the keys."""
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    r0 = tl.program_id(2) * ROWS
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kvh = tl.load(KvHead + h)  # the KV head of query head h (GQA, or a subset of heads)
    offs_t = r0 + tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_t < n_rows
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_first + offs_t).to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [ROWS, BLOCK_D]
    pos = k_len - n_rows + offs_t  # absolute position of each row
    k_base = K + b * stride_kb + kvh * stride_kh
    k_begin = split * keys_per_split
    k_end = tl.minimum(k_begin + keys_per_split, k_len)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(k_begin, k_end, BLOCK_N):
        k_pos = start + offs_n  # [BLOCK_N]
        k_ok = k_pos < k_end
        k = tl.load(k_base + k_pos.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        s = _dot(q, tl.trans(k), IEEE) * qk_scale  # [ROWS, BLOCK_N]
        keep = k_ok[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            keep = keep & (k_pos[None, :] <= pos[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: no NaN
        l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(tl.math.exp2(s - m_sub[:, None]), 1)
        m_i = m_new
    out = (pid_bh * tl.num_programs(1) + split) * N_ROWS + offs_t
    tl.store(MaxOut + out, m_i)
    tl.store(SumOut + out, l_i)


@triton.jit
def _vertical_slash_sums_kernel(
    Q, K, KvHead, Lse, Vertical, Slash,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    num_heads, q_first, n_rows, k_len, n_off, min_offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, N_ROWS: tl.constexpr,
    BLOCK_O: tl.constexpr, IS_CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):
    """Column sums of keys ``[J0, J0 + BLOCK_O)`` and diagonal sums of offsets ``Lk - 1 - J`` for those keys."""
    W: tl.constexpr = 2 * BLOCK_O
    pid_bh = tl.program_id(0).to(tl.int64)
    j0 = tl.program_id(1) * BLOCK_O
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kvh = tl.load(KvHead + h)  # the KV head of query head h (GQA, or a subset of heads)
    offs_w = tl.arange(0, W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_pos = j0 - BLOCK_O + offs_w  # [W]: the left half feeds the diagonals of the right half
    k_ok = (k_pos >= 0) & (k_pos < k_len)
    k = tl.load(K + b * stride_kb + kvh * stride_kh + k_pos.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [W, BLOCK_D]
    col = tl.zeros([W], dtype=tl.float32)
    diag = tl.zeros([W], dtype=tl.float32)
    for r0 in tl.static_range(0, N_ROWS, ROWS):
        offs_t = r0 + tl.arange(0, ROWS)
        row_ok = offs_t < n_rows
        q_rows = (q_first + offs_t).to(tl.int64)
        q = tl.load(Q + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [ROWS, BLOCK_D]
        lse = tl.load(Lse + pid_bh * N_ROWS + offs_t, mask=row_ok, other=0.0)  # [ROWS], log2 units
        s = _dot(q, tl.trans(k), IEEE) * qk_scale  # [ROWS, W]
        keep = row_ok[:, None] & k_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (k_pos[None, :] <= (k_len - n_rows + offs_t)[:, None])
        p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)  # exact probabilities
        col += tl.sum(p, 0)
        # Row t meets the offset of column w (for the last row) at column w - (n - 1 - t).
        src = offs_w[None, :] - (n_rows - 1 - offs_t)[:, None]  # [ROWS, W]
        shifted = tl.gather(p, tl.minimum(tl.maximum(src, 0), W - 1), axis=1)
        diag += tl.sum(tl.where((src >= 0) & (src < W), shifted, 0.0), 0)
    own = offs_w >= BLOCK_O
    tl.store(Vertical + pid_bh * k_len + k_pos, col, mask=own & (k_pos < k_len))
    slot = k_len - 1 - min_offset - k_pos  # slash index of the offset o = Lk - 1 - J
    tl.store(Slash + pid_bh * n_off + slot, diag, mask=own & (slot >= 0))


@triton.jit
def _probs_tile(q, lse, k_base, stride_kn, j0, offs_o, offs_d, d_ok, row_ok, pos, k_len, qk_scale,
                IS_CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """``[rows, BLOCK_O]`` exact probabilities of the estimation rows against keys ``j0 + offs_o``."""
    k_pos = j0 + offs_o
    k_ok = (k_pos >= 0) & (k_pos < k_len)
    k = tl.load(k_base + k_pos.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_O, BLOCK_D]
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    keep = row_ok[:, None] & k_ok[None, :]
    if IS_CAUSAL:
        keep = keep & (k_pos[None, :] <= pos[:, None])
    return tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _vertical_slash_sums_loop_kernel(
    Q, K, KvHead, Lse, Vertical, Slash,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    num_heads, q_first, n_rows, k_len, n_off, min_offset, qk_scale, blocks_per_program,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, N_ROWS: tl.constexpr, BLOCK_O: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):
    """``_vertical_slash_sums_kernel``'s sums over a run of ``blocks_per_program`` key blocks: each
    block's probabilities are computed once (not twice, as the left half of a window) and carried to
    the next block, whose diagonals reach back into them. Needs ``N_ROWS <= BLOCK_O``."""
    pid_bh = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * blocks_per_program * BLOCK_O
    last = tl.minimum(first + blocks_per_program * BLOCK_O, n_off)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kvh = tl.load(KvHead + h)
    offs_t = tl.arange(0, N_ROWS)
    offs_o = tl.arange(0, BLOCK_O)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_t < n_rows
    q = tl.load(Q + b * stride_qb + h * stride_qh + (q_first + offs_t).to(tl.int64)[:, None] * stride_qm
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [N_ROWS, BLOCK_D]
    lse = tl.load(Lse + pid_bh * N_ROWS + offs_t, mask=row_ok, other=0.0)
    pos = k_len - n_rows + offs_t
    k_base = K + b * stride_kb + kvh * stride_kh
    # Row t meets the offset of key J at key J - (n - 1 - t): up to n - 1 <= BLOCK_O keys back.
    # (Padding rows t >= n hold zeros; their indices are only kept in bounds.)
    src = offs_o[None, :] - (n_rows - 1 - offs_t)[:, None]  # [N_ROWS, BLOCK_O], real rows: [1 - n, BLOCK_O)
    here = src >= 0
    idx_here = tl.minimum(tl.maximum(src, 0), BLOCK_O - 1)
    idx_back = tl.minimum(tl.maximum(src + BLOCK_O, 0), BLOCK_O - 1)
    p_prev = _probs_tile(q, lse, k_base, stride_kn, first - BLOCK_O, offs_o, offs_d, d_ok, row_ok, pos, k_len,
                         qk_scale, IS_CAUSAL, IEEE)
    for j0 in range(first, last, BLOCK_O):
        p = _probs_tile(q, lse, k_base, stride_kn, j0, offs_o, offs_d, d_ok, row_ok, pos, k_len, qk_scale,
                        IS_CAUSAL, IEEE)
        k_pos = j0 + offs_o
        tl.store(Vertical + pid_bh * k_len + k_pos, tl.sum(p, 0), mask=k_pos < k_len)
        diag = tl.where(here, tl.gather(p, idx_here, axis=1), tl.gather(p_prev, idx_back, axis=1))
        slot = k_len - 1 - min_offset - k_pos  # slash index of the offset o = Lk - 1 - J
        tl.store(Slash + pid_bh * n_off + slot, tl.sum(diag, 0), mask=slot >= 0)
        p_prev = p


@triton.jit
def _fill_index_kernel(
    Params, Tiles, ClusterMap, Keys, OutHead, RangeStarts, RangeCounts, Columns, ColumnCounts,
    num_heads, nq, width_r, num_cols, tiles_width, k_len,
    r_b, r_h, r_q, c_b, c_h, c_q, n_b, n_h,
    BS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Ranges and columns of one (batch x head, query block): edge run, interior tiles, free verticals,
    written in output head ``OutHead[head]`` (strides ``r_*`` ranges, ``c_*`` columns, ``n_*`` counts)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    qb = tl.program_id(1)
    row = pid_bh * nq + qb
    out_h = tl.load(OutHead + pid_bh % num_heads)
    b = pid_bh // num_heads
    prm = Params + row * 8
    count = tl.load(prm)
    n_e = tl.load(prm + 1)
    a_e = tl.load(prm + 2)
    n_int = tl.load(prm + 3)
    p1 = tl.load(prm + 4)
    kappa_lo = tl.load(prm + 5)
    kappa_hi = tl.load(prm + 6)
    c_star = tl.load(prm + 7)

    # Ranges: the edge run first (lowest keys), then interior tiles by descending kappa.
    r_out = RangeStarts + b * r_b + out_h * r_h + qb * r_q
    t_in = Tiles + pid_bh * tiles_width
    for r0 in range(0, width_r, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        interior = (r >= n_e) & (r < count)
        tau = tl.load(t_in + (n_int - 1 - (r - n_e)), mask=interior, other=0)
        start = tl.where(r < n_e, a_e + r * BS, tl.where(interior, p1 - tau - BS + 1, -1))
        tl.store(r_out + r, start, mask=r < width_r)
    n_out = b * n_b + out_h * n_h + qb
    tl.store(RangeCounts + n_out, count)

    # Columns: verticals at or before the block's last row, outside the edge run and interior runs.
    c_out = Columns + b * c_b + out_h * c_h + qb * c_q
    k_in = Keys + pid_bh * num_cols
    m_in = ClusterMap + pid_bh * k_len
    kept = tl.sum(tl.zeros([BLOCK_C], dtype=tl.int32), 0)  # an int32 scalar tensor (loop-carried)
    for c0 in range(0, num_cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        key = tl.load(k_in + c, mask=c < num_cols, other=2147483647)
        valid = (c < num_cols) & (key <= p1) & (key < k_len)
        kappa = p1 - key
        cluster = tl.load(m_in + kappa, mask=valid, other=0)  # 1 + id of the run holding kappa, 0: none
        in_edge = (kappa >= kappa_lo) & (kappa <= kappa_hi)
        in_interior = (cluster >= 1) & (cluster <= c_star)
        keep = (valid & ~in_edge & ~in_interior).to(tl.int32)
        slot = kept + tl.cumsum(keep, 0) - keep
        tl.store(c_out + slot, key, mask=keep != 0)
        kept += tl.sum(keep, 0)
    for c0 in range(0, num_cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        tl.store(c_out + c, tl.full([BLOCK_C], -1, tl.int32), mask=(c >= kept) & (c < num_cols))
    tl.store(ColumnCounts + n_out, kept)


@triton.jit
def _max_op(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_op(a, b):
    return tl.minimum(a, b)


@triton.jit
def _cluster_scan_kernel(
    Offsets, Elem, Tiles, ns, k_len,
    BS: tl.constexpr, BLOCK: tl.constexpr,
):
    """``_cluster_tables``' per-element part for one (batch x head) row of ascending offsets, held in
    registers: cluster ids and bounds by scans, each element's run bounds in ``kappa``, and the tile
    list written directly (a cluster of ``m`` offsets spans at most ``2 m`` tiles: its ``j``-th
    offset writes the cluster's tiles ``2 j`` and ``2 j + 1``)."""
    pid = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < ns
    row = Offsets + pid * ns
    # int32 from here (fewer registers): the padding becomes PAD, still 2 bs or more past every real offset.
    PAD: tl.constexpr = 1 << 30
    off = tl.minimum(tl.load(row + i, mask=ok, other=BIG_OFFSET), PAD).to(tl.int32)
    prev = tl.minimum(tl.load(row + i - 1, mask=ok & (i > 0), other=0), PAD).to(tl.int32)
    nxt = tl.minimum(tl.load(row + i + 1, mask=i + 1 < ns, other=BIG_OFFSET), PAD).to(tl.int32)
    real = off < PAD
    new = (i == 0) | (off - prev >= 2 * BS)  # a gap of 2 bs or more starts a cluster
    is_end = (i + 1 >= ns) | (nxt - off >= 2 * BS)
    cid = tl.cumsum(new.to(tl.int32), 0) - 1
    o_min = tl.associative_scan(tl.where(new, off, -1), 0, _max_op)
    first = tl.associative_scan(tl.where(new, i, -1), 0, _max_op)  # the cluster's first element
    o_max = tl.associative_scan(tl.where(is_end & ok, off, 2147483647), 0, _min_op, reverse=True)
    n_tiles = tl.where(real, (o_max - o_min + BS - 1) // BS + 1, 0)
    at_end = tl.where(is_end & ok, n_tiles, 0)
    n_before = tl.cumsum(at_end, 0) - at_end  # tiles of the clusters before this one
    total = tl.sum(at_end, 0)
    lo = tl.where(real, tl.minimum(tl.maximum(o_max - (n_tiles - 1) * BS, 0), k_len), k_len)
    hi = tl.where(real, tl.minimum(o_max + BS, k_len), k_len)
    out = Elem + pid * 6 * ns
    tl.store(out + i, cid, mask=ok)
    tl.store(out + ns + i, o_min, mask=ok)
    tl.store(out + 2 * ns + i, n_before, mask=ok)
    tl.store(out + 3 * ns + i, n_tiles, mask=ok)
    tl.store(out + 4 * ns + i, lo, mask=ok)  # ascending: runs are disjoint and ordered as the clusters
    tl.store(out + 5 * ns + i, hi, mask=ok)
    t_out = Tiles + pid * 2 * ns
    for t in tl.static_range(2):
        r = 2 * (i - first) + t  # the tile's rank in its cluster
        tau = o_max - (n_tiles - 1 - r) * BS
        tl.store(t_out + n_before + r, tau, mask=ok & real & (r < n_tiles))
        p = 2 * i + t  # positions past every cluster's tiles are zero
        tl.store(t_out + p, tl.zeros([BLOCK], tl.int32), mask=(p >= total) & (p < 2 * ns))


@triton.jit
def _count_le(Row, n, x, STEPS: tl.constexpr):
    """Per lane, the number of entries ``<= x`` of the ascending ``Row[0:n]`` (``n < 2**STEPS``):
    ``searchsorted(right=True)`` by bisection, one gathered load a step."""
    pos = tl.zeros(x.shape, tl.int32)
    for s in tl.static_range(STEPS - 1, -1, -1):
        cand = pos + (1 << s)
        v = tl.load(Row + cand - 1, mask=cand <= n)
        pos = tl.where((cand <= n) & (v <= x), cand, pos)
    return pos


@triton.jit
def _at(Table, count):
    """``Table[count - 1]``: an element table at the largest element of a prefix (``count >= 1``)."""
    return tl.load(Table + tl.maximum(count - 1, 0))


@triton.jit
def _cluster_lookup_kernel(
    Offsets, Elem, ClusterMap, Params, ns, q_len, k_len, nq, map_blocks,
    BS: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr,
):
    """The position-indexed tables of one (batch x head) row, ``BLOCK`` positions a program, by
    bisection over the element tables: first the ``kappa -> 1 + cluster id`` map (``map_blocks``
    programs), then each query block's closed-form parameters (``_block_params``)."""
    pid = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    row = Offsets + pid * ns
    elem = Elem + pid * 6 * ns
    cid, o_min, n_before, n_tiles = elem, elem + ns, elem + 2 * ns, elem + 3 * ns
    if blk < map_blocks:
        kappa = blk * BLOCK + tl.arange(0, BLOCK)
        c = _count_le(elem + 4 * ns, ns, kappa, STEPS)  # the last run starting at or before kappa
        inside = (c > 0) & (kappa < _at(elem + 5 * ns, c))
        label = tl.where(inside, _at(cid, c) + 1, 0)
        tl.store(ClusterMap + pid * k_len + kappa, label, mask=kappa < k_len)
    else:
        qb = (blk - map_blocks) * BLOCK + tl.arange(0, BLOCK)
        p1 = (k_len - q_len) + tl.minimum((qb + 1) * BS, q_len) - 1
        i0 = _count_le(row, ns, p1.to(tl.int64), STEPS)  # offsets <= p1 are valid
        i1 = _count_le(row, ns, (p1 - BS + 1).to(tl.int64), STEPS)  # offsets <= p1 - bs + 1 are not clipped
        has = i0 > 0
        clipped = i1 < i0  # the edge cluster starts at key 0
        a_top = p1 - _at(row, i0).to(tl.int32) - BS + 1
        u = p1 - _at(row, i1).to(tl.int32) - BS + 1
        merged = (i1 > 0) & (u < 2 * BS)
        a_e = tl.where(clipped, 0, a_top)
        o_low = tl.where(clipped, _at(o_min, i1), _at(o_min, i0))
        n_e = tl.where(clipped & ~merged, 1, (p1 - o_low - a_e) // BS + 1)
        cid1 = _at(cid, i1)
        below = tl.where(i1 > 0, cid1 + 1, 0)
        below_tiles = tl.where(i1 > 0, _at(n_before, i1) + _at(n_tiles, i1), 0)
        c_star = tl.where(clipped, tl.where(merged, cid1, below), _at(cid, i0))
        n_int = tl.where(clipped, tl.where(merged, _at(n_before, i1), below_tiles), _at(n_before, i0))
        out = Params + (pid * nq + qb) * 8
        ok = qb < nq
        tl.store(out, tl.where(has, n_e + n_int, 0), mask=ok)
        tl.store(out + 1, n_e, mask=ok)
        tl.store(out + 2, a_e, mask=ok)
        tl.store(out + 3, n_int, mask=ok)
        tl.store(out + 4, p1, mask=ok)
        tl.store(out + 5, tl.where(has, p1 - a_e - n_e * BS + 1, 0), mask=ok)
        tl.store(out + 6, tl.where(has, p1 - a_e, -1), mask=ok)
        tl.store(out + 7, tl.where(has, c_star, 0), mask=ok)


@triton.jit
def _order_key(x):
    """fp32 -> int32 keys in the same order (``-0.0`` and ``+0.0`` one key; no NaN)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _bisect_cut(key, allowed, k):
    """The ``k``-th largest of ``key[allowed]`` (``1 <= k <=`` their count), by bisecting the int32
    key space: up to 32 counting passes, stopping at a threshold that counts exactly ``k`` (nothing
    ties across it, so it selects the same keys as the k-th largest itself)."""
    lo = tl.min(tl.where(allowed, key, 2147483647), 0).to(tl.int64)  # #(key >= lo) >= k
    hi = tl.max(key, 0).to(tl.int64)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        n_ge = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0)
        if n_ge == k:
            lo = mid
            hi = mid
        elif n_ge > k:
            lo = mid
        else:
            hi = mid - 1
    return lo.to(tl.int32)


@triton.jit
def _block_top_k_kernel(
    Scores, Top, OutHead, Indices, Counts,
    n_rows, nk, width, q_len, k_len, sqrt_d, s_b, s_h, s_r, i_b, i_h, i_r, c_b, c_h, head0, row0,
    BS: tl.constexpr, UNIT: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query block's key blocks: its ``top`` highest-scoring allowed blocks (ties: lower block
    first), key block 0 and its diagonal blocks, ascending, times ``UNIT`` (1: block numbers; the
    block size: range starts), ``-1`` padded to ``width``, in output head ``OutHead[head]``.

    The top-k is a selection, not a sort: the ``top``-th largest score over the scores'
    order-preserving int32 keys, held in registers (``_bisect_cut``), then the ties at that cut taken
    lowest block first with a prefix sum, as the reference's stable sort does. Three alternatives
    measured no faster on the H100: a radix select (8 passes of a 16-bin histogram; 1.3-1.9x
    slower, NOTES run 22b), a 5-way search (4 thresholds a pass in one packed reduction; within
    noise of bisection, run 22d) and an interpolation search of ~40% fewer passes with the tie
    prefix sum skipped where no ties split (within noise, run 23c).
    """
    pid_hr = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    h = pid_hr // n_rows
    r = pid_hr % n_rows
    qb = row0 + r
    cols = tl.arange(0, BLOCK_N)
    # Diagonal key blocks of query block qb (index.diagonal_block_range).
    off = k_len - q_len
    first = (off + qb * BS) // BS
    last = (off + tl.minimum((qb + 1) * BS, q_len) - 1) // BS
    allowed = cols < nk
    if IS_CAUSAL:
        allowed = allowed & (cols <= last)
    x = tl.load(Scores + pid_b * s_b + h.to(tl.int64) * s_h + r.to(tl.int64) * s_r + cols, mask=allowed, other=0.0)
    x = tl.math.div_rn(x, sqrt_d)  # the reference's "/ sqrt(D)", correctly rounded
    # -0.0 ties with +0.0 in the reference's sort: one key for both.
    key = tl.where(allowed, _order_key(x), -2147483648)  # below every real key (-inf maps above it)
    n_allowed = tl.sum(allowed.to(tl.int32), 0)
    k = tl.minimum(tl.load(Top + head0 + h), n_allowed)
    cut = _bisect_cut(key, allowed, tl.maximum(k, 1))
    # top 0: a cut above every key (the largest, +inf, is 0x7F800000) keeps none.
    cut = tl.where(k > 0, cut, 2147483647)
    above = allowed & (key > cut)
    tied = allowed & (key == cut)
    need = k - tl.sum(above.to(tl.int32), 0)
    top = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= need))
    forced = (cols == 0) | ((cols >= first) & (cols <= last))
    keep = top | (forced & allowed)
    kept = keep.to(tl.int32)
    slot = tl.cumsum(kept, 0) - kept
    count = tl.sum(kept, 0)
    out_h = tl.load(OutHead + head0 + h)
    out = Indices + pid_b * i_b + out_h * i_h + qb.to(tl.int64) * i_r
    tl.store(out + slot, cols * UNIT, mask=keep)
    for c0 in range(0, width, BLOCK_N):  # the padding (the output may be wider than a row of blocks)
        c = c0 + cols
        tl.store(out + c, tl.full([BLOCK_N], -1, tl.int32), mask=(c >= count) & (c < width))
    tl.store(Counts + pid_b * c_b + out_h * c_h + qb, count)


@triton.jit
def _radix_bin(hist, k, BINS: tl.constexpr):
    """The bin of a histogram (higher bins = larger keys) that holds the ``k``-th largest key, and ``k``
    within that bin (``k`` less the keys of the bins above it)."""
    idx = tl.arange(0, BINS)
    above_or_in = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys in bins >= idx
    b = tl.max(tl.where(above_or_in >= k, idx, -1), 0)
    return b, k - tl.sum(tl.where(idx > b, hist, 0), 0)


@triton.jit
def _row_top_k_kernel(Scores, Sizes, Out, num_heads, length, width, pad, s_row, o_row, BLOCK: tl.constexpr):
    """One row's ``Sizes[head]`` highest scores: their positions ascending, then ``pad`` up to ``width``.

    A radix select of the cut: three passes over the row, each a histogram of the next 11, 11 and
    10 bits of the order-preserving key (``_order_key``; its top 11 bits shifted to 0..2047) among
    the keys that share the bits already fixed. That gives the cut key exactly, and how many keys
    equal to it are kept. A fourth pass writes the positions of the keys above the cut and of the
    first ties at it, in position order (a prefix sum), so they come out ascending with no sort.
    Ties at the cut are kept lowest position first, as a stable descending sort would.
    """
    row = tl.program_id(0).to(tl.int64)
    k = tl.load(Sizes + row % num_heads).to(tl.int32)
    src = Scores + row * s_row
    out = Out + row * o_row
    offs = tl.arange(0, BLOCK)
    # 1-3. The cut's bits 21-31 (signed: -1024..1023, binned from 0), 10-20, then 0-9.
    hist = tl.zeros([2048], dtype=tl.int32)
    for start in range(0, length, BLOCK):
        ok = start + offs < length
        key = _order_key(tl.load(src + start + offs, mask=ok, other=0.0))
        hist += tl.histogram((key >> 21) + 1024, 2048, mask=ok)
    b1, k = _radix_bin(hist, k, 2048)
    top = b1 - 1024
    hist = tl.zeros([2048], dtype=tl.int32)
    for start in range(0, length, BLOCK):
        ok = start + offs < length
        key = _order_key(tl.load(src + start + offs, mask=ok, other=0.0))
        hist += tl.histogram((key >> 10) & 0x7FF, 2048, mask=ok & ((key >> 21) == top))
    b2, k = _radix_bin(hist, k, 2048)
    prefix = top * 2048 + b2  # the cut's key >> 10
    hist3 = tl.zeros([1024], dtype=tl.int32)
    for start in range(0, length, BLOCK):
        ok = start + offs < length
        key = _order_key(tl.load(src + start + offs, mask=ok, other=0.0))
        hist3 += tl.histogram(key & 0x3FF, 1024, mask=ok & ((key >> 10) == prefix))
    b3, need = _radix_bin(hist3, k, 1024)
    cut = prefix * 1024 + b3
    # 4. The kept positions in order: above the cut, and the first `need` ties at it.
    written = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0)  # int32 scalars carried through the loop
    ties = written
    for start in range(0, length, BLOCK):
        pos = start + offs
        ok = pos < length
        key = _order_key(tl.load(src + pos, mask=ok, other=0.0))
        tie = (ok & (key == cut)).to(tl.int32)
        keep = (ok & (key > cut)) | ((tie != 0) & (ties + tl.cumsum(tie, 0) - tie < need))
        kept = keep.to(tl.int32)
        tl.store(out + written + tl.cumsum(kept, 0) - kept, pos.to(Out.dtype.element_ty), mask=keep)
        written += tl.sum(kept, 0)
        ties += tl.sum(tie, 0)
    for start in range(0, width, BLOCK):
        c = start + offs
        tl.store(out + c, (tl.zeros([BLOCK], dtype=tl.int64) + pad).to(Out.dtype.element_ty),
                 mask=(c >= written) & (c < width))


# ==================================================================================================
# Launchers
# ==================================================================================================


def _pow2(x: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(x))


# Key blocks per row that ``block_top_k_`` holds in registers (2M tokens at 64-blocks); longer rows
# take block_sparse_select_fast's torch path.
MAX_TOP_K_BLOCKS = 1 << 15
# Warps per row program by row width (power of two), where measured (benchmarks/bench_block_top_k.py).
BLOCK_TOP_K_WARPS: dict[int, int] = {}


def block_top_k_(scores: torch.Tensor, top: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, *,
                 head0: int, row0: int, q_len: int, k_len: int, block_size: int, causal: bool, head_dim: int,
                 out_heads: torch.Tensor, as_ranges: bool = False, num_warps: int | None = None) -> None:
    """Writes MInference's block_sparse rows from pooled block scores into ``indices`` / ``counts``.

    Args:
        scores: `[B, Hc, R, nk]` fp32 pooled products ``mean(q block) . mean(k block)``, unscaled (last
            dim contiguous), of heads ``head0..head0+Hc-1`` and query blocks ``row0..row0+R-1``;
            entries beyond a row's causal limit are not read. The kernel divides by ``sqrt(head_dim)``.
        top: `[H]` int64, the blocks kept per head (then block 0 and the diagonal blocks are added).
        indices: `[B, H_out, nq, width]` int32, written in rows ``row0..row0+R-1`` of the chunk's
            output heads: ascending key blocks, ``-1`` padded; counts: `[B, H_out, nq]` int32.
        out_heads: `[H]` int64, the output head of each selected head.
        as_ranges: write range starts (``block * block_size``) instead of block numbers: the rows of
            a ``VerticalSlashIndex`` (``range_starts``, ``range_counts``).
        num_warps: warps per row program (default: ``BLOCK_TOP_K_WARPS``, else by row width).
        q_len, k_len, block_size, causal, head_dim: the attention's shape (the queries are the last ``q_len``).

    Equal to ``reference.minference.block_sparse_select`` on the same scores, ties included (lower
    block first). One program per row; no host sync.
    """
    B, Hc, R, nk = scores.shape
    if scores.stride(-1) != 1 or nk > MAX_TOP_K_BLOCKS:
        raise ValueError(f"block_top_k_: scores need a contiguous last dim of at most {MAX_TOP_K_BLOCKS} blocks")
    block_n = _pow2(nk)
    if num_warps is None:
        num_warps = BLOCK_TOP_K_WARPS.get(block_n, 4 if block_n <= 2048 else (8 if block_n <= 8192 else 16))
    _block_top_k_kernel[(Hc * R, B)](
        scores, top, out_heads, indices, counts, R, nk, indices.shape[-1], q_len, k_len, math.sqrt(head_dim),
        *scores.stride()[:3], *indices.stride()[:3], *counts.stride()[:2], head0, row0,
        BS=block_size, UNIT=block_size if as_ranges else 1, IS_CAUSAL=causal, BLOCK_N=block_n,
        num_warps=num_warps)


def last_query_scores_fast(q: torch.Tensor, k: torch.Tensor, num_last: int, causal: bool = True,
                           kv_heads: list[int] | None = None):
    """Triton version of :func:`sparseattn.reference.minference.last_query_scores` (same outputs, fp32).

    ``kv_heads``: the KV head of each query head (default GQA's ``h // (Hq / Hkv)``). With it, ``q``
    may hold any subset of query heads, e.g. a few heads' last ``num_last`` rows, with no copy of ``k``.

    Returns:
        ``(vertical [B, Hq, Lk], slash [B, Hq, n_off], min_offset)`` as the reference.

    Example:
        >>> import torch
        >>> from sparseattn.kernels.minference_index import last_query_scores_fast
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU needs TRITON_INTERPRET=1
        >>> q, k = torch.randn(1, 2, 100, 32, device=dev), torch.randn(1, 1, 100, 32, device=dev)
        >>> vertical, slash, _ = last_query_scores_fast(q, k, 16)
        >>> round(vertical.sum().item(), 3), round(slash.sum().item(), 3)  # 2 heads x 16 rows of mass 1
        (32.0, 32.0)
    """
    if kv_heads is None:
        B, Hq, Hkv, Lq, Lk, D = check_qk(q, k, "last_query_scores_fast")
        kv_heads = [h // (Hq // Hkv) for h in range(Hq)]
    else:
        B, Hq, _, Lq, Lk, D = check_qk(q, k[:, :1], "last_query_scores_fast")
        if len(kv_heads) != Hq or not all(0 <= g < k.shape[1] for g in kv_heads):
            raise ValueError(f"last_query_scores_fast: kv_heads needs one KV head in [0, {k.shape[1]}) per query "
                             f"head ({Hq}), got {list(kv_heads)}")
    if not HAS_GATHER:
        raise RuntimeError("last_query_scores_fast needs tl.gather (Triton >= 3.3), "
                           f"this is Triton {triton.__version__}")
    if not isinstance(num_last, int) or not 1 <= num_last <= Lq:
        raise ValueError(f"last_query_scores_fast: num_last must be in [1, q_len={Lq}], got {num_last!r}")
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    n, device = num_last, q.device
    kv = _device_ints(tuple(kv_heads), device)
    interpret = _interpreting() or device.type == "cpu"
    n_rows = _pow2(n)
    rows = min(n_rows, 64)
    block_d = _pow2(D)
    ieee = q.dtype == torch.float32
    qk_scale = LOG2E / math.sqrt(D)
    min_offset = 0 if causal else 1 - n
    n_off = Lk - min_offset
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, ROWS=rows, N_ROWS=n_rows, IS_CAUSAL=bool(causal), IEEE=ieee)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))

    # 1. Row log-sum-exp: partials over key splits, combined here.
    block_n = 32 if interpret else (128 if block_d <= 128 else 64)
    keys_per_split = max(block_n, min(2048, triton.cdiv(Lk, block_n) * block_n))
    splits = triton.cdiv(Lk, keys_per_split)
    maxes = _alloc(B * Hq, splits, n_rows, dtype=torch.float32, device=device)
    sums = _alloc(B * Hq, splits, n_rows, dtype=torch.float32, device=device)
    _row_lse_kernel[(B * Hq, splits, n_rows // rows)](
        q, k, kv, maxes, sums, *strides, Hq, Lq - n, n, Lk, keys_per_split, qk_scale,
        BLOCK_N=block_n, **common, num_warps=4, num_stages=1 if interpret else 3)
    m = maxes.amax(1, keepdim=True)
    m_safe = torch.where(m == float("-inf"), torch.zeros((), device=device), m)
    lse = (m_safe + torch.log2((sums * torch.exp2(maxes - m_safe)).sum(1, keepdim=True))).squeeze(1).contiguous()

    # 2. Vertical and slash sums.
    vertical = _alloc(B, Hq, Lk, dtype=torch.float32, device=device)
    slash = _alloc(B, Hq, n_off, dtype=torch.float32, device=device)
    block_o = n_rows if interpret else max(64, n_rows)
    if SUMS_LOOP and n_rows <= 64:
        # Runs of key blocks a program (each block's scores computed once), about SUMS_PROGRAMS_PER_SM
        # programs an SM.
        blocks = triton.cdiv(n_off, block_o)
        per = max(1, min(SUMS_MAX_BLOCKS, blocks * B * Hq // (SUMS_PROGRAMS_PER_SM * _sm_count(device))))
        common.pop("ROWS")
        _vertical_slash_sums_loop_kernel[(B * Hq, triton.cdiv(blocks, per))](
            q, k, kv, lse, vertical, slash, *strides, Hq, Lq - n, n, Lk, n_off, min_offset, qk_scale, per,
            BLOCK_O=block_o, **common, num_warps=4 if interpret else SUMS_WARPS,
            num_stages=1 if interpret else SUMS_STAGES)
        return vertical, slash, min_offset
    # One program per BLOCK_O keys / offsets, over a window of 2 BLOCK_O keys.
    rows = min(rows, max(16, 8192 // (2 * block_o)))
    common["ROWS"] = rows
    _vertical_slash_sums_kernel[(B * Hq, triton.cdiv(n_off, block_o))](
        q, k, kv, lse, vertical, slash, *strides, Hq, Lq - n, n, Lk, n_off, min_offset, qk_scale,
        BLOCK_O=block_o, **common, num_warps=4 if interpret else 8, num_stages=1)
    return vertical, slash, min_offset


# True: the vertical and slash sums as runs of key blocks a program (``_vertical_slash_sums_loop_kernel``,
# for ``last_q <= 64``); False: one window a program (``_vertical_slash_sums_kernel``), the kernel
# measured on the GPU (runs 22-23). The runs kernel is tested in the interpreter and compiles for
# sm_90a, but stays off until the GPU tests and benchmarks/probe_sums.py have run it (NOTES.md, run 25).
# Then the programs' target count an SM, the longest run, warps and stages.
SUMS_LOOP = False
SUMS_PROGRAMS_PER_SM = 16
SUMS_MAX_BLOCKS = 16
SUMS_WARPS = 4
SUMS_STAGES = 2


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter runs one program at a time)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=256)
def _device_ints(values: tuple, device: torch.device) -> torch.Tensor:
    """A cached int64 device tensor of host constants (a fresh copy per call would wait for the GPU)."""
    return torch.tensor(values, dtype=torch.int64, device=device)


# True: the top-k keys and offsets of the vertical-slash tables by ``_row_top_k_kernel`` (one launch
# each, ascending, no sort); False: ``torch.topk`` of the largest size, masked to each head's and
# sorted (``_top_sorted``; ~0.4 ms of host a call on the H100 machine, run 22c's profile). The kernel
# is tested in the interpreter, but stays off until it has run on a GPU (NOTES.md, run 26).
# Then the scores a loop iteration and the warps (offline ptxas, sm_90a: 2048 / 16 warps 128 registers,
# no spills; 4096 at 8 or 16 warps spills or takes 255).
TOP_K_KERNEL = False
TOP_K_BLOCK = 2048
TOP_K_WARPS = 16


def _top_sorted_fast(scores: torch.Tensor, sizes: list[int], pad: int, dtype: torch.dtype) -> torch.Tensor:
    """``_top_sorted`` by ``_row_top_k_kernel``, in ``dtype``: equal to it wherever no tie sits at a
    head's cut; ties at the cut are kept lowest position first."""
    B, H, L = scores.shape
    if len(sizes) != H or not all(1 <= n <= L for n in sizes):
        raise ValueError(f"_top_sorted_fast: one size in [1, {L}] per head ({H}), got {sizes}")
    scores = scores.contiguous()
    width = max(sizes)
    out = _alloc(B, H, width, dtype=dtype, device=scores.device)
    interpret = _interpreting() or scores.device.type == "cpu"
    _row_top_k_kernel[(B * H,)](scores, _device_ints(tuple(sizes), scores.device), out, H, L, width, pad, L, width,
                                BLOCK=64 if interpret else TOP_K_BLOCK, num_warps=4 if interpret else TOP_K_WARPS)
    return out


def _top_sorted(scores: torch.Tensor, sizes: list[int], pad: int) -> torch.Tensor:
    """`[B, H, max(sizes)]` int64: the ``sizes[h]`` highest positions of each head, ascending, ``pad`` after."""
    width = max(sizes)
    top = torch.topk(scores, width, dim=-1, sorted=True).indices
    if min(sizes) < width:
        limit = _device_ints(tuple(sizes), scores.device)[:, None]  # [H, 1]
        top = torch.where(torch.arange(width, device=scores.device) < limit, top, torch.full_like(top, pad))
    return torch.sort(top, dim=-1).values


def _cluster_tables(offsets: torch.Tensor, bs: int, k_len: int):
    """Per-head cluster structure of ascending offsets `[B, H, ns]` (int64, ``_BIG_OFFSET`` padded).

    Returns per-element tables (``cid``, ``o_min``, ``n_before``, ``n_tiles`` of the element's
    cluster), the tile list ``tiles [B, H, 2 ns]`` (every cluster's tile offsets ``tau``, ascending;
    a tile covers ``kappa in [tau, tau + bs)``), and ``cluster_map [B, H, Lk]`` (int32, 1 + the id
    of the cluster whose run covers ``kappa``, 0 where none does).
    """
    B, H, ns = offsets.shape
    device = offsets.device
    real = offsets < _BIG_OFFSET
    prev = torch.cat([offsets[..., :1], offsets[..., :-1]], dim=-1)
    new_cluster = offsets - prev >= 2 * bs
    new_cluster[..., 0] = True
    cid = torch.cumsum(new_cluster, dim=-1) - 1
    o_min = torch.cummax(torch.where(new_cluster, offsets, torch.full_like(offsets, -1)), dim=-1).values
    is_end = torch.cat([new_cluster[..., 1:], torch.ones_like(new_cluster[..., :1])], dim=-1)
    o_max = torch.where(is_end, offsets, torch.full_like(offsets, 2 * _BIG_OFFSET))
    o_max = torch.flip(torch.cummin(torch.flip(o_max, [-1]), dim=-1).values, [-1])
    n_tiles = torch.where(real, (o_max - o_min + bs - 1) // bs + 1, torch.zeros_like(offsets))
    tiles_at_end = torch.where(is_end, n_tiles, torch.zeros_like(n_tiles))
    cum = torch.cumsum(tiles_at_end, dim=-1)  # tiles in clusters <= this one (at ends), < it (elsewhere)
    n_before = cum - tiles_at_end

    # Tile p lies in the cluster ending at the first element with cum > p.
    width = 2 * ns
    p = torch.arange(width, device=device).expand(B, H, width).contiguous()
    end = torch.searchsorted(cum.contiguous(), p, right=True).clamp_max(ns - 1)
    tiles = o_max.gather(-1, end) - (cum.gather(-1, end) - 1 - p) * bs
    tiles = torch.where(p < cum[..., -1:], tiles, torch.zeros_like(tiles)).to(torch.int32)

    # Runs in kappa: [O_max - (n - 1) bs, O_max + bs - 1], disjoint between clusters.
    run_end = is_end & real
    lo = (o_max - (n_tiles - 1) * bs).clamp(0, k_len)
    hi = (o_max + bs).clamp(0, k_len)  # exclusive
    label = torch.where(run_end, cid + 1, torch.zeros_like(cid))
    diff = torch.zeros(B, H, k_len + 1, dtype=torch.int64, device=device)
    diff.scatter_add_(-1, torch.where(run_end, lo, k_len), label)
    diff.scatter_add_(-1, torch.where(run_end, hi, k_len), -label)
    cluster_map = torch.cumsum(diff[..., :k_len], dim=-1).to(torch.int32)
    return cid, o_min, n_before, n_tiles, tiles, cluster_map


def _block_params(offsets, cid, o_min, n_before, n_tiles, q_len: int, k_len: int, bs: int) -> torch.Tensor:
    """`[B, H, nq, 8]` int32: each query block's ranges in closed form (see the module docstring)."""
    B, H, _ = offsets.shape
    device = offsets.device
    nq = cdiv(q_len, bs)
    blocks = torch.arange(nq, device=device)
    p1 = ((k_len - q_len) + torch.clamp((blocks + 1) * bs, max=q_len) - 1).expand(B, H, nq).contiguous()
    i0 = torch.searchsorted(offsets, p1, right=True)  # offsets <= p1 are valid
    i1 = torch.searchsorted(offsets, p1 - bs + 1, right=True)  # offsets <= p1 - bs + 1 are not clipped

    def at(table, count):  # table[count - 1], the largest element of a prefix
        return table.gather(-1, (count - 1).clamp_min(0))

    has = i0 > 0
    clipped = i1 < i0  # some valid offset's range starts before key 0: the edge cluster starts at 0
    # Not clipped: the edge is the (top-truncated) cluster of the largest valid offset.
    a_top = p1 - at(offsets, i0) - bs + 1
    # Clipped: the clipped ranges merge with the cluster of the largest unclipped offset when it
    # starts within 2 bs of key 0; otherwise that cluster (whole) is interior.
    u = p1 - at(offsets, i1) - bs + 1
    merged = (i1 > 0) & (u < 2 * bs)
    a_e = torch.where(clipped, torch.zeros_like(a_top), a_top)
    o_low = torch.where(clipped, at(o_min, i1), at(o_min, i0))
    n_e = torch.where(clipped & ~merged, torch.ones_like(a_e), (p1 - o_low - a_e) // bs + 1)
    below = torch.where(i1 > 0, at(cid, i1) + 1, torch.zeros_like(i1))
    below_tiles = torch.where(i1 > 0, at(n_before, i1) + at(n_tiles, i1), torch.zeros_like(i1))
    c_star = torch.where(clipped, torch.where(merged, at(cid, i1), below), at(cid, i0))
    n_int = torch.where(clipped, torch.where(merged, at(n_before, i1), below_tiles), at(n_before, i0))
    zero = torch.zeros_like(a_e)
    count = torch.where(has, n_e + n_int, zero)
    kappa_hi = torch.where(has, p1 - a_e, zero - 1)
    kappa_lo = torch.where(has, p1 - a_e - n_e * bs + 1, zero)
    c_star = torch.where(has, c_star, zero)
    params = torch.stack([count, n_e, a_e, n_int, p1, kappa_lo, kappa_hi, c_star], dim=-1)
    return params.to(torch.int32).contiguous()


# Slash offsets per head that ``_cluster_scan_kernel`` holds in registers; more take the torch builders.
MAX_SCAN_OFFSETS = 1 << 14


def _cluster_tables_triton(offsets: torch.Tensor, bs: int, q_len: int, k_len: int):
    """``_cluster_tables`` + ``_block_params`` in two launches: ``(tiles, cluster_map, params)``.

    The torch builders are ~80 small launches, which left a 128K selection host-bound (NOTES run 21d).
    Here one program per head scans its offsets (element tables and tile list), then one program per
    ``BLOCK`` positions bisects them for the ``kappa`` map and the query blocks' parameters.
    """
    B, H, ns = offsets.shape
    nq, device = cdiv(q_len, bs), offsets.device
    elem = torch.empty(B, H, 6, ns, dtype=torch.int32, device=device)  # cid, o_min, n_before, n_tiles, lo, hi
    tiles = _alloc(B, H, 2 * ns, dtype=torch.int32, device=device)
    cluster_map = _alloc(B, H, k_len, dtype=torch.int32, device=device)
    params = _alloc(B, H, nq, 8, dtype=torch.int32, device=device)
    block = _pow2(ns)
    _cluster_scan_kernel[(B * H,)](offsets, elem, tiles, ns, k_len, BS=bs, BLOCK=block,
                                   num_warps=min(16, max(4, block // 512)))
    lookup = 1024
    map_blocks = cdiv(k_len, lookup)
    _cluster_lookup_kernel[(B * H, map_blocks + cdiv(nq, lookup))](
        offsets, elem, cluster_map, params, ns, q_len, k_len, nq, map_blocks,
        BS=bs, BLOCK=lookup, STEPS=ns.bit_length(), num_warps=4)
    return tiles, cluster_map, params


def _fill_index_torch(params, tiles, cluster_map, keys, width_r: int, bs: int):
    """``_fill_index_kernel`` in torch (CPU path): `[B, H, nq, width]` gathers, fine for short inputs."""
    count, n_e, a_e, n_int, p1, kappa_lo, kappa_hi, c_star = (t.long()[..., None] for t in params.unbind(-1))
    B, H, nq = params.shape[:3]
    r = torch.arange(width_r, device=params.device)
    interior = (r >= n_e) & (r < count)
    slot = (n_int - 1 - (r - n_e)).clamp(0, tiles.shape[-1] - 1)
    tau = tiles[:, :, None, :].expand(B, H, nq, -1).gather(-1, slot).long()
    starts = torch.where(r < n_e, a_e + r * bs, torch.where(interior, p1 - tau - bs + 1, torch.full_like(tau, -1)))
    key = keys[:, :, None, :].long().expand(B, H, nq, -1)
    Lk = cluster_map.shape[-1]
    valid = (key <= p1) & (key < Lk)
    kappa = (p1 - key).clamp(0, Lk - 1)
    cluster = cluster_map[:, :, None, :].expand(B, H, nq, -1).gather(-1, kappa)
    keep = valid & ~((kappa >= kappa_lo) & (kappa <= kappa_hi)) & ~((cluster >= 1) & (cluster <= c_star))
    columns = torch.sort(torch.where(keep, key, torch.full_like(key, _BIG_KEY)), dim=-1).values
    columns = torch.where(columns < _BIG_KEY, columns, torch.full_like(columns, -1))
    return (starts.to(torch.int32), count[..., 0].to(torch.int32), columns.to(torch.int32),
            keep.sum(-1, dtype=torch.int32))


def _backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return backend


@dataclasses.dataclass
class VerticalSlashTables:
    """What a vertical-slash index is built from, for every head: the kept keys, the cluster tables
    and each query block's closed-form parameters (``[B, H, ...]``, small next to the index).
    ``fill_vertical_slash_index`` writes the index of any range of heads from them."""

    params: torch.Tensor  # [B, H, nq, 8] int32
    tiles: torch.Tensor  # [B, H, 2 max ns] int32
    cluster_map: torch.Tensor  # [B, H, Lk] int32
    keys: torch.Tensor  # [B, H, max nv] int32, ascending, _BIG_KEY padded
    nv: list[int]  # verticals and slashes per head (forced and clamped): a range of heads' index
    ns: list[int]  # is as wide as its own largest sizes need, as if selected alone
    q_len: int
    k_len: int
    block_size: int


def vertical_slash_tables(vertical: torch.Tensor, slash: torch.Tensor, *, vertical_sizes, slash_sizes,
                          q_len: int, k_len: int, block_size: int, overwrite: bool = False,
                          backend: str = "auto") -> VerticalSlashTables:
    """Top-k keys and offsets and the cluster tables of ``vertical_slash_index_fast`` (its arguments).
    ``overwrite``: force the first keys and offsets in the given score tensors (no copies of them).
    ``backend``: ``"triton"`` builds the cluster tables in two launches (``_cluster_tables_triton``,
    up to ``MAX_SCAN_OFFSETS`` slashes a head), ``"torch"`` with torch ops; ``"auto"`` by device."""
    B, H, Lk = vertical.shape
    if Lk != k_len or tuple(slash.shape) != (B, H, Lk):
        raise ValueError(f"vertical {tuple(vertical.shape)} and slash {tuple(slash.shape)} must be "
                         f"[B, H, k_len={k_len}] (causal offsets 0..k_len-1)")
    bs = block_size
    v_sizes = per_head_sizes("vertical_size", vertical_sizes, H)
    s_sizes = per_head_sizes("slash_size", slash_sizes, H)
    sizes = [selection_sizes(v, s, Lk, Lk) for v, s in zip(v_sizes, s_sizes)]
    nv = [a for a, _ in sizes]
    ns = [b for _, b in sizes]
    if not overwrite:
        vertical, slash = vertical.clone(), slash.clone()
    vertical[..., :FORCED_VERTICALS] = float("inf")
    slash[..., :FORCED_SLASHES] = float("inf")
    if TOP_K_KERNEL and _backend(backend, vertical.device) == "triton":
        keys = _top_sorted_fast(vertical, nv, _BIG_KEY, torch.int32)  # [B, H, max nv]
        offsets = _top_sorted_fast(slash, ns, _BIG_OFFSET, torch.int64)  # [B, H, max ns]
    else:
        keys = _top_sorted(vertical, nv, _BIG_KEY).to(torch.int32).contiguous()
        offsets = _top_sorted(slash, ns, _BIG_OFFSET).contiguous()
    vertical = slash = None
    if _backend(backend, offsets.device) == "triton" and offsets.shape[-1] <= MAX_SCAN_OFFSETS:
        tiles, cluster_map, params = _cluster_tables_triton(offsets, bs, q_len, Lk)
    else:
        cid, o_min, n_before, n_tiles, tiles, cluster_map = _cluster_tables(offsets, bs, Lk)
        params = _block_params(offsets, cid, o_min, n_before, n_tiles, q_len, Lk, bs)
    return VerticalSlashTables(params, tiles, cluster_map, keys, nv, ns, q_len, Lk, bs)


def fill_widths(tables: VerticalSlashTables, heads: slice = slice(None)) -> tuple[int, int]:
    """``(ranges, columns)``: the row widths of heads ``heads``' index, as if they were selected alone."""
    chosen = range(len(tables.nv))[heads]
    return (min(2 * max(tables.ns[h] for h in chosen), cdiv(tables.k_len, tables.block_size)),
            max(tables.nv[h] for h in chosen))


def fill_vertical_slash_index(tables: VerticalSlashTables, heads: slice = slice(None), *, backend: str = "auto",
                              into: tuple[VerticalSlashIndex, list[int]] | None = None) -> VerticalSlashIndex:
    """The ``VerticalSlashIndex`` of heads ``heads`` (a slice) from ``tables``: one Triton launch
    (``backend="triton"``), or the torch equivalent.

    ``into``: ``(index, out_heads)``: write the rows into query heads ``out_heads`` of an existing
    index (a per-head mix's), whose rows are at least ``fill_widths`` wide (its entries past them
    are left as they are), and return it: no index of these heads alone, and no copy of one."""
    t = tables
    width_r, width_c = fill_widths(t, heads)
    params, tiles, cluster_map = (x[:, heads].contiguous() for x in (t.params, t.tiles, t.cluster_map))
    keys = t.keys[:, heads, :width_c].contiguous()
    B, H, nq, _ = params.shape
    bs, device = t.block_size, params.device
    if into is not None and (len(into[1]) != H or into[0].range_starts.shape[-1] < width_r
                             or into[0].columns.shape[-1] < width_c):
        raise ValueError(f"fill_vertical_slash_index: into needs {H} output heads and rows of at least "
                         f"{width_r} ranges / {width_c} columns")
    if _backend(backend, device) == "torch":
        index = VerticalSlashIndex(*_fill_index_torch(params, tiles, cluster_map, keys, width_r, bs), bs, bs,
                                   t.q_len, t.k_len)
        if into is None:
            return index
        out, out_heads = into
        idx = _device_ints(tuple(out_heads), device)
        out.range_starts.narrow(-1, 0, width_r).index_copy_(1, idx, index.range_starts)
        out.columns.narrow(-1, 0, width_c).index_copy_(1, idx, index.columns)
        for name in ("range_counts", "column_counts"):
            getattr(out, name).index_copy_(1, idx, getattr(index, name))
        return out
    if into is None:
        out = VerticalSlashIndex(_alloc(B, H, nq, width_r, dtype=torch.int32, device=device),
                                 _alloc(B, H, nq, dtype=torch.int32, device=device),
                                 _alloc(B, H, nq, width_c, dtype=torch.int32, device=device),
                                 _alloc(B, H, nq, dtype=torch.int32, device=device), bs, bs, t.q_len, t.k_len)
        out_heads = _device_ints(tuple(range(H)), device)
    else:
        out, out_heads = into[0], _device_ints(tuple(into[1]), device)
    if out.range_counts.stride() != out.column_counts.stride() or out.range_counts.stride(-1) != 1 \
            or out.range_starts.stride(-1) != 1 or out.columns.stride(-1) != 1:
        raise ValueError("fill_vertical_slash_index: the index needs contiguous rows and counts of equal strides")
    tile = 32 if _interpreting() or device.type == "cpu" else 256
    _fill_index_kernel[(B * H, nq)](
        params, tiles, cluster_map, keys, out_heads, out.range_starts, out.range_counts, out.columns,
        out.column_counts, H, nq, width_r, width_c, tiles.shape[-1], t.k_len,
        *out.range_starts.stride()[:3], *out.columns.stride()[:3], *out.range_counts.stride()[:2],
        BS=bs, BLOCK_R=min(tile, _pow2(width_r)), BLOCK_C=min(tile, _pow2(width_c)), num_warps=4)
    return out


def vertical_slash_index_fast(vertical: torch.Tensor, slash: torch.Tensor, *, vertical_sizes, slash_sizes,
                              q_len: int, k_len: int, block_size: int, backend: str = "auto") -> VerticalSlashIndex:
    """Causal index from estimation scores; equal to ``reference.vertical_slash_index_from_scores``.

    Args:
        vertical: `[B, H, Lk]` fp32 column scores; slash: `[B, H, Lk]` fp32 scores of offsets
            ``0..Lk-1`` (causal). Not modified.
        vertical_sizes, slash_sizes: ints, or one int per head (before forcing and clamping).
        q_len, k_len: the queries are the last ``q_len`` of ``k_len`` positions.
        block_size: query block size and range length.
        backend: ``"triton"`` (the fill kernel), ``"torch"`` (the same in torch, memory
            ``O(B H nq (nk + nv))`` int64: short inputs), ``"auto"`` (Triton on CUDA, torch on CPU).

    Returns:
        ``VerticalSlashIndex``: ranges width ``min(2 max ns, nk)``, columns width ``max nv``.
    """
    tables = vertical_slash_tables(vertical, slash, vertical_sizes=vertical_sizes, slash_sizes=slash_sizes,
                                   q_len=q_len, k_len=k_len, block_size=block_size, backend=backend)
    return fill_vertical_slash_index(tables, backend=backend)


def minference_select_fast(q: torch.Tensor, k: torch.Tensor, *, vertical_size=1000, slash_size=6096,
                           adaptive_budget: float | None = None, last_q: int = 64, block_size: int = 64,
                           backend: str = "auto") -> VerticalSlashIndex:
    """MInference's vertical-and-slash index on the GPU (causal); the same index as ``reference.minference_select``.

    Args:
        q: `[B, Hq, Lq, D]`, the last `Lq` of the `Lk` positions; k: `[B, Hkv, Lk, D]`, ``Hq % Hkv == 0``.
            CUDA tensors (fp16/bf16/fp32), or CPU tensors under ``TRITON_INTERPRET=1``.
        vertical_size: vertical keys per head (default 1000): an int or one per query head.
        slash_size: slash offsets per head (default 6096): an int or one per query head.
        adaptive_budget: fraction of `Lk` replacing both sizes (20% verticals, 80% slashes).
        last_q: estimation queries (default 64).
        block_size: query block size and range length (default 64).
        backend: ``"triton"``: the Triton estimation and fill kernels (CUDA, or CPU under
            ``TRITON_INTERPRET=1``); ``"torch"``: the reference's fp32 estimation and the torch fill
            (CPU, short inputs); ``"auto"`` (default): Triton on CUDA tensors, torch otherwise.

    Returns:
        ``VerticalSlashIndex`` for causal attention, shapes fixed by the arguments (no host sync).

    Example:
        >>> import torch
        >>> from sparseattn.kernels.minference_index import minference_select_fast
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> q, k = torch.randn(1, 4, 300, 32, device=dev), torch.randn(1, 2, 300, 32, device=dev)
        >>> index = minference_select_fast(q, k, vertical_size=40, slash_size=120, last_q=32, block_size=64)
        >>> index.range_starts.shape, index.columns.shape
        (torch.Size([1, 4, 5, 5]), torch.Size([1, 4, 5, 40]))
    """
    B, Hq, Hkv, Lq, Lk, D = check_qk(q, k, "minference_select_fast")
    for name, value in (("last_q", last_q), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"minference_select_fast: {name} must be a positive int, got {value!r}")
    if adaptive_budget is not None:
        vertical_size, slash_size = adaptive_sizes(adaptive_budget, Lk)
    backend = _backend(backend, q.device)
    tables = _tables(q, k, vertical_size, slash_size, last_q, block_size, backend)
    return fill_vertical_slash_index(tables, backend=backend)


def minference_tables_fast(q: torch.Tensor, k: torch.Tensor, *, vertical_size=1000, slash_size=6096,
                           adaptive_budget: float | None = None, last_q: int = 64, block_size: int = 64,
                           backend: str = "auto") -> VerticalSlashTables:
    """``minference_select_fast`` up to the index: the estimation, top-k and cluster tables of every
    head (the ~240 small launches of a selection), from which ``fill_vertical_slash_index`` writes
    any range of heads' index in one launch (a memory-bounded call fills one chunk of heads at a time)."""
    B, Hq, Hkv, Lq, Lk, D = check_qk(q, k, "minference_tables_fast")
    if adaptive_budget is not None:
        vertical_size, slash_size = adaptive_sizes(adaptive_budget, Lk)
    return _tables(q, k, vertical_size, slash_size, last_q, block_size, _backend(backend, q.device))


def _tables(q, k, vertical_size, slash_size, last_q: int, block_size: int, backend: str) -> VerticalSlashTables:
    Lq, Lk = q.shape[2], k.shape[2]
    scores = last_query_scores_fast if backend == "triton" and HAS_GATHER else last_query_scores  # fp32 torch (exact)
    # The scores are ours: forced in place, and freed once their top-k is taken.
    return vertical_slash_tables(*scores(q, k, min(last_q, Lq), causal=True)[:2], vertical_sizes=vertical_size,
                                 slash_sizes=slash_size, q_len=Lq, k_len=Lk, block_size=block_size, overwrite=True,
                         backend=backend)
