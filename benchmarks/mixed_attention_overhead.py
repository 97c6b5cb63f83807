"""CPU launch cost vs GPU time of one attention call (forward + backward), PruLong's shapes.

The PruLong training step at 8K on SmolLM2 is CPU-bound (NOTES.md, run 9): its cost is what the
host spends queueing kernels, not what the GPU spends running them. This script separates the
two for the attention alone, per call (forward + backward of one layer), on SmolLM2's layer shape
(B=1, 9 query / 3 KV heads, D=64, bf16, 8K tokens packed as 4 documents):

- ``gpu_ms``: CUDA-event time of a call with the GPU otherwise idle (``time_ms``);
- ``cpu_ms``: host time to queue one call while the GPU is kept busy by a long sleep kernel, so
  no call waits for the GPU (a host sync inside a call would show up here as the sleep's length);
- ``wall_ms``: back-to-back calls, synchronized once at the end (``max`` of the two, roughly).

Cases: transformers' SDPA path (what the dense step runs; one document), our dense kernel
(varlen), the streaming branch alone, and ``mixed_attention`` with every head computing both
branches (gates requiring grad): the fused kernels (``sparseattn.kernels.mixed``) on head-major and
on sequence-major q/k/v/dO (the ``[1, total, H, D]`` buffers transformers' projections give), and
the earlier two-pass node (``FUSED_MIXED_KERNELS = False``); and the same on one 8K document (the
synthetic PruLong rows), fused and composed. ``--profile`` prints torch.profiler's
CPU-time table for the fused mixed call.

    python benchmarks/mixed_attention_overhead.py --out /tmp/out/mixed-overhead.json [--profile]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import sparseattn.training.attention as training_attention
from sparseattn.bench.timing import host_ms, machine_record, time_ms, write_json
from sparseattn.methods.streaming import StreamingConfig
from sparseattn.training.attention import full_attention, mixed_attention, streaming_attention

HQ, HKV, D, L = 9, 3, 64, 8192
DOCS = [3000, 2500, 1692, 1000]


def _wall_ms(fn, iters=20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, HQ, L, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, HKV, L, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, HKV, L, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    do = torch.randn(1, HQ, L, D, device=dev, dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    z = torch.full((HKV,), 0.5, device=dev, requires_grad=True)
    streaming = StreamingConfig(sink=128, window=1024, block_size=64)
    packed = dict(cu_seqlens=cu, max_seqlen=max(DOCS))

    def backward(out, grad=do):
        torch.autograd.backward(out, grad)

    def two_pass(fn):  # the node reads the flag in its forward and keeps it for its backward
        def run():
            training_attention.FUSED_MIXED_KERNELS = False
            try:
                return fn()
            finally:
                training_attention.FUSED_MIXED_KERNELS = True
        return run

    def seq_major(t):
        return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)

    qs, ks, vs, dos = seq_major(q), seq_major(k), seq_major(v), seq_major(do)

    cases = {
        "sdpa (transformers' dense path, one document)": lambda: backward(
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        "ours dense (varlen)": lambda: backward(full_attention(q, k, v, **packed)),
        "ours streaming (varlen)": lambda: backward(streaming_attention(q, k, v, streaming=streaming, **packed)),
        "mixed, both branches (varlen)": lambda: backward(mixed_attention(q, k, v, z, streaming=streaming, **packed)),
        "mixed, both branches, sequence-major (varlen)": lambda: backward(
            mixed_attention(qs, ks, vs, z, streaming=streaming, **packed), dos),
        "mixed, both branches, two-pass node (varlen)": two_pass(lambda: backward(
            mixed_attention(q, k, v, z, streaming=streaming, **packed))),
        # One document filling the row (the synthetic PruLong rows): the fused node, and before it
        # the composed path (cuDNN SDPA + the streaming kernel + lerp through autograd).
        "mixed, both branches, one document": lambda: backward(mixed_attention(q, k, v, z, streaming=streaming)),
        "mixed, both branches, one document, composed": two_pass(lambda: backward(
            mixed_attention(q, k, v, z, streaming=streaming))),
    }
    # Gate: the fused and the two-pass mixed nodes against the two branches composed by autograd
    # (bf16 rounding only).
    def composed():
        full, local = full_attention(q, k, v, **packed), streaming_attention(q, k, v, streaming=streaming, **packed)
        zq = z.to(full.dtype).repeat_interleave(HQ // HKV)[None, :, None, None]
        return torch.lerp(local, full, zq)

    errors = {}
    for name, make in (("fused", lambda: mixed_attention(q, k, v, z, streaming=streaming, **packed)),
                       ("two-pass", two_pass(lambda: mixed_attention(q, k, v, z, streaming=streaming, **packed))),
                       ("composed", composed)):
        out = make()
        grads = torch.autograd.grad(out, (q, k, v, z), do)
        errors[name] = (out.detach().float(), [t.float() for t in grads])

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    gate = {}
    for node in ("fused", "two-pass"):
        prefix = "" if node == "fused" else "two-pass "
        gate[prefix + "out"] = rel(errors[node][0], errors["composed"][0])
        gate.update({f"{prefix}d{n}": rel(a, b) for n, a, b in zip("qkvz", errors[node][1], errors["composed"][1])})
    gate["passed"] = all(e < 2e-2 for e in gate.values())
    errors = None
    print("gate:", json.dumps(gate), flush=True)
    result = {"suite": "mixed_attention_overhead", "gate": gate, "machine": machine_record(),
              "shape": dict(batch=1, q_heads=HQ, kv_heads=HKV, head_dim=D, tokens=L, documents=DOCS,
                            dtype="bfloat16", sink=128, window=1024, block=64), "records": []}
    for name, fn in cases.items():
        for _ in range(3):
            fn()
        rec = {"case": name, "gpu_ms": time_ms(fn)["ms"], "cpu_ms": host_ms(fn), "wall_ms": _wall_ms(fn)}
        result["records"].append(rec)
        print(json.dumps(rec), flush=True)
    if args.profile:
        fn = cases["mixed, both branches (varlen)"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
        result["profile_cpu"] = table
        print(table)
    write_json(args.out, result)
    print(f"\nDevice: {result['machine'].get('device')}; one layer's attention, forward + backward, per call (ms)")
    print("| case | GPU | CPU to queue | wall, back to back |")
    print("|---|---|---|---|")
    for r in result["records"]:
        print(f"| {r['case']} | {r['gpu_ms']:.3f} | {r['cpu_ms']:.3f} | {r['wall_ms']:.3f} |")


if __name__ == "__main__":
    main()
