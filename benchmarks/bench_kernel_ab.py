"""The kernels of this tree against an earlier version of ``sparseattn/kernels``, in one run.

A kernel change is judged by timing both versions in the same process, on the same inputs and the
same GPU state, beside cuDNN SDPA (BENCHMARKS.md). The earlier version is a copy of the
``sparseattn/kernels`` folder at a git revision, loaded as the package ``sparseattn.kernels_base``
(its relative imports of ``..index`` and ``..validation`` resolve to this tree's, whose formats
both versions share):

    mkdir -p .cmp/base && git archive HEAD~1 sparseattn/kernels | tar -x -C .cmp/base
    python benchmarks/bench_kernel_ab.py --base .cmp/base/sparseattn/kernels --out /tmp/out/kernel-ab.json

Cases (B = 1, GQA 32/8, D = 128, bf16, causal; ``--length``, default 128K):

- forward: dense mode, every causal 128-block through the index, and random 128-blocks drawn per
  query head at ``--densities`` (issue 3's input), with a linear fit ``a + b x density`` each;
  random 64-blocks at 5% and 10% (the narrow tile);
- backward (dQ + dK/dV) over random 128-blocks at 10%, at ``--bwd-length`` (default 32K);
- the vertical-slash kernel over MInference indices of the LLM-like input (seed = length) with the
  seed's sizes and with 512/512 on 64-blocks.

Each pair's outputs are compared (``max_abs_diff`` between versions), and this tree's sparse
forward is checked against the fp32 reference on the last 1024 queries of two heads before it is
timed. The table printed last is the summary; the JSON holds every record.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from sparseattn.bench.inputs import llm_like_qkv, random_block_index, random_qkv
from sparseattn.bench.peers import DENSE_PEERS
from sparseattn.bench.timing import linear_fit, machine_record, time_ms, write_json
from sparseattn.index import BlockIndex
from sparseattn.kernels import block_sparse as cur_bs
from sparseattn.kernels import vertical_slash as cur_vs
from sparseattn.kernels.minference_index import minference_select_fast

from bench_block_locality import gate  # this folder is sys.path[0] when run as a script

HEADS, KV_HEADS, D = 32, 8, 128
VS_CONFIGS = {"seed sizes": dict(vertical_size=1000, slash_size=6096, block_size=64),
              "v512_s512": dict(vertical_size=512, slash_size=512, block_size=64)}


def load_base(folder: str):
    """``(block_sparse, vertical_slash)`` of the kernels folder ``folder``, as ``sparseattn.kernels_base``."""
    path = Path(folder)
    if not (path / "block_sparse.py").is_file():
        raise SystemExit(f"--base {folder}: no block_sparse.py there (expected a copy of sparseattn/kernels)")
    name = "sparseattn.kernels_base"
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module(f"{name}.block_sparse"), importlib.import_module(f"{name}.vertical_slash")


def pair(label: str, run_cur, run_base, record: dict) -> dict:
    """Time both versions (this tree first, then the base, then this tree again to see drift)."""
    out_cur, out_base = run_cur(), run_base()
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(out_cur, out_base))
    ms = time_ms(run_cur)["ms"]
    ms_base = time_ms(run_base)["ms"]
    ms_again = time_ms(run_cur)["ms"]
    record.update(case=label, ms=min(ms, ms_again), ms_first=ms, ms_again=ms_again, base_ms=ms_base,
                  speedup=ms_base / min(ms, ms_again), max_abs_diff=diff)
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="a copy of sparseattn/kernels at the revision to compare with")
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--bwd-length", type=int, default=32768)
    parser.add_argument("--densities", default="0.01,0.02,0.05,0.10,0.20")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: fwd,narrow,bwd,vs")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    base_bs, base_vs = load_base(args.base)
    L = args.length
    result = {"suite": "kernel_ab", "machine": machine_record(), "base": args.base,
              "shape": dict(batch=1, q_heads=HEADS, kv_heads=KV_HEADS, head_dim=D, length=L, dtype="bfloat16",
                            causal=True), "records": []}
    recs = result["records"]

    q, k, v = random_qkv(1, HEADS, KV_HEADS, L, D, seed=L)
    cudnn = time_ms(DENSE_PEERS[0].make(q, k, v, True))["ms"]
    result["cudnn_dense_ms"] = cudnn
    print(f"cuDNN dense {cudnn:.2f} ms", flush=True)
    if "fwd" not in skip:
        recs.append(pair("forward dense mode", lambda: cur_bs.block_sparse_forward(q, k, v, None),
                         lambda: base_bs.block_sparse_forward(q, k, v, None), {"part": "fwd", "density": 1.0}))
        every = BlockIndex.dense(1, HEADS, L, L, 128, 128, device=q.device)
        recs.append(pair("forward every causal block", lambda: cur_bs.block_sparse_forward(q, k, v, every),
                         lambda: base_bs.block_sparse_forward(q, k, v, every), {"part": "fwd", "density": 1.0}))
        every = None
    for part, bs, densities in (("fwd", 128, args.densities), ("narrow", 64, "0.05,0.10")):
        if part in skip:
            continue
        for target in [float(x) for x in densities.split(",")]:
            index = random_block_index(1, HEADS, L, L, bs, target, seed=L + 1)
            d = float(index.density().mean())
            err = gate(q, k, v, index, cur_bs.block_sparse_forward(q, k, v, index)[0])
            rec = {"part": part, "block": bs, "target": target, "density": d, "rel_err": err}
            if err > 2e-2:
                rec["gate_failed"] = True
                recs.append(rec)
                print(json.dumps(rec), flush=True)
                continue
            pair(f"forward random {bs}-blocks", lambda: cur_bs.block_sparse_forward(q, k, v, index),
                 lambda: base_bs.block_sparse_forward(q, k, v, index), rec)
            rec.update(x_d_cudnn=rec["ms"] / (d * cudnn), base_x_d_cudnn=rec["base_ms"] / (d * cudnn))
            recs.append(rec)
            index = None
    pts = [r for r in recs if r.get("part") == "fwd" and "x_d_cudnn" in r]
    if len(pts) >= 2:
        a, b = linear_fit([(r["density"], r["ms"]) for r in pts])
        a0, b0 = linear_fit([(r["density"], r["base_ms"]) for r in pts])
        b, b0 = b / 100, b0 / 100  # per percent
        result["fits"] = {"this": {"intercept_ms": a, "ms_per_percent": b, "per_percent_x_cudnn": b / (cudnn / 100)},
                          "base": {"intercept_ms": a0, "ms_per_percent": b0, "per_percent_x_cudnn": b0 / (cudnn / 100)}}

    if "bwd" not in skip:
        Lb = args.bwd_length
        qb, kb, vb = random_qkv(1, HEADS, KV_HEADS, Lb, D, seed=Lb)
        index = random_block_index(1, HEADS, Lb, Lb, 128, 0.10, seed=Lb + 1)
        out, lse = cur_bs.block_sparse_forward(qb, kb, vb, index)
        do = torch.randn_like(out)
        km = cur_bs.key_major_index(index)
        rec = {"part": "bwd", "length": Lb, "block": 128, "density": float(index.density().mean())}
        pair("backward random 128-blocks 10%",
             lambda: cur_bs.block_sparse_backward(do, qb, kb, vb, out, lse, index, key_major=km),
             lambda: base_bs.block_sparse_backward(do, qb, kb, vb, out, lse, index, key_major=km), rec)
        recs.append(rec)
        qb = kb = vb = out = lse = do = km = index = None

    if "vs" not in skip:
        q = k = v = None
        torch.cuda.empty_cache()
        q, k, v = llm_like_qkv(1, HEADS, KV_HEADS, L, D, seed=L)
        for name, opts in VS_CONFIGS.items():
            index = minference_select_fast(q, k, **opts)
            rec = {"part": "vs", "config": name, "density": float(index.density().mean())}
            pair(f"vertical-slash {name}", lambda: cur_vs.vertical_slash_forward(q, k, v, index),
                 lambda: base_vs.vertical_slash_forward(q, k, v, index), rec)
            recs.append(rec)
            index = None

    write_json(args.out, result)
    print(f"\nDevice: {result['machine'].get('device')}; B=1 GQA 32/8 D=128 bf16 causal; L={L}; "
          f"cuDNN dense {cudnn:.2f} ms")
    print("| case | density | this tree ms | base ms | speedup | x d x cuDNN (this / base) | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for r in recs:
        if "ms" not in r:
            print(f"| {r.get('part')} {r.get('block')} | {100 * r['density']:.1f}% | gate failed "
                  f"({r['rel_err']:.2e}) | | | | |")
            continue
        xd = f"{r['x_d_cudnn']:.2f} / {r['base_x_d_cudnn']:.2f}" if "x_d_cudnn" in r else ""
        name = r["case"] + (f" ({r['config']})" if "config" in r else "")
        print(f"| {name} | {100 * r['density']:.1f}% | {r['ms']:.2f} | {r['base_ms']:.2f} | {r['speedup']:.3f}x | "
              f"{xd} | {r['max_abs_diff']:.1e} |")
    for which, f in result.get("fits", {}).items():
        print(f"fit ({which}): {f['intercept_ms']:.2f} ms + {f['ms_per_percent']:.3f} ms per % "
              f"({f['per_percent_x_cudnn']:.2f} x cuDNN's per %)")


if __name__ == "__main__":
    main()
