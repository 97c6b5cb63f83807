"""Where the block-sparse top-k kernel's time goes: trimmed copies of ``_block_top_k_kernel`` timed
beside it, on ``--heads`` heads' pooled scores of the LLM-like input at 128K (64-blocks, 2048 rows of 2048).

Variants (source edits of the kernel, imported from a temporary module):
  full        the kernel as shipped;
  no-search   the cut is the row's minimum (no bisection; the rest unchanged);
  search-only the bisection, then only the cut is stored (no prefix sums, no row written);
  load-only   the row loaded and keyed, its maximum stored.
Each variant is timed two ways: ``time_ms`` (CUDA events around the launch: a ~50 us launch
includes the host's launch overhead) and the kernel's own duration from torch.profiler (run 22f
found the first one host-bound).

    python benchmarks/probe_block_top_k.py --out /tmp/out/probe-block-top-k.json
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseattn.bench.inputs import llm_like_qkv  # noqa: E402
from sparseattn.bench import timing  # noqa: E402
from sparseattn.bench.timing import machine_record, time_ms  # noqa: E402
from sparseattn.kernels import minference_index as M  # noqa: E402
from sparseattn.methods.minference import _block_mean_pool  # noqa: E402

CUT = "    cut = _bisect_cut(key, allowed, tl.maximum(k, 1))\n"
TAIL = "    # top 0: a cut above every key"


def variants() -> dict[str, str]:
    src = inspect.getsource(M._block_top_k_kernel.fn)
    assert CUT in src and TAIL in src
    head = src[:src.index(TAIL)]
    store = "    tl.store(Counts + pid_b * c_b + h * c_h + qb, cut)\n"
    return {
        "full": src,
        "no-search": src.replace(CUT, "    cut = tl.min(tl.where(allowed, key, 2147483647), 0)\n"),
        "search-only": head + store,
        "load-only": head.replace(CUT, "    cut = tl.max(key, 0)\n") + store,
    }


def load(name: str, src: str):
    path = os.path.join(tempfile.mkdtemp(), f"probe_{name.replace('-', '_')}.py")
    with open(path, "w") as f:
        f.write("import triton\nimport triton.language as tl\n"
                "from sparseattn.kernels.minference_index import _bisect_cut\n\n\n" + src)
    spec = importlib.util.spec_from_file_location(f"probe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._block_top_k_kernel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--top", type=int, default=64)
    ap.add_argument("--heads", type=int, default=1, help="heads a launch (the mixes launch 4 at 128K)")
    ap.add_argument("--warps", default="1,2,4,8", help="warps per row program, comma-separated")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    L, bs = args.length, 64
    q, k, _ = llm_like_qkv(1, 32, 8, L, 128, seed=1)
    H = args.heads
    scores = (_block_mean_pool(q[:, :H], bs) @ _block_mean_pool(k[:, :1], bs).transpose(-1, -2)).contiguous()
    _, _, nq, nk = scores.shape
    tops = torch.full((H,), args.top, dtype=torch.int64, device=q.device)
    heads = torch.arange(H, dtype=torch.int64, device=q.device)
    # Rows padded to top + 3 as in the library, in a buffer as wide as a row of blocks: "no-search"
    # keeps every allowed block, which would overrun a buffer of the padded width (it did until run 23g).
    indices, width = torch.empty(1, H, nq, nk, dtype=torch.int32, device=q.device), args.top + 3
    counts = torch.empty(1, H, nq, dtype=torch.int32, device=q.device)
    record = {"machine": machine_record(), "L": L, "top": args.top, "heads": H, "rows": []}
    for warps in [int(w) for w in args.warps.split(",")]:
        for name, src in variants().items():
            kernel = load(name, src)

            def run():
                kernel[(H * nq, 1)](scores, tops, heads, indices, counts, nq, nk, width, L, L,
                                math.sqrt(128), *scores.stride()[:3], *indices.stride()[:3], *counts.stride()[:2],
                                0, 0, BS=bs, UNIT=1, IS_CAUSAL=True, BLOCK_N=M._pow2(nk), num_warps=warps)
            us = 1000 * time_ms(run)["ms"]
            own = [t for key, t in timing.kernel_us(run).items() if "_block_top_k_kernel" in key]
            kernel_us = own[0] if own else float("nan")
            record["rows"].append({"variant": name, "warps": warps, "us": us, "kernel_us": kernel_us,
                                   "kernel_us_per_head": kernel_us / H})
            print(f"{name:12s} warps {warps}: {us:7.1f} us (events), {kernel_us:7.1f} us (kernel, {H} heads: "
                  f"{kernel_us / H:.1f} a head)", flush=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
