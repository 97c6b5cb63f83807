"""Persistent sparse forward programs against the one-program-per-query-tile grid, in one run.

``KernelConfig.persistent = n`` launches ``n`` programs per SM that compute query-tile rows in turn
(``_fwd_persistent_kernel``): the next row's count, first index entry and masked tail load while the
current row computes, and no program launch sits between rows. The grid kernel (``_fwd_kernel``)
starts every row with a chain of three dependent loads and a cold pipeline, which at ~25 tiles a row
(5% of 128K) is the ~1.7 ms fixed cost of NOTES.md run 19f. Variants, all on the same inputs:

- ``grid``: the default ``_fwd_kernel`` (unmasked prefix loop + masked suffix loop);
- ``persistent split``: persistent programs, the same two loops a row;
- ``persistent one loop``: persistent programs, one loop a row with a run-time element mask;
- ``rows split`` / ``rows one loop``: the persistent kernel with one program per row, which
  separates the effect of the prefetched row data from that of the persistent grid.

Cases (B = 1, GQA 32/8, D = 128, bf16, causal, ``--length``): random 128-blocks per query head at
``--densities`` (issue 3's input) with a linear fit per variant, every causal block through the
index, and random 64-blocks (narrow 64x64 tiles, ``--narrow-per-sm`` programs per SM). Every
variant's output is compared with the grid kernel's (``max_abs_diff``; the math is the same, so 0 is
expected) and the grid kernel's with the fp32 reference on the last 1024 queries of two heads. The
table printed last is the summary; the JSON holds every record.

    python benchmarks/bench_persistent.py --out /tmp/out/persistent.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from sparseattn.bench.inputs import random_block_index, random_qkv
from sparseattn.bench.peers import DENSE_PEERS
from sparseattn.bench.timing import linear_fit, machine_record, time_ms, write_json
from sparseattn.index import BlockIndex
from sparseattn.kernels import block_sparse as bs

from bench_block_locality import gate  # this folder is sys.path[0] when run as a script

HEADS, KV_HEADS, D = 32, 8, 128


VARIANTS = ("grid", "persistent split", "persistent one loop", "rows split", "rows one loop")


def variants(cfg: bs.KernelConfig, per_sm: int, num_rows: int, names=VARIANTS) -> dict:
    """name -> (config, PERSISTENT_PROGRAMS override)."""
    one = dataclasses.replace(cfg, split_masked=False)
    every = {
        "grid": (cfg, 0),
        "persistent split": (dataclasses.replace(cfg, persistent=per_sm), 0),
        "persistent one loop": (dataclasses.replace(one, persistent=per_sm), 0),
        "rows split": (dataclasses.replace(cfg, persistent=1), num_rows),
        "rows one loop": (dataclasses.replace(one, persistent=1), num_rows),
    }
    return {name: every[name] for name in names}


def run_case(q, k, v, index, per_sm, record, records, cudnn, names=VARIANTS):
    cfg = bs.default_configs(D, q.dtype).forward_for(index)
    num_rows = HEADS * index.num_q_blocks * (index.block_q // min(cfg.block_m, index.block_q))
    outs, times = {}, {}
    for name, (vcfg, programs) in variants(cfg, per_sm, num_rows, names).items():
        def call(vcfg=vcfg, programs=programs):
            bs.PERSISTENT_PROGRAMS = programs
            try:
                return bs.block_sparse_forward(q, k, v, index, config=vcfg)[0]
            finally:
                bs.PERSISTENT_PROGRAMS = 0
        outs[name] = call()
        times[name] = time_ms(call)["ms"]
    times["grid again"] = time_ms(lambda: bs.block_sparse_forward(q, k, v, index)[0])["ms"]
    d = record["density"]
    record.update(ms=times, max_abs_diff={n: (o.float() - outs["grid"].float()).abs().max().item()
                                          for n, o in outs.items()},
                  x_d_cudnn={n: t / (d * cudnn) for n, t in times.items()})
    records.append(record)
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--densities", default="0.01,0.02,0.05,0.10,0.20,0.50")
    parser.add_argument("--narrow-densities", default="0.05,0.10")
    parser.add_argument("--per-sm", type=int, default=1, help="persistent programs per SM, 128x128 tiles")
    parser.add_argument("--narrow-per-sm", type=int, default=2, help="persistent programs per SM, 64x64 tiles")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--skip-every", action="store_true", help="leave out every causal block through the index")
    args = parser.parse_args()
    names = tuple(n for n in args.variants.split(",") if n)
    if "grid" not in names or not set(names) <= set(VARIANTS):
        parser.error(f"--variants must include grid and name only {VARIANTS}")
    L = args.length
    q, k, v = random_qkv(1, HEADS, KV_HEADS, L, D, seed=L)
    cudnn = time_ms(DENSE_PEERS[0].make(q, k, v, True))["ms"]
    result = {"suite": "persistent", "machine": machine_record(),
              "shape": dict(batch=1, q_heads=HEADS, kv_heads=KV_HEADS, head_dim=D, length=L, dtype="bfloat16",
                            causal=True), "cudnn_dense_ms": cudnn, "records": []}
    recs = result["records"]
    print(f"cuDNN dense {cudnn:.2f} ms", flush=True)
    dense_ms = time_ms(lambda: bs.block_sparse_forward(q, k, v, None)[0])["ms"]
    result["dense_mode_ms"] = dense_ms
    if not args.skip_every:
        every = BlockIndex.dense(1, HEADS, L, L, 128, 128, device=q.device)
        run_case(q, k, v, every, args.per_sm, {"case": "every causal block", "block": 128, "density": 1.0}, recs,
                 cudnn, names)
        every = None
    for block, per_sm, densities in ((128, args.per_sm, args.densities), (64, args.narrow_per_sm, args.narrow_densities)):
        for target in [float(x) for x in densities.split(",") if x.strip()]:
            index = random_block_index(1, HEADS, L, L, block, target, seed=L + 1)
            d = float(index.density().mean())
            err = gate(q, k, v, index, bs.block_sparse_forward(q, k, v, index)[0])
            rec = {"case": f"random {block}-blocks", "block": block, "target": target, "density": d, "rel_err": err}
            if err > 2e-2:
                rec["gate_failed"] = True
                recs.append(rec)
                print(json.dumps(rec), flush=True)
                continue
            run_case(q, k, v, index, per_sm, rec, recs, cudnn, names)
            index = None
    fits = {}
    pts = [r for r in recs if r.get("block") == 128 and "target" in r and "ms" in r and r["target"] <= 0.2]
    if len(pts) >= 2:
        for name in pts[0]["ms"]:
            a, b = linear_fit([(r["density"], r["ms"][name]) for r in pts])
            fits[name] = {"intercept_ms": a, "ms_per_percent": b / 100, "per_percent_x_cudnn": b / cudnn}
    result["fits"] = fits
    write_json(args.out, result)

    names = list(recs[0]["ms"])
    print(f"\nDevice: {result['machine'].get('device')}; B=1 GQA 32/8 D=128 bf16 causal; L={L}; "
          f"cuDNN dense {cudnn:.2f} ms; dense mode {dense_ms:.2f} ms")
    print("| case | density | " + " | ".join(names) + " | max abs diff vs grid |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for r in recs:
        if "ms" not in r:
            print(f"| {r['case']} | {100 * r['density']:.1f}% | gate failed ({r['rel_err']:.2e}) |")
            continue
        cells = " | ".join(f"{r['ms'][n]:.2f} ({r['x_d_cudnn'][n]:.2f})" for n in names)
        print(f"| {r['case']} | {100 * r['density']:.1f}% | {cells} | {max(r['max_abs_diff'].values()):.1e} |")
    print("(ms, and in brackets x d x cuDNN)")
    for name, f in fits.items():
        print(f"fit {name}: {f['intercept_ms']:.2f} ms + {f['ms_per_percent']:.3f} ms per % "
              f"({f['per_percent_x_cudnn']:.2f} x cuDNN's per %)")


if __name__ == "__main__":
    main()
