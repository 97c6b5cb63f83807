"""FlexPrefill on the GPU: selection, attention and end to end against cuDNN dense (BENCHMARKS.md:
estimation + selection <= 2% of cuDNN dense at 128K; end to end >= 6x faster at 128K on the
LLM-like input, density reported).

Speed (default). For each length (default 8K..128K; B=1, GQA 32/8, D=128, bf16, causal) on the
seeded LLM-like input ``sparseattn.bench.inputs.llm_like_qkv`` (seed = the length, as in
``sparseattn bench methods``, unless ``--seed``) and each block size (default 128,
the config's default, and 64, the seed API's), in one run:

- ``dense``: cuDNN SDPA (warmed, causal, ``enable_gqa``), the baseline;
- ``select``: ``flexprefill_select_fast`` (estimation + selection + BlockIndex), its share of dense,
  its peak extra memory, and a per-stage breakdown (``stages``: last-block softmax passes, cover
  counts, block means, per-head plan, pooled scores + row selection);
- ``attention``: ``block_sparse_attention`` over that index, with effective and actual TFLOP/s;
- ``e2e``: ``sparse_attention(method="flexprefill")`` (validation + selection + attention);
- ``density`` (fraction of causal blocks), query-aware heads, output error against dense;
- up to ``--fidelity-max-len``: the fp32 reference selector on the same inputs (time, pattern
  agreement, block agreement).

A correctness gate runs first (a small case: fast selection against the fp32 reference, patterns
and blocks; our output against fp32 attention over the same blocks); if it fails the JSON is still
written but no percentages or speedups are printed. At the longest length the last-block kernel's
tile options are also timed (``sweep`` in the JSON; ``--no-sweep`` skips it).

Fidelity (``--fidelity``). The embedded model (SmolLM2-135M-Instruct) on ``--fidelity-tokens``
(default 8192) tokens of Python standard-library source: per layer and gamma (0.9, 0.95), the
exact attention mass inside FlexPrefill's blocks (recall), the relative output error and the
density (``sparseattn.methods.flexprefill.flexprefill_fidelity``).

    python benchmarks/bench_flexprefill.py --out /tmp/out/flexprefill.json [--lengths 8192,...,131072]
    python benchmarks/bench_flexprefill.py --fidelity --out /tmp/out/flexprefill_fidelity.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import torch

from sparseattn import sparse_attention
from sparseattn.bench.inputs import llm_like_qkv
from sparseattn.bench.peers import DENSE_PEERS
from sparseattn.bench.timing import block_flops, causal_dense_flops, device_slug, machine_record, time_ms, write_json
from sparseattn.index import causal_block_mask, cdiv
from sparseattn.kernels import flexprefill as fast
from sparseattn.methods.flexprefill import FlexPrefillConfig, flexprefill_fidelity
from sparseattn.reference import flexprefill as ref
from sparseattn.reference.attention import reference_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _options(cfg: FlexPrefillConfig) -> dict:
    return dict(gamma=cfg.gamma, tau=cfg.tau, min_budget=cfg.min_budget, max_budget=cfg.max_budget,
                block_size=cfg.block_size, sparsity_ratio=cfg.sparsity_ratio)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def agreement(q, k, cfg: FlexPrefillConfig) -> dict:
    """Fast path against the fp32 reference on the same inputs: patterns and blocks."""
    ours, ours_aware = fast.flexprefill_select_fast(q, k, return_patterns=True, **_options(cfg))
    theirs, theirs_aware = ref.flexprefill_select(q, k, return_patterns=True, **_options(cfg))
    a, b = ours.to_mask(), theirs.to_mask()
    causal = causal_block_mask(q.shape[2], k.shape[2], cfg.block_size, cfg.block_size, True, device=q.device)
    return {"patterns_equal": bool(torch.equal(ours_aware, theirs_aware)),
            "pattern_agreement": (ours_aware == theirs_aware).float().mean().item(),
            "block_agreement_causal": (a == b)[..., causal].float().mean().item(),
            "density_ours": a[..., causal].float().mean().item(),
            "density_reference": b[..., causal].float().mean().item()}


def correctness_gate(cfg: FlexPrefillConfig) -> dict:
    """Small case: selection vs the fp32 reference (>= 99.9% equal blocks, equal patterns), and our
    bf16 output vs fp32 attention over the same blocks (relative error < 2e-2)."""
    q, k, v = llm_like_qkv(1, 8, 2, 4096 + 37, HEAD_DIM, device="cuda", seed=1)
    out = agreement(q, k, cfg)
    index = fast.flexprefill_select_fast(q, k, **_options(cfg))
    ours = sparse_attention(q, k, v, method="flexprefill", config=cfg)
    expected = reference_attention(q, k, v, mask=index.to_element_mask())
    out["output_rel_err_vs_fp32"] = _rel(ours, expected)
    out["passed"] = bool(out["patterns_equal"] and out["block_agreement_causal"] >= 0.999
                         and out["output_rel_err_vs_fp32"] < 2e-2 and torch.isfinite(ours).all())
    return out


def stage_times(q, k, cfg: FlexPrefillConfig) -> dict:
    """Median time of each stage of ``flexprefill_select_fast`` run on its own (same arguments)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bs = cfg.block_size
    nq, nk, n_hat = cdiv(Lq, bs), cdiv(Lk, bs), min(bs, Lq)
    vertical, slash, min_offset = fast.last_block_distributions_fast(q, k, bs, True)
    g_min, n_groups = ref.offset_groups(Lk, min_offset, bs)
    k_pool = fast.block_mean(k, bs)
    vertical_blocks = ref.sum_pool(vertical, 0, bs, nk)
    slash_groups = ref.sum_pool(slash, min_offset - g_min * bs, bs, n_groups)
    n_v, n_s = fast.cover_counts_fast([vertical, slash], cfg.gamma)

    def plan():
        q_hat_mean = q[:, :, Lq - n_hat:].float().mean(2).reshape(B, Hkv, Hq // Hkv, D)
        estimate = torch.softmax(torch.matmul(q_hat_mean, k_pool.transpose(-1, -2)) / math.sqrt(D), dim=-1)
        return ref.plan_heads(vertical_blocks, slash_groups, n_v, n_s, estimate.reshape(B, Hq, nk), tau=cfg.tau,
                              min_budget=cfg.min_budget, max_budget=cfg.max_budget, block_size=bs,
                              slash_group0=-g_min)

    query_aware, v_sel, s_sel = plan()
    heads = None if cfg.sparsity_ratio is not None else query_aware
    q_pool = fast.block_mean(q, bs, heads=heads)

    def rows():
        return fast.select_rows_fast((B, Hq, nq, nk), query_aware, v_sel, s_sel, q_pool, k_pool, q_len=Lq, k_len=Lk,
                                     block_size=bs, gamma=cfg.gamma, sparsity_ratio=cfg.sparsity_ratio, causal=True,
                                     g_min=g_min, need_scores=cfg.tau > 0 or cfg.sparsity_ratio is not None,
                                     max_k=fast.index_width(nk, cfg.sparsity_ratio))

    times = {
        "last_block_distributions": time_ms(lambda: fast.last_block_distributions_fast(q, k, bs, True))["ms"],
        "cover_counts": time_ms(lambda: fast.cover_counts_fast([vertical, slash], cfg.gamma))["ms"],
        "pool_pattern_sums": time_ms(lambda: (ref.sum_pool(vertical, 0, bs, nk),
                                              ref.sum_pool(slash, min_offset - g_min * bs, bs, n_groups)))["ms"],
        "block_mean_k": time_ms(lambda: fast.block_mean(k, bs))["ms"],
        "block_mean_q": time_ms(lambda: fast.block_mean(q, bs, heads=heads))["ms"],
        "plan_heads": time_ms(plan)["ms"],
        "pooled_scores_and_select_rows": time_ms(rows)["ms"],
    }
    return times


def bench_case(q, k, v, dense_ms, dense_out, cfg: FlexPrefillConfig, with_reference: bool) -> dict:
    from sparseattn.kernels.block_sparse import block_sparse_attention

    L = q.shape[2]
    r = {"block_size": cfg.block_size, "gamma": cfg.gamma, "tau": cfg.tau, "sparsity_ratio": cfg.sparsity_ratio}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    index, query_aware = fast.flexprefill_select_fast(q, k, return_patterns=True, **_options(cfg))
    torch.cuda.synchronize()
    r["select_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    r["qkv_gib"] = sum(t.numel() * t.element_size() for t in (q, k, v)) / 2**30
    r["density"] = index.density().mean().item()
    r["density_per_head"] = index.density().mean(0).tolist()
    r["query_aware_heads"] = int(query_aware.sum().item())
    r["select_ms"] = time_ms(lambda: fast.flexprefill_select_fast(q, k, **_options(cfg)))["ms"]
    r["stages_ms"] = stage_times(q, k, cfg)
    r["attention_ms"] = time_ms(lambda: block_sparse_attention(q, k, v, index, causal=True))["ms"]
    r["e2e_ms"] = time_ms(lambda: sparse_attention(q, k, v, method="flexprefill", config=cfg))["ms"]
    out = sparse_attention(q, k, v, method="flexprefill", config=cfg)
    r["rel_err_vs_dense"] = _rel(out, dense_out)
    out = None  # release device memory before the next case
    dense_flops = causal_dense_flops(1, q.shape[1], L, L, q.shape[3])
    r["effective_tflops"] = dense_flops / r["e2e_ms"] / 1e9
    r["actual_tflops"] = block_flops(index, q.shape[3]) / r["attention_ms"] / 1e9
    if dense_ms:
        r["select_pct_of_dense"] = 100 * r["select_ms"] / dense_ms
        r["speedup"] = dense_ms / r["e2e_ms"]
    if with_reference:
        r["reference_ms"] = time_ms(lambda: ref.flexprefill_select(q, k, **_options(cfg)),
                                    min_runs=1, max_runs=1, warmup=1)["ms"]
        r.update(agreement(q, k, cfg))
    return r


def sweep_last_block(q, k, block_size) -> list[dict]:
    """Tile options of ``_last_block_kernel`` (both passes and the folds)."""
    rows = []
    options = [(128, 64, None), (128, 128, None), (64, 64, None), (128, 32, None), (64, 128, None)]
    options += [(128, 64, n) for n in (1, 4, 16, 32)]  # key tiles per program of the first pass
    for block_m, block_n, stat_tiles in options:
        entry = {"block_m": block_m, "block_n": block_n, "stat_tiles": stat_tiles or fast.STAT_TILES}
        try:
            t = time_ms(lambda: fast.last_block_distributions_fast(q, k, block_size, True, block_m=block_m,
                                                                   block_n=block_n, stat_tiles=stat_tiles),
                        max_runs=30)
            rows.append({**entry, "ms": t["ms"]})
        except Exception as err:  # noqa: BLE001 - a config that does not compile is a result, not a failure
            rows.append({**entry, "error": f"{type(err).__name__}: {str(err)[:200]}"})
    return rows


def print_table(rows, gate_ok):
    print()
    print("FlexPrefill, LLM-like input, B=1 GQA 32/8 D=128 bf16 causal (ms, median; cuDNN dense baseline)")
    print(f"{'L':>7} {'bs':>4} {'dense':>8} {'select':>8} {'%dense':>7} {'attn':>8} {'e2e':>8} {'speedup':>8} "
          f"{'density':>8} {'QA':>3} {'agree':>7} {'err':>8}")

    def fmt(x, spec=".2f"):
        return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"

    for row in rows:
        for r in row["cases"]:
            pct = r.get("select_pct_of_dense") if gate_ok else None
            speed = r.get("speedup") if gate_ok else None
            print(f"{row['L']:>7} {r['block_size']:>4} {fmt(row['dense_ms']):>8} {fmt(r['select_ms']):>8} "
                  f"{fmt(pct):>7} {fmt(r['attention_ms']):>8} {fmt(r['e2e_ms']):>8} {fmt(speed):>8} "
                  f"{fmt(100 * r['density'], '.1f'):>7}% {r['query_aware_heads']:>3} "
                  f"{fmt(r.get('block_agreement_causal'), '.4f'):>7} {fmt(r['rel_err_vs_dense'], '.1e'):>8}")
    if not gate_ok:
        print("CORRECTNESS GATE FAILED: no percentages or speedups printed (see the JSON).")


def speed_main(args) -> int:
    lengths = [int(x) for x in args.lengths.split(",")]
    block_sizes = [int(x) for x in args.block_sizes.split(",")]
    configs = [FlexPrefillConfig(gamma=args.gamma, tau=args.tau, block_size=bs, sparsity_ratio=args.sparsity_ratio)
               for bs in block_sizes]
    start = time.time()
    gate = correctness_gate(configs[0])
    print(f"correctness gate: {'PASS' if gate['passed'] else 'FAIL'} {json.dumps(gate)}", flush=True)
    rows, sweep = [], []
    for L in lengths:
        seed = L if args.seed is None else args.seed
        q, k, v = llm_like_qkv(1, HEADS, KV_HEADS, L, HEAD_DIM, device="cuda", seed=seed)
        dense = DENSE_PEERS[0].make(q, k, v, True)
        row = {"L": L, "seed": seed, "dense_peer": DENSE_PEERS[0].name,
               "dense_ms": time_ms(dense)["ms"] if dense else None,
               "dense_flops": causal_dense_flops(1, HEADS, L, L, HEAD_DIM), "cases": []}
        dense_out = dense() if dense else None
        for cfg in configs:
            try:
                row["cases"].append(bench_case(q, k, v, row["dense_ms"], dense_out, cfg,
                                               with_reference=L <= args.fidelity_max_len))
            except torch.OutOfMemoryError as err:
                row["cases"].append({"block_size": cfg.block_size, "error": f"OutOfMemoryError: {str(err)[:200]}"})
            torch.cuda.empty_cache()
        row["cases"] = [c for c in row["cases"] if "error" not in c] + [c for c in row["cases"] if "error" in c]
        rows.append(row)
        if args.sweep and L == max(lengths):
            sweep = sweep_last_block(q, k, configs[0].block_size)
            for s in sweep:
                print("sweep", json.dumps(s), flush=True)
        q = k = v = dense = dense_out = None  # release device memory before the next length
        torch.cuda.empty_cache()
        print(f"L={L} done ({time.time() - start:.0f} s)", flush=True)
    seeds = "L (as `sparseattn bench methods`)" if args.seed is None else str(args.seed)
    record = {"machine": machine_record(), "input": f"llm_like_qkv defaults, seed {seeds}", "gate": gate,
              "rows": rows, "sweep": sweep, "seconds": time.time() - start,
              "note": "select = flexprefill_select_fast (estimation + selection + BlockIndex); e2e = "
                      "sparse_attention(method='flexprefill'); density over causal blocks"}
    write_json(args.out, record)
    print_table([{**r, "cases": [c for c in r["cases"] if "error" not in c]} for r in rows], gate["passed"])
    print(f"wrote {args.out} ({time.time() - start:.0f} s)")
    return 0 if gate["passed"] else 1


def fidelity_main(args) -> int:
    from sparseattn.bench.capture import real_text_ids
    from sparseattn.models import load_llama

    start = time.time()
    model, tokenizer = load_llama(None, device="cuda")
    ids = real_text_ids(tokenizer, args.fidelity_tokens).cuda()
    rows = flexprefill_fidelity(model, ids, gammas=(0.9, 0.95), block_size=args.fidelity_block_size, tau=args.tau,
                                progress=lambda line: print(line, flush=True))
    summary = {}
    for gamma in (0.9, 0.95):
        sel = [r for r in rows if r["gamma"] == gamma]
        flat = lambda key: [x for r in sel for x in r[key]]  # noqa: E731
        summary[str(gamma)] = {name: sum(flat(name)) / len(flat(name)) for name in ("recall", "rel_error", "density")}
        summary[str(gamma)]["min_recall"] = min(flat("recall"))
    record = {"machine": machine_record(), "model": "SmolLM2-135M-Instruct (embedded)", "tokens": args.fidelity_tokens,
              "block_size": args.fidelity_block_size, "tau": args.tau, "rows": rows, "summary": summary,
              "seconds": time.time() - start}
    write_json(args.out, record)
    print()
    print(f"FlexPrefill fidelity on SmolLM2, {args.fidelity_tokens} tokens, block {args.fidelity_block_size} "
          f"(mean over heads; recall = exact attention mass inside the selected blocks)")
    print(f"{'layer':>5} {'gamma':>5} {'recall':>7} {'min':>7} {'rel.err':>8} {'density':>8} {'QA':>5}")
    for r in rows:
        n = len(r["recall"])
        print(f"{r['layer']:>5} {r['gamma']:>5} {sum(r['recall']) / n:>7.4f} {min(r['recall']):>7.4f} "
              f"{sum(r['rel_error']) / n:>8.4f} {100 * sum(r['density']) / n:>7.1f}% {sum(r['query_aware']):>5.1f}")
    for gamma, s in summary.items():
        print(f"all layers, gamma {gamma}: recall {s['recall']:.4f} (min {s['min_recall']:.4f}), "
              f"rel. error {s['rel_error']:.4f}, density {100 * s['density']:.1f}%")
    print(f"wrote {args.out} ({time.time() - start:.0f} s)")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    parser.add_argument("--block-sizes", default="128,64", help="selection blocks to time (first: the gate's)")
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--sparsity-ratio", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None,
                        help="llm_like_qkv seed (default: the length, as `sparseattn bench methods`; the density "
                             "depends on it: at 128K, gamma 0.9, the fp32 reference selects 9.4%% with seed L "
                             "and 19.9%% with seed 0)")
    parser.add_argument("--fidelity-max-len", type=int, default=65536,
                        help="compare with the fp32 reference selector up to this length")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="skip timing the last-block kernel's tile options at the longest length")
    parser.add_argument("--fidelity", action="store_true", help="fidelity on the embedded model instead of speed")
    parser.add_argument("--fidelity-tokens", type=int, default=8192)
    parser.add_argument("--fidelity-block-size", type=int, default=128)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/flexprefill.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        print("bench_flexprefill needs a CUDA GPU", file=sys.stderr)
        return 2
    name = "flexprefill_fidelity.json" if args.fidelity else "flexprefill.json"
    args.out = args.out or os.path.join("benchmarks", "results", device_slug(torch.cuda.get_device_name()), name)
    return fidelity_main(args) if args.fidelity else speed_main(args)


if __name__ == "__main__":
    sys.exit(main())
