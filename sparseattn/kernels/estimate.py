"""XAttention's estimation on the GPU: strided antidiagonal block masses and the block selection.

Three levels (STYLE.md; no autograd level, selection has no gradient): ``_block_mass_kernel`` ->
``block_mass_forward`` (launcher: tiles, scratch, chunking, grid) -> ``xattention_estimate`` and
``xattention_select_fast`` (validation and the full docstrings). The fp32 ground truth is
``sparseattn.reference.xattention`` (``xattention_block_mass``, ``xattention_select``).

What one program computes. A program owns ``BLOCK_M`` reshaped query rows (``BLOCK_M * S``
queries, whole selection blocks) of one query head and walks the reshaped key columns in tiles of
``BLOCK_N``. A score tile is ``A[i, j] = sum_t q[iS+S-1-t] . k[jS+t]``: ``S`` accumulated
``[BLOCK_M, D] x [D, BLOCK_N]`` dots whose operand rows are strided loads straight from
``q [B, Hq, L, D]`` (rows reversed inside each stride group) and ``k [B, Hkv, L, D]`` (query head
``h`` reads KV head ``h // G``; K is never repeated or reshaped in memory). Rows past the end of
``q``/``k`` load 0, which is the reference's zero padding of a partial stride group.

Softmax and block sums in one pass. The mass of a cell is ``sum_i (1/l_i) sum_j exp(s_ij - m_i)``
over its ``bs/S`` rows and ``bs/S`` columns, and a row's normalizer ``l_i`` is only known after its
last key tile. So per key tile the program keeps the online max ``m_i``/sum ``l_i`` and writes two
small things to a scratch buffer: the per-row, per-key-block partial sums ``sum_j exp2(s_ij -
m_i(tile))`` (``[BLOCK_M, BLOCK_N/(bs/S)]``) and the running max ``m_i(tile)`` it used
(``[BLOCK_M]``). After the last tile (and a CTA barrier) the same program reads its own scratch
back, rescales by ``exp2(m_i(tile) - m_i) / l_i`` (exactly flash-attention's rescaling, no log
round trip) and sums ``bs/S`` rows into each cell. Nothing ``L x L`` is stored: the scratch is
``(L/S) x (L/bs)`` per head, chunked over heads (and rows, for very long sequences) to
``SCRATCH_ELEMENTS``.

Why this design (H100, B=1, Hq=32, D=128, bf16, causal, L=128K; cuDNN dense ~245 ms, 4%/8% =
9.8/19.6 ms):

- Score FLOPs (all options): causal half of ``2 (L/S)^2 (S D)`` per head = ``Hq L^2 D / S``
  = 4.4 TFLOP at S=16, 8.8 at S=8 (1/(2S) of dense attention's ``2 Hq L^2 D`` = 141 TFLOP). At
  ~450-550 TFLOP/s of bf16 tensor-core throughput that is ~8-10 ms (S=16) / ~16-20 ms (S=8): the
  GEMM alone is the budget, so every byte or FLOP added on top has to be small.
- (a) score buffer + second softmax/block-sum kernel (the original XAttention layout): the causal
  half of ``Hq (L/S)^2`` scores = 1.07 G (S=16) / 4.3 G (S=8) elements written and read back:
  fp32 8.6 / 34 GB = 2.9 / 11.5 ms at ~3 TB/s (bf16 half that). S=8 blows the budget.
- (b) two passes over K in one kernel (max/sum, then recompute): no buffer, but 2x the GEMM:
  ~17-20 ms at S=16 = 7-8% of dense. Blows the budget.
- (c) this kernel: one GEMM pass; the scratch is ``(bs/S)`` times smaller than (a)'s scores:
  causal half of ``Hq (L/S)(L/bs + L/(S BLOCK_N))`` fp32 = 0.57 GB (S=16) / 1.2 GB (S=8)
  written once and read back once by the same program: ~0.4 / 0.8 ms of HBM time. The exp2
  count (1.07 G at S=16) is ~0.3 ms of MUFU time, overlapped with the ``2 S D`` = 4096 MMA FLOPs
  per score. Expected total ~ GEMM time + 4%.
- GEMM shape: the reduction dim is ``S D`` (2048 at S=16), so a 128 x 128 output tile does 16
  ``[128,128]x[128,128]`` dots per softmax epilogue; operands stream from L2 (a program re-reads
  its ``q`` rows for every key tile, as any GEMM re-reads its A panel): 64 FLOP per L2 byte, the
  usual 128 x 128 tile. Compiled offline for sm_90a (triton 3.6 and 3.9): wgmma, 3-stage cp.async
  pipeline, 194 KB shared memory, ~190-210 registers, no spills, one CTA per SM. Measured since
  (benchmarks/NOTES.md, runs 11 and 17): 128 x 256 tiles, with each stride step's dot split into
  two 64-wide steps over the head dim (``d_steps = 2``: 48 KB stages, so 4 of them fit and three
  steps are in flight; with whole-D 96 KB stages only two fit and each step waited for the last
  copy). 128K: 9.41 ms at S = 16 (3.8% of cuDNN dense, 467 TFLOP/s), 18.99 ms at S = 8 (7.7%).
- Work order: programs of one launch are ordered heaviest query tiles first (causal), all heads
  of a chunk interleaved, so the tail of a launch is short.

Selection (``xattention_select_fast``) then applies the reference's ``keep_until_covered`` rule
to the masses with one Triton launch, ``kernels.coverage.coverage_select`` (a per-row bisection
instead of a sort; ``[B, Hq, nq, nk]`` is 1024 x 1024 per head at 128K with bs=128), which writes
the ``BlockIndex`` with ``max_k = nk`` directly; rows wider than ``MAX_KEY_BLOCKS`` use the torch
sort. No host synchronization anywhere.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..index import BlockIndex, causal_block_mask, cdiv
from ..reference.streaming import forced_block_mask
from ..reference.xattention import CHUNK_ELEMENTS, _threshold_per_head, check_qk, keep_until_covered
from .coverage import MAX_KEY_BLOCKS, coverage_select

__all__ = [
    "EstimateConfig",
    "SCRATCH_ELEMENTS",
    "block_mass_forward",
    "default_estimate_configs",
    "xattention_estimate",
    "xattention_select_fast",
]

LOG2E = 1.4426950408889634
# Same switch as block_sparse.py: "1" allocates outputs NaN-filled so unwritten cells fail tests.
NAN_FILL_ENV = "SPARSEATTN_NAN_FILL"
# fp32 elements of one launch's scratch (block sums + tile maxima), 256 MB: 128K tokens at S=16
# need 1.1 GB in all, so that case runs in ~5 launches of ~7 heads each.
SCRATCH_ELEMENTS = 1 << 26


# ==================================================================================================
# Triton kernel
# ==================================================================================================


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs need "ieee" to match the fp32 reference (tf32 keeps 10 mantissa bits); for
    # bf16/fp16 the default precision is exact products with fp32 accumulation anyway.
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _key_tiles(m_i, l_i, tile_begin, tile_end, q_base, q_tile_offs, q_first, q_first_row, k_base, k_tile_offs, offs_n,
               row_last, q_len, k_len, num_cols, qk_scale, stride_qm, stride_kn, Sums, Maxes, sum_offs, max_offs,
               STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PER_BLOCK: tl.constexpr,
               MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, IEEE: tl.constexpr, D_STEPS: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Key tiles ``[tile_begin, tile_end)`` of ``BLOCK_N`` reshaped columns: scores, online softmax, block sums.

    A tile's scores ``A[i, j] = sum_t q[iS+S-1-t] . k[jS+t]`` are ``STRIDE`` accumulated dots.
    ``q_first_row [BLOCK_M]`` is the q row ``iS + S-1`` read at ``t = 0`` by each reshaped row
    ``i``, ``q_first`` the same (int64 scalar) for the tile's first row. ``q_tile_offs`` and
    ``k_tile_offs`` are int32 offsets inside a tile; the int64 part is one scalar per step (int64
    pointer tiles cost ~20 more registers). ``MASK``: bounds-masked key loads and the causal /
    end-of-keys cut.

    One flat loop over ``(tile, t, d)`` rather than a loop over ``t`` nested in a loop over tiles:
    Triton pipelines only the innermost loop, and a nested loop would drain its 3-stage pipeline
    at every tile's softmax. ``D_STEPS`` > 1 splits each dot's head dim into ``BLOCK_K``-wide steps
    (smaller pipeline stages, so more of them fit in shared memory).
    """
    KB_PER_TILE: tl.constexpr = BLOCK_N // PER_BLOCK
    STEPS: tl.constexpr = STRIDE * D_STEPS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in range(tile_begin * STEPS, tile_end * STEPS):
        tile = it // STEPS
        t = (it // D_STEPS) % STRIDE
        d0 = (it % D_STEPS) * BLOCK_K
        q_rows = q_first_row - t  # [BLOCK_M]; rows past q_len: zero padding of the last stride group
        q_step = q_base + (q_first - t) * stride_qm + d0
        q = tl.load(q_step + q_tile_offs, mask=(q_rows < q_len)[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
        k_first = tile * BLOCK_N * STRIDE + t  # key row of column tile * BLOCK_N at step t
        k_step = k_base + tl.cast(k_first, tl.int64) * stride_kn + d0
        if MASK:
            k_rows = k_first + offs_n * STRIDE  # [BLOCK_N]
            k = tl.load(k_step + k_tile_offs, mask=(k_rows < k_len)[:, None], other=0.0)  # [BLOCK_N, BLOCK_K]
        else:
            k = tl.load(k_step + k_tile_offs)
        acc = _dot_acc(q, tl.trans(k), acc, IEEE)  # [BLOCK_M, BLOCK_N]
        if it % STEPS == STEPS - 1:
            s = acc * qk_scale
            if MASK:
                cols = tile * BLOCK_N + offs_n  # [BLOCK_N]
                keep = cols[None, :] < num_cols
                if IS_CAUSAL:
                    keep = keep & (cols[None, :] * STRIDE <= row_last[:, None])
                s = tl.where(keep, s, float("-inf"))
            m_i, l_i = _softmax_tile(s, m_i, l_i, Sums, Maxes, sum_offs, max_offs, tile,
                                     BLOCK_M, KB_PER_TILE, PER_BLOCK)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    return m_i, l_i


@triton.jit
def _softmax_tile(s, m_i, l_i, Sums, Maxes, sum_offs, max_offs, tile,
                  BLOCK_M: tl.constexpr, KB_PER_TILE: tl.constexpr, PER_BLOCK: tl.constexpr):
    """Online-softmax step; write this tile's per-row key-block sums and the max they are relative to."""
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]; finite: every row allows column 0 in tile 0
    p = tl.math.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)
    block_sums = tl.sum(tl.reshape(p, [BLOCK_M, KB_PER_TILE, PER_BLOCK]), 2)  # [BLOCK_M, KB_PER_TILE]
    tl.store(Sums + sum_offs + tile * KB_PER_TILE, block_sums)
    tl.store(Maxes + max_offs + tile, m_new)
    return m_new, l_i


@triton.jit
def _block_mass_kernel(
    Q, K, Mass, Sums, Maxes,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_mb, stride_mh, stride_mq,
    stride_sh, stride_sm, stride_xh, stride_xm,
    head0, row0, num_heads, group_size, q_len, k_len, num_q_blocks, num_k_blocks, qk_scale,
    HEAD_DIM: tl.constexpr, STRIDE: tl.constexpr, PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IEEE: tl.constexpr, REVERSE: tl.constexpr, D_STEPS: tl.constexpr = 1,
):
    """Block masses of ``BLOCK_M`` reshaped rows of one (batch, query head).

    Grid: ``(heads in this launch, query tiles in this launch)``. ``Sums [heads, rows, nk_pad]`` and
    ``Maxes [heads, rows, n_tiles]`` are this launch's scratch (rows relative to ``row0``).
    """
    KB_PER_TILE: tl.constexpr = BLOCK_N // PER_BLOCK
    QB_PER_TILE: tl.constexpr = BLOCK_M // PER_BLOCK
    pid_h = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    if REVERSE:  # causal: the last query tiles see the most keys; start them first
        pid_m = tl.num_programs(1) - 1 - pid_m
    bh = head0 + pid_h
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // group_size
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + kvh * stride_kh

    num_rows = tl.cdiv(q_len, STRIDE)  # reshaped query rows
    num_cols = tl.cdiv(k_len, STRIDE)  # reshaped key columns
    off = k_len - q_len  # absolute position of query 0
    local_m = pid_m * BLOCK_M  # first row of this tile within the launch's scratch
    start_m = row0 + local_m
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M] reshaped rows
    offs_n = tl.arange(0, BLOCK_N)
    BLOCK_K: tl.constexpr = HEAD_DIM // D_STEPS
    offs_d = tl.arange(0, BLOCK_K)
    row_ok = offs_m < num_rows
    # Last absolute position of each reshaped row: column j is causal iff j*S <= it.
    row_last = off + tl.minimum(offs_m * STRIDE + STRIDE, q_len) - 1  # [BLOCK_M]
    q_first_row = offs_m * STRIDE + (STRIDE - 1)  # [BLOCK_M] q row read first (t = 0) by each row
    q_first = tl.cast(start_m, tl.int64) * STRIDE + (STRIDE - 1)
    # int32 offsets inside a tile (the launcher checks they fit): a scalar int64 base per step.
    q_tile_offs = (tl.arange(0, BLOCK_M) * (STRIDE * stride_qm))[:, None] + offs_d[None, :]  # [BLOCK_M, BLOCK_K]
    k_tile_offs = (offs_n * (STRIDE * stride_kn))[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_K]

    if IS_CAUSAL:
        last_row = tl.minimum(start_m + BLOCK_M, num_rows) - 1
        n_end = tl.minimum(num_cols, (off + tl.minimum(last_row * STRIDE + STRIDE, q_len) - 1) // STRIDE + 1)
        n_first = tl.minimum(num_cols, (off + tl.minimum(start_m * STRIDE + STRIDE, q_len) - 1) // STRIDE + 1)
    else:
        n_end = num_cols
        n_first = num_cols
    # Tiles below every row's diagonal and made of whole stride groups need no mask at all.
    tiles_full = tl.minimum(n_first, k_len // STRIDE) // BLOCK_N
    tiles_end = tl.cdiv(n_end, BLOCK_N)

    sum_offs = pid_h * stride_sh + (local_m + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None] * stride_sm \
        + tl.arange(0, KB_PER_TILE)[None, :]  # [BLOCK_M, KB_PER_TILE]
    max_offs = pid_h * stride_xh + (local_m + tl.arange(0, BLOCK_M)).to(tl.int64) * stride_xm  # [BLOCK_M]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Unmasked tiles first, then the tiles that straddle the diagonal or the end of the keys.
    m_i, l_i = _key_tiles(m_i, l_i, 0, tiles_full, q_base, q_tile_offs, q_first, q_first_row, k_base,
                          k_tile_offs, offs_n, row_last, q_len, k_len, num_cols, qk_scale, stride_qm, stride_kn,
                          Sums, Maxes, sum_offs, max_offs, STRIDE, BLOCK_M, BLOCK_N, PER_BLOCK, False, IS_CAUSAL, IEEE,
                          D_STEPS, BLOCK_K)
    m_i, l_i = _key_tiles(m_i, l_i, tiles_full, tiles_end, q_base, q_tile_offs, q_first, q_first_row, k_base,
                          k_tile_offs, offs_n, row_last, q_len, k_len, num_cols, qk_scale, stride_qm, stride_kn,
                          Sums, Maxes, sum_offs, max_offs, STRIDE, BLOCK_M, BLOCK_N, PER_BLOCK, True, IS_CAUSAL, IEEE,
                          D_STEPS, BLOCK_K)

    # The scratch rows were written by other threads of this program: make them visible. The
    # loads below use ".cg" (L2, not L1) so no stale L1 line can be read either.
    tl.debug_barrier()
    inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)  # rows past the queries (zero padding) carry no mass
    offs_qb = start_m // PER_BLOCK + tl.arange(0, QB_PER_TILE)  # [QB_PER_TILE]
    offs_kb = tl.arange(0, KB_PER_TILE)
    mass_base = Mass + b * stride_mb + h * stride_mh + offs_qb.to(tl.int64)[:, None] * stride_mq
    qb_ok = offs_qb[:, None] < num_q_blocks
    for tile in range(0, tiles_end):
        sums = tl.load(Sums + sum_offs + tile * KB_PER_TILE, cache_modifier=".cg")  # [BLOCK_M, KB_PER_TILE]
        tile_max = tl.load(Maxes + max_offs + tile, cache_modifier=".cg")  # [BLOCK_M]
        weight = tl.math.exp2(tile_max - m_i) * inv_l  # <= 1/l: m_i is the final row max
        cells = tl.sum(tl.reshape(sums * weight[:, None], [QB_PER_TILE, PER_BLOCK, KB_PER_TILE]), 1)
        kb = tile * KB_PER_TILE + offs_kb  # [KB_PER_TILE]
        tl.store(mass_base + kb[None, :], cells, mask=qb_ok & (kb[None, :] < num_k_blocks))
    # Key blocks no row of this tile may see (causal) have zero mass.
    for tile in range(tiles_end, tl.cdiv(num_k_blocks, KB_PER_TILE)):
        kb = tile * KB_PER_TILE + offs_kb
        tl.store(mass_base + kb[None, :], tl.zeros([QB_PER_TILE, KB_PER_TILE], dtype=tl.float32),
                 mask=qb_ok & (kb[None, :] < num_k_blocks))


# ==================================================================================================
# Launcher
# ==================================================================================================


@dataclass(frozen=True)
class EstimateConfig:
    """Tile shape and launch options of ``_block_mass_kernel``.

    Args:
        block_m: reshaped query rows per program (raised to ``2 * bs/S`` when smaller).
        block_n: reshaped key columns per tile (raised to ``2 * bs/S`` when smaller).
        num_warps: warps per program.
        num_stages: software-pipelining depth of the loop over (key tile, stride step).
        d_steps: steps per dot over the head dim (1: one ``[block_m, D] x [D, block_n]`` dot per
            stride step; 2: two of ``D/2``, halving a pipeline stage's shared memory).
    """

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    d_steps: int = 1

    def __post_init__(self):
        for name in ("block_m", "block_n", "num_warps", "num_stages", "d_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"EstimateConfig: {name} must be a positive int, got {value!r}")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value & (value - 1) or value < 16:
                raise ValueError(f"EstimateConfig: {name} must be a power of two >= 16 (tl.dot), got {value}")
        if self.d_steps & (self.d_steps - 1):
            raise ValueError(f"EstimateConfig: d_steps must be a power of two, got {self.d_steps}")


def default_estimate_configs(head_dim: int, dtype: torch.dtype, device: torch.device,
                             stride: int = 8) -> list[EstimateConfig]:
    """Configs to try in order; a config that runs out of shared memory falls through to the next.

    D = 128 is tuned on the H100 (``benchmarks/bench_xattention.py --sweep``, benchmarks/NOTES.md
    runs 3, 11 and 17): 128x256 tiles with 8 warps and the head dim in two 64-wide steps per dot,
    4 stages at S >= 16 (run 17a's sweep at 128K: 9.26 ms, against 12.92 ms with whole-D steps and
    2 stages) and 3 at S = 8 (18.39 ms against 24.59 for 64x128/4 warps/3 stages). D = 64 is untuned.
    """
    if device.type != "cuda":  # the interpreter: numpy cost grows with the number of tl ops, not tile size
        return [EstimateConfig(block_m=32, block_n=32, num_warps=1, num_stages=1)]
    if dtype == torch.float32:
        return [EstimateConfig(64, 64, 4, 2), EstimateConfig(32, 32, 4, 1)]
    if head_dim <= 64:
        return [EstimateConfig(128, 128, 8, 3), EstimateConfig(128, 64, 4, 3), EstimateConfig(64, 64, 4, 2)]
    # D = 128: a 128x256 stage is (128 + 256) x 64 bf16 = 48 KB of shared memory with d_steps = 2
    # (4 stages: 200 KB, an H100's budget; smaller GPUs fall through to the next configs).
    if stride >= 16:
        return [EstimateConfig(128, 256, 8, 4, 2), EstimateConfig(128, 256, 8, 3, 2), EstimateConfig(128, 256, 8, 2),
                EstimateConfig(64, 128, 4, 3), EstimateConfig(128, 64, 4, 2), EstimateConfig(64, 64, 4, 2)]
    return [EstimateConfig(128, 256, 8, 3, 2), EstimateConfig(64, 128, 4, 3), EstimateConfig(128, 128, 8, 3),
            EstimateConfig(128, 64, 4, 2), EstimateConfig(64, 64, 4, 2)]


# Config that compiled for a key (head_dim, stride, block_size, dtype, device index), so the
# fall-through above happens once per process.
_WORKING_CONFIG: dict[tuple, EstimateConfig] = {}


def _alloc_mass(shape, device) -> torch.Tensor:
    if os.environ.get(NAN_FILL_ENV) == "1":
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def block_mass_forward(q: torch.Tensor, k: torch.Tensor, *, stride: int, block_size: int, causal: bool = True,
                       out: torch.Tensor | None = None, config: EstimateConfig | None = None,
                       scratch_elements: int = SCRATCH_ELEMENTS) -> torch.Tensor:
    """Launch ``_block_mass_kernel`` over all heads and rows (inputs already validated).

    Args:
        q: `[B, Hq, Lq, D]`, last dim contiguous. k: `[B, Hkv, Lk, D]`, last dim contiguous.
        stride, block_size, causal: as in ``xattention_estimate``.
        out: `[B, Hq, nq, nk]` contiguous fp32 to write (tests pass it NaN-filled); allocated if None.
        config: tile shape; by default the first of ``default_estimate_configs`` that compiles.
        scratch_elements: fp32 elements of scratch per launch; more heads/rows mean more launches.

    Returns:
        ``out``, every element written.
    """
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    S, bs = stride, block_size
    per_block = bs // S
    nq, nk = cdiv(Lq, bs), cdiv(Lk, bs)
    if out is None:
        out = _alloc_mass((B, Hq, nq, nk), q.device)
    key = (D, S, bs, q.dtype, q.device.type, q.device.index)
    if config is not None:
        configs = [config]
    elif key in _WORKING_CONFIG:
        configs = [_WORKING_CONFIG[key]]
    else:
        configs = default_estimate_configs(D, q.dtype, q.device, S)
    last_error = None
    for cfg in configs:
        try:
            _launch(q, k, out, S, per_block, causal, cfg, scratch_elements)
        except triton.runtime.errors.OutOfResources as err:  # too much shared memory: next config
            last_error = err
            continue
        if config is None:
            _WORKING_CONFIG[key] = cfg
        return out
    raise last_error


def _launch(q, k, out, S, per_block, causal, cfg: EstimateConfig, scratch_elements: int):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nq, nk = out.shape[2], out.shape[3]
    # Whole selection blocks per program (the cell sums stay inside it); at least 2 per side so
    # no tensor dimension is 1.
    block_m = max(cfg.block_m, 2 * per_block)
    block_n = max(cfg.block_n, 2 * per_block)
    # The kernel's offsets inside one tile are int32: rows S * stride apart, BLOCK of them.
    if block_m * S * q.stride(2) + D >= 2**31:
        q = q.contiguous()
    if block_n * S * k.stride(2) + D >= 2**31:
        k = k.contiguous()
    d_steps = min(cfg.d_steps, D // 16)  # tl.dot needs K >= 16
    kb_per_tile = block_n // per_block
    n_tiles = cdiv(nk, kb_per_tile)
    nk_pad = n_tiles * kb_per_tile
    rows = cdiv(Lq, S)
    m_tiles = cdiv(rows, block_m)
    per_row = nk_pad + n_tiles  # scratch floats per reshaped row of one head
    heads = B * Hq
    # Split into the fewest launches whose scratch fits, then spread the work evenly over them: a
    # launch with a few heads left over would leave most SMs idle.
    if m_tiles * block_m * per_row <= scratch_elements:
        most = max(1, min(heads, scratch_elements // (m_tiles * block_m * per_row)))
        heads_per_launch = cdiv(heads, cdiv(heads, most))
        tiles_per_launch = m_tiles
    else:  # one head's rows do not fit: split the rows too
        most = max(1, scratch_elements // (block_m * per_row))
        tiles_per_launch = cdiv(m_tiles, cdiv(m_tiles, most))
        heads_per_launch = 1
    scratch_rows = tiles_per_launch * block_m
    sums = torch.empty(heads_per_launch, scratch_rows, nk_pad, dtype=torch.float32, device=q.device)
    maxes = torch.empty(heads_per_launch, scratch_rows, n_tiles, dtype=torch.float32, device=q.device)
    qk_scale = LOG2E / (math.sqrt(D) * S)
    # Launches run in stream order, so they can share one scratch.
    for head0 in range(0, heads, heads_per_launch):
        num_h = min(heads_per_launch, heads - head0)
        for tile0 in range(0, m_tiles, tiles_per_launch):
            num_m = min(tiles_per_launch, m_tiles - tile0)
            _block_mass_kernel[(num_h, num_m)](
                q, k, out, sums, maxes,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                out.stride(0), out.stride(1), out.stride(2),
                sums.stride(0), sums.stride(1), maxes.stride(0), maxes.stride(1),
                head0, tile0 * block_m, Hq, Hq // Hkv, Lq, Lk, nq, nk, qk_scale,
                HEAD_DIM=D, STRIDE=S, PER_BLOCK=per_block, BLOCK_M=block_m, BLOCK_N=block_n,
                IS_CAUSAL=causal, IEEE=q.dtype == torch.float32, REVERSE=causal, D_STEPS=d_steps,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )


# ==================================================================================================
# Public functions
# ==================================================================================================


def _check_estimate_args(q, k, stride, block_size, name):
    B, Hq, Hkv, Lq, Lk, D = check_qk(q, k, name)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        raise TypeError(f"{name}: q and k must share one dtype among float16, bfloat16, float32; "
                        f"got {q.dtype} and {k.dtype}")
    if not isinstance(stride, int) or isinstance(stride, bool) or stride <= 0:
        raise ValueError(f"{name}: stride must be a positive int, got {stride!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0 or block_size % stride:
        raise ValueError(f"{name}: block_size ({block_size!r}) must be a positive multiple of stride ({stride})")
    per_block = block_size // stride
    if per_block & (per_block - 1):
        raise ValueError(f"{name}: block_size / stride must be a power of two (the kernel's tile shape), "
                         f"got {block_size} / {stride} = {per_block}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"{name}: head_dim must be a power of two >= 16, got {D}")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{name}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 with CPU "
                           f"tensors); use sparseattn.reference.xattention on {q.device}")
    return B, Hq, Hkv, Lq, Lk, D


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def xattention_estimate(q: torch.Tensor, k: torch.Tensor, *, stride: int, block_size: int,
                        causal: bool = True) -> torch.Tensor:
    """XAttention's antidiagonal block masses with the fused Triton kernel.

    Same definition as ``sparseattn.reference.xattention.xattention_block_mass``: zero-pad q and k
    to multiples of ``stride`` S, score reshaped row ``i`` against reshaped column ``j`` with
    ``A[i, j] = sum_t q[iS+S-1-t] . k[jS+t] / (sqrt(D) S)``, cut causally (column ``j`` allowed iff
    ``jS <= (Lk-Lq) + min(iS+S, Lq) - 1``), softmax each row, and sum the probabilities of each
    ``(bs/S) x (bs/S)`` cell. Scores are accumulated in fp32 whatever the input dtype.

    Args:
        q: `[B, Hq, Lq, D]` queries (the last ``Lq`` positions); bf16/fp16/fp32 on CUDA, or fp32 CPU
            tensors under ``TRITON_INTERPRET=1``. ``D`` a power of two >= 16.
        k: `[B, Hkv, Lk, D]` keys, ``Hq % Hkv == 0``, ``Lq <= Lk``; query head ``h`` reads KV head
            ``h // (Hq // Hkv)`` (K is never repeated).
        stride: antidiagonal stride S (4, 8, 16, ...).
        block_size: query and key block size, a multiple of ``stride`` with ``block_size / stride``
            a power of two.
        causal: causal cut (default True); False lets every row see every column.

    Returns:
        `[B, Hq, nq, nk]` fp32, ``nq = ceil(Lq / bs)``, ``nk = ceil(Lk / bs)``. Each full reshaped
        row contributes mass 1, so a row of blocks sums to ``bs / S`` (less for the last block).

    Example:
        >>> import torch
        >>> from sparseattn.kernels.estimate import xattention_estimate
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> q, k = torch.randn(1, 2, 70, 16, device=dev), torch.randn(1, 1, 70, 16, device=dev)
        >>> mass = xattention_estimate(q, k, stride=4, block_size=16)
        >>> mass.shape, bool(torch.allclose(mass.sum(-1)[..., :-1], torch.tensor(4.0, device=dev)))
        (torch.Size([1, 2, 5, 5]), True)
    """
    _check_estimate_args(q, k, stride, block_size, "xattention_estimate")
    return block_mass_forward(_last_dim_contiguous(q), _last_dim_contiguous(k), stride=stride,
                              block_size=block_size, causal=causal)


def xattention_select_fast(q: torch.Tensor, k: torch.Tensor, *, threshold, stride: int = 16, block_size: int = 128,
                           causal: bool = True) -> BlockIndex:
    """XAttention block selection on the GPU: fused Triton masses + the reference's threshold rule.

    The contract of ``sparseattn.reference.xattention.xattention_select``: per query-block row,
    keep key block 0 and the diagonal blocks, then the other causal blocks by descending mass
    (ties: lower index first) until ``threshold`` of the row's mass is covered (the crossing block
    is kept); ``threshold >= 1`` keeps every causal block. No host synchronization, so it can be
    captured in a CUDA graph.

    Args:
        q: `[B, Hq, Lq, D]` queries, the last ``Lq`` positions (see ``xattention_estimate``).
        k: `[B, Hkv, Lk, D]` keys, ``Hq % Hkv == 0``.
        threshold: coverage, a float or a `[Hq]` tensor (per head).
        stride: antidiagonal stride S (default 16).
        block_size: query and key block size (default 128), a multiple of ``stride``.
        causal: causal attention (default True); non-causal allows every block.

    Returns:
        ``BlockIndex`` with `indices [B, Hq, nq, nk]` (``max_k = nk``, rows ``-1`` padded) and
        `counts [B, Hq, nq]`.

    Example:
        >>> import torch
        >>> from sparseattn.kernels.estimate import xattention_select_fast
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> q, k = torch.randn(1, 4, 300, 32, device=dev), torch.randn(1, 2, 300, 32, device=dev)
        >>> idx = xattention_select_fast(q, k, threshold=0.9, stride=8, block_size=64)
        >>> idx.indices.shape
        torch.Size([1, 4, 5, 5])
    """
    B, Hq, _, Lq, Lk, _ = _check_estimate_args(q, k, stride, block_size, "xattention_select_fast")
    thr = _threshold_per_head(threshold, Hq, q.device)
    mass = block_mass_forward(_last_dim_contiguous(q), _last_dim_contiguous(k), stride=stride,
                              block_size=block_size, causal=causal)
    nq, nk = mass.shape[2:]
    if nk <= MAX_KEY_BLOCKS:
        return coverage_select(mass, threshold=thr.reshape(-1) if torch.is_tensor(thr) else thr, q_len=Lq, k_len=Lk,
                               block_size=block_size, causal=causal)
    allowed = causal_block_mask(Lq, Lk, block_size, block_size, causal, device=q.device)
    forced = forced_block_mask(Lq, Lk, block_size, causal, device=q.device)
    mask = torch.empty(B, Hq, nq, nk, dtype=torch.bool, device=q.device)
    # Sort temporaries are int64: chunk rows so they stay within the reference's memory bound.
    blocks_per_chunk = max(1, CHUNK_ELEMENTS // (4 * B * Hq * nk))
    for qb0 in range(0, nq, blocks_per_chunk):
        qb1 = min(nq, qb0 + blocks_per_chunk)
        mask[:, :, qb0:qb1] = keep_until_covered(mass[:, :, qb0:qb1], allowed[qb0:qb1], forced[qb0:qb1], thr)
    return BlockIndex.from_mask(mask, block_q=block_size, block_k=block_size, q_len=Lq, k_len=Lk, max_k=nk)
