"""Markdown tables and PNG plots generated from a benchmark's JSON."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def _fmt_len(L: int) -> str:
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def _mib(record) -> str:
    return f"{record['peak_mib']:.0f}" if record and record.get("peak_mib") is not None else "-"


def kernel_table(result: dict) -> str:
    """Dense and sparse tables: time (ms) per implementation and length, with the goal ratios."""
    recs = result["records"]
    lines = [f"Device: {result['machine'].get('device')}, torch {result['machine'].get('torch')}, "
             f"triton {result['machine'].get('triton')}; shape {result['shape']}; median ms.", ""]
    dense = defaultdict(dict)
    for r in recs:
        if r["case"] == "dense":
            dense[r["L"]][r["impl"]] = r
    impls = [i for i in ["cudnn_sdpa", "fa2_sdpa", "flex_dense", "flash_attn", "ours_dense"]
             if any(i in row for row in dense.values())]
    lines.append("| L | " + " | ".join(impls) + " | ours TFLOP/s | ours / cuDNN throughput | ours / cuDNN peak MiB |")
    lines.append("|---|" + "---|" * (len(impls) + 3))
    for L in sorted(dense):
        row = dense[L]
        cells = [f"{row[i]['ms']:.2f}" if i in row else "-" for i in impls]
        ours = row.get("ours_dense")
        cud = row.get("cudnn_sdpa")
        ratio = f"{cud['ms'] / ours['ms']:.2f}" if ours and cud else "-"
        tf = f"{ours['eff_tflops']:.0f}" if ours else "-"
        lines.append(f"| {_fmt_len(L)} | " + " | ".join(cells) + f" | {tf} | {ratio} | {_mib(ours)} / {_mib(cud)} |")
    sparse = defaultdict(dict)
    for r in recs:
        if r["case"] == "sparse":
            sparse[(r["L"], r["target_density"])][r["impl"]] = r
    if sparse:
        lines += ["", "| L | density | ours (ms) | Flex same blocks (ms) | ours vs Flex | ours / (d x cuDNN dense) | "
                  "ours effective / actual TFLOP/s | ours / Flex peak MiB |", "|---|---|---|---|---|---|---|---|"]
        for (L, d) in sorted(sparse):
            row = sparse[(L, d)]
            ours, flex = row.get("ours_sparse"), row.get("flex_sparse")
            cud = dense[L].get("cudnn_sdpa")
            dd = ours["density"] if ours else d
            vs_flex = f"{flex['ms'] / ours['ms']:.2f}x" if ours and flex else "-"
            goal = f"{ours['ms'] / (dd * cud['ms']):.2f}" if ours and cud else "-"
            tflops = f"{ours['eff_tflops']:.0f} / {ours['act_tflops']:.0f}" if ours and "act_tflops" in ours else "-"
            lines.append(f"| {_fmt_len(L)} | {100 * dd:.1f}% | {ours['ms']:.2f} | "
                         f"{flex['ms'] if flex else float('nan'):.2f} | {vs_flex} | {goal} | {tflops} | "
                         f"{_mib(ours)} / {_mib(flex)} |")
    bwd = defaultdict(dict)
    for r in recs:
        if r["case"] == "backward":
            bwd[r["L"]][r["impl"]] = r
    if bwd:
        lines += ["", "| L | backward | ms | TFLOP/s | peak MiB |", "|---|---|---|---|---|"]
        for L in sorted(bwd):
            for impl, r in bwd[L].items():
                lines.append(f"| {_fmt_len(L)} | {impl} | {r['ms']:.2f} | {r['eff_tflops']:.0f} | {_mib(r)} |")
    return "\n".join(lines)


def kernel_plot(result: dict, path: Path) -> Path | None:
    """Two panels, time vs length (log-log): dense implementations; sparse at each density (ours solid, Flex dashed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dense, sparse = defaultdict(list), defaultdict(list)
    for r in result["records"]:
        if r["case"] == "dense":
            dense[r["impl"]].append((r["L"], r["ms"]))
        elif r["case"] == "sparse":
            sparse[(r["target_density"], r["impl"])].append((r["L"], r["ms"]))
    fig, (ax_d, ax_s) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (impl, pts) in enumerate(sorted(dense.items())):
        pts.sort()
        ax_d.plot([p[0] for p in pts], [p[1] for p in pts], "-" if impl.startswith("ours") else "--",
                  marker="o", color=colors[i % len(colors)], label=impl, linewidth=2.5 if impl.startswith("ours") else 1.5)
    cud = sorted(dense.get("cudnn_sdpa", []))
    densities = sorted({d for d, _ in sparse})
    for i, d in enumerate(densities):
        for impl, style in (("ours_sparse", "-"), ("flex_sparse", "--")):
            pts = sorted(sparse.get((d, impl), []))
            if pts:
                ax_s.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=colors[i % len(colors)],
                          label=f"{'ours' if impl.startswith('ours') else 'Flex'} @{100 * d:.0f}%")
    if cud:
        ax_s.plot([p[0] for p in cud], [p[1] for p in cud], ":", color="black", label="cuDNN dense")
    for ax, title in ((ax_d, "dense causal"), (ax_s, "block-sparse, same BlockIndex (random blocks)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    ax_d.set_ylabel("forward time (ms, median)")
    m, sh = result["machine"], result["shape"]
    fig.suptitle(f"{m.get('device')}, GQA {sh['q_heads']}/{sh['kv_heads']}, D={sh['head_dim']}, "
                 f"{sh.get('dtype', 'bf16')}, torch {m.get('torch')}, triton {m.get('triton')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(json_path: str | Path) -> tuple[Path, Path | None]:
    json_path = Path(json_path)
    result = json.loads(json_path.read_text())
    md = json_path.with_suffix(".md")
    md.write_text(kernel_table(result) + "\n")
    png = kernel_plot(result, json_path.with_suffix(".png"))
    return md, png
