"""MInference on the GPU: estimation, index building and end-to-end time against cuDNN dense
(BENCHMARKS.md: estimation + index building <= 2% of cuDNN dense at 128K; end to end >= 6x at 128K).

For each length (default 8K..128K; B=1, GQA 32/8, D=128, bf16, causal) on the LLM-like input
``sparseattn.bench.inputs.llm_like_qkv`` (seed = L, as ``sparseattn bench methods``), and for each
MInference config of ``CONFIGS`` (``--configs``):

- ``dense_ms``: cuDNN SDPA, causal, warmed (the fastest dense baseline here);
- ``estimate_ms``: ``last_query_scores_fast`` (the two Triton estimation kernels);
- ``select_ms``: ``minference_select_fast`` = estimation + top-k + index building, its share of
  dense (the 2% goal), and its peak extra memory;
- ``reference_ms``: the fp32 reference selector, up to ``--reference-max-len`` (it is slow);
- ``attention_ms``: ``vertical_slash_attention`` over the index;
- ``e2e_ms``: select + attention, and ``speedup`` = dense / e2e;
- ``density``: token-level fraction of the causal (query, key) pairs computed;
- ``recall``: exact attention mass the index keeps, on ``--recall-blocks`` sampled query blocks
  (the last block and evenly spaced ones), mean over heads and rows;
- ``rel_err``: ``||out - dense|| / ||dense||`` over the whole output.

A correctness gate runs first (4133 tokens, 8/2 heads): the fast estimation against the fp32
reference, the fast index against the reference index (fraction of identical (head, query block)
rows), and the kernel output over the fast index against fp32 attention over the reference's
element mask. If it fails the JSON is still written but no percentages or speedups are printed.
The gate also records whether ``minference_select_fast`` can be captured in a CUDA graph (no host
synchronization). ``--sweep-kernel`` times the vertical-slash kernel's tile configs at the longest
length on each config's index (to pick its defaults; tiles are capped at the index's block size).

    python benchmarks/bench_minference.py --out /tmp/out/minference.json
    python benchmarks/bench_minference.py --lengths 131072 --configs default,v512_s512 --sweep-kernel
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

from sparseattn.bench.inputs import llm_like_qkv
from sparseattn.bench.peers import DENSE_PEERS
from sparseattn.bench.timing import causal_dense_flops, device_slug, machine_record, time_ms, write_json
from sparseattn.index import VerticalSlashIndex
from sparseattn.kernels.block_sparse import KernelConfig
from sparseattn.kernels.minference_index import last_query_scores_fast, minference_select_fast
from sparseattn.kernels.vertical_slash import vertical_slash_attention, vertical_slash_forward
from sparseattn.reference.minference import last_query_scores, minference_select

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
# name -> minference_select_fast options. "default" is the seed's (1000 verticals, 6096 slashes).
CONFIGS = {
    "default": dict(vertical_size=1000, slash_size=6096, block_size=64),
    "v1000_s2048": dict(vertical_size=1000, slash_size=2048, block_size=64),
    "v512_s512": dict(vertical_size=512, slash_size=512, block_size=64),
    "adaptive_0.01": dict(adaptive_budget=0.01, block_size=64),
    "v512_s512_bs128": dict(vertical_size=512, slash_size=512, block_size=128),
}
INDEX_FIELDS = ("range_starts", "range_counts", "columns", "column_counts")


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def sampled_recall(q, k, index: VerticalSlashIndex, num_blocks: int) -> float:
    """Exact attention mass inside ``index`` for ``num_blocks`` query blocks (fp32, one block and KV group at a time)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G, bs = Hq // Hkv, index.block_q
    nq = index.range_counts.shape[-1]
    blocks = sorted({nq - 1} | {int(x) for x in torch.linspace(0, nq - 1, num_blocks).round().tolist()})
    kpos = torch.arange(L, device=q.device)
    total, rows_seen = 0.0, 0
    for qb in blocks:
        r0, r1 = qb * bs, min(L, (qb + 1) * bs)
        sub = VerticalSlashIndex(*(getattr(index, n)[:, :, qb:qb + 1] for n in INDEX_FIELDS), bs, index.block_k,
                                 r1 - r0, r1)
        mask = sub.to_element_mask()  # [B, Hq, rows, r1]: keys past r1 are never allowed
        for g in range(Hkv):
            heads = slice(g * G, (g + 1) * G)
            s = q[:, heads, r0:r1].float() @ k[:, g:g + 1, :r1].float().transpose(-1, -2) / math.sqrt(D)
            s = s.masked_fill(kpos[None, :r1] > torch.arange(r0, r1, device=q.device)[:, None], float("-inf"))
            p = torch.softmax(s, dim=-1)
            total += (p * mask[:, heads]).sum().item()
        rows_seen += B * Hq * (r1 - r0)
    return total / rows_seen


def correctness_gate() -> dict:
    """Small case: estimation, index agreement and output against the fp32 reference; CUDA-graph capture."""
    L, out = 4096 + 37, {}
    q, k, v = llm_like_qkv(1, 8, 2, L, HEAD_DIM, device="cuda", seed=1)
    vertical, slash, _ = last_query_scores_fast(q, k, 64)
    ref_v, ref_s, _ = last_query_scores(q, k, 64)
    out["vertical_rel_err"] = _rel(vertical, ref_v)
    out["slash_rel_err"] = _rel(slash, ref_s)
    ok = out["vertical_rel_err"] < 1e-4 and out["slash_rel_err"] < 1e-4
    for name, cfg in (("default", dict(vertical_size=1000, slash_size=2048, block_size=64)),
                      ("bs128", dict(vertical_size=300, slash_size=500, block_size=128))):
        fast = minference_select_fast(q, k, **cfg)
        ref = minference_select(q, k, **cfg)
        same = torch.ones(fast.range_counts.shape, dtype=torch.bool, device=q.device)
        for field in INDEX_FIELDS:
            a, b = getattr(fast, field), getattr(ref, field)
            same &= (a == b).view(*same.shape, -1).all(-1) if a.dim() == 4 else a == b
        o = vertical_slash_attention(q, k, v, fast)
        want = _masked_reference(q, k, v, ref)
        r = {"rows_identical": same.float().mean().item(), "out_rel_err": _rel(o, want),
             "density_fast": fast.density().mean().item(), "density_ref": ref.density().mean().item()}
        out[name] = r
        ok &= r["rows_identical"] >= 0.99 and r["out_rel_err"] < 2e-2
    out["cuda_graph"] = _graph_check(q, k)
    out["passed"] = bool(ok)
    return out


def _masked_reference(q, k, v, index: VerticalSlashIndex):
    """fp32 attention over the index's element mask, one KV group at a time."""
    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    mask = index.to_element_mask()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for g in range(Hkv):
        heads = slice(g * G, (g + 1) * G)
        out[:, heads] = torch.nn.functional.scaled_dot_product_attention(
            q[:, heads].float(), k[:, g:g + 1].float().expand(-1, G, -1, -1),
            v[:, g:g + 1].float().expand(-1, G, -1, -1), attn_mask=mask[:, heads])
    return out


def _graph_check(q, k) -> dict:
    """Capture ``minference_select_fast`` in a CUDA graph: impossible if it synchronized with the host."""
    kwargs = dict(vertical_size=500, slash_size=1000, block_size=64)
    try:
        eager = minference_select_fast(q, k, **kwargs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            minference_select_fast(q, k, **kwargs)  # warm-up (Triton compilation) off the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = minference_select_fast(q, k, **kwargs)
        graph.replay()
        torch.cuda.synchronize()
        equal = all(torch.equal(getattr(eager, f), getattr(captured, f)) for f in INDEX_FIELDS)
        return {"capturable": True, "replay_equals_eager": equal}
    except Exception as err:  # noqa: BLE001 - a failed capture is a result to record
        return {"capturable": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}


def bench_length(L, configs, *, seed, reference_max_len, recall_blocks) -> dict:
    q, k, v = llm_like_qkv(1, HEADS, KV_HEADS, L, HEAD_DIM, device="cuda", seed=seed)
    row = {"L": L, "B": 1, "Hq": HEADS, "Hkv": KV_HEADS, "D": HEAD_DIM, "dtype": "bfloat16", "seed": seed}
    dense = DENSE_PEERS[0].make(q, k, v, True)
    row["dense_peer"] = DENSE_PEERS[0].name
    dense_out = dense() if dense is not None else None
    row["dense_ms"] = time_ms(dense)["ms"] if dense is not None else None
    row["dense_flops"] = causal_dense_flops(1, HEADS, L, L, HEAD_DIM)
    row["estimate_ms"] = time_ms(lambda: last_query_scores_fast(q, k, 64))["ms"]
    for name in configs:
        opts = CONFIGS[name]
        r = {"options": opts}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        index = minference_select_fast(q, k, **opts)
        torch.cuda.synchronize()
        r["select_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        r["index_gib"] = sum(getattr(index, f).numel() * 4 for f in INDEX_FIELDS) / 2**30
        r["select_ms"] = time_ms(lambda: minference_select_fast(q, k, **opts))["ms"]
        r["density"] = index.density().mean().item()
        r["max_ranges"] = int(index.range_counts.max().item())
        r["mean_ranges"] = index.range_counts.float().mean().item()
        r["mean_columns"] = index.column_counts.float().mean().item()
        if L <= reference_max_len:
            r["reference_ms"] = time_ms(lambda: minference_select(q, k, **opts), min_runs=3, max_runs=3,
                                        warmup=1)["ms"]
        out = vertical_slash_attention(q, k, v, index)
        if dense_out is not None:
            r["rel_err"] = _rel(out, dense_out)
        out = None  # release device memory before the next case
        r["recall"] = sampled_recall(q, k, index, recall_blocks)
        r["attention_ms"] = time_ms(lambda: vertical_slash_attention(q, k, v, index))["ms"]

        def e2e():
            return vertical_slash_attention(q, k, v, minference_select_fast(q, k, **opts))

        r["e2e_ms"] = time_ms(e2e)["ms"]
        index = None  # release device memory before the next case
        torch.cuda.empty_cache()
        row[name] = r
    q = k = v = dense = dense_out = None  # release device memory before the next case
    torch.cuda.empty_cache()
    return row


def sweep_kernel(L, config_name, seed) -> list[dict]:
    """Time the vertical-slash kernel's tile configs on one index (to pick its default)."""
    q, k, v = llm_like_qkv(1, HEADS, KV_HEADS, L, HEAD_DIM, device="cuda", seed=seed)
    index = minference_select_fast(q, k, **CONFIGS[config_name])
    rows = []
    for bm, bn, warps, stages in [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 64, 4, 5), (64, 64, 8, 3),
                                  (64, 32, 4, 3), (64, 32, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                                  (128, 64, 4, 3)]:
        cfg = KernelConfig(bm, bn, num_warps=warps, num_stages=stages)
        entry = {"config": {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages},
                 "index": config_name, "L": L}
        try:
            entry["ms"] = time_ms(lambda: vertical_slash_forward(q, k, v, index, config=cfg), max_runs=10)["ms"]
        except Exception as err:  # noqa: BLE001 - a config that does not compile is a result
            entry["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(entry)
    return rows


def print_table(rows, configs, gate_ok):
    def fmt(x, spec=".2f"):
        return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"

    print()
    print("MInference, B=1 GQA 32/8 D=128 bf16 causal, LLM-like input (ms, median)")
    print(f"{'L':>7} {'config':>16} {'dense':>8} {'estim':>7} {'select':>8} {'%dense':>7} {'ref sel':>8} "
          f"{'attn':>8} {'e2e':>8} {'speedup':>8} {'density':>8} {'recall':>7} {'rel err':>8}")
    for row in rows:
        dense = row["dense_ms"]
        for name in configs:
            r = row[name]
            pct = 100 * r["select_ms"] / dense if (dense and gate_ok) else None
            speed = dense / r["e2e_ms"] if (dense and gate_ok) else None
            print(f"{row['L']:>7} {name:>16} {fmt(dense):>8} {fmt(row['estimate_ms']):>7} {fmt(r['select_ms']):>8} "
                  f"{fmt(pct):>7} {fmt(r.get('reference_ms')):>8} {fmt(r['attention_ms']):>8} {fmt(r['e2e_ms']):>8} "
                  f"{fmt(speed):>8} {fmt(100 * r['density'], '.1f'):>7}% {fmt(r['recall'], '.3f'):>7} "
                  f"{fmt(r.get('rel_err'), '.1e'):>8}")
    if not gate_ok:
        print("CORRECTNESS GATE FAILED: no percentages or speedups printed (see the JSON).")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"names from {sorted(CONFIGS)}")
    parser.add_argument("--seed", type=int, default=None, help="input seed (default: L, as `sparseattn bench methods`)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/minference.json)")
    parser.add_argument("--reference-max-len", type=int, default=32768,
                        help="time the fp32 reference selector up to this length (293 ms at 128K)")
    parser.add_argument("--recall-blocks", type=int, default=16, help="query blocks sampled for the recall")
    parser.add_argument("--sweep-kernel", action="store_true", help="time vertical-slash kernel tiles at the "
                        "longest length, on each config's index")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        print("bench_minference needs a CUDA GPU", file=sys.stderr)
        return 2
    lengths = [int(x) for x in args.lengths.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {sorted(CONFIGS)}")
    out = args.out or os.path.join("benchmarks", "results", device_slug(torch.cuda.get_device_name()),
                                   "minference.json")
    start = time.time()
    gate = correctness_gate()
    print(f"correctness gate: {'PASS' if gate['passed'] else 'FAIL'} {json.dumps(gate)}", flush=True)
    rows = []
    for L in lengths:
        rows.append(bench_length(L, configs, seed=L if args.seed is None else args.seed,
                                 reference_max_len=args.reference_max_len, recall_blocks=args.recall_blocks))
        print(f"L={L} done ({time.time() - start:.0f} s)", flush=True)
    sweep = []
    if args.sweep_kernel:
        for name in configs:
            sweep += sweep_kernel(max(lengths), name, max(lengths) if args.seed is None else args.seed)
    for s in sweep:
        print("sweep", json.dumps(s))
    record = {"machine": machine_record(), "input": "llm_like_qkv defaults, seed L unless --seed", "gate": gate,
              "configs": {c: CONFIGS[c] for c in configs}, "rows": rows, "kernel_sweep": sweep,
              "seconds": time.time() - start,
              "note": "select = minference_select_fast (Triton estimation + top-k + index building); e2e = select + "
                      "vertical_slash_attention; density = token-level computed pairs / causal pairs; recall = "
                      "exact attention mass kept on sampled query blocks"}
    write_json(out, record)
    print_table(rows, configs, gate["passed"])
    print(f"wrote {out} ({time.time() - start:.0f} s)")
    return 0 if gate["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
