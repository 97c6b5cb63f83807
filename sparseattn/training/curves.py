"""Training curves of a PruLong run as one PNG: LM loss, sparsity against its target, multipliers.

Reads the CSV log that ``sparseattn.training.trainer`` writes (``output_dir/train_log.csv``).

Example:
    >>> from sparseattn.training.curves import plot_training_log  # doctest: +SKIP
    >>> plot_training_log("runs/prulong/train_log.csv", "curves.png")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os

__all__ = ["plot_training_log", "read_training_log"]


def read_training_log(path: str | os.PathLike) -> dict[str, list[float]]:
    """Columns of the CSV log as float lists (empty cells skipped per column; ``step`` kept whole)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no logged steps")
    columns: dict[str, list[float]] = {}
    for name in rows[0]:
        values = [(float(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        columns[name] = values
    return columns


def plot_training_log(log_csv: str | os.PathLike, png: str | os.PathLike, *, title: str | None = None) -> str:
    """Write a three-panel PNG (LM loss; expected and deterministic sparsity with the target;
    ``lambda1`` and ``lambda2``) of a PruLong CSV log; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = read_training_log(log_csv)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    panels = [
        ("LM loss", [("lm_loss", "LM loss")], "log"),
        ("head sparsity", [("sparsity", "expected (gates)"), ("sparsity_det", "deterministic"),
                           ("target_sparsity", "target")], "linear"),
        ("Lagrange multipliers", [("lambda1", "lambda1"), ("lambda2", "lambda2")], "symlog"),
    ]
    for ax, (name, series, scale) in zip(axes, panels):
        for key, label in series:
            points = cols.get(key, [])
            if not points:
                continue
            steps, values = [p[0] for p in points], [p[1] for p in points]
            if key == "lm_loss":  # noisy per step: the raw values faint, a running mean over them
                ax.plot(steps, values, alpha=0.3, label=label)
                w = max(1, len(values) // 20)
                mean = [sum(values[max(0, i - w + 1):i + 1]) / len(values[max(0, i - w + 1):i + 1])
                        for i in range(len(values))]
                ax.plot(steps, mean, label=f"{label}, mean of {w} steps")
            else:
                ax.plot(steps, values, label=label, linestyle="--" if key == "target_sparsity" else "-")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return str(png)
