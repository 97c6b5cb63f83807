"""The seed's import path: `from sparseattn.src.Fullprefill import Full_prefill`."""

from ..methods.full import Full_prefill

__all__ = ["Full_prefill"]
