"""MInference's fast selection (``kernels.minference_index``), per-head patterns, pattern files and search.

The fp32 reference (``sparseattn.reference.minference``) is the oracle: the fast estimation matches
its sums to fp32 rounding, the fast index equals its index entry for entry (token-level sets of
keys per query row; inputs are checked to have no near-ties at the top-k cut), and attention over
the fast index matches dense-masked fp32 attention over the reference's. Without CUDA the Triton
kernels run in the interpreter on small awkward shapes (conftest.py); every kernel output is
allocated poisoned (``SPARSEATTN_NAN_FILL=1``: NaN, or -2**31 for ints), so an unwritten entry fails.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseattn import Minference_prefill, sparse_attention
from sparseattn.index import BlockIndex, VerticalSlashIndex
from sparseattn.kernels.minference_index import (
    NAN_FILL_ENV,
    last_query_scores_fast,
    minference_select_fast,
    vertical_slash_index_fast,
)
from sparseattn.kernels.vertical_slash import vertical_slash_attention
from sparseattn.methods.minference import (
    MInferenceConfig,
    MInferencePatterns,
    block_sparse_select_fast,
    load_minference_patterns,
    minference_layer_configs,
    model_key,
    select_blocks,
)
from sparseattn.reference.attention import reference_attention
from sparseattn.reference.minference import (
    a_shape_select,
    block_sparse_select,
    last_query_scores,
    minference_select,
    selection_sizes,
    vertical_slash_index_from_scores,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"]
INDEX_FIELDS = ("range_starts", "range_counts", "columns", "column_counts")


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setenv(NAN_FILL_ENV, "1")
    torch.backends.cuda.matmul.allow_tf32 = False


def make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, D, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def assert_same_index(fast: VerticalSlashIndex, ref: VerticalSlashIndex):
    assert (fast.block_q, fast.block_k, fast.q_len, fast.k_len) == (ref.block_q, ref.block_k, ref.q_len, ref.k_len)
    for name in INDEX_FIELDS:
        a, b = getattr(fast, name).cpu(), getattr(ref, name).cpu()
        assert a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs at {(a != b).nonzero()[:4].tolist()}"


def assert_no_near_ties(scores: torch.Tensor, keep: int, forced: int):
    """The test is meaningful only if rounding (~1e-6 relative) cannot flip the top-``keep`` cut."""
    scores = scores.clone()
    scores[..., :forced] = float("inf")
    if keep >= scores.shape[-1]:
        return
    top = torch.topk(scores.flatten(0, -2), keep + 1, dim=-1).values
    inside, outside = top[:, keep - 1], top[:, keep]
    assert ((inside - outside) > 1e-5 * outside.abs()).all(), "seeded input has a near-tie at the cut"


def repeat_kv(k, groups):
    return k.repeat_interleave(groups, dim=1)  # tests only: the library never does this


# ---- estimation -----------------------------------------------------------------------------------

ESTIMATE_SHAPES = [  # B, Hq, Hkv, Lq, Lk, D, last_q
    pytest.param(1, 1, 1, 1, 1, 16, 64, id="B1-H1-L1-D16-n1"),
    pytest.param(1, 2, 1, 100, 100, 32, 16, id="B1-H2-HKV1-L100-D32-n16"),
    pytest.param(2, 4, 2, 77, 260, 16, 24, id="B2-H4-HKV2-Lq77-Lk260-D16-n24"),
    pytest.param(1, 3, 1, 63, 63, 64, 64, id="B1-H3-HKV1-L63-D64-n63"),
    pytest.param(1, 8, 1, 40, 1000, 128, 37, id="B1-H8-HKV1-Lq40-Lk1000-D128-n37"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,last_q", ESTIMATE_SHAPES)
def test_last_query_scores_fast_matches_reference(B, Hq, Hkv, Lq, Lk, D, last_q, causal):
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=1)
    n = min(last_q, Lq)
    vertical, slash, min_offset = last_query_scores_fast(q, k, n, causal)
    ref_v, ref_s, ref_min = last_query_scores(q, k, n, causal)
    assert min_offset == ref_min and slash.shape == ref_s.shape and vertical.shape == ref_v.shape
    assert torch.isfinite(vertical).all() and torch.isfinite(slash).all()
    torch.testing.assert_close(vertical, ref_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slash, ref_s, rtol=1e-5, atol=1e-6)
    # Every row's probabilities sum to one, on both reductions.
    assert torch.allclose(vertical.sum(-1), torch.full_like(vertical[..., 0], n), rtol=1e-5)
    assert torch.allclose(slash.sum(-1), torch.full_like(slash[..., 0], n), rtol=1e-5)


@pytest.mark.parametrize("sums", ["window", "runs of 3 blocks"])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,last_q", ESTIMATE_SHAPES[1:])
def test_vertical_slash_sums_kernels_match_reference(B, Hq, Hkv, Lq, Lk, D, last_q, sums, monkeypatch):
    """Both sums kernels: one window of two blocks a program, and runs of blocks a program whose
    probabilities carry to the next block (3 blocks a run here, so runs start and end mid-row)."""
    import sparseattn.kernels.minference_index as MI

    monkeypatch.setattr(MI, "SUMS_LOOP", sums != "window")
    monkeypatch.setattr(MI, "SUMS_PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(MI, "SUMS_MAX_BLOCKS", 3)
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=2)
    n = min(last_q, Lq)
    for causal in (True, False):
        vertical, slash, _ = last_query_scores_fast(q, k, n, causal)
        ref_v, ref_s, _ = last_query_scores(q, k, n, causal)
        torch.testing.assert_close(vertical, ref_v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(slash, ref_s, rtol=1e-5, atol=1e-6)


def test_last_query_scores_fast_on_a_subset_of_heads():
    """``kv_heads``: three query heads' last rows (of a 6/3 GQA layout: KV heads 2, 0, 2), scored against
    the full k without a copy, equal to the reference on those heads; bad maps are refused."""
    q, k, _ = make_qkv(2, 6, 3, 90, 150, 16, seed=3)
    heads, n = [5, 0, 4], 24
    q_last = q[:, heads, -n:]
    vertical, slash, _ = last_query_scores_fast(q_last, k, n, kv_heads=[h // 2 for h in heads])
    ref_v, ref_s, _ = last_query_scores(q[:, heads], k[:, [2, 0, 2]], n)
    torch.testing.assert_close(vertical, ref_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slash, ref_s, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one KV head in"):
        last_query_scores_fast(q_last, k, n, kv_heads=[2, 0, 3])


# ---- index building from scores -------------------------------------------------------------------


def structured_scores(B, H, Lk, bs, seed):
    """Slash scores whose top offsets are spaced by gaps around the merge thresholds (bs, 2 bs)."""
    g = torch.Generator().manual_seed(seed)
    slash = torch.rand(B, H, Lk, generator=g) * 1e-3
    gaps = torch.tensor([1, bs - 1, bs, bs + 1, 2 * bs - 1, 2 * bs, 2 * bs + 1, 3 * bs])
    for b in range(B):
        for h in range(H):
            o = int(torch.randint(0, 5, (1,), generator=g))
            while o < Lk:
                slash[b, h, o] = 1 + torch.rand(1, generator=g).item()
                o += int(gaps[torch.randint(0, len(gaps), (1,), generator=g)])
    return torch.rand(B, H, Lk, generator=g), slash


@pytest.mark.parametrize("backend,cases", [("torch", 150), ("triton", 30)])
def test_index_from_scores_matches_reference_sweep(backend, cases):
    """Seeded random cases; asserts that they exercise every branch of the closed-form index."""
    from sparseattn.kernels.minference_index import _block_params, _cluster_tables, _top_sorted

    g = torch.Generator().manual_seed(20)
    seen = {"interior tiles": 0, "unclipped edge": 0, "clipped, merged edge": 0, "clipped-only edge": 0,
            "columns dropped": 0}
    for _ in range(cases):
        B, H = (int(x) for x in torch.randint(1, 3, (2,), generator=g))
        bs = [16, 32, 64][int(torch.randint(0, 3, (1,), generator=g))]
        k_len = int(torch.randint(1, 900, (1,), generator=g))
        q_len = int(torch.randint(1, k_len + 1, (1,), generator=g))
        vs, ss = int(torch.randint(1, 300, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))
        vertical, slash = structured_scores(B, H, k_len, bs, seed=int(torch.randint(0, 10**6, (1,), generator=g)))
        vertical, slash = vertical.to(DEVICE), slash.to(DEVICE)
        fast = vertical_slash_index_fast(vertical, slash, vertical_sizes=vs, slash_sizes=ss, q_len=q_len,
                                         k_len=k_len, block_size=bs, backend=backend)
        ref = vertical_slash_index_from_scores(vertical, slash, 0, vertical_size=vs, slash_size=ss, q_len=q_len,
                                               k_len=k_len, block_size=bs)
        assert_same_index(fast, ref)
        forced = slash.clone()
        forced[..., :100] = float("inf")
        offsets = _top_sorted(forced, [selection_sizes(vs, ss, k_len, k_len)[1]] * H, 1 << 40)
        count, n_e, a_e, n_int = _block_params(offsets, *_cluster_tables(offsets, bs, k_len)[:4], q_len, k_len,
                                               bs)[..., :4].unbind(-1)
        seen["interior tiles"] += int((n_int > 0).sum())
        seen["unclipped edge"] += int((a_e > 0).sum())
        seen["clipped, merged edge"] += int(((a_e == 0) & (n_e > 1)).sum())
        seen["clipped-only edge"] += int(((a_e == 0) & (n_e == 1) & (n_int > 0)).sum())
        seen["columns dropped"] += int((ref.column_counts < min(selection_sizes(vs, ss, k_len, k_len)[0], k_len)).sum())
    assert all(n >= 5 for n in seen.values()), seen


def test_cluster_tables_kernels_match_torch_builders():
    """``_cluster_tables_triton`` (two launches) writes the same tile list, kappa map and query-block
    parameters as the torch builders, entry for entry, on offsets spaced around the merge thresholds
    (outputs poisoned: an entry the kernels skip fails)."""
    from sparseattn.kernels.minference_index import (_block_params, _cluster_tables, _cluster_tables_triton,
                                                     _top_sorted)

    g = torch.Generator().manual_seed(7)
    for case in range(24):
        B, H, bs = 1 + case % 2, 1 + case % 3, [16, 32, 64][case % 3]
        k_len = int(torch.randint(1, 900, (1,), generator=g))
        q_len = int(torch.randint(1, k_len + 1, (1,), generator=g))
        ns = selection_sizes(10, int(torch.randint(1, 300, (1,), generator=g)), k_len, k_len)[1]
        _, slash = structured_scores(B, H, k_len, bs, seed=case)
        slash[..., :100] = float("inf")
        offsets = _top_sorted(slash.to(DEVICE), [ns] * H, 1 << 40).contiguous()
        cid, o_min, n_before, n_tiles, tiles, cluster_map = _cluster_tables(offsets, bs, k_len)
        params = _block_params(offsets, cid, o_min, n_before, n_tiles, q_len, k_len, bs)
        got = _cluster_tables_triton(offsets, bs, q_len, k_len)
        for name, want, have in zip(("tiles", "cluster_map", "params"), (tiles, cluster_map, params), got):
            assert torch.equal(have, want), (case, name)


def test_index_past_the_scan_kernels_limit_takes_the_torch_builders(monkeypatch):
    """More slashes a head than ``MAX_SCAN_OFFSETS``: the Triton backend builds its cluster tables
    with the torch ops, and the index is still the reference's."""
    from sparseattn.kernels import minference_index

    monkeypatch.setattr(minference_index, "MAX_SCAN_OFFSETS", 8)
    calls = []
    torch_tables = minference_index._cluster_tables
    monkeypatch.setattr(minference_index, "_cluster_tables", lambda *a: calls.append(1) or torch_tables(*a))
    vertical, slash = structured_scores(1, 2, 300, 16, seed=5)
    kwargs = dict(vertical_sizes=20, slash_sizes=30, q_len=200, k_len=300, block_size=16)
    fast = vertical_slash_index_fast(vertical.to(DEVICE), slash.to(DEVICE), backend="triton", **kwargs)
    assert calls == [1]
    assert_same_index(fast, vertical_slash_index_from_scores(vertical, slash, 0, vertical_size=20, slash_size=30,
                                                             q_len=200, k_len=300, block_size=16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [-1, 0, 1, 15], ids=lambda d: f"top=p1-15+{d}")
@pytest.mark.parametrize("gap", [-1, 0, 1], ids=lambda d: f"u=2bs{d:+d}")
def test_index_edge_boundaries(backend, clip, gap):
    """Query block 12 (p1 = 207, bs 16): a top offset at the clipping threshold and the largest
    unclipped offset at the merge threshold ``u = 2 bs``, each one off on either side."""
    bs, p1 = 16, 207
    top, below = p1 - bs + 1 + clip, p1 - bs + 1 - 2 * bs - gap  # u = p1 - below - bs + 1 = 2 bs + gap
    g = torch.Generator().manual_seed(clip * 10 + gap)
    vertical, slash = torch.rand(1, 1, 256, generator=g), torch.rand(1, 1, 256, generator=g) * 1e-3
    slash[..., [top, below]] = 1.0
    kwargs = dict(vertical_sizes=40, slash_sizes=102, q_len=256, k_len=256, block_size=bs)
    fast = vertical_slash_index_fast(vertical.to(DEVICE), slash.to(DEVICE), backend=backend, **kwargs)
    ref = vertical_slash_index_from_scores(vertical, slash, 0, vertical_size=40, slash_size=102, q_len=256, k_len=256,
                                           block_size=bs)
    assert_same_index(fast, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), k_len=st.integers(1, 700), q_frac=st.floats(0.0, 1.0),
       bs=st.sampled_from([16, 32, 64]), vs=st.integers(1, 250), ss=st.integers(1, 400),
       structured=st.booleans(), seed=st.integers(0, 10_000))
def test_index_from_scores_matches_reference(backend, B, H, k_len, q_frac, bs, vs, ss, structured, seed):
    q_len = max(1, round(q_frac * k_len))
    if structured:
        vertical, slash = structured_scores(B, H, k_len, bs, seed)
    else:
        g = torch.Generator().manual_seed(seed)
        vertical, slash = torch.rand(B, H, k_len, generator=g), torch.rand(B, H, k_len, generator=g)
    vertical, slash = vertical.to(DEVICE), slash.to(DEVICE)
    fast = vertical_slash_index_fast(vertical, slash, vertical_sizes=vs, slash_sizes=ss, q_len=q_len, k_len=k_len,
                                     block_size=bs, backend=backend)
    ref = vertical_slash_index_from_scores(vertical, slash, 0, vertical_size=vs, slash_size=ss, q_len=q_len,
                                           k_len=k_len, block_size=bs)
    assert_same_index(fast, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_per_head_sizes_match_reference_heads(backend):
    check_index_per_head_sizes(backend)


def check_index_per_head_sizes(backend):
    """Each head's rows of a per-head-sizes index equal that head's reference index."""
    B, H, Lq, Lk, bs = 2, 4, 300, 450, 32
    vertical, slash = structured_scores(B, H, Lk, bs, seed=3)
    v_sizes, s_sizes = [5, 40, 200, 31], [100, 7, 333, 150]
    fast = vertical_slash_index_fast(vertical.to(DEVICE), slash.to(DEVICE), vertical_sizes=v_sizes,
                                     slash_sizes=s_sizes, q_len=Lq, k_len=Lk, block_size=bs, backend=backend)
    assert fast.columns.shape[-1] == max(selection_sizes(v, s, Lk, Lk)[0] for v, s in zip(v_sizes, s_sizes))
    for h in range(H):
        ref = vertical_slash_index_from_scores(vertical[:, h:h + 1], slash[:, h:h + 1], 0, vertical_size=v_sizes[h],
                                               slash_size=s_sizes[h], q_len=Lq, k_len=Lk, block_size=bs)
        for name in INDEX_FIELDS:
            got, want = getattr(fast, name)[:, h:h + 1].cpu(), getattr(ref, name)
            if got.dim() == 4:  # wider than this head needs: the rest is padding
                assert (got[..., want.shape[-1]:] == -1).all()
                got = got[..., :want.shape[-1]]
            assert torch.equal(got, want), (h, name)


def stable_top_sorted(scores, sizes, pad):
    """The ``sizes[h]`` highest positions of each row, ascending, ``pad`` after; ties at the cut lowest
    position first (a stable descending sort; -0.0 ties +0.0)."""
    B, H, L = scores.shape
    out = torch.full((B, H, max(sizes)), pad, dtype=torch.int64)
    order = torch.sort(scores.where(scores != 0, 0.0), dim=-1, descending=True, stable=True).indices
    for h, n in enumerate(sizes):
        out[:, h, :n] = torch.sort(order[:, h, :n], dim=-1).values
    return out


@pytest.mark.parametrize("values", ["distinct", "ties", "one ulp apart"])
def test_row_top_k_kernel_matches_a_stable_sort(values):
    """``_row_top_k_kernel`` (radix select + ordered compaction) against a stable sort, per-head sizes
    (one the whole row), rows of 1000 (chunks of 64 in the interpreter, the last partial), negative
    values, infinities, -0.0, and cuts inside runs of ties or among keys that differ in the last bits
    (so each of the three radix passes decides)."""
    from sparseattn.kernels.minference_index import _top_sorted, _top_sorted_fast

    g = torch.Generator().manual_seed(7)
    B, H, L = 2, 5, 1000
    if values == "distinct":
        scores = torch.randn(B, H, L, generator=g)
        scores[..., :30] = float("inf")
        scores[0, 1, 500:510] = float("-inf")
    elif values == "ties":
        scores = torch.randint(-2, 4, (B, H, L), generator=g).float()
        scores[scores == 0] = -0.0
        scores[..., ::7] = 0.0  # +0.0 among the -0.0
    else:  # runs of keys one ulp apart around 1.0, below and above it
        steps = torch.randint(-300, 300, (B, H, L), generator=g)
        scores = torch.ones(B, H, L) + steps * torch.finfo(torch.float32).eps / 2
    sizes = [1, 137, 500, 999, 1000]  # "ties": 500 cuts the run of zeros (-0.0 and +0.0 alike)
    for dtype, pad in ((torch.int64, 1 << 40), (torch.int32, 1 << 30)):
        got = _top_sorted_fast(scores.to(DEVICE), sizes, pad, dtype)
        assert got.dtype == dtype
        assert torch.equal(got.cpu().long(), stable_top_sorted(scores, sizes, pad)), (values, dtype)
    if values == "distinct":  # where no tie sits at the cut (not head 0's, inside the infinities) it is
        # the torch path's selection
        assert torch.equal(got.cpu().long()[:, 1:], _top_sorted(scores, sizes, 1 << 30)[:, 1:])
    with pytest.raises(ValueError, match="one size in"):
        _top_sorted_fast(scores.to(DEVICE), [1, 2, 3, 4, 1001], 0, torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_with_the_top_k_kernel_matches_reference_heads(backend, monkeypatch):
    """``TOP_K_KERNEL``: the tables' top-k keys and offsets from the kernel; each head's index still
    equals the reference's (per-head sizes; the torch backend ignores the switch)."""
    import sparseattn.kernels.minference_index as MI

    monkeypatch.setattr(MI, "TOP_K_KERNEL", True)
    calls = []
    kernel = MI._top_sorted_fast
    monkeypatch.setattr(MI, "_top_sorted_fast", lambda *a: calls.append(1) or kernel(*a))
    check_index_per_head_sizes(backend)
    assert len(calls) == (2 if backend == "triton" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fill_into_writes_only_the_given_heads(backend):
    """``fill_vertical_slash_index(into=)``: two heads' rows land in output heads 3 and 0 of a wider
    index, equal to their own index; every other entry keeps its value (here 7)."""
    from sparseattn.kernels.minference_index import fill_vertical_slash_index, vertical_slash_tables

    vertical, slash = structured_scores(2, 3, 400, 32, seed=9)
    tables = vertical_slash_tables(vertical.to(DEVICE), slash.to(DEVICE), vertical_sizes=[30, 50, 20],
                                   slash_sizes=[90, 40, 200], q_len=333, k_len=400, block_size=32, backend=backend)
    alone = fill_vertical_slash_index(tables, slice(1, 3), backend=backend)
    nq, width_r, width_c = 11, alone.range_starts.shape[-1] + 5, alone.columns.shape[-1] + 3
    out = VerticalSlashIndex(*(torch.full(shape, 7, dtype=torch.int32, device=DEVICE) for shape in (
        (2, 5, nq, width_r), (2, 5, nq), (2, 5, nq, width_c), (2, 5, nq))), 32, 32, 333, 400)
    assert fill_vertical_slash_index(tables, slice(1, 3), backend=backend, into=(out, [3, 0])) is out
    for name in INDEX_FIELDS:
        got, want = getattr(out, name), getattr(alone, name)
        for src, dst in ((0, 3), (1, 0)):
            row = got[:, dst]
            assert torch.equal(row[..., :want.shape[-1]] if row.dim() == 3 else row, want[:, src]), (name, dst)
            if row.dim() == 3:
                assert (row[..., want.shape[-1]:] == 7).all()
        assert (got[:, [1, 2, 4]] == 7).all()
    with pytest.raises(ValueError, match="output heads"):
        fill_vertical_slash_index(tables, slice(1, 3), backend=backend, into=(out, [3]))


# ---- end-to-end selection -------------------------------------------------------------------------

SELECT_SHAPES = [  # B, Hq, Hkv, Lq, Lk, D, bs, vertical_size, slash_size, last_q
    pytest.param(1, 2, 1, 300, 300, 16, 16, 40, 110, 24, id="B1-H2-HKV1-L300-D16-bs16"),
    pytest.param(2, 4, 2, 77, 260, 16, 32, 35, 130, 24, id="B2-H4-HKV2-Lq77-Lk260-D16-bs32"),
    pytest.param(1, 1, 1, 1, 1, 16, 16, 1000, 6096, 64, id="B1-H1-L1-D16-bs16"),
    pytest.param(1, 3, 1, 63, 63, 32, 16, 5, 5, 24, id="B1-H3-HKV1-L63-D32-bs16"),
    pytest.param(1, 4, 2, 500, 1000, 64, 64, 100, 300, 64, id="B1-H4-HKV2-Lq500-Lk1000-D64-bs64"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bs,vs,ss,last_q", SELECT_SHAPES)
def test_select_fast_matches_reference(B, Hq, Hkv, Lq, Lk, D, bs, vs, ss, last_q, backend):
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=2)
    ref_v, ref_s, _ = last_query_scores(q, k, min(last_q, Lq))
    nv, ns = selection_sizes(vs, ss, Lk, Lk)
    assert_no_near_ties(ref_v, nv, 30)
    assert_no_near_ties(ref_s, ns, 100)
    fast = minference_select_fast(q, k, vertical_size=vs, slash_size=ss, last_q=last_q, block_size=bs, backend=backend)
    ref = minference_select(q, k, vertical_size=vs, slash_size=ss, last_q=last_q, block_size=bs)
    assert_same_index(fast, ref)


def test_select_fast_gqa_adaptive_budget_and_per_head_sizes():
    q, k, _ = make_qkv(2, 4, 2, 200, 400, 32, seed=4)
    kwargs = dict(last_q=32, block_size=32)
    # GQA without repeating K: the same index as with K repeated per query head.
    assert_same_index(minference_select_fast(q, k, vertical_size=50, slash_size=120, **kwargs),
                      minference_select_fast(q, repeat_kv(k, 2), vertical_size=50, slash_size=120, **kwargs))
    # 0.5 * 400 = 200 tokens: 40 verticals, 160 slashes.
    assert_same_index(minference_select_fast(q, k, adaptive_budget=0.5, **kwargs),
                      minference_select(q, k, vertical_size=40, slash_size=160, **kwargs))
    sizes = dict(vertical_size=[30, 80, 45, 200], slash_size=[100, 250, 130, 101])
    assert_same_index(minference_select_fast(q, k, **sizes, **kwargs), minference_select(q, k, **sizes, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else []), ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bs", [
    pytest.param(1, 4, 2, 190, 190, 32, 32, id="B1-H4-HKV2-L190-D32-bs32"),
    pytest.param(2, 2, 1, 70, 333, 64, 16, id="B2-H2-HKV1-Lq70-Lk333-D64-bs16"),
])
def test_attention_over_fast_index_matches_reference(B, Hq, Hkv, Lq, Lk, D, bs, dtype):
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=5, dtype=dtype)
    index = minference_select_fast(q, k, vertical_size=40, slash_size=60, last_q=32, block_size=bs, backend="triton")
    ref_index = minference_select(q.float(), k.float(), vertical_size=40, slash_size=60, last_q=32, block_size=bs)
    if dtype == torch.float32:
        assert_same_index(index, ref_index)
    out = vertical_slash_attention(q, k, v, index)
    want = reference_attention(q.float(), k.float(), v.float(), mask=ref_index.to_element_mask())
    assert torch.isfinite(out).all()
    err = ((out.float() - want).norm() / want.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2)


def test_minference_prefill_and_unified_api(monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 150, 150, 32, seed=6)
    want_index = minference_select(q, k, vertical_size=40, slash_size=100, last_q=64, block_size=64)
    want = reference_attention(q, k, v, mask=want_index.to_element_mask())
    out, stats = Minference_prefill(q, k, v, vertical_size=40, slash_size=100, return_stats=True)
    assert_same_index(stats.index, want_index)
    assert ((out - want).norm() / want.norm()).item() < 1e-5
    assert torch.allclose(stats.density, want_index.density())
    monkeypatch.setenv("SPARSEATTN_BACKEND", "triton")  # the kernel path (interpreted on a CPU)
    out = sparse_attention(q, k, v, method="minference", vertical_size=40, slash_size=100)
    assert ((out - want).norm() / want.norm()).item() < 1e-5


# ---- block_sparse and per-head patterns -----------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("top_k", [0, 1, 3, 100])
def test_block_sparse_fast_matches_reference(top_k, causal):
    q, k, _ = make_qkv(2, 6, 3, 200, 330, 16, seed=7)
    fast = block_sparse_select_fast(q, k, top_k=top_k, block_size=32, causal=causal)
    ref = block_sparse_select(q, k, top_k=top_k, block_size=32, causal=causal)
    assert torch.equal(fast.to_mask(), ref.to_mask())
    assert torch.equal(fast.counts, ref.counts)


def test_block_sparse_fast_per_head_top_k_and_head_subset():
    q, k, _ = make_qkv(1, 6, 3, 256, 256, 16, seed=8)
    heads, top = [5, 0, 3], [2, 0, 4]
    fast = block_sparse_select_fast(q, k, top_k=top, block_size=32, heads=heads)
    for i, h in enumerate(heads):
        ref = block_sparse_select(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], top_k=top[i], block_size=32)
        assert torch.equal(fast.to_mask()[:, i:i + 1], ref.to_mask())


def assert_same_rows(fast, ref):
    """Equal key blocks row for row, in the same (ascending) order; each side ``-1`` padded to its width."""
    width = max(fast.indices.shape[-1], ref.indices.shape[-1])
    pad = [torch.nn.functional.pad(i.indices.cpu(), (0, width - i.indices.shape[-1]), value=-1) for i in (fast, ref)]
    assert torch.equal(*pad)
    assert torch.equal(fast.counts.cpu(), ref.counts.cpu())


def tied_qk(B, Hq, Hkv, Lq, Lk, D, seed):
    """Integer-valued q and k with a constant first half of the keys: many pooled scores tie exactly,
    so the top-k cut falls inside runs of equal scores."""
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=seed)
    q, k = q.round(), (0.5 * k).round()
    k[:, :, :Lk // 2] = 1.0
    return q, k


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
def test_block_sparse_triton_matches_reference(causal, ties, monkeypatch):
    # The Triton selection kernel (interpreted on a CPU), on scores chunked by rows of one head
    # (2 heads x 7 rows x 11 blocks > 64): Lq < Lk, a partial last block, top 0 / 2 / all.
    import sparseattn.methods.minference as minference

    monkeypatch.setattr(minference, "BLOCK_SPARSE_CHUNK_ELEMENTS", 64)
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 100, 165, 16
    q, k = tied_qk(B, Hq, Hkv, Lq, Lk, D, seed=21) if ties else make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=21)[:2]
    for top_k in (0, 2, 50):
        fast = block_sparse_select_fast(q, k, top_k=top_k, block_size=16, causal=causal, backend="triton")
        ref = block_sparse_select(q, k, top_k=top_k, block_size=16, causal=causal)
        assert_same_rows(fast, ref)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
def test_block_sparse_triton_broadcasts_one_kv_pool(ties, monkeypatch):
    # B = 1, heads of one KV head a chunk: their pooled scores are one bmm against that KV head's
    # pool read with a zero batch stride (no copy of it); the rows equal the reference's.
    B, Hq, Hkv, Lq, Lk, D = 1, 4, 1, 100, 165, 16
    q, k = tied_qk(B, Hq, Hkv, Lq, Lk, D, seed=22) if ties else make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=22)[:2]
    strides = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b, **kw: strides.append(b.stride(0)) or real_bmm(a, b, **kw))
    for top_k in (0, 2, 50):
        fast = block_sparse_select_fast(q, k, top_k=top_k, block_size=16, backend="triton")
        assert_same_rows(fast, block_sparse_select(q, k, top_k=top_k, block_size=16))
    assert strides and all(s == 0 for s in strides)


def test_block_top_k_kernel_on_adversarial_rows():
    """``block_top_k_`` on rows of few distinct values (long tie runs at the cut),
    negative scores, signed zeros (equal in the reference's sort), huge magnitudes and values
    spread over many decades or bunched near one, for top 0, 1,
    a cut inside a tie run, and more than a row holds: the rows of a stable descending sort."""
    from sparseattn.kernels.minference_index import block_top_k_

    g = torch.Generator().manual_seed(31)
    nq = nk = 40
    values = torch.tensor([-3e38, -2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3e38])
    scores = values[torch.randint(0, len(values), (1, 2, nq, nk), generator=g)]
    scores[0, 1, :, ::3] = -0.0  # head 1: signed zeros everywhere in the row
    scores[0, 1, :, 1::3] = 0.0
    # head 2: distinct values of both signs spread over 60 decades (keys far apart: the search's
    # interpolated guesses land poorly and it falls back to bisection); head 3: a few huge values
    # above a dense cluster near 1 (the guesses skew to one end).
    scores = torch.cat([scores, torch.empty(1, 2, nq, nk)], 1)
    scores[0, 2] = torch.randn(nq, nk, generator=g) * 10.0 ** torch.randint(-30, 30, (nq, nk), generator=g)
    scores[0, 3] = 1 + 1e-3 * torch.rand(nq, nk, generator=g)
    scores[0, 3, :, ::9] = 1e30
    for top in (0, 1, 7, 200):
        tops = torch.tensor([top, top + 3, top + 5, top + 2])
        indices = torch.full((1, 4, nq, nk), -5, dtype=torch.int32)
        counts = torch.full((1, 4, nq), -5, dtype=torch.int32)
        block_top_k_(scores, tops, indices, counts, head0=0, row0=0, q_len=nq * 16, k_len=nk * 16, block_size=16,
                     causal=True, head_dim=1, out_heads=torch.arange(4))
        for h in range(4):
            for r in range(nq):
                row = scores[0, h, r, :r + 1] + 0.0  # causal: blocks 0..r; +0.0 makes -0.0 equal to 0.0
                order = torch.sort(row, descending=True, stable=True).indices[:int(tops[h])]
                want = sorted(set(order.tolist()) | {0, r})
                assert counts[0, h, r].item() == len(want), (top, h, r)
                assert indices[0, h, r].tolist() == want + [-1] * (nk - len(want)), (top, h, r)


def test_block_sparse_triton_head_chunks_per_head_top_k(monkeypatch):
    # Chunks of two whole heads (2 x 8 rows x 8 blocks = 128 scores), a head subset, per-head top-k.
    import sparseattn.methods.minference as minference

    monkeypatch.setattr(minference, "BLOCK_SPARSE_CHUNK_ELEMENTS", 128)
    # Heads from 1 on: the pools cover heads 1-5 and KV heads 0-2 (an odd shift into the groups).
    q, k = tied_qk(1, 6, 3, 128, 128, 16, seed=22)
    heads, top = [5, 1, 3], [2, 0, 4]
    for backend in ("triton", "torch"):
        fast = block_sparse_select_fast(q, k, top_k=top, block_size=16, heads=heads, backend=backend)
        for i, h in enumerate(heads):
            ref = block_sparse_select(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], top_k=top[i], block_size=16)
            assert_same_rows(BlockIndex(fast.indices[:, i:i + 1], fast.counts[:, i:i + 1], 16, 16, 128, 128), ref)


def test_one_kv_head_calls_take_the_small_score_chunk(monkeypatch):
    """A call of one KV head (the API's smallest chunk) scores at most ``BLOCK_SPARSE_GROUP_CHUNK_ELEMENTS``
    at a time, others ``BLOCK_SPARSE_CHUNK_ELEMENTS``; ``index_bytes`` counts the same scratch."""
    import sparseattn.methods.minference as minference

    monkeypatch.setattr(minference, "BLOCK_SPARSE_CHUNK_ELEMENTS", 256)
    monkeypatch.setattr(minference, "BLOCK_SPARSE_GROUP_CHUNK_ELEMENTS", 64)
    seen, triton_path = [], minference._block_sparse_triton
    monkeypatch.setattr(minference, "_block_sparse_triton",
                        lambda *a, **kw: seen.append(kw["chunk_elements"]) or triton_path(*a, **kw))
    for kv_heads, chunk in ((1, 64), (2, 256)):
        q, k, _ = make_qkv(1, 4, kv_heads, 128, 128, 16, seed=23)
        fast = block_sparse_select_fast(q, k, top_k=2, block_size=16, backend="triton")
        assert seen[-1] == chunk
        assert_same_rows(fast, block_sparse_select(q, k, top_k=2, block_size=16))
    cfg = minference.MInferenceConfig(pattern="block_sparse", top_k=2, block_size=16)
    one, two = (minference.index_bytes(cfg, 1, 4, 128, 128, head_dim=16, kv_heads=g) for g in (1, 2))
    assert two - one == 4 * ((256 - 64) + 16 * (2 - 1) * 8 + 16 * (4 - 1) * (8 + 8))


def test_block_sparse_backend_choice(monkeypatch):
    import sparseattn.kernels.minference_index as kernels

    q, k, _ = make_qkv(1, 2, 1, 64, 64, 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_select_fast(q, k, top_k=1, block_size=16, backend="cuda")
    monkeypatch.setattr(kernels, "MAX_TOP_K_BLOCKS", 2)
    with pytest.raises(ValueError, match="at most 2 key blocks per row, got 4"):
        block_sparse_select_fast(q, k, top_k=1, block_size=16, backend="triton")
    auto = block_sparse_select_fast(q.to(DEVICE), k.to(DEVICE), top_k=1, block_size=16)  # rows too long: torch
    assert_same_rows(auto, block_sparse_select(q, k, top_k=1, block_size=16))


HEAD_PATTERNS = [["vertical_and_slash", 40, 120], ["a_shape", 16, 64], ["block_sparse", 2, 0],
                 ["a_shape", 16, 64], ["vertical_and_slash", 60, 100, 0.97], ["block_sparse", 0, 0]]


def head_reference_mask(q, k, entry, bs, last_q):
    """The element mask a single head's pattern gives, from the reference selectors."""
    pattern, v, s = entry[:3]
    Lq, Lk = q.shape[2], k.shape[2]
    if pattern == "vertical_and_slash":
        return minference_select(q, k, vertical_size=v, slash_size=s, last_q=last_q, block_size=bs).to_element_mask()
    if pattern == "a_shape":
        return a_shape_select(Lq, Lk, q.shape[0], 1, sink=v, window=s, block_size=bs).to_element_mask()
    return block_sparse_select(q, k, top_k=v, block_size=bs).to_element_mask()


# Vertical-slash heads only in the middle KV group: the estimation runs on that group's views alone.
HEAD_PATTERNS_SPAN = [["block_sparse", 2, 0], ["a_shape", 16, 64], ["vertical_and_slash", 40, 120],
                      ["block_sparse", 1, 0], ["block_sparse", 3, 0], ["a_shape", 0, 32]]


@pytest.mark.parametrize("block_backend", ["torch", "triton"])
@pytest.mark.parametrize("patterns", [HEAD_PATTERNS, HEAD_PATTERNS_SPAN], ids=["all-groups", "one-group"])
def test_head_patterns_mix_patterns_per_head(patterns, block_backend, monkeypatch):
    # "triton": the block-sparse heads' rows are written into the ranges by the top-k kernel.
    import sparseattn.methods.minference as minference

    monkeypatch.setattr(minference, "SELECT_BACKEND", block_backend)
    q, k, v = make_qkv(2, 6, 3, 200, 250, 32, seed=9)
    cfg = MInferenceConfig(head_patterns=patterns, block_size=32, last_q=32)
    if patterns is HEAD_PATTERNS:
        assert cfg.head_patterns[4] == ("vertical_and_slash", 60, 100)  # the score is dropped
    index = select_blocks(q, k, cfg)
    assert isinstance(index, VerticalSlashIndex)
    elem = index.to_element_mask()
    for h, entry in enumerate(patterns):
        want = head_reference_mask(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], entry, 32, 32)
        assert torch.equal(elem[:, h:h + 1], want), h
    out = vertical_slash_attention(q, k, v, index)
    want = reference_attention(q, k, v, mask=elem)
    assert ((out - want).norm() / want.norm()).item() < 1e-5
    api = Minference_prefill(q, k, v, head_patterns=patterns, last_q=32)
    assert api.shape == q.shape and torch.isfinite(api).all()


@pytest.mark.parametrize("per_head", [False, True, "mix"], ids=["one-config", "head-patterns", "mix"])
@pytest.mark.parametrize("select_backend", ["torch", "triton"])
def test_chunked_vertical_slash_call_estimates_once(select_backend, per_head, monkeypatch):
    """A memory-bounded call (one KV head per chunk) estimates and builds the tables of all heads
    once, then fills each chunk's index: the chunks' indices are the whole selection's, head for head
    (also for a per-head table of vertical-slash heads of different sizes)."""
    import sparseattn.kernels.minference_index as kernels
    import sparseattn.methods.minference as minference
    from sparseattn import api
    from sparseattn.api import selection_chunks

    monkeypatch.setattr(minference, "SELECT_BACKEND", select_backend)
    q, k, v = make_qkv(2, 6, 3, 200, 200, 32, seed=12)
    options = dict(vertical_size=16, slash_size=40, last_q=16, block_size=32)
    if per_head:
        options = dict(last_q=16, block_size=32, head_patterns=[["vertical_and_slash", 8 * (h + 1), 20 + 10 * h]
                                                                for h in range(6)])
    if per_head == "mix":  # vertical-slash heads in KV heads 0 and 2, block patterns elsewhere
        options["head_patterns"][1] = ["block_sparse", 2, 0]
        options["head_patterns"][2:4] = [["a_shape", 32, 64], ["block_sparse", 1, 0]]
    whole_index = select_blocks(q, k, MInferenceConfig(**options))
    whole = sparse_attention(q, k, v, method="minference", **options)
    alone = [select_blocks(q[:, 2 * g:2 * g + 2], k[:, g:g + 1],
                           minference.head_slice(MInferenceConfig(**options), 2 * g, 2 * g + 2, 2)) for g in range(3)]
    calls = []
    tables = kernels.vertical_slash_tables
    monkeypatch.setattr(kernels, "vertical_slash_tables", lambda *a, **kw: calls.append(1) or tables(*a, **kw))
    monkeypatch.setattr(api, "INDEX_BUDGET_FLOOR", 0)
    monkeypatch.setattr(api, "INDEX_BUDGET", 1e-9)  # one KV head (2 query heads) per chunk
    chunks = list(selection_chunks(q, k, v, "minference", **options))
    assert [(g0, g1) for g0, g1, _ in chunks] == [(0, 1), (1, 2), (2, 3)] and len(calls) == 1
    whole_mask = whole_index.to_element_mask()
    for g0, g1, index in chunks:
        assert torch.equal(index.to_element_mask(), whole_mask[:, 2 * g0:2 * g1]), g0
        # As wide as the chunk's own selection (the memory bound's chunks assume it), not the call's widest.
        assert [getattr(index, f).shape for f in INDEX_FIELDS] == [getattr(alone[g0], f).shape for f in INDEX_FIELDS]
        if per_head != "mix":  # entry for entry, up to the chunk's width (the rest of the whole's rows: -1)
            for name in INDEX_FIELDS:
                got, want = getattr(index, name), getattr(whole_index, name)[:, 2 * g0:2 * g1]
                if got.dim() == 4:
                    assert (want[..., got.shape[-1]:] == -1).all(), (g0, name)
                    want = want[..., :got.shape[-1]]
                assert torch.equal(got, want), (g0, name)
    chunked = sparse_attention(q, k, v, method="minference", **options)
    assert len(calls) == 2 and torch.equal(chunked, whole)


def test_head_patterns_single_kind_and_validation():
    q, k, _ = make_qkv(1, 2, 1, 128, 128, 16, seed=10)
    vs = select_blocks(q, k, MInferenceConfig(head_patterns=[["vertical_and_slash", 30, 100]] * 2, block_size=32))
    assert_same_index(vs, minference_select(q, k, vertical_size=30, slash_size=100, block_size=32))
    blocks = select_blocks(q, k, MInferenceConfig(head_patterns=[["block_sparse", 1, 0]] * 2, block_size=32))
    assert torch.equal(blocks.to_mask(), block_sparse_select(q, k, top_k=1, block_size=32).to_mask())
    with pytest.raises(ValueError, match="head_patterns has 3 entries, but the query has 2 heads"):
        select_blocks(q, k, MInferenceConfig(head_patterns=[["a_shape", 0, 64]] * 3))
    with pytest.raises(ValueError, match="pattern must be one of"):
        MInferenceConfig(head_patterns=[["stream", 1, 2]])
    with pytest.raises(ValueError, match="vertical_and_slash needs"):
        MInferenceConfig(head_patterns=[["vertical_and_slash", 0, 10]])
    with pytest.raises(ValueError, match="exclude each other"):
        MInferenceConfig(head_patterns=[["a_shape", 0, 64]], adaptive_budget=0.1)


# ---- pattern files --------------------------------------------------------------------------------


def small_table() -> MInferencePatterns:
    layers = {0: (("vertical_and_slash", 30, 100), ("a_shape", 16, 64)), 2: (("block_sparse", 3, 0),) * 2}
    return MInferencePatterns("Tiny-Model", layers, {0: (0.9, 0.8), 2: (0.7, 0.6)}, ("tiny",), {"tokens": 256})


def test_pattern_file_round_trip(tmp_path):
    path = small_table().save(tmp_path / "tiny.json")
    data = json.loads(path.read_text())
    assert data["format"] == "sparseattn.minference_patterns" and data["version"] == 1
    assert data["layers"]["0"]["1"] == ["a_shape", 16, 64, 0.8]
    loaded = load_minference_patterns(path)
    assert loaded.layers == small_table().layers and loaded.scores == small_table().scores
    assert loaded.layer_configs() == {0: {"head_patterns": small_table().layers[0]},
                                      2: {"head_patterns": small_table().layers[2]}}
    with pytest.raises(KeyError, match="no layer 1"):
        loaded.head_patterns(1)


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format="other"), "format must be"),
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d["layers"]["0"].update({"1": ["a_shape", -1, 64]}), "layer 0 head 1 v must be a non-negative"),
    (lambda d: d["layers"]["0"].pop("0"), "heads must be 0..0"),
    (lambda d: d.update(layers={}), "'layers' must be a non-empty object"),
])
def test_bad_pattern_files_are_rejected(tmp_path, change, message):
    data = small_table().to_json()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_minference_patterns(path)


def test_shipped_table_of_the_embedded_model():
    table = load_minference_patterns("smollm2")
    assert table.model == "SmolLM2-135M-Instruct"
    assert sorted(table.layers) == list(range(30)) and all(len(h) == 9 for h in table.layers.values())
    assert table.search["command"].startswith("sparseattn search")
    assert 0 < table.search["summary"]["mean_recall"] <= 1
    for name in ("default", "SmolLM2-135M-Instruct", "/some/where/SmolLM2-135M-Instruct.Q4_1.gguf"):
        assert load_minference_patterns(name).layers == table.layers
    assert minference_layer_configs("smollm2")[7] == {"head_patterns": table.layers[7]}
    with pytest.raises(FileNotFoundError, match="shipped: .*smollm2"):
        load_minference_patterns("no-such-model")
    # A layer's patterns run on that layer's shapes (9 query / 3 KV heads, D 64).
    q, k, v = make_qkv(1, 9, 3, 200, 200, 64, seed=11)
    out = Minference_prefill(q, k, v, patterns="smollm2", layer_idx=7, last_q=32)
    assert out.shape == q.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="needs layer_idx"):
        Minference_prefill(q, k, v, patterns="smollm2")


def test_model_key():
    assert model_key("SmolLM2-135M-Instruct") == model_key("x/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct"
    assert model_key("Llama-3.1-8B.json") == "llama-3.1-8b"


def test_integration_layer_configs(tiny_llama):
    import sparseattn.integrations.transformers as transformers_integration

    settings = transformers_integration.build_settings("minference", layer_configs=minference_layer_configs("smollm2"),
                                                       num_layers=30)
    assert settings.route(3).config.head_patterns == load_minference_patterns("smollm2").layers[3]
    with pytest.raises(ValueError, match=r"do not fit this model \(3 layers, 4 query heads\)"):
        minference_layer_configs("smollm2", model=tiny_llama)


def test_patched_model_runs_searched_style_table(tiny_llama):
    """A table whose every pattern keeps all causal keys reproduces the dense model; a sparse one runs."""
    from sparseattn.integrations.transformers import patch

    keep_all = [["a_shape", 0, 10_000], ["vertical_and_slash", 10_000, 10_000], ["block_sparse", 100, 0],
                ["a_shape", 1, 10_000]]
    table = MInferencePatterns("Tiny", {layer: tuple(tuple(e) for e in keep_all) for layer in range(3)})
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        dense = tiny_llama(ids).logits
        with patch(tiny_llama, method="minference", min_sparse_len=0, block_size=32, last_q=16, collect_stats=True,
                   layer_configs=minference_layer_configs(table, model=tiny_llama)) as handle:
            sparse = tiny_llama(ids).logits
        assert [s.reason for s in handle.stats] == ["sparse"] * 3
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
        thin = [["a_shape", 16, 32], ["vertical_and_slash", 30, 100], ["block_sparse", 1, 0], ["a_shape", 0, 16]]
        table = MInferencePatterns("Tiny", {layer: tuple(tuple(e) for e in thin) for layer in range(3)})
        with patch(tiny_llama, method="minference", min_sparse_len=0, block_size=32, last_q=16, collect_stats=True,
                   layer_configs=minference_layer_configs(table)) as handle:
            out = tiny_llama(ids).logits
        assert torch.isfinite(out).all() and all(float(s.density.mean()) < 1 for s in handle.stats)


# ---- search ---------------------------------------------------------------------------------------


def brute_recall_and_cost(q, k, index, last_q_pairs):
    """Recall and cost from the full element mask and full softmax (small shapes only)."""
    from sparseattn.search import _as_ranges

    elem = _as_ranges(index).to_element_mask()
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    kr = repeat_kv(k, Hq // k.shape[1])
    scores = q @ kr.transpose(-1, -2) / math.sqrt(D)
    causal = torch.arange(Lk, device=q.device)[None] <= (torch.arange(Lq, device=q.device) + Lk - Lq)[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    recall = (probs * elem).sum((-1, -2)) / Lq
    dense = causal.sum()
    cost = (elem.sum((-1, -2)) + last_q_pairs) / dense
    return recall.mean(0), cost.mean(0)


def test_measure_candidates_matches_brute_force():
    from sparseattn.search import Candidate, measure_candidates

    q, k, _ = make_qkv(2, 4, 2, 150, 200, 16, seed=12)
    cands = [Candidate("vertical_and_slash", 30, 100), Candidate("a_shape", 16, 48), Candidate("block_sparse", 2, 0)]
    recall, cost = measure_candidates(q, k, cands, last_q=24, block_size=32)
    extra = [2 * 24 * 200, 0, 5 * 7]
    for c, cand in enumerate(cands):
        index = select_blocks(q, k, cand.config(24, 32))
        want_recall, want_cost = brute_recall_and_cost(q, k, index, extra[c])
        torch.testing.assert_close(recall[c], want_recall.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cost[c], want_cost.float(), rtol=1e-5, atol=1e-6)


def test_choose_best_recall_within_budget():
    from sparseattn.search import choose

    recall = torch.tensor([[0.9, 0.5, 0.1], [0.99, 0.99, 0.2], [0.95, 0.6, 0.3]])
    cost = torch.tensor([[0.1, 0.1, 0.5], [0.5, 0.05, 0.6], [0.1, 0.05, 0.7]])
    choice, fits = choose(recall, cost, 0.2)
    assert choice.tolist() == [2, 1, 0] and fits.tolist() == [True, True, False]  # head 2: nothing fits -> cheapest
    choice, _ = choose(torch.tensor([[0.9], [0.9]]), torch.tensor([[0.2], [0.1]]), 0.5)
    assert choice.tolist() == [1]  # equal recall: the cheaper


def test_choose_cheapest_reaching_a_target():
    from sparseattn.search import choose

    recall = torch.tensor([[0.80, 0.50], [0.92, 0.60], [0.99, 0.98]])
    cost = torch.tensor([[0.10, 0.10], [0.20, 0.20], [0.30, 0.50]])
    # Every head at 0.9: head 0 its cheapest reaching it, head 1 only the dearest reaches it.
    assert choose(recall, cost, 1.0, target_recall=0.9, scope="head")[0].tolist() == [1, 2]
    # The layer's mean at 0.75: head 1's jump to 0.98 for 0.4 is the best buy, head 0 stays cheap.
    assert choose(recall, cost, 1.0, target_recall=0.75)[0].tolist() == [0, 2]
    # The budget still binds: at 0.25 head 1 cannot take 0.98, so head 0 climbs instead.
    assert choose(recall, cost, 0.25, target_recall=0.75)[0].tolist() == [1, 1]
    assert choose(recall, cost, 0.25, target_recall=0.99, scope="head")[0].tolist() == [1, 1]  # none: best in budget
    with pytest.raises(ValueError, match="scope"):
        choose(recall, cost, 1.0, target_recall=0.9, scope="model")


class CharTokenizer:
    """Enough of a tokenizer for ``real_text_ids``: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


@pytest.fixture(scope="module")
def tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


def test_search_on_a_tiny_model(tiny_llama, tmp_path):
    from sparseattn.search import Candidate, measure_candidates, search_minference
    from sparseattn.bench.capture import capture_qkv, real_text_ids

    cands = [Candidate("vertical_and_slash", 8, 32), Candidate("a_shape", 16, 32), Candidate("block_sparse", 1, 0),
             Candidate("a_shape", 160, 160)]
    table = search_minference(tiny_llama, CharTokenizer(), length=160, candidates=cands, flops_budget=0.6,
                              block_size=16, last_q=16, layers=[0, 2], layers_per_pass=1, model_name="Tiny",
                              progress=False)
    assert sorted(table.layers) == [0, 2] and all(len(h) == 4 for h in table.layers.values())
    # Each head's choice is the best recall within budget, recomputed here.
    q, k, _ = capture_qkv(tiny_llama, real_text_ids(CharTokenizer(), 160), layers=[2])[2]
    recall, cost = measure_candidates(q, k, cands, last_q=16, block_size=16)
    for h, entry in enumerate(table.layers[2]):
        fits = [c for c in range(len(cands)) if cost[c, h] <= 0.6]
        best = max(fits, key=lambda c: (recall[c, h].item(), -cost[c, h].item()))
        assert list(entry) == cands[best].as_list()
        assert table.scores[2][h] == pytest.approx(recall[best, h].item())
    assert all(e != ("a_shape", 160, 160) for heads in table.layers.values() for e in heads)  # dense: over budget
    loaded = load_minference_patterns(table.save(tmp_path / "tiny.json"))
    assert loaded.layers == table.layers and loaded.search["summary"]["heads_over_budget"] == 0


def test_search_command(tiny_llama, tmp_path, monkeypatch, capsys):
    import argparse

    import sparseattn.models
    from sparseattn.search import add_search_parser, run_search

    monkeypatch.setattr(sparseattn.models, "load_llama", lambda *a, **kw: (tiny_llama, CharTokenizer()))
    parser = argparse.ArgumentParser()
    add_search_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "t.json"
    args = parser.parse_args(["search", "--model", "my/Tiny.gguf", "--tokens", "128", "--budget", "0.5",
                              "--block-size", "16", "--last-q", "16", "--layers", "1", "--out", str(out)])
    assert args.func is run_search and run_search(args) == 0
    table = load_minference_patterns(out)
    assert table.model == "Tiny" and sorted(table.layers) == [1]
    assert table.search["command"] == ("sparseattn search --model my/Tiny.gguf --tokens 128 --budget 0.5 "
                                       "--block-size 16 --last-q 16 --layers 1")
    assert "wrote" in capsys.readouterr().out
    assert table.search["rule"] == "highest recall within the budget"
    # The recall-target rule: the layer's mean recall reaches the target, at the least mean cost.
    args = parser.parse_args(["search", "--model", "my/Tiny.gguf", "--tokens", "128", "--target-recall", "0.8",
                              "--block-size", "16", "--last-q", "16", "--layers", "1", "--out", str(out),
                              "--budget", "1"])
    assert run_search(args) == 0
    table = load_minference_patterns(out)
    assert table.search["rule"] == "cheapest within the budget keeping recall 0.8 as the mean over each layer's heads"
    assert "--target-recall 0.8 --target-scope layer" in table.search["command"]
    recalls = table.scores[1]  # each head's calibration recall (rounded to 6 digits in the file)
    assert sum(recalls) / len(recalls) >= 0.8 - 1e-6


# ---- GPU: large shapes ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("L", [16384, 32768 + 77])
def test_gpu_select_equals_reference(L):
    q, k, v = make_qkv(1, 8, 2, L, L, 128, seed=13, dtype=torch.bfloat16)
    kwargs = dict(vertical_size=1000, slash_size=2048, last_q=64, block_size=64)
    fast = minference_select_fast(q, k, **kwargs)
    ref = minference_select(q, k, **kwargs)
    ref_v, ref_s, _ = last_query_scores(q, k, 64)
    vertical, slash, _ = last_query_scores_fast(q, k, 64)
    torch.testing.assert_close(vertical, ref_v, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(slash, ref_s, rtol=1e-4, atol=1e-6)
    # Exact equality wherever the reference's cut has no near-tie; rows of tied heads may differ.
    same = torch.ones(fast.range_counts.shape[:2], dtype=torch.bool, device=q.device)
    for name in INDEX_FIELDS:
        a, b = getattr(fast, name), getattr(ref, name)
        same &= (a == b).flatten(2).all(-1)
    assert same.float().mean().item() >= 0.95
    # The kernel over the fast index matches SDPA over the same element mask, on the last 8 query blocks.
    out = vertical_slash_attention(q, k, v, fast)
    first = (fast.range_counts.shape[-1] - 8) * 64
    tail = VerticalSlashIndex(*(getattr(fast, name)[:, :, -8:] for name in INDEX_FIELDS), 64, 64, L - first, L)
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, first:].float(), repeat_kv(k, 4).float(), repeat_kv(v, 4).float(), attn_mask=tail.to_element_mask())
    assert ((out[:, :, first:].float() - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("runs", [1, 16], ids=["window", "runs-of-16"])
def test_gpu_vertical_slash_sums_match_reference(runs, monkeypatch):
    """Both sums kernels at 32K + 77 on the GPU (the default launch would pick one block a program at
    this size), against the fp32 reference."""
    import sparseattn.kernels.minference_index as MI

    monkeypatch.setattr(MI, "SUMS_LOOP", runs > 1)
    monkeypatch.setattr(MI, "SUMS_PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(MI, "SUMS_MAX_BLOCKS", runs)
    q, k, _ = make_qkv(1, 8, 2, 32768 + 77, 32768 + 77, 128, seed=14, dtype=torch.bfloat16)
    for causal in (True, False):
        vertical, slash, _ = last_query_scores_fast(q, k, 64, causal)
        ref_v, ref_s, _ = last_query_scores(q, k, 64, causal)
        torch.testing.assert_close(vertical, ref_v, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(slash, ref_s, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("ns", [1100, 6196, 16384])
def test_gpu_cluster_tables_kernels_match_torch_builders(ns):
    """The two cluster-table kernels at 128K + 77 (up to ``MAX_SCAN_OFFSETS`` slashes a head, the
    register-heavy scan compiled for the GPU) against the torch builders, entry for entry."""
    from sparseattn.kernels.minference_index import (_block_params, _cluster_tables, _cluster_tables_triton,
                                                     _top_sorted)

    L, bs = 131072 + 77, 64
    _, slash = structured_scores(1, 4, L, bs, seed=ns)
    slash = slash.to(DEVICE)
    slash[..., :100] = float("inf")
    offsets = _top_sorted(slash, [ns, ns // 2, ns, 7], 1 << 40).contiguous()
    cid, o_min, n_before, n_tiles, tiles, cluster_map = _cluster_tables(offsets, bs, L)
    params = _block_params(offsets, cid, o_min, n_before, n_tiles, L - 1000, L, bs)
    got = _cluster_tables_triton(offsets, bs, L - 1000, L)
    for name, want, have in zip(("tiles", "cluster_map", "params"), (tiles, cluster_map, params), got):
        assert torch.equal(have, want), name


@pytest.mark.gpu
def test_gpu_row_top_k_matches_a_stable_sort():
    """``_row_top_k_kernel`` as compiled for the GPU (its default block and warps) at 128K + 77: the
    seed's sizes, a whole row, sizes inside the forced infinities, and rows of rounded scores (ties at
    every cut), against a stable sort."""
    from sparseattn.kernels.minference_index import _top_sorted_fast

    g = torch.Generator().manual_seed(16)
    L = 131072 + 77
    scores = torch.rand(1, 8, L, generator=g)
    scores[:, 4:] = (scores[:, 4:] * 64).round()
    scores[..., :100] = float("inf")
    sizes = [1030, 6196, 17, L, 1030, 6196, 5000, 100]
    got = _top_sorted_fast(scores.to(DEVICE), sizes, 1 << 40, torch.int64)
    assert torch.equal(got.cpu(), stable_top_sorted(scores, sizes, 1 << 40))


@pytest.mark.gpu
def test_gpu_select_with_the_top_k_kernel_equals_torch_top_k(monkeypatch):
    """``TOP_K_KERNEL`` on: the 32K + 77 selection equals the torch top-k's, head for head, wherever no
    tie sits at a cut (at least 95% of the heads)."""
    import sparseattn.kernels.minference_index as MI

    q, k, _ = make_qkv(1, 8, 2, 32768 + 77, 32768 + 77, 128, seed=17, dtype=torch.bfloat16)
    kwargs = dict(vertical_size=1000, slash_size=2048, last_q=64, block_size=64)
    off = minference_select_fast(q, k, **kwargs)
    monkeypatch.setattr(MI, "TOP_K_KERNEL", True)
    on = minference_select_fast(q, k, **kwargs)
    same = torch.ones(on.range_counts.shape[:2], dtype=torch.bool, device=q.device)
    for name in INDEX_FIELDS:
        a, b = getattr(on, name), getattr(off, name)
        assert a.shape == b.shape, name
        same &= (a == b).flatten(2).all(-1)
    assert same.float().mean().item() >= 0.95


@pytest.mark.gpu
def test_gpu_head_patterns_mix_rows_are_padded():
    """A per-head mix at 32K + 77 (GQA 8/2, wide and narrow vertical-slash heads beside A-shape and
    block-sparse ones), its index allocated poisoned: every entry past a row's count is -1."""
    patterns = [["vertical_and_slash", 1000, 6096], ["block_sparse", 64, 0], ["a_shape", 64, 512],
                ["vertical_and_slash", 128, 128], ["block_sparse", 16, 0], ["a_shape", 128, 8192],
                ["block_sparse", 256, 0], ["vertical_and_slash", 2048, 3072]]
    q, k, _ = make_qkv(1, 8, 2, 32768 + 77, 32768 + 77, 128, seed=15, dtype=torch.bfloat16)
    assert_padded(select_blocks(q, k, MInferenceConfig(head_patterns=patterns)), patterns)


@pytest.mark.gpu
@pytest.mark.parametrize("top_k", [16, 256])
def test_gpu_block_sparse_select_equals_reference(top_k):
    """The Triton top-k at 32K + 77 (bf16, GQA 8/2), chunked by rows (a head's 514 x 514 scores with a
    chunk of 2^17): rows equal to the reference's wherever no near-tie sits at the cut, and every row's
    kept blocks score as much as the reference's (a near-tie swaps blocks of equal score)."""
    import sparseattn.methods.minference as minference
    from sparseattn.reference.minference import block_mean_pool

    L, bs = 32768 + 77, 64
    q, k, _ = make_qkv(1, 8, 2, L, L, 128, seed=14, dtype=torch.bfloat16)
    ref = block_sparse_select(q, k, top_k=top_k, block_size=bs)
    for chunk in (1 << 22, 1 << 17):
        minference.BLOCK_SPARSE_CHUNK_ELEMENTS, saved = chunk, minference.BLOCK_SPARSE_CHUNK_ELEMENTS
        try:
            fast = block_sparse_select_fast(q, k, top_k=top_k, block_size=bs, backend="triton")
        finally:
            minference.BLOCK_SPARSE_CHUNK_ELEMENTS = saved
        width = ref.counts.max().item()
        same = (fast.indices[..., :width] == ref.indices[..., :width]).all(-1) & (fast.counts == ref.counts)
        assert same.float().mean().item() >= 0.99
        scores = block_mean_pool(q, bs) @ block_mean_pool(k, bs).repeat_interleave(4, 1).transpose(-1, -2)

        def kept(index):
            picked = scores.gather(-1, index.indices.clamp(min=0).long())
            return torch.where(index.indices >= 0, picked, 0.0).sum(-1)

        torch.testing.assert_close(kept(fast), kept(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["sparseattn.kernels.minference_index", "sparseattn.reference.minference",
                                  "sparseattn.search"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_backend", ["torch", "triton"])
def test_head_patterns_mix_rows_are_padded(block_backend, causal, monkeypatch):
    """A mix's index is allocated unfilled (poisoned here): every entry past a row's count is -1, and the
    heads of the block patterns have no columns. Widths differ by kind (the A-shape rows and the block
    rows narrower than the vertical-slash ranges, and wider), so each kind's tail is checked."""
    import sparseattn.methods.minference as minference

    monkeypatch.setattr(minference, "SELECT_BACKEND", block_backend)
    mixed = [["vertical_and_slash", 8, 16], ["block_sparse", 6, 0], ["a_shape", 16, 32],
             ["a_shape", 64, 128], ["block_sparse", 1, 0], ["vertical_and_slash", 4, 8]]
    # 64 queries over 3400 keys in 16-blocks (213 key blocks): the vertical-slash ranges (2 x 100
    # forced diagonals) are narrower than the wide A-shape rows, so their tails are -1 too.
    wide = [["vertical_and_slash", 8, 16], ["a_shape", 16, 3300], ["block_sparse", 2, 0], ["a_shape", 16, 32]]
    for (Lq, Lk, bs), patterns in (((300, 300, 32), HEAD_PATTERNS), ((300, 300, 32), mixed),
                                   ((64, 3400, 16), wide)):
        q, k, _ = make_qkv(1, len(patterns), len(patterns) // 2, Lq, Lk, 16, seed=21)
        cfg = MInferenceConfig(head_patterns=patterns, block_size=bs, last_q=16)
        assert_padded(select_blocks(q, k, cfg, causal=causal), patterns)


def assert_padded(index: VerticalSlashIndex, patterns):
    """Every entry past a row's count is -1 and none before it is; block-pattern heads have no columns;
    the kinds' rows differ in length (so each kind's tail is looked at)."""
    for rows, counts in ((index.range_starts, index.range_counts), (index.columns, index.column_counts)):
        assert (counts >= 0).all() and (counts <= rows.shape[-1]).all()
        past = torch.arange(rows.shape[-1], device=rows.device) >= counts[..., None]
        assert (rows[past] == -1).all() and (rows[~past] >= 0).all()
    for h, (p, *_) in enumerate(patterns):
        if p != "vertical_and_slash":
            assert (index.column_counts[:, h] == 0).all(), h
    widths = {p: int(index.range_counts[:, h].max()) for h, (p, *_) in enumerate(patterns)}
    assert len(set(widths.values())) > 1, widths
