"""MInference's vertical-slash attention: key ranges (slashes) plus gathered key columns (verticals).

Levels: ``@triton.jit`` kernel -> ``vertical_slash_forward`` (launcher) -> ``vertical_slash_attention``
(validation, docstring). Forward only: MInference is a prefill method and needs no backward.

Per query tile (``BLOCK_M`` rows inside one query block of the index), one online softmax walks
first the ``range_counts`` key ranges (``block_k`` keys from an arbitrary start, in tiles of
``BLOCK_N``; the causal/bound mask is applied only to tiles that straddle the diagonal or the end
of their range) and then the ``column_counts`` gathered key columns, ``BLOCK_N`` at a time
(K/V rows loaded at the gathered positions, masked to the valid columns and causally).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..index import VerticalSlashIndex
from ..validation import check_qkv, check_scale
from .block_sparse import (
    _LN2,
    LOG2E,
    KernelConfig,
    _bhl,
    _dot,
    _dot_precision,
    _interpreting,
    _is_pow2_at_least_16,
    _last_dim_contiguous,
    _padded_head_dim,
    _query_grid,
    _query_program,
    _softmax_update,
    alloc_output,
    check_out,
    default_configs,
)

__all__ = ["vertical_slash_attention", "vertical_slash_forward"]


@triton.jit
def _vs_fwd_kernel(
    Q, K, V, Out, Lse, RangeStarts, RangeCounts, Columns, ColumnCounts,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_rb, stride_rh, stride_rq, stride_rk,
    stride_rcb, stride_rch, stride_rcq,
    stride_cb, stride_ch, stride_cq, stride_ck,
    stride_ccb, stride_cch, stride_ccq,
    num_heads, group_size, q_len, k_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SEL_BLOCK_Q: tl.constexpr, SEL_BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr, KV_MAJOR: tl.constexpr,
):
    # Heaviest (last) query tiles first; with KV_MAJOR one KV head's programs run together.
    b, h, kvh, pid_m = _query_program(num_heads, group_size, True, KV_MAJOR)
    start_m = pid_m * BLOCK_M
    off = k_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = (start_m + offs_m) < q_len
    q_pos = off + start_m + offs_m  # [BLOCK_M]
    q_first = off + start_m
    start = tl.cast(start_m, tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + start * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    k_tile_offs = offs_n[:, None] * stride_kn + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    v_tile_offs = offs_n[:, None] * stride_vn + offs_d[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    qb = start_m // SEL_BLOCK_Q

    # Slash ranges: block_k contiguous keys from an arbitrary start.
    SUB_N: tl.constexpr = SEL_BLOCK_K // BLOCK_N
    r_row = RangeStarts + b * stride_rb + h * stride_rh + qb * stride_rq
    r_count = tl.load(RangeCounts + b * stride_rcb + h * stride_rch + qb * stride_rcq)
    # Each loop loads the index entries of its next step one iteration ahead, into registers it
    # carries: the load's latency then hides behind a tile's work (block_sparse._fwd_kernel).
    start_next = tl.load(r_row, mask=r_count > 0, other=0)
    for t in range(0, r_count * SUB_N):
        range_start = start_next
        start_next = tl.load(r_row + (tl.minimum(t + 1, r_count * SUB_N - 1) // SUB_N) * stride_rk)
        range_end = tl.minimum(range_start + SEL_BLOCK_K, k_len)
        start_n = range_start + (t % SUB_N) * BLOCK_N
        k_pos = start_n + offs_n  # [BLOCK_N]
        kv_ok = (k_pos[:, None] < range_end) & d_ok[None, :]
        s64 = tl.cast(start_n, tl.int64)
        k = tl.load(k_base + s64 * stride_kn + k_tile_offs, mask=kv_ok, other=0.0)
        qk = _dot(q, tl.trans(k), DOT_PREC)  # [BLOCK_M, BLOCK_N], unscaled
        if (start_n + BLOCK_N > range_end) | (start_n + BLOCK_N - 1 > q_first):
            keep = (k_pos[None, :] < range_end) & (k_pos[None, :] <= q_pos[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        v = tl.load(v_base + s64 * stride_vn + v_tile_offs, mask=kv_ok, other=0.0)
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, qk, v, qk_scale, True, DOT_PREC)

    # Vertical columns: gathered key rows, always masked (validity + causal).
    c_row = Columns + b * stride_cb + h * stride_ch + qb * stride_cq
    c_count = tl.load(ColumnCounts + b * stride_ccb + h * stride_cch + qb * stride_ccq)
    cols_next = tl.load(c_row + offs_n * stride_ck, mask=offs_n < c_count, other=0)
    for c in range(0, tl.cdiv(c_count, BLOCK_N)):
        slot = c * BLOCK_N + offs_n
        c_ok = slot < c_count
        cols = cols_next  # [BLOCK_N] absolute key positions
        cols_next = tl.load(c_row + (slot + BLOCK_N) * stride_ck, mask=slot + BLOCK_N < c_count, other=0)
        c_ok = c_ok & (cols < k_len)
        cols64 = cols.to(tl.int64)
        kv_ok = c_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols64[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        qk = _dot(q, tl.trans(k), DOT_PREC)
        qk = tl.where(c_ok[None, :] & (cols[None, :] <= q_pos[:, None]), qk, float("-inf"))
        v = tl.load(v_base + cols64[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, qk, v, qk_scale, True, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * _LN2
    tl.store(Out + b * stride_ob + h * stride_oh + start * stride_om + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b * stride_lb + h * stride_lh + start_m + offs_m, lse, mask=row_ok)


def vertical_slash_forward(q, k, v, vs_index: VerticalSlashIndex, *, scale: float | None = None,
                           config: KernelConfig | None = None, out: torch.Tensor | None = None):
    """Launch the vertical-slash kernel on validated inputs; returns ``(out, lse)``.

    ``out``: write into this buffer (q's shape and dtype, unit last stride) instead of a new one.
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # 64-row blocks get the narrow tile (64x64, 4 warps at D=128), as in the block-sparse forward.
    cfg = config or default_configs(D, q.dtype, interpret=q.device.type == "cpu").forward_for(vs_index)
    BLOCK_M = min(cfg.block_m, vs_index.block_q)
    BLOCK_N = min(cfg.block_n, vs_index.block_k)
    out = alloc_output(q) if out is None else check_out(out, q)
    lse = alloc_output(q, (B, Hq, Lq), torch.float32)
    idx = (vs_index.range_starts, vs_index.range_counts, vs_index.columns, vs_index.column_counts)
    grid = _query_grid(B, Hq, Hkv, triton.cdiv(Lq, BLOCK_M), cfg.kv_major)
    _vs_fwd_kernel[grid](
        q, k, v, out, lse, *idx,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out), lse.stride(0), lse.stride(1),
        *(s for t in idx for s in t.stride()),
        Hq, Hq // Hkv, Lq, Lk, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=_padded_head_dim(D), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        SEL_BLOCK_Q=vs_index.block_q, SEL_BLOCK_K=vs_index.block_k, DOT_PREC=_dot_precision(q.dtype),
        KV_MAJOR=cfg.kv_major, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _validate(q, k, v, vs_index, scale):
    B, Hq, Hkv, Lq, Lk, D = check_qkv(q, k, v, causal=True, names=("q", "k", "v"))
    check_scale(scale)
    if q.device.type == "cpu" and not _interpreting():
        raise RuntimeError("vertical_slash_attention runs a Triton kernel: it needs CUDA tensors, or "
                           "TRITON_INTERPRET=1 for CPU tensors")
    if D > 256:
        raise ValueError(f"head_dim must be <= 256, got {D}")
    if not isinstance(vs_index, VerticalSlashIndex):
        raise TypeError(f"vs_index must be a VerticalSlashIndex, got {type(vs_index).__name__}")
    for name in ("block_q", "block_k"):
        if not _is_pow2_at_least_16(getattr(vs_index, name)):
            raise ValueError(f"vs_index.{name} must be a power of two >= 16, got {getattr(vs_index, name)}")
    nq = triton.cdiv(Lq, vs_index.block_q)
    for name in ("range_starts", "range_counts", "columns", "column_counts"):
        t = getattr(vs_index, name)
        if t.dtype != torch.int32 or t.device != q.device:
            raise TypeError(f"vs_index.{name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
        if tuple(t.shape[:3]) != (B, Hq, nq):
            raise ValueError(f"vs_index.{name} has shape {tuple(t.shape)}, expected [B, Hq, nq, ...] = "
                             f"{(B, Hq, nq)}")
    if (vs_index.q_len, vs_index.k_len) != (Lq, Lk):
        raise ValueError(f"vs_index is for (q_len, k_len) = {(vs_index.q_len, vs_index.k_len)}, inputs have "
                         f"{(Lq, Lk)}")


def vertical_slash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vs_index: VerticalSlashIndex, *,
                             scale: float | None = None, return_lse: bool = False):
    """Causal attention over MInference's key ranges and gathered key columns (forward only).

    Args:
        q: `[B, Hq, Lq, D]`, the last `Lq` of the `Lk` positions (fp16/bf16 on GPU; fp32 CPU
            tensors under ``TRITON_INTERPRET=1``).
        k, v: `[B, Hkv, Lk, D]`, `Hq % Hkv == 0` (query head `h` reads KV head `h // (Hq // Hkv)`).
        vs_index: per query block of `block_q` rows, `range_starts [B, Hq, nq, max_r]` (each range
            covers `block_k` keys, clipped to `Lk`; non-overlapping) and gathered `columns
            [B, Hq, nq, max_c]` outside every range, with their counts.
        scale: softmax scale, default `1 / sqrt(D)`.
        return_lse: also return the natural-log log-sum-exp `[B, Hq, Lq]` fp32.

    Returns:
        `out` with q's shape and dtype; with ``return_lse``, `(out, lse)`.

    Example:
        >>> import torch
        >>> from sparseattn.index import VerticalSlashIndex
        >>> from sparseattn.kernels.vertical_slash import vertical_slash_attention
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU needs TRITON_INTERPRET=1
        >>> dt = torch.bfloat16 if dev == "cuda" else torch.float32
        >>> q, k, v = torch.randn(3, 1, 2, 128, 64, device=dev, dtype=dt)
        >>> i32 = dict(dtype=torch.int32, device=dev)
        >>> index = VerticalSlashIndex(  # query block 0: keys 0-63; block 1: keys 64-127 and column 3
        ...     torch.tensor([[[[0], [64]]] * 2], **i32).view(1, 2, 2, 1), torch.ones(1, 2, 2, **i32),
        ...     torch.tensor([[[[-1], [3]]] * 2], **i32).view(1, 2, 2, 1), torch.tensor([[[0, 1]] * 2], **i32),
        ...     block_q=64, block_k=64, q_len=128, k_len=128)
        >>> vertical_slash_attention(q, k, v, index).shape
        torch.Size([1, 2, 128, 64])
    """
    _validate(q, k, v, vs_index, scale)
    out, lse = vertical_slash_forward(q, k, v, vs_index, scale=scale)
    return (out, lse) if return_lse else out
