"""Memory-bounded calls: ``sparse_attention`` selects and attends whole GQA groups at a time when a
method's index would exceed ``api.INDEX_BUDGET`` of the q + k + v bytes (BENCHMARKS.md: a call holds
at most 10% of them beyond its output). Chunked and whole calls must give the same output and
densities; outputs are allocated NaN-filled (``SPARSEATTN_NAN_FILL=1``), so a head that no chunk
writes fails the comparison."""

import dataclasses

import pytest
import torch

import sparseattn
from sparseattn import api, sparse_attention
from sparseattn.index import BlockIndex
from sparseattn.methods import get_method
from sparseattn.methods.minference import MInferenceConfig


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: kernels in the Triton interpreter


def qkv(B=2, Hq=6, Hkv=3, L=160, D=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv)]
    return [x.to(device=DEV, dtype=dtype) for x in t]


CASES = [
    ("xattention", dict(threshold=torch.tensor([0.5, 0.9, 0.7, 0.95, 0.6, 0.8], device=DEV), stride=8, block_size=32)),
    ("flexprefill", dict(gamma=0.8, block_size=32)),
    ("minference", dict(vertical_size=16, slash_size=32, last_q=16, block_size=32)),
    ("minference", dict(block_size=32, last_q=16, head_patterns=[
        ["vertical_and_slash", 16, 32], ["a_shape", 32, 64], ["block_sparse", 2, 0],
        ["vertical_and_slash", 40, 8], ["block_sparse", 3, 0], ["a_shape", 32, 64]])),
    # KV heads 0 and 2 full, 1 streaming: chunks of one KV head are dense, streaming, dense.
    ("headmask", dict(full_heads=[True, False, True], sink=32, window=64, block_size=32)),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("method,options", CASES, ids=["xattn-per-head-tau", "flexprefill", "minference",
                                                         "minference-head-patterns", "headmask"])
def test_chunked_call_equals_whole_call(method, options, backend, monkeypatch):
    monkeypatch.setenv("SPARSEATTN_BACKEND", backend)
    monkeypatch.setenv("SPARSEATTN_NAN_FILL", "1")
    q, k, v = qkv()
    spec = get_method(method)
    cfg = api.resolve_config(method, None, **options)
    monkeypatch.setattr(api, "INDEX_BUDGET_FLOOR", 0)  # tiny shapes: the floor alone would never chunk them
    monkeypatch.setattr(api, "INDEX_BUDGET", 1e9)
    assert api.kv_heads_per_chunk(spec, cfg, q, k, v) == 3
    whole, whole_stats = sparse_attention(q, k, v, method=method, return_stats=True, **options)
    monkeypatch.setattr(api, "INDEX_BUDGET", 1e-9)  # one KV group (2 query heads) per chunk
    assert api.kv_heads_per_chunk(spec, cfg, q, k, v) == 1
    chunked, stats = sparse_attention(q, k, v, method=method, return_stats=True, **options)
    assert torch.isfinite(chunked).all()
    assert torch.equal(chunked, whole)
    assert torch.equal(stats.density, whole_stats.density)
    assert stats.index is None and whole_stats.index is not None
    assert torch.equal(sparse_attention(q, k, v, method=method, **options), whole)  # without stats too


def _counting_method(calls, total_bytes):
    def select(q, k, config, *, causal=True):
        calls.append((q.shape[1], k.shape[1], config))
        B, H, L, _ = q.shape
        nq = -(-L // 16)
        mask = torch.tril(torch.ones(nq, nq, dtype=torch.bool, device=q.device))
        return BlockIndex.from_mask(mask.expand(B, H, nq, nq), block_q=16, block_k=16, q_len=L, k_len=L)

    # The bound grows with the heads: ``total_bytes`` for the 8 query heads of these tests.
    return dict(select=select, index_bytes=lambda cfg, B, Hq, Lq, Lk: total_bytes * Hq // 8,
                head_slice=lambda cfg, start, stop, group: (start, stop, group))


def test_chunks_follow_the_budget_and_slice_the_config(monkeypatch):
    q, k, v = qkv(B=1, Hq=8, Hkv=4, L=64)
    monkeypatch.setattr(api, "INDEX_BUDGET_FLOOR", 0)
    qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    calls = []
    lse_bytes = 4 * 8 * 64  # the fp32 log-sum-exp, which kv_heads_per_chunk adds to the method's bound
    hooks = _counting_method(calls, total_bytes=qkv_bytes - lse_bytes)  # with it, 1/4 of q+k+v per KV head
    sparseattn.register_method("chunk_test", hooks["select"], overwrite=True, index_bytes=hooks["index_bytes"],
                               head_slice=hooks["head_slice"])
    try:
        expect = sparse_attention(q, k, v, method="full")
        for budget, expected in ((1.0, [(8, 4, None)]),  # fits: one call, the config untouched
                                 (0.5, [(4, 2, (0, 4, 2)), (4, 2, (4, 8, 2))]),  # two KV heads per chunk
                                 (0.3, [(2, 1, (0, 2, 2)), (2, 1, (2, 4, 2)), (2, 1, (4, 6, 2)), (2, 1, (6, 8, 2))]),
                                 (0.0, [(2, 1, (0, 2, 2)), (2, 1, (2, 4, 2)), (2, 1, (4, 6, 2)), (2, 1, (6, 8, 2))])):
            calls.clear()
            monkeypatch.setattr(api, "INDEX_BUDGET", budget)
            out = sparse_attention(q, k, v, method="chunk_test")
            assert calls == expected, budget
            assert (out - expect).abs().max() < 1e-5  # every causal block: the dense result
        # 3 KV heads per chunk of 4: chunks of 3 and 1 heads.
        monkeypatch.setattr(api, "INDEX_BUDGET", 0.76)
        calls.clear()
        sparse_attention(q, k, v, method="chunk_test")
        assert calls == [(6, 3, (0, 6, 2)), (2, 1, (6, 8, 2))]
    finally:
        sparseattn.METHODS.pop("chunk_test")


@dataclasses.dataclass(frozen=True)
class _Shares:
    shares: tuple = ()  # each query head's share of the budget


def test_chunks_are_packed_by_their_own_bytes(monkeypatch):
    """Heads whose bounds differ (a per-head config, sliced by ``head_slice``): the cheap KV heads
    share chunks, a KV head that fills the budget alone gets its own, and the result is unchanged."""
    q, k, v = qkv(B=1, Hq=8, Hkv=4, L=64)
    monkeypatch.setattr(api, "INDEX_BUDGET_FLOOR", 0)
    budget = api.INDEX_BUDGET * sum(t.numel() * t.element_size() for t in (q, k, v))
    cfg = _Shares((0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.1, 0.1))  # KV head 2 (query heads 4, 5) is wide
    calls = []
    hooks = _counting_method(calls, 0)

    def index_bytes(config, B, Hq, Lq, Lk):
        return int(budget * sum(config.shares)) - 4 * B * Hq * Lq  # less the log-sum-exp the API adds

    def head_slice(config, start, stop, group):
        return _Shares(config.shares[start:stop])

    sparseattn.register_method("chunk_test", hooks["select"], _Shares, overwrite=True, index_bytes=index_bytes,
                               head_slice=head_slice)
    try:
        spec = get_method("chunk_test")
        assert api.packed_chunk_bounds(spec, cfg, q, k, v) == [(0, 2), (2, 3), (3, 4)]
        assert api.kv_heads_per_chunk(spec, cfg, q, k, v) == 1  # uniform chunks: 4 calls
        out = sparse_attention(q, k, v, method="chunk_test", config=cfg)
        assert [c[2].shares for c in calls] == [cfg.shares[0:4], cfg.shares[4:6], cfg.shares[6:8]]
        assert (out - sparse_attention(q, k, v, method="full")).abs().max() < 1e-5
    finally:
        sparseattn.METHODS.pop("chunk_test")


def test_calls_that_need_gradients_are_not_chunked(monkeypatch):
    q, k, v = qkv(B=1, Hq=4, Hkv=2, L=64)
    q.requires_grad_(True)
    calls = []
    hooks = _counting_method(calls, total_bytes=1 << 40)
    sparseattn.register_method("chunk_test", hooks["select"], overwrite=True, index_bytes=hooks["index_bytes"],
                               head_slice=hooks["head_slice"])
    try:
        out = sparse_attention(q, k, v, method="chunk_test")
        assert calls == [(4, 2, None)]
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
        calls.clear()
        with torch.no_grad():
            sparse_attention(q, k, v, method="chunk_test")
        assert len(calls) == 2
    finally:
        sparseattn.METHODS.pop("chunk_test")


def test_register_method_checks_the_hooks():
    with pytest.raises(TypeError, match="index_bytes"):
        sparseattn.register_method("bad_hooks", lambda q, k, c, *, causal=True: None, index_bytes=3)


def test_index_bytes_hooks_are_given_the_head_dim_and_kv_heads_if_they_take_them():
    from sparseattn.methods import minference

    seen = {}

    def with_dim(config, batch, q_heads, q_len, k_len, *, head_dim):
        seen["head_dim"] = head_dim
        return 0

    def with_both(config, batch, q_heads, q_len, k_len, **options):
        seen["both"] = options
        return 0

    def without(config, batch, q_heads, q_len, k_len):  # a hook written before head_dim existed
        seen["old"] = True
        return 0

    q = torch.empty(1, 8, 4096, 96, device="meta")
    k = v = torch.empty(1, 4, 4096, 96, device="meta")
    for hook in (with_dim, with_both, without):
        spec = dataclasses.replace(get_method("minference"), index_bytes=hook)
        assert api.kv_heads_per_chunk(spec, MInferenceConfig(), q, k, v) == 4
    assert seen == {"head_dim": 96, "both": {"head_dim": 96, "kv_heads": 4}, "old": True}
    # Block-sparse heads pool q and k in fp32, head_dim wide (q for 32 heads, k for 8), and hold the
    # pools of a chunk's four heads (four 128K heads' 2048 x 2048 scores fill it): the bound grows with D.
    cfg = MInferenceConfig(pattern="block_sparse", top_k=64)
    small, large = (minference.index_bytes(cfg, 1, 32, 131072, 131072, head_dim=d, kv_heads=8) for d in (64, 256))
    assert large - small == 4 * 192 * (32 * 2048 + 8 * 2048 + 4 * (2048 + 2048))


def test_budget_at_128k_on_meta_tensors():
    """Which built-in configs are chunked at the benchmark's shape (B=1, GQA 32/8, D=128, bf16, 128K)."""
    L = 131072
    q = torch.empty(1, 32, L, 128, dtype=torch.bfloat16, device="meta")
    k = v = torch.empty(1, 8, L, 128, dtype=torch.bfloat16, device="meta")

    def per_chunk(method, **options):
        return api.kv_heads_per_chunk(get_method(method), api.resolve_config(method, None, **options), q, k, v)

    assert per_chunk("xattention") == 8  # 128 MiB of index on 128-blocks: within 154 MiB
    assert per_chunk("flexprefill") == 8
    assert per_chunk("xattention", block_size=64) == 2  # 512 MiB on 64-blocks
    assert per_chunk("minference") == 1  # the seed's sizes: ~760 MiB
    assert per_chunk("minference", vertical_size=512, slash_size=512) == 2  # 3 held 175 MiB on the H100
    assert per_chunk("minference", pattern="block_sparse", top_k=64) == 8  # 146 MiB: pools + four heads' scores
    assert per_chunk("minference", pattern="block_sparse", top_k=256) == 6  # 194 MiB: a wider index
    assert per_chunk("streaming") == 8  # no index_bytes hook: never chunked
    # A searched table with two wide vertical-slash heads (1024/1024: 2048 ranges a row) in KV head 3:
    # uniform chunks of one KV head (8 calls); packed by their own bytes, 3 calls, the wide head alone.
    table = (("block_sparse", 32, 0),) * 13 + (("vertical_and_slash", 1024, 1024),) * 2 + (("block_sparse", 64, 0),) * 17
    cfg = api.resolve_config("minference", None, head_patterns=table)
    assert api.kv_heads_per_chunk(get_method("minference"), cfg, q, k, v) == 1
    assert api.packed_chunk_bounds(get_method("minference"), cfg, q, k, v) == [(0, 3), (3, 4), (4, 8)]
    half = [True, False] * 4
    assert per_chunk("headmask", full_heads=half) == 2  # a mixed mask's [B, Hq, nq, nk] index: 512 MiB
    assert per_chunk("headmask", full_heads=[True] * 8) == 8  # dense: no index
    assert per_chunk("headmask", full_heads=[False] * 8) == 8  # streaming rows are views of a cached table


def test_out_buffer_is_checked():
    from sparseattn.kernels.block_sparse import block_sparse_forward

    q, k, v = qkv(B=1, Hq=2, Hkv=1, L=32)
    with pytest.raises(ValueError, match="out must be"):
        block_sparse_forward(q, k, v, None, out=torch.empty(1, 2, 31, 32, device=DEV))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        block_sparse_forward(q, k, v, None, out=torch.empty(1, 2, 32, 64, device=DEV)[..., ::2])
    buf = torch.full((1, 4, 32, 32), float("nan"), device=DEV)
    got = block_sparse_forward(q, k, v, None, out=buf[:, 1:3])[0]  # a head slice of a larger buffer
    assert got.data_ptr() == buf[:, 1:3].data_ptr()
    assert torch.isnan(buf[:, 0]).all() and torch.isnan(buf[:, 3]).all() and torch.isfinite(buf[:, 1:3]).all()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.expand(1, 2, 32, 32), v.expand(1, 2, 32, 32),
                                                           is_causal=True)
    assert (buf[:, 1:3] - ref).abs().max() < 1e-4


# A per-head mix like a searched table's at 128K (run 20e): block-sparse, vertical-slash in one group.
MIXED_128K = ((("block_sparse", 64, 0),) * 12 + (("vertical_and_slash", 1024, 1024),) * 4
              + (("block_sparse", 256, 0),) * 8 + (("a_shape", 128, 2048),) * 8)


# Run 21: a layer-mean-0.9 table of seed 1 (block-sparse top 16-256, four vertical-slash heads) held
# 210 MiB; here its vertical-slash heads span four KV groups.
CALIBRATED_128K = ((("block_sparse", 64, 0),) * 6 + (("vertical_and_slash", 128, 128),) * 2
                   + (("block_sparse", 64, 0),) * 8 + (("vertical_and_slash", 128, 128),) * 2
                   + (("block_sparse", 64, 0),) * 2 + (("block_sparse", 128, 0),) * 4
                   + (("block_sparse", 16, 0),) * 4 + (("block_sparse", 256, 0),) * 4)


@pytest.mark.gpu
@pytest.mark.parametrize("method,options", [("xattention", {}), ("flexprefill", {}), ("minference", {}),
                                            ("minference", dict(vertical_size=512, slash_size=512)),
                                            ("minference", dict(pattern="block_sparse", top_k=256)),
                                            ("minference", dict(head_patterns=MIXED_128K)),
                                            ("minference", dict(head_patterns=CALIBRATED_128K)),
                                            ("streaming", {}), ("headmask", dict(full_heads=[True, False] * 4))])
def test_gpu_peak_memory_at_128k_is_within_budget(method, options):
    """BENCHMARKS.md: at 128K a call holds at most 10% of the q + k + v bytes beyond its output."""
    from sparseattn.bench.inputs import llm_like_qkv

    q, k, v = llm_like_qkv(1, 32, 8, 131072, 128, seed=131072)
    sparse_attention(q, k, v, method=method, **options)  # compile and warm up outside the measurement
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = sparse_attention(q, k, v, method=method, **options)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
    budget = 0.10 * sum(t.numel() * t.element_size() for t in (q, k, v))
    print(f"{method} {options}: {extra / 2**20:.0f} MiB beyond the output (budget {budget / 2**20:.0f})")
    assert extra <= budget, f"{method} {options}: {extra / 2**20:.0f} MiB beyond the output, budget {budget / 2**20:.0f}"


def test_head_mask_chunks_never_mix_full_and_streaming_heads(monkeypatch):
    """``chunk_bounds``: with room for 2 KV heads per chunk, the mask [full, streaming, streaming] is
    cut as (0, 1), (1, 3): the full head alone (dense mode), the streaming heads together."""

    monkeypatch.setenv("SPARSEATTN_BACKEND", "triton")
    monkeypatch.setenv("SPARSEATTN_NAN_FILL", "1")
    q, k, v = qkv()
    options = dict(full_heads=[True, False, False], sink=32, window=64, block_size=32)
    whole = sparse_attention(q, k, v, method="headmask", **options)
    spec = get_method("headmask")
    calls = []

    def spy(qc, kc, config, *, causal=True):
        calls.append((kc.shape[1], config.full_heads))
        return spec.select(qc, kc, config, causal=causal)

    monkeypatch.setitem(sparseattn.METHODS, "headmask", dataclasses.replace(spec, select=spy))
    monkeypatch.setattr(api, "kv_heads_per_chunk", lambda *args: 2)
    chunked = sparse_attention(q, k, v, method="headmask", **options)
    assert calls == [(1, (True,)), (2, (False, False))]
    assert torch.equal(chunked, whole)


def test_short_prompts_are_never_chunked():
    """The floor: MInference at 8K on SmolLM2's shape (9/3 heads, D = 64) bounds its index at ~3 MiB,
    over 10% of q + k + v (1.6 MiB) but far below ``INDEX_BUDGET_FLOOR``: one call, not three."""
    L = 8192
    q = torch.empty(1, 9, L, 64, dtype=torch.bfloat16, device="meta")
    k = v = torch.empty(1, 3, L, 64, dtype=torch.bfloat16, device="meta")
    spec = get_method("minference")
    cfg = api.resolve_config("minference", None, adaptive_budget=0.1)
    assert spec.index_bytes(cfg, 1, 9, L, L) > 0.10 * sum(t.numel() * t.element_size() for t in (q, k, v))
    assert api.kv_heads_per_chunk(spec, cfg, q, k, v) == 3
