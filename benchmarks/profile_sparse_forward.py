"""One launch of the sparse forward kernel for Nsight Compute (NOTES.md, run 19e).

Runs ``--warmup`` calls, then one call inside ``cudaProfilerStart/Stop``, so that

    ncu --profile-from-start off --kernel-name regex:_fwd_kernel --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section WarpStateStats --csv --page details \\
        python benchmarks/profile_sparse_forward.py --case random --density 0.05

profiles exactly one launch. Cases (B = 1, GQA 32/8, D = 128, bf16, causal, 128-blocks): ``dense``
(dense mode, no index), ``every`` (every causal block through the index), ``random`` (random
blocks per query head at ``--density``, the input of issue 3's goal).
"""

from __future__ import annotations

import argparse

import torch

from sparseattn.bench.inputs import random_block_index, random_qkv
from sparseattn.index import BlockIndex
from sparseattn.kernels.block_sparse import block_sparse_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=("dense", "every", "random"), required=True)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    L = args.length
    q, k, v = random_qkv(1, 32, 8, L, 128, seed=L)
    if args.case == "dense":
        index = None
    elif args.case == "every":
        index = BlockIndex.dense(1, 32, L, L, 128, 128, device=q.device)
    else:
        index = random_block_index(1, 32, L, L, 128, args.density, seed=L + 1)
    for _ in range(args.warmup):
        block_sparse_forward(q, k, v, index)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    block_sparse_forward(q, k, v, index)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    density = 1.0 if index is None else float(index.density().mean())
    print(f"case {args.case} L={L} density {density:.4f}")


if __name__ == "__main__":
    main()
