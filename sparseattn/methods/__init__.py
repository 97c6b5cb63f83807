"""The method registry: every sparse-prefill method is a selector registered by name.

A selector is ``select(q, k, config, *, causal) -> BlockIndex | VerticalSlashIndex | None``
(``None`` means dense attention). The unified API (:func:`sparseattn.sparse_attention`), the
transformers integration and the benchmarks look methods up here, so a user's own selector
registered with :func:`register_method` works everywhere the built-in ones do.

Example:
    >>> import torch, sparseattn
    >>> from sparseattn.index import BlockIndex, causal_block_mask
    >>> def last_two_blocks(q, k, config, *, causal=True):
    ...     B, H, Lq, _ = q.shape
    ...     allowed = causal_block_mask(Lq, k.shape[2], 64, 64, causal)
    ...     keep = allowed & (allowed.cumsum(-1) > allowed.sum(-1, keepdim=True) - 2)
    ...     keep[:, 0] = True  # the sink
    ...     return BlockIndex.from_mask(keep.expand(B, H, *keep.shape), block_q=64, block_k=64,
    ...                                 q_len=Lq, k_len=k.shape[2])
    >>> _ = sparseattn.register_method("last_two_blocks", last_two_blocks, overwrite=True)
    >>> q = k = v = torch.randn(1, 2, 300, 16)
    >>> sparseattn.sparse_attention(q, k, v, method="last_two_blocks").shape
    torch.Size([1, 2, 300, 16])
    >>> _ = sparseattn.METHODS.pop("last_two_blocks")  # unregister
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["MethodSpec", "METHODS", "block_index_bytes", "register_method", "get_method"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, selector and (optional) config dataclass.

    ``index_bytes(config, batch, q_heads, q_len, k_len)``, when given, bounds the bytes the selector
    holds for all heads (its index and any per-head buffers), before it runs (a hook that also takes a
    ``head_dim`` keyword is given the query's head dim); ``sparse_attention``
    then selects and attends whole GQA groups at a time when that would exceed its memory budget
    (``api.INDEX_BUDGET``).
    ``head_slice(config, start, stop, group)`` returns the config of query heads ``[start, stop)``,
    i.e. KV heads ``[start // group, stop // group)`` (needed when the config holds per-head values;
    default: the same config). ``chunk_bounds(config, kv_heads, per_chunk)`` lists the KV-head
    ranges ``[(g0, g1), ...]`` of a chunked call, each at most ``per_chunk`` heads (default: equal
    consecutive ranges); a method whose heads run on different paths can keep each chunk uniform.
    ``select_chunks(q, k, config, bounds, *, causal)`` yields ``(g0, g1, index)`` for each KV-head
    range of ``bounds`` (default: ``select`` on each chunk's heads and ``head_slice`` config); a
    method can share work between the chunks of one call (MInference estimates once).
    """

    name: str
    select: Callable[..., Any]
    config_cls: type | None = None
    description: str = ""
    index_bytes: Callable[..., int] | None = None
    head_slice: Callable[..., Any] | None = None
    chunk_bounds: Callable[..., list] | None = None
    select_chunks: Callable[..., Any] | None = None


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, select: Callable[..., Any], config_cls: type | None = None, *,
                    description: str = "", overwrite: bool = False, index_bytes: Callable[..., int] | None = None,
                    head_slice: Callable[..., Any] | None = None,
                    chunk_bounds: Callable[..., list] | None = None,
                    select_chunks: Callable[..., Any] | None = None) -> MethodSpec:
    """Register ``select`` under ``name``.

    Args:
        name: the method's name, as passed to ``sparse_attention(method=...)``.
        select: ``select(q, k, config, *, causal) -> BlockIndex | VerticalSlashIndex | None``.
            ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``; ``config`` is an instance of
            ``config_cls`` (or ``None`` when the method has no config).
        config_cls: a (frozen) dataclass of the method's options; keyword overrides passed to
            ``sparse_attention`` are its fields.
        description: one line for ``sparseattn`` listings.
        overwrite: replace an existing method of that name (otherwise that is an error).
        index_bytes, head_slice, chunk_bounds, select_chunks: optional, see :class:`MethodSpec`
            (memory-bounded head chunks).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method name must be an identifier string, got {name!r}")
    if not callable(select):
        raise TypeError(f"select for method {name!r} must be callable, got {type(select).__name__}")
    if name in METHODS and not overwrite:
        raise ValueError(f"method {name!r} is already registered; pass overwrite=True to replace it")
    hooks = (("index_bytes", index_bytes), ("head_slice", head_slice), ("chunk_bounds", chunk_bounds),
             ("select_chunks", select_chunks))
    for hook_name, hook in hooks:
        if hook is not None and not callable(hook):
            raise TypeError(f"{hook_name} for method {name!r} must be callable, got {type(hook).__name__}")
    spec = MethodSpec(name, select, config_cls, description, index_bytes, head_slice, chunk_bounds, select_chunks)
    METHODS[name] = spec
    return spec


def block_index_bytes(batch: int, q_heads: int, q_len: int, k_len: int, block_size: int,
                      width: int | None = None) -> int:
    """Bytes of a ``BlockIndex`` (int32 indices and counts) of ``width`` key blocks per row (None: all).

    >>> block_index_bytes(1, 32, 131072, 131072, 128) / 2**20  # XAttention's index at 128K
    128.125
    """
    nq, nk = -(-q_len // block_size), -(-k_len // block_size)
    return 4 * batch * q_heads * nq * ((nk if width is None else min(width, nk)) + 1)


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods are {sorted(METHODS)}")
    return METHODS[name]


# Built-in methods register themselves on import.
from . import full, xattention, flexprefill, minference, streaming, headmask  # noqa: E402,F401
