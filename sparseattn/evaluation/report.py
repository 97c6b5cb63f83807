"""Reports of ``sparseattn eval``: JSON, CSV, Markdown and PNG, all generated from the result rows.

``summarize(rows)`` averages the rows per (method, task, length); a method's accuracy is the mean
over tasks (and lengths) of those cell means, and its ratio to dense compares the same cells.
``write_reports`` writes ``results.json`` (meta + summary + rows), ``results.csv`` (one line per
row), ``results.md`` (tables) and ``accuracy.png`` (accuracy vs length, one line per method; one
panel for the mean over tasks and one per task).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["accuracy_plot", "markdown", "summarize", "write_reports"]

CSV_FIELDS = ("kind", "task", "length", "sample", "method", "prompt_tokens", "score", "density", "density_all",
              "sparse_calls", "dense_calls", "prefill_s", "decode_s", "new_tokens", "ppl", "ppl_second_half",
              "answers", "prediction")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _methods(rows) -> list[str]:
    names = list(dict.fromkeys(r["method"] for r in rows))
    return (["dense"] if "dense" in names else []) + [n for n in names if n != "dense"]


def _fmt_len(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Per-cell, per-length and per-method means of the task rows, and the perplexity rows.

    Returns:
        ``{"cells": {method: {task: {length: {...}}}}, "methods": {method: {...}}, "perplexity": [...]}``;
        a method's ``accuracy`` is the mean over its (task, length) cells and ``vs_dense`` the
        ratio of that mean to dense's over the same cells (None if dense scores 0 there).
    """
    tasks = [r for r in rows if r["kind"] == "task"]
    grouped: dict = defaultdict(list)
    for r in tasks:
        grouped[(r["method"], r["task"], r["length"])].append(r)
    cells: dict = defaultdict(lambda: defaultdict(dict))
    for (method, task, length), group in grouped.items():
        cells[method][task][length] = {
            "score": _mean(r["score"] for r in group), "n": len(group),
            "density": _mean(r["density"] for r in group), "density_all": _mean(r["density_all"] for r in group),
            "prefill_s": _mean(r["prefill_s"] for r in group)}
    dense = cells.get("dense", {})
    methods = {}
    for method in _methods(tasks):
        mine = [(t, L, c) for t, by_len in cells[method].items() for L, c in by_len.items()]
        shared = [(t, L) for t, L, _ in mine if L in dense.get(t, {})]
        acc = _mean(c["score"] for _, _, c in mine)
        mine_shared = _mean(cells[method][t][L]["score"] for t, L in shared)
        dense_shared = _mean(dense[t][L]["score"] for t, L in shared)
        lengths = sorted({L for _, L, _ in mine})
        methods[method] = {
            "accuracy": acc,
            "vs_dense": mine_shared / dense_shared if dense_shared else None,
            "by_length": {L: _mean(c["score"] for _, L2, c in mine if L2 == L) for L in lengths},
            "density": _mean(r["density"] for r in tasks if r["method"] == method),
            "density_all": _mean(r["density_all"] for r in tasks if r["method"] == method),
            "prefill_s": {L: _mean(r["prefill_s"] for r in tasks if r["method"] == method and r["length"] == L)
                          for L in lengths},
        }
    ppl = [{k: r.get(k) for k in ("method", "length", "ppl", "ppl_second_half", "density", "density_all")}
           for r in rows if r["kind"] == "ppl"]
    return {"cells": {m: {t: dict(v) for t, v in by_task.items()} for m, by_task in cells.items()},
            "methods": methods, "perplexity": ppl}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _settings(rows, method) -> str:
    for r in rows:
        if r["method"] == method:
            options = r["settings"].get("options") or {}
            return " ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
    return ""


def markdown(rows: list[dict], summary: dict, meta: dict) -> str:
    """The Markdown report: a summary per method, accuracy per task and length, perplexity."""
    methods = summary["methods"]
    tasks = [r for r in rows if r["kind"] == "task"]
    lengths = sorted({r["length"] for r in tasks})
    counts = sorted({c["n"] for by_task in summary["cells"].values() for by_len in by_task.values()
                     for c in by_len.values()})
    samples = "-".join(str(n) for n in (counts[:1] + counts[-1:] if len(counts) > 1 else counts)) or "0"
    settings = next((r["settings"] for r in rows if r["method"] != "dense"), rows[0]["settings"] if rows else {})
    lines = [f"# sparseattn eval: {meta.get('model', settings.get('model', '?'))}", "",
             f"Device {meta.get('device', '?')}, {meta.get('dtype', '?')}, torch {meta.get('torch', '?')}, "
             f"transformers {meta.get('transformers', '?')}. Dense: the model's own attention "
             f"({meta.get('dense', 'sdpa')}). Sparse: `sparseattn.patch(model, method, "
             f"min_sparse_len={settings.get('min_sparse_len')})`. Greedy decoding; {samples} sample(s) per task and "
             f"length, haystack {settings.get('haystack')}, seed {settings.get('seed')}. Density: mean fraction of the "
             "causal attention computed by the sparse prefill calls (`density (all)` counts calls that ran dense "
             "as 1).", ""]
    if methods:
        head = ["method", "settings", "density", "density (all)"] + [f"acc {_fmt_len(L)}" for L in lengths] + \
            ["mean acc", "vs dense"] + [f"prefill s {_fmt_len(L)}" for L in lengths]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, m in methods.items():
            cells = [method, _settings(rows, method) if method != "dense" else meta.get("dense", "sdpa"),
                     _pct(m["density"]), _pct(m["density_all"])]
            cells += [_pct(m["by_length"].get(L)) for L in lengths]
            cells += [_pct(m["accuracy"]), "-" if m["vs_dense"] is None else f"{100 * m['vs_dense']:.1f}%"]
            cells += ["-" if m["prefill_s"].get(L) is None else f"{m['prefill_s'][L]:.2f}" for L in lengths]
            lines.append("| " + " | ".join(cells) + " |")
        for L in lengths:
            task_names = list(dict.fromkeys(r["task"] for r in tasks if r["length"] == L))
            lines += ["", f"Accuracy per task at {_fmt_len(L)} tokens (density in parentheses):", "",
                      "| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
            for task in task_names:
                cells = []
                for method in methods:
                    c = summary["cells"].get(method, {}).get(task, {}).get(L)
                    cells.append("-" if c is None else _pct(c["score"]) + ("" if method == "dense" else
                                                                          f" ({_pct(c['density'])})"))
                lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if summary["perplexity"]:
        lines += ["", "Perplexity of real text (one prefill over the whole text):", "",
                  "| method | length | ppl | ppl, second half | density |", "|---|---|---|---|---|"]
        for p in sorted(summary["perplexity"], key=lambda p: (p["length"], _methods(rows).index(p["method"]))):
            lines.append(f"| {p['method']} | {_fmt_len(p['length'])} | {p['ppl']:.3f} | {p['ppl_second_half']:.3f} | "
                         f"{_pct(p['density'])} |")
    return "\n".join(lines) + "\n"


def accuracy_plot(rows: list[dict], summary: dict, path: Path, title: str = "") -> Path | None:
    """Accuracy vs length per method: the mean over tasks, then one panel per task (bars when there is one
    length). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cells = summary["cells"]
    methods = list(summary["methods"])
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["kind"] == "task"))
    if not methods:
        return None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"

    def label(i, method):
        density = summary["methods"][method]["density"]
        return method if method == "dense" else f"{method} ({_pct(density)})"

    lengths = sorted({r["length"] for r in rows if r["kind"] == "task"})
    if len(lengths) == 1:  # one length: grouped bars, one group per task and the mean
        fig, ax = plt.subplots(figsize=(max(8, 1.2 * (len(tasks) + 1)), 4.5))
        groups = ["mean"] + tasks
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            values = [summary["methods"][method]["accuracy"] or 0] + [
                (cells.get(method, {}).get(t, {}).get(lengths[0]) or {}).get("score") or 0 for t in tasks]
            ax.bar([g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))],
                   [100 * v for v in values], width, color=colors[i % len(colors)], label=label(i, method))
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=30, ha="right")
        ax.set_ylabel(f"accuracy at {_fmt_len(lengths[0])} tokens (%)")
        ax.set_ylim(0, 120)
        ax.set_yticks(range(0, 101, 20))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(methods), loc="upper center")
    else:
        cols = 4
        nrows = math.ceil((len(tasks) + 1) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
        panels = [("mean over tasks", None)] + [(t, t) for t in tasks]
        for ax, (name, task) in zip(axes.flat, panels):
            for i, method in enumerate(methods):
                if task is None:
                    points = sorted(summary["methods"][method]["by_length"].items())
                else:
                    points = sorted((L, c["score"]) for L, c in cells.get(method, {}).get(task, {}).items())
                if points:
                    shift = 1 + 0.025 * (i - (len(methods) - 1) / 2)  # overlapping lines stay visible
                    ax.plot([p[0] * shift for p in points], [100 * p[1] for p in points], "-",
                            marker=markers[i % len(markers)], color=colors[i % len(colors)], alpha=0.85,
                            linewidth=2.5 if method == "dense" else 1.5, label=label(i, method))
            ax.set_title(name, fontsize=10)
            ax.set_xscale("log", base=2)
            ax.set_xlim(lengths[0] / 1.25, lengths[-1] * 1.25)
            ax.set_xticks(lengths)
            ax.set_xticklabels([_fmt_len(L) for L in lengths])
            ax.minorticks_off()
            ax.set_ylim(-5, 105)
            ax.grid(True, alpha=0.3)
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel("accuracy (%)")
        axes.flat[0].legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_reports(rows: list[dict], out_dir, meta: dict) -> list[Path]:
    """``results.json``, ``results.csv``, ``results.md`` and ``accuracy.png`` (if matplotlib) in ``out_dir``."""
    out_dir = Path(out_dir)
    summary = summarize(rows)
    written = [out_dir / "results.json", out_dir / "results.csv", out_dir / "results.md"]
    written[0].write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    with open(written[1], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "answers": "|".join(r.get("answers") or [])})
    written[2].write_text(markdown(rows, summary, meta))
    png = accuracy_plot(rows, summary, out_dir / "accuracy.png",
                        f"{meta.get('model', '')} on {meta.get('device', '?')}: accuracy per task and length "
                        "(legend: mean density of the sparse calls)")
    return written + ([png] if png else [])
