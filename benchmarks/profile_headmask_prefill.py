"""Where the head-masked prefill spends its time (meant for an H100; session-6 investigation).

`benchmarks/headmask_gpu.py` (session 5) measured the whole-model 8K prefill of the embedded
SmolLM2 with a head mask at 105-126 ms against 29.7 ms dense, whatever the mask. This script
splits that up, on a randomly initialized model of SmolLM2's shape (timing does not depend on the
weights, and no model file is needed):

1. whole-model prefill, median of ``--repeats`` after a warm-up, for: dense (SDPA +
   ``DynamicCache``), a random 50% head mask with ``HeadMaskCache`` and with ``DynamicCache``, and
   every head streaming;
2. one layer's attention alone (``q [1, 9, L, 64]``): SDPA, ``sparse_attention(method="headmask")``,
   its ``select_blocks`` alone and the kernel on a precomputed index, each as GPU time (CUDA
   events) and as host time to queue the call;
3. a ``torch.profiler`` trace of one masked prefill: the top operators by self CPU time and by
   device time, and the count of host-synchronizing calls.

JSON to ``--out``; a short table last.

    python benchmarks/profile_headmask_prefill.py --out headmask-profile.json
    python benchmarks/profile_headmask_prefill.py --tokens 512 --layers 2 --device cpu --dtype float32 \\
        --repeats 1 --out /tmp/hm.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense",
            "cudaMemcpyAsync", "aten::nonzero")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args, device, dtype):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=max(8192, 2 * args.tokens), rope_theta=100000.0,
                                   tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    return model


@torch.no_grad()
def time_prefill(model, ids, new_cache, repeats):
    model(input_ids=ids, past_key_values=new_cache(), use_cache=True, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        cache = new_cache()
        sync(ids.device)
        t0 = time.perf_counter()
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(ids.device)
        times.append(1e3 * (time.perf_counter() - t0))
        del cache
    return times


def time_call(fn, device, repeats):
    """(GPU ms per call from CUDA events, host ms to queue one call), medians."""
    fn()
    sync(device)
    gpu, host = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        host.append(1e3 * (time.perf_counter() - t0))
        if device.type == "cuda":
            end.record()
            sync(device)
            gpu.append(start.elapsed_time(end))
        else:
            gpu.append(host[-1])
    return statistics.median(gpu), statistics.median(host)


def layer_micro(args, device, dtype, full_heads):
    import torch.nn.functional as F

    from sparseattn.api import sparse_attention
    from sparseattn.kernels.block_sparse import block_sparse_attention
    from sparseattn.methods.headmask import HeadMaskConfig, select_blocks

    L = args.tokens
    g = torch.Generator(device="cpu").manual_seed(1)
    q = torch.randn(1, 9, L, 64, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(1, 3, L, 64, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(1, 3, L, 64, generator=g).to(device=device, dtype=dtype)
    cfg = HeadMaskConfig(full_heads=full_heads, sink=args.sink, window=args.window, block_size=args.block_size)
    index = select_blocks(q, k, cfg)
    calls = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sparse_attention(headmask)": lambda: sparse_attention(q, k, v, method="headmask", config=cfg, causal=True),
        "select_blocks": lambda: select_blocks(q, k, cfg),
    }
    if device.type == "cuda":
        calls["kernel, precomputed index"] = lambda: block_sparse_attention(q, k, v, index, causal=True)
    rows = {}
    for name, fn in calls.items():
        gpu, host = time_call(fn, device, args.repeats * 3)
        rows[name] = {"gpu_ms": gpu, "host_ms": host}
    return rows, calls["sparse_attention(headmask)"]


def profile_call(fn, device):
    """Operators of 5 calls of ``fn`` with their Python stacks: where the host time and the syncs are."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    with profile(activities=activities, with_stack=True) as prof:
        for _ in range(5):
            fn()
        sync(device)
    events = prof.key_averages(group_by_stack_n=8)
    lines = []
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]:
        stack = " <- ".join(f.split("/")[-1] for f in (e.stack or [])[:6])
        lines.append(f"{e.self_cpu_time_total / 5:9.1f} us/call  x{e.count // 5:<3} {e.key[:40]:<40} {stack}")
    syncs = []
    for e in events:
        if any(s in e.key for s in SYNC_OPS):
            stack = " <- ".join(f.split("/")[-1] for f in (e.stack or [])[:8])
            syncs.append(f"x{e.count} {e.key}: {stack}")
    return {"top_self_cpu_with_stack": lines, "syncs_with_stack": syncs}


def profile_prefill(model, ids, new_cache):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.device.type == "cuda" else [])
    with torch.no_grad():
        model(input_ids=ids, past_key_values=new_cache(), use_cache=True, logits_to_keep=1)
        sync(ids.device)
        with profile(activities=activities) as prof:
            model(input_ids=ids, past_key_values=new_cache(), use_cache=True, logits_to_keep=1)
            sync(ids.device)
    events = prof.key_averages()
    by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=30)
    device_key = "self_cuda_time_total" if ids.device.type == "cuda" else "self_cpu_time_total"
    by_device = events.table(sort_by=device_key, row_limit=20)
    syncs = {e.key: e.count for e in events if any(s in e.key for s in SYNC_OPS)}
    return {"by_self_cpu": by_cpu, "by_device": by_device, "sync_like_calls": syncs}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    from transformers import DynamicCache

    from sparseattn.headmask import random_head_mask
    from sparseattn.integrations.headmask_attention import patch_head_mask

    model = build_model(args, device, dtype)
    ids = torch.randint(1, 49152, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(device)
    layers, kv_heads = args.layers, 3
    half = random_head_mask(layers, kv_heads, (layers * kv_heads) // 2, seed=0)
    conditions = [
        ("dense", None, "dynamic"),
        ("mask50 + HeadMaskCache", half, "headmask"),
        ("mask50 + DynamicCache", half, "dynamic"),
        ("all-streaming + HeadMaskCache", torch.zeros(layers, kv_heads, dtype=torch.bool), "headmask"),
    ]
    result = {"benchmark": "profile_headmask_prefill", "settings": {k: str(v) for k, v in vars(args).items()},
              "env": {"torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
              "prefill": [], "routes": {}}
    for name, mask, cache_kind in conditions:
        context = nullcontext() if mask is None else patch_head_mask(model, mask, sink=args.sink, window=args.window,
                                                                      block_size=args.block_size)
        with context:
            if cache_kind == "headmask":
                new_cache = context.make_cache
            else:
                def new_cache():
                    return DynamicCache(config=model.config)
            times = time_prefill(model, ids, new_cache, args.repeats)
            result["prefill"].append({"name": name, "median_ms": statistics.median(times), "all_ms": times})
            if mask is not None:
                result["routes"][name] = dict(context.counts)
            if name == "mask50 + HeadMaskCache" and not args.no_profile:
                result["profile"] = profile_prefill(model, ids, new_cache)
        print(f"  {name}: {statistics.median(times):.2f} ms", flush=True)
    result["layer"], call = layer_micro(args, device, dtype, [True, False, True])
    if not args.no_profile:
        result["layer_profile"] = profile_call(call, device)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if "profile" in result:
        print(result["profile"]["by_self_cpu"])
        print(result["profile"]["by_device"])
        print("sync-like calls:", result["profile"]["sync_like_calls"])
    if "layer_profile" in result:
        print("one sparse_attention(headmask) call, top self-CPU operators (per call) and syncs:")
        print("\n".join(result["layer_profile"]["top_self_cpu_with_stack"]))
        print("\n".join(result["layer_profile"]["syncs_with_stack"]))
    print(f"\nwhole-model prefill, {args.tokens} tokens, {args.layers} layers (median of {args.repeats})")
    for row in result["prefill"]:
        print(f"  {row['name']:<32} {row['median_ms']:8.2f} ms")
    print("one layer's attention (GPU ms / host ms to queue)")
    for name, row in result["layer"].items():
        print(f"  {name:<32} {row['gpu_ms']:8.3f} / {row['host_ms']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
