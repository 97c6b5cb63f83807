"""Every public function rejects bad input with a clear message naming the argument."""

import math

import pytest
import torch

import sparseattn
from sparseattn import Flexprefill_prefill, Full_prefill, Minference_prefill, Xattention_prefill, sparse_attention


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


Q, K, V = t(1, 4, 64, 16), t(1, 2, 64, 16), t(1, 2, 64, 16)

# (id, callable, expected exception, regex the message must match)
CASES = [
    ("q-rank3", lambda: Xattention_prefill(t(4, 64, 16), K, V), ValueError, r"query_states must have 4 dimensions"),
    ("k-rank5", lambda: Xattention_prefill(Q, t(1, 1, 2, 64, 16), V), ValueError, r"key_states must have 4 dimensions"),
    ("v-not-tensor", lambda: Xattention_prefill(Q, K, [[1.0]]), TypeError, r"value_states must be a torch.Tensor"),
    ("q-int-dtype", lambda: Xattention_prefill(torch.ones(1, 4, 64, 16, dtype=torch.int64), K, V), TypeError, r"query_states must be float16, bfloat16 or float32"),
    ("dtype-mismatch", lambda: Xattention_prefill(Q.half(), K, V), TypeError, r"must share one dtype"),
    ("batch-mismatch", lambda: Xattention_prefill(t(2, 4, 64, 16), K, V), ValueError, r"batch size mismatch: query_states has 2, key_states has 1"),
    ("head-dim-mismatch", lambda: Xattention_prefill(t(1, 4, 64, 32), K, V), ValueError, r"head_dim mismatch: query_states has 32, key_states has 16"),
    ("kv-shape-mismatch", lambda: Xattention_prefill(Q, K, t(1, 2, 63, 16)), ValueError, r"key_states and value_states must have the same shape"),
    ("gqa-ratio", lambda: Xattention_prefill(t(1, 3, 64, 16), K, V), ValueError, r"query heads \(3\) must be a multiple of the number of key/value heads \(2\)"),
    ("lq-gt-lk-causal", lambda: Xattention_prefill(t(1, 4, 65, 16), K, V), ValueError, r"seq_len \(65\) must be <= key_states seq_len \(64\)"),
    ("empty-seq", lambda: Xattention_prefill(t(1, 4, 0, 16), K, V), ValueError, r"query_states must not be empty"),
    ("empty-heads", lambda: Full_prefill(t(1, 0, 64, 16), K, V), ValueError, r"query_states must not be empty"),
    ("threshold-nan", lambda: Xattention_prefill(Q, K, V, threshold=math.nan), ValueError, r"threshold must be finite"),
    ("threshold-inf", lambda: Xattention_prefill(Q, K, V, threshold=math.inf), ValueError, r"threshold must be finite"),
    ("threshold-zero", lambda: Xattention_prefill(Q, K, V, threshold=0.0), ValueError, r"threshold must lie in \(0, 1\]"),
    ("threshold-above-1", lambda: Xattention_prefill(Q, K, V, threshold=1.5), ValueError, r"threshold must lie in \(0, 1\]"),
    ("threshold-negative", lambda: Xattention_prefill(Q, K, V, threshold=-0.1), ValueError, r"threshold must lie in \(0, 1\]"),
    ("threshold-str", lambda: Xattention_prefill(Q, K, V, threshold="0.9"), TypeError, r"threshold must be of type float, Tensor, got str"),
    ("threshold-per-head-len", lambda: Xattention_prefill(Q, K, V, threshold=torch.tensor([0.9, 0.9])), ValueError, r"threshold has 2 entries, expected one per query head \(4\)"),
    ("threshold-per-head-nan", lambda: Xattention_prefill(Q, K, V, threshold=torch.tensor([0.9, math.nan, 0.9, 0.9])), ValueError, r"threshold must be finite"),
    ("stride", lambda: Xattention_prefill(Q, K, V, stride=5), ValueError, r"stride must be one of \[4, 8, 16\], got 5"),
    ("xattn-block-not-pow2", lambda: Xattention_prefill(Q, K, V, block_size=96), ValueError, r"block_size must be a power of two >= 16"),
    ("xattn-block-too-small", lambda: Xattention_prefill(Q, K, V, stride=16, block_size=8), ValueError, r"block_size must be a power of two >= 16"),
    ("causal-not-bool", lambda: sparse_attention(Q, K, V, causal="yes"), TypeError, r"causal must be a bool"),
    ("scale-negative", lambda: sparse_attention(Q, K, V, scale=-1.0), ValueError, r"scale must be a positive float"),
    ("flex-sparsity-ratio-zero", lambda: Flexprefill_prefill(Q, K, V, sparsity_ratio=0.0), ValueError, r"sparsity_ratio must lie in \(0, 1\]"),
    ("flex-sparsity-ratio-nan", lambda: Flexprefill_prefill(Q, K, V, sparsity_ratio=math.nan), ValueError, r"sparsity_ratio must be finite"),
    ("flex-gamma", lambda: Flexprefill_prefill(Q, K, V, gamma=1.2), ValueError, r"gamma must lie in \(0, 1\]"),
    ("flex-tau-negative", lambda: Flexprefill_prefill(Q, K, V, tau=-0.5), ValueError, r"tau must lie in \[0, 1\]"),
    ("flex-block", lambda: Flexprefill_prefill(Q, K, V, block_size=0), ValueError, r"block_size must be > 0"),
    ("flex-min-budget-negative", lambda: Flexprefill_prefill(Q, K, V, min_budget=-1), ValueError, r"min_budget must be >= 0, got -1"),
    ("flex-budget-order", lambda: Flexprefill_prefill(Q, K, V, min_budget=100, max_budget=10), ValueError, r"min_budget \(100\) must be <= max_budget \(10\)"),
    ("minf-vertical-negative", lambda: Minference_prefill(Q, K, V, vertical_size=-5), ValueError, r"vertical_size must be > 0, got -5"),
    ("minf-slash-float", lambda: Minference_prefill(Q, K, V, slash_size=10.5), TypeError, r"slash_size must be of type int, got float"),
    ("minf-budget-negative", lambda: Minference_prefill(Q, K, V, adaptive_budget=-0.1), ValueError, r"adaptive_budget must lie in \(0, 1\]"),
    ("minf-budget-inf", lambda: Minference_prefill(Q, K, V, adaptive_budget=math.inf), ValueError, r"adaptive_budget must be finite"),
    ("minf-pattern", lambda: Minference_prefill(Q, K, V, pattern="diagonal"), ValueError, r"pattern must be one of \['a_shape', 'block_sparse', 'vertical_and_slash'\]"),
    ("full-mask-shape", lambda: Full_prefill(Q, K, V, attention_mask=torch.ones(64, 63, dtype=torch.bool)), ValueError, r"attention_mask shape \(64, 63\) does not broadcast"),
    ("full-mask-type", lambda: Full_prefill(Q, K, V, attention_mask=[[True]]), TypeError, r"attention_mask must be a torch.Tensor"),
    ("unknown-method", lambda: sparse_attention(Q, K, V, method="nope"), ValueError, r"unknown method 'nope'; registered methods are \["),
    ("unknown-override", lambda: sparse_attention(Q, K, V, method="xattention", gamma=0.9), ValueError, r"unknown XAttentionConfig option\(s\) \['gamma'\]; valid options are"),
    ("full-takes-no-options", lambda: sparse_attention(Q, K, V, method="full", threshold=0.9), ValueError, r"method 'full' takes no options"),
    ("streaming-window-zero", lambda: sparse_attention(Q, K, V, method="streaming", window=0), ValueError, r"window must be > 0"),
    ("config-wrong-type", lambda: sparse_attention(Q, K, V, config=3), TypeError, r"config for method 'xattention' must be None"),
    ("block-index-wrong-shape", lambda: sparse_attention(Q, K, V, block_index=sparseattn.BlockIndex.dense(1, 2, 64, 64, 16, 16)), ValueError, r"block_index is for \(batch, heads, q_len, k_len\) = \(1, 2, 64, 64\)"),
    ("block-index-wrong-type", lambda: sparse_attention(Q, K, V, block_index="all"), TypeError, r"block_index must be a BlockIndex"),
    ("varlen-bad-bounds", lambda: sparse_attention(Q, K, V, cu_seqlens=torch.tensor([0, 30, 20, 64])), ValueError, r"cu_seqlens must start at 0, increase strictly"),
    ("varlen-batch", lambda: sparse_attention(t(2, 4, 64, 16), t(2, 2, 64, 16), t(2, 2, 64, 16), cu_seqlens=torch.tensor([0, 64])), ValueError, r"q must be packed as \[1, heads, total, head_dim\]"),
]


@pytest.mark.parametrize("fn,exc,match", [pytest.param(c[1], c[2], c[3], id=c[0]) for c in CASES])
def test_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_case_count():
    assert len(CASES) >= 30


def test_device_mismatch_message():
    if not torch.cuda.is_available():
        # Two devices are needed; "meta" stands in for a second device on a CPU machine.
        q = torch.empty(1, 4, 64, 16, device="meta")
        with pytest.raises(ValueError, match="must be on one device"):
            Xattention_prefill(q, K, V)
