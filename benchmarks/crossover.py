"""Crossover lengths: from which prompt length each method's sparse prefill beats dense attention.

One attention call (selection + index building + attention, i.e. ``sparse_attention``) against
cuDNN SDPA dense on the same inputs, causal, bf16, on the LLM-like input (``llm_like_qkv``), at
lengths 2K..64K, for two head shapes: the embedded model's (9 query / 3 KV heads, D=64) and a
Llama-8B-like layer (32 / 8, D=128). The crossover of a method is the shortest measured length
from which it is faster at every longer measured length. These lengths set
``integrations.transformers.DEFAULT_MIN_SPARSE_LEN`` (per method; the integration routes shorter
prompts to dense attention).

    python benchmarks/crossover.py --out /tmp/out/crossover.json [--lengths 2048,...] [--methods ...]
"""

from __future__ import annotations

import argparse

import torch

from sparseattn.api import sparse_attention
from sparseattn.bench.inputs import llm_like_qkv
from sparseattn.bench.peers import DENSE_PEERS
from sparseattn.bench.timing import machine_record, time_ms, write_json

SHAPES = {"smollm2 (9/3, D64)": (9, 3, 64), "llama-8b (32/8, D128)": (32, 8, 128)}
METHODS = ["xattention", "flexprefill", "minference", "streaming"]


def crossover(records, method, shape) -> int | None:
    """Shortest length from which ``method`` beats dense at every longer measured length."""
    rows = sorted((r for r in records if r["method"] == method and r["shape"] == shape), key=lambda r: r["L"])
    best = None
    for r in reversed(rows):
        if r["speedup"] <= 1.0:
            break
        best = r["L"]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    methods = args.methods.split(",")
    result = {"suite": "crossover", "machine": machine_record(), "input": "llm_like_qkv (seed = L), default configs",
              "records": [], "crossover": {}}
    for shape, (hq, hkv, d) in SHAPES.items():
        for L in lengths:
            q, k, v = llm_like_qkv(1, hq, hkv, L, d, seed=L)
            dense = DENSE_PEERS[0].make(q, k, v, True)
            ref = dense()
            t_dense = time_ms(dense)["ms"]
            for m in methods:
                out, stats = sparse_attention(q, k, v, method=m, return_stats=True)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                t = time_ms(lambda: sparse_attention(q, k, v, method=m))["ms"]
                rec = dict(shape=shape, L=L, method=m, dense_ms=t_dense, sparse_ms=t, speedup=t_dense / t,
                           density=float(stats.density.mean()), rel_err=err)
                result["records"].append(rec)
                print(rec, flush=True)
            q = k = v = ref = out = stats = None
            torch.cuda.empty_cache()
        result["crossover"][shape] = {m: crossover(result["records"], m, shape) for m in methods}
    write_json(args.out, result)
    print(f"\nDevice: {result['machine'].get('device')}; one causal attention call, bf16, LLM-like input")
    print("| shape | method | " + " | ".join(f"{L // 1024}K" for L in lengths) + " | crossover |")
    print("|---|---|" + "---|" * (len(lengths) + 1))
    for shape in SHAPES:
        for m in methods:
            cells = []
            for L in lengths:
                r = next(r for r in result["records"] if r["shape"] == shape and r["method"] == m and r["L"] == L)
                cells.append(f"{r['speedup']:.2f}x ({100 * r['density']:.0f}%)")
            x = result["crossover"][shape][m]
            print(f"| {shape} | {m} | " + " | ".join(cells) + f" | {'-' if x is None else f'{x // 1024}K'} |")


if __name__ == "__main__":
    main()
