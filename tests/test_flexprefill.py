"""FlexPrefill: the fp32 reference against a brute-force loop version, and the Triton fast path
(``sparseattn.kernels.flexprefill``) against the reference, stage by stage and end to end.

Without CUDA the kernels run in the Triton interpreter (conftest.py) on small awkward shapes; every
kernel output is allocated NaN-filled (``SPARSEATTN_NAN_FILL=1``; integer outputs -7) so a cell a
kernel forgets to write fails. Selections are compared exactly on seeded inputs whose decisions
are not near ties; ``gpu``-marked tests repeat the comparison at real sizes in bf16 and check that
the selection never synchronizes with the host.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from sparseattn import sparse_attention
from sparseattn.bench.inputs import llm_like_qkv
from sparseattn.index import causal_block_mask, cdiv, diagonal_block_range
from sparseattn.kernels import flexprefill as fast
from sparseattn.methods.flexprefill import FlexPrefillConfig, Flexprefill_prefill, flexprefill_fidelity, select_blocks
from sparseattn.reference import flexprefill as ref
from sparseattn.reference.attention import reference_attention
from sparseattn.reference.minference import block_mean_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    monkeypatch.setenv(fast.NAN_FILL_ENV, "1")
    torch.backends.cuda.matmul.allow_tf32 = False


def make_qk(B, Hq, Hkv, Lq, Lk, D, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    return q.to(device), k.to(device)


def planted_qk(B, Hq, Hkv, L, D, bs, seed=0, device="cpu"):
    """Even KV heads attend to whole key blocks (query-aware), odd ones to single keys (vertical-slash)."""
    g = torch.Generator().manual_seed(seed)
    G = Hq // Hkv
    q = 0.3 * torch.randn(B, Hkv, G, L, D, generator=g)
    k = 0.3 * torch.randn(B, Hkv, L, D, generator=g)
    for h in range(Hkv):
        u = torch.nn.functional.normalize(torch.randn(B, 1, D, generator=g), dim=-1)
        q[:, h] += 3 * u[:, None]
        if h % 2 == 0:  # the pooled estimate sees these blocks as well as the exact softmax does
            for blk in torch.randperm(cdiv(L, bs), generator=g)[:2].tolist():
                k[:, h, blk * bs:(blk + 1) * bs] += 5 * u
        else:  # pooling dilutes single keys away
            cols = torch.randperm(L, generator=g)[:3]
            k[:, h, cols] += 12 * u
    return q.reshape(B, Hq, L, D).to(device), k.to(device)


# ---- the reference against a brute-force loop version ---------------------------------------------


def brute_flexprefill(q, k, *, gamma, tau, min_budget=None, max_budget=None, bs, ratio=None, causal=True):
    """Loops over heads, rows and keys in float64, straight from the docstring's six steps."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, n, off = Hq // Hkv, min(bs, Lq), Lk - Lq
    nq, nk = cdiv(Lq, bs), cdiv(Lk, bs)
    mask = torch.zeros(B, Hq, nq, nk, dtype=torch.bool)
    aware = torch.zeros(B, Hq, dtype=torch.bool)

    def cover(values):
        if gamma >= 1:
            return len(values)
        cum, count = 0.0, 0
        for x in sorted(values, reverse=True):
            cum += x
            count += 1
            if cum >= gamma:
                return count
        return len(values)

    def top(scores, count):
        return set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:count])

    for b in range(B):
        for h in range(Hq):
            qh, kh = q[b, h].double(), k[b, h // G].double()
            probs = []
            for t in range(n):
                s = kh @ qh[Lq - n + t] / math.sqrt(D)
                if causal:
                    s[Lk - n + t + 1:] = -math.inf
                probs.append(torch.softmax(s, 0))
            vertical = [sum(float(p[j]) for p in probs) / n for j in range(Lk)]
            slash = {}
            for t, p in enumerate(probs):
                for j in range(Lk):
                    o = Lk - n + t - j
                    slash[o] = slash.get(o, 0.0) + float(p[j]) / n
            if causal:
                slash = {o: x for o, x in slash.items() if o >= 0}
            k_pool = torch.stack([kh[i * bs:(i + 1) * bs].mean(0) for i in range(nk)])
            q_pool = torch.stack([qh[i * bs:(i + 1) * bs].mean(0) for i in range(nq)])
            est = torch.softmax(k_pool @ qh[Lq - n:].mean(0) / math.sqrt(D), 0).tolist()
            v_blocks = [sum(vertical[i * bs:(i + 1) * bs]) for i in range(nk)]
            js = 0.0
            for a, c in zip(est, v_blocks):
                m = (a + c) / 2
                js += 0.5 * (a * math.log(a / m) if a > 0 else 0) + 0.5 * (c * math.log(c / m) if c > 0 else 0)
            aware[b, h] = math.sqrt(max(js, 0)) < tau
            g_min = min(slash) // bs
            groups = [0.0] * ((Lk - 1) // bs - g_min + 1)
            for o, x in slash.items():
                groups[o // bs - g_min] += x
            floor = math.ceil(min_budget / bs) if min_budget else 0
            counts = []
            for tokens, size in ((cover(vertical), nk), (cover(list(slash.values())), len(groups))):
                c = max(math.ceil(tokens / bs), floor)
                if max_budget is not None:
                    c = min(c, math.ceil(max_budget / bs))
                counts.append(min(floor if aware[b, h] else c, size))
            v_sel = top([math.inf] + v_blocks[1:], counts[0])
            s_sel = {g + g_min for g in top([x if g + g_min != 0 else math.inf for g, x in enumerate(groups)],
                                            counts[1])}
            for r in range(nq):
                positions = range(off + r * bs, off + min((r + 1) * bs, Lq))
                p0, p1 = positions[0], positions[-1]
                allowed = [not causal or c * bs <= p1 for c in range(nk)]
                forced = [allowed[c] and (c == 0 or p0 // bs <= c <= p1 // bs) for c in range(nk)]
                scores = torch.tensor([float(q_pool[r] @ k_pool[c]) / math.sqrt(D) if allowed[c] else -math.inf
                                       for c in range(nk)], dtype=torch.float64)
                pooled = torch.softmax(scores, 0).tolist()
                covered, running = set(), 0.0
                for c in sorted((c for c in range(nk) if allowed[c]), key=lambda c: (-pooled[c], c)):
                    if gamma >= 1 or running < gamma * sum(pooled):
                        covered.add(c)
                    running += pooled[c]
                keep = []
                for c in range(nk):
                    offsets = {p - key for p in positions for key in range(c * bs, min((c + 1) * bs, Lk))}
                    hit = c in v_sel or any(o // bs in s_sel for o in offsets)
                    if (hit or (aware[b, h] and c in covered)) and allowed[c] and not forced[c]:
                        keep.append(c)
                if ratio is not None:
                    room = max(math.ceil(ratio * sum(allowed)) - sum(forced), 0)
                    keep = sorted(keep, key=lambda c: (-pooled[c], c))[:room]
                for c in range(nk):
                    mask[b, h, r, c] = c in keep or forced[c]
    return mask, aware


BRUTE_CASES = [  # B, Hq, Hkv, Lq, Lk, D, bs, causal
    pytest.param(1, 4, 2, 70, 70, 8, 16, True, id="B1-H4-HKV2-L70-D8-bs16"),
    pytest.param(2, 2, 2, 37, 70, 8, 8, True, id="B2-H2-HKV2-Lq37-Lk70-D8-bs8"),
    pytest.param(1, 3, 1, 45, 45, 8, 12, False, id="B1-H3-HKV1-L45-D8-bs12-noncausal"),
    pytest.param(1, 2, 1, 1, 33, 8, 16, True, id="B1-H2-HKV1-Lq1-Lk33-D8-bs16"),
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bs,causal", BRUTE_CASES)
@pytest.mark.parametrize("options", [
    pytest.param(dict(gamma=0.9, tau=0.1), id="default"),
    pytest.param(dict(gamma=0.6, tau=10.0, ratio=0.4), id="query-aware-capped"),
    pytest.param(dict(gamma=0.95, tau=0.0, min_budget=20, max_budget=30), id="budgets"),
])
def test_reference_matches_brute_force(B, Hq, Hkv, Lq, Lk, D, bs, causal, options):
    q, k = planted_qk(B, Hq, Hkv, Lk, D, bs, seed=3)
    q = q[:, :, Lk - Lq:]
    ratio = options.pop("ratio", None)
    expected, aware = brute_flexprefill(q, k, bs=bs, ratio=ratio, causal=causal, **options)
    index, query_aware = ref.flexprefill_select(q, k, block_size=bs, sparsity_ratio=ratio, causal=causal,
                                                return_patterns=True, **options)
    assert torch.equal(query_aware, aware)
    assert torch.equal(index.to_mask(), expected)


def test_reference_slash_group_keeps_every_block_its_offsets_cross():
    """A purely local head (offsets 0..bs-1): the diagonal and the previous block, nothing else."""
    D, L, bs = 16, 256, 32
    q = torch.zeros(1, 1, L, D)
    k = torch.zeros(1, 1, L, D)
    # Score 20 for keys 0..3 positions back, 0 elsewhere: a local window well inside one group.
    angle = torch.arange(L)[:, None] * (2 * math.pi / 64) * torch.arange(1, D // 2 + 1)[None, :] / (D // 2)
    code = torch.cat([angle.cos(), angle.sin()], -1)
    q[0, 0], k[0, 0] = code * 2.0, code * 2.0
    mask = ref.flexprefill_select(q, k, gamma=0.5, tau=0.0, block_size=bs).to_mask()[0, 0]
    rows = torch.arange(mask.shape[0])
    assert mask[rows, rows].all() and mask[rows[1:], rows[1:] - 1].all()


def test_plan_converts_token_counts_by_ceil_and_ranks_block0_first():
    """``ceil(n / bs)`` blocks (the public reference: ``n // 128 + 1``), key block 0 and group 0 first."""
    mass = torch.tensor([[[0.1, 0.5, 0.2, 0.15, 0.05]]])
    uniform = torch.full_like(mass, 0.2)

    def plan(tokens, **budgets):
        n = torch.tensor([[tokens]])
        return ref.plan_heads(mass, mass.flip(-1), n, n, uniform, tau=0.0, block_size=32, slash_group0=2,
                              min_budget=budgets.get("min_budget"), max_budget=budgets.get("max_budget"))

    for tokens, v_want, s_want in ((1, [1, 0, 0, 0, 0], [0, 0, 1, 0, 0]), (32, [1, 0, 0, 0, 0], [0, 0, 1, 0, 0]),
                                   (33, [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]), (64, [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]),
                                   (65, [1, 1, 1, 0, 0], [0, 1, 1, 1, 0])):
        aware, v_sel, s_sel = plan(tokens)
        assert not aware.any()
        assert v_sel[0, 0].int().tolist() == v_want and s_sel[0, 0].int().tolist() == s_want, tokens
    assert plan(65, max_budget=40)[1][0, 0].int().tolist() == [1, 1, 0, 0, 0]  # ceil(40 / 32) = 2 blocks
    assert plan(1, min_budget=70)[1][0, 0].int().tolist() == [1, 1, 1, 0, 0]  # ceil(70 / 32) = 3 blocks


# ---- fast path, stage by stage ---------------------------------------------------------------------

SHAPES = [  # B, Hq, Hkv, Lq, Lk, D, bs, causal
    pytest.param(1, 2, 1, 100, 100, 16, 32, True, id="B1-H2-HKV1-L100-D16-bs32"),
    pytest.param(2, 4, 2, 70, 150, 32, 16, True, id="B2-H4-HKV2-Lq70-Lk150-D32-bs16"),
    pytest.param(1, 3, 3, 37, 100, 24, 32, False, id="B1-H3-HKV3-Lq37-Lk100-D24-bs32-noncausal"),
    pytest.param(1, 3, 1, 1, 63, 16, 16, True, id="B1-H3-HKV1-Lq1-Lk63-D16-bs16"),
    pytest.param(1, 1, 1, 1, 1, 16, 16, True, id="B1-H1-HKV1-L1-D16-bs16"),
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bs,causal,block_m,block_n", [
    pytest.param(1, 2, 1, 100, 100, 16, 32, True, 16, 16, id="B1-H2-HKV1-L100-D16-bs32-m16n16"),
    pytest.param(2, 4, 2, 70, 150, 32, 64, True, 32, 16, id="B2-H4-HKV2-Lq70-Lk150-D32-bs64-m32n16"),
    pytest.param(1, 3, 3, 37, 100, 24, 32, False, 16, 32, id="B1-H3-HKV3-Lq37-Lk100-D24-bs32-noncausal-m16n32"),
    pytest.param(2, 2, 1, 50, 90, 16, 64, False, 16, 16, id="B2-H2-HKV1-Lq50-Lk90-D16-bs64-noncausal-m16n16"),
    pytest.param(1, 3, 1, 1, 63, 16, 16, True, 16, 16, id="B1-H3-HKV1-Lq1-Lk63-D16-bs16-m16n16"),
    pytest.param(1, 2, 2, 130, 130, 16, 128, True, None, None, id="B1-H2-HKV2-L130-D16-bs128-defaults"),
])
@pytest.mark.parametrize("stat_tiles", [1, 3], ids=["stat1", "stat3"])
def test_last_block_distributions_match_reference(B, Hq, Hkv, Lq, Lk, D, bs, causal, block_m, block_n, stat_tiles):
    """Several key tiles, several row groups (``n > block_m``), partial tiles, non-causal offsets;
    the first pass with one or three key tiles per program (a partial last chunk)."""
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, seed=1, device=DEVICE)
    vertical, slash, min_offset = fast.last_block_distributions_fast(q, k, bs, causal, block_m=block_m,
                                                                     block_n=block_n, stat_tiles=stat_tiles)
    v_ref, s_ref, off_ref = ref.last_block_distributions(q, k, bs, causal)
    assert min_offset == off_ref and slash.shape == s_ref.shape
    torch.testing.assert_close(vertical, v_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(slash, s_ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(slash.sum(-1), torch.ones((), device=DEVICE), atol=1e-5)


@pytest.mark.parametrize("L,bs,D", [(100, 32, 16), (63, 16, 24), (1, 16, 32), (300, 128, 16)])
def test_block_mean_matches_reference(L, bs, D):
    x = torch.randn(2, 3, L, D, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    want = block_mean_pool(x, bs)
    torch.testing.assert_close(fast.block_mean(x, bs), want, rtol=1e-6, atol=1e-6)
    heads = torch.tensor([[True, False, True], [False, False, True]], device=DEVICE)
    some = fast.block_mean(x, bs, heads=heads)  # the other heads are zeros, never read
    torch.testing.assert_close(some[heads], want[heads], rtol=1e-6, atol=1e-6)
    assert (some[~heads] == 0).all()


def test_cover_count_matches_reference():
    g = torch.Generator().manual_seed(5)
    mass = torch.softmax(3 * torch.randn(4, 3, 1000, generator=g), -1).to(DEVICE)
    mass[0, 0, 500:] = 0  # zeros never count toward the cover
    for gamma in (0.1, 0.5, 0.9, 0.99, 1.0):
        assert torch.equal(fast.cover_count_fast(mass, gamma), ref.cover_count(mass, gamma)), gamma
    uniform = torch.full((2, 200), 1 / 200, device=DEVICE)  # all entries tie: ceil(gamma * n)
    assert fast.cover_count_fast(uniform, 0.5).tolist() == ref.cover_count(uniform, 0.5).tolist() == [100, 100]
    short = torch.full((1, 10), 0.05, device=DEVICE)  # sums to 0.5 < gamma: every entry
    assert fast.cover_count_fast(short, 0.9).tolist() == ref.cover_count(short, 0.9).tolist() == [10]
    both = fast.cover_counts_fast([mass[1], short, mass[2, :2, :700]], 0.9)  # one launch, ragged lengths
    for got, want in zip(both, (mass[1], short, mass[2, :2, :700])):
        assert torch.equal(got, ref.cover_count(want, 0.9))


# ---- fast path end to end ----------------------------------------------------------------------------


def assert_same_index(got, want):
    """Equal counts and entries; the fast index may be narrower (capped rows), padded with -1."""
    width = got.indices.shape[-1]
    assert (got.block_q, got.block_k, got.q_len, got.k_len) == (want.block_q, want.block_k, want.q_len, want.k_len)
    assert torch.equal(got.counts.cpu(), want.counts.cpu())
    assert torch.equal(got.indices.cpu(), want.indices[..., :width].cpu())
    assert (want.indices[..., width:] == -1).all()


CASES = [  # shape, options
    pytest.param(*SHAPES[0].values, dict(), id="defaults-B1-H2-HKV1-L100-D16-bs32"),
    pytest.param(*SHAPES[1].values, dict(), id="defaults-B2-H4-HKV2-Lq70-Lk150-D32-bs16"),
    pytest.param(*SHAPES[2].values, dict(tau=0.0, gamma=0.95), id="vertical-slash-B1-H3-HKV3-Lq37-Lk100-D24-noncausal"),
    pytest.param(*SHAPES[1].values, dict(tau=10.0, gamma=0.7, sparsity_ratio=0.3), id="query-aware-capped-B2-H4-HKV2"),
    pytest.param(*SHAPES[2].values, dict(tau=10.0, gamma=0.8), id="query-aware-B1-H3-HKV3-noncausal"),
    pytest.param(*SHAPES[0].values, dict(gamma=1.0, tau=0.5), id="gamma1-B1-H2-HKV1-L100"),
    pytest.param(*SHAPES[1].values, dict(min_budget=40, max_budget=70, sparsity_ratio=0.6), id="budgets-capped-B2-H4"),
    pytest.param(*SHAPES[3].values, dict(tau=10.0, sparsity_ratio=0.5), id="query-aware-capped-Lq1-Lk63"),
    pytest.param(*SHAPES[4].values, dict(tau=10.0), id="query-aware-L1"),
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bs,causal,options", CASES)
def test_fast_selection_equals_reference(B, Hq, Hkv, Lq, Lk, D, bs, causal, options):
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, seed=7, device=DEVICE)
    got, got_aware = fast.flexprefill_select_fast(q, k, block_size=bs, causal=causal, return_patterns=True, **options)
    want, want_aware = ref.flexprefill_select(q, k, block_size=bs, causal=causal, return_patterns=True, **options)
    assert torch.equal(got_aware, want_aware)
    assert_same_index(got, want)


@pytest.mark.parametrize("source", ["planted", "llm_like"])
def test_fast_pattern_decisions_equal_reference(source):
    """Structured inputs with both kinds of heads: the per-head decisions and the blocks agree."""
    # tau sits between the two kinds of heads' sqrt-JS values (~0.25 vs ~0.45 planted, 0.25-0.28 vs
    # 0.39-0.48 LLM-like), so no decision is a near tie.
    if source == "planted":
        q, k = planted_qk(1, 8, 4, 400, 32, 32, seed=11, device=DEVICE)
        options = dict(tau=0.35)
    else:
        q, k, _ = llm_like_qkv(1, 8, 4, 1000, 32, dtype=torch.float32, device=DEVICE, seed=3)
        options = dict(tau=0.33, gamma=0.95)
    got, got_aware = fast.flexprefill_select_fast(q, k, block_size=32, return_patterns=True, **options)
    want, want_aware = ref.flexprefill_select(q, k, block_size=32, return_patterns=True, **options)
    assert want_aware.any() and not want_aware.all(), "the input must hold both kinds of heads"
    assert torch.equal(got_aware, want_aware)
    assert_same_index(got, want)


def test_fast_index_is_well_formed():
    q, k = planted_qk(1, 4, 2, 333, 16, 32, seed=12, device=DEVICE)
    index = fast.flexprefill_select_fast(q, k, block_size=32, sparsity_ratio=0.5)
    width = index.indices.shape[-1]
    valid = torch.arange(width, device=index.indices.device) < index.counts[..., None]
    assert (index.indices[~valid] == -1).all() and (index.indices[valid] >= 0).all()
    assert (index.indices[..., 1:] > index.indices[..., :-1])[valid[..., 1:]].all()
    mask = index.to_mask().cpu()
    first, last = diagonal_block_range(333, 333, 32, 32)
    rows = torch.arange(mask.shape[2])
    assert mask[..., 0].all() and mask[:, :, rows, first].all() and mask[:, :, rows, last].all()
    assert not (mask & ~causal_block_mask(333, 333, 32, 32)).any()


def test_fast_path_docstrings_run():
    for module in (fast, ref):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0


# ---- method, API, fidelity ----------------------------------------------------------------------------


def test_method_output_is_attention_over_the_reference_selection():
    q, k = planted_qk(1, 4, 2, 200, 32, 32, seed=13)
    v = torch.randn(1, 2, 200, 32, generator=torch.Generator().manual_seed(1))
    index = select_blocks(q, k, FlexPrefillConfig(block_size=32))
    out, stats = sparse_attention(q, k, v, method="flexprefill", block_size=32, return_stats=True)
    assert torch.equal(stats.index.to_mask(), index.to_mask())
    expected = reference_attention(q, k, v, mask=index.to_element_mask())
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5
    seed_api = Flexprefill_prefill(q, k, v)  # the seed's defaults: block 64, sparsity_ratio 0.2
    assert seed_api.shape == q.shape and torch.isfinite(seed_api).all()


def test_default_block_size_is_128():
    assert FlexPrefillConfig().block_size == 128


def test_fidelity_reports_every_layer_and_grows_with_gamma():
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 2048), generator=torch.Generator().manual_seed(0))
    rows = flexprefill_fidelity(model, ids, gammas=(0.9, 0.95), layers=[0, 2])
    assert [(r["layer"], r["gamma"]) for r in rows] == [(0, 0.9), (0, 0.95), (2, 0.9), (2, 0.95)]
    for low, high in (rows[0:2], rows[2:4]):
        assert len(low["recall"]) == 4
        # The selection at 0.95 contains the one at 0.9: never less mass, never fewer blocks.
        assert all(b >= a - 1e-6 for a, b in zip(low["recall"], high["recall"]))
        assert all(b >= a for a, b in zip(low["density"], high["density"]))
        assert all(0 < r <= 1 + 1e-6 for r in low["recall"] + high["recall"])
        assert all(e >= 0 for e in low["rel_error"])


# ---- GPU: real sizes, bf16, no host synchronization -------------------------------------------------


def sqrt_js(q, k, bs):
    """The reference's per-head pattern statistic (step 2), to tell near ties from disagreements."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    vertical, _, _ = ref.last_block_distributions(q, k, bs)
    k_pool = block_mean_pool(k, bs)
    q_hat = q[:, :, Lq - min(bs, Lq):].float().mean(2).reshape(B, Hkv, Hq // Hkv, D)
    estimate = torch.softmax(torch.matmul(q_hat, k_pool.transpose(-1, -2)) / math.sqrt(D), dim=-1)
    return ref.sqrt_js_divergence(estimate.reshape(B, Hq, -1), ref.sum_pool(vertical, 0, bs, cdiv(Lk, bs)))


@pytest.mark.gpu
@pytest.mark.parametrize("L,bs", [(8192 + 77, 128), (16384, 64)])
def test_gpu_fast_selection_agrees_with_reference_bf16(L, bs):
    q, k, _ = llm_like_qkv(1, 32, 8, L, 128, device="cuda", seed=0)
    got, got_aware = fast.flexprefill_select_fast(q, k, block_size=bs, return_patterns=True)
    want, want_aware = ref.flexprefill_select(q, k, block_size=bs, return_patterns=True)
    clear = (sqrt_js(q, k, bs) - 0.1).abs() > 1e-4  # decisions farther than float noise from tau
    assert clear.float().mean() > 0.8 and torch.equal(got_aware[clear], want_aware[clear])
    same = want_aware == got_aware
    agree = (got.to_mask() == want.to_mask())[same].float().mean().item()
    assert agree > 0.999, agree  # bf16 inputs, fp32 accumulation in a different order: rare near-ties


@pytest.mark.gpu
def test_gpu_selection_never_synchronizes():
    q, k, _ = llm_like_qkv(2, 8, 2, 4096 + 13, 128, device="cuda", seed=1)
    fast.flexprefill_select_fast(q, k, sparsity_ratio=0.3)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast.flexprefill_select_fast(q, k, sparsity_ratio=0.3)
        fast.flexprefill_select_fast(q, k)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_fidelity_on_the_embedded_model():
    from sparseattn.bench.capture import real_text_ids
    from sparseattn.models import load_llama

    model, tokenizer = load_llama(None, device="cuda")
    rows = flexprefill_fidelity(model, real_text_ids(tokenizer, 2048).cuda(), layers=[3, 15, 27])
    for r in rows:
        assert sum(r["recall"]) / len(r["recall"]) > 0.85, r
