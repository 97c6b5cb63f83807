"""Reference MInference selectors (Jiang et al. 2024), fp32 pure PyTorch.

``minference_select`` (vertical_and_slash, token-granular ``VerticalSlashIndex``),
``a_shape_select`` (sink + local window) and ``block_sparse_select`` (top-k pooled blocks).
Also home of ``last_query_scores`` and ``block_mean_pool``, which FlexPrefill shares.
"""

from __future__ import annotations

import math

import torch

from sparseattn.index import BlockIndex, VerticalSlashIndex, causal_block_mask, cdiv
from sparseattn.reference.streaming import forced_block_mask, streaming_select
from sparseattn.reference.xattention import CHUNK_ELEMENTS, check_qk

__all__ = ["minference_select", "vertical_slash_index_from_scores", "a_shape_select", "block_sparse_select",
           "last_query_scores", "block_mean_pool", "adaptive_sizes", "selection_sizes", "per_head_sizes"]

FORCED_VERTICALS = 30  # first keys always kept as verticals (attention sinks)
FORCED_SLASHES = 100  # most local diagonals (offsets 0..99) always kept


def last_query_scores(q: torch.Tensor, k: torch.Tensor, num_last: int, causal: bool = True):
    """Exact fp32 softmax of the last ``num_last`` queries, reduced to vertical and slash sums.

    Query ``t`` of those sits at absolute position ``pos_t = Lk - num_last + t``; causal rows see
    keys ``<= pos_t``. Scale ``1/sqrt(D)``; GQA without repeating K.

    Returns:
        ``(vertical [B, Hq, Lk], slash [B, Hq, n_off], min_offset)``: ``vertical[j]`` sums key ``j``'s
        probability over the rows; ``slash[a]`` sums the probability on offset ``o = a + min_offset``
        (key ``pos_t - o``). ``min_offset`` is 0 when causal, ``1 - num_last`` otherwise, and
        ``n_off = Lk - min_offset``.
    """
    B, Hq, Hkv, Lq, Lk, D = check_qk(q, k, "last_query_scores")
    G, n, device = Hq // Hkv, num_last, q.device
    q_last = q[:, :, Lq - n:].float().reshape(B, Hkv, G, n, D)
    k_t = k.float().transpose(-1, -2)
    min_offset = 0 if causal else 1 - n
    n_off = Lk - min_offset
    pos = (Lk - n) + torch.arange(n, device=device)
    key_pos = torch.arange(Lk, device=device)
    offsets = torch.arange(n_off, device=device) + min_offset
    vertical = torch.zeros(B, Hq, Lk, device=device)
    slash = torch.zeros(B, Hq, n_off, device=device)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (B * Hq * n_off))
    for t0 in range(0, n, rows_per_chunk):
        t1 = min(n, t0 + rows_per_chunk)
        rows = t1 - t0
        scores = torch.matmul(q_last[:, :, :, t0:t1].reshape(B, Hkv, G * rows, D), k_t) / math.sqrt(D)
        scores = scores.view(B, Hq, rows, Lk)
        if causal:
            scores = scores.masked_fill(key_pos[None, :] > pos[t0:t1, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        vertical += probs.sum(2)
        # A gather (not scatter_add) keeps the diagonal sums deterministic on every device.
        key_of = pos[t0:t1, None] - offsets[None, :]  # [rows, n_off]
        valid = (key_of >= 0) & (key_of < Lk)
        gathered = probs.gather(-1, key_of.clamp(0, Lk - 1).expand(B, Hq, rows, n_off))
        slash += torch.where(valid, gathered, torch.zeros((), device=device)).sum(2)
    return vertical, slash, min_offset


def block_mean_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[B, H, L, D]` -> `[B, H, ceil(L/bs), D]` fp32 mean over each block's valid rows."""
    B, H, L, D = x.shape
    n = cdiv(L, block_size)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block_size - L))
    sizes = torch.clamp(L - torch.arange(n, device=x.device) * block_size, max=block_size)
    return padded.view(B, H, n, block_size, D).sum(3) / sizes[:, None].float()


def _top_positions(score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest entries along the last dim (ties: lower index first)."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :count]


def adaptive_sizes(adaptive_budget: float, k_len: int) -> tuple[int, int]:
    """MInference's adaptive budget: ``total = adaptive_budget * k_len`` tokens, 20% verticals, 80% slashes.

    Returns ``(vertical_size, slash_size)`` = ``(max(1, round_half_up(0.2 total)), max(1, round_half_up(0.8 total)))``.

    Example:
        >>> adaptive_sizes(0.5, 400)
        (40, 160)
    """
    if isinstance(adaptive_budget, bool) or not isinstance(adaptive_budget, (int, float)) or not 0 < adaptive_budget <= 1:
        raise ValueError(f"adaptive_budget must be in (0, 1], got {adaptive_budget!r}")
    total = adaptive_budget * k_len
    return max(1, math.floor(0.2 * total + 0.5)), max(1, math.floor(0.8 * total + 0.5))


def selection_sizes(vertical_size: int, slash_size: int, k_len: int, n_off: int) -> tuple[int, int]:
    """Verticals and slashes actually kept: at least the forced ones, at most the positions that exist.

    ``nv = min(Lk, max(vertical_size, min(30, Lk)))`` and ``ns = min(n_off, max(slash_size, min(100, Lk)))``
    (the reference's ``max(vertical_size, 30)``), with ``n_off`` the number of slash offsets.

    Example:
        >>> selection_sizes(10, 6096, 1000, 1000)
        (30, 1000)
    """
    nv = min(k_len, max(vertical_size, min(FORCED_VERTICALS, k_len)))
    ns = min(n_off, max(slash_size, min(FORCED_SLASHES, k_len)))
    return nv, ns


def per_head_sizes(name: str, value, heads: int, *, allow_zero: bool = False) -> list[int]:
    """An int, or one int per query head (list, tuple or 1-D tensor) -> a list of ``heads`` positive ints."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} must be an int or a 1-D per-head sequence, got shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != heads:
            raise ValueError(f"{name} has {len(value)} entries, expected one per query head ({heads})")
        values = list(value)
    else:
        values = [value] * heads
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not allow_zero):
            kind = "a non-negative" if allow_zero else "a positive"
            raise ValueError(f"{name} must be {kind} int (or one per query head), got {value!r}")
    return values


def minference_select(q: torch.Tensor, k: torch.Tensor, *, vertical_size=1000, slash_size=6096,
                      adaptive_budget: float | None = None, last_q: int = 64, block_size: int = 64,
                      causal: bool = True) -> VerticalSlashIndex:
    """MInference vertical-and-slash index: token-level key ranges (slashes) plus key columns (verticals).

    1. Exact causal softmax of the last ``min(last_q, Lq)`` queries over all keys.
    2. Verticals: column sums; the first 30 keys are forced in; top ``vertical_size`` keys.
    3. Slashes: sums along offsets ``o = query_pos - key_pos`` (0 = main diagonal); offsets 0..99 are
       forced in; top ``slash_size`` offsets. Forced entries count toward the size, but the sizes
       are raised to at least the forced count (as the reference's ``max(vertical_size, 30)``).
       Sizes are clamped to the positions that exist (``Lk`` keys; ``Lk`` offsets causal,
       ``Lk + n - 1`` non-causal). Ties: lower key / lower offset index first.
    4. Ranges per query block, 5. columns: see :func:`vertical_slash_index_from_scores`.

    Args:
        q: `[B, Hq, Lq, D]`; k: `[B, Hkv, Lk, D]` with ``Hq % Hkv == 0``.
        vertical_size: number of vertical keys (default 1000), or one per query head.
        slash_size: number of slash offsets (default 6096), or one per query head.
        adaptive_budget: if given, a fraction in (0, 1] replacing both sizes: ``total = adaptive_budget * Lk``
            tokens, ``vertical_size = max(1, round_half_up(0.2 * total))``,
            ``slash_size = max(1, round_half_up(0.8 * total))`` (:func:`adaptive_sizes`).
        last_q: estimation queries (default 64).
        block_size: query block size and range length (default 64).
        causal: causal attention (default True).

    Returns:
        ``VerticalSlashIndex`` (int32, ``-1`` padded): ranges width ``min(2 * slash_size, nk)``,
        columns width ``vertical_size`` (after forcing and clamping; the largest over heads), fixed
        by shapes (no host sync).

    Example:
        >>> q, k = torch.randn(1, 2, 500, 32), torch.randn(1, 1, 500, 32)
        >>> idx = minference_select(q, k, vertical_size=40, slash_size=120)
        >>> idx.range_starts.shape, idx.columns.shape
        (torch.Size([1, 2, 8, 8]), torch.Size([1, 2, 8, 40]))
    """
    B, Hq, Hkv, Lq, Lk, D = check_qk(q, k, "minference_select")
    for name, value in (("last_q", last_q), ("block_size", block_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"minference_select: {name} must be a positive int, got {value!r}")
    try:
        if adaptive_budget is not None:
            vertical_size, slash_size = adaptive_sizes(adaptive_budget, Lk)
        v_sizes = per_head_sizes("vertical_size", vertical_size, Hq)
        s_sizes = per_head_sizes("slash_size", slash_size, Hq)
    except ValueError as err:
        raise ValueError(f"minference_select: {err}") from err
    vertical, slash, min_offset = last_query_scores(q, k, min(last_q, Lq), causal)
    if len(set(v_sizes)) == 1 and len(set(s_sizes)) == 1:
        return vertical_slash_index_from_scores(vertical, slash, min_offset, vertical_size=v_sizes[0],
                                                slash_size=s_sizes[0], q_len=Lq, k_len=Lk, block_size=block_size,
                                                causal=causal)
    # Per-head sizes: the oracle builds each head alone and pads to the widest (a loop is fine here).
    parts = [vertical_slash_index_from_scores(vertical[:, h:h + 1], slash[:, h:h + 1], min_offset,
                                              vertical_size=v_sizes[h], slash_size=s_sizes[h], q_len=Lq, k_len=Lk,
                                              block_size=block_size, causal=causal) for h in range(Hq)]
    width_r = max(p.range_starts.shape[-1] for p in parts)
    width_c = max(p.columns.shape[-1] for p in parts)

    def pad(t, width):
        return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=-1)

    return VerticalSlashIndex(torch.cat([pad(p.range_starts, width_r) for p in parts], 1),
                              torch.cat([p.range_counts for p in parts], 1),
                              torch.cat([pad(p.columns, width_c) for p in parts], 1),
                              torch.cat([p.column_counts for p in parts], 1), block_size, block_size, Lq, Lk)


def vertical_slash_index_from_scores(vertical: torch.Tensor, slash: torch.Tensor, min_offset: int, *,
                                     vertical_size: int, slash_size: int, q_len: int, k_len: int, block_size: int,
                                     causal: bool = True) -> VerticalSlashIndex:
    """Steps 2-5 of :func:`minference_select`: top keys and offsets -> key ranges and columns per query block.

    Args:
        vertical: `[B, H, Lk]` column scores; slash: `[B, H, n_off]` scores of the offsets
            ``a + min_offset`` (as :func:`last_query_scores` returns them). Not modified.
        min_offset: the offset of ``slash[..., 0]`` (0 when causal).
        vertical_size, slash_size: sizes before forcing and clamping (:func:`selection_sizes`).
        q_len, k_len, block_size, causal: as in :func:`minference_select`.

    Step 4, ranges: per query block (rows with absolute positions ``p0..p1``), slash ``o`` covers
    keys ``p0-o .. p1-o`` and becomes the range ``[max(p1 - o - bs + 1, 0), +bs)``; slashes that
    reach no key in ``[0, Lk)`` are dropped. Merging: taking ranges by ascending start, a cluster
    continues while the gap to the previous range is below ``bs`` (starts differ by ``< 2*bs``); a
    cluster starting at ``A`` is tiled on the grid ``A + m*bs`` by every grid tile that some of its
    ranges overlaps (tiles starting ``>= Lk`` dropped). Result: non-overlapping, ascending ranges
    of ``bs`` keys covering every slash range (possibly a little more).
    Step 5, columns: verticals inside a range of that query block, and (causal) verticals after
    its last row, are dropped; the rest are ``columns`` (ascending).

    Example:
        >>> vertical, slash = torch.rand(1, 1, 300), torch.rand(1, 1, 300)
        >>> idx = vertical_slash_index_from_scores(vertical, slash, 0, vertical_size=40, slash_size=110,
        ...                                        q_len=300, k_len=300, block_size=64)
        >>> idx.columns.shape
        torch.Size([1, 1, 5, 40])
    """
    B, Hq, Lk = vertical.shape
    if Lk != k_len:
        raise ValueError(f"vertical has {Lk} keys, expected k_len = {k_len}")
    bs, device, Lq = block_size, vertical.device, q_len
    n_off = slash.shape[-1]
    vertical, slash = vertical.clone(), slash.clone()
    vertical[..., :FORCED_VERTICALS] = float("inf")
    slash[..., -min_offset:FORCED_SLASHES - min_offset] = float("inf")  # offsets 0..99
    nv, ns = selection_sizes(vertical_size, slash_size, Lk, n_off)
    v_keys = torch.sort(_top_positions(vertical, nv), dim=-1).values[:, :, None, :]  # [B, H, 1, nv]
    # Descending offsets give ascending range starts in every query block.
    s_offsets = torch.sort(_top_positions(slash, ns) + min_offset, dim=-1, descending=True).values[:, :, None, :]

    nq, nk = cdiv(Lq, bs), cdiv(Lk, bs)
    # Each range adds at most two tiles, and at most nk tile starts fit in [0, Lk) spaced >= bs.
    width_r, big = min(2 * ns, nk), Lk + 2 * bs
    range_starts = torch.empty(B, Hq, nq, width_r, dtype=torch.int32, device=device)
    columns = torch.empty(B, Hq, nq, nv, dtype=torch.int32, device=device)
    range_counts = torch.empty(B, Hq, nq, dtype=torch.int32, device=device)
    column_counts = torch.empty(B, Hq, nq, dtype=torch.int32, device=device)
    # About ten int64 temporaries of [B, H, chunk, 2*ns] live at once: keep them small.
    blocks_per_chunk = max(1, CHUNK_ELEMENTS // (16 * B * Hq * max(ns, nv)))
    for qb0 in range(0, nq, blocks_per_chunk):
        qb1 = min(nq, qb0 + blocks_per_chunk)
        rows = torch.arange(qb0, qb1, device=device)
        p0 = ((Lk - Lq) + rows * bs)[:, None]  # [c, 1] first / last absolute row position
        p1 = ((Lk - Lq) + torch.clamp((rows + 1) * bs, max=Lq) - 1)[:, None]
        valid = (p1 - s_offsets >= 0) & (p0 - s_offsets <= Lk - 1)  # [B, H, c, ns]
        start = (p1 - s_offsets - bs + 1).clamp_min(0)
        # Merge into clusters: a new cluster starts where the gap to the previous range is >= bs
        # (starts differ by >= 2*bs). Tiles sit on the cluster's grid A, A+bs, ...; a grid tile is
        # kept when some range of the cluster touches it. A cluster's last tile ends by its last
        # start + 2*bs - 1, before the next cluster starts, so tiles never overlap. (MInference's
        # greedy merge is sequential; this one may spend a tile more where ranges straddle the grid.)
        prev_start = torch.cat([start[..., :1], start[..., :-1]], dim=-1)
        prev_valid = torch.cat([torch.zeros_like(valid[..., :1]), valid[..., :-1]], dim=-1)
        new_cluster = valid & (~prev_valid | (start - prev_start >= 2 * bs))
        anchor = torch.cummax(torch.where(new_cluster, start, torch.full_like(start, -1)), dim=-1).values
        first_tile = (start - anchor) // bs  # grid tiles touched by this range: first_tile..last_tile
        last_tile = (start + bs - 1 - anchor) // bs
        prev_last = torch.cat([torch.full_like(last_tile[..., :1], -1), last_tile[..., :-1]], dim=-1)
        prev_last = torch.where(new_cluster, torch.full_like(prev_last, -1), prev_last)
        emit_first = valid & (first_tile > prev_last)
        emit_last = valid & (last_tile > first_tile) & (last_tile > prev_last)
        tile = torch.cat([anchor + first_tile * bs, anchor + last_tile * bs], dim=-1)
        emit = torch.cat([emit_first, emit_last], dim=-1) & (tile < Lk)  # tiles past Lk cover nothing
        starts = torch.sort(torch.where(emit, tile, torch.full_like(tile, big)), dim=-1).values
        starts = starts[..., :width_r]
        range_starts[:, :, qb0:qb1] = torch.where(starts < big, starts, torch.full_like(starts, -1)).to(torch.int32)
        range_counts[:, :, qb0:qb1] = emit.sum(-1, dtype=torch.int32)

        # Vertical j is inside the last range starting at or before it, if any.
        keys = v_keys.expand(B, Hq, qb1 - qb0, nv).contiguous()
        slot = torch.searchsorted(starts.contiguous(), keys, right=True) - 1
        last_start = starts.gather(-1, slot.clamp_min(0))
        covered = (slot >= 0) & (keys < last_start + bs)
        keep = ~covered & (keys <= p1) if causal else ~covered
        cols = torch.sort(torch.where(keep, keys, torch.full_like(keys, big)), dim=-1).values
        columns[:, :, qb0:qb1] = torch.where(cols < big, cols, torch.full_like(cols, -1)).to(torch.int32)
        column_counts[:, :, qb0:qb1] = keep.sum(-1, dtype=torch.int32)
    return VerticalSlashIndex(range_starts, range_counts, columns, column_counts, bs, bs, Lq, Lk)


def a_shape_select(q_len: int, k_len: int, batch: int, heads: int, *, sink: int, window: int, block_size: int,
                   device=None) -> BlockIndex:
    """MInference's A-shape pattern (sink + local window), block-granular and causal.

    Same blocks as ``streaming_select(..., causal=True)``: key blocks overlapping ``[0, sink)`` or
    the window ``[pos - window + 1, pos]`` of any row of the query block, plus block 0 and diagonal.

    Example:
        >>> a_shape_select(128, 128, 1, 1, sink=4, window=8, block_size=64).counts.tolist()
        [[[1, 2]]]
    """
    return streaming_select(q_len, k_len, batch, heads, sink=sink, window=window, block_size=block_size,
                            causal=True, device=device)


def block_sparse_select(q: torch.Tensor, k: torch.Tensor, *, top_k: int, block_size: int = 64,
                        causal: bool = True) -> BlockIndex:
    """MInference's block_sparse pattern: top-k key blocks per query block by pooled scores.

    Scores are ``mean(q block) . mean(k block) / sqrt(D)`` (means over each block's valid rows);
    among the allowed (causal) blocks, the ``top_k`` highest are kept (ties: lower block first),
    then key block 0 and the diagonal blocks are added, so a row keeps at most ``top_k + 3``.

    Args:
        q: `[B, Hq, Lq, D]`; k: `[B, Hkv, Lk, D]` with ``Hq % Hkv == 0``.
        top_k: key blocks per query block (MInference uses 100).
        block_size: query and key block size (default 64).
        causal: causal attention (default True).

    Example:
        >>> q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
        >>> block_sparse_select(q, k, top_k=1, block_size=64).counts.max().item() <= 3
        True
    """
    B, Hq, Hkv, Lq, Lk, D = check_qk(q, k, "block_sparse_select")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"block_sparse_select: top_k must be a non-negative int, got {top_k!r}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_sparse_select: block_size must be a positive int, got {block_size!r}")
    bs, G, device = block_size, Hq // Hkv, q.device
    nq, nk = cdiv(Lq, bs), cdiv(Lk, bs)
    q_pool = block_mean_pool(q, bs).reshape(B, Hkv, G, nq, D)
    k_pool_t = block_mean_pool(k, bs).transpose(-1, -2)
    allowed = causal_block_mask(Lq, Lk, bs, bs, causal, device=device)
    forced = forced_block_mask(Lq, Lk, bs, causal, device=device)
    mask = torch.empty(B, Hq, nq, nk, dtype=torch.bool, device=device)
    blocks_per_chunk = max(1, CHUNK_ELEMENTS // (B * Hq * nk))
    for qb0 in range(0, nq, blocks_per_chunk):
        qb1 = min(nq, qb0 + blocks_per_chunk)
        c = qb1 - qb0
        scores = torch.matmul(q_pool[:, :, :, qb0:qb1].reshape(B, Hkv, G * c, D), k_pool_t) / math.sqrt(D)
        scores = scores.view(B, Hq, c, nk).masked_fill(~allowed[qb0:qb1], float("-inf"))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        top = torch.zeros(B, Hq, c, nk, dtype=torch.bool, device=device)
        top.scatter_(-1, order, (torch.arange(nk, device=device) < top_k).expand(B, Hq, c, nk))
        mask[:, :, qb0:qb1] = (top & allowed[qb0:qb1]) | forced[qb0:qb1]
    return BlockIndex.from_mask(mask, block_q=bs, block_k=bs, q_len=Lq, k_len=Lk, max_k=nk)
