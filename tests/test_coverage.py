"""The coverage-selection kernel (``sparseattn.kernels.coverage``) against the reference rule.

The ground truth is ``keep_until_covered`` + ``BlockIndex.from_mask`` (sparseattn.reference). With
small-integer masses every sum is exact in fp32, in any order, so the kernel must agree exactly
even on ties (lower index first), zero masses and thresholds that land on a running sum; with
continuous masses it must agree wherever no decision is within rounding of the threshold. Without
CUDA the kernel runs in the Triton interpreter (conftest.py); outputs are NaN-poisoned where the
kernel must not read (masses outside the causal pattern).
"""

from __future__ import annotations

import doctest

import pytest
import torch

from sparseattn.index import BlockIndex, causal_block_mask, cdiv
from sparseattn.kernels import coverage as coverage_module
from sparseattn.kernels import estimate as estimate_module
from sparseattn.kernels.coverage import coverage_select
from sparseattn.reference.streaming import forced_block_mask
from sparseattn.reference.xattention import keep_until_covered, xattention_select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, H, Lq, Lk, block, causal): nk from 1 to 37, Lq < Lk with a diagonal across two key blocks,
# rows wider than one program's default tile, non-causal.
SHAPES = [
    pytest.param(1, 1, 16, 16, 16, True, id="one-block"),
    pytest.param(2, 3, 200, 200, 16, True, id="B2-H3-nk13"),
    pytest.param(1, 2, 37, 300, 16, True, id="Lq37-Lk300-two-diagonal-blocks"),
    pytest.param(1, 2, 590, 590, 16, True, id="nk37"),
    pytest.param(1, 2, 100, 160, 16, False, id="noncausal"),
    pytest.param(2, 2, 64, 64, 16, False, id="noncausal-square"),
]
THRESHOLDS = [0.0, 0.3, 0.77, 0.9, 1.0, "per-head"]


def reference_index(mass, threshold, q_len, k_len, bs, causal):
    allowed = causal_block_mask(q_len, k_len, bs, bs, causal, device=mass.device)
    forced = forced_block_mask(q_len, k_len, bs, causal, device=mass.device)
    thr = threshold.reshape(1, -1, 1, 1) if torch.is_tensor(threshold) else threshold
    keep = keep_until_covered(mass, allowed, forced, thr)
    return BlockIndex.from_mask(keep, block_q=bs, block_k=bs, q_len=q_len, k_len=k_len, max_k=mass.shape[-1])


def poisoned(mass, q_len, k_len, bs, causal):
    """NaN outside the allowed blocks: the kernel must never read them."""
    allowed = causal_block_mask(q_len, k_len, bs, bs, causal, device=mass.device)
    return torch.where(allowed, mass, torch.full_like(mass, float("nan")))


def thresholds(threshold, H):
    if threshold == "per-head":
        return torch.linspace(0.2, 1.0, H, device=DEVICE)
    return threshold


def assert_same(ours, ref):
    assert ours.indices.shape == ref.indices.shape
    assert torch.equal(ours.counts, ref.counts)
    assert torch.equal(ours.indices, ref.indices)
    assert (ours.block_q, ours.block_k, ours.q_len, ours.k_len) == (ref.block_q, ref.block_k, ref.q_len, ref.k_len)


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("B, H, Lq, Lk, bs, causal", SHAPES)
def test_integer_masses_with_ties_equal_reference(B, H, Lq, Lk, bs, causal, threshold):
    """Masses in {0, 1, 2, 3}: many exact ties and zeros, sums exact in fp32 in any order."""
    g = torch.Generator().manual_seed(B * 1000 + Lq + Lk)
    mass = torch.randint(0, 4, (B, H, cdiv(Lq, bs), cdiv(Lk, bs)), generator=g).float().to(DEVICE)
    threshold = thresholds(threshold, H)
    ours = coverage_select(poisoned(mass, Lq, Lk, bs, causal), threshold=threshold, q_len=Lq, k_len=Lk,
                           block_size=bs, causal=causal)
    assert_same(ours, reference_index(mass, threshold, Lq, Lk, bs, causal))


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99, "per-head"])
@pytest.mark.parametrize("B, H, Lq, Lk, bs, causal", SHAPES)
def test_continuous_masses_equal_reference(B, H, Lq, Lk, bs, causal, threshold):
    """Heavy-tailed masses (as attention has): exact equality, the seeds checked to be clear of
    decisions within rounding of the threshold."""
    g = torch.Generator().manual_seed(7 + Lq)
    mass = torch.exp(3 * torch.randn(B, H, cdiv(Lq, bs), cdiv(Lk, bs), generator=g)).to(DEVICE)
    threshold = thresholds(threshold, H)
    ref = reference_index(mass, threshold, Lq, Lk, bs, causal)
    ours = coverage_select(poisoned(mass, Lq, Lk, bs, causal), threshold=threshold, q_len=Lq, k_len=Lk,
                           block_size=bs, causal=causal)
    assert_same(ours, ref)


def test_zero_rows_and_forced_mass_above_threshold():
    """Rows of zeros keep only sink + diagonal (a running sum of 0 is not < 0.5 x 0), and so does a
    row whose forced mass alone passes the threshold."""
    mass = torch.zeros(1, 1, 4, 4, device=DEVICE)
    mass[0, 0, 3] = torch.tensor([10.0, 1, 1, 1])
    ours = coverage_select(mass, threshold=0.5, q_len=64, k_len=64, block_size=16)
    assert_same(ours, reference_index(mass, 0.5, 64, 64, 16, True))
    assert ours.counts.tolist() == [[[1, 2, 2, 2]]]  # rows 2 and 3: sink + diagonal only


def test_xattention_select_fast_uses_the_torch_rule_for_rows_past_the_kernel(monkeypatch):
    """Rows wider than MAX_KEY_BLOCKS go through keep_until_covered + from_mask: same answer."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 200, 16, generator=g).to(DEVICE)
    k = torch.randn(1, 1, 200, 16, generator=g).to(DEVICE)
    kernel = estimate_module.xattention_select_fast(q, k, threshold=0.8, stride=4, block_size=16)
    monkeypatch.setattr(estimate_module, "MAX_KEY_BLOCKS", 4)
    torch_rule = estimate_module.xattention_select_fast(q, k, threshold=0.8, stride=4, block_size=16)
    assert_same(kernel, torch_rule)
    assert_same(kernel, xattention_select(q, k, threshold=0.8, stride=4, block_size=16))


def test_rejects_bad_arguments():
    mass = torch.rand(1, 2, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        coverage_select(mass.double(), threshold=0.5, q_len=64, k_len=64, block_size=16)
    with pytest.raises(ValueError, match="expected"):
        coverage_select(mass, threshold=0.5, q_len=64, k_len=80, block_size=16)
    with pytest.raises(ValueError, match=r"\[H=2\]"):
        coverage_select(mass, threshold=torch.ones(3, device=DEVICE), q_len=64, k_len=64, block_size=16)


def test_docstring_examples():
    result = doctest.testmod(coverage_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0


@pytest.mark.gpu
def test_gpu_coverage_equals_reference_at_128k_shape():
    """32 heads x 1024 x 1024 heavy-tailed masses (the 128K case): the rows whose decisions are not
    within 1e-5 of the threshold agree exactly."""
    L, bs, H = 131072, 128, 32
    n = L // bs
    g = torch.Generator(device="cuda").manual_seed(0)
    mass = torch.exp(3 * torch.randn(1, H, n, n, generator=g, device="cuda"))
    ours = coverage_select(mass, threshold=0.9, q_len=L, k_len=L, block_size=bs).to_mask()
    ref = reference_index(mass, 0.9, L, L, bs, True).to_mask()
    rows_equal = (ours == ref).all(-1).float().mean().item()
    assert rows_equal >= 0.999, rows_equal
