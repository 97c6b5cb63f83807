"""Sequence-parallel (Ulysses) training throughput and memory: one launch, several degrees.

    torchrun --nproc_per_node 4 benchmarks/sp_scaling.py --preset llama-1b --seq-len 65536 \\
        --seq-parallel-sizes 1 2 4 --out sp_scaling.json

For each ``seq_parallel_size`` P (dividing the world size W), the world is regrouped into W/P
data-parallel replicas of P ranks; every replica trains on one ``--seq-len`` sequence per step
(forward, backward, gradient average over the world, no optimizer step), and the run records

- ``tokens_per_s_per_gpu``: ``(W/P) x batch x seq_len / step_s / W``, with ``step_s`` the slowest
  rank's mean step time;
- ``peak_memory_gib``: the largest ``torch.cuda.max_memory_allocated`` over the ranks (None on CPU);
- ``loss``: the first step's loss - the same for every P (same weights, same sequence), a check
  that sequence parallelism changed the speed and not the math.

A degree that runs out of memory is recorded as ``"status": "oom"``. Weights are random (a
Llama-style config; ``--vocab-size`` keeps the logits of a 64K sequence affordable). On a CPU
(gloo, fp32) ``--preset tiny`` runs the same code in seconds; tests/test_sequence_parallel.py
does that under torchrun.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
import torch.distributed as dist
import transformers

from sparseattn.bench.timing import machine_record
from sparseattn.parallel import (
    average_gradients,
    build_groups,
    check_heads,
    init_distributed,
    sequence_parallel_loss,
    shard_batch,
)
from sparseattn.parallel.transformers import enable_sequence_parallel

PRESETS = {
    # name: LlamaConfig fields (vocab from --vocab-size)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    parser.add_argument("--vocab-size", type=int, default=None, help="default 32000 (128 for tiny)")
    parser.add_argument("--seq-len", type=int, default=65536, help="tokens per sequence (per DP replica)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-parallel-sizes", type=int, nargs="+", default=None,
                        help="degrees to run (default: every divisor of the world size)")
    parser.add_argument("--inner", default="sdpa", help="attention on head shards: sdpa, or sparseattn")
    parser.add_argument("--method", default="streaming", help="sparseattn method when --inner sparseattn")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="default on for GPU presets, off for tiny")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="collective timeout")
    parser.add_argument("--out", default=None, help="JSON path (written by rank 0)")
    args = parser.parse_args(argv)
    for name in ("seq_len", "batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def build_model(args, device, dtype):
    vocab = args.vocab_size or (128 if args.preset == "tiny" else 32000)
    config = transformers.LlamaConfig(**PRESETS[args.preset], vocab_size=vocab,
                                      max_position_embeddings=max(args.seq_len, 2048))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.train()
    if args.gradient_checkpointing:
        # transformers >= 5.2x renamed it; the GPU machine may have an older 5.x.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.inner == "sparseattn":
        from sparseattn.integrations.transformers import patch

        patch(model, method=args.method, min_sparse_len=0)
    return model


def reduce_max(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def run_degree(model, args, P: int, device) -> dict:
    """Train ``args.steps`` steps with sequence-parallel degree ``P``; the row of the report."""
    groups = build_groups(P)
    row = {"seq_parallel_size": P, "data_parallel_size": groups.data_parallel_size}
    config = model.config
    try:
        check_heads(config.num_attention_heads, config.num_key_value_heads, P)
    except ValueError as exc:
        return {**row, "status": f"skipped: {exc}"}
    generator = torch.Generator().manual_seed(1)  # one sequence, the same on every rank and for every P
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator).to(device)
    shard = shard_batch(ids, seq_parallel_rank=groups.seq_parallel_rank, seq_parallel_size=P)
    handle = enable_sequence_parallel(model, groups.seq_group)
    world = None if groups.world_size == 1 else dist.group.WORLD
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, first_loss, status = [], None, "ok"
    try:
        for step in range(args.warmup + args.steps):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            logits = model(**shard.model_inputs()).logits
            loss = sequence_parallel_loss(logits, shard.labels, groups.seq_group)
            del logits
            loss.backward()
            average_gradients(params, world)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
            if first_loss is None:
                first_loss = float(loss.item())
    except torch.cuda.OutOfMemoryError:
        status = "oom"
    finally:
        handle.restore()
        model.zero_grad(set_to_none=True)
    # Every rank agrees on the outcome (a rank that ran out of memory makes the row "oom").
    if reduce_max(float(status == "oom"), device) > 0:
        return {**row, "status": "oom"}
    step_s = reduce_max(sum(times) / len(times), device)
    peak = None
    if device.type == "cuda":
        peak = round(reduce_max(torch.cuda.max_memory_allocated(device) / 2**30, device), 3)
    tokens = groups.data_parallel_size * args.batch_size * args.seq_len
    return {**row, "status": "ok", "step_s": step_s, "tokens_per_s_per_gpu": tokens / step_s / groups.world_size,
            "peak_memory_gib": peak, "loss": first_loss, "local_seq_len": shard.input_ids.shape[1]}


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rank, world_size = init_distributed(timeout_s=args.timeout_s)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = device.type == "cuda" and args.preset != "tiny"
    sizes = args.seq_parallel_sizes or [d for d in range(1, world_size + 1) if world_size % d == 0]
    for P in sizes:
        if world_size % P != 0:
            raise SystemExit(f"--seq-parallel-sizes: {P} does not divide the world size {world_size}")
    model = build_model(args, device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    rows = []
    for P in sizes:
        row = run_degree(model, args, P, device)
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    report = {"benchmark": "sp_scaling", "machine": machine_record(), "device": machine_record()["device"],
              "world_size": world_size, "backend": dist.get_backend() if dist.is_initialized() else None,
              "transformers": transformers.__version__, "preset": args.preset,
              "config": {k: v for k, v in model.config.to_dict().items()
                         if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "head_dim", "vocab_size")},
              "seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": args.dtype, "inner": args.inner,
              "method": args.method if args.inner == "sparseattn" else None,
              "gradient_checkpointing": args.gradient_checkpointing, "steps": args.steps, "warmup": args.warmup,
              "results": rows}
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
