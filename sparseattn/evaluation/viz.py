"""``sparseattn viz``: the blocks a method selects for one layer and head, next to the exact attention.

The left panel shows, per (query block, key block), the fraction of the block's keys the method
selects (1 for a selected block of a ``BlockIndex``; MInference's token-level ranges and columns
cover parts of blocks). The right panel shows the exact causal attention mass of that head per
block (mean over the block's query rows, log scale), so a miss is visible as mass outside the
selection. Blocks above the causal diagonal are blank.

Example:
    >>> import tempfile, pathlib, torch
    >>> from sparseattn.evaluation.viz import render_selection, selection_picture
    >>> from sparseattn.methods import get_method
    >>> q = k = torch.randn(1, 2, 256, 16)
    >>> spec = get_method("streaming")
    >>> index = spec.select(q, k, spec.config_cls(sink=16, window=64, block_size=16))
    >>> picture = selection_picture(index, head=0)
    >>> picture.shape
    torch.Size([16, 16])
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "mask.png"
    >>> render_selection(picture, None, path, "streaming").suffix
    '.png'
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

from ..index import BlockIndex, cdiv
from .fidelity import query_block_key_mask

__all__ = ["block_attention_mass", "render_selection", "run_viz", "selection_picture"]


def selection_picture(index, head: int, batch: int = 0) -> torch.Tensor:
    """`[nq, nk]` float: the fraction of each (query block, key block)'s keys selected; NaN above the diagonal.

    Key blocks are ``index.block_k`` wide (for MInference's index: its range width).
    """
    nq, nk = cdiv(index.q_len, index.block_q), cdiv(index.k_len, index.block_k)
    if isinstance(index, BlockIndex):
        picture = index.to_mask()[batch, head].float().cpu()
    else:
        keys = query_block_key_mask(index, 0, nq)[batch, head].float()  # [nq, Lk]
        pad = nk * index.block_k - index.k_len
        keys = torch.nn.functional.pad(keys, (0, pad))
        picture = keys.view(nq, nk, index.block_k).mean(-1).cpu()
    last_key = (index.k_len - index.q_len + torch.clamp((torch.arange(nq) + 1) * index.block_q, max=index.q_len) - 1)
    above = torch.arange(nk)[None, :] > (last_key // index.block_k)[:, None]
    return picture.masked_fill(above, float("nan"))


@torch.no_grad()
def block_attention_mass(q: torch.Tensor, k: torch.Tensor, head: int, block_q: int, block_k: int, *,
                         scale: float | None = None) -> torch.Tensor:
    """`[nq, nk]`: exact causal attention mass of query head ``head`` per block (mean over the block's rows).

    ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` (batch 0 is used); one chunk of rows at a time.
    """
    Lq, D = q.shape[2], q.shape[3]
    Lk = k.shape[2]
    qh = q[0, head].float()
    kh = k[0, head // (q.shape[1] // k.shape[1])].float()
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    nq, nk = cdiv(Lq, block_q), cdiv(Lk, block_k)
    mass = torch.zeros(nq, nk, dtype=torch.float64)
    kpos = torch.arange(Lk, device=q.device)
    step = max(block_q, (1 << 24) // max(1, Lk) // block_q * block_q)
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        scores = (qh[r0:r1] @ kh.T) * scale
        rows = torch.arange(r0, r1, device=q.device)
        scores = scores.masked_fill(kpos[None, :] > rows[:, None] + (Lk - Lq), float("-inf"))
        probs = torch.nn.functional.pad(torch.softmax(scores, -1), (0, nk * block_k - Lk))
        per_block = probs.view(r1 - r0, nk, block_k).sum(-1).double().cpu()  # [rows, nk]
        mass.index_add_(0, (rows // block_q).cpu(), per_block)
    counts = torch.bincount(torch.arange(Lq) // block_q, minlength=nq).double()
    return (mass / counts[:, None]).float()


def render_selection(picture: torch.Tensor, mass: torch.Tensor | None, path, title: str) -> Path:
    """Write the selection (and the exact block mass, if given) as a PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError as err:
        raise RuntimeError("sparseattn viz needs matplotlib: pip install 'sparseattn[plot]'") from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = 1 if mass is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 5), squeeze=False)
    image = axes[0, 0].imshow(picture.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    axes[0, 0].set_title("selected (fraction of each block's keys)", fontsize=9)
    fig.colorbar(image, ax=axes[0, 0], fraction=0.046)
    if mass is not None:
        shown = mass.masked_fill(torch.isnan(picture), float("nan")).clamp_min(1e-6)
        image = axes[0, 1].imshow(shown.numpy(), cmap="magma", norm=LogNorm(vmin=1e-5, vmax=1),
                                  interpolation="nearest")
        axes[0, 1].set_title("exact attention mass per block (mean over rows)", fontsize=9)
        fig.colorbar(image, ax=axes[0, 1], fraction=0.046)
    for ax in axes.flat:
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_viz(model, tokenizer, *, method: str, options: Mapping[str, Any], layer: int, head: int, length: int,
            path, source: str = "stdlib") -> dict[str, Any]:
    """Select with ``method`` on ``model``'s layer ``layer`` for ``length`` tokens of real text and draw ``head``.

    Returns:
        ``{"path", "density" (this head), "recall" (this head), "block_q", "block_k"}``.
    """
    from ..api import resolve_config
    from ..bench.capture import capture_qkv
    from ..methods import get_method
    from .fidelity import _layer_scaling, attention_fidelity
    from .haystack import haystack_ids

    num_layers = model.config.get_text_config().num_hidden_layers
    if not 0 <= layer < num_layers:
        raise ValueError(f"--layer must be in [0, {num_layers - 1}], got {layer}")
    device = next(model.parameters()).device
    ids = torch.tensor([haystack_ids(tokenizer, source, length)[:length]], device=device)
    q, k, v = capture_qkv(model, ids, layers=[layer])[layer]
    if not 0 <= head < q.shape[1]:
        raise ValueError(f"--head must be in [0, {q.shape[1] - 1}] (query heads), got {head}")
    index = get_method(method).select(q, k, resolve_config(method, **options), causal=True)
    if index is None:
        raise ValueError(f"method {method!r} selects no blocks (dense); nothing to draw")
    scale = _layer_scaling(model, layer)
    picture = selection_picture(index, head)
    mass = block_attention_mass(q, k, head, index.block_q, index.block_k, scale=scale)
    fid = attention_fidelity(q[:, head:head + 1], k[:, head // (q.shape[1] // k.shape[1])][:, None],
                             v[:, head // (q.shape[1] // k.shape[1])][:, None],
                             _one_head(index, head), scale=scale)
    density = float(index.density()[0, head])
    settings = " ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
    render_selection(picture, mass, path, f"{method} ({settings}), layer {layer}, head {head}, {length} tokens: "
                     f"density {100 * density:.1f}%, recall {fid['recall'].item():.3f}")
    return {"path": str(path), "density": density, "recall": fid["recall"].item(), "block_q": index.block_q,
            "block_k": index.block_k}


def _one_head(index, head: int):
    """The index restricted to one query head (batch 0)."""
    import dataclasses

    fields = {f.name: getattr(index, f.name) for f in dataclasses.fields(index)}
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            fields[name] = value[:1, head:head + 1]
    return type(index)(**fields)
