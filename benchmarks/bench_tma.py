"""Tensor-descriptor (TMA) loads vs pointer loads, in one run on the GPU (NOTES.md, run 13).

Two kernels read their main operands either with per-thread pointer loads or through tensor
descriptors (Hopper's bulk tensor copy, one instruction per tile completing on an mbarrier):

- the attention forward's unmasked K/V tiles (``KernelConfig.tma``): dense 32K / 128K, random
  per-head 128-blocks at 5/10/20% (128K) and 10% (32K), random 64-blocks at 10%, each against
  cuDNN SDPA dense and FlexAttention on the same blocks, plus a few tile shapes with descriptors
  on the 128K 10% case;
- XAttention's estimation (``EstimateConfig.tma``) at S = 16 and S = 8 on the LLM-like input, for
  the default tile shapes and a few others.

Every variant's output is checked against the pointer-load output before any time is recorded.
B=1, GQA 32/8, D=128, bf16, causal.

    python benchmarks/bench_tma.py --out /tmp/out/tma.json [--lengths 32768,131072]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from bench_program_order import flex_for

from sparseattn.bench.inputs import llm_like_qkv, random_block_index, random_qkv
from sparseattn.bench.peers import DENSE_PEERS
from sparseattn.bench.timing import machine_record, time_ms, write_json
from sparseattn.kernels.block_sparse import KernelConfig, block_sparse_forward, default_configs
from sparseattn.kernels.estimate import EstimateConfig, block_mass_forward, default_estimate_configs

HEADS, KV_HEADS, D, BLOCK = 32, 8, 128, 128
TABLE = default_configs(D, torch.bfloat16, interpret=False)
EXTRA_FWD = [KernelConfig(128, 128, num_warps=8, num_stages=2), KernelConfig(128, 128, num_warps=8, num_stages=4),
             KernelConfig(128, 64, num_warps=8, num_stages=3), KernelConfig(128, 64, num_warps=4, num_stages=3)]
EXTRA_EST = [EstimateConfig(128, 128, 8, 3), EstimateConfig(128, 256, 8, 3), EstimateConfig(64, 128, 4, 3),
             EstimateConfig(128, 128, 8, 4), EstimateConfig(256, 128, 8, 2)]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _name(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}/{cfg.num_warps}w/{cfg.num_stages}s"


def time_variants(run, base_cfg, extra=(), flex=None) -> dict:
    """``run(cfg) -> out``: gate every variant against pointer loads, then time each."""
    variants = {"pointers": dataclasses.replace(base_cfg, tma=False), "tma": dataclasses.replace(base_cfg, tma=True)}
    for cfg in extra:
        variants[f"tma {_name(cfg)}"] = dataclasses.replace(cfg, tma=True)
        variants[f"pointers {_name(cfg)}"] = dataclasses.replace(cfg, tma=False)
    ref = run(variants["pointers"])
    rec = {"config": _name(base_cfg), "rel_err": {}, "ms": {}}
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
            rec["ms"][name] = time_ms(lambda cfg=cfg: run(cfg))["ms"]
    if flex is not None:
        rec["ms"]["flex"] = time_ms(flex)["ms"]
    return rec


def run_forward(L, q, k, v, t_dense, add) -> None:
    def forward(index):
        return lambda c: block_sparse_forward(q, k, v, index, config=c)[0]

    add(time_variants(forward(None), TABLE.forward), L=L, case="dense forward", density=1.0, cudnn_ms=t_dense)
    for density in (0.05, 0.10, 0.20) if L >= 131072 else (0.10,):
        index = random_block_index(1, HEADS, L, L, BLOCK, density, seed=L + 1)
        add(time_variants(forward(index), TABLE.forward, EXTRA_FWD if density == 0.10 and L >= 131072 else (),
                          flex_for(q, k, v, index)),
            L=L, case=f"random {int(density * 100)}%, 128-blocks", density=float(index.density().mean()),
            cudnn_ms=t_dense)
    index = random_block_index(1, HEADS, L, L, 64, 0.10, seed=L + 2)
    add(time_variants(forward(index), TABLE.forward_narrow, (), flex_for(q, k, v, index)),
        L=L, case="random 10%, 64-blocks", density=float(index.density().mean()), cudnn_ms=t_dense)


def run_estimate(L, t_dense, add) -> None:
    q, k, _ = llm_like_qkv(1, HEADS, KV_HEADS, L, D, seed=0)
    for S in (16, 8):
        base = default_estimate_configs(D, q.dtype, q.device, S)[0]
        add(time_variants(lambda c, S=S: block_mass_forward(q, k, stride=S, block_size=BLOCK, config=c), base,
                          [c for c in EXTRA_EST if c != base]),
            L=L, case=f"XAttention estimation S={S}", density=1.0 / (2 * S), cudnn_ms=t_dense)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--cases", default="forward,estimate", help="forward, estimate (longest length), or both")
    args = parser.parse_args()
    result = {"suite": "tma", "machine": machine_record(),
              "shape": {"batch": 1, "q_heads": HEADS, "kv_heads": KV_HEADS, "head_dim": D, "dtype": "bfloat16",
                        "causal": True},
              "records": []}

    def add(rec, **fields):
        rec.update(fields)
        result["records"].append(rec)
        print(json.dumps(rec), flush=True)

    lengths = [int(x) for x in args.lengths.split(",")]
    cases = args.cases.split(",")
    for L in lengths:
        q, k, v = random_qkv(1, HEADS, KV_HEADS, L, D, seed=L)
        t_dense = time_ms(DENSE_PEERS[0].make(q, k, v, True))["ms"]
        if "forward" in cases:
            run_forward(L, q, k, v, t_dense, add)
        q = k = v = None
        torch.cuda.empty_cache()
        if "estimate" in cases and L == max(lengths):
            run_estimate(L, t_dense, add)
            torch.cuda.empty_cache()

    write_json(args.out, result)
    print(f"\nDevice: {result['machine'].get('device')}; B=1 GQA 32/8 D=128 bf16 causal; median ms")
    print("| L | case | density | cuDNN | pointers | TMA | Flex | TMA x d x cuDNN | TMA, % of cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["records"]:
        if not r["gate_ok"]:
            print(f"| {r['L'] // 1024}K | {r['case']} | GATE FAILED {r['rel_err']} {r.get('errors')} |")
            continue
        base, ms = r["cudnn_ms"], r["ms"]
        print(f"| {r['L'] // 1024}K | {r['case']} | {100 * r['density']:.1f}% | {base:.2f} | {ms['pointers']:.2f} | "
              f"{ms['tma']:.2f} | {ms.get('flex', float('nan')):.2f} | {ms['tma'] / (r['density'] * base):.2f} | "
              f"{100 * ms['tma'] / base:.1f}% |")
        for name, t in ms.items():
            if name.startswith(("tma ", "pointers ")):
                print(f"|   | {name} | | | | {t:.2f} | | | {100 * t / base:.1f}% |")
        if r.get("errors"):
            print(f"|   | errors: {r['errors']} |")


if __name__ == "__main__":
    main()
