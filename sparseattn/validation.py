"""Input checks shared by every public function.

Each failure raises ``ValueError`` (bad value or shape) or ``TypeError`` (bad type) with a message
that names the argument, what was expected and what was given. Nothing is silently truncated,
padded or broadcast.
"""

from __future__ import annotations

import math
import numbers

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(q, k, v, *, causal: bool = True, names=("query_states", "key_states", "value_states")):
    """Validate `[B, H, L, D]` attention inputs; returns ``(B, Hq, Hkv, Lq, Lk, D)``.

    Rules: tensors of rank 4 on one device with one floating dtype; same batch and head_dim;
    ``k`` and ``v`` same shape; ``Hq % Hkv == 0``; no empty dimension; ``Lq <= Lk`` when causal.
    """
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [batch, heads, seq_len, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{qn}, {kn}, {vn} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{qn}, {kn}, {vn} must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{kn} and {vn} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, Dk = k.shape
    if k.shape[0] != B:
        raise ValueError(f"batch size mismatch: {qn} has {B}, {kn} has {k.shape[0]}")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: {qn} has {D}, {kn} has {Dk}")
    if Hq % Hkv != 0:
        raise ValueError(
            f"number of query heads ({Hq}) must be a multiple of the number of key/value heads ({Hkv}) for GQA"
        )
    if causal and Lq > Lk:
        raise ValueError(
            f"with causal=True the queries are the last positions, so {qn} seq_len ({Lq}) must be <= {kn} seq_len ({Lk})"
        )
    return B, Hq, Hkv, Lq, Lk, D


def check_scale(scale):
    """A softmax scale: a positive finite float, or None for ``1/sqrt(head_dim)``."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")
    return float(scale)


def check_unit_interval(name: str, value, *, allow_tensor: bool = True, num_heads: int | None = None,
                        low_open: bool = True):
    """A threshold in (0, 1] (or [0, 1] with ``low_open=False``): float, or a per-head tensor."""
    if isinstance(value, torch.Tensor) and allow_tensor:
        if value.dim() not in (0, 1):
            raise ValueError(f"{name} must be a float or a 1-D per-head tensor, got shape {tuple(value.shape)}")
        if value.dim() == 1 and num_heads is not None and value.numel() != num_heads:
            raise ValueError(f"{name} has {value.numel()} entries, expected one per query head ({num_heads})")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} must be finite, got {value.tolist()}")
        bad = (value <= 0) | (value > 1) if low_open else (value < 0) | (value > 1)
        if bad.any():
            rng = "(0, 1]" if low_open else "[0, 1]"
            raise ValueError(f"{name} must lie in {rng}, got {value.tolist()}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (low_open and not 0 < value <= 1) or (not low_open and not 0 <= value <= 1):
        raise ValueError(f"{name} must lie in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return value


def check_positive_int(name: str, value, *, allow_zero: bool = False, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return int(value)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_block_size(name: str, value):
    value = check_positive_int(name, value)
    if value & (value - 1) or value < 16:
        raise ValueError(f"{name} must be a power of two >= 16 (the kernel's tile sizes), got {value}")
    return value
