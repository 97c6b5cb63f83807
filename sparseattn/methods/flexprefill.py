"""FlexPrefill (Lai et al., ICLR 2025): per-head choice of query-aware or vertical-slash blocks.

Selection on a GPU runs the fused Triton path (``sparseattn.kernels.flexprefill``); on a CPU the
fp32 reference (``sparseattn.reference.flexprefill``). Both apply the same rule, documented (with
every deliberate difference from the public reference implementation) in
``reference.flexprefill.flexprefill_select``.

Block size. ``FlexPrefillConfig`` defaults to 128, the paper's and the public reference's block:
the shared kernel's tiles are capped at the selection block, and 64-blocks buy no density here.
Measured on the H100 (``benchmarks/bench_flexprefill.py``, run 8: 128K, LLM-like input, seed 0,
gamma 0.9): block 128, density 14.5%, attention 46.5 ms, end to end 53.8 ms; block 64, density
14.2%, attention 55.9 ms, end to end 64.8 ms. ``Flexprefill_prefill`` keeps the seed's documented
default of 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..index import BlockIndex
from ..kernels import kernels_available
from ..reference.flexprefill import flexprefill_select
from ..validation import check_block_size, check_positive_int, check_unit_interval, check_qkv
from . import block_index_bytes, register_method

__all__ = ["FlexPrefillConfig", "Flexprefill_prefill", "flexprefill_fidelity", "select_blocks"]


@dataclass(frozen=True)
class FlexPrefillConfig:
    """Options of FlexPrefill.

    Args:
        gamma: attention-mass coverage each head must reach, in (0, 1] (default 0.9).
        tau: sqrt-JS-divergence threshold below which a head is query-aware, in [0, 1]
            (default 0.1; 0 disables query-aware heads).
        min_budget: fewest tokens of verticals/slashes a vertical-slash head keeps (None: no floor).
        max_budget: most tokens a vertical-slash head keeps (None: no cap).
        block_size: selection block, also the kernel's tile (default 128, as the paper).
        sparsity_ratio: the seed's cap on the fraction of causal key blocks any query block keeps,
            in (0, 1] (default 0.2 in ``Flexprefill_prefill``; None: no cap).
    """

    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int | None = None
    max_budget: int | None = None
    block_size: int = 128
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
    """FlexPrefill's block selection for `q [B, Hq, Lq, D]`, `k [B, Hkv, Lk, D]`.

    On a GPU the fused Triton path (no host synchronization); on a CPU the fp32 reference. Both
    apply the rule of ``sparseattn.reference.flexprefill.flexprefill_select``.
    """
    return _select(q, k, config, causal=causal)


def _select(q, k, config: FlexPrefillConfig, *, causal: bool = True, return_patterns: bool = False):
    options = dict(gamma=config.gamma, tau=config.tau, min_budget=config.min_budget, max_budget=config.max_budget,
                   block_size=config.block_size, sparsity_ratio=config.sparsity_ratio, causal=causal,
                   return_patterns=return_patterns)
    if q.is_cuda and kernels_available():
        from ..kernels.flexprefill import flexprefill_select_fast

        return flexprefill_select_fast(q, k, **options)
    return flexprefill_select(q, k, **options)


def Flexprefill_prefill(query_states, key_states, value_states, block_size=64, sparsity_ratio=0.2, *,
                        gamma=0.9, tau=0.1, min_budget=None, max_budget=None, causal=True, scale=None,
                        return_stats=False):
    """FlexPrefill sparse prefill (the seed's API).

    Args:
        query_states: `[B, Hq, Lq, D]`.
        key_states, value_states: `[B, Hkv, Lk, D]` with `Hq % Hkv == 0`.
        block_size: selection block size (default 64, the seed's; 128 is faster on the GPU kernel).
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


@torch.no_grad()
def flexprefill_fidelity(model, input_ids: torch.Tensor, *, gammas=(0.9, 0.95), layers=None, progress=None,
                         **options) -> list[dict]:
    """Per layer and gamma: FlexPrefill's recall of the exact attention mass and its output error.

    Captures the post-RoPE q/k/v of ``layers`` (default: all) in one forward pass of ``model`` on
    ``input_ids [1, L]`` (``sparseattn.bench.capture``), selects blocks with each ``gamma`` (other
    ``FlexPrefillConfig`` fields from ``options``) and measures, against exact fp32 attention
    (``sparseattn.evaluation.fidelity.attention_fidelity``), per head: the attention mass inside
    the selected blocks (recall, averaged over query rows), ``||o_sparse - o_dense|| / ||o_dense||``,
    the density, and whether the head was query-aware.

    Returns:
        One dict per (layer, gamma): ``layer``, ``gamma``, ``recall``, ``rel_error``, ``density``
        (lists over query heads, batch-averaged), ``query_aware`` (fraction of batch elements).

    Example:
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> rows = flexprefill_fidelity(model, torch.randint(0, 128, (1, 300)), layers=[1], block_size=64)
        >>> [(r["layer"], r["gamma"], len(r["recall"])) for r in rows]
        [(1, 0.9, 4), (1, 0.95, 4)]
    """
    from ..bench.capture import capture_qkv
    from ..evaluation.fidelity import attention_fidelity

    captured = capture_qkv(model, input_ids, layers=layers)
    rows = []
    for layer in sorted(captured):
        q, k, v = captured.pop(layer)  # drop each layer's tensors once measured
        for gamma in gammas:
            index, query_aware = _select(q, k, FlexPrefillConfig(**{**options, "gamma": gamma}), return_patterns=True)
            fid = attention_fidelity(q, k, v, index)
            rows.append({"layer": layer, "gamma": gamma, "recall": fid["recall"].mean(0).tolist(),
                         "rel_error": fid["rel_error"].mean(0).tolist(),
                         "density": index.density().float().mean(0).cpu().tolist(),
                         "query_aware": query_aware.float().mean(0).cpu().tolist()})
            if progress:
                progress(f"layer {layer} gamma {gamma}: recall {fid['recall'].mean():.4f}, "
                         f"rel. error {fid['rel_error'].mean():.4f}, density {index.density().mean():.3f}")
    return rows


def index_bytes(config: FlexPrefillConfig, batch: int, q_heads: int, q_len: int, k_len: int) -> int:
    """The selection's index, bounded by every key block per row."""
    return block_index_bytes(batch, q_heads, q_len, k_len, config.block_size)


register_method("flexprefill", select_blocks, FlexPrefillConfig, index_bytes=index_bytes,
                description="query-aware or vertical-slash blocks per head by JS divergence (Lai et al. 2025)")
