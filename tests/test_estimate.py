"""The fused XAttention estimation (``sparseattn.kernels.estimate``) against the fp32 reference.

Without CUDA the real kernels run in the Triton interpreter (conftest.py sets ``TRITON_INTERPRET=1``)
on fp32 CPU tensors, with the default interpreter tiles and with tiny tiles and a tiny scratch so
that the unmasked/masked key loops, several query tiles per head and several launches per call are
all exercised. Outputs are NaN-filled before the kernel writes them. The ``gpu``-marked tests run
bf16 at realistic lengths on CUDA.
"""

from __future__ import annotations

import doctest

import pytest
import torch

from sparseattn.index import causal_block_mask
from sparseattn.reference.streaming import forced_block_mask
from sparseattn.reference.xattention import xattention_block_mass, xattention_select
from sparseattn.kernels import estimate as estimate_module
from sparseattn.kernels.estimate import (
    EstimateConfig,
    block_mass_forward,
    xattention_estimate,
    xattention_select_fast,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32

# (B, Hq, Hkv, Lq, Lk, D, stride, block_size, causal)
CASES = [
    pytest.param(1, 2, 1, 1, 1, 16, 4, 16, True, id="B1-H2-HKV1-L1-D16-S4-bs16"),
    pytest.param(1, 2, 2, 37, 37, 16, 8, 16, True, id="B1-H2-HKV2-L37-D16-S8-bs16"),
    pytest.param(2, 4, 2, 100, 100, 32, 4, 16, True, id="B2-H4-HKV2-L100-D32-S4-bs16"),
    pytest.param(1, 4, 2, 300, 300, 16, 8, 32, True, id="B1-H4-HKV2-L300-D16-S8-bs32"),
    pytest.param(1, 2, 1, 300, 300, 32, 4, 32, True, id="B1-H2-HKV1-L300-D32-S4-bs32"),
    pytest.param(2, 2, 1, 37, 300, 16, 4, 16, True, id="B2-H2-HKV1-Lq37-Lk300-D16-S4-bs16"),
    pytest.param(1, 4, 4, 100, 300, 32, 8, 32, True, id="B1-H4-HKV4-Lq100-Lk300-D32-S8-bs32"),
    # nrk = 16 columns but Lk % S != 0: a 16-column tile that looks full still holds the padded group.
    pytest.param(1, 2, 2, 5, 62, 16, 4, 16, True, id="B1-H2-HKV2-Lq5-Lk62-D16-S4-bs16"),
    pytest.param(1, 2, 2, 50, 62, 16, 4, 16, False, id="B1-H2-HKV2-Lq50-Lk62-D16-S4-bs16-noncausal"),
    pytest.param(1, 2, 1, 100, 100, 16, 4, 16, False, id="B1-H2-HKV1-L100-D16-S4-bs16-noncausal"),
    pytest.param(1, 2, 2, 37, 300, 32, 8, 16, False, id="B1-H2-HKV2-Lq37-Lk300-D32-S8-bs16-noncausal"),
]

# Tiny tiles (16 rows x 16 columns, raised to 2 blocks per side when a block is wider) and a
# scratch of a few hundred floats: several query tiles, unmasked + masked key loops, many launches.
TINY = dict(config=EstimateConfig(block_m=16, block_n=16, num_warps=1, num_stages=1), scratch_elements=512)
# The head dim in two steps per dot (D = 16 falls back to one step: tl.dot needs K >= 16).
SPLIT_D = dict(config=EstimateConfig(block_m=16, block_n=32, num_warps=1, num_stages=1, d_steps=2),
               scratch_elements=2048)


def make_qk(B, Hq, Hkv, Lq, Lk, D, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(DEVICE, DTYPE)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(DEVICE, DTYPE)
    return q, k


def nan_mass(B, Hq, Lq, Lk, bs):
    return torch.full((B, Hq, -(-Lq // bs), -(-Lk // bs)), float("nan"), device=DEVICE)


@pytest.fixture(autouse=True)
def _exact_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("launch", [pytest.param({}, id="default-tiles"), pytest.param(TINY, id="tiny-tiles"),
                                    pytest.param(SPLIT_D, id="split-head-dim")])
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, S, bs, causal", CASES)
def test_block_mass_matches_reference(B, Hq, Hkv, Lq, Lk, D, S, bs, causal, launch):
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D)
    out = nan_mass(B, Hq, Lq, Lk, bs)
    mass = block_mass_forward(q, k, stride=S, block_size=bs, causal=causal, out=out, **launch)
    assert mass.data_ptr() == out.data_ptr()
    assert not mass.isnan().any(), "some cells were never written"
    ref = xattention_block_mass(q, k, stride=S, block_size=bs, causal=causal)
    torch.testing.assert_close(mass, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, S, bs, causal", CASES)
def test_public_estimate_is_the_launcher(B, Hq, Hkv, Lq, Lk, D, S, bs, causal, monkeypatch):
    monkeypatch.setenv(estimate_module.NAN_FILL_ENV, "1")
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, seed=1)
    mass = xattention_estimate(q, k, stride=S, block_size=bs, causal=causal)
    ref = xattention_block_mass(q, k, stride=S, block_size=bs, causal=causal)
    torch.testing.assert_close(mass, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scratch_elements", [1 << 9, 1 << 11, 3 << 11, 1 << 26])
def test_scratch_chunking(scratch_elements):
    """Rows split over launches, several heads per launch, all heads at once: one result."""
    q, k = make_qk(2, 4, 2, 300, 300, 16, seed=5)
    out = nan_mass(2, 4, 300, 300, 16)
    config = EstimateConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    mass = block_mass_forward(q, k, stride=4, block_size=16, out=out, config=config,
                              scratch_elements=scratch_elements)
    ref = xattention_block_mass(q, k, stride=4, block_size=16)
    torch.testing.assert_close(mass, ref, rtol=1e-5, atol=1e-7)


# The interpreter's tl.dot on bfloat16 is wrong (triton 3.9 + numpy: off by ~1e10), so bf16 runs
# on CUDA only; fp16 takes the same non-"ieee" code path everywhere.
HALF_DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_inputs(dtype):
    """16-bit inputs: products are exact in fp32, so the fp32 reference on the same values agrees."""
    q, k = make_qk(2, 4, 2, 300, 300, 32, seed=6)
    q, k = q.to(dtype), k.to(dtype)
    mass = xattention_estimate(q, k, stride=8, block_size=32)
    ref = xattention_block_mass(q, k, stride=8, block_size=32)
    torch.testing.assert_close(mass, ref, rtol=1e-4, atol=1e-6)


def test_non_contiguous_inputs():
    """Any B/H/L strides (here a transposed [B, L, H, D] buffer); only the last dim must be unit."""
    g = torch.Generator(device="cpu").manual_seed(2)
    q = torch.randn(2, 100, 4, 32, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 100, 2, 32, generator=g).to(DEVICE).transpose(1, 2)
    mass = xattention_estimate(q, k, stride=4, block_size=16)
    torch.testing.assert_close(mass, xattention_block_mass(q, k, stride=4, block_size=16), rtol=1e-5, atol=1e-7)


THRESHOLDS = [pytest.param(0.5, id="tau0.5"), pytest.param(0.9, id="tau0.9"), pytest.param(1.0, id="tau1"),
              pytest.param("per-head", id="tau-per-head")]


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, S, bs, causal", CASES)
def test_selection_equals_reference(B, Hq, Hkv, Lq, Lk, D, S, bs, causal, threshold):
    """Exact equality. It is well-defined here because, on these seeded inputs, no two masses of a
    row tie within rounding and no running sum lands within rounding of the threshold; both are
    asserted first, so a tie would fail as a broken assumption, not as a flaky mismatch."""
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, seed=3)
    if threshold == "per-head":
        threshold = torch.linspace(0.3, 0.95, Hq, device=DEVICE)
    ref_mass = xattention_block_mass(q, k, stride=S, block_size=bs, causal=causal)
    assert_no_near_ties(ref_mass)
    assert_no_near_threshold(ref_mass, Lq, Lk, bs, causal, threshold)
    ours = xattention_select_fast(q, k, threshold=threshold, stride=S, block_size=bs, causal=causal)
    ref = xattention_select(q, k, threshold=threshold, stride=S, block_size=bs, causal=causal)
    assert ours.indices.shape == ref.indices.shape  # max_k = nk, no host sync
    assert torch.equal(ours.counts, ref.counts)
    assert torch.equal(ours.indices, ref.indices)
    assert (ours.block_q, ours.block_k, ours.q_len, ours.k_len) == (ref.block_q, ref.block_k, ref.q_len, ref.k_len)


def assert_no_near_ties(mass, tol=1e-6):
    """Distinct positive masses of one row differ by more than ``tol`` (relative): ordering is stable."""
    values = mass.flatten(0, 2)
    values = torch.sort(values, dim=-1).values
    gaps = values[..., 1:] - values[..., :-1]
    positive = values[..., :-1] > 0
    close = positive & (gaps <= tol * values[..., 1:])
    assert not close.any(), "two block masses tie within rounding: selections may legitimately differ"


def assert_no_near_threshold(mass, Lq, Lk, bs, causal, threshold, tol=1e-5):
    """No decision of ``keep_until_covered`` is within ``tol`` (relative to the row mass) of flipping."""
    if not torch.is_tensor(threshold) and threshold >= 1:
        return
    allowed = causal_block_mask(Lq, Lk, bs, bs, causal, device=mass.device)
    forced = forced_block_mask(Lq, Lk, bs, causal, device=mass.device)
    thr = threshold.reshape(1, -1, 1, 1) if torch.is_tensor(threshold) else threshold
    row = torch.where(allowed, mass, 0).sum(-1, keepdim=True)
    forced_mass = torch.where(forced & allowed, mass, 0).sum(-1, keepdim=True)
    candidates = torch.where(allowed & ~forced, mass, -1.0)
    ordered = torch.sort(candidates, dim=-1, descending=True, stable=True).values
    before = torch.nn.functional.pad(torch.cumsum(ordered.clamp_min(0), -1)[..., :-1], (1, 0))
    margin = (forced_mass + before - thr * row).abs()
    assert not ((margin <= tol * row) & (ordered >= 0)).any(), "a running sum sits on the threshold"


def test_selection_keeps_sink_and_diagonal():
    q, k = make_qk(1, 2, 1, 100, 300, 16, seed=4)
    idx = xattention_select_fast(q, k, threshold=0.01, stride=4, block_size=16)
    mask = idx.to_mask()
    assert mask[..., 0].all()
    off = 300 - 100
    for qb in range(mask.shape[2]):
        first, last = (off + qb * 16) // 16, (off + min(qb * 16 + 16, 100) - 1) // 16
        assert mask[:, :, qb, first:last + 1].all()


def test_rejects_bad_arguments():
    q, k = make_qk(1, 2, 1, 64, 64, 16)
    with pytest.raises(ValueError, match="multiple of stride"):
        xattention_estimate(q, k, stride=8, block_size=20)
    with pytest.raises(ValueError, match="power of two"):
        xattention_estimate(q, k, stride=4, block_size=24)
    with pytest.raises(ValueError, match="head_dim"):
        xattention_estimate(q[..., :12], k[..., :12], stride=4, block_size=16)
    with pytest.raises(ValueError, match="threshold"):
        xattention_select_fast(q, k, threshold=torch.ones(3), stride=4, block_size=16)


def test_docstring_examples():
    result = doctest.testmod(estimate_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0


# ---- CUDA, realistic shapes --------------------------------------------------------------------


def _llm_like(L, Hq=8, Hkv=2, D=128):
    from sparseattn.bench.inputs import llm_like_qkv

    q, k, _ = llm_like_qkv(1, Hq, Hkv, L, D, dtype=torch.bfloat16, device="cuda", seed=0)
    return q, k


@pytest.mark.gpu
@pytest.mark.parametrize("S", [8, 16])
def test_gpu_bf16_mass_close_to_fp32_reference(S):
    q, k = _llm_like(8192)
    mass = xattention_estimate(q, k, stride=S, block_size=128)
    ref = xattention_block_mass(q.float(), k.float(), stride=S, block_size=128)
    rel = ((mass - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    # Each reshaped row carries mass 1, so a full query block's row of cells sums to bs/S.
    assert not mass.isnan().any()
    torch.testing.assert_close(mass.sum(-1), torch.full_like(mass.sum(-1), 128 / S), rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [8, 16])
def test_gpu_selection_agrees_at_32k(S):
    q, k = _llm_like(32768)
    ours = xattention_select_fast(q, k, threshold=0.9, stride=S, block_size=128)
    ref = xattention_select(q.float(), k.float(), threshold=0.9, stride=S, block_size=128)
    agree = (ours.to_mask() == ref.to_mask()).float().mean().item()
    assert agree >= 0.99, agree


@pytest.mark.gpu
def test_gpu_no_host_sync():
    q, k = _llm_like(4096)
    thr = torch.full((q.shape[1],), 0.9, device="cuda")
    xattention_select_fast(q, k, threshold=thr, stride=16, block_size=128)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xattention_select_fast(q, k, threshold=thr, stride=16, block_size=128)
    finally:
        torch.cuda.set_sync_debug_mode("default")
