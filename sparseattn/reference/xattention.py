"""Reference XAttention selector (antidiagonal scoring, Xu et al. 2025), fp32 pure PyTorch.

Also home of two helpers the other reference selectors share: ``check_qk`` (input validation)
and ``keep_until_covered`` (the "add blocks by descending mass until a threshold" rule).
"""

from __future__ import annotations

import math

import torch

from sparseattn.index import BlockIndex, causal_block_mask, cdiv
from sparseattn.reference.streaming import forced_block_mask

__all__ = ["xattention_select", "xattention_block_mass", "keep_until_covered", "check_qk"]

# Largest fp32 score tile one query chunk may hold (~256 MB).
CHUNK_ELEMENTS = 1 << 26


def check_qk(q: torch.Tensor, k: torch.Tensor, name: str) -> tuple[int, int, int, int, int, int]:
    """Validate ``q [B, Hq, Lq, D]`` and ``k [B, Hkv, Lk, D]``; return ``(B, Hq, Hkv, Lq, Lk, D)``."""
    if not (torch.is_tensor(q) and torch.is_tensor(k)) or q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{name}: q and k must be 4-D tensors [B, H, L, D], got "
                         f"{tuple(getattr(q, 'shape', ()))} and {tuple(getattr(k, 'shape', ()))}")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise TypeError(f"{name}: q and k must be floating point, got {q.dtype} and {k.dtype}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if B != Bk or D != Dk:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{name}: query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if Lq < 1 or Lq > Lk:
        raise ValueError(f"{name}: need 1 <= q_len <= k_len, got q_len={Lq}, k_len={Lk}")
    if q.device != k.device:
        raise ValueError(f"{name}: q is on {q.device} but k is on {k.device}")
    return B, Hq, Hkv, Lq, Lk, D


def keep_until_covered(mass: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor | None,
                       threshold) -> torch.Tensor:
    """Per row: forced blocks, then the others by descending mass until ``threshold`` of the row mass.

    A non-forced allowed block at position ``r`` of the descending order (stable: ties keep the
    lower index first) is kept iff ``forced_mass + sum(masses before r) < threshold * row_mass``,
    so the block that crosses the threshold is kept. ``row_mass`` sums the allowed blocks.
    ``threshold >= 1`` keeps every allowed block (a float cumsum must not drop zero-mass blocks).

    Args:
        mass: `[..., n]` non-negative float.
        allowed: bool broadcastable to ``mass``; blocks outside it are never kept.
        forced: bool broadcastable to ``mass`` (subset of ``allowed``), or None for none.
        threshold: float or tensor broadcastable to `[..., 1]`.

    Returns:
        bool `[..., n]`.
    """
    allowed = allowed.expand(mass.shape)
    forced = torch.zeros_like(allowed) if forced is None else forced.expand(mass.shape) & allowed
    others = allowed & ~forced
    zero = torch.zeros((), dtype=mass.dtype, device=mass.device)
    row_mass = torch.where(allowed, mass, zero).sum(-1, keepdim=True)
    forced_mass = torch.where(forced, mass, zero).sum(-1, keepdim=True)
    # Non-candidates sort last (key -1 < any mass) and add nothing to the running sum.
    key = torch.where(others, mass, torch.full_like(mass, -1.0))
    sorted_key, order = torch.sort(key, dim=-1, descending=True, stable=True)
    sorted_mass = sorted_key.clamp_min(0)
    before = torch.nn.functional.pad(torch.cumsum(sorted_mass, dim=-1)[..., :-1], (1, 0))  # exclusive
    # A Python float stays a Python scalar: a tensor made from it would be a blocking host copy.
    keep_sorted = forced_mass + before < threshold * row_mass
    keep = torch.zeros_like(others).scatter(-1, order, keep_sorted)
    return (keep & others) | forced | (allowed & (threshold >= 1))


def _threshold_per_head(threshold, num_heads: int, device):
    """float -> float; `[Hq]` (or 0-d) tensor -> `[1, Hq, 1, 1]` float32 on ``device``."""
    if torch.is_tensor(threshold):
        if threshold.dim() > 1 or (threshold.dim() == 1 and threshold.numel() != num_heads):
            raise ValueError(f"xattention_select: threshold must be a float or a [Hq={num_heads}] tensor, "
                             f"got shape {tuple(threshold.shape)}")
        t = threshold.to(device=device, dtype=torch.float32)
        return t.reshape(-1).expand(num_heads).reshape(1, num_heads, 1, 1)
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold):
        return float(threshold)
    raise ValueError(f"xattention_select: threshold must be a finite float or a [Hq] tensor, got {threshold!r}")


def xattention_block_mass(q: torch.Tensor, k: torch.Tensor, *, stride: int = 16, block_size: int = 128,
                          causal: bool = True) -> torch.Tensor:
    """XAttention's antidiagonal block masses, `[B, Hq, nq, nk]` fp32 (steps 1-3 of ``xattention_select``).

    Example:
        >>> mass = xattention_block_mass(torch.randn(1, 2, 70, 16), torch.randn(1, 1, 70, 16), stride=4, block_size=8)
        >>> mass.shape, bool(torch.allclose(mass.sum(-1)[..., :-1], torch.tensor(2.0)))
        (torch.Size([1, 2, 9, 9]), True)
    """
    B, Hq, Hkv, Lq, Lk, D = check_qk(q, k, "xattention_block_mass")
    if not isinstance(stride, int) or stride <= 0:
        raise ValueError(f"xattention: stride must be a positive int, got {stride!r}")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % stride:
        raise ValueError(f"xattention: block_size ({block_size!r}) must be a positive multiple of stride ({stride})")
    S, bs, G, device = stride, block_size, Hq // Hkv, q.device
    per_block = bs // S  # reshaped rows (and columns) per block
    nq, nk = cdiv(Lq, bs), cdiv(Lk, bs)
    nrq, nrk = cdiv(Lq, S), cdiv(Lk, S)
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, nrq * S - Lq))
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, nrk * S - Lk))
    # Reversing each stride group of q turns the antidiagonal sum into a plain dot product.
    q_anti = qf.reshape(B, Hkv, G, nrq, S, D).flip(4).reshape(B, Hkv, G, nrq, S * D)
    k_strided = kf.reshape(B, Hkv, nrk, S * D).transpose(-1, -2)  # [B, Hkv, S*D, nrk]
    scale = 1.0 / (math.sqrt(D) * S)
    row_last = (Lk - Lq) + torch.clamp((torch.arange(nrq, device=device) + 1) * S, max=Lq) - 1
    col_first = torch.arange(nrk, device=device) * S

    mass = torch.empty(B, Hq, nq, nk, dtype=torch.float32, device=device)
    blocks_per_chunk = max(1, CHUNK_ELEMENTS // (B * Hq * per_block * nrk))
    for qb0 in range(0, nq, blocks_per_chunk):
        qb1 = min(nq, qb0 + blocks_per_chunk)
        i0, i1 = qb0 * per_block, min(nrq, qb1 * per_block)
        rows = i1 - i0
        scores = torch.matmul(q_anti[:, :, :, i0:i1].reshape(B, Hkv, G * rows, S * D), k_strided)
        scores = scores.view(B, Hq, rows, nrk) * scale
        if causal:
            scores = scores.masked_fill(col_first[None, :] > row_last[i0:i1, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # Pad to whole blocks (zero mass) and sum each (bs/S x bs/S) cell.
        probs = torch.nn.functional.pad(probs, (0, nk * per_block - nrk, 0, (qb1 - qb0) * per_block - rows))
        mass[:, :, qb0:qb1] = probs.view(B, Hq, qb1 - qb0, per_block, nk, per_block).sum((3, 5))
    return mass


def xattention_select(q: torch.Tensor, k: torch.Tensor, *, threshold, stride: int = 16, block_size: int = 128,
                      causal: bool = True) -> BlockIndex:
    """XAttention block selection by strided antidiagonal scores, in fp32.

    1. Zero-pad q and k at the end to multiples of ``stride`` (S). Reshaped query row ``i`` covers
       query rows ``[iS, iS+S)`` (q-relative), reshaped key column ``j`` absolute keys ``[jS, jS+S)``;
       ``A[i, j] = sum_t q[iS+S-1-t] . k[jS+t]``, scaled by ``1 / (sqrt(D) * S)``.
    2. Causal cut: column ``j`` is allowed iff ``jS <= (Lk-Lq) + min(iS+S, Lq) - 1`` (the last
       absolute position of row ``i``); fp32 softmax over the whole allowed row.
    3. Mass of block ``(qb, kb)``: summed probabilities of rows with ``iS // bs == qb`` and columns
       with ``jS // bs == kb`` (``xattention_block_mass``).
    4. Per query-block row: key block 0 and the diagonal blocks, then the rest by descending mass
       until ``threshold`` of the row mass (``keep_until_covered``); ``threshold >= 1`` keeps all.

    GQA scores query head ``h`` against KV head ``h // G`` without repeating K.

    Args:
        q: `[B, Hq, Lq, D]` queries, the last ``Lq`` positions.
        k: `[B, Hkv, Lk, D]` keys, ``Hq % Hkv == 0``.
        threshold: coverage, a float or a `[Hq]` tensor (per head).
        stride: antidiagonal stride S (default 16).
        block_size: query and key block size, a multiple of ``stride`` (default 128).
        causal: causal attention (default True); non-causal allows every block.

    Returns:
        ``BlockIndex`` with ``max_k = nk`` (no host sync; rows are ``-1`` padded).

    Example:
        >>> q, k = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32)
        >>> idx = xattention_select(q, k, threshold=0.9, stride=8, block_size=64)
        >>> idx.indices.shape
        torch.Size([1, 4, 5, 5])
    """
    B, Hq, _, Lq, Lk, _ = check_qk(q, k, "xattention_select")
    thr = _threshold_per_head(threshold, Hq, q.device)
    mass = xattention_block_mass(q, k, stride=stride, block_size=block_size, causal=causal)
    nq, nk = mass.shape[2:]
    allowed = causal_block_mask(Lq, Lk, block_size, block_size, causal, device=q.device)
    forced = forced_block_mask(Lq, Lk, block_size, causal, device=q.device)
    mask = torch.empty(B, Hq, nq, nk, dtype=torch.bool, device=q.device)
    blocks_per_chunk = max(1, CHUNK_ELEMENTS // (4 * B * Hq * nk))  # sort temporaries are int64
    for qb0 in range(0, nq, blocks_per_chunk):
        qb1 = min(nq, qb0 + blocks_per_chunk)
        mask[:, :, qb0:qb1] = keep_until_covered(mass[:, :, qb0:qb1], allowed[qb0:qb1], forced[qb0:qb1], thr)
    return BlockIndex.from_mask(mask, block_q=block_size, block_k=block_size, q_len=Lq, k_len=Lk, max_k=nk)
