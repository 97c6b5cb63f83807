"""Trained head masks: the layers x KV-heads TSV file that says which heads keep full attention.

Format (fixed; the trainer's export writes it, inference reads it):

- plain text, one line per layer (layer 0 first), one tab-separated column per KV head;
- every field is the integer ``1`` (full attention: the head attends to, and caches, every token)
  or ``0`` (streaming: sink + local window only);
- no header, no comments; a final newline is optional.

With GQA all query heads of a KV head share its entry. DuoAttention's ``full_attention_heads.tsv``
has the same layout but holds gate values in [0, 1]; binarize those first (global top-k, e.g. with
the trainer's export) -- this reader accepts only 0 and 1.

This module is the canonical parser: :func:`load_head_mask` returns a `[layers, kv_heads]` bool
tensor (True = full) and rejects ragged rows, values other than 0/1 and empty files with the line
and column at fault; :func:`check_head_mask` compares a mask with a model's shape.

Example:
    >>> import torch
    >>> from sparseattn.headmask import format_head_mask, parse_head_mask, head_sparsity
    >>> mask = parse_head_mask("1\\t0\\t1\\n0\\t0\\t1\\n")
    >>> mask.tolist()
    [[True, False, True], [False, False, True]]
    >>> format_head_mask(mask)
    '1\\t0\\t1\\n0\\t0\\t1\\n'
    >>> head_sparsity(mask)
    0.5
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = [
    "check_head_mask",
    "format_head_mask",
    "head_mask_for_model",
    "head_sparsity",
    "load_head_mask",
    "model_head_shape",
    "parse_head_mask",
    "random_head_mask",
    "save_head_mask",
    "to_head_mask",
]

_FORMAT = "tab-separated 0/1 integers, one line per layer, one column per KV head, no header"


def _is_unit_float(text: str) -> bool:
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


def parse_head_mask(text: str, *, source: str = "<string>") -> torch.Tensor:
    """Parse the TSV text of a head mask.

    Args:
        text: the file's contents.
        source: a name for error messages (the path).

    Returns:
        `[layers, kv_heads]` bool tensor on the CPU; True = full-attention head.

    Raises:
        ValueError: empty text, a blank line between layers, a row with another number of columns
            than the first, or a field that is not ``0`` or ``1`` (the message names line and column).
    """
    if not isinstance(text, str):
        raise TypeError(f"head mask text must be a str, got {type(text).__name__}")
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():  # a final newline (or several) ends the file
        lines.pop()
    if not lines:
        raise ValueError(f"head mask {source} is empty; expected {_FORMAT}")
    rows: list[list[bool]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"head mask {source}, line {number}: blank line between layers; expected {_FORMAT}")
        fields = line.split("\t")
        row = []
        for column, field in enumerate(fields, start=1):
            value = field.strip()
            if value not in ("0", "1"):
                hint = ""
                if " " in value:
                    hint = " (columns are separated by tabs, not spaces)"
                elif _is_unit_float(value):
                    hint = " (gate values must be binarized first, e.g. by global top-k in the trainer's export)"
                elif number == 1 and not value.lstrip("-").replace(".", "", 1).isdigit():
                    hint = " (the format has no header line)"
                raise ValueError(f"head mask {source}, line {number}, column {column}: {field!r} is not 0 or 1 "
                                 f"(1 = full head, 0 = streaming head){hint}")
            row.append(value == "1")
        if rows and len(row) != len(rows[0]):
            raise ValueError(f"head mask {source}: ragged rows, line {number} has {len(row)} columns but line 1 has "
                             f"{len(rows[0])}; every layer needs one column per KV head")
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def load_head_mask(path: str | os.PathLike) -> torch.Tensor:
    """Read a head-mask TSV file.

    Args:
        path: the ``.tsv`` file.

    Returns:
        `[layers, kv_heads]` bool tensor on the CPU; True = full-attention head.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed file (see :func:`parse_head_mask`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head mask file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"head mask {path} is not UTF-8 text ({err}); expected {_FORMAT}") from None
    return parse_head_mask(text, source=str(path))


def to_head_mask(mask, name: str = "head mask") -> torch.Tensor:
    """``mask`` (bool or 0/1 tensor or nested list) as a `[layers, kv_heads]` CPU bool tensor; raises otherwise."""
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a [layers, kv_heads] tensor or nested list of 0/1, got "
                            f"{type(mask).__name__}: {err}") from None
    if mask.dim() != 2 or 0 in mask.shape:
        raise ValueError(f"{name} must be a non-empty 2-D [layers, kv_heads] array, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{name} must hold only 0 and 1 (1 = full head), got values "
                             f"{sorted(set(mask.flatten().tolist()), key=str)[:6]}")
        mask = mask != 0
    return mask.detach().to("cpu")


def format_head_mask(mask) -> str:
    """The TSV text of a `[layers, kv_heads]` mask (bool or 0/1), with a final newline."""
    mask = to_head_mask(mask)
    return "".join("\t".join("1" if v else "0" for v in row) + "\n" for row in mask.tolist())


def save_head_mask(mask, path: str | os.PathLike) -> Path:
    """Write ``mask`` as TSV to ``path`` (atomically: a failed write leaves no partial file). Returns the path."""
    path = Path(path)
    text = format_head_mask(mask)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def model_head_shape(model_or_config) -> tuple[int, int]:
    """``(num_hidden_layers, num_key_value_heads)`` of a transformers model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    if not isinstance(layers, int) or not isinstance(heads, int):
        raise TypeError(f"{type(config).__name__} has no num_hidden_layers / num_key_value_heads; "
                         "cannot check a head mask against it")
    return layers, heads


def check_head_mask(mask, num_layers: int, num_kv_heads: int, *, source: str = "head mask") -> torch.Tensor:
    """``mask`` as a `[num_layers, num_kv_heads]` CPU bool tensor, or a ValueError naming both shapes."""
    mask = to_head_mask(mask, source)
    if tuple(mask.shape) != (num_layers, num_kv_heads):
        raise ValueError(f"{source} has {mask.shape[0]} layers x {mask.shape[1]} KV heads, but the model has "
                         f"{num_layers} layers x {num_kv_heads} KV heads")
    return mask


def head_mask_for_model(mask_or_path, model_or_config) -> torch.Tensor:
    """Load (if a path) and check a head mask against a model: `[layers, kv_heads]` bool, True = full."""
    if isinstance(mask_or_path, (str, os.PathLike)):
        source = str(mask_or_path)
        mask = load_head_mask(mask_or_path)
    else:
        source, mask = "head mask", mask_or_path
    return check_head_mask(mask, *model_head_shape(model_or_config), source=source)


def head_sparsity(mask) -> float:
    """Fraction of streaming heads (zeros)."""
    mask = to_head_mask(mask)
    return 1.0 - mask.float().mean().item()


def random_head_mask(num_layers: int, num_kv_heads: int, num_streaming: int, *, seed: int = 0) -> torch.Tensor:
    """A uniformly random mask with exactly ``num_streaming`` streaming heads (the control for a trained mask).

    Example:
        >>> from sparseattn.headmask import random_head_mask
        >>> m = random_head_mask(30, 3, 45, seed=0)
        >>> tuple(m.shape), int((~m).sum())
        ((30, 3), 45)
    """
    total = num_layers * num_kv_heads
    if isinstance(num_streaming, bool) or not isinstance(num_streaming, int) or not 0 <= num_streaming <= total:
        raise ValueError(f"num_streaming must be an int in [0, {total}], got {num_streaming!r}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(total, dtype=torch.bool)
    mask[order[:num_streaming]] = False
    return mask.view(num_layers, num_kv_heads)
