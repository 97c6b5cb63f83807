"""Pure-PyTorch fp32 reference selectors: the ground truth the fast selectors are tested against.

Each returns the canonical index of ``sparseattn.index`` (``BlockIndex``, or ``VerticalSlashIndex``
for MInference's vertical-and-slash pattern). Slow and memory-bounded by query chunking; they run
on any device without host synchronisation.
"""

from sparseattn.reference.flexprefill import flexprefill_select
from sparseattn.reference.minference import a_shape_select, block_sparse_select, minference_select
from sparseattn.reference.streaming import streaming_select
from sparseattn.reference.xattention import xattention_block_mass, xattention_select

__all__ = [
    "xattention_select",
    "xattention_block_mass",
    "flexprefill_select",
    "minference_select",
    "a_shape_select",
    "block_sparse_select",
    "streaming_select",
]
