"""Sweep the block-sparse kernel's tile configs on the GPU (forward dense/sparse, backward dense).

Usage: python benchmarks/sweep_kernel_configs.py [--out sweep.json] [--lengths 32768,131072]
GQA 32/8, D=128, bf16, causal; sparse = random blocks at 10% + sink + diagonal, block 128.
Every config is checked against the default config's output before it is timed.

``--block-size 64`` sweeps the narrow tiles of 64-row selection blocks instead (sparse rows only);
``--sparse-backward`` times the backward over the 10% index (dQ stages) at ``--backward-length``;
``--skip-backward`` leaves out the dense backward sweep.
"""

import argparse
import json

import torch

from sparseattn.bench.inputs import random_block_index, random_qkv
from sparseattn.bench.peers import DENSE_PEERS
from sparseattn.bench.timing import causal_dense_flops, machine_record, time_ms
from sparseattn.kernels.block_sparse import (AttentionConfigs, KernelConfig, block_sparse_backward,
                                             block_sparse_forward, default_configs)

FORWARD = [(128, 128, 8, 3), (128, 128, 8, 3, False), (128, 64, 8, 3), (128, 64, 8, 3, False),
           (128, 128, 8, 4), (64, 128, 4, 3)]
BACKWARD_DKDV = [(32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3)]
BACKWARD_DQ = [(128, 64, 8, 2), (128, 64, 4, 3)]
FORWARD_NARROW = [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 64, 4, 5), (64, 64, 8, 3), (64, 32, 4, 4)]
SPARSE_BACKWARD_DQ = [(128, 64, 8, 2), (128, 64, 8, 3)]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def dense_backward_sweep(L, rows):
    """The dense backward's dK/dV x dQ configs against FA2 SDPA's backward at length ``L``."""
    q, k, v = random_qkv(1, 32, 8, L, 128, seed=3)
    do = torch.randn_like(q)
    out, lse = block_sparse_forward(q, k, v, None)
    base = default_configs(128, torch.bfloat16)
    ref = block_sparse_backward(do, q, k, v, out, lse, None)
    fa2 = DENSE_PEERS[1].make(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, grad=True)
    o = fa2()
    t_fa2 = time_ms(lambda: o.backward(do, retain_graph=True))["ms"]
    rows.append(dict(L=L, kind="fa2_backward", ms=t_fa2))
    print(f"L={L} FA2 SDPA backward {t_fa2:.2f} ms", flush=True)
    q, k, v = q.detach(), k.detach(), v.detach()
    for dkdv in BACKWARD_DKDV:
        for dq in BACKWARD_DQ:
            cfgs = AttentionConfigs(base.forward, KernelConfig(*dkdv), KernelConfig(*dq))
            try:
                got = block_sparse_backward(do, q, k, v, out, lse, None, configs=cfgs)
                err = max(rel(a, b) for a, b in zip(got, ref))
                t = time_ms(lambda: block_sparse_backward(do, q, k, v, out, lse, None, configs=cfgs))["ms"]
            except Exception as exc:
                print(f"backward {dkdv} {dq}: failed {type(exc).__name__}", flush=True)
                continue
            rows.append(dict(L=L, kind="backward", dkdv=dkdv, dq=dq, ms=t, err=err, vs_fa2=t_fa2 / t))
            print(f"L={L} backward dkdv {dkdv} dq {dq}: {t:7.2f} ms  {t_fa2 / t:.2f} x FA2 thr  err {err:.1e}",
                  flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--backward-length", type=int, default=8192)
    parser.add_argument("--out", default=None)
    parser.add_argument("--block-size", type=int, default=128, choices=(64, 128))
    parser.add_argument("--sparse-backward", action="store_true")
    parser.add_argument("--skip-backward", action="store_true")
    args = parser.parse_args()
    rows = []
    forward = FORWARD if args.block_size == 128 else FORWARD_NARROW
    for L in [int(x) for x in args.lengths.split(",")]:
        q, k, v = random_qkv(1, 32, 8, L, 128, seed=L)
        idx = random_block_index(1, 32, L, L, args.block_size, 0.1, seed=7, device="cuda")
        d = idx.density().mean().item()
        flops = causal_dense_flops(1, 32, L, L, 128)
        cud = time_ms(DENSE_PEERS[0].make(q, k, v, True))["ms"]
        rows.append(dict(L=L, kind="cudnn", config=None, ms=cud, tflops=flops / cud / 1e9))
        print(f"L={L} cuDNN {cud:.2f} ms", flush=True)
        ref_dense = block_sparse_forward(q, k, v, None)[0]
        ref_sparse = block_sparse_forward(q, k, v, idx)[0]
        for cfg in forward:
            kc = KernelConfig(*cfg)
            for kind, index, ref in (("dense", None, ref_dense), ("sparse", idx, ref_sparse)):
                if kind == "dense" and (not kc.split_masked or args.block_size != 128):
                    continue  # the switch only affects sparse rows
                try:
                    err = rel(block_sparse_forward(q, k, v, index, config=kc)[0], ref)
                    t = time_ms(lambda: block_sparse_forward(q, k, v, index, config=kc))["ms"]
                except Exception as exc:  # a config the compiler rejects (shared memory) is skipped
                    print(f"L={L} {kind} {cfg}: failed {type(exc).__name__}", flush=True)
                    continue
                ratio = cud / t if kind == "dense" else t / (d * cud)
                rows.append(dict(L=L, kind=kind, config=cfg, ms=t, err=err, density=d if index else 1.0,
                                 ratio=ratio, block_size=args.block_size))
                label = "x cuDNN thr" if kind == "dense" else "x (d x cuDNN)"
                print(f"L={L} {kind:6} {cfg}: {t:8.2f} ms  {ratio:.2f} {label}  err {err:.1e}", flush=True)
        del q, k, v, idx, ref_dense, ref_sparse
        torch.cuda.empty_cache()
    L = args.backward_length
    if args.sparse_backward:
        q, k, v = random_qkv(1, 32, 8, L, 128, seed=3)
        idx = random_block_index(1, 32, L, L, 128, 0.1, seed=7, device="cuda")
        out, lse = block_sparse_forward(q, k, v, idx)
        do = torch.randn_like(q)
        base = default_configs(128, torch.bfloat16)
        ref = block_sparse_backward(do, q, k, v, out, lse, idx)
        for dq in SPARSE_BACKWARD_DQ:
            cfgs = AttentionConfigs(base.forward, base.backward_dkdv, KernelConfig(*dq))
            got = block_sparse_backward(do, q, k, v, out, lse, idx, configs=cfgs)
            err = max(rel(a, b) for a, b in zip(got, ref))
            t = time_ms(lambda: block_sparse_backward(do, q, k, v, out, lse, idx, configs=cfgs))["ms"]
            rows.append(dict(L=L, kind="sparse_backward", dq=dq, ms=t, err=err, density=idx.density().mean().item()))
            print(f"L={L} sparse backward (10%) dq {dq}: {t:7.2f} ms  err {err:.1e}", flush=True)
        del q, k, v, idx, out, lse, do, ref
    if not args.skip_backward:
        dense_backward_sweep(args.backward_length, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine_record(), "rows": rows}, f, indent=1)
    best = {}
    for r in rows:
        key = (r["L"], r["kind"])
        if r["kind"] in ("dense", "sparse", "backward", "sparse_backward") and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    print("\nBest per case:")
    for (L, kind), r in sorted(best.items()):
        print(f"  L={L} {kind}: {r.get('config') or (r.get('dkdv'), r.get('dq'))} {r['ms']:.2f} ms")


if __name__ == "__main__":
    main()
