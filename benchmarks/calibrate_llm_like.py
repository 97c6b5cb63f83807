"""Measure the exact 90%-mass block density of the LLM-like synthetic input (BENCHMARKS.md, input 2).

Usage: python benchmarks/calibrate_llm_like.py [--lengths 32768,131072] [--seeds L,0,1,2] [--out results.json]
Samples query blocks (exact softmax over all keys for each) on the GPU. ``--seeds``: seeds of the
generator, ``L`` = the length (the methods suite's input); the summary gives the spread over seeds.
"""

import argparse
import json

import torch

from sparseattn.bench.inputs import llm_like_qkv, oracle_density, parse_seeds
from sparseattn.bench.timing import machine_record


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--seeds", default="L", help="comma-separated seeds, L = the length (default)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--query-blocks", type=int, default=24)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for L in [int(x) for x in args.lengths.split(",")]:
        for item in parse_seeds(args.seeds):
            seed = L if item is None else item
            q, k, _ = llm_like_qkv(1, 32, 8, L, 128, device="cuda", seed=seed)
            for coverage in (0.9, 0.95):
                d = oracle_density(q, k, args.block_size, coverage, query_blocks=args.query_blocks)
                rows.append({"L": L, "seed": seed, "coverage": coverage, "block_size": args.block_size,
                             "oracle_density": d})
                print(f"L={L:>7} seed={seed:>7} coverage={coverage}: oracle density {100 * d:.1f}% of causal blocks",
                      flush=True)
            del q, k
            torch.cuda.empty_cache()
    print("\n| L | coverage | seeds | oracle density min / median / max | seeds outside 5-15% (at 0.9) |")
    print("|---|---|---|---|---|")
    for L in sorted({r["L"] for r in rows}):
        for coverage in (0.9, 0.95):
            sel = sorted((r["oracle_density"], r["seed"]) for r in rows if r["L"] == L and r["coverage"] == coverage)
            ds = [100 * d for d, _ in sel]
            out = [s for d, s in sel if not 0.05 <= d <= 0.15] if coverage == 0.9 else []
            print(f"| {L // 1024}K | {coverage} | {len(ds)} | {ds[0]:.1f}% / {ds[len(ds) // 2]:.1f}% / {ds[-1]:.1f}% | "
                  f"{out if coverage == 0.9 else '-'} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine_record(), "input": "llm_like_qkv defaults, GQA 32/8, D=128",
                       "query_blocks_sampled": args.query_blocks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
