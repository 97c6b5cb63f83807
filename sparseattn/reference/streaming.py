"""Reference streaming (attention-sink + local-window) selector, block-granular.

Also home of ``forced_block_mask``: key block 0 plus each query block's diagonal blocks, the
blocks that every selector in ``sparseattn.reference`` keeps so that no query row is empty.
"""

from __future__ import annotations

import torch

from sparseattn.index import BlockIndex, causal_block_mask, cdiv, diagonal_block_range

__all__ = ["forced_block_mask", "streaming_select"]


def forced_block_mask(q_len: int, k_len: int, block_size: int, causal: bool = True, device=None) -> torch.Tensor:
    """`[nq, nk]` bool: key block 0 and the diagonal key blocks of every query block.

    The diagonal blocks of a query block are the key blocks holding its rows' absolute positions
    (two blocks when ``k_len - q_len`` is not a multiple of ``block_size``). Both are always causal,
    so the result is a subset of ``causal_block_mask`` whatever ``causal`` is.
    """
    first, last = diagonal_block_range(q_len, k_len, block_size, block_size, device=device)
    cols = torch.arange(cdiv(k_len, block_size), device=device, dtype=torch.int64)
    forced = (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])
    forced[:, 0] = True
    return forced & causal_block_mask(q_len, k_len, block_size, block_size, causal, device=device)


def streaming_select(q_len: int, k_len: int, batch: int, heads: int, *, sink: int = 128, window: int = 1024,
                     block_size: int = 64, causal: bool = True, device=None) -> BlockIndex:
    """Sink + local-window blocks: the same static pattern for every batch element and head.

    A key block is kept for a query block when it overlaps the sink ``[0, sink)`` or the local
    window of *any* of the query block's rows: ``[pos - window + 1, pos]`` when causal, and
    ``[pos - window + 1, pos + window - 1]`` (keys closer than ``window``) when not. Key block 0 and
    the diagonal blocks are always kept; with ``causal`` only causal blocks are kept. The kernel
    applies the causal element mask, so the computed keys are a superset of sink + window.

    Args:
        q_len: number of queries, the last ``q_len`` of ``k_len`` positions.
        k_len: number of keys.
        batch: ``B`` of the returned index.
        heads: ``H`` (query heads) of the returned index.
        sink: sink tokens at the start of the sequence (default 128).
        window: local-window tokens per query, itself included (default 1024).
        block_size: query and key block size (default 64).
        causal: keep causal blocks only (default True).
        device: device of the index.

    Returns:
        ``BlockIndex`` with `indices [B, H, nq, max_k]`; ``max_k`` is a shape-only upper bound on
        the row width (no host sync), so rows may carry extra ``-1`` padding.

    Example:
        >>> idx = streaming_select(300, 300, 1, 2, sink=16, window=64, block_size=64)
        >>> idx.to_mask()[0, 0].int().tolist()
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]]
    """
    for name, value in (("q_len", q_len), ("k_len", k_len), ("batch", batch), ("heads", heads),
                        ("block_size", block_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"streaming_select: {name} must be a positive int, got {value!r}")
    for name, value in (("sink", sink), ("window", window)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"streaming_select: {name} must be a non-negative int, got {value!r}")
    if q_len > k_len:
        raise ValueError(f"streaming_select: q_len ({q_len}) must be <= k_len ({k_len})")
    bs = block_size
    nq, nk = cdiv(q_len, bs), cdiv(k_len, bs)
    rows = torch.arange(nq, device=device, dtype=torch.int64)
    first_pos = (k_len - q_len) + rows * bs
    last_pos = (k_len - q_len) + torch.clamp((rows + 1) * bs, max=q_len) - 1
    key_first = torch.arange(nk, device=device, dtype=torch.int64) * bs
    key_last = torch.clamp(key_first + bs, max=k_len) - 1
    lo = first_pos - window + 1
    hi = last_pos if causal else last_pos + window - 1
    in_window = (key_first[None, :] <= hi[:, None]) & (key_last[None, :] >= lo[:, None])
    in_sink = (key_first < sink)[None, :]
    allowed = causal_block_mask(q_len, k_len, bs, bs, causal, device=device)
    mask = ((in_window | in_sink) & allowed) | forced_block_mask(q_len, k_len, bs, causal, device=device)
    # Row width bound from shapes only: sink blocks + blocks a window span of
    # (window - 1 [+ window - 1 if not causal] + bs) keys can touch + block 0 + two diagonal blocks.
    span = window - 1 + bs + (0 if causal else max(window - 1, 0))
    width = min(nk, cdiv(sink, bs) + cdiv(span, bs) + 1 + 3)
    single = BlockIndex.from_mask(mask[None, None], block_q=bs, block_k=bs, q_len=q_len, k_len=k_len, max_k=width)
    indices = single.indices.expand(batch, heads, -1, -1).contiguous()
    counts = single.counts.expand(batch, heads, -1).contiguous()
    return BlockIndex(indices, counts, bs, bs, q_len, k_len)
