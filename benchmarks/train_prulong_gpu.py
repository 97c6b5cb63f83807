"""PruLong on the GPU: masks-only training of the embedded model, step timing, and a quick retrieval check.

The "Done when" run of issue 9 (training half), on one GPU:

1. train: masks-only PruLong on SmolLM2-135M-Instruct (30 layers x 3 KV heads = 90 gates), packed
   rows of ``--seq-len`` tokens (8K) of synthetic passkey retrieval data, target sparsity
   ``--sparsity`` (0.5) reached at half the run; writes ``train_log.csv``, ``summary.json`` and
   ``head_mask_sp0.5.tsv`` (global top-k of the gates) under ``--out/run``;
2. timing: one train step (forward + backward + optimizer step) on the same 8K row, warmed up,
   every case timed in interleaved rounds (ratios: medians of per-round ratios):
   dense (transformers' SDPA attention, every weight trained), dense with frozen weights (the
   backward still runs through every layer), PruLong masks-and-weights and masks-only with every
   head computing both branches (the upper bound), with the initial gates and with the trained
   gates (a head whose sampled gate is exactly 0 or 1 computes one branch);
3. retrieval: passkey prompts of ``--eval-len`` tokens (sparseattn.tasks, the standard library's
   source as haystack, needle at spread depths), greedy answers with every head full, with the
   learned mask (full heads dense, streaming heads sink + window) and with a random mask of the same
   sparsity.

Everything lands in ``--out/results.json`` (and a table on stdout).

Usage:
    python benchmarks/train_prulong_gpu.py --out benchmarks/results/<gpu>/prulong
    python benchmarks/train_prulong_gpu.py --out /tmp/p --steps 100 --skip-eval   # a quicker look
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparseattn.headmask import load_head_mask, random_head_mask  # noqa: E402
from sparseattn.methods.streaming import StreamingConfig  # noqa: E402
from sparseattn.models import load_llama  # noqa: E402
from sparseattn.tasks import build_passkey_prompt, is_correct  # noqa: E402
from sparseattn.training import train as train_cli  # noqa: E402
from sparseattn.training.data import PackedCollator  # noqa: E402
from sparseattn.training.model import STATE_FILE, PruLongModel, install  # noqa: E402
from sparseattn.training.synthetic import SyntheticRetrievalDataset  # noqa: E402

logger = logging.getLogger("sparseattn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--model", default="default", help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per packed training row")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps")
    p.add_argument("--sparsity", type=float, default=0.5, help="end_head_sparsity")
    p.add_argument("--warmup-ratio", type=float, default=0.5, help="sparsity_warmup_ratio")
    p.add_argument("--mask-lr", type=float, default=0.05, help="mask_learning_rate")
    p.add_argument("--reg-lr", type=float, default=4.0, help="reg_learning_rate")
    p.add_argument("--disable-linear-term", action="store_true", help="freeze lambda1 at 0")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--timing-steps", type=int, default=20, help="interleaved timing rounds (one step of each case)")
    p.add_argument("--eval-len", type=int, default=8000, help="retrieval prompt tokens (<= 8192 - answer)")
    p.add_argument("--eval-prompts", type=int, default=20)
    p.add_argument("--skip-train", action="store_true", help="reuse --out/run from an earlier run")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also profile 3 steps of each timed case (torch.profiler): GPU busy time vs wall time and "
                        "the top operators, in --out/profile/<case>.txt")
    return p.parse_args(argv)


# ---- 1. training -----------------------------------------------------------------------------


def train(args) -> dict:
    run = args.out / "run"
    argv = [
        "--mode", "masks_only", "--model_name_or_path", args.model, "--output_dir", str(run),
        "--seq_len", str(args.seq_len), "--max_steps", str(args.steps), "--per_device_train_batch_size", "1",
        "--end_head_sparsity", str(args.sparsity), "--sparsity_warmup_ratio", str(args.warmup_ratio),
        "--mask_learning_rate", str(args.mask_lr), "--reg_learning_rate", str(args.reg_lr),
        "--disable_linear_regularization_term", str(args.disable_linear_term).lower(),
        "--sink_size", str(args.sink), "--context_window_if_toggled", str(args.window),
        "--streaming_block_size", str(args.block_size), "--bf16", "--logging_steps", "1",
        "--save_steps", str(max(1, args.steps // 2)), "--save_total_limit", "1", "--disable_tqdm", "true",
        "--seed", "0", "--report_to", "none",
    ]
    start = time.perf_counter()
    summary = train_cli.main(argv)
    summary["train_seconds"] = time.perf_counter() - start
    summary["seconds_per_step"] = summary["train_seconds"] / max(1, summary["global_step"])
    return summary


# ---- 2. step timing --------------------------------------------------------------------------


def _profile_steps(step_fn, path: Path, n: int = 3) -> dict:
    """Wall time and GPU kernel time of ``n`` warmed steps; the operator tables go to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    step_fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(n):
            step_fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by="self_cuda_time_total", row_limit=25) + "\n\n"
                    + events.table(sort_by="self_cpu_time_total", row_limit=25) + "\n")
    return {"wall_ms_per_step": 1e3 * wall / n, "gpu_kernel_ms_per_step": gpu_us / 1e3 / n,
            "kernels_per_step": kernels / n}


def timing(args, base_model, tokenizer) -> dict:
    """Every case built first, then timed in interleaved rounds (one step of each case per round, the
    order rotating): a CPU-bound step drifts with the host, and interleaving puts a mixed step and
    its dense baseline under the same conditions. Ratios are medians of per-round ratios."""
    device = torch.device("cuda")
    data = SyntheticRetrievalDataset(tokenizer, args.seq_len, 1, seed=123, loss_on="all")
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in PackedCollator()([data[0]]).items()}

    def make_step(model, forward):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None

        def step():
            loss = forward(model)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return step

    def dense_forward(m):
        return m(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                 use_cache=False).loss

    def prulong_forward(m):
        return m(**batch, target_sparsity=args.sparsity)["loss"]

    steps = {}
    # Dense: the model as transformers runs it (SDPA), packed row as position_ids / one document.
    for name, train_weights in (("dense_full_weights", True), ("dense_frozen_weights", False)):
        model = copy.deepcopy(base_model).to(device).train()
        model.set_attn_implementation("sdpa")
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(train_weights)
        if not train_weights:
            model.enable_input_require_grads()  # backward through every layer, no weight gradients
        steps[name] = make_step(model, dense_forward)
    # Gate states: every head computing both branches (the upper bound), the initial gates (log_alpha 4:
    # most samples exactly 1, full branch only), and the trained gates of this run (if it trained).
    states = {"both_branches": (None, False), "initial_gates": (None, True)}
    state_file = args.out / "run" / STATE_FILE
    if state_file.is_file():
        states["trained_gates"] = (safetensors.torch.load_file(str(state_file))["log_alpha"], True)
    for mode in ("masks_and_weights", "masks_only"):
        for state, (log_alpha, skip) in states.items():
            model = PruLongModel(copy.deepcopy(base_model), mode=mode, sink=args.sink, window=args.window,
                                 block_size=args.block_size, skip_saturated_branches=skip).to(device).train()
            if log_alpha is not None:
                with torch.no_grad():
                    model.gates.log_alpha.copy_(log_alpha)
            steps[f"prulong_{mode}_{state}"] = make_step(model, prulong_forward)

    names = list(steps)
    for name in names:  # warm-up: Triton compiles, cuDNN plans, allocator
        for _ in range(3):
            steps[name]()
    torch.cuda.synchronize()
    times = {name: [] for name in names}
    extra = {name: 0 for name in names}
    for r in range(args.timing_steps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            steps[name]()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            extra[name] = max(extra[name], torch.cuda.max_memory_allocated() - before)

    def summary(values):
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        return {"median_ms": 1e3 * statistics.median(values), "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2],
                "min_ms": 1e3 * min(values), "mean_ms": 1e3 * statistics.fmean(values)}

    results = {name: dict(summary(times[name]), step_extra_mem_gb=extra[name] / 2**30, rounds=len(times[name]))
               for name in names}
    for name in [n for n in names if n.startswith("prulong_")]:
        baselines = {"vs_dense": "dense_full_weights"}
        if "masks_only" in name:
            baselines["vs_dense_frozen"] = "dense_frozen_weights"
        for key, base in baselines.items():
            results[name][key] = statistics.median(a / b for a, b in zip(times[name], times[base]))
    if args.profile:
        for name in ("dense_full_weights", "dense_frozen_weights", "prulong_masks_and_weights_both_branches",
                     "prulong_masks_only_both_branches"):
            results[name]["profile"] = _profile_steps(steps[name], args.out / "profile" / f"{name}.txt")
    results["tokens_per_step"] = int(batch["input_ids"].numel())
    results["timing"] = "interleaved rounds; ratios are medians of per-round ratios"
    return results


# ---- 3. retrieval ----------------------------------------------------------------------------


def _accuracy(model, tokenizer, prompts) -> float:
    correct = 0
    for prompt in prompts:
        ids = torch.tensor([prompt.input_ids], device="cuda")
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        correct += is_correct(tokenizer.decode(out[0, ids.shape[1]:]), prompt.answer)
    return correct / len(prompts)


def retrieval(args, base_model, tokenizer, mask: torch.Tensor) -> dict:
    prompts = [build_passkey_prompt(tokenizer, args.eval_len, depth=i / max(1, args.eval_prompts - 1),
                                    passkey=str(10007 + 7919 * i)[:5]) for i in range(args.eval_prompts)]
    num_streaming = int((~mask).sum())
    random_mask = random_head_mask(*mask.shape, num_streaming, seed=0)
    streaming = StreamingConfig(sink=args.sink, window=args.window, block_size=args.block_size)
    results = {"prompts": len(prompts), "prompt_tokens": args.eval_len, "streaming_heads": num_streaming,
               "num_heads": mask.numel()}
    model = copy.deepcopy(base_model).to("cuda").eval()
    model.set_attn_implementation("sdpa")
    model.config.use_cache = True
    results["dense"] = _accuracy(model, tokenizer, prompts)
    for name, head_mask in (("learned_mask", mask), ("random_mask", random_mask)):
        install(model, streaming, head_mask=head_mask)
        model.config.use_cache = True
        results[name] = _accuracy(model, tokenizer, prompts)
    results["learned_vs_dense"] = results["learned_mask"] / results["dense"] if results["dense"] else float("nan")
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "args": vars(args) | {"out": str(args.out)}}
    import transformers
    import triton

    results.update(transformers=transformers.__version__, triton=triton.__version__)
    if not args.skip_train:
        results["train"] = train(args)
    elif (args.out / "run" / "summary.json").is_file():
        results["train"] = json.loads((args.out / "run" / "summary.json").read_text())
    base_model, tokenizer = load_llama(args.model, dtype=torch.bfloat16, device="cpu")
    if not args.skip_timing:
        results["timing"] = timing(args, base_model, tokenizer)
    mask_path = args.out / "run" / f"head_mask_sp{args.sparsity:g}.tsv"
    if not args.skip_eval and mask_path.is_file():
        results["retrieval"] = retrieval(args, base_model, tokenizer, load_head_mask(mask_path))
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    print(f"\n== PruLong masks-only on {results['device']} ==")
    if "train" in results:
        t = results["train"]
        print(f"train: {t['global_step']} steps, expected sparsity {t['expected_sparsity']:.4f} "
              f"(target {t['target_sparsity']}), deterministic {t['deterministic_sparsity']:.4f}, "
              f"lambda1 {t['lambda1']:.3g}, lambda2 {t['lambda2']:.3g}"
              + (f", {t['seconds_per_step']:.3f} s/step" if "seconds_per_step" in t else ""))
        print(f"mask: {t.get('head_mask')} ({t.get('streaming_heads')} of {t.get('num_heads')} heads streaming)")
    if "timing" in results:
        r = results["timing"]
        for name, row in r.items():
            if isinstance(row, dict):
                ratios = "".join(f", {key.replace('_', ' ')} {row[key]:.2f}x" for key in ("vs_dense", "vs_dense_frozen")
                                 if key in row)
                print(f"step {name:42s} {row['median_ms']:7.1f} ms (median; IQR {row['q1_ms']:.1f}-{row['q3_ms']:.1f}), "
                      f"+{row['step_extra_mem_gb']:.1f} GB in the step{ratios}")
                if "profile" in row:
                    prof = row["profile"]
                    print(f"     profiled: wall {prof['wall_ms_per_step']:.1f} ms/step, GPU kernels "
                          f"{prof['gpu_kernel_ms_per_step']:.1f} ms/step, {prof['kernels_per_step']:.0f} kernels/step")
    if "retrieval" in results:
        r = results["retrieval"]
        print(f"retrieval @{r['prompt_tokens']}: dense {r['dense']:.2f}, learned mask {r['learned_mask']:.2f}, "
              f"random mask {r['random_mask']:.2f} ({r['streaming_heads']}/{r['num_heads']} streaming)")
    print(f"results: {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
