"""Tests of the fp32 reference selectors in ``sparseattn.reference``.

Brute-force loop versions written plainly here check the vectorised references on tiny cases;
hand-made inputs check the semantics; hypothesis checks the invariants every index must hold.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseattn.index import causal_block_mask, diagonal_block_range
from sparseattn.reference import (
    a_shape_select,
    block_sparse_select,
    flexprefill_select,
    minference_select,
    streaming_select,
    xattention_block_mass,
    xattention_select,
)


def make_qk(B, Hq, Hkv, Lq, Lk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)


def repeat_kv(k, groups):
    return k.repeat_interleave(groups, dim=1)  # fine in tests: the references never do this


def check_block_index(idx, causal=True):
    """Invariants of every reference BlockIndex: ascending, -1 padded, block 0 + diagonal, causal."""
    B, H, nq, width = idx.indices.shape
    valid = torch.arange(width) < idx.counts[..., None]
    assert (idx.indices[~valid] == -1).all()
    assert (idx.indices[valid] >= 0).all()
    diffs = idx.indices[..., 1:] - idx.indices[..., :-1]
    assert (diffs[valid[..., 1:]] > 0).all(), "valid entries must be strictly ascending"
    mask = idx.to_mask()
    assert (idx.counts > 0).all()
    assert mask[..., 0].all(), "key block 0 must always be kept"
    first, last = diagonal_block_range(idx.q_len, idx.k_len, idx.block_q, idx.block_k)
    cols = torch.arange(idx.num_k_blocks)
    diagonal = (cols[None] >= first[:, None]) & (cols[None] <= last[:, None])
    assert (mask | ~diagonal).all(), "diagonal blocks must always be kept"
    allowed = causal_block_mask(idx.q_len, idx.k_len, idx.block_q, idx.block_k, causal)
    assert not (mask & ~allowed).any(), "only allowed blocks may be selected"
    # Every query row computes at least its own key (no empty softmax row).
    elem = idx.to_element_mask(causal)
    assert elem.any(-1).all()
    return mask


SHAPES = [  # B, Hq, Hkv, Lq, Lk, D, bs
    pytest.param(1, 1, 1, 1, 1, 16, 16, id="B1-H1-HKV1-L1-D16-bs16"),
    pytest.param(1, 2, 1, 63, 63, 16, 16, id="B1-H2-HKV1-L63-D16-bs16"),
    pytest.param(2, 4, 2, 1000, 1000, 64, 64, id="B2-H4-HKV2-L1000-D64-bs64"),
    pytest.param(1, 3, 1, 37, 100, 32, 16, id="B1-H3-HKV1-Lq37-Lk100-D32-bs16"),  # Lk-Lq not a block multiple
    pytest.param(2, 2, 2, 1, 70, 16, 32, id="B2-H2-HKV2-Lq1-Lk70-D16-bs32"),
]


# ---- streaming / A-shape -------------------------------------------------------------------------
def brute_streaming(q_len, k_len, sink, window, bs, causal):
    nq, nk = math.ceil(q_len / bs), math.ceil(k_len / bs)
    mask = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(q_len):
        pos = k_len - q_len + i
        for j in range(k_len):
            near = pos - window < j <= pos if causal else abs(pos - j) < window
            if (j < sink or near) and (j <= pos or not causal):
                mask[i // bs, j // bs] = True
            if j == 0 or j == pos:  # sink block and diagonal always
                mask[i // bs, j // bs] = True
    return mask


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("q_len,k_len,sink,window,bs", [
    (1, 1, 4, 8, 16), (63, 63, 4, 8, 16), (40, 130, 20, 30, 16), (100, 100, 0, 0, 32), (90, 200, 3, 17, 32)])
def test_streaming_matches_brute_force(q_len, k_len, sink, window, bs, causal):
    idx = streaming_select(q_len, k_len, 2, 3, sink=sink, window=window, block_size=bs, causal=causal)
    check_block_index(idx, causal)
    expected = brute_streaming(q_len, k_len, sink, window, bs, causal)
    assert torch.equal(idx.to_mask(), expected.expand(2, 3, -1, -1))


def test_a_shape_is_causal_streaming():
    a = a_shape_select(300, 500, 1, 2, sink=10, window=70, block_size=32)
    s = streaming_select(300, 500, 1, 2, sink=10, window=70, block_size=32, causal=True)
    assert torch.equal(a.to_mask(), s.to_mask())


# ---- XAttention ----------------------------------------------------------------------------------
def brute_xattention_mass(q, k, S, bs, causal):
    """Loop version of steps 1-3, in float64."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, off = Hq // Hkv, Lk - Lq
    nrq, nrk = math.ceil(Lq / S), math.ceil(Lk / S)
    mass = torch.zeros(B, Hq, math.ceil(Lq / bs), math.ceil(Lk / bs), dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            qh, kh = q[b, h].double(), k[b, h // G].double()
            for i in range(nrq):
                scores = []
                for j in range(nrk):
                    a = 0.0
                    for t in range(S):
                        qi, kj = i * S + S - 1 - t, j * S + t
                        if qi < Lq and kj < Lk:
                            a += float(qh[qi] @ kh[kj])
                    scores.append(a / (math.sqrt(D) * S))
                scores = torch.tensor(scores, dtype=torch.float64)
                if causal:
                    last = off + min(i * S + S, Lq) - 1
                    scores[torch.arange(nrk) * S > last] = -math.inf
                probs = torch.softmax(scores, 0)
                for j in range(nrk):
                    mass[b, h, i * S // bs, j * S // bs] += probs[j]
    return mass


def brute_keep(mass, allowed, forced, threshold):
    """Loop version of the keep rule for one row."""
    keep = [bool(f) for f in forced]
    row_mass = sum(float(m) for m, a in zip(mass, allowed) if a)
    running = sum(float(m) for m, f in zip(mass, forced) if f)
    others = sorted((j for j in range(len(mass)) if allowed[j] and not forced[j]), key=lambda j: (-float(mass[j]), j))
    for j in others:
        if threshold >= 1 or running < threshold * row_mass:
            keep[j] = True
        running += float(mass[j])
    return keep


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D", [
    pytest.param(1, 2, 1, 70, 70, 8, id="B1-H2-HKV1-L70-D8"),
    pytest.param(2, 2, 2, 37, 70, 8, id="B2-H2-HKV2-Lq37-Lk70-D8"),
    pytest.param(1, 1, 1, 5, 9, 8, id="B1-H1-HKV1-Lq5-Lk9-D8")])
def test_xattention_mass_and_selection_match_brute_force(B, Hq, Hkv, Lq, Lk, D, causal):
    S, bs = 4, 8
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, seed=1)
    mass = xattention_block_mass(q, k, stride=S, block_size=bs, causal=causal)
    expected = brute_xattention_mass(q, k, S, bs, causal)
    torch.testing.assert_close(mass.double(), expected, rtol=1e-5, atol=1e-6)
    allowed = causal_block_mask(Lq, Lk, bs, bs, causal)
    first, last = diagonal_block_range(Lq, Lk, bs, bs)
    cols = torch.arange(allowed.shape[1])
    forced = ((cols[None] >= first[:, None]) & (cols[None] <= last[:, None])) | (cols[None] == 0)
    for threshold in (0.3, 0.8, 0.95):
        got = xattention_select(q, k, threshold=threshold, stride=S, block_size=bs, causal=causal).to_mask()
        for b in range(B):
            for h in range(Hq):
                for r in range(allowed.shape[0]):
                    want = brute_keep(expected[b, h, r], allowed[r], forced[r], threshold)
                    assert got[b, h, r].tolist() == want, (threshold, b, h, r)


def test_xattention_selects_a_strong_key_block():
    torch.manual_seed(0)
    D, L, bs = 16, 256, 32
    u = torch.nn.functional.normalize(torch.randn(D), dim=0)
    q = 0.1 * torch.randn(1, 1, L, D) + 4 * u
    k = 0.1 * torch.randn(1, 1, L, D)
    k[:, :, 3 * bs:4 * bs] += 4 * u  # every query attends to key block 3
    mask = xattention_select(q, k, threshold=0.5, stride=8, block_size=bs).to_mask()[0, 0]
    assert mask[4:, 3].all()
    assert not mask[5:, 1:3].any() and not mask[6:, 4].any()  # weak far blocks stay out


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bs", SHAPES)
def test_xattention_semantics(B, Hq, Hkv, Lq, Lk, D, bs):
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D)
    stride = 8
    idx = xattention_select(q, k, threshold=0.9, stride=stride, block_size=bs)
    mask = check_block_index(idx)
    everything = xattention_select(q, k, threshold=1.0, stride=stride, block_size=bs).to_mask()
    assert torch.equal(everything, causal_block_mask(Lq, Lk, bs, bs).expand_as(everything))
    # GQA equals repeating K; batch elements are independent.
    repeated = xattention_select(q, repeat_kv(k, Hq // Hkv), threshold=0.9, stride=stride, block_size=bs)
    assert torch.equal(repeated.to_mask(), mask)
    for b in range(B):
        alone = xattention_select(q[b:b + 1], k[b:b + 1], threshold=0.9, stride=stride, block_size=bs)
        assert torch.equal(alone.to_mask()[0], mask[b])
    noncausal = xattention_select(q, k, threshold=1.0, stride=stride, block_size=bs, causal=False)
    check_block_index(noncausal, causal=False)
    assert noncausal.to_mask().all()


def test_xattention_per_head_threshold():
    q, k = make_qk(2, 4, 2, 300, 300, 32, seed=3)
    thresholds = torch.tensor([0.2, 0.6, 0.9, 1.0])
    mask = xattention_select(q, k, threshold=thresholds, stride=8, block_size=32).to_mask()
    for h, t in enumerate(thresholds.tolist()):
        alone = xattention_select(q, k, threshold=t, stride=8, block_size=32).to_mask()
        assert torch.equal(mask[:, h], alone[:, h])


def test_xattention_rejects_bad_arguments():
    q, k = make_qk(1, 2, 1, 64, 64, 16)
    with pytest.raises(ValueError, match="multiple of stride"):
        xattention_select(q, k, threshold=0.9, stride=16, block_size=40)
    with pytest.raises(ValueError, match="threshold"):
        xattention_select(q, k, threshold=torch.ones(3), stride=8, block_size=32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        xattention_select(q, make_qk(1, 3, 3, 64, 64, 16)[1], threshold=0.9, stride=8, block_size=32)


# ---- MInference ----------------------------------------------------------------------------------
def brute_last_q(q, k, n_last, causal):
    """Per (b, h): probabilities of the last n_last queries, via repeated K and a row loop."""
    Hq, Lq, D = q.shape[1], q.shape[2], q.shape[3]
    Lk = k.shape[2]
    kr = repeat_kv(k, Hq // k.shape[1])
    scores = q[:, :, Lq - n_last:] @ kr.transpose(-1, -2) / math.sqrt(D)
    pos = torch.arange(Lk - n_last, Lk)
    if causal:
        scores = scores.masked_fill(torch.arange(Lk)[None] > pos[:, None], -math.inf)
    return scores.softmax(-1), pos


def brute_minference_mask(q, k, vertical_size, slash_size, last_q, bs, causal=True):
    """Token mask from the same top-k verticals / slashes, ranges merged by a sequential loop."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    n = min(last_q, Lq)
    probs, pos = brute_last_q(q, k, n, causal)
    min_off = 0 if causal else 1 - n
    out = torch.zeros(B, Hq, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            vertical = probs[b, h].sum(0)
            slash = torch.zeros(Lk - min_off)
            for t in range(n):  # row t puts key j's probability on offset pos_t - j
                slot = pos[t] - torch.arange(Lk) - min_off
                keep = (slot >= 0) & (slot < len(slash))
                slash.index_add_(0, slot[keep], probs[b, h, t][keep])
            vertical[:30] = math.inf
            slash[-min_off:100 - min_off] = math.inf
            nv = min(Lk, max(vertical_size, min(30, Lk)))
            ns = min(len(slash), max(slash_size, min(100, Lk)))
            verticals = sorted(range(Lk), key=lambda j: (-float(vertical[j]), j))[:nv]
            offsets = [a + min_off for a in sorted(range(len(slash)), key=lambda a: (-float(slash[a]), a))[:ns]]
            for qb in range(math.ceil(Lq / bs)):
                p0, p1 = Lk - Lq + qb * bs, Lk - Lq + min((qb + 1) * bs, Lq) - 1
                starts = sorted(max(p1 - o - bs + 1, 0) for o in offsets if p1 - o >= 0 and p0 - o <= Lk - 1)
                tiles, anchor, prev, last_tile = set(), None, None, -1
                for s in starts:
                    if prev is None or s - prev >= 2 * bs:
                        anchor, last_tile = s, -1
                    for m in range((s - anchor) // bs, (s + bs - 1 - anchor) // bs + 1):
                        if m > last_tile and anchor + m * bs < Lk:
                            tiles.add(anchor + m * bs)
                    last_tile, prev = max(last_tile, (s + bs - 1 - anchor) // bs), s
                keys = torch.zeros(Lk, dtype=torch.bool)
                for t in tiles:
                    keys[t:t + bs] = True
                keys[verticals] = True
                out[b, h, qb * bs:(qb + 1) * bs] = keys
    if causal:
        qpos = torch.arange(Lq) + Lk - Lq
        out &= torch.arange(Lk)[None] <= qpos[:, None]
    return out


def check_vertical_slash_index(idx, causal=True):
    starts, columns = idx.range_starts.long(), idx.columns.long()
    r_valid = torch.arange(starts.shape[-1]) < idx.range_counts[..., None]
    c_valid = torch.arange(columns.shape[-1]) < idx.column_counts[..., None]
    assert (starts[~r_valid] == -1).all() and (columns[~c_valid] == -1).all()
    assert ((starts[r_valid] >= 0) & (starts[r_valid] < idx.k_len)).all()
    assert ((columns[c_valid] >= 0) & (columns[c_valid] < idx.k_len)).all()
    gaps = starts[..., 1:] - starts[..., :-1]
    assert (gaps[r_valid[..., 1:]] >= idx.block_k).all(), "ranges must be ascending and non-overlapping"
    assert ((columns[..., 1:] - columns[..., :-1])[c_valid[..., 1:]] > 0).all()
    col, start = columns[..., :, None], starts[..., None, :]
    inside = (col >= start) & (col < start + idx.block_k)
    assert not (inside & c_valid[..., :, None] & r_valid[..., None, :]).any(), "columns must lie outside ranges"
    elem = idx.to_element_mask(causal)
    qpos = torch.arange(idx.q_len) + idx.k_len - idx.q_len
    assert elem[..., 0].all(), "key 0 (forced vertical) must always be computed"
    assert elem[..., torch.arange(idx.q_len), qpos].all(), "the main diagonal must always be computed"
    return elem


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bs,vs,ss", [
    pytest.param(1, 2, 1, 300, 300, 16, 16, 40, 110, id="B1-H2-HKV1-L300-D16-bs16"),
    pytest.param(2, 2, 2, 77, 260, 16, 32, 35, 130, id="B2-H2-HKV2-Lq77-Lk260-D16-bs32"),
    pytest.param(1, 1, 1, 1, 1, 16, 16, 1000, 6096, id="B1-H1-HKV1-L1-D16-bs16"),
    pytest.param(1, 3, 1, 63, 63, 32, 16, 5, 5, id="B1-H3-HKV1-L63-D32-bs16")])
def test_minference_matches_brute_force(B, Hq, Hkv, Lq, Lk, D, bs, vs, ss, causal):
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, seed=2)
    idx = minference_select(q, k, vertical_size=vs, slash_size=ss, last_q=24, block_size=bs, causal=causal)
    elem = check_vertical_slash_index(idx, causal)
    assert torch.equal(elem, brute_minference_mask(q, k, vs, ss, 24, bs, causal))


def test_minference_gqa_batch_and_adaptive_budget():
    q, k = make_qk(2, 4, 2, 200, 400, 32, seed=4)
    kwargs = dict(vertical_size=50, slash_size=120, last_q=32, block_size=32)
    elem = minference_select(q, k, **kwargs).to_element_mask()
    assert torch.equal(minference_select(q, repeat_kv(k, 2), **kwargs).to_element_mask(), elem)
    for b in range(2):
        assert torch.equal(minference_select(q[b:b + 1], k[b:b + 1], **kwargs).to_element_mask()[0], elem[b])
    # 0.5 * 400 = 200 tokens: 40 verticals, 160 slashes.
    adaptive = minference_select(q, k, adaptive_budget=0.5, last_q=32, block_size=32)
    explicit = minference_select(q, k, vertical_size=40, slash_size=160, last_q=32, block_size=32)
    assert torch.equal(adaptive.to_element_mask(), explicit.to_element_mask())
    everything = minference_select(q, k, vertical_size=400, slash_size=400, last_q=32, block_size=32)
    qpos = torch.arange(200) + 200
    assert torch.equal(everything.to_element_mask()[0, 0], torch.arange(400)[None] <= qpos[:, None])


def brute_block_sparse(q, k, top_k, bs, causal):
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    kr = repeat_kv(k, Hq // k.shape[1])
    nq, nk = math.ceil(Lq / bs), math.ceil(Lk / bs)
    allowed = causal_block_mask(Lq, Lk, bs, bs, causal)
    first, last = diagonal_block_range(Lq, Lk, bs, bs)
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            for r in range(nq):
                qm = q[b, h, r * bs:(r + 1) * bs].mean(0)
                scores = [float(qm @ kr[b, h, c * bs:(c + 1) * bs].mean(0)) for c in range(nk)]
                ranked = sorted((c for c in range(nk) if allowed[r, c]), key=lambda c: (-scores[c], c))
                for c in ranked[:top_k] + [0] + list(range(int(first[r]), int(last[r]) + 1)):
                    out[b, h, r, c] = True
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bs", SHAPES)
def test_block_sparse_matches_brute_force(B, Hq, Hkv, Lq, Lk, D, bs, causal):
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, seed=5)
    idx = block_sparse_select(q, k, top_k=2, block_size=bs, causal=causal)
    check_block_index(idx, causal)
    assert torch.equal(idx.to_mask(), brute_block_sparse(q, k, 2, bs, causal))


# ---- FlexPrefill ---------------------------------------------------------------------------------
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bs", SHAPES)
def test_flexprefill_semantics(B, Hq, Hkv, Lq, Lk, D, bs):
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, seed=6)
    idx = flexprefill_select(q, k, gamma=0.9, tau=0.1, block_size=bs)
    mask = check_block_index(idx)
    allowed = causal_block_mask(Lq, Lk, bs, bs)
    for tau in (0.0, 10.0):  # all vertical-slash heads; all query-aware heads
        everything = flexprefill_select(q, k, gamma=1.0, tau=tau, block_size=bs).to_mask()
        assert torch.equal(everything, allowed.expand_as(everything))
    repeated = flexprefill_select(q, repeat_kv(k, Hq // Hkv), gamma=0.9, tau=0.1, block_size=bs)
    assert torch.equal(repeated.to_mask(), mask)
    for b in range(B):
        assert torch.equal(flexprefill_select(q[b:b + 1], k[b:b + 1], block_size=bs).to_mask()[0], mask[b])
    noncausal = flexprefill_select(q, k, gamma=0.9, tau=0.1, block_size=bs, causal=False)
    check_block_index(noncausal, causal=False)
    assert flexprefill_select(q, k, gamma=1.0, block_size=bs, causal=False).to_mask().all()


def test_flexprefill_pattern_decision():
    torch.manual_seed(0)
    D, L, bs = 32, 128, 16
    u = torch.nn.functional.normalize(torch.randn(D), dim=0)
    q = 0.1 * torch.randn(1, 2, L, D) + 4 * u
    k = 0.1 * torch.randn(1, 2, L, D)
    k[0, 0, 2 * bs:3 * bs] += 4 * u  # head 0: a whole key block the pooled estimate sees
    k[0, 1, 37] += 8 * u  # head 1: one strong column, diluted away by pooling
    idx, query_aware = flexprefill_select(q, k, gamma=0.9, tau=0.1, block_size=bs, return_patterns=True)
    assert query_aware.dtype == torch.bool and query_aware.tolist() == [[True, False]]
    mask = check_block_index(idx)
    assert mask[0, 0, 3:, 2].all() and mask[0, 1, 3:, 37 // bs].all()


def test_flexprefill_sparsity_ratio_cap():
    q, k = make_qk(2, 4, 2, 500, 700, 32, seed=7)
    bs, ratio = 32, 0.3
    mask = check_block_index(flexprefill_select(q, k, gamma=0.99, tau=0.1, block_size=bs, sparsity_ratio=ratio))
    allowed = causal_block_mask(500, 700, bs, bs)
    first, last = diagonal_block_range(500, 700, bs, bs)
    forced = (last - first + 1) + (first > 0).long()
    cap = torch.maximum(torch.ceil(ratio * allowed.sum(-1).double()).long(), forced)
    assert (mask.sum(-1) <= cap).all()
    uncapped = flexprefill_select(q, k, gamma=0.99, tau=0.1, block_size=bs).to_mask()
    assert not (mask & ~uncapped).any() and (uncapped.sum(-1) > cap).any()


def test_flexprefill_budget_clamps():
    q, k = make_qk(1, 2, 1, 400, 400, 32, seed=8)
    bs = 32
    allowed = causal_block_mask(400, 400, bs, bs)
    first, last = diagonal_block_range(400, 400, bs, bs)
    cols = torch.arange(allowed.shape[1])
    forced = ((cols[None] >= first[:, None]) & (cols[None] <= last[:, None])) | (cols[None] == 0)
    # One vertical and one slash: besides the forced blocks, one column block and two diagonal blocks.
    tight = flexprefill_select(q, k, gamma=0.99, tau=0.0, max_budget=1, block_size=bs).to_mask()
    assert ((tight & ~forced).sum(-1) <= 3).all()
    dense = flexprefill_select(q, k, gamma=0.1, tau=0.0, min_budget=400, block_size=bs).to_mask()
    assert torch.equal(dense, allowed.expand_as(dense))
    with pytest.raises(ValueError, match="min_budget"):
        flexprefill_select(q, k, min_budget=10, max_budget=5)


# ---- properties over random shapes -------------------------------------------------------------
@st.composite
def shapes(draw):
    B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Lk = draw(st.integers(1, 300))
    Lq = draw(st.integers(1, Lk))
    D, bs = draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32]))
    seed, causal = draw(st.integers(0, 2**16)), draw(st.booleans())
    return B, Hkv * G, Hkv, Lq, Lk, D, bs, seed, causal


@settings(max_examples=25, deadline=None)
@given(shapes(), st.floats(0.0, 1.0), st.floats(0.05, 1.0), st.floats(0.0, 0.5))
def test_block_selectors_hold_invariants(shape, threshold, gamma, tau):
    B, Hq, Hkv, Lq, Lk, D, bs, seed, causal = shape
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, seed)
    check_block_index(xattention_select(q, k, threshold=threshold, stride=8, block_size=bs, causal=causal), causal)
    check_block_index(flexprefill_select(q, k, gamma=gamma, tau=tau, block_size=bs, causal=causal,
                                         sparsity_ratio=0.5 if seed % 2 else None), causal)
    check_block_index(block_sparse_select(q, k, top_k=seed % 4, block_size=bs, causal=causal), causal)
    check_block_index(streaming_select(Lq, Lk, B, Hq, sink=seed % 40, window=seed % 70, block_size=bs,
                                       causal=causal), causal)


@settings(max_examples=25, deadline=None)
@given(shapes(), st.integers(1, 200), st.integers(1, 300))
def test_minference_holds_invariants(shape, vertical_size, slash_size):
    B, Hq, Hkv, Lq, Lk, D, bs, seed, causal = shape
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, seed)
    idx = minference_select(q, k, vertical_size=vertical_size, slash_size=slash_size, last_q=16, block_size=bs,
                            causal=causal)
    check_vertical_slash_index(idx, causal)
