"""MInference (Jiang et al., NeurIPS 2024): vertical-slash, A-shape and block-sparse head patterns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..index import BlockIndex, VerticalSlashIndex
from ..reference.minference import a_shape_select, block_sparse_select, minference_select
from ..validation import check_block_size, check_choice, check_positive_int, check_unit_interval, check_qkv
from . import register_method

PATTERNS = {"vertical_and_slash", "a_shape", "block_sparse"}


@dataclass(frozen=True)
class MInferenceConfig:
    """Options of MInference.

    Args:
        pattern: ``"vertical_and_slash"`` (default), ``"a_shape"`` or ``"block_sparse"``.
        vertical_size: key columns kept (default 1000).
        slash_size: diagonals kept (default 6096).
        adaptive_budget: if set, a fraction of the key length: total budget ``adaptive_budget x Lk``
            tokens, 20% verticals and 80% slashes (overrides the two sizes).
        last_q: queries used for the online estimate (default 64).
        block_size: query block of the index (default 64).
        sink, window: tokens of the ``a_shape`` pattern.
        top_k: key blocks per query block of the ``block_sparse`` pattern.
    """

    pattern: str = "vertical_and_slash"
    vertical_size: int = 1000
    slash_size: int = 6096
    adaptive_budget: float | None = None
    last_q: int = 64
    block_size: int = 64
    sink: int = 128
    window: int = 1024
    top_k: int = 100

    def __post_init__(self):
        check_choice("pattern", self.pattern, PATTERNS)
        check_positive_int("vertical_size", self.vertical_size)
        check_positive_int("slash_size", self.slash_size)
        if self.adaptive_budget is not None:
            check_unit_interval("adaptive_budget", self.adaptive_budget, allow_tensor=False)
        check_positive_int("last_q", self.last_q)
        check_block_size("block_size", self.block_size)
        check_positive_int("sink", self.sink, allow_zero=True)
        check_positive_int("window", self.window)
        check_positive_int("top_k", self.top_k)


def select_blocks(q: torch.Tensor, k: torch.Tensor, config: MInferenceConfig, *,
                  causal: bool = True) -> VerticalSlashIndex | BlockIndex:
    """MInference's index for `q [B, Hq, Lq, D]`, `k [B, Hkv, Lk, D]` under ``config.pattern``."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    if config.pattern == "a_shape":
        return a_shape_select(Lq, Lk, B, Hq, sink=config.sink, window=config.window,
                              block_size=config.block_size, device=q.device)
    if config.pattern == "block_sparse":
        return block_sparse_select(q, k, top_k=config.top_k, block_size=config.block_size, causal=causal)
    return minference_select(q, k, vertical_size=config.vertical_size, slash_size=config.slash_size,
                             adaptive_budget=config.adaptive_budget, last_q=config.last_q,
                             block_size=config.block_size, causal=causal)


def Minference_prefill(query_states, key_states, value_states, vertical_size=1000, slash_size=6096,
                       adaptive_budget=None, *, pattern="vertical_and_slash", last_q=64, causal=True,
                       scale=None, return_stats=False):
    """MInference sparse prefill (the seed's API).

    Args:
        query_states: `[B, Hq, Lq, D]`.
        key_states, value_states: `[B, Hkv, Lk, D]` with `Hq % Hkv == 0`.
        vertical_size: key columns kept per head (default 1000).
        slash_size: diagonals kept per head (default 6096).
        adaptive_budget: fraction of the key length as total budget (20% vertical / 80% slash);
            overrides the sizes when set (default None).
        pattern: ``"vertical_and_slash"``, ``"a_shape"`` or ``"block_sparse"``.
        last_q: queries of the online estimate (default 64).
        causal: causal attention (queries are the last `Lq` positions).
        scale: softmax scale, default `1/sqrt(D)`.
        return_stats: also return :class:`sparseattn.AttentionStats`.

    Returns:
        `[B, Hq, Lq, D]` in the query's dtype (and the stats).

    Example:
        >>> import torch
        >>> from sparseattn import Minference_prefill
        >>> q = k = v = torch.randn(1, 4, 512, 64)
        >>> Minference_prefill(q, k, v, vertical_size=64, slash_size=128).shape
        torch.Size([1, 4, 512, 64])
    """
    from ..api import sparse_attention

    check_qkv(query_states, key_states, value_states, causal=causal)  # errors name the seed's arguments
    return sparse_attention(query_states, key_states, value_states, method="minference", causal=causal,
                            scale=scale, return_stats=return_stats, vertical_size=vertical_size,
                            slash_size=slash_size, adaptive_budget=adaptive_budget, pattern=pattern,
                            last_q=last_q)


register_method("minference", select_blocks, MInferenceConfig,
                description="vertical-slash / A-shape / block-sparse head patterns (Jiang et al. 2024)")
