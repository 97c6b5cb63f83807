"""FlexPrefill's selection on the GPU: fused last-block scores, cover counts, row selection.

Four Triton kernels, each tested against the matching stage of ``sparseattn.reference.flexprefill``
(the fp32 ground truth, split into the same stages) -> host launchers -> ``flexprefill_select_fast``
(validation, glue, the full docstring). No autograd level: selection has no gradient.

Where the reference spends its time and what replaces it. Shape B=1, Hq=32, Hkv=8, D=128, bf16,
L=128K, block 128; cuDNN dense ~245 ms, so the 2% budget is ~4.9 ms. "Run 8" is the H100 run of
an earlier revision (``benchmarks/results/.../flexprefill-run8.json``, ``bench_flexprefill.py``):
select 6.56 ms (2.7% of dense), stage times measured one at a time.

- Last-block softmax (``_last_block_kernel``): the last ``n = bs`` queries of each head against
  all keys, ``Hq n L`` = 537 M scores, 137 GFLOP per pass. The reference materializes them in fp32
  chunks (2 GB written and read back, plus int64 gather indices as large for the diagonal sums).
  Here two passes over ``[n, 32]`` tiles store no score: pass 0 writes each row's max and sum-exp
  per chunk of ``STAT_TILES`` key tiles (an online softmax over the chunk with q loaded once; a
  torch reduction over the chunks makes the log-sum-exps); pass 1
  recomputes the tile, normalizes it and reduces it in registers to column sums (the vertical
  distribution) and to diagonal sums: a ``tl.gather`` skews the tile so each diagonal becomes a
  column (``[B, Hq, L/64, n + 64]`` partial sums that a torch overlap-add folds into the slash
  distribution). One program per (head, key tile), heads fastest, so the ``G`` heads of a KV head
  read a K tile from L2 together; K is never repeated. 65 K programs per pass, 64-80 registers,
  no spills (sm_90, triton 3.6 and 3.9). Run 8: 3.1 ms for both passes and the folds with one
  ``[n, 64]`` tile per program in both passes (predicted ~1 ms); run 11: 2.63 ms with 8 tiles per
  pass-0 program, 2.36 ms with ``[n, 32]`` tiles (the benchmark sweeps both).
- Cover counts (``_cover_count_kernel``): the fewest largest entries of a ``[L]`` distribution
  reaching ``gamma`` is a sort of ``[B, Hq, L]`` in the reference (twice). Here a search over the
  fp32 bit pattern of the crossing value, 8 probes per pass over the L2-resident row (12 passes).
  Run 8: 2.2 ms with one program per row in two launches (32 SMs busy, `[probes, chunk]` tiles
  reduced in 3-D); now one launch for both distributions, 16 warps and 8192-wide chunks, one 1-D
  reduction per probe: predicted ~0.3 ms.
- Block means (``_block_mean_kernel``): mean-pooled K (pattern decision) and Q (query-aware rows,
  ``sparsity_ratio`` ranking) in fp32 without an fp32 copy. Q (1.07 GB) is the largest read of the
  selection: without a cap only query-aware heads are pooled (others write zeros, never read).
  Run 8: 0.16 ms (K), 0.32 ms (Q, 8 query-aware heads of 32).
- Per-head plan (pattern by JS divergence, vertical / slash block choices): the reference's own
  torch code (``plan_heads``) on `[B, Hq, L/bs]` tensors: ~40 small launches, 1.1 ms of CPU time in
  run 8, mostly hidden behind the queued GPU work at long lengths.
- Row selection + packing (``_select_rows_kernel``): the reference builds `[B, Hq, nq, nk]` masks,
  sorts them for the per-row coverage and the cap, and sorts again in ``BlockIndex.from_mask``
  (~3-5 ms of sorts at 128K). Here one program per (head, query block) holds the row in registers:
  vertical blocks and slash groups from two small per-head bitmaps, the pooled softmax from a row
  of pooled scores (a torch fp32 matmul, chunked over rows to <= 32 MB), coverage and cap by a
  search on bit patterns (ties broken by index with a cumsum), and writes the ascending indices
  and the count straight into the ``BlockIndex``. Run 8: 1.1 ms with a separate division pass;
  now the division is inside the kernel.

Predicted total at 128K after these changes: ~4-4.5 ms, ~1.7% of cuDNN dense. No host
synchronization and no Python loop over heads or batch (the loops left are over a few row chunks
or row groups), so the selection can be captured in a CUDA graph, which would also remove the
~3 ms of CPU launch overhead that dominates at 8K-16K.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..index import BlockIndex, causal_block_mask, cdiv
from ..reference.flexprefill import check_flexprefill_args, offset_groups, plan_heads, sum_pool
from ..reference.streaming import forced_block_mask

__all__ = [
    "block_mean",
    "cover_count_fast",
    "cover_counts_fast",
    "flexprefill_select_fast",
    "index_width",
    "last_block_distributions_fast",
    "select_rows_fast",
]

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
# Same switch as block_sparse.py: "1" allocates outputs NaN-filled so unwritten cells fail tests.
NAN_FILL_ENV = "SPARSEATTN_NAN_FILL"
# fp32 pooled scores per launch of the row selection (32 MB): 128K tokens at bs 128 take 4 chunks.
# Bounded because the selection's peak extra memory (run 8: 0.21 GiB at 128K, mostly the 134 MB
# BlockIndex) is already above the 10%-of-q+k+v goal.
SCORE_CHUNK_ELEMENTS = 1 << 23


# ==================================================================================================
# Triton kernels
# ==================================================================================================


@triton.jit
def _last_block_kernel(
    Q, K, Stats, Lse, Vert, SlashPart,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn, stride_plane,
    num_heads, group_size, q_len, k_len, n_hat, num_tiles, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SKEW_W: tl.constexpr, ROW_GROUPS: tl.constexpr, PHASE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, STAT_TILES: tl.constexpr,
):
    """One key tile of ``BLOCK_N`` keys against one group of ``BLOCK_M`` last-block rows of one head.

    Grid ``(B * Hq, num_tiles, ROW_GROUPS)``, heads fastest, so the ``G`` heads of a KV head read
    the same K tile from L2 at about the same time. Row ``t`` (0-based among the last ``n_hat``
    queries) sits at absolute position ``k_len - n_hat + t``.

    PHASE 0 (grid axis 1 over chunks of ``STAT_TILES`` key tiles) writes ``Stats [2, B*Hq,
    ROW_GROUPS*BLOCK_M, num_chunks]``: the row max (log2 units) and the sum of ``exp2(s - max)``
    over the chunk's tiles, an online softmax with ``q`` loaded once and the K tiles pipelined.
    PHASE 1 reads ``Lse [B*Hq, ROW_GROUPS*BLOCK_M]`` (log2 units) and writes the tile's column sums
    of probabilities to ``Vert [B*Hq, ROW_GROUPS, k_len]`` and its diagonal sums to
    ``SlashPart [B*Hq, ROW_GROUPS, num_tiles, BLOCK_M + BLOCK_N]``: entry ``c`` sums ``P[t, j]`` over
    ``t - j = c - (BLOCK_N - 1)`` (tile-local row ``t`` and key ``j``), i.e. over one offset.

    No loop over heads inside a program: loop-invariant index tiles (the skew's gather indices)
    would be hoisted out of it and held in registers for every iteration, which spills.
    """
    bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    group = tl.program_id(2)
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // group_size
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    keys = tile * BLOCK_N + offs_n  # [BLOCK_N]
    k_ok = keys < k_len
    rows = group * BLOCK_M + offs_t  # [BLOCK_M] rows among the last n_hat
    row_ok = rows < n_hat
    # Scalar int64 bases plus int32 offsets inside the tile (int64 pointer tiles cost registers).
    # Rows past n_hat re-read the last row instead of a masked load; the score mask drops them.
    k_base = K + b * stride_kb + kvh * stride_kh + tl.cast(tile * BLOCK_N, tl.int64) * stride_kn
    q_base = Q + b * stride_qb + h * stride_qh + tl.cast(q_len - n_hat, tl.int64) * stride_qm
    q_offs = tl.minimum(rows, n_hat - 1)[:, None] * stride_qm + offs_d[None, :]  # [BLOCK_M, BLOCK_D]
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    stat_rows = ROW_GROUPS * BLOCK_M
    if PHASE == 0:
        d_ok = offs_d < HEAD_DIM
        q = tl.load(q_base + q_offs, mask=d_ok[None, :], other=0.0)
        k_base = K + b * stride_kb + kvh * stride_kh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for i in range(0, STAT_TILES):
            start = (tile * STAT_TILES + i) * BLOCK_N
            keys = start + offs_n
            k_ok = keys < k_len
            k = tl.load(k_base + tl.cast(start, tl.int64) * stride_kn + k_offs, mask=k_ok[:, None] & d_ok[None, :],
                        other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
            keep = row_ok[:, None] & k_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (keys[None, :] <= (k_len - n_hat + rows)[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
            l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        base = Stats + (bh * stat_rows + rows) * tl.num_programs(1) + tile
        tl.store(base, m_i)
        tl.store(base + stride_plane, l_i)
        return
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_base + q_offs)
        k = tl.load(k_base + k_offs, mask=k_ok[:, None], other=0.0)
    else:
        d_ok = offs_d < HEAD_DIM
        q = tl.load(q_base + q_offs, mask=d_ok[None, :], other=0.0)
        k = tl.load(k_base + k_offs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    keep = row_ok[:, None] & k_ok[None, :]
    if IS_CAUSAL:
        keep = keep & (keys[None, :] <= (k_len - n_hat + rows)[:, None])
    s = tl.where(keep, s, float("-inf"))
    lse = tl.load(Lse + bh * stat_rows + rows)
    lse = tl.where(row_ok, lse, 0.0)
    p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
    tl.store(Vert + (bh * ROW_GROUPS + group) * k_len + keys, tl.sum(p, 0), mask=k_ok)
    part = SlashPart + ((bh * ROW_GROUPS + group) * num_tiles + tile) * (BLOCK_M + BLOCK_N)
    # Diagonal sums: column c of the skewed tile holds P[t, t + BLOCK_N - 1 - c], gathered
    # SKEW_W columns at a time (the whole [BLOCK_M, BLOCK_M + BLOCK_N] skew would spill).
    for chunk in tl.static_range((BLOCK_M + BLOCK_N) // SKEW_W):
        c = chunk * SKEW_W + tl.arange(0, SKEW_W)  # [SKEW_W]
        src = offs_t[:, None] + (BLOCK_N - 1) - c[None, :]  # [BLOCK_M, SKEW_W] column of p
        skew = tl.gather(p, tl.minimum(tl.maximum(src, 0), BLOCK_N - 1), 1)
        skew = tl.where((src >= 0) & (src < BLOCK_N), skew, 0.0)
        tl.store(part + c, tl.sum(skew, 0))


@triton.jit
def _block_mean_kernel(X, Out, Flags, stride_xb, stride_xh, stride_xm, stride_ob, stride_oh, stride_on,
                       num_heads, length, block_size,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SKIP: tl.constexpr):
    """fp32 mean of the valid rows of one block of one (batch, head). Grid ``(B * H, n_blocks)``.

    ``SKIP``: heads whose ``Flags [B*H]`` entry is 0 write zeros without reading ``X`` (pooled
    queries that no one will read: heads that are not query-aware when there is no cap).
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, CHUNK)
    first = blk * block_size
    last = tl.minimum(first + block_size, length)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    read = True
    if SKIP:
        read = tl.load(Flags + pid_bh) != 0
    if read:
        base = X + b * stride_xb + h * stride_xh
        for r0 in range(first, last, CHUNK):
            rows = r0 + offs_r
            x = tl.load(base + rows.to(tl.int64)[:, None] * stride_xm + offs_d[None, :],
                        mask=(rows < last)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32), 0)
        acc = acc / (last - first).to(tl.float32)
    tl.store(Out + b * stride_ob + h * stride_oh + blk * stride_on + offs_d, acc, mask=offs_d < HEAD_DIM)


@triton.jit
def _probes(lo, hi, PROBE_BITS: tl.constexpr):
    """``2**PROBE_BITS`` ascending probes from ``lo`` into ``[lo, hi)``: `[R, P]` for `lo, hi [R]`.

    Probe ``i`` is ``lo + floor((hi - lo) * i / P)``; consecutive probes (and ``hi``) are at most
    ``ceil((hi - lo) / P)`` apart, so each pass of the search divides the interval by ``P``.
    """
    i = tl.arange(0, 2**PROBE_BITS).to(tl.int64)
    span = (hi - lo).to(tl.int64)
    return lo[:, None] + ((span[:, None] * i[None, :]) >> PROBE_BITS).to(tl.int32)


@triton.jit
def _narrow(lo, hi, probes, below):
    """New ``(lo, hi)``: the last probe still at or above the limit, the first one below it."""
    hi = tl.min(tl.where(below, probes, hi[:, None]), axis=1)
    lo = tl.max(tl.where(below, lo[:, None], probes), axis=1)
    return lo, hi


@triton.jit
def _cover_count_kernel(X, Count, Lengths, stride_x, gamma,
                        BLOCK: tl.constexpr, PROBE_BITS: tl.constexpr, PASSES: tl.constexpr):
    """Fewest largest entries of row ``X[row, :n]`` (``n = Lengths[row]``) whose sum reaches ``gamma``
    (``n`` if never).

    Entries are non-negative, so their fp32 bit patterns order like their values. A search over
    bit patterns (``2**PROBE_BITS`` probes per pass over the row) finds ``b*``, the smallest
    pattern with ``sum(x > b*) < gamma``: the crossing value ``v*`` has pattern ``b*``. The entries
    above ``v*`` sum to ``F < gamma``; then ``ceil((gamma - F) / v*)`` entries equal to ``v*`` reach it.
    Each probe is its own 1-D reduction over a chunk (a `[probes, BLOCK]` tile reduces poorly).
    """
    P: tl.constexpr = 2**PROBE_BITS
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(Lengths + row)
    base = X + row * stride_x
    offs = tl.arange(0, BLOCK)
    slot = tl.arange(0, P)
    total = tl.zeros([], dtype=tl.float32)
    top = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        x = tl.load(base + start + offs, mask=start + offs < n, other=0.0)
        total += tl.sum(x, 0)
        top = tl.maximum(top, tl.max(x.to(tl.int32, bitcast=True), 0))
    lo = tl.full([1], -1, tl.int32)  # sum(x > lo) = total >= gamma
    hi = tl.full([1], 0, tl.int32) + top  # sum(x > hi) = 0 < gamma
    for _ in range(PASSES):
        probes = _probes(lo, hi, PROBE_BITS)  # [1, P]
        lo_s = tl.sum(lo, 0)
        span = (tl.sum(hi, 0) - lo_s).to(tl.int64)
        above = tl.zeros([P], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            x = tl.load(base + start + offs, mask=start + offs < n, other=0.0)
            bits = x.to(tl.int32, bitcast=True)
            for i in tl.static_range(P):
                probe = lo_s + ((span * i) >> PROBE_BITS).to(tl.int32)  # = probes[0, i]
                above = tl.where(slot == i, above + tl.sum(tl.where(bits > probe, x, 0.0), 0), above)
        lo, hi = _narrow(lo, hi, probes, (above < gamma)[None, :])
    cut = tl.sum(hi, 0)
    strict = tl.zeros([], dtype=tl.float32)
    n_above = tl.zeros([], dtype=tl.int32)
    n_equal = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        x = tl.load(base + start + offs, mask=start + offs < n, other=0.0)
        bits = x.to(tl.int32, bitcast=True)
        strict += tl.sum(tl.where(bits > cut, x, 0.0), 0)
        n_above += tl.sum((bits > cut).to(tl.int32), 0)
        n_equal += tl.sum((bits == cut).to(tl.int32), 0)
    value = cut.to(tl.float32, bitcast=True)
    need = tl.ceil((gamma - strict) / value)  # float: may be inf or NaN when total < gamma (then unused)
    need = tl.where(need < n_equal, need, n_equal.to(tl.float32)).to(tl.int32)
    count = tl.minimum(n_above + tl.maximum(need, 1), n)
    tl.store(Count + row, tl.where(total < gamma, n, count))


@triton.jit
def _keep_ranked(candidate, value, weight, limit, PROBE_BITS: tl.constexpr, PASSES: tl.constexpr):
    """Per row of `[R, N]`: candidates by descending ``value`` (ties: lower index first), kept
    while the ``weight`` ranked before them sums to less than ``limit [R]``.

    ``value`` is non-negative; ``weight`` is ``value`` itself (coverage) or 1 (a count cap). The
    search finds the cut pattern ``b*`` (smallest with ``sum(weight where bits > b*) < limit``);
    entries above it are kept, entries equal to it by a running sum in index order.
    """
    bits = tl.where(candidate, value.to(tl.int32, bitcast=True), -1)  # [R, N]
    w = tl.where(candidate, weight, 0.0)
    lo = tl.full(limit.shape, -1, tl.int32)
    hi = tl.max(bits, 1)
    for _ in range(PASSES):
        probes = _probes(lo, hi, PROBE_BITS)  # [R, P]
        above = tl.sum(tl.where(bits[:, None, :] > probes[:, :, None], w[:, None, :], 0.0), 2)
        lo, hi = _narrow(lo, hi, probes, above < limit[:, None])
    cut = hi[:, None]
    before = tl.sum(tl.where(bits > cut, w, 0.0), 1)  # [R]
    tie_w = tl.where(bits == cut, w, 0.0)
    tie_before = tl.cumsum(tie_w, 1) - tie_w  # weight of equal entries with a lower index
    # A cut of -1 (every candidate fits) must not pull in the non-candidates, whose pattern is -1.
    return candidate & ((bits > cut) | ((bits == cut) & (before[:, None] + tie_before < limit[:, None])))


@triton.jit
def _select_rows_kernel(
    Scores, QueryAware, VSel, SSel, Room, Indices, Counts,
    stride_sbh, stride_sq, stride_vbh, stride_gbh, stride_ibh, stride_iq, stride_cbh,
    q_len, k_len, block_size, row0, row_end, num_k_blocks, num_groups, g_min, max_k, gamma, sqrt_d,
    ROWS: tl.constexpr, NK_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, NEED_SCORES: tl.constexpr,
    HAS_CAP: tl.constexpr, FULL_COVER: tl.constexpr, PROBE_BITS: tl.constexpr, PASSES: tl.constexpr,
):
    """``ROWS`` query blocks of one (batch * head): blocks from the head's plan, packed ascending.

    Grid ``(B * Hq, cdiv(row_end - row0, ROWS))``. ``Scores`` holds this launch's pooled scores
    ``[B*Hq, row_end - row0, nk]`` (``q_pool . k_pool``), divided here by ``sqrt_d`` with a
    correctly rounded division (the reference's ``scores / math.sqrt(D)``, up to the last bit).
    """
    bh = tl.program_id(0).to(tl.int64)
    local = tl.program_id(1) * ROWS + tl.arange(0, ROWS)  # [ROWS] rows within this launch
    qb = row0 + local
    row_ok = qb < row_end
    kb = tl.arange(0, NK_PAD)[None, :]  # [1, NK_PAD]
    off = k_len - q_len
    p0 = (off + qb * block_size)[:, None]  # [ROWS, 1] first / last absolute position of the rows
    p1 = (off + tl.minimum((qb + 1) * block_size, q_len) - 1)[:, None]
    in_range = (kb < num_k_blocks) & row_ok[:, None]  # [ROWS, NK_PAD]
    if IS_CAUSAL:
        allowed = in_range & (kb * block_size <= p1)
    else:
        allowed = in_range
    forced = allowed & ((kb == 0) | ((kb >= p0 // block_size) & (kb <= p1 // block_size)))

    keep = tl.load(VSel + bh * stride_vbh + kb, mask=kb < num_k_blocks, other=0) != 0  # [1, NK_PAD]
    # Block (qb, kb) holds offsets [p0 - key_last, p1 - key_first]: groups lo .. lo + 2 at most.
    # Floor division of possibly negative numbers: shift by whole blocks first.
    shift = num_k_blocks + 2
    key_first = kb * block_size
    key_last = tl.minimum(key_first + block_size, k_len) - 1
    g_lo = (p0 - key_last + shift * block_size) // block_size - shift - g_min  # [ROWS, NK_PAD]
    g_hi = (p1 - key_first + shift * block_size) // block_size - shift - g_min
    for i in tl.static_range(3):
        g = g_lo + i
        g_ok = in_range & (g <= g_hi) & (g >= 0) & (g < num_groups)
        keep = keep | (tl.load(SSel + bh * stride_gbh + g, mask=g_ok, other=0) != 0)
    keep = keep & allowed

    if NEED_SCORES:
        s = tl.load(Scores + bh * stride_sbh + local.to(tl.int64)[:, None] * stride_sq + kb, mask=allowed, other=0.0)
        s = tl.where(allowed, tl.math.div_rn(s, sqrt_d), float("-inf"))
        s_max = tl.max(s, 1)
        e = tl.math.exp2((s - tl.where(row_ok, s_max, 0.0)[:, None]) * _LOG2E)
        e = tl.where(allowed, e, 0.0)
        p = e / tl.maximum(tl.sum(e, 1), 1e-30)[:, None]  # pooled block distribution of each row
        if tl.load(QueryAware + bh) != 0:
            if FULL_COVER:
                covered = allowed
            else:
                row_mass = tl.sum(p, 1)
                covered = _keep_ranked(allowed, p, p, gamma * row_mass, PROBE_BITS, PASSES)
            keep = keep | covered
        keep = keep & ~forced
        if HAS_CAP:
            room = tl.load(Room + qb, mask=row_ok, other=0).to(tl.float32)
            keep = _keep_ranked(keep, p, tl.where(keep, 1.0, 0.0), room, PROBE_BITS, PASSES)
    else:
        keep = keep & ~forced
    keep = (keep | forced) & row_ok[:, None]

    count = tl.sum(keep.to(tl.int32), 1)  # [ROWS]
    slot = tl.cumsum(keep.to(tl.int32), 1) - 1
    row = Indices + bh * stride_ibh + qb.to(tl.int64)[:, None] * stride_iq
    tl.store(row + slot, tl.zeros([ROWS, NK_PAD], dtype=tl.int32) + kb, mask=keep)
    pad = (kb >= count[:, None]) & (kb < max_k) & row_ok[:, None]
    tl.store(row + kb, tl.full([ROWS, NK_PAD], -1, tl.int32), mask=pad)
    tl.store(Counts + bh * stride_cbh + qb, count, mask=row_ok)


# ==================================================================================================
# Launchers
# ==================================================================================================


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _alloc(shape, dtype, device) -> torch.Tensor:
    """``empty``, or NaN / -7 filled when ``SPARSEATTN_NAN_FILL=1`` (tests: unwritten cells fail)."""
    if os.environ.get(NAN_FILL_ENV) == "1":
        return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs need "ieee" to match the fp32 reference; bf16/fp16 products are exact in fp32 anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


def _bhl(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def block_mean(x: torch.Tensor, block_size: int, heads: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, H, L, D]` (last dim contiguous) -> `[B, H, ceil(L / bs), D]` fp32 mean of each block's rows.

    ``heads`` (`[B, H]` bool, optional): only these heads are pooled; the others read nothing and
    get zeros.
    """
    B, H, L, D = x.shape
    n = cdiv(L, block_size)
    out = _alloc((B, H, n, D), torch.float32, x.device)
    chunk = min(512 if _interpreting() else 64, triton.next_power_of_2(block_size))
    flags = out if heads is None else heads.reshape(-1).to(torch.int32).contiguous()
    _block_mean_kernel[(B * H, n)](
        x, out, flags, *_bhl(x), *_bhl(out), H, L, block_size,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CHUNK=chunk, SKIP=heads is not None, num_warps=4,
    )
    return out


# Key tiles per program in the first pass of ``last_block_distributions_fast`` (row max and sum):
# q loaded once per program and the K tiles pipelined, instead of one 128 x 64 tile per program.
STAT_TILES = 8


def last_block_distributions_fast(q: torch.Tensor, k: torch.Tensor, block_size: int, causal: bool = True, *,
                                  block_n: int | None = None, block_m: int | None = None,
                                  stat_tiles: int | None = None):
    """Same contract as ``reference.flexprefill.last_block_distributions``, with the fused kernel.

    ``block_m`` (last-block rows per program) and ``block_n`` (keys per tile) are powers of two
    >= 16, by default 128 and 32 (2.36 ms at 128K against 2.63 for 128 x 64 on the H100, NOTES.md
    run 11), and 32 x 32 for fp32 on a GPU; tests pass small values to exercise
    several tiles and row groups. ``stat_tiles``: key tiles per program of the first pass (row
    max and sum), default ``STAT_TILES`` on a GPU.

    Returns:
        ``(vertical [B, Hq, Lk], slash [B, Hq, n_off], min_offset)`` fp32.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    n_hat = min(block_size, Lq)
    interpret = _interpreting()
    exact = q.dtype == torch.float32 and not interpret  # fp32 "ieee" dots run on CUDA cores: small tiles
    block_m = min(max(16, triton.next_power_of_2(n_hat)), block_m or (32 if exact else 128))
    block_n = block_n or 32
    groups = cdiv(n_hat, block_m)
    tiles = cdiv(Lk, block_n)
    width = block_m + block_n  # diagonals of one [block_m, block_n] tile, padded by one
    dev = q.device
    common = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=block_n,
                  SKEW_W=min(block_m, block_n, 64), ROW_GROUPS=groups, IS_CAUSAL=causal,
                  DOT_PREC=_dot_precision(q.dtype),
                  num_warps=4 if interpret or (block_m * block_n < 128 * 64 and not exact) else 8,
                  num_stages=1)
    grid = (B * Hq, tiles, groups)
    stat_rows = groups * block_m
    stat_tiles = stat_tiles or (1 if interpret else STAT_TILES)
    chunks = cdiv(tiles, stat_tiles)
    stats = _alloc((2, B * Hq, stat_rows, chunks), torch.float32, dev)
    args = (*_bhl(q), *_bhl(k), stats.stride(0), Hq, G, Lq, Lk, n_hat, tiles, LOG2E / math.sqrt(D))
    _last_block_kernel[(B * Hq, chunks, groups)](q, k, stats, stats, stats, stats, *args, PHASE=0,
                                                 STAT_TILES=stat_tiles, **{**common, "num_stages": 2})
    row_max = stats[0].amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    lse = row_max[..., 0] + torch.log2((stats[1] * torch.exp2(stats[0] - row_max)).sum(-1))  # [B*Hq, rows]
    stats = None  # release before the next allocation
    vert = _alloc((B * Hq, groups, Lk), torch.float32, dev)
    part = _alloc((B * Hq, groups, tiles, width), torch.float32, dev)
    _last_block_kernel[grid](q, k, lse, lse.contiguous(), vert, part, *args, PHASE=1, STAT_TILES=1, **common)

    vertical = vert.sum(1).view(B, Hq, Lk) / n_hat
    min_offset = 0 if causal else 1 - n_hat
    n_off = Lk - min_offset
    # Overlap-add: column c of tile tau (row group r) is offset o = Lk - n_hat + r*BM - tau*BN - BN + 1 + c;
    # with tiles reversed, tile tau starts (T - 1 - tau) * BN into a folded row of (T - 1 + pieces) * BN.
    pieces = cdiv(width, block_n)
    part = torch.nn.functional.pad(part, (0, pieces * block_n - width)).flip(2)
    slash = torch.zeros(B * Hq, n_off, dtype=torch.float32, device=dev)
    for group in range(groups):  # a few row groups of the last block, never heads
        folded = torch.zeros(B * Hq, tiles - 1 + pieces, block_n, dtype=torch.float32, device=dev)
        for piece in range(pieces):
            folded[:, piece:piece + tiles] += part[:, group, :, piece * block_n:(piece + 1) * block_n]
        folded = folded.view(B * Hq, -1)
        start = Lk - n_hat - min_offset + group * block_m + 1 - tiles * block_n  # slash index of folded[0]
        lo, hi = max(0, start), min(n_off, start + folded.shape[1])
        slash[:, lo:hi] += folded[:, lo - start:hi - start]
    return vertical, (slash / n_hat).view(B, Hq, n_off), min_offset


def _search_passes(probe_bits: int) -> int:
    """Passes of ``_probes`` that narrow any interval of non-negative fp32 patterns (< 2**31) to one."""
    return -(-31 // probe_bits) + 1


def cover_count_fast(mass: torch.Tensor, gamma: float) -> torch.Tensor:
    """Same contract as ``reference.flexprefill.cover_count`` (int64 `[...]`) for non-negative `mass [..., n]`."""
    return cover_counts_fast([mass], gamma)[0]


def cover_counts_fast(masses: list[torch.Tensor], gamma: float) -> list[torch.Tensor]:
    """``cover_count_fast`` of several tensors (lengths may differ) in one launch: more rows in flight.

    One program per row, so a single launch over the vertical and the slash rows keeps twice as
    many SMs busy as two launches.
    """
    if gamma >= 1:
        return [torch.full(m.shape[:-1], m.shape[-1], dtype=torch.int64, device=m.device) for m in masses]
    device = masses[0].device
    width = max(m.shape[-1] for m in masses)
    flat = torch.cat([torch.nn.functional.pad(m.reshape(-1, m.shape[-1]), (0, width - m.shape[-1]))
                      for m in masses]) if len(masses) > 1 else masses[0].reshape(-1, width).contiguous()
    lengths = torch.cat([torch.full((m.numel() // m.shape[-1],), m.shape[-1], dtype=torch.int32, device=device)
                         for m in masses])
    out = _alloc((flat.shape[0],), torch.int32, device)
    # The interpreter pays per operation, not per element: one wide chunk and 16 probes per pass.
    if _interpreting():
        block, bits, warps = min(4096, max(16, triton.next_power_of_2(width))), 4, 4
    else:  # few rows (B x Hq each): wide chunks and 16 warps keep loads in flight
        block, bits, warps = 8192, 3, 16
    _cover_count_kernel[(flat.shape[0],)](flat, out, lengths, flat.stride(0), float(gamma), BLOCK=block,
                                          PROBE_BITS=bits, PASSES=_search_passes(bits), num_warps=warps)
    counts, row = [], 0
    for m in masses:
        rows = m.numel() // m.shape[-1]
        counts.append(out[row:row + rows].view(m.shape[:-1]).long())
        row += rows
    return counts


def select_rows_fast(index_shape, query_aware, vertical_selected, slash_selected, q_pool, k_pool, *, q_len, k_len,
                 block_size, gamma, sparsity_ratio, causal, g_min, need_scores, max_k):
    """Launch ``_select_rows_kernel`` over all rows (chunked so the pooled scores stay small).

    Same inputs and rule as ``reference.flexprefill.select_rows`` (head plan, fp32 block means)
    plus ``need_scores`` (False skips the pooled scores: no query-aware head can exist and no cap)
    and ``max_k`` (the index width). Returns ``(indices [B, Hq, nq, max_k], counts [B, Hq, nq])`` int32.
    """
    B, Hq, nq, nk = index_shape
    device = query_aware.device
    n_groups = slash_selected.shape[-1]
    indices = _alloc((B * Hq, nq, max_k), torch.int32, device)
    counts = _alloc((B * Hq, nq), torch.int32, device)
    qa = query_aware.reshape(-1).to(torch.int32).contiguous()
    vsel = vertical_selected.reshape(B * Hq, nk).to(torch.int8).contiguous()
    ssel = slash_selected.reshape(B * Hq, n_groups).to(torch.int8).contiguous()
    has_cap = sparsity_ratio is not None
    if has_cap:
        allowed = causal_block_mask(q_len, k_len, block_size, block_size, causal, device=device)
        forced = forced_block_mask(q_len, k_len, block_size, causal, device=device)
        cap = torch.ceil(sparsity_ratio * allowed.sum(-1).double()).long()
        room = (cap - forced.sum(-1)).clamp_min(0).to(torch.int32)
    else:
        room = counts  # never read
    nk_pad = max(16, triton.next_power_of_2(nk))
    if _interpreting():  # few programs, many probes: the interpreter pays per operation
        rows_per_program, bits, warps = min(16, triton.next_power_of_2(nq)), 4, 1
    else:  # one row per program keeps the [rows, probes, nk] search tile in registers
        rows_per_program, bits, warps = 1, 2, (4 if nk_pad <= 1024 else 8 if nk_pad <= 4096 else 16)
    rows_per_launch = nq
    if need_scores:
        rows_per_launch = max(1, min(nq, SCORE_CHUNK_ELEMENTS // max(1, B * Hq * nk)))
        Hkv, D = k_pool.shape[1], k_pool.shape[3]
        G = Hq // Hkv
        q_pool = q_pool.view(B, Hkv, G, nq, D)
        k_t = k_pool.transpose(-1, -2)
    for row0 in range(0, nq, rows_per_launch):  # a few chunks of query blocks, never heads
        rows = min(rows_per_launch, nq - row0)
        if need_scores:
            scores = torch.matmul(q_pool[:, :, :, row0:row0 + rows].reshape(B, Hkv, G * rows, D), k_t)
            scores = scores.view(B * Hq, rows, nk)
        else:
            scores = counts  # never read
        _select_rows_kernel[(B * Hq, cdiv(rows, rows_per_program))](
            scores, qa, vsel, ssel, room, indices, counts,
            scores.stride(0) if need_scores else 0, scores.stride(1) if need_scores else 0,
            vsel.stride(0), ssel.stride(0), indices.stride(0), indices.stride(1), counts.stride(0),
            q_len, k_len, block_size, row0, row0 + rows, nk, n_groups, g_min, max_k, float(gamma),
            math.sqrt(k_pool.shape[3]),
            ROWS=rows_per_program, NK_PAD=nk_pad, IS_CAUSAL=causal, NEED_SCORES=need_scores, HAS_CAP=has_cap,
            FULL_COVER=gamma >= 1, PROBE_BITS=bits, PASSES=_search_passes(bits), num_warps=warps,
        )
        scores = None  # release before the next chunk
    return indices.view(B, Hq, nq, max_k), counts.view(B, Hq, nq)


# ==================================================================================================
# Public functions
# ==================================================================================================


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def index_width(num_k_blocks: int, sparsity_ratio: float | None) -> int:
    """Padded row width of the fast path's ``BlockIndex``: ``nk``, or the cap's bound on a row.

    A capped row keeps ``max(ceil(ratio * allowed), forced)`` blocks, with ``allowed <= nk`` and at
    most 3 forced blocks (block 0 and two diagonal blocks).
    """
    if sparsity_ratio is None:
        return num_k_blocks
    return min(num_k_blocks, max(math.ceil(sparsity_ratio * num_k_blocks), 3))


def flexprefill_select_fast(q: torch.Tensor, k: torch.Tensor, *, gamma: float = 0.9, tau: float = 0.1,
                            min_budget: int | None = None, max_budget: int | None = None, block_size: int = 128,
                            sparsity_ratio: float | None = None, causal: bool = True,
                            return_patterns: bool = False):
    """FlexPrefill block selection on the GPU (Triton), with the fp32 reference's exact contract.

    Same rule, arguments and result as ``sparseattn.reference.flexprefill.flexprefill_select``
    (read its docstring for the method and for where it differs from the public reference), except
    that the index's padded width is ``nk``, or with ``sparsity_ratio`` the smaller bound
    ``index_width(nk, ratio)``. Scores accumulate in fp32 whatever the input dtype; the selection
    equals the reference's except where two candidates are within float rounding of each other
    (summation order differs). No host synchronization and no Python loop over heads or batch.

    Args:
        q: `[B, Hq, Lq, D]` queries (the last ``Lq`` positions); bf16/fp16/fp32 on CUDA, or CPU
            tensors under ``TRITON_INTERPRET=1``.
        k: `[B, Hkv, Lk, D]` keys, ``Hq % Hkv == 0``; never repeated.
        gamma: coverage in (0, 1] (default 0.9).
        tau: JS threshold for query-aware heads, >= 0 (default 0.1).
        min_budget, max_budget: vertical / slash budgets in tokens (default None: unbounded).
        block_size: query and key block size (default 128).
        sparsity_ratio: optional cap in (0, 1] on the fraction of allowed blocks a row keeps.
        causal: causal attention (default True).
        return_patterns: also return `[B, Hq]` bool, True = query-aware head.

    Returns:
        ``BlockIndex`` (or ``(BlockIndex, query_aware)``).

    Example:
        >>> import torch
        >>> from sparseattn.kernels.flexprefill import flexprefill_select_fast
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> q, k = torch.randn(1, 4, 300, 32, device=dev), torch.randn(1, 2, 300, 32, device=dev)
        >>> idx = flexprefill_select_fast(q, k, block_size=64)
        >>> idx.indices.shape
        torch.Size([1, 4, 5, 5])
    """
    B, Hq, Hkv, Lq, Lk, D = check_flexprefill_args(q, k, gamma, tau, min_budget, max_budget, block_size,
                                                   sparsity_ratio, "flexprefill_select_fast")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        raise TypeError(f"flexprefill_select_fast: q and k must share one dtype among float16, bfloat16, "
                        f"float32; got {q.dtype} and {k.dtype}")
    if not q.is_cuda and not _interpreting():
        raise RuntimeError(f"flexprefill_select_fast: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 "
                           f"with CPU tensors); use sparseattn.reference.flexprefill on {q.device}")
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    bs, G = block_size, Hq // Hkv
    nq, nk = cdiv(Lq, bs), cdiv(Lk, bs)
    n_hat = min(bs, Lq)

    vertical, slash, min_offset = last_block_distributions_fast(q, k, bs, causal)
    g_min, n_groups = offset_groups(Lk, min_offset, bs)
    vertical_blocks = sum_pool(vertical, 0, bs, nk)
    slash_groups = sum_pool(slash, min_offset - g_min * bs, bs, n_groups)
    k_pool = block_mean(k, bs)  # [B, Hkv, nk, D]
    q_hat_mean = q[:, :, Lq - n_hat:].float().mean(2).reshape(B, Hkv, G, D)
    estimate = torch.softmax(torch.matmul(q_hat_mean, k_pool.transpose(-1, -2)) / math.sqrt(D), dim=-1)
    query_aware, vertical_selected, slash_selected = plan_heads(
        vertical_blocks, slash_groups, *cover_counts_fast([vertical, slash], gamma),
        estimate.reshape(B, Hq, nk), tau=tau, min_budget=min_budget, max_budget=max_budget, block_size=bs,
        slash_group0=-g_min)
    vertical = slash = None  # release before pooling q
    need_scores = tau > 0 or sparsity_ratio is not None
    # Without a cap only query-aware heads read pooled scores: pool only their queries (Q is the
    # largest tensor read by the selection).
    q_pool = block_mean(q, bs, heads=None if sparsity_ratio is not None else query_aware) if need_scores else None
    indices, counts = select_rows_fast(
        (B, Hq, nq, nk), query_aware, vertical_selected, slash_selected, q_pool, k_pool, q_len=Lq, k_len=Lk,
        block_size=bs, gamma=gamma, sparsity_ratio=sparsity_ratio, causal=causal, g_min=g_min,
        need_scores=need_scores, max_k=index_width(nk, sparsity_ratio))
    index = BlockIndex(indices, counts, bs, bs, Lq, Lk)
    return (index, query_aware) if return_patterns else index
