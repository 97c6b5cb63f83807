"""Training sparse attention patterns: PruLong-style learned head masks (see docs/training.md).

Modules: ``gates`` (hard-concrete gates per layer x KV head), ``schedule`` (target sparsity),
``lagrangian`` (the constraint, multipliers by gradient ascent), ``attention`` (gated full +
streaming attention through sparseattn's kernels), ``model`` (:class:`PruLongModel`, the
transformers integration), ``data`` / ``synthetic`` (packed rows, retrieval data), ``trainer``
(:class:`PruLongTrainer`), ``train`` (the command line), ``export`` (binarize to a TSV head mask).

Importing this package does not import transformers; the names below load lazily.
"""

from .gates import HardConcreteGates
from .lagrangian import SparsityLagrangian
from .schedule import SparsitySchedule

__all__ = ["HardConcreteGates", "PruLongModel", "PruLongTrainer", "PruLongTrainingArguments", "SparsityLagrangian",
           "SparsitySchedule", "binarize", "load_head_mask", "mixed_attention"]

_LAZY = {"PruLongModel": "model", "PruLongTrainer": "trainer", "PruLongTrainingArguments": "trainer",
         "binarize": "export", "load_head_mask": "export", "mixed_attention": "attention"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sparseattn.training' has no attribute {name!r}")
