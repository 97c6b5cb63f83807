"""Where MInference's selection spends its time when heads mix patterns (run 20c: 13-19 ms at 128K,
against 4.1-4.6 ms when every head is vertical-and-slash).

At 128K (B=1, GQA 32/8, D=128, bf16, LLM-like input, seed 1) with a per-head mix like the one the
layer-mean allocation picked in run 20c (8 heads block-sparse top 64, 8 top 128, 8 vertical-and-slash
256/256, 8 at 2048/4096), it times with CUDA events: the whole ``select_blocks``; its parts
(``block_sparse_select_fast`` on the 16 block heads, ``_vertical_and_slash`` on all 32, the merge);
block-sparse top 64 on all heads with the Triton top-k and with the torch backend; and cuDNN dense
attention in the same process, so each part is also a share of dense time (issue 6: <= 2%). It
prints torch.profiler's top CUDA kernels of one selection.

    python benchmarks/profile_minference_select.py --out /tmp/out/minference-select-profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseattn.bench.inputs import llm_like_qkv  # noqa: E402
from sparseattn.bench.peers import DENSE_PEERS  # noqa: E402
from sparseattn.bench.timing import machine_record, time_ms  # noqa: E402
from sparseattn.methods import minference as M  # noqa: E402

MIX = ([("block_sparse", 64, 0)] * 8 + [("block_sparse", 128, 0)] * 8
       + [("vertical_and_slash", 256, 256)] * 8 + [("vertical_and_slash", 2048, 4096)] * 8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    L = args.length
    q, k, v = llm_like_qkv(1, 32, 8, L, 128, seed=args.seed)
    cfg = M.MInferenceConfig(head_patterns=tuple(MIX), block_size=64)
    block_heads = [h for h, (p, _, _) in enumerate(MIX) if p == "block_sparse"]
    tops = [MIX[h][1] for h in block_heads]
    sizes = [(v, s) if p == "vertical_and_slash" else (1, 1) for p, v, s in MIX]
    parts = {
        "select_blocks (mixed)": lambda: M.select_blocks(q, k, cfg, causal=True),
        "block_sparse_select_fast (16 heads)": lambda: M.block_sparse_select_fast(
            q, k, top_k=tops, block_size=64, causal=True, heads=block_heads),
        "vertical_and_slash (32 heads)": lambda: M._vertical_and_slash(
            q, k, [v for v, _ in sizes], [s for _, s in sizes], cfg, True),
        "vertical_and_slash 512/512 (32 heads, pure)": lambda: M.select_blocks(
            q, k, M.MInferenceConfig(vertical_size=512, slash_size=512), causal=True),
        "block_sparse top 64 (32 heads, pure)": lambda: M.select_blocks(
            q, k, M.MInferenceConfig(pattern="block_sparse", top_k=64), causal=True),
        "block_sparse top 64 (32 heads, torch backend)": lambda: M.block_sparse_select_fast(
            q, k, top_k=64, block_size=64, causal=True, backend="torch"),
        "block_sparse top 256 (32 heads)": lambda: M.block_sparse_select_fast(
            q, k, top_k=256, block_size=64, causal=True),
        "block_sparse top 64 (32 heads, 128-blocks)": lambda: M.block_sparse_select_fast(
            q, k, top_k=64, block_size=128, causal=True),
    }
    dense = DENSE_PEERS[0].make(q, k, v, True)  # cuDNN SDPA, causal, enable_gqa
    record = {"machine": machine_record(), "L": L, "seed": args.seed, "mix": MIX, "ms": {},
              "dense_cudnn_ms": time_ms(dense)["ms"], "percent_of_dense": {}}
    print(f"cuDNN dense attention: {record['dense_cudnn_ms']:.2f} ms", flush=True)
    for name, fn in parts.items():
        record["ms"][name] = time_ms(fn)["ms"]
        record["percent_of_dense"][name] = 100 * record["ms"][name] / record["dense_cudnn_ms"]
        print(f"{name}: {record['ms'][name]:.2f} ms ({record['percent_of_dense'][name]:.1f}% of dense)", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        parts["select_blocks (mixed)"]()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
    record["profile"] = table
    print(table)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
