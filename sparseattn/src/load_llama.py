"""The seed's import path: `from sparseattn.src.load_llama import load_llama`."""

from ..models import load_llama

__all__ = ["load_llama"]
