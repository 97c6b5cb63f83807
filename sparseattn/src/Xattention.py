"""The seed's import path: `from sparseattn.src.Xattention import Xattention_prefill`."""

from ..methods.xattention import Xattention_prefill

__all__ = ["Xattention_prefill"]
