"""Where MInference's selection spends host time: a Python profile of the selection while the GPU
sleeps, so no launch waits and every microsecond counted is the host's (runs 22e-22i: the per-head
mixes' selection is host-bound, ~5.5 ms of host against ~3.8 ms of GPU work at 128K).

For each config of ``profile_minference_call.CONFIGS`` (128K, B=1, GQA 32/8, D=128, bf16,
LLM-like input, seed 1): ``host_ms`` and ``time_ms`` of one unchunked selection and of the call's
chunked selections; the number of kernel launches of one selection (torch.profiler: CUDA runtime
and driver launch calls); then cProfile's top functions of ``--iters`` unchunked selections, by
own time and by cumulative time, and the same of the call's chunked selections. The host cost of
bare launches on this machine comes first (``triton_launch_overhead``'s cases), for scale, and
the host and GPU time of the block-sparse pooled-score GEMM of 4 heads done three ways.

    python benchmarks/probe_select_host.py --out /tmp/out/probe-select-host.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseattn.api import selection_chunks  # noqa: E402
from sparseattn.bench.inputs import llm_like_qkv  # noqa: E402
from sparseattn.bench.timing import host_ms, machine_record, time_ms, write_json  # noqa: E402
from sparseattn.methods import get_method  # noqa: E402
from sparseattn.methods.minference import MInferenceConfig  # noqa: E402

from profile_minference_call import CONFIGS  # noqa: E402
from triton_launch_overhead import _k16, _k48  # noqa: E402

LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel", "cudaLaunchKernelExC")


def launches(fn) -> dict:
    """Kernel launches (runtime and driver calls) and memsets/copies queued by one call of ``fn``."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    counts = {}
    for e in prof.key_averages():
        if e.key in LAUNCH_CALLS or e.key.startswith(("cudaMemsetAsync", "cudaMemcpyAsync")):
            counts[e.key] = counts.get(e.key, 0) + e.count
    return counts


def python_profile(fn, iters: int, rows: int) -> tuple[str, str]:
    """cProfile of ``iters`` calls of ``fn`` with the GPU asleep: (by own time, by cumulative time)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(3_000_000_000)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    tables = []
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(rows)
        tables.append(s.getvalue())
    return tables[0], tables[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rows", type=int, default=28)
    ap.add_argument("--configs", default="", help="comma-separated names of CONFIGS (default: all)")
    ap.add_argument("--tables", default="", help="a bench_calibrated_methods JSON: also its MInference "
                    "tables whose config names contain --table-match")
    ap.add_argument("--table-match", default="every head")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    x = torch.zeros(4, device="cuda", dtype=torch.int32)
    ints = list(range(7, 7 + 47))
    bare = {"triton, 16 args": lambda: _k16[(1,)](x, *ints[:15]),
            "triton, 48 args + 4 constexpr": lambda: _k48[(1,)](x, *ints, C0=1, C1=2, C2=3, C3=4),
            "torch.empty": lambda: torch.empty(1024, device="cuda"),
            "torch add": lambda: x.add(1)}
    record = {"machine": machine_record(), "L": args.length, "seed": args.seed, "bare_us": {}, "configs": {}}
    for name, fn in bare.items():
        record["bare_us"][name] = 1e3 * host_ms(fn, iters=200, sleep_cycles=3_000_000_000)
        print(f"bare {name}: {record['bare_us'][name]:.1f} us", flush=True)
    q, k, v = llm_like_qkv(1, 32, 8, args.length, 128, seed=args.seed)
    # The block-sparse pooled scores of 4 query heads of one KV head (128K, 64-blocks), three ways.
    nb = args.length // 64
    qp, kp = torch.randn(4, nb, 128, device="cuda"), torch.randn(1, nb, 128, device="cuda")
    out, zeros = torch.empty(4, nb, nb, device="cuda"), torch.zeros(4, dtype=torch.long, device="cuda")
    gemms = {"bmm, KV pool copied (index_select)": lambda: torch.bmm(
                 qp, kp.index_select(0, zeros).transpose(-1, -2), out=out),
             "bmm, KV pool expanded (stride 0)": lambda: torch.bmm(qp, kp.expand(4, nb, 128).transpose(-1, -2),
                                                                    out=out),
             "mm, the 4 heads' rows as one matrix": lambda: torch.mm(qp.view(-1, 128), kp[0].t(), out=out.view(-1, nb))}
    record["gemm"] = {}
    for name, fn in gemms.items():
        record["gemm"][name] = {"host_us": 1e3 * host_ms(fn, iters=50), "ms": time_ms(fn)["ms"]}
        print(f"gemm {name}: host {record['gemm'][name]['host_us']:.1f} us, {record['gemm'][name]['ms']:.3f} ms",
              flush=True)
    qp = kp = out = None
    spec = get_method("minference")
    configs = dict(CONFIGS)
    if args.tables:
        with open(args.tables) as f:
            for r in json.load(f)["records"]:
                if r["method"] == "minference" and args.table_match in r["config"] and "table" in r:
                    configs[f"seed {r['seed']} {r['config']}"] = MInferenceConfig(
                        head_patterns=tuple(tuple(p) for p in r["table"]), block_size=64)
    names = ([n for n in args.configs.split(",") if n] or list(CONFIGS)) + [n for n in configs if n not in CONFIGS]
    summary = []
    for name in names:
        cfg = configs[name]
        whole = lambda: spec.select(q, k, cfg, causal=True)  # noqa: E731
        chunks = lambda: [None for _ in selection_chunks(q, k, v, "minference", cfg)]  # noqa: E731
        row = {"whole_ms": time_ms(whole)["ms"], "whole_host_ms": host_ms(whole, iters=2),
               "chunks_ms": time_ms(chunks)["ms"], "chunks_host_ms": host_ms(chunks, iters=2),
               "whole_launches": launches(whole), "chunks_launches": launches(chunks)}
        row["by_own_time"], row["by_cumulative"] = python_profile(whole, args.iters, args.rows)
        row["chunks_by_own_time"], row["chunks_by_cumulative"] = python_profile(chunks, args.iters, args.rows)
        record["configs"][name] = row
        print(f"=== {name}: whole {row['whole_ms']:.2f} ms (host {row['whole_host_ms']:.2f}), chunks "
              f"{row['chunks_ms']:.2f} ms (host {row['chunks_host_ms']:.2f}); launches whole "
              f"{row['whole_launches']}, chunks {row['chunks_launches']}", flush=True)
        print(row["by_own_time"], flush=True)
        print(row["by_cumulative"], flush=True)
        print(f"--- {name}, the call's chunked selections", flush=True)
        print(row["chunks_by_own_time"], flush=True)
        print(row["chunks_by_cumulative"], flush=True)
        summary.append(f"{name[:40]:40s} whole {row['whole_ms']:6.2f} ms host {row['whole_host_ms']:6.2f} | chunks "
                       f"{row['chunks_ms']:6.2f} ms host {row['chunks_host_ms']:6.2f} | launches "
                       f"{sum(row['whole_launches'].values())} / {sum(row['chunks_launches'].values())}")
        torch.cuda.empty_cache()
    write_json(args.out, record)
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
