"""XAttention's selection over every combination issue 4 names, Triton estimator vs fp32 reference.

Strides 4/8/16 x blocks 64/128, each with GQA, batch > 1, ``Lq < Lk`` and lengths that are not
multiples of ``stride x block`` (nor of the stride), with per-head thresholds (one head at 1.0,
which keeps every causal block). Without CUDA the kernel runs in the Triton interpreter
(conftest.py) on small fp32 shapes. Selections are compared exactly, after asserting that no
two block masses of a row tie within rounding and no running sum sits within rounding of its
threshold (otherwise a mismatch would be legitimate, see docs/methods.md). Per-layer thresholds
are covered in test_calibrate.py (through ``patch(layer_configs=...)``).
"""

from __future__ import annotations

import pytest
import torch

from sparseattn.index import causal_block_mask
from sparseattn.kernels.block_sparse import block_sparse_attention
from sparseattn.kernels.estimate import xattention_estimate, xattention_select_fast
from sparseattn.reference.attention import reference_block_sparse_attention
from sparseattn.reference.streaming import forced_block_mask
from sparseattn.reference.xattention import xattention_block_mass, xattention_select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, Hq, Hkv, Lq, Lk, D)
SHAPES = [
    # GQA 2, batch 2, 421 = 26 x 16 + 5: no multiple of any stride or block.
    pytest.param((2, 4, 2, 421, 421, 16), id="B2-H4-HKV2-L421-D16"),
    # GQA 3, Lq < Lk with an offset (551) that is no block multiple: two diagonal blocks per row.
    pytest.param((1, 6, 2, 150, 701, 16), id="B1-H6-HKV2-Lq150-Lk701-D16"),
]
GEOMETRIES = [pytest.param(S, bs, id=f"S{S}-bs{bs}") for S in (4, 8, 16) for bs in (64, 128)]


@pytest.fixture(autouse=True)
def _exact_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False


def make_qkv(B, Hq, Hkv, Lq, Lk, D, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def per_head_thresholds(Hq):
    return torch.linspace(0.5, 1.0, Hq, device=DEVICE)  # the last head keeps every causal block


def assert_decisions_are_sharp(mass, Lq, Lk, bs, causal, threshold, tie_tol=1e-6, sum_tol=1e-5):
    """No two positive masses of a row tie within ``tie_tol`` (relative) and no running sum is
    within ``sum_tol`` of ``threshold x row mass``: the selection is then well-defined in fp32."""
    ordered = torch.sort(mass.flatten(0, 2), dim=-1).values
    gaps = ordered[..., 1:] - ordered[..., :-1]
    assert not ((ordered[..., :-1] > 0) & (gaps <= tie_tol * ordered[..., 1:])).any(), "near-tied block masses"
    allowed = causal_block_mask(Lq, Lk, bs, bs, causal, device=mass.device)
    forced = forced_block_mask(Lq, Lk, bs, causal, device=mass.device)
    thr = threshold.reshape(1, -1, 1, 1)
    row = torch.where(allowed, mass, 0).sum(-1, keepdim=True)
    forced_mass = torch.where(forced, mass, 0).sum(-1, keepdim=True)
    candidates = torch.sort(torch.where(allowed & ~forced, mass, -1.0), dim=-1, descending=True, stable=True).values
    before = torch.nn.functional.pad(torch.cumsum(candidates.clamp_min(0), -1)[..., :-1], (1, 0))
    margin = (forced_mass + before - thr * row).abs()
    assert not ((margin <= sum_tol * row) & (candidates >= 0) & (thr < 1)).any(), "a running sum sits on the threshold"


@pytest.mark.parametrize("S, bs", GEOMETRIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_selection_equals_reference(shape, S, bs):
    _, Hq, _, Lq, Lk, _ = shape
    q, k, _ = make_qkv(*shape, seed=11)
    threshold = per_head_thresholds(Hq)
    ref_mass = xattention_block_mass(q, k, stride=S, block_size=bs)
    torch.testing.assert_close(xattention_estimate(q, k, stride=S, block_size=bs), ref_mass, rtol=1e-5, atol=1e-7)
    assert_decisions_are_sharp(ref_mass, Lq, Lk, bs, True, threshold)
    ours = xattention_select_fast(q, k, threshold=threshold, stride=S, block_size=bs)
    ref = xattention_select(q, k, threshold=threshold, stride=S, block_size=bs)
    assert torch.equal(ours.counts, ref.counts)
    assert torch.equal(ours.indices, ref.indices)
    # The selection is not trivial: some head keeps less than every causal block, the 1.0 head all.
    allowed = causal_block_mask(Lq, Lk, bs, bs, device=DEVICE).sum()
    kept = ref.counts.sum(-1)  # [B, Hq]
    assert (kept[:, :-1] < allowed).any() and (kept[:, -1] == allowed).all()


@pytest.mark.parametrize("bs", [64, 128])
def test_noncausal_selection_equals_reference(bs):
    q, k, _ = make_qkv(2, 4, 2, 150, 421, 16, seed=12)
    threshold = per_head_thresholds(4)
    ref_mass = xattention_block_mass(q, k, stride=8, block_size=bs, causal=False)
    assert_decisions_are_sharp(ref_mass, 150, 421, bs, False, threshold)
    ours = xattention_select_fast(q, k, threshold=threshold, stride=8, block_size=bs, causal=False)
    ref = xattention_select(q, k, threshold=threshold, stride=8, block_size=bs, causal=False)
    assert torch.equal(ours.indices, ref.indices) and torch.equal(ours.counts, ref.counts)


def test_block128_output_through_the_kernel():
    """Estimator -> selection -> block-sparse kernel (all Triton) vs the fp32 reference chain, at block 128
    (test_kernels.py covers the kernel at blocks <= 64 on the CPU)."""
    shape = (2, 4, 2, 130, 389, 16)
    q, k, v = make_qkv(*shape, seed=13)
    threshold = per_head_thresholds(4)
    index = xattention_select_fast(q, k, threshold=threshold, stride=16, block_size=128)
    ref_index = xattention_select(q, k, threshold=threshold, stride=16, block_size=128)
    assert torch.equal(index.indices, ref_index.indices)
    out = block_sparse_attention(q, k, v, index)
    ref = reference_block_sparse_attention(q, k, v, ref_index)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel
