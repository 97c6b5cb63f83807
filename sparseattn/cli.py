"""The ``sparseattn`` command."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _format_table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats):
    fn()  # warm-up: compilation, allocator
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return result, best


def cmd_demo(args) -> int:
    """The seed's XAttention example end to end, then every method against dense on LLM-like q/k/v."""
    from . import sparse_attention
    from .bench.inputs import llm_like_qkv
    from .methods.xattention import Xattention_prefill

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = "Triton kernels" if device.type == "cuda" else "fp32 reference path, slow"
    torch.manual_seed(args.seed)

    # 1. The seed README's example, verbatim shapes.
    query, key, value = (torch.randn(1, 32, 4096, 128, device=device, dtype=dtype) for _ in range(3))
    (output, stats), secs = _timed(lambda: Xattention_prefill(query_states=query, key_states=key, value_states=value,
                                                              threshold=0.95, causal=True, return_stats=True),
                                   device, 1)
    print(f"Seed example on {device} ({path}): Xattention_prefill(q/k/v [1, 32, 4096, 128], threshold=0.95)")
    print(f"  output shape {list(output.shape)}, {str(output.dtype).replace('torch.', '')}, "
          f"finite: {bool(torch.isfinite(output).all())}, density {100 * stats.density.mean().item():.1f}%, "
          f"time {secs * 1e3:.1f} ms")
    print("  (random q/k/v attend almost uniformly, so a 0.95 threshold keeps nearly every block)")
    del query, key, value, output

    # 2. Every method on q/k/v with the structure of real heads (sinks, locality, verticals, matches).
    L = args.seq_len or (32768 if device.type == "cuda" else 4096)
    Hq, Hkv, D = (32, 8, 128) if device.type == "cuda" else (8, 2, 64)
    q, k, v = llm_like_qkv(1, Hq, Hkv, L, D, dtype=dtype, device=device, seed=args.seed)
    dense, dense_s = _timed(lambda: sparse_attention(q, k, v, method="full"), device, args.repeats)
    rows = [("full (dense)", "100.0%", f"{dense_s * 1e3:.1f}", "1.00x", "0")]
    for method, options in [("xattention", dict(threshold=0.95)), ("xattention", dict(threshold=0.9)),
                            ("flexprefill", dict(sparsity_ratio=0.2)), ("minference", dict(adaptive_budget=0.1)),
                            ("streaming", dict(sink=128, window=1024))]:
        (out, stats), secs = _timed(
            lambda: sparse_attention(q, k, v, method=method, return_stats=True, **options), device, args.repeats)
        err = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
        label = method + "(" + ", ".join(f"{k_}={v_}" for k_, v_ in options.items()) + ")"
        rows.append((label, f"{100 * stats.density.mean().item():.1f}%", f"{secs * 1e3:.1f}",
                     f"{dense_s / secs:.2f}x", f"{err:.2e}"))
    print(f"\nEvery method vs dense on LLM-like synthetic q/k/v [1, {Hq}/{Hkv} heads, {L}, {D}] "
          f"(end to end: selection + attention):\n")
    print(_format_table(["method", "density", "time (ms)", "speedup", "rel. error vs dense"], rows))
    if device.type != "cuda":
        print("\nOn a CPU every path is the exact fp32 reference, so sparse is not faster here; "
              "speed needs a GPU.")
    return 0


def cmd_bench(args) -> int:
    """Run a speed suite on the GPU, write JSON + Markdown + PNG under ``--out/<device>/``."""
    import json
    from pathlib import Path

    from .bench.report import kernel_table, write_reports
    from .bench.timing import device_slug

    if not torch.cuda.is_available():
        print("sparseattn bench needs a CUDA GPU (timings on a CPU would mean nothing).", file=sys.stderr)
        return 2
    from .bench.kernel_suite import run_kernel_suite

    lengths = [int(x) for x in args.lengths.split(",")]
    densities = [float(x) for x in args.densities.split(",")]
    backward = [int(x) for x in args.backward_lengths.split(",")] if args.backward_lengths else []
    result = run_kernel_suite(lengths, densities, q_heads=args.q_heads, kv_heads=args.kv_heads,
                              head_dim=args.head_dim, block_size=args.block_size, backward_lengths=backward,
                              progress=lambda msg: print(f"[bench] {msg}", flush=True))
    out_dir = Path(args.out) / device_slug(result["machine"]["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=1))
    md, png = write_reports(path)
    print(kernel_table(result))
    print(f"\nwrote {path}, {md}" + (f", {png}" if png else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the seed's XAttention example and compare every method with dense")
    demo.add_argument("--seq-len", type=int, default=None, help="length of the method comparison "
                      "(default: 32768 on a GPU, 4096 on a CPU)")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    demo.add_argument("--repeats", type=int, default=1, help="timed runs per method (best is shown)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="speed suite against the strongest peers (GPU)")
    bench.add_argument("suite", choices=["kernel"], help="kernel: block-sparse kernel vs cuDNN/FA2/Flex")
    bench.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    bench.add_argument("--densities", default="0.05,0.1,0.2,0.5")
    bench.add_argument("--backward-lengths", default="8192,32768")
    bench.add_argument("--q-heads", type=int, default=32)
    bench.add_argument("--kv-heads", type=int, default=8)
    bench.add_argument("--head-dim", type=int, default=128)
    bench.add_argument("--block-size", type=int, default=128)
    bench.add_argument("--out", default="benchmarks/results")
    bench.add_argument("--name", default="kernel")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
