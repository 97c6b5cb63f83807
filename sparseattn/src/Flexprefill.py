"""The seed's import path: `from sparseattn.src.Flexprefill import Flexprefill_prefill`."""

from ..methods.flexprefill import Flexprefill_prefill

__all__ = ["Flexprefill_prefill"]
