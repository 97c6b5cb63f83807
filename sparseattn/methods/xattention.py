"""XAttention (Xu et al., ICML 2025): antidiagonal block scoring with a cumulative-mass threshold."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..index import BlockIndex
from ..kernels import kernels_available
from ..reference.xattention import xattention_select
from ..validation import check_block_size, check_choice, check_unit_interval, check_qkv
from . import block_index_bytes, register_method


@dataclass(frozen=True)
class XAttentionConfig:
    """Options of XAttention.

    Args:
        threshold: cumulative block mass to keep per query-block row, in (0, 1]; a float, or a
            `[Hq]` tensor (per head). 1 keeps every causal block.
        stride: antidiagonal stride S (4, 8 or 16); scoring costs 1/S of `QK^T`.
        block_size: selection block (64 or 128; must be a multiple of `stride`). The paper uses 128.
    """

    threshold: float | torch.Tensor = 0.95
    stride: int = 16
    block_size: int = 128

    def __post_init__(self):
        check_unit_interval("threshold", self.threshold)
        check_choice("stride", self.stride, {4, 8, 16})
        check_block_size("block_size", self.block_size)
        if self.block_size % self.stride:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of stride ({self.stride})")


def select_blocks(q: torch.Tensor, k: torch.Tensor, config: XAttentionConfig, *, causal: bool = True) -> BlockIndex:
    """XAttention's block selection for `q [B, Hq, Lq, D]`, `k [B, Hkv, Lk, D]`.

    On a GPU the fused Triton estimator (``kernels.estimate``) computes the block masses in one
    pass; on a CPU the fp32 reference does. Both apply the same threshold rule.
    """
    check_unit_interval("threshold", config.threshold, num_heads=q.shape[1])
    if q.is_cuda and kernels_available():
        from ..kernels.estimate import xattention_select_fast

        return xattention_select_fast(q, k, threshold=config.threshold, stride=config.stride,
                                      block_size=config.block_size, causal=causal)
    return xattention_select(q, k, threshold=config.threshold, stride=config.stride,
                             block_size=config.block_size, causal=causal)


def Xattention_prefill(query_states, key_states, value_states, threshold=0.95, causal=True, *,
                       stride=16, block_size=128, scale=None, return_stats=False):
    """XAttention sparse prefill (the seed's API).

    Args:
        query_states: `[B, Hq, Lq, D]`.
        key_states, value_states: `[B, Hkv, Lk, D]` with `Hq % Hkv == 0`.
        threshold: cumulative attention mass kept per query block, in (0, 1] (default 0.95);
            a float or a per-head `[Hq]` tensor.
        causal: causal attention (queries are the last `Lq` positions).
        stride: antidiagonal stride (default 16).
        block_size: selection block size (default 128).
        scale: softmax scale, default `1/sqrt(D)`.
        return_stats: also return :class:`sparseattn.AttentionStats` (density per head, the index).

    Returns:
        `[B, Hq, Lq, D]` in the query's dtype (and the stats).

    Example:
        >>> import torch
        >>> from sparseattn import Xattention_prefill
        >>> q = k = v = torch.randn(1, 4, 512, 64)
        >>> Xattention_prefill(q, k, v, threshold=0.9).shape
        torch.Size([1, 4, 512, 64])
    """
    from ..api import sparse_attention

    check_qkv(query_states, key_states, value_states, causal=causal)  # errors name the seed's arguments
    return sparse_attention(query_states, key_states, value_states, method="xattention", causal=causal,
                            scale=scale, return_stats=return_stats, threshold=threshold, stride=stride,
                            block_size=block_size)


def index_bytes(config: XAttentionConfig, batch: int, q_heads: int, q_len: int, k_len: int) -> int:
    """The selection's index: every key block wide (``kernels.coverage`` writes rows of any length)."""
    return block_index_bytes(batch, q_heads, q_len, k_len, config.block_size)


def head_slice(config: XAttentionConfig, start: int, stop: int, group: int) -> XAttentionConfig:
    """The config of query heads ``[start, stop)`` (a per-head threshold is sliced)."""
    t = config.threshold
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.numel() > 1:
        return dataclasses.replace(config, threshold=t.reshape(-1)[start:stop])
    return config


register_method("xattention", select_blocks, XAttentionConfig, index_bytes=index_bytes, head_slice=head_slice,
                description="antidiagonal block scoring, cumulative-mass threshold (Xu et al. 2025)")
