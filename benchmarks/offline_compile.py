"""Compile the sparse forward kernel and MInference's sums and top-k kernels for sm_90a, without a GPU.

Run it with the device's Triton (3.6), e.g. in a venv that has it:
    /tmp/t36/bin/python benchmarks/offline_compile.py --out /tmp/fwd

For each kernel it prints registers, spills and shared memory, and writes the TTIR, TTGIR, PTX and
SASS under ``--out``: whether the pipeliner gave the K/V tiles cp.async stages, what a loop carries,
and what ptxas made of it, before any device time is spent (NOTES.md, run 24, found a miscompile
this way). The arguments are those of the 128K benchmark shape (B=1, 32/8 heads, D=128, bf16,
128-blocks): pointers and strides get the ``tt.divisibility = 16`` hints and unit strides the
constant 1 that a real launch derives from them (without the hints Triton cannot prove 16-byte
alignment and compiles register loads instead of cp.async; NOTES.md, run 13).
"""

from __future__ import annotations

import argparse
import os
import subprocess

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparseattn.kernels import block_sparse as bs
from sparseattn.kernels import minference_index as mi

L, HQ, HKV, D, BLOCK = 131072, 32, 8, 128, 128
NQ = L // BLOCK


def _strides(*shape):
    return torch.empty(shape, device="meta").stride()


def _signature(fn, values, pointer_types):
    """(signature, constexprs, attrs) of ``fn`` for these argument values."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = values.get(name)
        if name in pointer_types:
            signature[name] = pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif fn.params[i].is_constexpr or isinstance(value, (bool, str)):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _common_values():
    q = _strides(1, HQ, L, D)
    kv = _strides(1, HKV, L, D)
    idx = _strides(1, HQ, NQ, NQ)
    cnt = _strides(1, HQ, NQ)
    values = dict(
        stride_qb=q[0], stride_qh=q[1], stride_qm=q[2], stride_kb=kv[0], stride_kh=kv[1], stride_kn=kv[2],
        stride_vb=kv[0], stride_vh=kv[1], stride_vn=kv[2], stride_ob=q[0], stride_oh=q[1], stride_om=q[2],
        stride_lb=HQ * L, stride_lh=L, stride_ib=idx[0], stride_ih=idx[1], stride_iq=idx[2], stride_ik=idx[3],
        stride_cb=cnt[0], stride_ch=cnt[1], stride_cq=cnt[2], num_heads=HQ, group_size=HQ // HKV, q_len=L, k_len=L,
        qk_scale=0.127, HEAD_DIM=D, BLOCK_D=D, BLOCK_M=BLOCK, BLOCK_N=BLOCK, SEL_BLOCK_Q=BLOCK, SEL_BLOCK_K=BLOCK,
        IS_CAUSAL=True, REVERSE=True, DOT_PREC="tf32", UNIFORM=True,
    )
    pointers = dict(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", Lse="*fp32", Indices="*i32", Counts="*i32",
                    CuSeqlens="*i32")
    return values, pointers


def kernels(warps: int, stages: int):
    """``(name, kernel, argument values, pointer types, options)`` of each kernel compiled."""
    values, pointers = _common_values()
    common = dict(values, VARLEN=False, MAX_MASKED=bs._max_masked_blocks(BLOCK, BLOCK), SPLIT_MASKED=True,
                  KV_MAJOR=True)
    options = dict(num_warps=warps, num_stages=stages)
    yield "fwd_sparse", bs._fwd_kernel, dict(common, SPARSE=True), pointers, options
    yield "fwd_dense", bs._fwd_kernel, dict(common, SPARSE=False), pointers, options
    # MInference's vertical and slash sums (last 64 queries of 32 heads), as last_query_scores_fast launches them.
    q, k = _strides(1, HQ, 64, D), _strides(1, HKV, L, D)
    sums = dict(stride_qb=q[0], stride_qh=q[1], stride_qm=q[2], stride_kb=k[0], stride_kh=k[1], stride_kn=k[2],
                num_heads=HQ, q_first=0, n_rows=64, k_len=L, n_off=L, min_offset=0, qk_scale=0.127,
                HEAD_DIM=D, BLOCK_D=D, N_ROWS=64, BLOCK_O=64, IS_CAUSAL=True, IEEE=False)
    ptrs = dict(Q="*bf16", K="*bf16", KvHead="*i64", Lse="*fp32", Vertical="*fp32", Slash="*fp32")
    yield "sums_window", mi._vertical_slash_sums_kernel, dict(sums, ROWS=64), ptrs, dict(num_warps=8, num_stages=1)
    yield "sums_loop", mi._vertical_slash_sums_loop_kernel, dict(sums, blocks_per_program=16), ptrs, dict(
        num_warps=mi.SUMS_WARPS, num_stages=mi.SUMS_STAGES)
    # The top-k offsets of the vertical-slash tables (6196 a head), as _top_sorted_fast launches it.
    yield "row_top_k", mi._row_top_k_kernel, dict(num_heads=HQ, length=L, width=6196, pad=1 << 40, s_row=L,
                                                  o_row=6196, BLOCK=mi.TOP_K_BLOCK), dict(
        Scores="*fp32", Sizes="*i64", Out="*i64"), dict(num_warps=mi.TOP_K_WARPS, num_stages=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/offline-compile")
    parser.add_argument("--warps", type=int, default=8, help="the forward kernels' warps")
    parser.add_argument("--stages", type=int, default=3, help="the forward kernels' stages")
    parser.add_argument("--only", default="", help="comma-separated kernel names (default: all)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    target = GPUTarget("cuda", 90, 32)
    only = {s for s in args.only.split(",") if s}
    for name, fn, values, pointers, options in kernels(args.warps, args.stages):
        if only and name not in only:
            continue
        signature, constexprs, attrs = _signature(fn, values, pointers)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
        base = os.path.join(args.out, name)
        for ext in ("ttir", "ttgir", "ptx"):
            with open(f"{base}.{ext}", "w") as f:
                f.write(compiled.asm[ext])
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        report = subprocess.run([os.path.join(tools, "ptxas"), "-v", "--gpu-name", "sm_90a", f"{base}.ptx", "-o",
                                 f"{base}.cubin"], capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f"{base}.cubin"], capture_output=True,
                              text=True).stdout
        with open(f"{base}.sass", "w") as f:
            f.write(sass)
        usage = " ".join(line.split("info    : ")[-1] for line in report.splitlines() if "Used" in line or "spill" in line)
        print(f"{name}: {usage} | {compiled.metadata.shared} B shared | {sass.count('HGMMA')} HGMMA, "
              f"{sass.count('LDGSTS')} LDGSTS, {len(sass.splitlines())} SASS lines")


if __name__ == "__main__":
    main()
