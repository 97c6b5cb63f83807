"""FlexPrefill (Lai et al., ICLR 2025): per-head choice of query-aware or vertical-slash blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..index import BlockIndex
from ..reference.flexprefill import flexprefill_select
from ..validation import check_block_size, check_positive_int, check_unit_interval, check_qkv
from . import register_method


@dataclass(frozen=True)
class FlexPrefillConfig:
    """Options of FlexPrefill.

    Args:
        gamma: attention-mass coverage each head must reach, in (0, 1] (default 0.9).
        tau: sqrt-JS-divergence threshold below which a head is query-aware, in [0, 1]
            (default 0.1; 0 disables query-aware heads).
        min_budget: fewest tokens of verticals/slashes a vertical-slash head keeps (None: no floor).
        max_budget: most tokens a vertical-slash head keeps (None: no cap).
        block_size: selection block (default 64).
        sparsity_ratio: the seed's cap on the fraction of causal key blocks any query block keeps,
            in (0, 1] (default 0.2 in ``Flexprefill_prefill``; None: no cap).
    """

    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int | None = None
    max_budget: int | None = None
    block_size: int = 64
    sparsity_ratio: float | None = None

    def __post_init__(self):
        check_unit_interval("gamma", self.gamma, allow_tensor=False)
        check_unit_interval("tau", self.tau, allow_tensor=False, low_open=False)
        check_positive_int("min_budget", self.min_budget, allow_zero=True, allow_none=True)
        check_positive_int("max_budget", self.max_budget, allow_none=True)
        if self.min_budget is not None and self.max_budget is not None and self.min_budget > self.max_budget:
            raise ValueError(f"min_budget ({self.min_budget}) must be <= max_budget ({self.max_budget})")
        check_block_size("block_size", self.block_size)
        if self.sparsity_ratio is not None:
            check_unit_interval("sparsity_ratio", self.sparsity_ratio, allow_tensor=False)


def select_blocks(q: torch.Tensor, k: torch.Tensor, config: FlexPrefillConfig, *, causal: bool = True) -> BlockIndex:
    """FlexPrefill's block selection for `q [B, Hq, Lq, D]`, `k [B, Hkv, Lk, D]`."""
    return flexprefill_select(q, k, gamma=config.gamma, tau=config.tau, min_budget=config.min_budget,
                              max_budget=config.max_budget, block_size=config.block_size,
                              sparsity_ratio=config.sparsity_ratio, causal=causal)


def Flexprefill_prefill(query_states, key_states, value_states, block_size=64, sparsity_ratio=0.2, *,
                        gamma=0.9, tau=0.1, min_budget=None, max_budget=None, causal=True, scale=None,
                        return_stats=False):
    """FlexPrefill sparse prefill (the seed's API).

    Args:
        query_states: `[B, Hq, Lq, D]`.
        key_states, value_states: `[B, Hkv, Lk, D]` with `Hq % Hkv == 0`.
        block_size: selection block size (default 64).
        sparsity_ratio: cap on the fraction of causal key blocks each query block keeps (default 0.2;
            None for no cap).
        gamma: coverage of attention mass (default 0.9).
        tau: JS-divergence threshold of the pattern choice (default 0.1).
        min_budget, max_budget: token budgets of vertical-slash heads (default None: unbounded).
        causal: causal attention (queries are the last `Lq` positions).
        scale: softmax scale, default `1/sqrt(D)`.
        return_stats: also return :class:`sparseattn.AttentionStats`.

    Returns:
        `[B, Hq, Lq, D]` in the query's dtype (and the stats).

    Example:
        >>> import torch
        >>> from sparseattn import Flexprefill_prefill
        >>> q = k = v = torch.randn(1, 4, 512, 64)
        >>> Flexprefill_prefill(q, k, v, block_size=64, sparsity_ratio=0.2).shape
        torch.Size([1, 4, 512, 64])
    """
    from ..api import sparse_attention

    check_qkv(query_states, key_states, value_states, causal=causal)  # errors name the seed's arguments
    return sparse_attention(query_states, key_states, value_states, method="flexprefill", causal=causal,
                            scale=scale, return_stats=return_stats, block_size=block_size,
                            sparsity_ratio=sparsity_ratio, gamma=gamma, tau=tau, min_budget=min_budget,
                            max_budget=max_budget)


register_method("flexprefill", select_blocks, FlexPrefillConfig,
                description="query-aware or vertical-slash blocks per head by JS divergence (Lai et al. 2025)")
