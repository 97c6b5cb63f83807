"""The block-sparse top-k kernel alone (``kernels.minference_index.block_top_k_``): warps per row
program against row width and top-k, on pooled scores of the LLM-like input at 128K.

One head's rows as ``block_sparse_select_fast`` once launched them (64-blocks: 2048 x 2048 scores;
128-blocks: 1024 x 1024, four heads). Timed with CUDA events after warm-up, so a figure is one
launch as the host issues it: on the H100 machine ~70 us of it is Triton's host launch overhead
against ~50 us of kernel (NOTES.md run 22g; ``probe_block_top_k.py`` reports kernel durations).

    python benchmarks/bench_block_top_k.py --out /tmp/out/block-top-k.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseattn.bench.inputs import llm_like_qkv  # noqa: E402
from sparseattn.bench.timing import machine_record, time_ms  # noqa: E402
from sparseattn.kernels.minference_index import block_top_k_  # noqa: E402
from sparseattn.methods.minference import _block_mean_pool  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warps", default="1,2,4,8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    L = args.length
    q, k, _ = llm_like_qkv(1, 32, 8, L, 128, seed=args.seed)
    record = {"machine": machine_record(), "L": L, "seed": args.seed, "rows": []}
    for bs, heads in ((64, 1), (128, 4)):
        q_pool, k_pool = _block_mean_pool(q[:, :heads], bs), _block_mean_pool(k[:, :1], bs)
        scores = q_pool @ k_pool.transpose(-1, -2)  # [1, heads, nq, nk]
        nq, nk = scores.shape[-2:]
        out_heads = torch.arange(heads, device=q.device)
        for top in (16, 64, 256):
            tops = torch.full((heads,), top, dtype=torch.int64, device=q.device)
            indices = torch.empty(1, heads, nq, min(top + 3, nk), dtype=torch.int32, device=q.device)
            counts = torch.empty(1, heads, nq, dtype=torch.int32, device=q.device)
            for warps in (int(w) for w in args.warps.split(",")):
                def run():
                    block_top_k_(scores, tops, indices, counts, head0=0, row0=0, q_len=L, k_len=L, block_size=bs,
                                 causal=True, head_dim=128, out_heads=out_heads, num_warps=warps)
                ms = time_ms(run)["ms"]
                row = {"block_size": bs, "heads": heads, "rows": heads * nq, "nk": nk, "top": top, "warps": warps,
                       "us": 1000 * ms, "us_per_row": 1000 * ms / (heads * nq)}
                record["rows"].append(row)
                print(f"bs {bs:4d} nk {nk:5d} rows {heads * nq:5d} top {top:4d} warps {warps}: "
                      f"{row['us']:8.1f} us ({row['us_per_row'] * 1000:.1f} ns/row)", flush=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
