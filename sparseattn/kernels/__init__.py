"""Triton kernels: the shared block-sparse attention (forward + backward), MInference's
vertical-slash variant, and XAttention's fused block-mass estimation.

Triton is imported lazily, so ``import sparseattn`` works where Triton is missing (e.g. macOS);
``kernels_available()`` says whether the kernels can run here.
"""

from __future__ import annotations

import importlib
import os

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - platforms without Triton
    triton = None

__all__ = [
    "AttentionConfigs",
    "KernelConfig",
    "block_sparse_attention",
    "block_sparse_backward",
    "block_sparse_forward",
    "default_configs",
    "kernels_available",
    "key_major_index",
    "vertical_slash_attention",
    "vertical_slash_forward",
    "xattention_estimate",
    "xattention_select_fast",
]

_LAZY = {
    "AttentionConfigs": "block_sparse",
    "KernelConfig": "block_sparse",
    "block_sparse_attention": "block_sparse",
    "block_sparse_backward": "block_sparse",
    "block_sparse_forward": "block_sparse",
    "default_configs": "block_sparse",
    "key_major_index": "block_sparse",
    "vertical_slash_attention": "vertical_slash",
    "vertical_slash_forward": "vertical_slash",
    "xattention_estimate": "estimate",
    "xattention_select_fast": "estimate",
}


def kernels_available() -> bool:
    """True when Triton is installed and can run: a CUDA device, or ``TRITON_INTERPRET=1``."""
    if triton is None:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def __getattr__(name):
    if name in _LAZY:
        if triton is None:
            raise ImportError(f"sparseattn.kernels.{name} needs Triton (pip install triton), which is not installed")
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
