"""Shims for the seed's documented imports (``sparseattn.src.Xattention`` and friends)."""
