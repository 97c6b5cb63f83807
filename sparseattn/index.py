"""The one block-index format that every selector produces and every kernel consumes.

Coordinates. Queries are the *last* ``q_len`` positions of a ``k_len``-long sequence: query row
``i`` sits at absolute position ``k_len - q_len + i``. Query blocks are cut from the query rows
(``i // block_q``); key blocks from absolute key positions (``j // block_k``). The last block of
each side may be partial. Causal means ``key_pos <= query_pos``.

``BlockIndex`` is query-major and padded:

- ``indices [B, H, nq, max_k] int32``: the key blocks each query block attends to, valid entries
  first and ascending, padding ``-1``;
- ``counts [B, H, nq] int32``: how many entries of each row are valid.

``H`` is the number of *query* heads: selection is per query head, and the kernel maps each query
head to its KV head (GQA) without repeating K/V.

``KeyMajorIndex`` is the transpose (for each key block, the query blocks that read it), which the
backward pass uses to accumulate dK/dV without atomics.

``VerticalSlashIndex`` is MInference's token-granular form: per query block, key *ranges* of
``block_k`` tokens starting anywhere (slashes, merged) plus gathered key *columns* (verticals not
covered by the ranges).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BlockIndex",
    "KeyMajorIndex",
    "VerticalSlashIndex",
    "causal_block_mask",
    "cdiv",
    "diagonal_block_range",
]


def cdiv(a: int, b: int) -> int:
    """Ceiling division: the number of blocks of size ``b`` covering ``a`` items."""
    return -(-a // b)


def diagonal_block_range(q_len: int, k_len: int, block_q: int, block_k: int, device=None):
    """Key blocks holding each query block's own positions: ``(first [nq], last [nq])`` int64.

    Query block ``i`` covers absolute positions ``off + i*block_q .. off + min((i+1)*block_q, q_len) - 1``
    with ``off = k_len - q_len``; its diagonal blocks are the key blocks containing those positions.
    Keeping them guarantees every query row sees at least its own key, so no row is empty.
    """
    nq = cdiv(q_len, block_q)
    off = k_len - q_len
    rows = torch.arange(nq, device=device, dtype=torch.int64)
    first_pos = off + rows * block_q
    last_pos = off + torch.clamp((rows + 1) * block_q, max=q_len) - 1
    return first_pos // block_k, last_pos // block_k


def causal_block_mask(q_len: int, k_len: int, block_q: int, block_k: int, causal: bool = True, device=None):
    """``[nq, nk]`` bool: blocks holding at least one allowed (query, key) pair."""
    nq, nk = cdiv(q_len, block_q), cdiv(k_len, block_k)
    if not causal:
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    _, last = diagonal_block_range(q_len, k_len, block_q, block_k, device=device)
    cols = torch.arange(nk, device=device, dtype=torch.int64)
    return cols[None, :] <= last[:, None]


def _pack_rows(mask: torch.Tensor, max_count: int | None = None):
    """bool ``[..., n]`` -> (indices ``[..., m]`` int32 ascending, -1 padded; counts ``[...]`` int32)."""
    n = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    width = int(counts.max().item()) if max_count is None and counts.numel() else (max_count or 0)
    width = max(width, 1)
    cols = torch.arange(n, device=mask.device, dtype=torch.int32).expand(mask.shape)
    # Selected columns keep their index, the rest sort to the end with a key of n.
    keys = torch.where(mask, cols, torch.full_like(cols, n))
    order = torch.sort(keys, dim=-1, stable=True).values[..., :width]
    indices = torch.where(order < n, order, torch.full_like(order, -1))
    if width > n:  # more slots than columns: pad
        pad = torch.full((*mask.shape[:-1], width - n), -1, dtype=torch.int32, device=mask.device)
        indices = torch.cat([indices, pad], dim=-1)
    return indices.to(torch.int32).contiguous(), counts.contiguous()


def _unpack_rows(indices: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    width = indices.shape[-1]
    valid = torch.arange(width, device=indices.device) < counts.unsqueeze(-1)
    # Padding goes to a spare column n that is cut off: scattering it onto a real column would
    # race with (and on CPU overwrite) a valid entry there, e.g. block 0.
    safe = torch.where(valid, indices.long(), torch.full_like(indices, n, dtype=torch.long))
    mask = torch.zeros((*indices.shape[:-1], n + 1), dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, safe, valid)
    return mask[..., :n]


@dataclass(frozen=True)
class BlockIndex:
    """Query-major padded block-sparse index (see module docstring).

    Args:
        indices: `[B, H, nq, max_k]` int32, valid key blocks first and ascending, padding -1.
        counts: `[B, H, nq]` int32, valid entries per row.
        block_q: query rows per block.
        block_k: key positions per block.
        q_len: number of queries (the last `q_len` of the `k_len` positions).
        k_len: number of keys.

    Example:
        >>> import torch
        >>> from sparseattn.index import BlockIndex
        >>> mask = torch.tensor([[[[True, False], [True, True]]]])
        >>> idx = BlockIndex.from_mask(mask, block_q=64, block_k=64, q_len=100, k_len=100)
        >>> idx.counts.tolist()
        [[[1, 2]]]
        >>> bool((idx.to_mask() == mask).all())
        True
    """

    indices: torch.Tensor
    counts: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int

    def __post_init__(self):
        if self.indices.dim() != 4 or self.counts.dim() != 3:
            raise ValueError(
                f"BlockIndex: indices must be [B, H, nq, max_k] and counts [B, H, nq]; "
                f"got {tuple(self.indices.shape)} and {tuple(self.counts.shape)}"
            )
        if self.indices.dtype != torch.int32 or self.counts.dtype != torch.int32:
            raise TypeError(
                f"BlockIndex: indices and counts must be int32, got {self.indices.dtype} and {self.counts.dtype}"
            )
        if tuple(self.indices.shape[:3]) != tuple(self.counts.shape):
            raise ValueError(
                f"BlockIndex: indices {tuple(self.indices.shape)} and counts {tuple(self.counts.shape)} disagree on [B, H, nq]"
            )
        for name in ("block_q", "block_k", "q_len", "k_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockIndex: {name} must be a positive int, got {value!r}")
        if self.q_len > self.k_len:
            raise ValueError(f"BlockIndex: q_len ({self.q_len}) must be <= k_len ({self.k_len})")
        if self.indices.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"BlockIndex: nq = {self.indices.shape[2]} but ceil(q_len / block_q) = {self.num_q_blocks}"
            )

    # ---- shape facts -------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return cdiv(self.q_len, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return cdiv(self.k_len, self.block_k)

    @property
    def batch(self) -> int:
        return self.indices.shape[0]

    @property
    def num_heads(self) -> int:
        return self.indices.shape[1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_mask(cls, mask: torch.Tensor, *, block_q: int, block_k: int, q_len: int, k_len: int,
                  max_k: int | None = None) -> "BlockIndex":
        """Build from a dense `[B, H, nq, nk]` bool block mask.

        ``max_k`` fixes the padded width (no host sync); by default it is the widest row, which
        reads one number back from the device.
        """
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError(f"mask must be a [B, H, nq, nk] bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        nq, nk = cdiv(q_len, block_q), cdiv(k_len, block_k)
        if tuple(mask.shape[2:]) != (nq, nk):
            raise ValueError(f"mask has blocks {tuple(mask.shape[2:])}, expected (nq, nk) = {(nq, nk)}")
        indices, counts = _pack_rows(mask, max_k)
        return cls(indices, counts, block_q, block_k, q_len, k_len)

    @classmethod
    def dense(cls, batch: int, num_heads: int, q_len: int, k_len: int, block_q: int, block_k: int,
              causal: bool = True, device=None) -> "BlockIndex":
        """Every allowed block (all causal blocks when ``causal``): the index of dense attention."""
        allowed = causal_block_mask(q_len, k_len, block_q, block_k, causal, device=device)
        nk = allowed.shape[1]
        mask = allowed.expand(batch, num_heads, *allowed.shape)
        return cls.from_mask(mask, block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, max_k=nk)

    # ---- conversion --------------------------------------------------------------------------
    def to_mask(self) -> torch.Tensor:
        """Dense `[B, H, nq, nk]` bool block mask."""
        return _unpack_rows(self.indices, self.counts, self.num_k_blocks)

    def to_element_mask(self, causal: bool = True) -> torch.Tensor:
        """`[B, H, q_len, k_len]` bool: which (query, key) pairs the kernel computes. Small shapes only."""
        blocks = self.to_mask()
        rows = torch.arange(self.q_len, device=self.device) // self.block_q
        cols = torch.arange(self.k_len, device=self.device) // self.block_k
        elem = blocks[:, :, rows][:, :, :, cols]
        if causal:
            qpos = torch.arange(self.q_len, device=self.device) + (self.k_len - self.q_len)
            kpos = torch.arange(self.k_len, device=self.device)
            elem = elem & (kpos[None, :] <= qpos[:, None])
        return elem

    def transpose(self) -> "KeyMajorIndex":
        """Key-major form: for each key block, the query blocks that read it (ascending)."""
        mask = self.to_mask().transpose(-1, -2)
        indices, counts = _pack_rows(mask, self.num_q_blocks)
        return KeyMajorIndex(indices, counts, self.block_q, self.block_k, self.q_len, self.k_len)

    def to_block_mask(self, num_kv_heads: int | None = None, causal: bool = True):
        """FlexAttention ``BlockMask`` over the same blocks, with the causal element mask.

        With ``causal``, blocks strictly below each row's diagonal blocks need no element mask:
        they are passed as FlexAttention's *full* blocks (a prefix of each ascending row), the
        rest as partial blocks that get the causal ``mask_mod`` (bottom-right aligned when
        ``q_len < k_len``). FlexAttention masks the partial last blocks itself via ``seq_lengths``.
        """
        from torch.nn.attention.flex_attention import BlockMask

        offset = self.k_len - self.q_len

        def causal_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        nk = self.num_k_blocks
        indices = torch.where(self.indices < 0, torch.zeros_like(self.indices), self.indices)
        if indices.shape[-1] < nk:  # FlexAttention sizes its transpose from this width
            indices = torch.nn.functional.pad(indices, (0, nk - indices.shape[-1]))
        if not causal:
            return BlockMask.from_kv_blocks(self.counts, indices, BLOCK_SIZE=(self.block_q, self.block_k),
                                            seq_lengths=(self.q_len, self.k_len))
        first, _ = diagonal_block_range(self.q_len, self.k_len, self.block_q, self.block_k, device=self.device)
        # Full blocks end before the first diagonal block and before a partial last key block.
        full_limit = torch.clamp(first, max=self.k_len // self.block_k)  # [nq]
        valid = torch.arange(indices.shape[-1], device=self.device) < self.counts.unsqueeze(-1)
        n_full = (valid & (indices < full_limit[:, None])).sum(-1, dtype=torch.int32)  # [B, H, nq]
        shift = torch.arange(nk, device=self.device) + n_full.unsqueeze(-1).long()
        partial = torch.gather(indices, -1, shift.clamp(max=nk - 1))
        return BlockMask.from_kv_blocks(
            (self.counts - n_full).contiguous(), partial.to(torch.int32).contiguous(),
            full_kv_num_blocks=n_full.contiguous(), full_kv_indices=indices.contiguous(),
            BLOCK_SIZE=(self.block_q, self.block_k), mask_mod=causal_mod, seq_lengths=(self.q_len, self.k_len),
        )

    def density(self, causal: bool = True) -> torch.Tensor:
        """`[B, H]` float: kept blocks / allowed blocks (causal blocks when ``causal``)."""
        allowed = causal_block_mask(self.q_len, self.k_len, self.block_q, self.block_k, causal, device=self.device)
        return self.counts.sum(-1).float() / allowed.sum().float()

    def to(self, device) -> "BlockIndex":
        return BlockIndex(self.indices.to(device), self.counts.to(device), self.block_q, self.block_k,
                          self.q_len, self.k_len)


@dataclass(frozen=True)
class KeyMajorIndex:
    """Transpose of a ``BlockIndex``: `indices [B, H, nk, max_q]` (query blocks, ascending, -1 padded), `counts [B, H, nk]`."""

    indices: torch.Tensor
    counts: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int

    def to_mask(self) -> torch.Tensor:
        """Dense `[B, H, nk, nq]` bool mask (key-major)."""
        return _unpack_rows(self.indices, self.counts, cdiv(self.q_len, self.block_q))


@dataclass(frozen=True)
class VerticalSlashIndex:
    """MInference's token-granular index, per query block of ``block_q`` rows.

    Args:
        range_starts: `[B, H, nq, max_r]` int32, absolute start position of each key range
            (ascending, non-overlapping; each covers ``block_k`` keys, clipped to ``k_len``); -1 padded.
        range_counts: `[B, H, nq]` int32.
        columns: `[B, H, nq, max_c]` int32, absolute key positions outside every range, ascending; -1 padded.
        column_counts: `[B, H, nq]` int32.
    """

    range_starts: torch.Tensor
    range_counts: torch.Tensor
    columns: torch.Tensor
    column_counts: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int

    def to_element_mask(self, causal: bool = True) -> torch.Tensor:
        """`[B, H, q_len, k_len]` bool of the pairs the index computes. Small shapes only."""
        B, H, nq, max_r = self.range_starts.shape
        device = self.range_starts.device
        kpos = torch.arange(self.k_len, device=device)
        r_valid = torch.arange(max_r, device=device) < self.range_counts.unsqueeze(-1)  # [B,H,nq,R]
        starts = self.range_starts.long().unsqueeze(-1)  # [B,H,nq,R,1]
        in_range = (kpos >= starts) & (kpos < starts + self.block_k) & r_valid.unsqueeze(-1)
        block_mask = in_range.any(-2)  # [B,H,nq,Lk]
        max_c = self.columns.shape[-1]
        c_valid = torch.arange(max_c, device=device) < self.column_counts.unsqueeze(-1)
        # Padding scatters into a spare column (cut off) so it never overwrites a real column.
        safe = torch.where(c_valid, self.columns.long(), torch.full_like(self.columns, self.k_len, dtype=torch.long))
        col_mask = torch.zeros((B, H, nq, self.k_len + 1), dtype=torch.bool, device=device)
        col_mask.scatter_(-1, safe, c_valid)
        col_mask = col_mask[..., : self.k_len]
        block_mask = block_mask | col_mask
        rows = torch.arange(self.q_len, device=device) // self.block_q
        elem = block_mask[:, :, rows]
        if causal:
            qpos = torch.arange(self.q_len, device=device) + (self.k_len - self.q_len)
            elem = elem & (kpos[None, :] <= qpos[:, None])
        return elem

    def density(self, causal: bool = True) -> torch.Tensor:
        """`[B, H]`: computed (query, key) pairs / allowed pairs, at token granularity.

        Exact and O(nq x (ranges + columns)): per query block, a range ``[s, e]`` contributes
        ``sum_p |{k in [s, e], k <= p}|`` over the block's positions ``p``, in closed form.
        """
        device = self.range_starts.device
        nq = self.range_starts.shape[2]
        off = self.k_len - self.q_len
        qb = torch.arange(nq, device=device, dtype=torch.int64)
        p0 = (off + qb * self.block_q).view(1, 1, nq, 1)  # first / last position of each query block
        p1 = (off + torch.clamp((qb + 1) * self.block_q, max=self.q_len) - 1).view(1, 1, nq, 1)
        rows = p1 - p0 + 1

        r_valid = torch.arange(self.range_starts.shape[-1], device=device) < self.range_counts.unsqueeze(-1)
        start = self.range_starts.long().clamp_min(0)
        end = torch.clamp(start + self.block_k, max=self.k_len) - 1  # inclusive
        width = (end - start + 1).clamp_min(0)
        if causal:
            a, b = torch.maximum(p0, start), torch.minimum(p1, end)
            n_mid = (b - a + 1).clamp_min(0)  # positions inside the range: p - s + 1 keys each
            mid = n_mid * (a + b - 2 * start + 2) / 2  # sum over p in [a, b] of (p - s + 1)
            n_after = (p1 - torch.maximum(p0, end + 1) + 1).clamp_min(0)  # positions past the range
            range_pairs = mid + n_after * width
        else:
            range_pairs = (rows * width).double()
        range_pairs = torch.where(r_valid, range_pairs.double(), torch.zeros((), dtype=torch.float64, device=device))

        c_valid = torch.arange(self.columns.shape[-1], device=device) < self.column_counts.unsqueeze(-1)
        col = self.columns.long()
        col_pairs = (p1 - torch.maximum(p0, col) + 1).clamp_min(0) if causal else rows.expand_as(col)
        col_pairs = torch.where(c_valid, col_pairs.double(), torch.zeros((), dtype=torch.float64, device=device))

        total = range_pairs.sum((-1, -2)) + col_pairs.sum((-1, -2))
        Lq, Lk = self.q_len, self.k_len
        allowed = Lq * (Lk - Lq) + Lq * (Lq + 1) / 2 if causal else Lq * Lk
        return (total / allowed).float()
