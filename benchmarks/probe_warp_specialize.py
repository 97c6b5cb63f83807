"""Probe of Triton's Hopper warp specialization on an attention loop (NOTES.md, run 18).

``tl.range(..., warp_specialize=True)`` with ``num_warps=4`` compiles (triton 3.6, sm_90) to
FlashAttention-3's structure: 384 threads, a producer warp group issuing the TMA copies and two
consumer warp groups of 64 query rows each. This script times a minimal causal forward (one KV
head per query head, 128x128 tiles, 2 stages, in-kernel 2D tensor descriptors) with and without
the specialization, adding one feature of the library's kernel at a time:

- ``base``: no element mask (the diagonal tile is computed whole; timing only);
- ``mask``: the causal element mask on every tile (a run-time branch that masks only the diagonal
  tile disables the specialization, and any tile computed outside the loop fails to compile);
- ``epi``: pointer stores of the output and the log-sum-exp with a row mask;
- ``smu``: the library's ``_softmax_update`` (the -inf guard);
- ``mask_epi_smu``: all three;
- ``desc4``: host-side 4D ``TensorDescriptor`` arguments (``[B, H, L, D]`` boxes, as the library's
  run-13 TMA path used) instead of in-kernel 2D descriptors.

Each case runs in its own process with a time limit (a deadlocked kernel is reported as a hang).
Outputs are checked against cuDNN SDPA when the element mask is on.

    python benchmarks/probe_warp_specialize.py --out /tmp/out/warp-specialize.json
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import triton
import triton.language as tl

from sparseattn.kernels.block_sparse import _softmax_update


@triton.jit
def _probe(Q, K, V, O, Lse, L, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
           WS: tl.constexpr, MASK: tl.constexpr, EPI_PTR: tl.constexpr, SMU: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    qd = tl.make_tensor_descriptor(Q + bh * L * D, shape=[L, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    kd = tl.make_tensor_descriptor(K + bh * L * D, shape=[L, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    vd = tl.make_tensor_descriptor(V + bh * L * D, shape=[L, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    q = qd.load([pid_m * BLOCK_M, 0])
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    k_bound = pid_m * BLOCK_M + offs_m
    for t in tl.range(0, (pid_m + 1) * BLOCK_M // BLOCK_N, warp_specialize=WS):
        k = kd.load([t * BLOCK_N, 0])
        qk = tl.dot(q, k.T)
        if MASK:
            qk = tl.where((t * BLOCK_N + offs_n)[None, :] <= k_bound[:, None], qk, float("-inf"))
        v = vd.load([t * BLOCK_N, 0])
        if SMU:
            acc, l_i, m_i = _softmax_update(acc, l_i, m_i, qk, v, qk_scale, True, "tf32")
        else:
            qk = qk * qk_scale
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(tl.bfloat16), v, acc)
            m_i = m_new
    acc = acc / l_i[:, None]
    if EPI_PTR:
        rows = pid_m * BLOCK_M + offs_m
        ok = rows < L
        o_ptrs = O + bh * L * D + rows[:, None] * D + tl.arange(0, D)[None, :]
        tl.store(o_ptrs, acc.to(tl.bfloat16), mask=ok[:, None])
        tl.store(Lse + bh * L + rows, m_i + tl.math.log2(l_i), mask=ok)
    else:
        od = tl.make_tensor_descriptor(O + bh * L * D, shape=[L, D], strides=[D, 1], block_shape=[BLOCK_M, D])
        od.store([pid_m * BLOCK_M, 0], acc.to(tl.bfloat16))


@triton.jit
def _probe4(QD, KD, VD, O, L, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    q = QD.load([0, bh, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, D)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for t in tl.range(0, (pid_m + 1) * BLOCK_M // BLOCK_N, warp_specialize=WS):
        k = KD.load([0, bh, t * BLOCK_N, 0]).reshape(BLOCK_N, D)
        qk = tl.dot(q, k.T) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = VD.load([0, bh, t * BLOCK_N, 0]).reshape(BLOCK_N, D)
        acc = tl.dot(p.to(tl.bfloat16), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(O + bh * L * D + rows[:, None] * D + tl.arange(0, D)[None, :], acc.to(tl.bfloat16))


def run(L, variant, ws=True):
    """(ms, TFLOP/s at causal FLOPs, error vs cuDNN SDPA or None) of one case."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    q, k, v = (torch.randn(1, 32, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = torch.empty_like(q)
    lse = torch.empty(32, L, device="cuda")
    grid = (L // 128, 32)
    sc = 1.4426950408889634 / 128 ** 0.5
    if variant == "cudnn":
        from sparseattn.bench.peers import DENSE_PEERS
        f = DENSE_PEERS[0].make(q, k, v, True)
    elif variant == "library":
        from sparseattn.kernels.block_sparse import block_sparse_forward
        f = lambda: block_sparse_forward(q, k, v, None)
    elif variant == "desc4":
        ds = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 128, 128]) for t in (q, k, v)]
        f = lambda: _probe4[grid](*ds, o, L, sc, BLOCK_M=128, BLOCK_N=128, D=128, WS=ws, num_warps=4, num_stages=2)
    else:
        flags = {"MASK": "mask" in variant, "EPI_PTR": "epi" in variant, "SMU": "smu" in variant}
        f = lambda: _probe[grid](q, k, v, o, lse, L, sc, BLOCK_M=128, BLOCK_N=128, D=128, WS=ws, **flags,
                                 num_warps=4, num_stages=2)
    from sparseattn.bench.timing import time_ms
    ms = time_ms(f)["ms"]
    err = None
    if "mask" in variant:
        o.fill_(float("nan"))
        f()
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
    return ms, 4 * 32 * L * L * 128 / 2 / ms / 1e9, err


VARIANTS = ["base", "mask", "epi", "smu", "mask_epi_smu", "desc4"]
REFERENCES = ["cudnn", "library"]  # cuDNN SDPA and the library's dense forward (8 warps, 3 stages), same shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--long-variants", default="base,mask_epi_smu",
                        help="variants timed at lengths above 32K (all of them at 32K and below)")
    parser.add_argument("--case", nargs=3, metavar=("L", "VARIANT", "WS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one case, JSON on stdout
        L, variant, ws = int(args.case[0]), args.case[1], args.case[2] == "1"
        ms, tflops, err = run(L, variant, ws)
        print(json.dumps({"ms": ms, "tflops": tflops, "err": err}))
        return
    from sparseattn.bench.timing import machine_record, write_json
    records = []
    for L in [int(x) for x in args.lengths.split(",")]:
        variants = VARIANTS if L <= 32768 else [v for v in VARIANTS if v in args.long_variants.split(",")]
        for variant, ws in [(v, False) for v in REFERENCES] + [(v, w) for v in variants for w in (False, True)]:
            rec = {"L": L, "variant": variant, "warp_specialize": ws}
            t = time.time()
            try:
                done = subprocess.run([sys.executable, __file__, "--out", "-", "--case", str(L), variant, str(int(ws))],
                                      capture_output=True, text=True, timeout=args.timeout, env=os.environ, check=False)
                lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
                rec.update(json.loads(lines[-1]) if lines else {"error": done.stderr.strip().splitlines()[-1:]})
            except subprocess.TimeoutExpired:
                rec["hang"] = f"no result in {args.timeout:.0f} s"
            rec["wall_s"] = round(time.time() - t, 1)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    write_json(args.out, {"suite": "warp_specialize_probe", "machine": machine_record(),
                          "shape": "B=1, 32 heads (no GQA), D=128, bf16, causal, 128x128 tiles, 2 stages, 4 warps",
                          "records": records})
    print("\n| L | variant | plain loop TFLOP/s | warp-specialized TFLOP/s | err vs cuDNN |")
    print("|---|---|---|---|---|")
    for L in sorted({r["L"] for r in records}):
        for variant in REFERENCES + VARIANTS:
            cell = {}
            for r in records:
                if r["L"] == L and r["variant"] == variant:
                    cell[r["warp_specialize"]] = (f"{r['tflops']:.0f}" if "tflops" in r else r.get("hang", "error"))
                    if r.get("err") is not None:
                        cell["err"] = f"{r['err']:.1e}"
            print(f"| {L // 1024}K | {variant} | {cell.get(False)} | {cell.get(True)} | {cell.get('err', '-')} |")


if __name__ == "__main__":
    main()
