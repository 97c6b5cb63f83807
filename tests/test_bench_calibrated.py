"""benchmarks/bench_calibrated_methods.py on the CPU: its correctness gate, one small input end to end
(timed with wall clock, cuDNN replaced by SDPA), the table and the plot. The GPU numbers come from
the same code (NOTES.md, run 20)."""

import importlib.util
import json
import time
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_calibrated_methods",
                                                  ROOT / "benchmarks" / "bench_calibrated_methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DEVICE = "cpu"

    def wall_ms(fn):
        t = time.perf_counter()
        fn()
        return {"ms": 1000 * (time.perf_counter() - t), "peak_mib": 0.0}

    def dense(q, k, v, causal):
        G = q.shape[1] // k.shape[1]
        return lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=causal)

    def call_ms(fn):  # no CUDA kernels to profile here: the whole call's wall time counts as selection
        return {"attend_ms": 0.0, "select_ms": wall_ms(fn)["ms"]}

    mod.time_ms = wall_ms
    mod.call_gpu_ms = call_ms
    mod.DENSE_PEERS = [types.SimpleNamespace(make=dense)]
    return mod


def test_gate_passes_on_the_cpu(bench):
    gate = bench.correctness_gate()
    assert gate["passed"], gate
    assert gate["xattention"]["density_bookkeeping_max_diff"] < 1e-9
    assert len({tuple(p) for p in gate["minference"]["patterns"]}) == 8  # every pattern kind is checked


def test_one_input_rows_table_and_plot(bench, tmp_path):
    torch.set_num_threads(2)
    rows = bench.bench_seed(1024, 3, [0.9], lambda msg: None)
    by = {(r["method"], r["config"]): r for r in rows}
    assert ("oracle", "fewest 128-blocks per row") in by
    layer = by["xattention", "layer mean 0.9 (held-out)"]
    head = by["xattention", "every head 0.9 (held-out)"]
    assert layer["calibration_recall"] >= 0.9 - 1e-9  # the layer rule's promise, on the held-out prompt
    assert min(head["thresholds"]) >= 0.01 and 0 < layer["density"] <= 1
    m = by["minference", "layer mean 0.9 (held-out)"]
    assert m["calibration_recall"] >= 0.9 - 1e-9 and sum(m["patterns"].values()) == 32
    assert m["select_run_ms"] > 0 and m["select_run_share"] == m["select_run_ms"] / m["dense_ms"]
    assert m["select_gpu_ms"] > 0 and m["select_gpu_share"] == m["select_gpu_ms"] / m["dense_ms"]
    assert m["attend_run_ms"] > 0 and m["select_added_ms"] == m["e2e_ms"] - m["attend_run_ms"]
    assert m["select_added_share"] == m["select_added_ms"] / m["dense_ms"]
    for r in rows:
        if r["method"] in ("xattention", "minference"):
            assert 0 <= r["rel_err"] < 1 and 0 < r["recall"] <= 1 + 1e-6
    table = bench.table(rows, True)
    assert "layer mean 0.9 (held-out)" in table and "oracle" in table and "select GPU in the call" in table
    assert "select added to the call" in table
    assert all(line.count("|") == 12 for line in table.splitlines())  # every row has every column
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"machine": {"device": "cpu"}, "records": rows}))
    png = bench.plot([str(path)], str(tmp_path / "p.png"))
    assert Path(png).stat().st_size > 10_000
