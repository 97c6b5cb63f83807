"""The Triton kernels (block-sparse forward/backward, dense mode, varlen, vertical-slash) against a
small reference in this file.

Without CUDA the real kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set in
conftest.py) on fp32 CPU tensors with small blocks; with CUDA the same tests run on the GPU (fp32
and bf16), plus the ``gpu``-marked large shapes. Every kernel output is allocated NaN-filled
(``SPARSEATTN_NAN_FILL=1``), so a row a kernel never writes fails the comparison.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseattn.index import BlockIndex, VerticalSlashIndex, causal_block_mask, diagonal_block_range
from sparseattn.kernels.block_sparse import (
    NAN_FILL_ENV,
    AttentionConfigs,
    KernelConfig,
    alloc_output,
    block_sparse_attention,
    block_sparse_backward,
    block_sparse_forward,
    key_major_index,
)
from sparseattn.kernels.vertical_slash import vertical_slash_attention, vertical_slash_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    monkeypatch.setenv(NAN_FILL_ENV, "1")
    torch.backends.cuda.matmul.allow_tf32 = False


# ---- reference ---------------------------------------------------------------------------------


def block_mask(index) -> torch.Tensor:
    """`[B, H, nq, nk]` bool from indices/counts (written here, independent of index.py)."""
    B, H, nq, width = index.indices.shape
    nk = -(-index.k_len // index.block_k)
    valid = torch.arange(width, device=index.indices.device) < index.counts[..., None]
    target = torch.where(valid, index.indices.long(), nk)
    full = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=index.indices.device)
    return full.scatter_(-1, target, True)[..., :nk]


def causal_allowed(Lq, Lk, device=DEVICE):
    return torch.arange(Lk, device=device)[None, :] <= (torch.arange(Lq, device=device) + Lk - Lq)[:, None]


def element_mask(index: BlockIndex, causal: bool) -> torch.Tensor:
    rows = torch.arange(index.q_len, device=index.indices.device) // index.block_q
    cols = torch.arange(index.k_len, device=index.indices.device) // index.block_k
    elem = block_mask(index)[:, :, rows][:, :, :, cols]
    return elem & causal_allowed(index.q_len, index.k_len, elem.device) if causal else elem


def vs_element_mask(index: VerticalSlashIndex) -> torch.Tensor:
    B, H, nq, max_r = index.range_starts.shape
    dev = index.range_starts.device
    kpos = torch.arange(index.k_len, device=dev)
    r_valid = torch.arange(max_r, device=dev) < index.range_counts[..., None]
    starts = index.range_starts.long()[..., None]
    mask = ((kpos >= starts) & (kpos < starts + index.block_k) & r_valid[..., None]).any(-2)  # [B,H,nq,Lk]
    c_valid = torch.arange(index.columns.shape[-1], device=dev) < index.column_counts[..., None]
    target = torch.where(c_valid, index.columns.long(), index.k_len)
    cols = torch.zeros(B, H, nq, index.k_len + 1, dtype=torch.bool, device=dev).scatter_(-1, target, True)
    mask = mask | cols[..., :index.k_len]
    elem = mask[:, :, torch.arange(index.q_len, device=dev) // index.block_q]
    return elem & causal_allowed(index.q_len, index.k_len, dev)


def reference(q, k, v, allowed=None, scale=None):
    """fp64 softmax(q k^T * scale + mask) v with GQA by indexing the KV head; returns (out, lse)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    kv_head = torch.arange(Hq, device=q.device) // (Hq // Hkv)
    qd, kd, vd = q.double(), k.double()[:, kv_head], v.double()[:, kv_head]
    scores = qd @ kd.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ vd, lse


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def random_index(B, H, Lq, Lk, bq, bk, causal=True, density=0.35, seed=0, device=DEVICE) -> BlockIndex:
    """Random blocks + block 0 + the diagonal blocks, restricted to allowed blocks."""
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, nq, nk, generator=g) < density
    mask[..., 0] = True
    if causal:
        first, last = diagonal_block_range(Lq, Lk, bq, bk)
        cols = torch.arange(nk)
        mask |= (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])
        mask &= causal_block_mask(Lq, Lk, bq, bk, causal=True)
    return BlockIndex.from_mask(mask.to(device), block_q=bq, block_k=bk, q_len=Lq, k_len=Lk, max_k=nk)


def make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, D, generator=g)
    return [t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in (q, k, v)]


# ---- shapes ------------------------------------------------------------------------------------

# (B, Hq, Hkv, Lq, Lk, D)
SHAPES = [
    pytest.param(1, 1, 1, 1, 1, 16, id="B1-H1-L1-D16"),
    pytest.param(1, 2, 1, 63, 63, 64, id="B1-H2-HKV1-L63-D64"),
    pytest.param(2, 4, 2, 100, 100, 16, id="B2-H4-HKV2-L100-D16"),
    pytest.param(1, 4, 1, 257, 257, 16, id="B1-H4-HKV1-L257-D16"),
    pytest.param(1, 2, 2, 63, 257, 32, id="B1-H2-Lq63-Lk257-D32"),
    pytest.param(2, 2, 1, 1, 100, 64, id="B2-H2-HKV1-Lq1-Lk100-D64"),
]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D", SHAPES)
def test_dense_forward(B, Hq, Hkv, Lq, Lk, D, causal, dtype):
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype)
    out, lse = block_sparse_attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = reference(q, k, v, causal_allowed(Lq, Lk) if causal else None)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(lse, ref_lse) < TOL[dtype]


# (B, Hq, Hkv, Lq, Lk, D, block_q, block_k)
SPARSE_SHAPES = [
    pytest.param(1, 2, 1, 100, 100, 64, 32, 32, id="B1-H2-HKV1-L100-D64-bs32"),
    pytest.param(2, 4, 2, 63, 257, 16, 16, 32, id="B2-H4-HKV2-Lq63-Lk257-D16-bq16-bk32"),
    pytest.param(1, 4, 1, 257, 257, 16, 32, 16, id="B1-H4-HKV1-L257-D16-bq32-bk16"),
    pytest.param(1, 2, 2, 200, 200, 16, 64, 64, id="B1-H2-L200-D16-bs64"),
    pytest.param(1, 1, 1, 1, 1, 16, 16, 16, id="B1-H1-L1-D16-bs16"),
]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bq,bk", SPARSE_SHAPES)
def test_sparse_forward(B, Hq, Hkv, Lq, Lk, D, bq, bk, causal, dtype):
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, seed=1)
    index = random_index(B, Hq, Lq, Lk, bq, bk, causal, seed=2)
    out, lse = block_sparse_attention(q, k, v, index, causal=causal, return_lse=True)
    ref, ref_lse = reference(q, k, v, element_mask(index, causal))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(lse, ref_lse) < TOL[dtype]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.sampled_from([1, 2, 4]), Lq=st.integers(1, 80),
       extra=st.integers(0, 40), D=st.sampled_from([16, 32]), bq=st.sampled_from([16, 32, 64]),
       bk=st.sampled_from([16, 32, 64]), causal=st.booleans(), sparse=st.booleans())
def test_forward_property(B, Hkv, G, Lq, extra, D, bq, bk, causal, sparse):
    Lk = Lq + extra
    q, k, v = make_qkv(B, Hkv * G, Hkv, Lq, Lk, D, seed=Lq * 7 + extra)
    if sparse:
        index = random_index(B, Hkv * G, Lq, Lk, bq, bk, causal, seed=Lq + extra)
        allowed = element_mask(index, causal)
    else:
        index, allowed = None, (causal_allowed(Lq, Lk) if causal else None)
    out = block_sparse_attention(q, k, v, index, causal=causal)
    assert rel_err(out, reference(q, k, v, allowed)[0]) < 1e-5


@pytest.mark.parametrize("kv_major", [True, False], ids=["kv-major", "head-major"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_config_override(sparse, kv_major):
    """Benchmark sweeps pass configs: tiles smaller than the selection blocks stay exact, in both
    program orders (GQA 4/2 and batch 2, so a wrong head or batch mapping shows)."""
    q, k, v = make_qkv(2, 4, 2, 150, 150, 16, seed=30, requires_grad=True)
    index = random_index(2, 4, 150, 150, 64, 32, seed=31) if sparse else None
    allowed = element_mask(index, True) if sparse else causal_allowed(150, 150)
    tile = KernelConfig(16, 16, num_warps=4, num_stages=1, kv_major=kv_major)
    wide = KernelConfig(32, 64, num_warps=4, num_stages=1, kv_major=kv_major)
    out, lse = block_sparse_forward(q, k, v, index, config=wide if not sparse else tile)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(32)).to(DEVICE)
    grads = block_sparse_backward(dout, q, k, v, out, lse, index, configs=AttentionConfigs(tile, wide, tile))
    ref, _ = reference(q, k, v, allowed)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    assert rel_err(out, ref) < 1e-5
    for name, got, want in zip("qkv", grads, ref_grads):
        assert rel_err(got, want) < 1e-5, f"d{name}"


def test_noncausal_more_queries_than_keys():
    q, k, v = make_qkv(1, 2, 1, 90, 40, 16, seed=33, requires_grad=True)
    out = block_sparse_attention(q, k, v, causal=False)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(34)).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = reference(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    assert rel_err(out, ref) < 1e-5
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


def test_dense_index_matches_dense_mode():
    q, k, v = make_qkv(1, 2, 1, 100, 130, 16)
    index = BlockIndex.dense(1, 2, 100, 130, 32, 16, causal=True, device=DEVICE)
    assert rel_err(block_sparse_attention(q, k, v, index), block_sparse_attention(q, k, v)) < 1e-6


def test_scale_and_strided_inputs():
    """Inputs as `[B, L, H, D]` transposed views: no copy needed; a custom scale is honoured."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 70, 4, 16, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 90, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(2, 90, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
    index = random_index(2, 4, 70, 90, 16, 32, seed=4)
    out = block_sparse_attention(q, k, v, index, scale=0.3)
    ref, _ = reference(q, k, v, element_mask(index, True), scale=0.3)
    assert out.shape == q.shape and out.stride() == q.stride()
    assert rel_err(out, ref) < 1e-5


def test_rows_without_keys_are_finite():
    """An invalid index (no block 0, no diagonal) leaves rows with no allowed key: 0, never NaN."""
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, 2] = True  # query rows 16..31 see keys 32..47 only: all causally masked
    mask[0, 0, 2:, 0] = True
    mask[0, 0, 0, 0] = True
    index = BlockIndex.from_mask(mask.to(DEVICE), block_q=16, block_k=16, q_len=64, k_len=64)
    q, k, v = make_qkv(1, 1, 1, 64, 64, 16, requires_grad=True)
    out = block_sparse_attention(q, k, v, index)
    assert torch.isfinite(out).all()
    assert out[0, 0, 16:32].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---- backward ----------------------------------------------------------------------------------

GRAD_CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, block_q, block_k, causal); block None = dense mode
    pytest.param(1, 2, 1, 100, 100, 16, None, None, True, id="dense-B1-H2-HKV1-L100-D16-causal"),
    pytest.param(2, 4, 2, 63, 130, 16, None, None, True, id="dense-B2-H4-HKV2-Lq63-Lk130-D16-causal"),
    pytest.param(1, 2, 2, 70, 100, 32, None, None, False, id="dense-B1-H2-Lq70-Lk100-D32-noncausal"),
    pytest.param(1, 4, 1, 100, 100, 64, 32, 32, True, id="sparse-B1-H4-HKV1-L100-D64-bs32-causal"),
    pytest.param(2, 4, 2, 63, 257, 16, 16, 32, True, id="sparse-B2-H4-HKV2-Lq63-Lk257-D16-bq16-bk32-causal"),
    pytest.param(1, 2, 1, 130, 130, 16, 64, 16, True, id="sparse-B1-H2-HKV1-L130-D16-bq64-bk16-causal"),
    pytest.param(1, 2, 2, 100, 100, 16, 16, 64, False, id="sparse-B1-H2-L100-D16-bq16-bk64-noncausal"),
]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bq,bk,causal", GRAD_CASES)
def test_gradients(B, Hq, Hkv, Lq, Lk, D, bq, bk, causal, dtype):
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, seed=5, requires_grad=True)
    index = None if bq is None else random_index(B, Hq, Lq, Lk, bq, bk, causal, seed=6)
    allowed = (causal_allowed(Lq, Lk) if causal else None) if index is None else element_mask(index, causal)
    out = block_sparse_attention(q, k, v, index, causal=causal)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = reference(q, k, v, allowed)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    assert rel_err(out, ref) < TOL[dtype]
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert torch.isfinite(got).all(), f"d{name} has NaN/inf"
        assert rel_err(got, want) < TOL[dtype] * (2 if dtype != torch.float32 else 1), f"d{name}"


SPARSE_GRAD_CASES = [c for c in GRAD_CASES if c.values[6] is not None]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bq,bk,causal", SPARSE_GRAD_CASES)
def test_gradients_with_split_key_lists(B, Hq, Hkv, Lq, Lk, D, bq, bk, causal, monkeypatch):
    """dK/dV with every key block's query-block list split over several programs (2 entries each)."""
    import sparseattn.kernels.block_sparse as bs

    monkeypatch.setattr(bs, "DKDV_SPLIT_ENTRIES", 2)
    index = random_index(B, Hq, Lq, Lk, bq, bk, causal, seed=6)
    splits, split_len = bs.dkdv_splits(bs.key_major_index(index), torch.empty(B, Hkv, Lk, D))
    assert splits > 1 and split_len * splits >= index.num_q_blocks
    test_gradients(B, Hq, Hkv, Lq, Lk, D, bq, bk, causal, GPU_DTYPES[0])
    monkeypatch.setattr(bs, "DKDV_SPLIT_BYTES", 0)  # no room for partials: one program per key block
    assert bs.dkdv_splits(bs.key_major_index(index), torch.empty(B, Hkv, Lk, D)) == (1, index.num_q_blocks)


def test_varlen_with_split_key_lists(monkeypatch):
    import sparseattn.kernels.block_sparse as bs

    monkeypatch.setattr(bs, "DKDV_SPLIT_ENTRIES", 1)
    test_varlen(True)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_backward_is_deterministic(sparse):
    q, k, v = make_qkv(1, 4, 1, 100, 100, 16, seed=8, requires_grad=True)
    index = random_index(1, 4, 100, 100, 32, 16, seed=9) if sparse else None
    dout = torch.randn(1, 4, 100, 16, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    first = torch.autograd.grad(block_sparse_attention(q, k, v, index, deterministic=True), (q, k, v), dout)
    second = torch.autograd.grad(block_sparse_attention(q, k, v, index, deterministic=True), (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---- varlen ------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-dkdv"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_backward_scales_and_accumulates(sparse, split, monkeypatch):
    """``do_scale`` (per query head) and ``accumulate``: the result is ``init + scale x grads``."""
    import sparseattn.kernels.block_sparse as bs

    if split:
        monkeypatch.setattr(bs, "DKDV_SPLIT_ENTRIES", 1)
    B, Hq, Hkv, L, D = 2, 4, 2, 90, 16
    q, k, v = make_qkv(B, Hq, Hkv, L, L, D, seed=40)
    index = random_index(B, Hq, L, L, 16, 16, seed=41) if sparse else None
    out, lse = block_sparse_forward(q, k, v, index)
    g = torch.Generator().manual_seed(42)
    dout = torch.randn(out.shape, generator=g).to(DEVICE)
    plain = block_sparse_backward(dout, q, k, v, out, lse, index)
    scale = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEVICE)
    init = [torch.randn(t.shape, generator=g).to(DEVICE) for t in (q, k, v)]
    got = block_sparse_backward(dout, q, k, v, out, lse, index, do_scale=scale,
                                accumulate=tuple(t.clone() for t in init))
    dq_want = init[0] + scale[None, :, None, None] * plain[0]
    torch.testing.assert_close(got[0], dq_want, rtol=1e-5, atol=1e-5)
    # dK/dV of a KV head sum over its query heads: rerun per head to build the expected sums.
    for name, i in (("dk", 1), ("dv", 2)):
        want = init[i].clone()
        for h in range(Hq):
            one = torch.zeros(Hq, device=DEVICE)
            one[h] = scale[h]
            want += block_sparse_backward(dout, q, k, v, out, lse, index, do_scale=one)[i]
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5, msg=name)


def _varlen_inputs(lengths, Hq, Hkv, D, seed):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = make_qkv(1, Hq, Hkv, sum(lengths), sum(lengths), D, seed=seed, requires_grad=True)
    return q, k, v, cu


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_varlen(sparse):
    lengths, Hq, Hkv, D, bq, bk = [63, 1, 100, 40], 4, 2, 16, 32, 16
    q, k, v, cu = _varlen_inputs(lengths, Hq, Hkv, D, seed=11)
    max_len = max(lengths)
    index = None
    if sparse:  # one index row per sequence, valid for that sequence's own length
        per_seq = [random_index(1, Hq, n, n, bq, bk, seed=12 + i, device="cpu") for i, n in enumerate(lengths)]
        nq, nk = -(-max_len // bq), -(-max_len // bk)
        mask = torch.zeros(len(lengths), Hq, nq, nk, dtype=torch.bool)
        for i, idx in enumerate(per_seq):
            m = block_mask(idx)
            mask[i, :, :m.shape[2], :m.shape[3]] = m[0]
        index = BlockIndex.from_mask(mask.to(DEVICE), block_q=bq, block_k=bk, q_len=max_len, k_len=max_len,
                                     max_k=nk)
    out = block_sparse_attention(q, k, v, index, cu_seqlens=cu, max_seqlen=max_len)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    refs = []
    for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        allowed = causal_allowed(n, n) if index is None else element_mask(per_seq[i].to(DEVICE), True)
        refs.append(reference(q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n], allowed)[0])
    ref = torch.cat(refs, dim=2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    assert rel_err(out, ref) < 1e-5
    for name, got, want in zip("qkv", grads, ref_grads):
        assert rel_err(got, want) < 1e-5, f"d{name}"
    if not sparse:  # without max_seqlen the launcher reads it back once; same result
        again = block_sparse_attention(q, k, v, cu_seqlens=cu)
        assert torch.equal(again, out)


# ---- key-major transpose -----------------------------------------------------------------------


def test_key_major_index():
    index = random_index(2, 3, 100, 130, 16, 32, causal=True, seed=14)
    km = key_major_index(index)
    mask = block_mask(index)  # [B, H, nq, nk]
    nq = mask.shape[2]
    assert km.indices.shape == (2, 3, mask.shape[3], nq) and km.indices.dtype == torch.int32
    assert torch.equal(km.counts, mask.sum(2).int())
    for b in range(2):
        for h in range(3):
            for j in range(mask.shape[3]):
                want = mask[b, h, :, j].nonzero().flatten().int()
                n = want.numel()
                assert torch.equal(km.indices[b, h, j, :n], want)
                assert (km.indices[b, h, j, n:] == -1).all()


def test_backward_transposes_an_index_once(monkeypatch):
    import sparseattn.kernels.block_sparse as bs

    calls = []
    original = bs.key_major_index
    monkeypatch.setattr(bs, "key_major_index", lambda index: calls.append(1) or original(index))
    q, k, v = make_qkv(1, 2, 1, 100, 100, 16, seed=15, requires_grad=True)
    index = random_index(1, 2, 100, 100, 32, 16, seed=16)
    dout = torch.randn(1, 2, 100, 16, generator=torch.Generator().manual_seed(17)).to(DEVICE)
    first = torch.autograd.grad(block_sparse_attention(q, k, v, index), (q, k, v), dout)
    second = torch.autograd.grad(block_sparse_attention(q, k, v, index), (q, k, v), dout)
    assert len(calls) == 1  # the second backward reuses the transpose cached on the index
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    km = bs.cached_key_major_index(index)
    want = original(index)
    assert torch.equal(km.indices, want.indices) and torch.equal(km.counts, want.counts)


# ---- vertical-slash ----------------------------------------------------------------------------


def random_vs_index(B, H, Lq, Lk, bq, bk, seed, max_r=4) -> VerticalSlashIndex:
    """Random non-overlapping ranges (incl. the diagonal range) and columns outside them."""
    g = torch.Generator().manual_seed(seed)
    nq, off = -(-Lq // bq), Lk - Lq
    max_c = 24
    starts = torch.full((B, H, nq, max_r), -1, dtype=torch.int32)
    r_cnt = torch.zeros(B, H, nq, dtype=torch.int32)
    cols = torch.full((B, H, nq, max_c), -1, dtype=torch.int32)
    c_cnt = torch.zeros(B, H, nq, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                last = off + min((i + 1) * bq, Lq) - 1  # last query position of the block
                chosen = [max(0, last - bk + 1)]  # the local (slash) range ends at the diagonal
                for s in torch.randint(0, last + 1, (max_r - 1,), generator=g).tolist():
                    if all(s + bk <= c or s >= c + bk for c in chosen):
                        chosen.append(s)
                chosen.sort()
                starts[b, h, i, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                r_cnt[b, h, i] = len(chosen)
                covered = torch.zeros(Lk, dtype=torch.bool)
                for s in chosen:
                    covered[s:s + bk] = True
                free = (~covered[:last + 1]).nonzero().flatten()
                pick = free[torch.randperm(free.numel(), generator=g)[:max_c]].sort().values
                cols[b, h, i, :pick.numel()] = pick.int()
                c_cnt[b, h, i] = pick.numel()
    t = [x.to(DEVICE) for x in (starts, r_cnt, cols, c_cnt)]
    return VerticalSlashIndex(*t, block_q=bq, block_k=bk, q_len=Lq, k_len=Lk)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bq,bk", [
    pytest.param(1, 2, 1, 100, 100, 16, 32, 32, id="B1-H2-HKV1-L100-D16-bs32"),
    pytest.param(2, 4, 2, 63, 200, 64, 16, 32, id="B2-H4-HKV2-Lq63-Lk200-D64-bq16-bk32"),
    pytest.param(1, 1, 1, 1, 1, 16, 16, 16, id="B1-H1-L1-D16-bs16"),
])
def test_vertical_slash(B, Hq, Hkv, Lq, Lk, D, bq, bk, dtype):
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, seed=15)
    index = random_vs_index(B, Hq, Lq, Lk, bq, bk, seed=16)
    out, lse = vertical_slash_attention(q, k, v, index, return_lse=True)
    ref, ref_lse = reference(q, k, v, vs_element_mask(index))
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(lse, ref_lse) < TOL[dtype]


@pytest.mark.parametrize("bq,bk", [(16, 16), (32, 16), (16, 32)])
def test_vertical_slash_many_ranges(bq, bk):
    """Rows of up to 16 ranges, several of them near the diagonal or clipped at the end of the keys
    (Lq < Lk, partial last block)."""
    q, k, v = make_qkv(1, 2, 1, 150, 170, 16, seed=19)
    index = random_vs_index(1, 2, 150, 170, bq, bk, seed=20, max_r=16)
    assert int(index.range_counts.max()) >= 4
    out, lse = vertical_slash_attention(q, k, v, index, return_lse=True)
    ref, ref_lse = reference(q, k, v, vs_element_mask(index))
    assert rel_err(out, ref) < 1e-5 and rel_err(lse, ref_lse) < 1e-5


def test_vertical_slash_head_major_order():
    """The other program order (all heads of a query tile together) computes the same output."""
    q, k, v = make_qkv(2, 4, 2, 63, 200, 16, seed=17)
    index = random_vs_index(2, 4, 63, 200, 16, 32, seed=18)
    out = vertical_slash_forward(q, k, v, index, config=KernelConfig(16, 32, num_warps=4, num_stages=1,
                                                                       kv_major=False))[0]
    assert rel_err(out, reference(q, k, v, vs_element_mask(index))[0]) < 1e-5


# ---- test machinery and validation -------------------------------------------------------------


def test_nan_fill_is_active():
    assert os.environ[NAN_FILL_ENV] == "1"
    assert torch.isnan(alloc_output(torch.zeros(3, device=DEVICE))).all()
    assert torch.isnan(alloc_output(torch.zeros(3, device=DEVICE), (2, 2), torch.float32)).all()


def test_bad_inputs_raise():
    q, k, v = make_qkv(1, 3, 2, 16, 16, 16)
    with pytest.raises(ValueError, match="multiple"):
        block_sparse_attention(q, k, v)
    q, k, v = make_qkv(1, 2, 1, 32, 16, 16)
    with pytest.raises(ValueError, match=r"seq_len \(\d+\) must be <= k seq_len"):
        block_sparse_attention(q, k, v)
    q, k, v = make_qkv(1, 2, 1, 32, 32, 16)
    with pytest.raises(ValueError, match="q_len, k_len"):
        block_sparse_attention(q, k, v, random_index(1, 2, 16, 32, 16, 16))
    with pytest.raises(ValueError, match="batch, heads"):
        block_sparse_attention(q, k, v, random_index(1, 4, 32, 32, 16, 16))
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_attention(q, k, v, random_index(1, 2, 32, 32, 24, 16))
    with pytest.raises(ValueError, match="cu_seqlens"):
        block_sparse_attention(q, k, v, cu_seqlens=torch.tensor([0, 32], device=DEVICE))  # int64


# ---- GPU: large shapes -------------------------------------------------------------------------


def _chunked_reference(q, k, v, allowed_fn, chunk=1024):
    """fp32 reference over query chunks (no L x L buffer); ``allowed_fn(r0, r1)`` -> bool mask or None."""
    Hq, Hkv = q.shape[1], k.shape[1]
    kv_head = torch.arange(Hq, device=q.device) // (Hq // Hkv)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for r0 in range(0, q.shape[2], chunk):
        r1 = min(q.shape[2], r0 + chunk)
        for h in range(Hq):
            s = q[:, h, r0:r1].float() @ k[:, kv_head[h]].float().transpose(-1, -2) / math.sqrt(q.shape[-1])
            allowed = allowed_fn(r0, r1, h)
            if allowed is not None:
                s = s.masked_fill(~allowed, float("-inf"))
            out[:, h, r0:r1] = torch.softmax(s, -1) @ v[:, kv_head[h]].float()
    return out


@pytest.mark.gpu
def test_gpu_dense_32k_vs_sdpa():
    L = 32768
    q, k, v = make_qkv(1, 8, 2, L, L, 128, torch.bfloat16, seed=20)
    out = block_sparse_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("D,bs", [(64, 64), (128, 128), (128, 64)], ids=["D64-bs64", "D128-bs128", "D128-bs64"])
def test_gpu_sparse_8k(D, bs):
    L = 8192
    q, k, v = make_qkv(1, 4, 2, L, L, D, torch.bfloat16, seed=21)
    index = random_index(1, 4, L, L, bs, bs, density=0.1, seed=22)
    out = block_sparse_attention(q, k, v, index)
    bmask = block_mask(index)
    pos = torch.arange(L, device=DEVICE)

    def allowed(r0, r1, h):
        rows = bmask[:, h, pos[r0:r1] // bs][:, :, pos // bs]
        return rows & (pos[None, :] <= pos[r0:r1, None])

    assert rel_err(out, _chunked_reference(q, k, v, allowed)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_gpu_backward_4k(sparse):
    L, bs = 4096, 64
    q, k, v = make_qkv(1, 8, 2, L, L, 128, torch.bfloat16, seed=23, requires_grad=True)
    index = random_index(1, 8, L, L, bs, bs, density=0.2, seed=24) if sparse else None
    allowed = causal_allowed(L, L) if index is None else element_mask(index, True)
    out = block_sparse_attention(q, k, v, index)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    kv_head = torch.arange(8, device=DEVICE) // 4
    s = (qf @ kf[:, kv_head].transpose(-1, -2) / math.sqrt(128)).masked_fill(~allowed, float("-inf"))
    ref = torch.softmax(s, -1) @ vf[:, kv_head]
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), dout.float())
    assert rel_err(out, ref) < 1e-2
    for name, got, want in zip("qkv", grads, ref_grads):
        assert rel_err(got, want) < 2e-2, f"d{name}"


@pytest.mark.gpu
def test_gpu_head_dim_256():
    q, k, v = make_qkv(1, 2, 1, 1000, 1000, 256, torch.bfloat16, seed=25, requires_grad=True)
    out = block_sparse_attention(q, k, v)
    out.sum().backward()
    ref, _ = reference(q, k, v, causal_allowed(1000, 1000))
    assert rel_err(out, ref) < 1e-2


def test_uniform_hint_only_where_it_compiles(monkeypatch):
    """``_warp_uniform``'s PTX is used only by compiled NVIDIA kernels; the interpreter (which has no
    inline assembly) and CPU tensors never get it. The GPU tests cover the compiled path."""
    from sparseattn.kernels import block_sparse as bs

    assert bs._uniform_hints(torch.zeros(1)) is False
    if torch.cuda.is_available():
        t = torch.zeros(1, device="cuda")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert bs._uniform_hints(t) is (torch.version.hip is None)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert bs._uniform_hints(t) is False
