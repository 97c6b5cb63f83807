"""Host cost of one Triton launch on this machine, against the number of kernel arguments.

The PruLong step is bound by the host's launch cost (NOTES.md, runs 9 and 12), and our backward
kernels take ~45 arguments (strides). This times, with the GPU kept busy so no launch waits:
a trivial Triton kernel with 3 / 16 / 48 integer arguments, ``torch.empty`` and a small torch
elementwise op, per call in microseconds.

    python benchmarks/triton_launch_overhead.py --out /tmp/out/launch.json
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from sparseattn.bench.timing import host_ms, machine_record, write_json


@triton.jit
def _k3(X, a, b):
    tl.store(X + tl.program_id(0), a + b)


@triton.jit
def _k16(X, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14):
    tl.store(X + tl.program_id(0), a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13 + a14)


@triton.jit
def _k48(X, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20, a21,
         a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33, a34, a35, a36, a37, a38, a39, a40, a41, a42,
         a43, a44, a45, a46, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    tl.store(X + tl.program_id(0), a0 + a46 + C0 + C1 + C2 + C3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    x = torch.zeros(4, device="cuda", dtype=torch.int32)
    ints = list(range(7, 7 + 47))
    cases = {
        "triton, 3 args": lambda: _k3[(1,)](x, 1, 2),
        "triton, 16 args": lambda: _k16[(1,)](x, *ints[:15]),
        "triton, 48 args + 4 constexpr": lambda: _k48[(1,)](x, *ints, C0=1, C1=2, C2=3, C3=4),
        "torch.empty": lambda: torch.empty(1024, device="cuda"),
        "torch add": lambda: x.add(1),
    }
    result = {"suite": "triton_launch_overhead", "machine": machine_record(), "us_per_call": {}}
    for name, fn in cases.items():
        result["us_per_call"][name] = 1e3 * host_ms(fn, iters=200, sleep_cycles=3_000_000_000)
        print(f"{name:32s} {result['us_per_call'][name]:8.1f} us", flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
