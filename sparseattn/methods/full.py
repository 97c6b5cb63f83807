"""FullPrefill: exact dense attention through the fastest backend present."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ..validation import check_qkv
from . import register_method

# cuDNN attention is the fastest dense kernel measured on the H100 (shared/BENCHMARKS.md); the
# others follow in case it rejects the shape or dtype.
_GPU_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def dense_attention(q, k, v, *, causal: bool = True, scale: float | None = None, attention_mask=None):
    """Dense attention on already-validated `[B, H, L, D]` tensors (see :func:`Full_prefill`)."""
    Lq, Lk = q.shape[2], k.shape[2]
    mask = attention_mask
    is_causal = False
    if causal:
        if mask is not None:
            # Combine the caller's mask with the bottom-right causal cut.
            allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
            if mask.dtype == torch.bool:
                mask = mask & allowed
            else:
                mask = mask.to(q.dtype).masked_fill(~allowed, float("-inf"))
        elif Lq == Lk:
            is_causal = True
        else:
            mask = causal_lower_right(Lq, Lk)
    kwargs = dict(attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if q.is_cuda:
        with sdpa_kernel(_GPU_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _check_mask(mask, B, Hq, Lq, Lk):
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dim() not in (2, 3, 4):
        raise ValueError(f"attention_mask must broadcast to [batch, heads, q_len, k_len]; got shape {tuple(mask.shape)}")
    target = (B, Hq, Lq, Lk)
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    for have, want, dim in zip(shape, target, ("batch", "heads", "q_len", "k_len")):
        if have not in (1, want):
            raise ValueError(
                f"attention_mask shape {tuple(mask.shape)} does not broadcast to {target}: {dim} is {have}, expected 1 or {want}"
            )


def Full_prefill(query_states, key_states, value_states, causal=True, attention_mask=None):
    """Exact dense prefill attention (the seed's API).

    Runs on the fastest dense backend present: cuDNN SDPA on Hopper GPUs (then FlashAttention-2,
    memory-efficient, math), PyTorch's CPU kernels on a CPU. GQA without repeating K/V.

    Args:
        query_states: `[B, Hq, Lq, D]`.
        key_states, value_states: `[B, Hkv, Lk, D]` with `Hq % Hkv == 0`.
        causal: causal attention; queries are the last `Lq` of `Lk` positions.
        attention_mask: optional bool (True = attend) or additive float mask broadcastable to
            `[B, Hq, Lq, Lk]`, combined with ``causal``.

    Returns:
        `[B, Hq, Lq, D]` in the query's dtype.

    Example:
        >>> import torch
        >>> from sparseattn import Full_prefill
        >>> q = k = v = torch.randn(1, 4, 128, 64)
        >>> Full_prefill(q, k, v).shape
        torch.Size([1, 4, 128, 64])
    """
    B, Hq, _, Lq, Lk, _ = check_qkv(query_states, key_states, value_states, causal=causal)
    _check_mask(attention_mask, B, Hq, Lq, Lk)
    return dense_attention(query_states, key_states, value_states, causal=causal, attention_mask=attention_mask)


def select_blocks(q, k, config, *, causal: bool = True):
    """Dense: no index."""
    return None


register_method("full", select_blocks, None, description="exact dense attention (cuDNN SDPA on H100)")
