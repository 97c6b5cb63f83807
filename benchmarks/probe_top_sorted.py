"""The vertical-slash tables' top-k at 128K: ``torch.topk`` + sort against ``_row_top_k_kernel``.

On the estimation scores of the LLM-like input (``last_query_scores_fast``: last 64 queries, B=1,
GQA 32/8, D=128, bf16, causal; the forced keys and offsets set to +inf as the tables do), for 16
and 32 query heads and the seed's sizes (1000 verticals, 6096 slashes: 1030 keys and 6196 offsets
a head after forcing), the keys and the offsets selected as:
  torch          ``_top_sorted``: ``torch.topk`` of the largest size, masked per head, sorted;
  kernel B / Ww  ``_top_sorted_fast``: one ``_row_top_k_kernel`` launch, B scores a loop iteration,
                 W warps.
Each variant's output is compared with the torch path's first (the kernel keeps ties at a cut
lowest position first, ``torch.topk`` in no set order: rows that differ are counted, and a row
that differs with no tie at its cut fails the variant). Then: its kernels' GPU time
(torch.profiler, the mean of ``--iters``), its wall time (``time_ms``) and its host time with the
GPU kept busy (``host_ms``), keys and offsets together.

    python benchmarks/probe_top_sorted.py --out /tmp/out/probe-top-sorted.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseattn.bench.inputs import llm_like_qkv  # noqa: E402
from sparseattn.bench.peers import DENSE_PEERS  # noqa: E402
from sparseattn.bench.timing import host_ms, kernel_us, machine_record, time_ms, write_json  # noqa: E402
from sparseattn.kernels import minference_index as M  # noqa: E402
from sparseattn.reference.minference import FORCED_SLASHES, FORCED_VERTICALS, selection_sizes  # noqa: E402

VARIANTS = {"torch": None, "kernel 2048 / 16w": (2048, 16), "kernel 1024 / 16w": (1024, 16),
            "kernel 1024 / 8w": (1024, 8), "kernel 4096 / 8w": (4096, 8)}


def untied_rows_differ(got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor, sizes: list[int]) -> tuple:
    """(rows that differ, of which with no tie at the cut): a tie at the cut is a kept and a dropped
    position of equal score."""
    differ = untied = 0
    for b in range(got.shape[0]):
        for h, n in enumerate(sizes):
            if torch.equal(got[b, h, :n], want[b, h, :n]):
                continue
            differ += 1
            row = scores[b, h]
            kept = torch.zeros_like(row, dtype=torch.bool)
            kept[want[b, h, :n]] = True
            untied += int(row[kept].min() > row[~kept].max()) if (~kept).any() else 1
    return differ, untied


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    L = args.length
    q, k, v = llm_like_qkv(1, 32, 8, L, 128, seed=args.seed)
    dense_ms = time_ms(DENSE_PEERS[0].make(q, k, v, True))["ms"]
    nv, ns = selection_sizes(1000, 6096, L, L)
    record = {"machine": machine_record(), "L": L, "seed": args.seed, "dense_cudnn_ms": dense_ms, "nv": nv,
              "ns": ns, "variants": VARIANTS, "rows": []}
    print(f"cuDNN dense attention: {dense_ms:.2f} ms; {nv} keys and {ns} offsets a head", flush=True)
    saved = M.TOP_K_BLOCK, M.TOP_K_WARPS
    lines = []
    for heads in (16, 32):
        vertical, slash, _ = M.last_query_scores_fast(q[:, :heads, -64:], k, 64, causal=True,
                                                      kv_heads=[h // 4 for h in range(heads)])
        vertical[..., :FORCED_VERTICALS] = float("inf")
        slash[..., :FORCED_SLASHES] = float("inf")
        cases = ((vertical, [nv] * heads, M._BIG_KEY, torch.int32), (slash, [ns] * heads, M._BIG_OFFSET, torch.int64))
        want = [M._top_sorted(s, n, pad) for s, n, pad, _ in cases]
        for name, knobs in VARIANTS.items():
            if knobs is None:
                fn = lambda: [M._top_sorted(s, n, pad) for s, n, pad, _ in cases]  # noqa: E731
            else:
                M.TOP_K_BLOCK, M.TOP_K_WARPS = knobs
                fn = lambda: [M._top_sorted_fast(s, n, pad, dtype) for s, n, pad, dtype in cases]  # noqa: E731
            got = fn()
            differ = [untied_rows_differ(g.long(), w, s, n) for g, w, (s, n, _, _) in zip(got, want, cases)]
            row = {"heads": heads, "variant": name, "rows_differ": sum(d for d, _ in differ),
                   "untied_rows_differ": sum(u for _, u in differ)}
            row["equal"] = row["untied_rows_differ"] == 0
            if row["equal"]:
                row["gpu_us"] = sum(kernel_us(fn, iters=args.iters).values())
                row["wall_ms"] = time_ms(fn)["ms"]
                row["host_ms"] = host_ms(fn, iters=args.iters)
            record["rows"].append(row)
            line = f"{heads:2d} heads  {name:18s} " + (
                f"GPU {row['gpu_us']:7.1f} us  wall {row['wall_ms']:.3f} ms  host {row['host_ms']:.3f} ms  "
                f"({row['rows_differ']} rows differ at ties)" if row["equal"]
                else f"DIFFERS: {row['untied_rows_differ']} rows with no tie at the cut")
            print(line, flush=True)
            lines.append(line)
    M.TOP_K_BLOCK, M.TOP_K_WARPS = saved
    write_json(args.out, record)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
