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
    """The seed's XAttention example end to end, then every method on the same input."""
    from . import sparse_attention
    from .methods.xattention import Xattention_prefill

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    shape = (1, args.heads, args.seq_len, args.head_dim)
    print(f"sparseattn demo: q/k/v {list(shape)} {str(dtype).replace('torch.', '')} on {device} "
          f"({'Triton kernels' if device.type == 'cuda' else 'fp32 reference path, slow'})")
    query, key, value = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))

    output = Xattention_prefill(query_states=query, key_states=key, value_states=value, threshold=0.95, causal=True)
    print(f"Xattention_prefill(threshold=0.95, causal=True) -> output shape {list(output.shape)}, "
          f"dtype {str(output.dtype).replace('torch.', '')}, finite: {bool(torch.isfinite(output).all())}")

    dense, dense_s = _timed(lambda: sparse_attention(query, key, value, method="full"), device, args.repeats)
    rows = [("full (dense)", "100.0%", f"{dense_s * 1e3:.1f}", "1.00x", "0")]
    for method, options in [("xattention", dict(threshold=0.95)), ("xattention", dict(threshold=0.9)),
                            ("flexprefill", dict(sparsity_ratio=0.2)), ("minference", dict(adaptive_budget=0.1)),
                            ("streaming", dict(sink=128, window=1024))]:
        (out, stats), secs = _timed(
            lambda: sparse_attention(query, key, value, method=method, return_stats=True, **options), device,
            args.repeats)
        err = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
        label = method + "(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
        rows.append((label, f"{100 * stats.density.mean().item():.1f}%", f"{secs * 1e3:.1f}",
                     f"{dense_s / secs:.2f}x", f"{err:.2e}"))
    print()
    print(_format_table(["method", "density", "time (ms)", "speedup", "rel. error vs dense"], rows))
    print("\nRandom q/k/v give near-uniform attention, so threshold-based methods keep most blocks here; "
          "real model activations are far sparser.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the seed's XAttention example and compare every method with dense")
    demo.add_argument("--seq-len", type=int, default=4096)
    demo.add_argument("--heads", type=int, default=32)
    demo.add_argument("--head-dim", type=int, default=128)
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    demo.add_argument("--repeats", type=int, default=1, help="timed runs per method (best is shown)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
