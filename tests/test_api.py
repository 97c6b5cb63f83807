"""The seed API, the unified entry point and the method registry."""

import importlib

import pytest
import torch

import sparseattn
from sparseattn import BlockIndex, sparse_attention
from sparseattn.index import causal_block_mask
from sparseattn.reference.attention import reference_attention


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def qkv(B=1, Hq=4, Hkv=2, Lq=300, Lk=300, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g),
            torch.randn(B, Hkv, Lk, D, generator=g))


@pytest.mark.parametrize("module,name", [("Xattention", "Xattention_prefill"), ("Flexprefill", "Flexprefill_prefill"),
                                         ("Minference", "Minference_prefill"), ("Fullprefill", "Full_prefill")])
def test_seed_import_paths(module, name):
    fn = getattr(importlib.import_module(f"sparseattn.src.{module}"), name)
    assert fn is getattr(sparseattn, name)


@pytest.mark.parametrize("Lq", [300, 1, 77])
def test_full_prefill_is_exact(Lq):
    q, k, v = qkv(B=2, Lq=Lq)
    out = sparseattn.Full_prefill(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel(out, reference_attention(q, k, v)) < 1e-5


def test_full_prefill_masks():
    q, k, v = qkv(Lq=50, Lk=50)
    keep = torch.rand(50, 50, generator=torch.Generator().manual_seed(1)) < 0.7
    keep |= torch.eye(50, dtype=torch.bool)
    out = sparseattn.Full_prefill(q, k, v, causal=False, attention_mask=keep)
    assert rel(out, reference_attention(q, k, v, causal=False, mask=keep)) < 1e-5
    bias = torch.randn(1, 4, 50, 50)
    out = sparseattn.Full_prefill(q, k, v, causal=True, attention_mask=bias)
    assert rel(out, reference_attention(q, k, v, causal=True, mask=bias)) < 1e-5


@pytest.mark.parametrize("method,options", [
    pytest.param("xattention", dict(threshold=1.0, stride=8, block_size=32), id="xattention-tau1"),
    pytest.param("streaming", dict(sink=16, window=10_000, block_size=32), id="streaming-window-all"),
    pytest.param("minference", dict(vertical_size=300, slash_size=300, block_size=32), id="minference-all"),
    pytest.param("flexprefill", dict(gamma=1.0, tau=0.0, sparsity_ratio=None, block_size=32), id="flexprefill-gamma1"),
])
@pytest.mark.parametrize("Lq", [300, 130])
def test_keep_everything_equals_dense(method, options, Lq):
    q, k, v = qkv(Lq=Lq)
    out, stats = sparse_attention(q, k, v, method=method, return_stats=True, **options)
    assert rel(out, reference_attention(q, k, v)) < 1e-5
    assert torch.allclose(stats.density, torch.ones_like(stats.density))


@pytest.mark.parametrize("method", ["xattention", "flexprefill", "minference", "streaming", "full"])
def test_every_method_runs_with_stats(method):
    q, k, v = qkv(B=2, Hq=6, Hkv=2, Lq=257, Lk=300)
    options = {"xattention": dict(block_size=64, stride=8), "minference": dict(vertical_size=64, slash_size=64),
               "streaming": dict(sink=16, window=64)}.get(method, {})
    out, stats = sparse_attention(q, k, v, method=method, return_stats=True, **options)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert stats.density.shape == (2, 6) and stats.method == method
    assert ((stats.density > 0) & (stats.density <= 1)).all()


def test_precomputed_index_is_used():
    q, k, v = qkv(Lq=128, Lk=128)
    mask = causal_block_mask(128, 128, 32, 32) & torch.eye(4, dtype=torch.bool)
    mask[:, 0] = True
    idx = BlockIndex.from_mask(mask.expand(1, 4, 4, 4), block_q=32, block_k=32, q_len=128, k_len=128)
    out = sparse_attention(q, k, v, block_index=idx)
    assert rel(out, reference_attention(q, k, v, mask=idx.to_element_mask())) < 1e-5


def test_custom_method_through_registry():
    calls = []

    def diagonal_only(q, k, config, *, causal=True):
        calls.append(config)
        B, H, Lq, _ = q.shape
        nq = -(-Lq // 16)
        mask = torch.eye(nq, dtype=torch.bool)
        mask[:, 0] = True
        return BlockIndex.from_mask(mask.expand(B, H, nq, nq), block_q=16, block_k=16, q_len=Lq, k_len=Lq)

    sparseattn.register_method("diag_test", diagonal_only, overwrite=True)
    try:
        q, k, v = qkv(Lq=64, Lk=64)
        out, stats = sparse_attention(q, k, v, method="diag_test", return_stats=True)
        assert calls == [None]
        assert torch.isfinite(out).all() and stats.density.max() < 1
        with pytest.raises(ValueError, match="already registered"):
            sparseattn.register_method("diag_test", diagonal_only)
    finally:
        sparseattn.METHODS.pop("diag_test")


def test_config_sources_agree(tmp_path):
    q, k, v = qkv()
    path = tmp_path / "c.json"
    path.write_text('{"threshold": 0.8, "stride": 8, "block_size": 32}')
    a = sparse_attention(q, k, v, config=str(path))
    b = sparse_attention(q, k, v, config={"threshold": 0.8, "stride": 8, "block_size": 32})
    c = sparse_attention(q, k, v, config=sparseattn.XAttentionConfig(threshold=0.5, stride=8, block_size=32),
                         threshold=0.8)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_varlen_equals_separate_sequences():
    q, k, v = qkv(Lq=300, Lk=300)
    cu = torch.tensor([0, 100, 250, 300], dtype=torch.int32)
    out = sparse_attention(q, k, v, method="xattention", cu_seqlens=cu, stride=8, block_size=32)
    for s, e in [(0, 100), (100, 250), (250, 300)]:
        part = sparse_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], stride=8, block_size=32)
        assert torch.equal(out[:, :, s:e], part)


def test_seed_readme_examples_shape_and_dtype():
    q = torch.randn(1, 4, 512, 64)
    for out in (sparseattn.Xattention_prefill(query_states=q, key_states=q, value_states=q, threshold=0.95, causal=True),
                sparseattn.Flexprefill_prefill(query_states=q, key_states=q, value_states=q, block_size=64, sparsity_ratio=0.2),
                sparseattn.Minference_prefill(query_states=q, key_states=q, value_states=q, vertical_size=1000,
                                              slash_size=6096, adaptive_budget=0.1),
                sparseattn.Full_prefill(q, q, q)):
        assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,bs", [(1, 4, 2, 300, 300, 32), (2, 6, 3, 77, 500, 64), (1, 2, 2, 1, 90, 16)])
def test_cpu_masked_sdpa_path_equals_reference(B, Hq, Hkv, Lq, Lk, bs, monkeypatch):
    from sparseattn import api
    from sparseattn.bench.inputs import random_block_index
    from sparseattn.reference.attention import reference_block_sparse_attention

    q, k, v = qkv(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk)
    idx = random_block_index(B, Hq, Lq, Lk, bs, 0.4, device="cpu", seed=2)
    monkeypatch.setattr(api, "_MASK_CHUNK_ELEMENTS", 4096)  # several chunks
    got = api._masked_sdpa(q, k, v, idx, causal=True, scale=None)
    assert rel(got, reference_block_sparse_attention(q, k, v, idx)) < 1e-5


def test_noncausal_vertical_slash_never_reaches_the_causal_kernel(monkeypatch):
    from sparseattn import api
    from sparseattn.reference.minference import minference_select

    calls = []
    monkeypatch.setattr(api, "_use_triton", lambda q: calls.append("asked") or True)
    q, k, v = qkv(Lq=100, Lk=100)
    idx = minference_select(q, k, vertical_size=8, slash_size=8, last_q=16, block_size=16, causal=False)
    out = api.attend(q, k, v, idx, causal=False)
    assert calls == []  # the causal-only kernel was not even considered
    expect = reference_attention(q, k, v, causal=False, mask=idx.to_element_mask(causal=False))
    assert rel(out, expect) < 1e-5
