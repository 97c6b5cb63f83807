"""Export trained gates as a head mask: global top-k over ``log_alpha``, written as the layers x KV-heads TSV.

:func:`binarize` keeps the ``N - round(sparsity x N)`` gates with the largest ``log_alpha`` (over
all layers at once) as full heads and makes the rest streaming, so the mask has exactly the
requested sparsity whatever the gates' spread. Ties go to the earlier (layer, head). The file
format (tab-separated ``1`` = full / ``0`` = streaming, one line per layer, no header; the layout
of DuoAttention's ``full_attention_heads.tsv``) is read and written by :mod:`sparseattn.headmask`;
:func:`load_head_mask` is re-exported here.

Command line::

    python -m sparseattn.training.export --checkpoint out/checkpoint-300 --sparsity 0.5 --out masks.tsv

Example:
    >>> import torch
    >>> from sparseattn.training.export import binarize
    >>> log_alpha = torch.tensor([[3.0, -2.0, 0.5], [1.0, -4.0, 2.0]])
    >>> binarize(log_alpha, 0.5).int().tolist()
    [[1, 0, 0], [1, 0, 1]]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import safetensors.torch
import torch

from ..headmask import head_sparsity, load_head_mask, save_head_mask
from .model import CONFIG_FILE, STATE_FILE

__all__ = ["binarize", "export_head_mask", "load_gates", "load_head_mask", "main", "num_streaming"]


def num_streaming(total: int, sparsity: float) -> int:
    """Streaming heads for ``sparsity`` of ``total``: ``round(sparsity x total)``, halves rounded up."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    return min(total, math.floor(sparsity * total + 0.5 + 1e-9))


def binarize(log_alpha: torch.Tensor, sparsity: float) -> torch.Tensor:
    """`[layers, kv_heads]` bool mask (True = full): the lowest-``log_alpha`` heads become streaming.

    Args:
        log_alpha: `[layers, kv_heads]` gate parameters (or any per-head score: higher = more needed).
        sparsity: fraction of heads to make streaming, in [0, 1].
    """
    if not isinstance(log_alpha, torch.Tensor) or log_alpha.dim() != 2 or log_alpha.numel() == 0:
        raise ValueError("log_alpha must be a non-empty [layers, kv_heads] tensor")
    scores = log_alpha.detach().float().cpu().flatten()
    if not torch.isfinite(scores).all():
        raise ValueError("log_alpha has non-finite values; the gates diverged")
    k = num_streaming(scores.numel(), sparsity)
    order = torch.sort(scores, stable=True).indices  # ascending; ties keep (layer, head) order
    full = torch.ones(scores.numel(), dtype=torch.bool)
    full[order[:k]] = False
    return full.view(log_alpha.shape)


def load_gates(checkpoint: str | Path) -> torch.Tensor:
    """``log_alpha`` `[layers, kv_heads]` of a PruLong checkpoint folder (``prulong_state.safetensors``)."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {STATE_FILE}; pass a checkpoint folder written by "
                                "sparseattn.training.train (output_dir or output_dir/checkpoint-N)")
    return safetensors.torch.load_file(str(path))["log_alpha"]


def export_head_mask(checkpoint: str | Path, sparsity: float, out: str | Path) -> torch.Tensor:
    """Binarize a checkpoint's gates to ``sparsity`` and write the TSV to ``out``; returns the mask."""
    mask = binarize(load_gates(checkpoint), sparsity)
    save_head_mask(mask, out)
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparseattn.training.export",
                                     description="Binarize PruLong gates to a head-mask TSV (1 = full, 0 = streaming).")
    parser.add_argument("--checkpoint", required=True, help="a folder with prulong_state.safetensors")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of streaming heads (default: the run's end_head_sparsity, if recorded)")
    parser.add_argument("--out", required=True, help="the .tsv file to write")
    args = parser.parse_args(argv)
    sparsity = args.sparsity
    if sparsity is None:
        config_path = Path(args.checkpoint) / CONFIG_FILE
        recorded = json.loads(config_path.read_text()).get("end_head_sparsity") if config_path.is_file() else None
        if recorded is None:
            parser.error("--sparsity is required (the checkpoint records no end_head_sparsity)")
        sparsity = recorded
    try:
        mask = export_head_mask(args.checkpoint, sparsity, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {mask.shape[0]} layers x {mask.shape[1]} KV heads, "
          f"{int((~mask).sum())} streaming (sparsity {head_sparsity(mask):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
