"""How much of the sparse kernel's cost at low density is data movement (NOTES.md, run 16).

Issue 3's goal is ``time <= 1.2 x d x cuDNN dense`` on random blocks drawn independently per
query head. At 128K a 128-block visit reads a 64 KB K/V tile pair for 8.4 MFLOP (128 FLOP per
byte, under the H100's ~295 FLOP/B ridge), so the kernel is compute-bound only when most visits
hit L2. This script times the same kernel, same densities, with the random pattern drawn

- per query head (the issue's benchmark input),
- per GQA group (the 4 query heads of a KV head share one pattern),
- once for all heads (every KV head's programs read the same block positions),

and fits ``time = a + b x density`` per sharing mode: ``b`` is the cost per computed percent, ``a``
the part that does not scale with the work (per-program prologue/epilogue, the forced sink and
diagonal blocks, the launch tail). cuDNN SDPA dense is timed in the same run; every sparse output
is checked against the fp32-accumulated reference on a few heads before it is timed.

``--compare-asm`` (run 16b; only at commit "Sparse forward: inline index loads for the unmasked
loop", whose ``KernelConfig.asm_index`` it toggles) also times the per-head rows with the index
entries read by ``tl.load`` and adds our dense mode and the sparse path over every causal block.

    python benchmarks/bench_block_locality.py --out /tmp/out/block-locality.json [--length 131072]
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
from sparseattn.kernels.block_sparse import KernelConfig, block_sparse_forward, default_configs
from sparseattn.reference.attention import reference_block_sparse_attention

HEADS, KV_HEADS, D = 32, 8, 128
SHARING = {"per head": 1, "per GQA group": HEADS // KV_HEADS, "all heads": HEADS}


def gate(q, k, v, index, out, rows: int = 1024) -> float:
    """Relative error of the kernel's last ``rows`` queries of heads 0 and 5 against the fp32 reference."""
    errs = []
    L = q.shape[2]
    nb = rows // index.block_q  # the last query blocks: queries are the last positions, so they align
    for h in (0, 5):
        kvh = h // (HEADS // KV_HEADS)
        sub = BlockIndex(index.indices[:, h:h + 1, -nb:].contiguous(), index.counts[:, h:h + 1, -nb:].contiguous(),
                         index.block_q, index.block_k, rows, L)
        ref = reference_block_sparse_attention(q[:, h:h + 1, L - rows:].float(), k[:, kvh:kvh + 1].float(),
                                               v[:, kvh:kvh + 1].float(), sub, causal=True)
        got = out[:, h:h + 1, L - rows:].float()
        errs.append(((got - ref).norm() / ref.norm()).item())
    return max(errs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--densities", default="0.01,0.02,0.05,0.10,0.20")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--compare-asm", action="store_true")
    args = parser.parse_args()
    L, bs = args.length, args.block_size
    q, k, v = random_qkv(1, HEADS, KV_HEADS, L, D, seed=L)
    cudnn = time_ms(DENSE_PEERS[0].make(q, k, v, True))["ms"]
    result = {"suite": "block_locality", "machine": machine_record(),
              "shape": dict(batch=1, q_heads=HEADS, kv_heads=KV_HEADS, head_dim=D, length=L, block_size=bs,
                            dtype="bfloat16", causal=True),
              "cudnn_dense_ms": cudnn, "records": [], "fits": {}}
    old_cfg = None
    if args.compare_asm:
        if "asm_index" not in {f.name for f in dataclasses.fields(KernelConfig)}:
            parser.error("--compare-asm needs the commit that had KernelConfig.asm_index (run 16b; reverted)")
        old_cfg = dataclasses.replace(default_configs(D, torch.bfloat16).forward, asm_index=False)
        dense_ms = time_ms(lambda: block_sparse_forward(q, k, v, None))["ms"]
        every = BlockIndex.dense(1, HEADS, L, L, bs, bs, device=q.device)
        every_ms = time_ms(lambda: block_sparse_forward(q, k, v, every))["ms"]
        every_old = time_ms(lambda: block_sparse_forward(q, k, v, every, config=old_cfg))["ms"]
        result["per_block"] = {"dense_mode_ms": dense_ms, "every_block_ms": every_ms,
                               "every_block_tl_load_ms": every_old}
        print(json.dumps(result["per_block"]), flush=True)
        every = None
    for name, group in SHARING.items():
        for density in [float(x) for x in args.densities.split(",")]:
            index = random_block_index(1, HEADS, L, L, bs, density, seed=L + 1, group_size=group)
            d = float(index.density().mean())
            out = block_sparse_forward(q, k, v, index)[0]
            err = gate(q, k, v, index, out)
            rec = {"sharing": name, "target": density, "density": d, "rel_err": err, "gate_ok": err < 2e-2}
            if rec["gate_ok"]:
                ms = time_ms(lambda: block_sparse_forward(q, k, v, index))["ms"]
                rec.update(ms=ms, x_d_cudnn=ms / (d * cudnn))
                if args.compare_asm and group == 1:
                    ms_old = time_ms(lambda: block_sparse_forward(q, k, v, index, config=old_cfg))["ms"]
                    rec.update(ms_tl_load=ms_old, x_d_cudnn_tl_load=ms_old / (d * cudnn))
            result["records"].append(rec)
            print(json.dumps(rec), flush=True)
            index = out = None
        pts = [(r["density"], r["ms"]) for r in result["records"] if r["sharing"] == name and "ms" in r]
        if len(pts) >= 2:
            intercept, slope = linear_fit(pts)
            result["fits"][name] = {"intercept_ms": intercept, "ms_per_percent": slope / 100,
                                    "per_percent_x_cudnn": slope / 100 / (cudnn / 100)}
    write_json(args.out, result)
    print(f"\nDevice: {result['machine'].get('device')}; L={L}, {bs}-blocks, B=1 GQA 32/8 D=128 bf16 causal; "
          f"cuDNN dense {cudnn:.2f} ms")
    if "per_block" in result:
        pb = result["per_block"]
        print(f"dense mode {pb['dense_mode_ms']:.2f} ms; every causal block through the index "
              f"{pb['every_block_ms']:.2f} ms (tl.load index: {pb['every_block_tl_load_ms']:.2f} ms)")
    print("| sharing | density | ms | x d x cuDNN | tl.load index: ms | x d x cuDNN |")
    print("|---|---|---|---|---|---|")
    for r in result["records"]:
        if "ms" in r:
            old = (f"{r['ms_tl_load']:.2f} | {r['x_d_cudnn_tl_load']:.2f}" if "ms_tl_load" in r else " | ")
            print(f"| {r['sharing']} | {100 * r['density']:.1f}% | {r['ms']:.2f} | {r['x_d_cudnn']:.2f} | {old} |")
        else:
            print(f"| {r['sharing']} | {100 * r['density']:.1f}% | gate failed ({r['rel_err']:.2e}) | |")
    for name, fit in result["fits"].items():
        print(f"fit {name}: {fit['intercept_ms']:.2f} ms + {fit['ms_per_percent']:.3f} ms per % "
              f"({fit['per_percent_x_cudnn']:.2f} x cuDNN's per %)")


if __name__ == "__main__":
    main()
