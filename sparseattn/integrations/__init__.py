"""Integrations with model libraries.

- :mod:`sparseattn.integrations.transformers`: ``attn_implementation="sparseattn"`` for Hugging Face
  models through ``transformers.AttentionInterface``, and :func:`~sparseattn.integrations.transformers.patch`.

Each integration imports its library on first use, so ``import sparseattn`` stays light.
"""
