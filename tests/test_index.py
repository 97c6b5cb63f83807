"""BlockIndex format and its converters."""

import pytest
import torch

from sparseattn.index import BlockIndex, causal_block_mask, diagonal_block_range


def random_mask(B, H, nq, nk, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, nq, nk, generator=g) < p


@pytest.mark.parametrize("B,H,Lq,Lk,bq,bk", [
    pytest.param(1, 1, 1, 1, 16, 16, id="L1"),
    pytest.param(2, 3, 63, 63, 16, 16, id="B2-H3-L63"),
    pytest.param(1, 2, 100, 1000, 64, 32, id="Lq100-Lk1000-bq64-bk32"),
    pytest.param(2, 2, 1000, 1000, 64, 64, id="L1000-bs64"),
])
def test_mask_roundtrip(B, H, Lq, Lk, bq, bk):
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    mask = random_mask(B, H, nq, nk)
    idx = BlockIndex.from_mask(mask, block_q=bq, block_k=bk, q_len=Lq, k_len=Lk)
    assert idx.indices.dtype == torch.int32 and idx.counts.dtype == torch.int32
    assert torch.equal(idx.to_mask(), mask)
    assert torch.equal(idx.counts, mask.sum(-1).int())
    # valid entries ascending, padding -1
    width = idx.indices.shape[-1]
    valid = torch.arange(width) < idx.counts.unsqueeze(-1)
    assert (idx.indices[~valid] == -1).all()
    diffs = idx.indices[..., 1:] - idx.indices[..., :-1]
    assert (diffs[valid[..., 1:]] > 0).all()


def test_fixed_width_no_sync():
    mask = random_mask(1, 2, 4, 6)
    idx = BlockIndex.from_mask(mask, block_q=16, block_k=16, q_len=64, k_len=96, max_k=9)
    assert idx.indices.shape[-1] == 9
    assert torch.equal(idx.to_mask(), mask)


@pytest.mark.parametrize("Lq,Lk,bq,bk", [(1, 1, 16, 16), (63, 63, 16, 16), (100, 1000, 64, 32),
                                         (37, 50, 16, 16), (1000, 1000, 64, 128)])
def test_causal_block_mask_matches_elements(Lq, Lk, bq, bk):
    qpos = torch.arange(Lq) + Lk - Lq
    elem = torch.arange(Lk)[None, :] <= qpos[:, None]
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    expect = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            expect[i, j] = elem[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()
    assert torch.equal(causal_block_mask(Lq, Lk, bq, bk), expect)
    first, last = diagonal_block_range(Lq, Lk, bq, bk)
    for i in range(nq):
        own = {int(p) // bk for p in qpos[i * bq:(i + 1) * bq]}
        assert set(range(int(first[i]), int(last[i]) + 1)) == own


def test_dense_index_and_density():
    idx = BlockIndex.dense(2, 3, 100, 100, 32, 32, causal=True)
    assert torch.equal(idx.to_mask()[0, 0], causal_block_mask(100, 100, 32, 32))
    assert torch.allclose(idx.density(), torch.ones(2, 3))
    nc = BlockIndex.dense(1, 1, 50, 80, 16, 16, causal=False)
    assert nc.to_mask().all()


def test_transpose_is_transpose():
    mask = random_mask(2, 2, 5, 7, seed=3)
    idx = BlockIndex.from_mask(mask, block_q=16, block_k=16, q_len=80, k_len=112)
    t = idx.transpose()
    assert torch.equal(t.to_mask(), mask.transpose(-1, -2))
    assert torch.equal(t.counts, mask.sum(-2).int())


def test_element_mask_causal_offset():
    idx = BlockIndex.dense(1, 1, 3, 10, 16, 16)
    elem = idx.to_element_mask()
    expect = torch.tensor([[j <= 7 + i for j in range(10)] for i in range(3)])
    assert torch.equal(elem[0, 0], expect)


def test_to_flex_block_mask_same_blocks():
    mask = random_mask(1, 2, 3, 3, p=0.5, seed=1) | torch.eye(3, dtype=torch.bool)
    mask &= causal_block_mask(300, 300, 128, 128)
    idx = BlockIndex.from_mask(mask, block_q=128, block_k=128, q_len=300, k_len=300)
    bm = idx.to_block_mask()
    assert torch.equal((bm.kv_num_blocks + bm.full_kv_num_blocks).int(), idx.counts)
    dense = bm.to_dense().bool()[..., :3, :3]
    assert torch.equal(dense, mask)
    # Full blocks are those strictly below the diagonal block: rows 0..2 can have 0, 1, 2 of them.
    assert (bm.full_kv_num_blocks <= torch.tensor([0, 1, 2])).all()


def test_dense_block_mask_matches_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    for Lq, Lk in [(256, 256), (256, 512), (200, 333)]:
        ours = BlockIndex.dense(1, 1, Lq, Lk, 128, 128).to_block_mask()
        ref = create_block_mask(lambda b, h, q, k: k <= q + Lk - Lq, None, None, Lq, Lk, device="cpu")
        assert torch.equal(ours.to_dense(), ref.to_dense())


@pytest.mark.parametrize("kwargs,match", [
    (dict(indices=torch.zeros(1, 1, 1, dtype=torch.int32), counts=torch.zeros(1, 1, 1, dtype=torch.int32)), "indices must be"),
    (dict(indices=torch.zeros(1, 1, 1, 1, dtype=torch.int64), counts=torch.zeros(1, 1, 1, dtype=torch.int32)), "int32"),
    (dict(indices=torch.zeros(1, 1, 2, 1, dtype=torch.int32), counts=torch.zeros(1, 1, 1, dtype=torch.int32)), "disagree"),
])
def test_invalid_index(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BlockIndex(**kwargs, block_q=16, block_k=16, q_len=16, k_len=16)


def test_invalid_lengths():
    z = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="q_len"):
        BlockIndex(z, z[..., 0], 16, 16, 32, 16)
    with pytest.raises(ValueError, match="nq"):
        BlockIndex(z, z[..., 0], 16, 16, 40, 40)
    with pytest.raises(ValueError, match="block_q"):
        BlockIndex(z, z[..., 0], 0, 16, 16, 16)


@pytest.mark.parametrize("Lq,Lk,causal", [(100, 100, True), (37, 250, True), (64, 64, False), (1, 70, True)])
def test_vertical_slash_density_closed_form(Lq, Lk, causal):
    from sparseattn.reference.minference import minference_select

    g = torch.Generator().manual_seed(Lq + Lk)
    q, k = torch.randn(2, 4, Lq, 16, generator=g), torch.randn(2, 2, Lk, 16, generator=g)
    vs = minference_select(q, k, vertical_size=7, slash_size=5, last_q=16, block_size=16, causal=causal)
    elem = vs.to_element_mask(causal)
    allowed = (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + Lk - Lq) if causal else torch.ones(Lq, Lk, dtype=torch.bool)
    expect = elem.sum((-1, -2)).double() / allowed.sum()
    assert torch.allclose(vs.density(causal).double(), expect, atol=1e-6)
