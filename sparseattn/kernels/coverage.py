"""The coverage rule on the GPU: block masses -> a ``BlockIndex`` in one Triton launch.

XAttention keeps, per query-block row, key block 0 and the diagonal blocks (*forced*), then the
other causal blocks (*candidates*) by descending mass until ``threshold`` of the row's mass is
covered, the crossing block included. The fp32 ground truth is
``sparseattn.reference.xattention.keep_until_covered``: a stable descending sort, an exclusive
cumulative sum, a scatter back, and then ``BlockIndex.from_mask`` packs the kept columns with a
second sort. At 128K (32 heads, 128-blocks: 32K rows of 1024 masses) those torch ops cost
~4.5 ms, as much as a third of XAttention's estimation (benchmarks/NOTES.md, run 17).

No sort is needed. Write ``T = threshold * row_mass``, ``F`` the forced mass and, for a value
``v``, ``f(v) = sum of the candidate masses > v``, non-increasing in ``v``. A candidate ``c``
without a tie is kept iff ``F`` plus the masses sorted before it is less than ``T``, i.e. iff
``F + f(m_c) < T``. So the kept candidates are exactly those with ``m_c >= v0``, where ``v0`` is
the smallest value with ``F + f(v0) < T``: a bisection. Masses are non-negative fp32, whose bit patterns order like their
values, so the bisection runs over the integers ``[0, bits(+inf)]``: 31 steps, each a masked row
sum, and ``v0`` is exactly one of the row's masses (or +inf when ``F >= T``: nothing to add).

Ties at ``v0`` follow the reference's stable order (lower index first): the ``r``-th tied
candidate sees ``F + f(v0) + (r - 1) v0`` before it and is kept iff that is ``< T``. Mass-zero
candidates tie at ``v0 = 0`` and are all kept when the positive mass does not reach ``T``, as in
the reference. ``threshold >= 1`` keeps every allowed block.

Rounding: the reference compares a cumulative sum in sorted order, this kernel a masked sum in
the order of ``tl.sum``; the two fp32 sums can differ in the last bits. A decision can therefore
flip only where a running sum lies within rounding of the threshold; the tests assert that no
decision of their seeded inputs is that close and then require exact equality (tests/test_estimate.py).

One program owns ``ROWS`` query-block rows of one (batch, head) and the whole key-block axis
(``NKP`` = the next power of two of ``nk``, 1024 at 128K with 128-blocks), held in registers:
masses read once, the kept columns written ascending with a prefix sum, the tail padded with -1.
Rows longer than ``MAX_KEY_BLOCKS`` use the torch path (``keep_until_covered`` + ``from_mask``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..index import BlockIndex, cdiv, diagonal_block_range

__all__ = ["MAX_KEY_BLOCKS", "coverage_select"]

# Widest row the kernel holds in registers (2^15 key blocks: 4M tokens with 128-blocks).
MAX_KEY_BLOCKS = 1 << 15
# Positive fp32 bit patterns order like their values; +inf is the largest.
_INF_BITS = tl.constexpr(0x7F800000)


@triton.jit
def _coverage_kernel(
    Mass, First, Last, Thr, Indices, Counts,
    stride_mb, stride_mh, stride_mq,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    H, NQ, NK, threshold,
    CAUSAL: tl.constexpr, PER_HEAD: tl.constexpr, ROWS: tl.constexpr, NKP: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, NKP)
    row_ok = rows < NQ
    first = tl.load(First + rows, mask=row_ok, other=0)
    last = tl.load(Last + rows, mask=row_ok, other=-1)
    if CAUSAL:
        allowed = cols[None, :] <= last[:, None]
    else:
        allowed = cols[None, :] < NK
    allowed = allowed & row_ok[:, None]
    forced = allowed & ((cols[None, :] == 0) | ((cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])))
    candidate = allowed & ~forced

    mass = tl.load(Mass + b * stride_mb + h * stride_mh + rows[:, None] * stride_mq + cols[None, :],
                   mask=allowed, other=0.0)
    if PER_HEAD:
        thr = tl.load(Thr + h)
    else:
        thr = threshold
    # The reference's comparison, term for term: forced + before < threshold * row. (Written as
    # before < threshold * row - forced, the compiled code fuses the product into an FMA whose
    # unrounded result can differ from the reference's rounded product: seen on the H100.)
    target = thr * tl.sum(mass, 1)  # [ROWS]
    forced_mass = tl.sum(tl.where(forced, mass, 0.0), 1)

    # Smallest v0 (as fp32 bits) with forced + f(v0) < target, f(v) = sum(candidate masses > v).
    # Non-candidates get bits -1, below every v >= 0, so they never count as "above".
    bits = tl.where(candidate, mass.to(tl.int32, bitcast=True), -1)
    lo = tl.zeros([ROWS], dtype=tl.int32)
    hi = tl.full([ROWS], _INF_BITS, dtype=tl.int32)
    for _ in tl.static_range(31):  # ceil(log2(_INF_BITS + 1)) halvings reach lo == hi
        mid = lo + (hi - lo) // 2
        above = tl.sum(tl.where(bits > mid[:, None], mass, 0.0), 1)
        ok = forced_mass + above < target
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid + 1)

    v0 = lo
    before = forced_mass + tl.sum(tl.where(bits > v0[:, None], mass, 0.0), 1)
    tie = bits == v0[:, None]
    rank = tl.cumsum(tie.to(tl.int32), 1)  # 1-based among the tied candidates, ascending index
    v0_value = tl.minimum(v0.to(tl.float32, bitcast=True), 3.0e38)  # +inf (no tie possible) would give 0 * inf
    tie_kept = tie & (before[:, None] + (rank - 1).to(tl.float32) * v0_value[:, None] < target[:, None])
    keep = forced | (bits > v0[:, None]) | tie_kept
    keep = tl.where(thr >= 1.0, allowed, keep)

    # Kept columns, ascending, then -1 up to nk.
    kept = keep.to(tl.int32)
    slot = tl.cumsum(kept, 1) - 1
    count = tl.sum(kept, 1)
    out = Indices + b * stride_ib + h * stride_ih + rows[:, None] * stride_iq
    col_values = tl.zeros([ROWS, NKP], dtype=tl.int32) + cols[None, :]
    tl.store(out + slot, col_values, mask=keep)
    pad = (cols[None, :] >= count[:, None]) & (cols[None, :] < NK) & row_ok[:, None]
    tl.store(out + cols[None, :], tl.full([ROWS, NKP], -1, dtype=tl.int32), mask=pad)
    tl.store(Counts + b * stride_cb + h * stride_ch + rows, count, mask=row_ok)


def _launch_shape(nk: int) -> tuple[int, int, int]:
    """(NKP, ROWS, num_warps): ~4K masses per program, 4 warps; wider rows get 8 warps."""
    nkp = triton.next_power_of_2(max(nk, 16))
    rows = max(1, min(16, 4096 // nkp))
    warps = 4 if rows * nkp <= 4096 else 8
    return nkp, rows, warps


def coverage_select(mass: torch.Tensor, *, threshold, q_len: int, k_len: int, block_size: int,
                    causal: bool = True) -> BlockIndex:
    """``keep_until_covered`` (forced sink + diagonal) on block masses, packed as a ``BlockIndex``.

    Args:
        mass: `[B, H, nq, nk]` float32 block masses, last dim contiguous; only the allowed (causal)
            entries are read. CUDA, or CPU under ``TRITON_INTERPRET=1``.
        threshold: coverage, a float or a `[H]` float32 tensor on ``mass.device`` (per head).
        q_len, k_len: token lengths (the queries are the last ``q_len`` of ``k_len`` positions).
        block_size: query and key block size.
        causal: causal block pattern (the default); False allows every block.

    Returns:
        ``BlockIndex`` with `indices [B, H, nq, nk]` int32 (ascending, -1 padded) and
        `counts [B, H, nq]`, equal to ``BlockIndex.from_mask(keep_until_covered(...), max_k=nk)``
        up to the rounding of the threshold comparison (module docstring). No host synchronization.

    Example:
        >>> import torch
        >>> from sparseattn.kernels.coverage import coverage_select
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> mass = torch.tensor([[[[1.0, 0, 0, 0], [5, 1, 0, 0], [1, 6, 2, 1], [1, 2, 7, 3]]]], device=dev)
        >>> idx = coverage_select(mass, threshold=0.7, q_len=64, k_len=64, block_size=16)
        >>> idx.counts[0, 0].tolist(), idx.indices[0, 0, 3].tolist()
        ([1, 2, 3, 3], [0, 2, 3, -1])
    """
    if mass.dim() != 4 or mass.dtype != torch.float32:
        raise ValueError(f"coverage_select: mass must be a [B, H, nq, nk] float32 tensor, got "
                         f"{mass.dtype} {tuple(mass.shape)}")
    B, H, nq, nk = mass.shape
    if (nq, nk) != (cdiv(q_len, block_size), cdiv(k_len, block_size)):
        raise ValueError(f"coverage_select: mass has blocks {(nq, nk)}, expected "
                         f"{(cdiv(q_len, block_size), cdiv(k_len, block_size))} for q_len={q_len}, "
                         f"k_len={k_len}, block_size={block_size}")
    if nk > MAX_KEY_BLOCKS:
        raise ValueError(f"coverage_select: rows of {nk} key blocks exceed MAX_KEY_BLOCKS={MAX_KEY_BLOCKS}")
    if mass.stride(-1) != 1:
        mass = mass.contiguous()
    per_head = torch.is_tensor(threshold)
    if per_head and (threshold.dim() != 1 or threshold.numel() != H):
        raise ValueError(f"coverage_select: threshold must be a float or a [H={H}] tensor, "
                         f"got shape {tuple(threshold.shape)}")
    thr = threshold.to(device=mass.device, dtype=torch.float32).contiguous() if per_head else mass
    first, last = diagonal_block_range(q_len, k_len, block_size, block_size, device=mass.device)
    first, last = first.to(torch.int32), last.to(torch.int32)
    indices = torch.empty(B, H, nq, nk, dtype=torch.int32, device=mass.device)
    counts = torch.empty(B, H, nq, dtype=torch.int32, device=mass.device)
    nkp, rows, warps = _launch_shape(nk)
    grid = (cdiv(nq, rows), B * H)
    _coverage_kernel[grid](
        mass, first, last, thr, indices, counts,
        mass.stride(0), mass.stride(1), mass.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        counts.stride(0), counts.stride(1),
        H, nq, nk, 0.0 if per_head else float(threshold),
        CAUSAL=causal, PER_HEAD=per_head, ROWS=rows, NKP=nkp, num_warps=warps,
    )
    return BlockIndex(indices, counts, block_size, block_size, q_len, k_len)
