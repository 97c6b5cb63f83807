"""End-to-end method suite: every registered method (built-in or yours) against cuDNN dense.

For each length, on the LLM-like synthetic input (``inputs.llm_like_qkv``): the dense baseline
(cuDNN SDPA), then per method the selection time, the attention time over that selection, the
end-to-end time of ``sparse_attention`` (selection + index building + attention), the density and
the output's relative error against dense. Any method in ``sparseattn.METHODS`` can be named.

The input's seed is the length unless ``seeds`` is given: a method's density, and so its speed,
depends on the seed (the generator draws each KV head's strengths at random; NOTES.md, runs 17c
and 18b), so ``seeds`` runs every length on several inputs and the table adds the spread.
"""

from __future__ import annotations

import logging

import torch

from ..api import attend, resolve_config, sparse_attention
from ..methods import get_method
from .inputs import llm_like_qkv
from .peers import DENSE_PEERS
from .timing import machine_record, time_ms

logger = logging.getLogger("sparseattn.bench")

DEFAULT_METHODS = ["xattention", "flexprefill", "minference", "streaming"]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_method_suite(methods=DEFAULT_METHODS, lengths=(32768, 131072), *, q_heads=32, kv_heads=8, head_dim=128,
                     overrides: dict | None = None, progress=None, seeds=None) -> dict:
    """Time each method end to end; ``overrides`` maps a method name to config overrides.

    ``seeds``: seeds of the LLM-like input, each run at every length; ``None`` in the list (or
    ``seeds=None``) means the length itself, the suite's historical single input.
    """
    overrides = overrides or {}
    result = {"suite": "methods", "machine": machine_record(), "input": "llm_like_qkv (seeded, defaults)",
              "shape": dict(batch=1, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype="bfloat16",
                            causal=True),
              "configs": {}, "records": []}
    if seeds is not None:
        result["seeds"] = ["L" if s is None else int(s) for s in seeds]
    cases = [(L, L if s is None else int(s)) for L in lengths for s in (seeds if seeds is not None else [None])]
    for L, seed in cases:
        if progress:
            progress(f"L={L} seed={seed}")
        q, k, v = llm_like_qkv(1, q_heads, kv_heads, L, head_dim, seed=seed)
        dense_fn = DENSE_PEERS[0].make(q, k, v, True)
        dense_out = dense_fn()
        dense_t = time_ms(dense_fn)
        t_dense = dense_t["ms"]
        result["records"].append(dict(L=L, seed=seed, method="dense_cudnn", e2e_ms=t_dense, density=1.0, rel_err=0.0,
                                      peak_mib=dense_t["peak_mib"]))
        for name in methods:
            spec = get_method(name)
            cfg = resolve_config(name, None, **overrides.get(name, {}))
            result["configs"][name] = repr(cfg)
            index = spec.select(q, k, cfg, causal=True)
            density = 1.0 if index is None else float(index.density().mean().item())
            out = attend(q, k, v, index)
            err = _rel(out, dense_out)
            out = None  # release device memory before the next case
            t_sel = time_ms(lambda: spec.select(q, k, cfg, causal=True))["ms"]
            t_att = time_ms(lambda: attend(q, k, v, index))["ms"]
            e2e = time_ms(lambda: sparse_attention(q, k, v, method=name, config=cfg))
            t_e2e = e2e["ms"]
            rec = dict(L=L, seed=seed, method=name, select_ms=t_sel, attend_ms=t_att, e2e_ms=t_e2e, density=density,
                       rel_err=err, speedup=t_dense / t_e2e, select_pct_of_dense=100 * t_sel / t_dense,
                       peak_mib=e2e["peak_mib"])
            result["records"].append(rec)
            logger.info("%s", rec)
            if progress:
                progress(f"  {name}: e2e {t_e2e:.2f} ms ({t_dense / t_e2e:.2f}x), density {100 * density:.1f}%")
            index = None  # release device memory before the next case
            torch.cuda.empty_cache()
        q = k = v = dense_out = None  # release device memory before the next case
        torch.cuda.empty_cache()
    return result


def method_table(result: dict) -> str:
    """The Markdown table; with several seeds a seed column and a per-(length, method) spread table."""
    multi = "seeds" in result
    seed_head, seed_rule = ("seed | ", "---|") if multi else ("", "")
    lines = [f"Device: {result['machine'].get('device')}; input {result['input']}; shape {result['shape']}; median ms.",
             "Peak memory: what one end-to-end call allocates on top of q, k, v (output included).",
             "", f"| L | {seed_head}method | density | select | attend | end to end | speedup vs cuDNN | "
             "select % of dense | rel. error | peak MiB |",
             f"|---|{seed_rule}---|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        L = f"{r['L'] // 1024}K" + (f" | {r.get('seed', r['L'])}" if multi else "")
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        if r["method"] == "dense_cudnn":
            lines.append(f"| {L} | cuDNN dense | 100% | - | - | {r['e2e_ms']:.2f} | 1.00x | - | 0 | {peak} |")
            continue
        lines.append(f"| {L} | {r['method']} | {100 * r['density']:.1f}% | {r['select_ms']:.2f} | {r['attend_ms']:.2f} | "
                     f"{r['e2e_ms']:.2f} | {r['speedup']:.2f}x | {r['select_pct_of_dense']:.1f}% | {r['rel_err']:.2e} | "
                     f"{peak} |")
    if multi:
        lines += ["", "Across seeds (speedup against the same seed's cuDNN time):", "",
                  "| L | method | seeds | density min / mean / max | speedup min / mean / max |", "|---|---|---|---|---|"]
        groups: dict = {}
        for r in result["records"]:
            if r["method"] != "dense_cudnn":
                groups.setdefault((r["L"], r["method"]), []).append(r)
        for (L, method), rs in groups.items():
            d = [100 * r["density"] for r in rs]
            x = [r["speedup"] for r in rs]
            lines.append(f"| {L // 1024}K | {method} | {len(rs)} | {min(d):.1f}% / {sum(d) / len(d):.1f}% / "
                         f"{max(d):.1f}% | {min(x):.2f}x / {sum(x) / len(x):.2f}x / {max(x):.2f}x |")
    return "\n".join(lines)
