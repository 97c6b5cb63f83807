"""What a call's MInference selection launches, counted on a CPU: chunks, Triton kernels, torch ops.

The selection runs as ``sparse_attention`` would run it (``selection_chunks``: its memory-bounded
head chunks), on ``meta`` tensors, so nothing is computed and no GPU is needed: Triton launches are
counted instead of run (``JITFunction.run`` replaced), torch ops are counted through a dispatch mode
(views included: they cost host time too, if little), and the Triton backends are forced as on CUDA.
Each launch costs the host 40-50 us (Triton) or 5-70 us (torch) on the H100 machine (NOTES.md,
run 23), so the counts say where a host-bound selection's time goes before a GPU is at hand.

    python benchmarks/count_select_launches.py   # the per-head tables of run 23e's calibrated bench
    python benchmarks/count_select_launches.py --json R.json --configs "every head" --out counts.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseattn.api import selection_chunks  # noqa: E402
from sparseattn.methods.minference import MInferenceConfig  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "nvidia-h100-80gb-hbm3",
                       "calibrated-minference-extended-run23e.json")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _as_on_cuda():
    """Triton launches counted, not run; the selection's backends resolved as on CUDA."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import sparseattn.kernels.minference_index as MI
    import sparseattn.methods.minference as M

    launches = collections.Counter()
    # Both launchers: a kernel is an InterpretedFunction under TRITON_INTERPRET=1 (the CPU tests).
    saved = JITFunction.run, InterpretedFunction.run, MI._backend, M.SELECT_BACKEND

    def run(self, *args, **kwargs):
        launches[self.fn.__name__] += 1

    def backend(name, device):
        if name not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {name!r}")
        return "torch" if name == "torch" else "triton"

    JITFunction.run = InterpretedFunction.run = run
    MI._backend, M.SELECT_BACKEND = backend, "triton"
    try:
        yield launches
    finally:
        JITFunction.run, InterpretedFunction.run, MI._backend, M.SELECT_BACKEND = saved


def count(config: MInferenceConfig, length: int = 131072, heads: int = 32, kv_heads: int = 8,
          head_dim: int = 128) -> dict:
    """Chunks, Triton launches by kernel and torch ops by name of one call's selection (B = 1, bf16)."""
    q = torch.empty(1, heads, length, head_dim, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, kv_heads, length, head_dim, dtype=torch.bfloat16, device="meta")
    with _as_on_cuda() as launches, _Ops() as ops:
        chunks = [(g0, g1) for g0, g1, _ in selection_chunks(q, k, k, "minference", config)]
    return {"chunks": chunks, "triton": dict(launches), "triton_launches": sum(launches.values()),
            "torch_ops": dict(ops.ops.most_common()), "torch_op_count": sum(ops.ops.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=RESULTS, help="a bench_calibrated_methods.py result with MInference tables")
    ap.add_argument("--configs", default="every head", help="rows whose config name contains this")
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    records = json.load(open(args.json))["records"]
    rows = []
    for r in records:
        if r["method"] != "minference" or "table" not in r or args.configs not in r["config"]:
            continue
        got = count(MInferenceConfig(head_patterns=tuple(tuple(p) for p in r["table"])), args.length)
        rows.append({"seed": r["seed"], "config": r["config"], **got})
        ops = got["torch_ops"]
        print(f"seed {r['seed']} {r['config']}: {len(got['chunks'])} chunks {got['chunks']}; Triton "
              f"{got['triton_launches']} {got['triton']}; torch ops {got['torch_op_count']} (bmm {ops.get('bmm', 0)}, "
              f"topk {ops.get('topk', 0)}, sort {ops.get('sort', 0)})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"source": args.json, "length": args.length, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
