"""The benchmark harness on a CPU: inputs, FLOP accounting and reports (timing itself needs a GPU)."""

import json

import pytest
import torch

from sparseattn.bench.inputs import llm_like_qkv, oracle_density, random_block_index
from sparseattn.bench.report import write_reports
from sparseattn.bench.timing import causal_dense_flops
from sparseattn.index import causal_block_mask, diagonal_block_range


@pytest.mark.parametrize("L,bs,d", [(1000, 64, 0.3), (4096, 64, 0.1), (4096, 128, 0.2), (300, 32, 0.5)])
def test_random_block_index_density_and_forced_blocks(L, bs, d):
    idx = random_block_index(2, 3, L, L, bs, d, device="cpu", seed=1)
    mask = idx.to_mask()
    allowed = causal_block_mask(L, L, bs, bs)
    assert not (mask & ~allowed).any()
    assert mask[..., 0].all()
    first, last = diagonal_block_range(L, L, bs, bs)
    rows = torch.arange(mask.shape[2])
    assert mask[:, :, rows, last].all() and mask[:, :, rows, first].all()
    got = idx.density().mean().item()  # d is above the forced floor (sink + diagonal) in every case
    assert abs(got - d) < 0.35 * d + 0.02


def test_llm_like_is_seeded_and_structured():
    a = llm_like_qkv(1, 4, 2, 2048, 32, device="cpu", dtype=torch.float32, seed=3)
    b = llm_like_qkv(1, 4, 2, 2048, 32, device="cpu", dtype=torch.float32, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    q, k, _ = a
    assert q.shape == (1, 4, 2048, 32) and k.shape == (1, 2, 2048, 32)
    dens = oracle_density(q, k, 64, 0.9, query_blocks=8)
    rand_q, rand_k = torch.randn_like(q), torch.randn_like(k)
    assert dens < 0.5 * oracle_density(rand_q, rand_k, 64, 0.9, query_blocks=8)

def test_oracle_from_block_mass_equals_the_oracle():
    from sparseattn.bench.inputs import oracle_density_from_mass
    from sparseattn.calibrate import exact_block_mass

    q, k, _ = llm_like_qkv(1, 4, 2, 1000, 32, device="cpu", dtype=torch.float32, seed=4)
    mass = exact_block_mass(q, k, block_size=64)
    for coverage in (0.9, 0.95):
        want = oracle_density(q, k, 64, coverage)  # every query block, its own softmax
        got = oracle_density_from_mass(mass, 1000, 1000, 64, coverage, rows_per_chunk=5)
        assert got == pytest.approx(want, abs=1e-6)


def test_llm_like_heads_seed_separates_model_from_prompt():
    kw = dict(device="cpu", dtype=torch.float32)
    own = llm_like_qkv(1, 4, 4, 512, 32, seed=5, **kw)
    # The strengths are the first draw of the seed's generator: naming its own seed changes nothing.
    assert all(torch.equal(x, y) for x, y in zip(own, llm_like_qkv(1, 4, 4, 512, 32, seed=5, heads_seed=5, **kw)))
    held_out = llm_like_qkv(1, 4, 4, 512, 32, seed=6, heads_seed=5, **kw)
    prompt = llm_like_qkv(1, 4, 4, 512, 32, seed=6, **kw)
    assert torch.equal(held_out[2], prompt[2])  # everything but the strengths is seed 6's stream ...
    assert not torch.equal(held_out[0], prompt[0])  # ... and the strengths are not seed 6's
    assert not torch.equal(held_out[0], own[0])  # another prompt than seed 5's


def test_flops():
    assert causal_dense_flops(1, 1, 4, 4, 1) == 4 * (1 + 2 + 3 + 4)
    assert causal_dense_flops(1, 1, 4, 4, 1, causal=False) == 4 * 16


def test_report_from_json(tmp_path):
    rec = lambda **kw: dict(min=0, max=0, runs=5, eff_tflops=100.0, act_tflops=100.0, **kw)  # noqa: E731
    result = {"machine": {"device": "Test GPU", "torch": "x", "triton": "y"},
              "shape": {"q_heads": 32, "kv_heads": 8, "head_dim": 128},
              "records": [rec(L=8192, case="dense", impl="cudnn_sdpa", density=1.0, ms=1.0),
                          rec(L=8192, case="dense", impl="ours_dense", density=1.0, ms=1.25, peak_mib=64.0),
                          rec(L=8192, case="sparse", impl="ours_sparse", target_density=0.1, density=0.12, ms=0.2),
                          rec(L=8192, case="sparse", impl="flex_sparse", target_density=0.1, density=0.12, ms=0.4),
                          rec(L=8192, case="backward", impl="ours_dense", density=1.0, ms=3.0)]}
    path = tmp_path / "kernel.json"
    path.write_text(json.dumps(result))
    md, png = write_reports(path)
    text = md.read_text()
    assert "| 8K | 1.00 | 1.25 | 100 | 0.80 | 64 / - |" in text  # older JSON files have no peak memory
    assert "| 8K | 12.0% | 0.20 | 0.40 | 2.00x | 1.67 |" in text
    if png is not None:
        assert png.stat().st_size > 1000


def test_method_table_shows_peak_memory():
    from sparseattn.bench.method_suite import method_table

    result = {"machine": {"device": "Test GPU"}, "input": "x", "shape": {},
              "records": [dict(L=8192, method="dense_cudnn", e2e_ms=2.0, density=1.0, rel_err=0.0, peak_mib=32.0),
                          dict(L=8192, method="xattention", select_ms=0.1, attend_ms=0.4, e2e_ms=0.5, density=0.2,
                               rel_err=0.01, speedup=4.0, select_pct_of_dense=5.0, peak_mib=48.4)]}
    text = method_table(result)
    assert "| 8K | cuDNN dense | 100% | - | - | 2.00 | 1.00x | - | 0 | 32 |" in text
    assert "| 8K | xattention | 20.0% | 0.10 | 0.40 | 0.50 | 4.00x | 5.0% | 1.00e-02 | 48 |" in text


def test_random_block_index_shared_in_group():
    idx = random_block_index(1, 8, 1000, 1000, 64, 0.3, device="cpu", seed=1, group_size=4)
    mask = idx.to_mask()
    assert torch.equal(mask[:, 0], mask[:, 3]) and torch.equal(mask[:, 4], mask[:, 7])
    assert not torch.equal(mask[:, 0], mask[:, 4])


def test_method_table_with_seeds_adds_the_spread():
    from sparseattn.bench.method_suite import method_table

    def rec(seed, method, ms, dense_ms, density):
        if method == "dense_cudnn":
            return dict(L=8192, seed=seed, method=method, e2e_ms=ms, density=1.0, rel_err=0.0, peak_mib=32.0)
        return dict(L=8192, seed=seed, method=method, select_ms=0.1, attend_ms=ms - 0.1, e2e_ms=ms, density=density,
                    rel_err=0.01, speedup=dense_ms / ms, select_pct_of_dense=100 * 0.1 / dense_ms, peak_mib=48.0)

    result = {"machine": {"device": "Test GPU"}, "input": "x", "shape": {}, "seeds": ["L", 1],
              "records": [rec(8192, "dense_cudnn", 2.0, 2.0, 1.0), rec(8192, "xattention", 0.5, 2.0, 0.2),
                          rec(1, "dense_cudnn", 2.2, 2.2, 1.0), rec(1, "xattention", 1.1, 2.2, 0.3)]}
    text = method_table(result)
    assert "| L | seed | method |" in text
    assert "| 8K | 1 | xattention | 30.0% | 0.10 | 1.00 | 1.10 | 2.00x |" in text
    # Speedups are against each seed's own dense time: 4.00x and 2.00x.
    assert "| 8K | xattention | 2 | 20.0% / 25.0% / 30.0% | 2.00x / 3.00x / 4.00x |" in text


def test_bench_seeds_option(capsys):
    from sparseattn.bench.inputs import parse_seeds
    from sparseattn.cli import UsageError, _seeds, main

    assert _seeds(None) is None
    assert _seeds("L, 1,2") == parse_seeds("l,1,2") == [None, 1, 2]
    for bad in ("", "a,1", " , "):
        with pytest.raises(ValueError, match="integers or L"):
            parse_seeds(bad)
        with pytest.raises(UsageError, match="--seeds"):
            _seeds(bad)
    # The kernel suite has no seeded input: refused before any GPU check, not silently ignored.
    assert main(["bench", "kernel", "--seeds", "1"]) == 2
    assert "--seeds applies to the methods suite" in capsys.readouterr().err
