"""MInference's vertical and slash sums at 128K: the one-window kernel against runs of key blocks.

``last_query_scores_fast`` (the last 64 queries of the LLM-like input, B=1, GQA 32/8, D=128, bf16,
causal) on 16 and 32 query heads, its sums kernel run as:
  window             ``_vertical_slash_sums_kernel``: one program a 64-key block, scoring a window
                     of 128 keys (each key's scores computed twice);
  runs R, Ww / Ss    ``_vertical_slash_sums_loop_kernel``: up to R blocks a program, each block's
                     probabilities computed once and carried to the next; W warps, S stages.
Each is timed by the sums kernel's own duration (torch.profiler, the mean of ``--iters``) and by
``time_ms`` of the whole estimation (log-sum-exp, its combine and the sums). Every variant's
vertical and slash sums are compared with the window kernel's (fp32, the same probabilities
summed in another order: ``rtol 1e-4``); a variant that differs is reported and not timed.

    python benchmarks/probe_sums.py --out /tmp/out/probe-sums.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseattn.bench.inputs import llm_like_qkv  # noqa: E402
from sparseattn.bench.peers import DENSE_PEERS  # noqa: E402
from sparseattn.bench.timing import kernel_us, machine_record, time_ms, write_json  # noqa: E402
from sparseattn.kernels import minference_index as M  # noqa: E402

VARIANTS = {  # name: (SUMS_LOOP, SUMS_MAX_BLOCKS, SUMS_WARPS, SUMS_STAGES)
    "window": (False, 1, 8, 1),
    "runs 16, 4w / 2s": (True, 16, 4, 2),
    "runs 16, 8w / 2s": (True, 16, 8, 2),
    "runs 16, 4w / 1s": (True, 16, 4, 1),
    "runs 4, 4w / 2s": (True, 4, 4, 2),
    "runs 64, 4w / 2s": (True, 64, 4, 2),
}


def configure(loop: bool, blocks: int, warps: int, stages: int) -> None:
    M.SUMS_LOOP, M.SUMS_MAX_BLOCKS, M.SUMS_WARPS, M.SUMS_STAGES = loop, blocks, warps, stages


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    q, k, v = llm_like_qkv(1, 32, 8, args.length, 128, seed=args.seed)
    dense_ms = time_ms(DENSE_PEERS[0].make(q, k, v, True))["ms"]
    record = {"machine": machine_record(), "L": args.length, "seed": args.seed, "dense_cudnn_ms": dense_ms,
              "variants": VARIANTS, "rows": []}
    print(f"cuDNN dense attention: {dense_ms:.2f} ms", flush=True)
    saved = (M.SUMS_LOOP, M.SUMS_MAX_BLOCKS, M.SUMS_WARPS, M.SUMS_STAGES)
    lines = []
    for heads in (16, 32):
        q_last = q[:, :heads, -64:]
        kv = [h // 4 for h in range(heads)]
        fn = lambda: M.last_query_scores_fast(q_last, k, 64, causal=True, kv_heads=kv)  # noqa: E731
        configure(*VARIANTS["window"])
        want = [t.clone() for t in fn()[:2]]
        for name, knobs in VARIANTS.items():
            configure(*knobs)
            got = fn()[:2]
            diff = max(((a - b).abs() / (b.abs() + 1e-6)).max().item() for a, b in zip(got, want))
            row = {"heads": heads, "variant": name, "max_rel_diff": diff, "equal": diff <= 1e-4}
            if row["equal"]:
                row["sums_us"] = sum(us for name, us in kernel_us(fn, iters=args.iters).items()
                                     if "_vertical_slash_sums" in name)
                row["estimation_ms"] = time_ms(fn)["ms"]
                row["estimation_share"] = row["estimation_ms"] / dense_ms
            record["rows"].append(row)
            line = (f"{heads:2d} heads  {name:18s} " + (
                f"sums {row['sums_us']:7.1f} us  estimation {row['estimation_ms']:.3f} ms "
                f"({100 * row['estimation_share']:.2f}% of dense)" if row["equal"] else f"DIFFERS ({diff:.2e})"))
            print(line, flush=True)
            lines.append(line)
    configure(*saved)
    write_json(args.out, record)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
