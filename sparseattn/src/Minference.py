"""The seed's import path: `from sparseattn.src.Minference import Minference_prefill`."""

from ..methods.minference import Minference_prefill

__all__ = ["Minference_prefill"]
