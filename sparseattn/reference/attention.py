"""fp32 reference attention: dense, block-sparse (BlockIndex) and vertical-slash.

Plain softmax attention in float32, chunked over queries so memory stays
``O(chunk x Lk)`` rather than ``O(Lq x Lk)``. GQA without repeating K/V: the query heads of one KV
head are grouped into one batched matmul against that head's keys. These functions are the
ground truth that the Triton kernels are tested against, and the CPU fallback of the public API.
"""

from __future__ import annotations

import math

import torch

from ..index import BlockIndex, VerticalSlashIndex

_CHUNK_ELEMENTS = 1 << 25  # scores per chunk (128 MiB of fp32)


def _chunk_rows(B: int, Hq: int, Lk: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, B * Hq * Lk))


def _attend(q, k, v, scale, allowed_fn, out_dtype, bias_fn=None):
    """Core loop over query chunks.

    ``allowed_fn(r0, r1)`` gives a bool `[B|1, Hq|1, r1-r0, Lk]` (or None: all keys) and
    ``bias_fn(r0, r1)`` an additive float mask of the same shape (or None).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kf = k.float().unsqueeze(2)  # [B, Hkv, 1, Lk, D]
    vf = v.float().unsqueeze(2)
    out = torch.empty(B, Hq, Lq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    step = _chunk_rows(B, Hq, Lk)
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, G, r1 - r0, D)
        scores = torch.matmul(qc, kf.transpose(-1, -2)) * scale  # [B, Hkv, G, rows, Lk]
        if bias_fn is not None:
            bias = bias_fn(r0, r1).expand(B, Hq, r1 - r0, Lk)
            scores = scores + bias.reshape(B, Hkv, G, r1 - r0, Lk).float()
        allowed = allowed_fn(r0, r1)
        if allowed is not None:
            allowed = allowed.expand(B, Hq, r1 - r0, Lk).reshape(B, Hkv, G, r1 - r0, Lk)
            scores = scores.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        # A row with no allowed key would be NaN; keep it NaN so tests catch it.
        probs = torch.exp(scores - row_lse)
        out[:, :, r0:r1] = torch.matmul(probs, vf).reshape(B, Hq, r1 - r0, -1)
        lse[:, :, r0:r1] = row_lse.reshape(B, Hq, r1 - r0)
    return out.to(out_dtype), lse


def _causal_fn(Lq, Lk, device):
    off = Lk - Lq
    kpos = torch.arange(Lk, device=device)

    def fn(r0, r1):
        qpos = torch.arange(r0, r1, device=device) + off
        return (kpos[None, :] <= qpos[:, None])[None, None]

    return fn


def reference_attention(q, k, v, *, causal: bool = True, scale: float | None = None,
                        mask: torch.Tensor | None = None, return_lse: bool = False):
    """Dense softmax attention in fp32.

    Args:
        q: `[B, Hq, Lq, D]`; the queries are the last `Lq` of `Lk` positions.
        k, v: `[B, Hkv, Lk, D]`, `Hq % Hkv == 0`.
        causal: mask keys after each query's absolute position.
        scale: defaults to `1/sqrt(D)`.
        mask: optional bool (True = attend) or additive float mask broadcastable to `[B, Hq, Lq, Lk]`,
            combined with `causal`.
        return_lse: also return the natural-log log-sum-exp `[B, Hq, Lq]` (fp32).

    Returns:
        `[B, Hq, Lq, D]` in q's dtype (and the lse).

    Example:
        >>> import torch
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> reference_attention(q, k, v).shape
        torch.Size([1, 2, 5, 8])
    """
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    causal_fn = _causal_fn(Lq, Lk, q.device) if causal else None
    m = mask
    if m is not None:
        while m.dim() < 4:
            m = m.unsqueeze(0)

    def rows_of(r0, r1):
        return m[..., r0:r1, :] if m.shape[-2] != 1 else m

    is_bool = m is not None and m.dtype == torch.bool

    def allowed_fn(r0, r1):
        parts = ([causal_fn(r0, r1)] if causal_fn is not None else []) + ([rows_of(r0, r1)] if is_bool else [])
        if not parts:
            return None
        return parts[0] & parts[1] if len(parts) == 2 else parts[0]

    bias_fn = rows_of if (m is not None and not is_bool) else None
    out, lse = _attend(q, k, v, scale, allowed_fn, q.dtype, bias_fn=bias_fn)
    return (out, lse) if return_lse else out


def reference_block_sparse_attention(q, k, v, block_index: BlockIndex, *, causal: bool = True,
                                     scale: float | None = None, return_lse: bool = False):
    """Attention over the blocks of ``block_index`` only (plus the causal element mask), in fp32.

    The element mask is expanded one query chunk at a time from the `[B, H, nq, nk]` block mask.
    """
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    blocks = block_index.to_mask()  # [B, H, nq, nk]
    col_block = torch.arange(Lk, device=q.device) // block_index.block_k
    causal_fn = _causal_fn(Lq, Lk, q.device) if causal else None

    def allowed_fn(r0, r1):
        row_block = torch.arange(r0, r1, device=q.device) // block_index.block_q
        allowed = blocks[:, :, row_block][..., col_block]  # [B, H, rows, Lk]
        if causal_fn is not None:
            allowed = allowed & causal_fn(r0, r1)
        return allowed

    out, lse = _attend(q, k, v, scale, allowed_fn, q.dtype)
    return (out, lse) if return_lse else out


def reference_vertical_slash_attention(q, k, v, vs_index: VerticalSlashIndex, *, causal: bool = True,
                                       scale: float | None = None, return_lse: bool = False):
    """Attention over a token-granular vertical-slash index, in fp32. Small shapes (builds the element mask)."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    elem = vs_index.to_element_mask(causal)

    def allowed_fn(r0, r1):
        return elem[:, :, r0:r1]

    out, lse = _attend(q, k, v, scale, allowed_fn, q.dtype)
    return (out, lse) if return_lse else out
