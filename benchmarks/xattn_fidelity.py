"""XAttention fidelity on real activations: recall of the exact attention mass, output error vs dense
and density, per layer (and head), at each threshold (BENCHMARKS.md, "Fidelity", attention level).

Input: q/k/v of every layer of a Hugging Face model (default: the embedded SmolLM2-135M-Instruct)
captured on ``--length`` tokens of Python standard-library source (``sparseattn.bench.capture``).
For each threshold (``--taus``, and ``--thresholds`` calibrated per-head thresholds if given) the
blocks come from XAttention's selector as deployed (the fused Triton estimator on a GPU, bf16; the
fp32 reference on a CPU). Recall and both outputs are then computed in fp32 on the captured
values, so the error is the selection's alone (``sparseattn.calibrate.xattention_fidelity``).

Correctness gate (first, on a small random case): tau = 1 must give recall 1 and zero error, and
the fused sparse output must equal ``reference_block_sparse_attention``. If it fails the JSON is
written with ``"gate": "failed"`` and no table is printed.

    PYTHONPATH=. python benchmarks/xattn_fidelity.py --length 8192 --thresholds default \
        --out benchmarks/results/<device>/xattn-fidelity-8k.json
    PYTHONPATH=. python benchmarks/xattn_fidelity.py --length 2048 --device cpu --thresholds default \
        --out benchmarks/results/cpu/xattn-fidelity-2k.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sparseattn.bench.capture import capture_qkv, real_text_ids
from sparseattn.bench.timing import machine_record
from sparseattn.calibrate import (
    attention_scales,
    fidelity_table,
    load_xattention_thresholds,
    model_display_name,
    sliding_window_layers,
    summarize_fidelity,
    xattention_fidelity,
)
from sparseattn.models import load_llama
from sparseattn.reference.attention import reference_attention, reference_block_sparse_attention
from sparseattn.reference.xattention import xattention_select


def correctness_gate(device) -> dict:
    """tau = 1 is dense; tau = 0.5 matches the fp32 block-sparse reference (GQA, B = 2, ragged)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 300, 64, generator=g).to(device) for h in (6, 2, 2))
    dense_rows = xattention_fidelity({0: (q, k, v)}, taus=(1.0,), stride=8, block_size=64)
    rows = xattention_fidelity({0: (q, k, v)}, taus=(0.5,), stride=8, block_size=64)
    index = xattention_select(q.float(), k.float(), threshold=0.5, stride=8, block_size=64)
    sparse = reference_block_sparse_attention(q.float(), k.float(), v.float(), index)
    dense = reference_attention(q.float(), k.float(), v.float())
    err = ((sparse - dense).square().sum((0, 2, 3)) / dense.square().sum((0, 2, 3))).sqrt().tolist()
    checks = {
        "tau1_recall": min(r["recall"] for r in dense_rows) > 1 - 1e-5,
        "tau1_error": max(r["rel_error"] for r in dense_rows) < 1e-5,
        # fp32 inputs: on a GPU the Triton estimator ("ieee" dots) selects the same blocks as the reference.
        "tau0.5_error_vs_reference": all(abs(r["rel_error"] - e) <= 1e-3 * e + 1e-6 for r, e in zip(rows, err)),
    }
    return {"passed": all(checks.values()), "checks": checks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192, help="tokens of real text (default 8192)")
    parser.add_argument("--model", default="default", help="HF folder, .gguf, or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("--taus", default="0.9,0.95", help="comma-separated thresholds (default 0.9,0.95)")
    parser.add_argument("--thresholds", default=None, help="also evaluate calibrated per-head thresholds: a .json "
                        "file or a packaged model name (e.g. 'default'); their stride/block size apply to them")
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", required=True, help="JSON output path")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    taus = [float(t) for t in args.taus.split(",") if t.strip()]
    start = time.perf_counter()
    gate = correctness_gate(device)
    print(f"[fidelity] correctness gate: {'passed' if gate['passed'] else 'FAILED'} {gate['checks']}", flush=True)
    model, tokenizer = load_llama(args.model, device=device)
    calibrated = load_xattention_thresholds(args.thresholds, model=model) if args.thresholds else None
    ids = real_text_ids(tokenizer, args.length)
    skipped = sliding_window_layers(model)  # the integration runs them dense; their attention is windowed
    captured = capture_qkv(model, ids, layers=[i for i in range(model.config.get_text_config().num_hidden_layers)
                                               if i not in skipped])
    dtype = str(next(iter(captured.values()))[0].dtype).replace("torch.", "")
    rows = xattention_fidelity(captured, taus, stride=args.stride, block_size=args.block_size,
                               scale=attention_scales(model), calibrated=calibrated, progress=True)
    summary = summarize_fidelity(rows)
    result = {
        "name": "xattn-fidelity",
        "machine": machine_record(),
        "gate": "passed" if gate["passed"] else "failed",
        "gate_checks": gate["checks"],
        "model": model_display_name(args.model),
        "input": {"tokens": args.length, "batch": 1,
                  "text": "Python standard-library source (sparseattn.bench.capture.real_text_ids)", "dtype": dtype, "device": device.type},
        "settings": {"taus": taus, "stride": args.stride, "block_size": args.block_size,
                     "thresholds": args.thresholds, "causal": True, "skipped_sliding_window_layers": skipped,
                     "estimator": "triton" if device.type == "cuda" else "reference-fp32",
                     "recall": "mean over query rows of the exact fp32 softmax mass on the selected blocks; "
                               "recall_p05 its 5th percentile",
                     "rel_error": "||o_sparse - o_dense|| / ||o_dense|| per head, both fp32 on the captured q/k/v"},
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summary,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if gate["passed"]:
        print(fidelity_table(summary))
    else:
        print("correctness gate failed: no table printed", file=sys.stderr)
    print(f"\nwrote {out} ({result['seconds']} s)")
    return 0 if gate["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
