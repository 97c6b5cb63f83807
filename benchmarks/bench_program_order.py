"""Program order of the query-tile kernels: KV-head-major vs head-major (NOTES.md, run 10).

Up to run 9 the forward, dQ and vertical-slash grids were ``(B * Hq, n_tiles)``: the resident
programs were all 32 heads of a few query tiles, so the 4 query heads x ~4 tiles of one KV head
that run together rarely selected the same K/V block, and per-head random blocks at 128K streamed
almost every selected tile from HBM (128 FLOP per byte at 128-blocks, below the H100's ~295).
``KernelConfig.kv_major`` (the default since run 10) launches one KV head's programs together,
its G query heads fastest, then the query tiles.

This script times both orders in one run on the GPU (B=1, GQA 32/8, D=128, bf16, causal), with
cuDNN SDPA dense and FlexAttention on the same blocks as baselines:

- dense forward (32K, 128K) and the dense backward at 32K (dQ changes order; FA2 SDPA baseline);
- random per-head 128-blocks at 5/10/20% (128K) and 10% (32K), random 64-blocks at 10%;
- FlexPrefill's selection (default config: 128-blocks) and MInference's vertical-slash index (v512/s512, 128-blocks)
  on the LLM-like input at 128K;
- a few tile configs in the new order on the 128K 10% cases.

Run 11's XAttention-estimation rows came from this script at commit "XAttention estimation launches
one head's query tiles together": that order lost (18.08 vs 14.62 ms at S = 16, 128K) and was
removed with its rows.

Every variant's output is checked against the head-major output (bf16 rounding only) before
any time is recorded.

    python benchmarks/bench_program_order.py --out /tmp/out/program-order.json [--lengths 32768,131072]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from sparseattn.api import resolve_config
from sparseattn.bench.inputs import llm_like_qkv, random_block_index, random_qkv
from sparseattn.bench.peers import DENSE_PEERS, SPARSE_PEERS
from sparseattn.bench.timing import machine_record, time_ms, write_json
from sparseattn.kernels.block_sparse import (AttentionConfigs, KernelConfig, block_sparse_backward,
                                             block_sparse_forward, default_configs)
from sparseattn.kernels.minference_index import minference_select_fast
from sparseattn.kernels.vertical_slash import vertical_slash_forward
from sparseattn.methods import get_method

HEADS, KV_HEADS, D = 32, 8, 128
TABLE = default_configs(D, torch.bfloat16, interpret=False)
EXTRA_128 = [KernelConfig(128, 128, num_warps=8, num_stages=2), KernelConfig(128, 128, num_warps=8, num_stages=4),
             KernelConfig(128, 64, num_warps=8, num_stages=3), KernelConfig(128, 64, num_warps=4, num_stages=3)]
EXTRA_64 = [KernelConfig(64, 64, num_warps=4, num_stages=2), KernelConfig(64, 64, num_warps=4, num_stages=4),
            KernelConfig(64, 32, num_warps=4, num_stages=3)]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _orders(cfg):
    return {"head_major": dataclasses.replace(cfg, kv_major=False), "kv_major": dataclasses.replace(cfg, kv_major=True)}


def _cfg_name(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}/{cfg.num_warps}w/{cfg.num_stages}s"


def time_variants(run, base_cfg, extra=(), flex=None) -> dict:
    """``run(cfg) -> out``: gate every variant against head-major, then time each."""
    variants = _orders(base_cfg)
    for cfg in extra:
        variants[f"kv_major {_cfg_name(cfg)}"] = cfg
    ref = run(variants["head_major"])
    rec = {"config": _cfg_name(base_cfg), "rel_err": {}, "ms": {}}
    for name, cfg in variants.items():
        try:
            rec["rel_err"][name] = _rel(run(cfg), ref)
        except Exception as err:  # noqa: BLE001 - a config the compiler rejects is a result
            rec.setdefault("errors", {})[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    if flex is not None:
        try:
            rec["rel_err"]["flex"] = _rel(flex(), ref)
        except Exception as err:  # noqa: BLE001
            rec.setdefault("errors", {})["flex"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            flex = None
    ref = None
    rec["gate_ok"] = all(e < 2e-2 for e in rec["rel_err"].values())
    if not rec["gate_ok"]:
        return rec
    for name, cfg in variants.items():
        if name in rec["rel_err"]:
            rec["ms"][name] = time_ms(lambda: run(cfg))["ms"]
    if flex is not None:
        rec["ms"]["flex"] = time_ms(flex)["ms"]
    return rec


def flex_for(q, k, v, index):
    flex = next((p for p in SPARSE_PEERS if p.name.startswith("flex")), None)
    try:
        return flex.make(q, k, v, True, index) if flex is not None else None
    except Exception as err:  # noqa: BLE001 - recorded by the caller as a missing column
        print("flex unavailable:", type(err).__name__, str(err).splitlines()[0][:200], flush=True)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", default="32768,131072")
    args = parser.parse_args()
    result = {"suite": "program_order", "machine": machine_record(),
              "shape": dict(batch=1, q_heads=HEADS, kv_heads=KV_HEADS, head_dim=D, dtype="bfloat16", causal=True),
              "records": []}

    def add(rec, **fields):
        rec.update(fields)
        result["records"].append(rec)
        print(json.dumps(rec), flush=True)

    for L in [int(x) for x in args.lengths.split(",")]:
        q, k, v = random_qkv(1, HEADS, KV_HEADS, L, D, seed=L)
        t_dense = time_ms(DENSE_PEERS[0].make(q, k, v, True))["ms"]
        add(time_variants(lambda c: block_sparse_forward(q, k, v, None, config=c)[0], TABLE.forward),
            L=L, case="dense forward", density=1.0, cudnn_ms=t_dense)
        densities = (0.05, 0.10, 0.20) if L >= 131072 else (0.10,)
        for density in densities:
            index = random_block_index(1, HEADS, L, L, 128, density, seed=L + 1)
            d = float(index.density().mean())
            add(time_variants(lambda c: block_sparse_forward(q, k, v, index, config=c)[0], TABLE.forward,
                              EXTRA_128 if density == 0.10 and L >= 131072 else (), flex_for(q, k, v, index)),
                L=L, case=f"random {int(density * 100)}%, 128-blocks", density=d, cudnn_ms=t_dense)
        index = random_block_index(1, HEADS, L, L, 64, 0.10, seed=L + 2)
        add(time_variants(lambda c: block_sparse_forward(q, k, v, index, config=c)[0], TABLE.forward_narrow,
                          EXTRA_64 if L >= 131072 else (), flex_for(q, k, v, index)),
            L=L, case="random 10%, 64-blocks", density=float(index.density().mean()), cudnn_ms=t_dense)
        index = None
        if L <= 32768:  # the dense backward: dQ changes order, dK/dV does not
            do = torch.randn_like(q)
            out, lse = block_sparse_forward(q, k, v, None)

            def backward(c):
                cfgs = AttentionConfigs(TABLE.forward, TABLE.backward_dkdv, c)
                return block_sparse_backward(do, q, k, v, out, lse, None, configs=cfgs)[0]

            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            fa2 = DENSE_PEERS[1].make(qg, kg, vg, True, grad=True)
            o = fa2()
            t_fa2 = time_ms(lambda: o.backward(do, retain_graph=True))["ms"]
            add(time_variants(backward, TABLE.backward_dq), L=L, case="dense backward (dQ order)", density=1.0,
                fa2_backward_ms=t_fa2)
            do = out = lse = qg = kg = vg = o = fa2 = None
        q, k, v = llm_like_qkv(1, HEADS, KV_HEADS, L, D, seed=L)
        index = get_method("flexprefill").select(q, k, resolve_config("flexprefill"), causal=True)
        add(time_variants(lambda c: block_sparse_forward(q, k, v, index, config=c)[0], TABLE.forward_for(index),
                          (), flex_for(q, k, v, index)),
            L=L, case=f"FlexPrefill selection (LLM-like), {index.block_q}-blocks",
            density=float(index.density().mean()), cudnn_ms=t_dense)
        vs = minference_select_fast(q, k, vertical_size=512, slash_size=512, block_size=128)
        add(time_variants(lambda c: vertical_slash_forward(q, k, v, vs, config=c)[0], TABLE.forward),
            L=L, case="MInference v512/s512 (LLM-like), vertical-slash", density=float(vs.density().mean()),
            cudnn_ms=t_dense)
        q = k = v = index = vs = None
        torch.cuda.empty_cache()

    write_json(args.out, result)
    print(f"\nDevice: {result['machine'].get('device')}; B=1 GQA 32/8 D=128 bf16 causal; median ms")
    print("| L | case | density | baseline | head-major | kv-major | Flex | kv-major x d x baseline | kv-major, % of baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["records"]:
        if not r["gate_ok"]:
            print(f"| {r['L'] // 1024}K | {r['case']} | GATE FAILED {r['rel_err']} {r.get('errors')} |")
            continue
        base = r.get("cudnn_ms") or r.get("fa2_backward_ms")
        ms = r["ms"]
        print(f"| {r['L'] // 1024}K | {r['case']} | {100 * r['density']:.1f}% | {base:.2f} | {ms['head_major']:.2f} | "
              f"{ms['kv_major']:.2f} | {ms.get('flex', float('nan')):.2f} | "
              f"{ms['kv_major'] / (r['density'] * base):.2f} | {100 * ms['kv_major'] / base:.1f}% |")
        for name, t in ms.items():
            if name.startswith("kv_major "):
                print(f"|   | {name} | | | | {t:.2f} | | | {100 * t / base:.1f}% |")


if __name__ == "__main__":
    main()
