"""XAttention and MInference at equal fidelity: configs calibrated on a held-out prompt, timed at 128K.

The methods suite times each method at its default config, so XAttention (tau 0.95) and MInference
(1000 verticals / 6096 slashes) keep very different shares of the attention mass, and their speeds
are not comparable. This script asks the question a user calibrating a deployment asks: *what does
each method cost when it keeps 90% (or 95%) of the exact attention mass?*

For each evaluation input (``llm_like_qkv``, B=1, GQA 32/8, D=128, bf16, causal; seeds as in
``sparseattn bench methods --seeds``):

1. **Calibration on a held-out prompt of the same model.** ``llm_like_qkv(seed=s + 1000,
   heads_seed=s)`` has the evaluation input's per-head strengths (its "model") and another
   prompt (directions, vertical columns, matches, noise). On it:
   - XAttention: per query head, a threshold of ``calibrate.DEFAULT_CANDIDATES`` from the exact
     mass its selection keeps (mean over query rows), as ``sparseattn profile`` does
     (``estimated_block_mass``, ``exact_block_mass``, ``coverage_curve``): "every head" = each
     head's smallest threshold reaching ``target`` (``--allocation head``); "layer mean" = the
     least mean density whose mean over the heads reaches it (``--allocation layer``,
     ``allocation.allocate_mean``);
   - MInference: per query head, one of ``CANDIDATES`` from its exact recall and cost
     (``search.measure_candidates`` + ``search.choose``, as ``sparseattn search`` does): the
     same two target rules (``--target-recall --target-scope head|layer``), and ``search``'s
     default rule (best recall within a 10% FLOPs budget).
2. **Evaluation on the input itself.** Each config runs end to end through ``sparse_attention``
   (selection + index + attention), timed against cuDNN SDPA in the same process; reported with its
   density (fraction of causal blocks, or token pairs for MInference), the exact mass it keeps on
   *this* input (computed the same way, fp32), and ``||o - o_dense|| / ||o_dense||``.

The selection (estimation + index building) is reported three ways, each also as a share of
cuDNN's time: "as run", the call's selections (``selection_chunks``: its head chunks when
memory-bounded) timed alone, host time included; "GPU in the call", the GPU time of every kernel of
one call but the attention kernels (torch.profiler); "added to the call", the call's time less that
of attending its chunks' indices selected beforehand. In a call a chunk's selection is queued while
the GPU runs the previous chunk's attention, so the last two leave out host time the GPU never
waits on, and the last counts what it does wait on.

Also reported per input: the oracle density, the fewest 128-blocks per query-block row that hold 90%
(95%) of the row's exact mass. No block selection keeping that share of every row can compute
less, so ``dense / (oracle x kernel cost per block + estimation)`` bounds what any
method can reach on the input.

A correctness gate runs first (4133 tokens, 8/2 heads): each calibrated config's output against fp32
attention over its own index's element mask, and the calibration's bookkeeping (kept blocks,
computed pairs) against the index the method builds. If it fails, no speedups are printed.

    python benchmarks/bench_calibrated_methods.py --out /tmp/out/calibrated-methods.json
    python benchmarks/bench_calibrated_methods.py --length 32768 --seeds L --targets 0.9
    python benchmarks/bench_calibrated_methods.py --plot A.json B.json --out calibrated-methods.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseattn.allocation import allocate_mean  # noqa: E402
from sparseattn.api import attend, selection_chunks, sparse_attention  # noqa: E402
from sparseattn.bench.inputs import llm_like_qkv, oracle_density_from_mass, parse_seeds  # noqa: E402
from sparseattn.bench.peers import DENSE_PEERS  # noqa: E402
from sparseattn.bench.timing import kernel_us, machine_record, time_ms  # noqa: E402
from sparseattn.calibrate import (DEFAULT_CANDIDATES, coverage_curve, estimated_block_mass,  # noqa: E402
                                  exact_block_mass, smallest_reaching)
from sparseattn.index import causal_block_mask  # noqa: E402
from sparseattn.methods import get_method  # noqa: E402
from sparseattn.methods.minference import MInferenceConfig  # noqa: E402
from sparseattn.methods.xattention import XAttentionConfig  # noqa: E402
from sparseattn.search import Candidate, choose, measure_candidates  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
XATTN_STRIDE, XATTN_BLOCK = 16, 128
MINF_BLOCK = 64
DEVICE = "cuda"  # the script times on a GPU; the CPU runs only its bookkeeping in tests
HELD_OUT = 1000  # calibration prompt seed = evaluation seed + HELD_OUT
BUDGET = 0.10  # FLOPs budget of the comparison rule (search's highest recall within it)
# MInference candidates in tokens, for 128K prompts (search.default_candidates scales with L and
# starts at ~10% of dense; these go down to ~3%): vertical-and-slash from 256/256 up to the seed's
# 1000/6096, A-shape, and block-sparse top-k of 64-blocks.
CANDIDATES = ([Candidate("vertical_and_slash", v, s) for v, s in
               ((256, 256), (512, 512), (512, 1024), (1024, 1024), (1024, 2048), (2048, 2048), (2048, 4096),
                (1000, 6096))]
              + [Candidate("a_shape", 128, w) for w in (2048, 8192)]
              + [Candidate("block_sparse", n, 0) for n in (64, 128)])
# --candidates extended: finer steps at both ends (the allocation can only pick what it is offered).
EXTENDED = CANDIDATES + ([Candidate("vertical_and_slash", v, s) for v, s in
                          ((128, 128), (256, 512), (512, 2048), (1024, 4096), (2048, 3072))]
                         + [Candidate("a_shape", 64, w) for w in (512, 1024)]
                         + [Candidate("block_sparse", n, 0) for n in (16, 32, 256)])


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def xattention_curve(q, k, candidates=DEFAULT_CANDIDATES) -> dict:
    """Exact coverage and density of XAttention's selection at every candidate threshold, per head: `[Hq, G]`."""
    L = q.shape[2]
    est = estimated_block_mass(q, k, stride=XATTN_STRIDE, block_size=XATTN_BLOCK)
    exact = exact_block_mass(q, k, block_size=XATTN_BLOCK)
    curve = coverage_curve(est, exact, candidates, q_len=L, k_len=L, block_size=XATTN_BLOCK)
    return {"coverage": (curve["covered"] / L).mean(0), "density": (curve["kept"] / curve["allowed"]).mean(0),
            "exact": exact}


def pick(values: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """``values [G, Hq]`` (candidate-major) or ``[Hq, G]`` -> per head the chosen entry."""
    return values.gather(-1, choice[:, None].to(values.device))[:, 0]


def correctness_gate() -> dict:
    """Calibrated configs on 4133 tokens, 8/2 heads: outputs vs fp32 over their own index, bookkeeping vs index."""
    from sparseattn.kernels.block_sparse import block_sparse_forward  # noqa: F401  (kernels present)

    L = 4096 + 37
    q, k, v = llm_like_qkv(1, 8, 2, L, HEAD_DIM, device=DEVICE, seed=1)
    out, ok = {}, True

    def masked_reference(mask):
        G = q.shape[1] // k.shape[1]
        kk, vv = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
        return torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask)

    curve = xattention_curve(q, k)
    choice = smallest_reaching(curve["coverage"], 0.9)
    taus = torch.tensor([DEFAULT_CANDIDATES[i] for i in choice.tolist()], device=DEVICE)
    cfg = XAttentionConfig(threshold=taus, stride=XATTN_STRIDE, block_size=XATTN_BLOCK)
    index = get_method("xattention").select(q, k, cfg, causal=True)
    kept = index.to_mask()[..., causal_block_mask(L, L, XATTN_BLOCK, XATTN_BLOCK, True, device=DEVICE)].sum(-1)
    allowed = causal_block_mask(L, L, XATTN_BLOCK, XATTN_BLOCK, True).sum().item()
    want_density = pick(curve["density"], choice)
    o = sparse_attention(q, k, v, method="xattention", config=cfg)
    out["xattention"] = {"out_rel_err": _rel(o, masked_reference(index.to_element_mask())),
                         "density_bookkeeping_max_diff": (kept[0].double() / allowed - want_density).abs().max().item()}
    ok &= out["xattention"]["out_rel_err"] < 2e-2 and out["xattention"]["density_bookkeeping_max_diff"] < 5e-3

    recall, cost = measure_candidates(q, k, CANDIDATES, last_q=64, block_size=MINF_BLOCK)
    # One head per pattern kind and several sizes (the bookkeeping must hold for every candidate).
    choice = torch.tensor([0, 3, 7, 8, 9, 10, 11, 1])
    cfg = MInferenceConfig(head_patterns=tuple(tuple(CANDIDATES[i].as_list()) for i in choice.tolist()),
                           block_size=MINF_BLOCK)
    index = get_method("minference").select(q, k, cfg, causal=True)
    o = sparse_attention(q, k, v, method="minference", config=cfg)
    pairs = index.density(True)[0].double()  # per head, token pairs over dense causal pairs
    estimation = 2.0 * 64 * L / (L * (L + 1) / 2)
    want_cost = pick(cost.T, choice).double()
    is_vs = torch.tensor([CANDIDATES[i].pattern == "vertical_and_slash" for i in choice.tolist()], device=DEVICE)
    got_cost = pairs + torch.where(is_vs, estimation, 0.0)
    blocks = [CANDIDATES[i].pattern == "block_sparse" for i in choice.tolist()]
    block_estimation = math.ceil(L / MINF_BLOCK) ** 2 / (L * (L + 1) / 2)
    got_cost = torch.where(torch.tensor(blocks, device=DEVICE), pairs + block_estimation, got_cost)
    out["minference"] = {"out_rel_err": _rel(o, masked_reference(index.to_element_mask())),
                         "cost_bookkeeping_max_diff": (got_cost - want_cost).abs().max().item(),
                         "patterns": [CANDIDATES[i].as_list() for i in choice.tolist()]}
    ok &= out["minference"]["out_rel_err"] < 2e-2 and out["minference"]["cost_bookkeeping_max_diff"] < 1e-3
    out["passed"] = bool(ok)
    return out


def run_method(q, k, v, method, cfg, dense_out, dense_ms):
    spec = get_method(method)
    index = spec.select(q, k, cfg, causal=True)
    density = float(index.density().mean().item())
    select_ms = time_ms(lambda: spec.select(q, k, cfg, causal=True))["ms"]
    # The estimation and index building as the call runs them (its head chunks, when memory-bounded).
    select_run_ms = time_ms(lambda: [None for _ in selection_chunks(q, k, v, method, cfg)])["ms"]
    attend_ms = time_ms(lambda: attend(q, k, v, index))["ms"]
    index = None
    o = sparse_attention(q, k, v, method=method, config=cfg)
    err = _rel(o, dense_out)
    o = None
    t = time_ms(lambda: sparse_attention(q, k, v, method=method, config=cfg))
    gpu = call_gpu_ms(lambda: sparse_attention(q, k, v, method=method, config=cfg))
    attend_run_ms = attend_chunks_ms(q, k, v, method, cfg)
    torch.cuda.empty_cache()
    return {"e2e_ms": t["ms"], "speedup": dense_ms / t["ms"], "select_ms": select_ms, "select_run_ms": select_run_ms,
            "select_run_share": select_run_ms / dense_ms, "attend_ms": attend_ms,
            "select_gpu_ms": gpu["select_ms"], "select_gpu_share": gpu["select_ms"] / dense_ms,
            "attend_gpu_ms": gpu["attend_ms"], "attend_run_ms": attend_run_ms,
            "select_added_ms": t["ms"] - attend_run_ms, "select_added_share": (t["ms"] - attend_run_ms) / dense_ms,
            "density": density, "rel_err": err, "peak_mib": t["peak_mib"]}


def attend_chunks_ms(q, k, v, method, cfg) -> float:
    """Wall time of the call's attention alone: its head chunks' indices selected beforehand (all
    held at once), then attended into one output as ``sparse_attention`` does. The call's time less
    this is what its selection adds to it, host stalls included (``select_added_ms``)."""
    G = q.shape[1] // k.shape[1]
    chunks = list(selection_chunks(q, k, v, method, cfg))
    out = torch.empty_like(q)

    def run():
        for g0, g1, index in chunks:
            attend(q[:, g0 * G:g1 * G], k[:, g0:g1], v[:, g0:g1], index, out=out[:, g0 * G:g1 * G])

    ms = time_ms(run)["ms"]
    chunks = out = None
    return ms


# The attention kernels of a call (block_sparse._fwd_kernel, vertical_slash._vs_fwd_kernel); every
# other kernel, memset or copy the call runs is its estimation and index building.
ATTENTION_KERNELS = ("_fwd_kernel",)


def call_gpu_ms(fn, iters: int = 3) -> dict:
    """GPU time of one call of ``fn``, split into its attention kernels and the rest (the selection),
    from the kernels' own durations (``kernel_us``). In a call the selection of one head chunk is
    queued while the GPU still runs the previous chunk's attention, so its host time (Python,
    launches) is hidden and this GPU time is what it adds; ``selection_chunks`` timed alone
    (``select_run_ms``) is not."""
    times = kernel_us(fn, iters=iters)
    attend = sum(us for name, us in times.items() if any(a in name for a in ATTENTION_KERNELS))
    return {"attend_ms": attend / 1e3, "select_ms": (sum(times.values()) - attend) / 1e3}


def bench_seed(L, seed, targets, log, methods=("xattention", "minference")) -> list[dict]:
    name = "L" if seed is None else seed
    seed = L if seed is None else seed
    rows = []
    q, k, v = llm_like_qkv(1, HEADS, KV_HEADS, L, HEAD_DIM, device=DEVICE, seed=seed)
    dense_fn = DENSE_PEERS[0].make(q, k, v, True)
    dense_out = dense_fn()
    dense_ms = time_ms(dense_fn)["ms"]
    base = {"L": L, "seed": name, "dense_ms": dense_ms}
    rows.append({**base, "method": "dense_cudnn", "config": "cuDNN SDPA", "e2e_ms": dense_ms, "speedup": 1.0})
    log(f"seed {name}: cuDNN {dense_ms:.2f} ms")

    qc, kc, _ = llm_like_qkv(1, HEADS, KV_HEADS, L, HEAD_DIM, device=DEVICE, seed=seed + HELD_OUT, heads_seed=seed)
    if "xattention" in methods:
        rows += _xattention_rows(q, k, v, qc, kc, L, base, dense_out, dense_ms, targets, log)
    if "minference" in methods:
        rows += _minference_rows(q, k, v, qc, kc, base, dense_out, dense_ms, targets, log)
    return rows


def _xattention_rows(q, k, v, qc, kc, L, base, dense_out, dense_ms, targets, log) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    cal = xattention_curve(qc, kc)
    cal.pop("exact")
    ev = xattention_curve(q, k)
    exact = ev.pop("exact")
    oracle = {c: oracle_density_from_mass(exact, L, L, XATTN_BLOCK, c) for c in (0.9, 0.95)}
    exact = None
    rows.append({**base, "method": "oracle", "config": "fewest 128-blocks per row", "density_90": oracle[0.9],
                 "density_95": oracle[0.95]})
    log(f"  oracle density 90% {100 * oracle[0.9]:.1f}%, 95% {100 * oracle[0.95]:.1f}% "
        f"(calibration curves {time.perf_counter() - t0:.0f} s)")
    grid = list(DEFAULT_CANDIDATES)
    xcfgs = [("tau 0.95 (default)", torch.full((HEADS,), grid.index(0.95), dtype=torch.long)),
             ("tau 0.9", torch.full((HEADS,), grid.index(0.9), dtype=torch.long))]
    for target in targets:
        xcfgs.append((f"every head {target:g} (held-out)", smallest_reaching(cal["coverage"], target)))
        xcfgs.append((f"layer mean {target:g} (held-out)",
                      allocate_mean(cal["coverage"].T, cal["density"].T, target).cpu()))
    for label, choice in xcfgs:
        taus = [grid[i] for i in choice.tolist()]
        cfg = XAttentionConfig(threshold=torch.tensor(taus, device=DEVICE) if len(set(taus)) > 1 else taus[0],
                               stride=XATTN_STRIDE, block_size=XATTN_BLOCK)
        r = run_method(q, k, v, "xattention", cfg, dense_out, dense_ms)
        r.update(recall=pick(ev["coverage"], choice).mean().item(),
                 recall_min_head=pick(ev["coverage"], choice).min().item(),
                 calibration_recall=pick(cal["coverage"], choice).mean().item(),
                 thresholds=taus)
        rows.append({**base, "method": "xattention", "config": label, **r})
        log(_row_line("xattention", label, r))
    cal = ev = None
    torch.cuda.empty_cache()
    return rows


def _row_line(method: str, label: str, r: dict) -> str:
    return (f"  {method} {label}: {r['e2e_ms']:.2f} ms ({r['speedup']:.2f}x), density {100 * r['density']:.1f}%, "
            f"recall {r['recall']:.3f} (calibration {r['calibration_recall']:.3f}), err {r['rel_err']:.3f}; "
            f"select {r['select_ms']:.2f} (as run {r['select_run_ms']:.2f}, {100 * r['select_run_share']:.1f}%; "
            f"GPU in the call {r['select_gpu_ms']:.2f}, {100 * r['select_gpu_share']:.1f}%; "
            f"added to the call {r['select_added_ms']:.2f}, {100 * r['select_added_share']:.1f}%) + "
            f"attend {r['attend_ms']:.2f} ms (in the call {r['attend_gpu_ms']:.2f}, its chunks alone "
            f"{r['attend_run_ms']:.2f})")


def _minference_rows(q, k, v, qc, kc, base, dense_out, dense_ms, targets, log) -> list[dict]:
    rows, base = [], {**base, "candidates": "extended" if CANDIDATES is EXTENDED else "default"}
    t0 = time.perf_counter()
    rc, cc = measure_candidates(qc, kc, CANDIDATES, last_q=64, block_size=MINF_BLOCK)
    torch.cuda.empty_cache()
    re_, ce = measure_candidates(q, k, CANDIDATES, last_q=64, block_size=MINF_BLOCK)
    log(f"  minference candidates measured ({time.perf_counter() - t0:.0f} s)")
    default = CANDIDATES.index(Candidate("vertical_and_slash", 1000, 6096))
    mcfgs = [("1000 / 6096 (default)", torch.full((HEADS,), default, dtype=torch.long)),
             ("512 / 512", torch.full((HEADS,), CANDIDATES.index(Candidate("vertical_and_slash", 512, 512)),
                                      dtype=torch.long)),
             (f"best recall within {BUDGET:g} of dense (held-out)", choose(rc, cc, BUDGET)[0].cpu())]
    for target in targets:
        for scope in ("head", "layer"):
            mcfgs.append((f"{'every head' if scope == 'head' else 'layer mean'} {target:g} (held-out)",
                          choose(rc, cc, 1.0, target_recall=target, scope=scope)[0].cpu()))
    for label, choice in mcfgs:
        patterns = [CANDIDATES[i].as_list() for i in choice.tolist()]
        cfg = MInferenceConfig(head_patterns=tuple(tuple(p) for p in patterns), block_size=MINF_BLOCK)
        r = run_method(q, k, v, "minference", cfg, dense_out, dense_ms)
        r.update(recall=pick(re_.T, choice).mean().item(), recall_min_head=pick(re_.T, choice).min().item(),
                 calibration_recall=pick(rc.T, choice).mean().item(), cost=pick(ce.T, choice).mean().item(),
                 patterns={p: sum(str(x) == p for x in patterns) for p in sorted({str(x) for x in patterns})},
                 table=patterns)
        rows.append({**base, "method": "minference", "config": label, **r})
        log(_row_line("minference", label, r))
    return rows


def table(rows, gate_ok) -> str:
    lines = ["| seed | method | config | e2e ms | speedup | density | recall (held-out calib.) | rel. err "
             "| select, as run | select GPU in the call | select added to the call |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "oracle":
            lines.append(f"| {r['seed']} | oracle | {r['config']} | | | 90%: {100 * r['density_90']:.1f}%, "
                         f"95%: {100 * r['density_95']:.1f}% | | | | | |")
            continue
        speed = f"{r['speedup']:.2f}x" if gate_ok else "-"
        extra = ("", "", "", "", "", "") if r["method"] == "dense_cudnn" else (
            f"{100 * r['density']:.1f}%", f"{r['recall']:.3f} ({r['calibration_recall']:.3f})", f"{r['rel_err']:.3f}",
            *(f"{r[name + '_ms']:.2f} ms ({100 * r[name + '_share']:.1f}%)" if name + "_ms" in r else ""
              for name in ("select_run", "select_gpu", "select_added")))
        lines.append(f"| {r['seed']} | {r['method']} | {r['config']} | {r['e2e_ms']:.2f} | {speed} | "
                     + " | ".join(extra) + " |")
    return "\n".join(lines)


def plot(paths, out_png) -> str:
    """Speedup against the exact mass kept on the evaluation input, one point per (config, seed),
    from one or more result JSONs of this script (later files override earlier ones per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    device = None
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        device = doc["machine"].get("device", device)
        methods = {r["method"] for r in doc["records"] if r["method"] in ("xattention", "minference")}
        rows = {key: r for key, r in rows.items() if key[0] not in methods}
        rows.update({(r["method"], r["config"], r["seed"]): r for r in doc["records"] if r["method"] in methods})
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {"xattention": "tab:blue", "minference": "tab:orange"}
    markers = {"L": "o", 1: "s", 2: "^"}
    for (method, config, seed), r in sorted(rows.items(), key=lambda kv: str(kv[0])):
        calibrated = "held-out" in config
        ax.scatter(r["recall"], r["speedup"], color=colors[method], marker=markers.get(seed, "x"),
                   facecolors=colors[method] if calibrated else "none", s=45)
        if seed == "L":
            ax.annotate(config.replace(" (held-out)", "*"), (r["recall"], r["speedup"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    ax.axhline(6, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("exact attention mass kept on the evaluation input (mean over heads)")
    ax.set_ylabel("speedup vs cuDNN dense, end to end")
    ax.set_yscale("log")
    ticks = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x")
    ax.yaxis.set_major_formatter(ticks)
    ax.yaxis.set_minor_formatter(ticks)
    ax.set_title("128K, LLM-like input, seeds L (o) / 1 (s) / 2 (^); filled = calibrated on a held-out prompt\n"
                 f"{device}", fontsize=9)
    for method, color in colors.items():
        ax.scatter([], [], color=color, label=method)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=130)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--seeds", default="L,1,2", help="evaluation seeds of llm_like_qkv (L = the length)")
    ap.add_argument("--targets", default="0.9,0.95", help="exact-mass targets of the calibrated configs")
    ap.add_argument("--methods", default="xattention,minference", help="comma-separated: xattention, minference")
    ap.add_argument("--candidates", choices=("default", "extended"), default="default",
                    help="MInference candidates: CANDIDATES, or EXTENDED (finer steps at both ends)")
    ap.add_argument("--out", required=True, help="JSON path (a .md table is written next to it); with --plot, the PNG")
    ap.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                    help="no run: plot these result files (later ones replace a method's points) to --out")
    args = ap.parse_args(argv)
    if args.plot:
        print(plot(args.plot, args.out))
        return 0
    seeds = parse_seeds(args.seeds)
    global CANDIDATES
    if args.candidates == "extended":
        CANDIDATES = EXTENDED
    targets = [float(t) for t in args.targets.split(",")]

    def log(msg):
        print(msg, flush=True)

    gate = correctness_gate()
    log(f"correctness gate: {'PASS' if gate['passed'] else 'FAIL'} {json.dumps(gate)}")
    rows = []
    for seed in seeds:
        rows += bench_seed(args.length, seed, targets, log, methods=args.methods.split(","))
    record = {"machine": machine_record(), "script": "benchmarks/bench_calibrated_methods.py",
              "input": f"llm_like_qkv, B=1, {HEADS}/{KV_HEADS} heads, D={HEAD_DIM}, bf16, causal; calibration "
                       f"prompt seed + {HELD_OUT} with the evaluation seed's heads (heads_seed)",
              "xattention": {"stride": XATTN_STRIDE, "block_size": XATTN_BLOCK, "candidates": list(DEFAULT_CANDIDATES)},
              "minference": {"block_size": MINF_BLOCK, "last_q": 64, "budget": BUDGET, "candidate_set": args.candidates,
                             "candidates": [c.as_list() for c in CANDIDATES]},
              "targets": targets, "gate": gate, "records": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    md = table(rows, gate["passed"])
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    if not gate["passed"]:
        print("correctness gate FAILED: no speedups printed")
    return 0 if gate["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
