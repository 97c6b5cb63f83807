"""SparseAttn: sparse-attention prefill for long-context LLMs.

Public API: the seed's functions (``Xattention_prefill``, ``Flexprefill_prefill``,
``Minference_prefill``, ``Full_prefill``), the unified ``sparse_attention``, the method registry,
the ``BlockIndex`` format and config loading.
"""

from .api import AttentionStats, sparse_attention
from .config import load_config
from .index import BlockIndex, KeyMajorIndex, VerticalSlashIndex
from .methods import METHODS, MethodSpec, get_method, register_method
from .methods.flexprefill import FlexPrefillConfig, Flexprefill_prefill
from .methods.full import Full_prefill
from .methods.minference import MInferenceConfig, Minference_prefill
from .methods.streaming import StreamingConfig
from .methods.xattention import XAttentionConfig, Xattention_prefill

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "load_llama",
    "patch",
    "BlockIndex",
    "FlexPrefillConfig",
    "Flexprefill_prefill",
    "Full_prefill",
    "KeyMajorIndex",
    "METHODS",
    "MInferenceConfig",
    "MethodSpec",
    "Minference_prefill",
    "StreamingConfig",
    "VerticalSlashIndex",
    "XAttentionConfig",
    "Xattention_prefill",
    "get_method",
    "load_config",
    "register_method",
    "sparse_attention",
]


def __getattr__(name):
    # Lazy: these import transformers, which `import sparseattn` alone should not pay for.
    if name == "patch":
        from .integrations.transformers import patch

        return patch
    if name == "load_llama":
        from .models import load_llama

        return load_llama
    raise AttributeError(f"module 'sparseattn' has no attribute {name!r}")
