"""Attention-level fidelity of each method on a model's real q/k/v, per layer and head.

For a layer's captured post-RoPE ``q, k, v`` (:func:`sparseattn.bench.capture.capture_qkv` on real
text) and a method's selection (its ``BlockIndex`` or MInference's ``VerticalSlashIndex``):

- **recall**: the exact causal attention mass that falls on the selected (query, key) pairs,
  averaged over query rows (1 = nothing of weight left out);
- **relative error**: ``||o_sparse - o_dense|| / ||o_dense||`` per head, where ``o_sparse`` is exact
  softmax attention restricted to the selected pairs (what the kernel computes) and ``o_dense``
  full causal attention, both in fp32;
- **density**: the index's fraction of the causal attention computed.

Everything is computed one chunk of query rows at a time (`rows x Lk` scores, never `L x L`), in
fp32, on the tensors' device. Sliding-window layers (Gemma 3's ``layer_types``) are skipped: the
integration never runs them sparse. ``fidelity_heatmaps`` draws layer x head heatmaps.

Example:
    >>> import torch
    >>> from sparseattn.evaluation.fidelity import attention_fidelity
    >>> from sparseattn.methods import get_method
    >>> q, k, v = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    >>> full = attention_fidelity(q, k, v, None)
    >>> bool((full["recall"] == 1).all()), float(full["rel_error"].max())
    (True, 0.0)
    >>> spec = get_method("streaming")
    >>> index = spec.select(q, k, spec.config_cls(sink=16, window=64, block_size=16))
    >>> bool((attention_fidelity(q, k, v, index)["recall"] < 1).all())
    True
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from ..api import resolve_config
from ..index import BlockIndex, VerticalSlashIndex, cdiv
from ..methods import get_method

__all__ = ["attention_fidelity", "fidelity_heatmaps", "fidelity_table", "query_block_key_mask", "run_fidelity",
           "selected_rows"]

_CHUNK_ELEMENTS = 1 << 24


def query_block_key_mask(index, qb0: int, qb1: int) -> torch.Tensor:
    """`[B, H, qb1 - qb0, Lk]` bool: the keys each query block in ``[qb0, qb1)`` selects (no causal cut)."""
    if isinstance(index, BlockIndex):
        blocks = index.to_mask()[:, :, qb0:qb1]  # [B, H, nb, nk]
        cols = torch.arange(index.k_len, device=blocks.device) // index.block_k
        return blocks[..., cols]
    if not isinstance(index, VerticalSlashIndex):
        raise TypeError(f"index must be a BlockIndex or VerticalSlashIndex, got {type(index).__name__}")
    Lk = index.k_len
    starts, counts = index.range_starts[:, :, qb0:qb1].long(), index.range_counts[:, :, qb0:qb1]
    B, H, nb, R = starts.shape
    valid = torch.arange(R, device=starts.device) < counts.unsqueeze(-1)
    # Ranges as +1 at the start and -1 past the end, summed: O(nb x Lk) instead of O(nb x R x Lk).
    edges = torch.zeros(B, H, nb, Lk + 1, dtype=torch.int32, device=starts.device)
    one = valid.to(torch.int32)
    edges.scatter_add_(-1, torch.where(valid, starts, Lk), one)
    edges.scatter_add_(-1, torch.where(valid, torch.clamp(starts + index.block_k, max=Lk), Lk), -one)
    mask = edges.cumsum(-1)[..., :Lk] > 0
    cols, ccounts = index.columns[:, :, qb0:qb1].long(), index.column_counts[:, :, qb0:qb1]
    cvalid = torch.arange(cols.shape[-1], device=cols.device) < ccounts.unsqueeze(-1)
    extra = torch.zeros(B, H, nb, Lk + 1, dtype=torch.bool, device=cols.device)
    extra.scatter_(-1, torch.where(cvalid, cols, Lk), cvalid)
    return mask | extra[..., :Lk]


def selected_rows(index, r0: int, r1: int) -> torch.Tensor:
    """`[B, H, r1 - r0, Lk]` bool: the pairs of query rows ``[r0, r1)`` the index selects (no causal cut)."""
    qb0, qb1 = r0 // index.block_q, cdiv(r1, index.block_q)
    per_block = query_block_key_mask(index, qb0, qb1)
    rows = torch.arange(r0, r1, device=per_block.device) // index.block_q - qb0
    return per_block[:, :, rows]


@torch.no_grad()
def attention_fidelity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index, *, scale: float | None = None,
                       causal: bool = True) -> dict[str, torch.Tensor]:
    """Recall of the exact attention mass and relative output error of ``index`` against dense attention.

    Args:
        q: `[B, Hq, Lq, D]` (the last `Lq` of `Lk` positions).
        k, v: `[B, Hkv, Lk, D]`, `Hq % Hkv == 0`.
        index: a ``BlockIndex``, a ``VerticalSlashIndex``, or None (dense: recall 1, error 0).
        scale: softmax scale (default `1/sqrt(D)`).
        causal: causal attention.

    Returns:
        ``{"recall": [B, Hq], "rel_error": [B, Hq]}`` float32 on the CPU.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kf, vf = k.float(), v.float()
    mass = torch.zeros(B, Hq, dtype=torch.float64, device=q.device)
    err = torch.zeros_like(mass)
    ref = torch.zeros_like(mass)
    kpos = torch.arange(Lk, device=q.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, B * Hq * Lk))
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        rows = r1 - r0
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, G * rows, D)
        scores = (torch.matmul(qc, kf.transpose(-1, -2)) * scale).view(B, Hq, rows, Lk)
        allowed = (kpos[None, :] <= torch.arange(r0, r1, device=q.device)[:, None] + (Lk - Lq)) if causal else None
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        dense = torch.matmul(probs.view(B, Hkv, G * rows, Lk), vf).view(B, Hq, rows, -1)
        if index is None:
            mass += rows
            ref += dense.double().square().sum((-1, -2))
            continue
        chosen = selected_rows(index, r0, r1)
        mass += (probs * chosen).sum((-1, -2), dtype=torch.float64)
        sparse_probs = torch.softmax(scores.masked_fill(~chosen, float("-inf")), dim=-1)
        sparse = torch.matmul(sparse_probs.view(B, Hkv, G * rows, Lk), vf).view(B, Hq, rows, -1)
        err += (sparse - dense).double().square().sum((-1, -2))
        ref += dense.double().square().sum((-1, -2))
    return {"recall": (mass / Lq).float().cpu(), "rel_error": (err.sqrt() / ref.sqrt()).float().cpu()}


def _layer_scaling(model, layer: int) -> float | None:
    for module in model.modules():
        if getattr(module, "layer_idx", None) == layer and hasattr(module, "scaling"):
            return float(module.scaling)
    return None


def dense_only_layers(model) -> list[int]:
    """Layers the integration always runs dense: sliding-window layers (``config.layer_types``)."""
    types = getattr(model.config.get_text_config(), "layer_types", None) or []
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def run_fidelity(model, tokenizer, *, length: int, methods: Mapping[str, Mapping[str, Any]],
                 layers: Iterable[int] | None = None, source: str = "stdlib", progress=None) -> dict[str, Any]:
    """Fidelity of each method on ``model``'s q/k/v of ``length`` tokens of real text.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        length: tokens of text (from :func:`sparseattn.evaluation.haystack.haystack_ids`).
        methods: ``{method: {option: value}}``.
        layers: layer indices (default: every layer that can run sparse).
        source: the text (``"stdlib"`` or a folder).
        progress: called with a line per layer.

    Returns:
        ``{"length", "layers", "skipped_layers", "num_heads", "methods": {name: {"options", "config",
        "recall", "rel_error", "density"}}}`` with `[layers][heads]` nested lists.
    """
    from ..bench.capture import capture_qkv
    from ..demo import config_dict
    from .haystack import haystack_ids, source_name

    num_layers = model.config.get_text_config().num_hidden_layers
    skipped = dense_only_layers(model)
    layers = [i for i in range(num_layers) if i not in skipped] if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range; the model has {num_layers} layers")
    device = next(model.parameters()).device
    ids = torch.tensor([haystack_ids(tokenizer, source, length)[:length]], device=device)
    configs = {name: resolve_config(name, **opts) for name, opts in methods.items()}
    result = {"length": length, "text": source_name(source), "layers": layers,
              "skipped_layers": [i for i in skipped if i not in layers],
              "methods": {name: {"options": dict(methods[name]), "config": config_dict(configs[name]),
                                 "recall": [], "rel_error": [], "density": []} for name in methods}}
    captured = capture_qkv(model, ids, layers=layers)  # one forward; a layer's tensors are dropped once used
    for layer in layers:
        q, k, v = captured.pop(layer)
        scale = _layer_scaling(model, layer)
        result["num_heads"] = q.shape[1]
        for name, cfg in configs.items():
            index = get_method(name).select(q, k, cfg, causal=True)
            fid = attention_fidelity(q, k, v, index, scale=scale)
            density = torch.ones(q.shape[0], q.shape[1]) if index is None else index.density().float().cpu()
            entry = result["methods"][name]
            entry["recall"].append(fid["recall"].mean(0).tolist())
            entry["rel_error"].append(fid["rel_error"].mean(0).tolist())
            entry["density"].append(density.mean(0).tolist())
        if progress:
            progress(f"layer {layer}: " + ", ".join(
                f"{n} recall {sum(e['recall'][-1]) / len(e['recall'][-1]):.3f}" for n, e in result["methods"].items()))
    return result


def _flat(values) -> list[float]:
    return [x for row in values for x in row]


def fidelity_table(result: dict[str, Any]) -> str:
    """One Markdown row per method: recall, relative error and density over every (layer, head)."""
    lines = [f"Fidelity on {result['length']} tokens of {result['text']}, layers {result['layers']}"
             + (f" (sliding-window layers {result['skipped_layers']} skipped: always dense)"
                if result["skipped_layers"] else "") + ".", "",
             "| method | settings | density | recall (mean) | recall (min head) | rel. error (mean) | "
             "rel. error (max head) |", "|---|---|---|---|---|---|---|"]
    for name, entry in result["methods"].items():
        recall, error, density = (_flat(entry[key]) for key in ("recall", "rel_error", "density"))
        settings = " ".join(f"{k}={v}" for k, v in entry["options"].items()) or "defaults"
        lines.append(f"| {name} | {settings} | {100 * sum(density) / len(density):.1f}% | "
                     f"{sum(recall) / len(recall):.4f} | {min(recall):.4f} | {sum(error) / len(error):.2e} | "
                     f"{max(error):.2e} |")
    return "\n".join(lines)


def fidelity_heatmaps(result: dict[str, Any], out_dir, *, title: str = "") -> list:
    """One PNG per method, ``fidelity-<method>.png``: recall, relative error and density, layer x head."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError:
        return []
    from pathlib import Path

    out_dir = Path(out_dir)
    paths = []
    for name, entry in result["methods"].items():
        fig, axes = plt.subplots(1, 3, figsize=(13, 0.22 * len(result["layers"]) + 2.5))
        panels = (("recall", "recall of exact attention mass", dict(vmin=min(0.5, min(_flat(entry["recall"]))), vmax=1,
                                                                      cmap="viridis")),
                  ("rel_error", "relative output error", dict(cmap="magma_r", norm=LogNorm(
                      vmin=max(1e-4, min(_flat(entry["rel_error"])) or 1e-4),
                      vmax=max(1e-3, max(_flat(entry["rel_error"])))))),
                  ("density", "density", dict(vmin=0, vmax=1, cmap="viridis")))
        for ax, (key, label, style) in zip(axes, panels):
            image = ax.imshow(entry[key], aspect="auto", interpolation="nearest", **style)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
            ax.set_yticks(range(len(result["layers"])))
            ax.set_yticklabels(result["layers"], fontsize=6)
            fig.colorbar(image, ax=ax)
        fig.suptitle(f"{title} {name} ({' '.join(f'{k}={v}' for k, v in entry['options'].items()) or 'defaults'}), "
                     f"{result['length']} tokens")
        fig.tight_layout()
        path = out_dir / f"fidelity-{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
