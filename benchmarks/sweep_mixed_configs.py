"""Tile sweep of the fused mixed-attention kernels (``sparseattn.kernels.mixed``), PruLong's shapes.

SmolLM2's layer (B=1, 9 query / 3 KV heads, D=64, bf16), sink 128, window 1024, block 64, gate 0.5,
q/k/v/dO sequence-major (the ``[1, total, H, D]`` buffers transformers' projections give), on one
8K row as one document (the synthetic PruLong rows) and as 4 packed documents. Each kernel's tile
is varied with the other two at their defaults: the forward alone, then the backward (dQ + dK/dV
launches) per dQ tile and per dK/dV tile. Every config's outputs are checked against the default
config's (bf16 rounding only) before it is timed; cuDNN SDPA's forward + backward of the same
layer is the reference point.

    python benchmarks/sweep_mixed_configs.py --out /tmp/out/mixed-sweep.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import torch.nn.functional as F

from sparseattn.bench.timing import machine_record, time_ms, write_json
from sparseattn.kernels.block_sparse import KernelConfig
from sparseattn.kernels.mixed import default_mixed_configs, mixed_backward, mixed_forward

HQ, HKV, D, L = 9, 3, 64, 8192
STREAM = {"sink": 128, "window": 1024, "block_size": 64}
ROWS = {"one document": [L], "4 documents": [3000, 2500, 1692, 1000]}
FORWARD = [(64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 8, 3), (128, 32, 4, 3),
           (64, 32, 4, 3), (128, 128, 8, 2)]
DQ = [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 4, 2)]
DKDV = [(64, 32, 8, 2), (32, 32, 4, 3), (32, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2),
        (64, 128, 8, 2), (128, 64, 8, 2)]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _cfg(t) -> KernelConfig:
    return KernelConfig(t[0], t[1], num_warps=t[2], num_stages=t[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dev = "cuda"
    base = default_mixed_configs(D, torch.bfloat16, False)
    result = {"suite": "mixed_configs", "machine": machine_record(), "default": dataclasses.asdict(base),
              "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "tokens": L, **STREAM}, "records": []}
    g = torch.Generator(device=dev).manual_seed(0)

    def seq_major(h):
        return torch.randn(1, L, h, D, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2)

    q, k, v, do = seq_major(HQ), seq_major(HKV), seq_major(HKV), seq_major(HQ)
    gate = torch.full((HKV,), 0.5, device=dev)
    for row, docs in ROWS.items():
        cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        kw = dict(cu_seqlens=cu, max_seqlen=max(docs), **STREAM)
        sdpa_q, sdpa_k, sdpa_v = (t.detach().requires_grad_() for t in (q, k, v))

        def sdpa():
            out = F.scaled_dot_product_attention(sdpa_q, sdpa_k, sdpa_v, is_causal=True, enable_gqa=True)
            torch.autograd.backward(out, do)
        rec = {"row": row, "case": "cuDNN SDPA forward + backward (one causal document)", "ms": time_ms(sdpa)["ms"]}
        result["records"].append(rec)
        print(json.dumps(rec), flush=True)
        ref_out, branches, lse = mixed_forward(q, k, v, gate, configs=base, **kw)
        ref_grads = mixed_backward(do, q, k, v, gate, branches, lse, configs=base, **kw)
        cases = [("forward", t, dataclasses.replace(base, forward=_cfg(t))) for t in FORWARD]
        cases += [("backward dq", t, dataclasses.replace(base, backward_dq=_cfg(t))) for t in DQ]
        cases += [("backward dkdv", t, dataclasses.replace(base, backward_dkdv=_cfg(t))) for t in DKDV]
        for kernel, tile, cfgs in cases:
            rec = {"row": row, "case": kernel, "tile": list(tile)}
            try:
                if kernel == "forward":
                    out = mixed_forward(q, k, v, gate, configs=cfgs, **kw)[0]
                    rec["rel_err"] = _rel(out, ref_out)
                    fn = lambda cfgs=cfgs: mixed_forward(q, k, v, gate, configs=cfgs, **kw)  # noqa: E731
                else:
                    grads = mixed_backward(do, q, k, v, gate, branches, lse, configs=cfgs, **kw)
                    rec["rel_err"] = max(_rel(a, b) for a, b in zip(grads, ref_grads))
                    fn = lambda cfgs=cfgs: mixed_backward(do, q, k, v, gate, branches, lse, configs=cfgs, **kw)  # noqa: E731
                if rec["rel_err"] < 2e-2:
                    rec["ms"] = time_ms(fn)["ms"]
            except Exception as err:  # noqa: BLE001 - a config the compiler rejects is a result
                rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            result["records"].append(rec)
            print(json.dumps(rec), flush=True)
    write_json(args.out, result)
    print(f"\nDevice: {result['machine'].get('device')}; default {base}")
    print("| row | kernel | tile (rows, keys, warps, stages) | ms | rel. err |")
    print("|---|---|---|---|---|")
    for r in result["records"]:
        ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "gate failed")[:40]
        print(f"| {r['row']} | {r['case']} | {r.get('tile', '')} | {ms} | {r.get('rel_err', 0):.1e} |")


if __name__ == "__main__":
    main()
