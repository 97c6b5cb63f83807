"""Reference FlexPrefill selector (Lai et al. 2025), fp32 pure PyTorch."""

from __future__ import annotations

import math

import torch

from sparseattn.index import BlockIndex, causal_block_mask, cdiv
from sparseattn.reference.minference import block_mean_pool, last_query_scores
from sparseattn.reference.streaming import forced_block_mask
from sparseattn.reference.xattention import CHUNK_ELEMENTS, check_qk, keep_until_covered

__all__ = ["flexprefill_select"]


def _sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sqrt(JS(p || q))`` over the last dim, with ``0 log 0 = 0`` (the reference yields NaN there)."""
    m = (p + q) / 2

    def kl_to_m(x):
        return torch.where(x > 0, x * torch.log(x / m), torch.zeros((), device=x.device)).sum(-1)

    return torch.sqrt((0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)).clamp_min(0))


def _cover_count(mass: torch.Tensor, gamma: float) -> torch.Tensor:
    """Smallest count of largest entries whose sum reaches ``gamma`` (all of them when ``gamma >= 1``)."""
    n = mass.shape[-1]
    if gamma >= 1:
        return torch.full(mass.shape[:-1], n, dtype=torch.int64, device=mass.device)
    cum = torch.cumsum(torch.sort(mass, dim=-1, descending=True).values, dim=-1)
    return ((cum < gamma).sum(-1) + 1).clamp_max(n)


def _top_mask(score: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """bool: the ``count[...]`` largest entries of each row (ties: lower index first)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(score.shape[-1], device=score.device) < count[..., None]
    return torch.zeros_like(ranks).scatter(-1, order, ranks)


def flexprefill_select(q: torch.Tensor, k: torch.Tensor, *, gamma: float = 0.9, tau: float = 0.1,
                       min_budget: int | None = None, max_budget: int | None = None, block_size: int = 64,
                       sparsity_ratio: float | None = None, causal: bool = True, return_patterns: bool = False):
    """FlexPrefill block selection: per head, a query-aware or a vertical-slash pattern.

    1. ``q_hat`` = the last ``min(block_size, Lq)`` queries; exact fp32 softmax over all keys
       (causal: keys ``<=`` each query's absolute position). ``vertical[j]`` = mean probability of
       key ``j``; ``slash[o]`` = probability on offset ``o = query_pos - key_pos``, summed over the
       diagonal and divided by the number of ``q_hat`` rows.
    2. Pattern: ``softmax(mean(q_hat) . mean-pooled K / sqrt(D))`` over key blocks vs. the block sums
       of ``vertical``; ``sqrt(JS) < tau`` makes a **query-aware** head (``tau = 0``: none).
    3. Vertical-slash part (every head): ``n_v`` / ``n_s`` = the smallest number of largest token
       verticals / slash offsets whose mass reaches ``gamma`` (all when ``gamma >= 1``), clamped to
       ``[min_budget, max_budget]`` tokens (None = no bound) and to what exists; query-aware heads
       use ``min_budget`` (0 if None) instead. A selected vertical at key ``j`` keeps key block
       ``j // bs`` in every query block allowed to see it; a selected slash ``o`` keeps, in query
       block ``qb``, every key block holding a position ``p - o`` for a row position ``p`` of ``qb``.
    4. Query-aware heads also keep, per query-block row, blocks of ``softmax(mean-pooled Q .
       mean-pooled K / sqrt(D))`` (over the allowed blocks) by descending score while the mass
       before them is ``< gamma`` (the crossing block is kept; ``gamma >= 1`` keeps all).
    5. Always key block 0 and the diagonal blocks; with ``causal`` only causal blocks.
    6. ``sparsity_ratio``: each row keeps at most ``max(ceil(sparsity_ratio * allowed blocks in
       the row), forced blocks)``: the forced blocks, then the other selected blocks with the highest
       pooled score of step 4 (ties: lower block first). The ceil is taken in float64.

    Deviations from the public reference (ByteDance-Seed/FlexPrefill), on purpose:
    - Counts and budgets stay in tokens and select token verticals / offsets, mapped to blocks
      as in step 3; the reference turns counts into blocks with a hard-coded ``// 128 + 1`` and
      picks top pooled blocks. Hence ``max_budget`` bounds selected verticals and slashes (each),
      not blocks: a row keeps at most ``max_budget`` vertical blocks and ``2 * max_budget`` slash
      blocks besides the forced ones.
    - Query-aware selection is per query-block row (the reference covers ``gamma * nq`` over the
      flattened matrix, starving some rows) and keeps the crossing block (reference: ``<=``).
    - Batch > 1, GQA without repeating K, ``Lq < Lk``, non-causal, any block size; no dense
      fallback for short inputs (the reference runs dense attention below ``2 * block_size``).
    - JS divergence treats ``0 log 0`` as 0.

    Args:
        q: `[B, Hq, Lq, D]` queries (the last ``Lq`` positions); k: `[B, Hkv, Lk, D]`, ``Hq % Hkv == 0``.
        gamma: coverage in (0, 1] (default 0.9).
        tau: JS threshold for query-aware heads, >= 0 (default 0.1).
        min_budget: minimum verticals and slashes per head, in tokens (default None: no minimum).
        max_budget: maximum verticals and slashes per head, in tokens (default None: no maximum).
        block_size: query and key block size (default 64).
        sparsity_ratio: optional cap in (0, 1] on the fraction of allowed blocks a row keeps.
        causal: causal attention (default True).
        return_patterns: also return the `[B, Hq]` bool tensor, True = query-aware head.

    Returns:
        ``BlockIndex`` (``max_k = nk``), or ``(BlockIndex, query_aware [B, Hq])``.

    Example:
        >>> q, k = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32)
        >>> idx, query_aware = flexprefill_select(q, k, block_size=64, return_patterns=True)
        >>> idx.indices.shape, query_aware.shape
        (torch.Size([1, 4, 5, 5]), torch.Size([1, 4]))
    """
    B, Hq, Hkv, Lq, Lk, D = check_qk(q, k, "flexprefill_select")
    if not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"flexprefill_select: gamma must be in (0, 1], got {gamma!r}")
    if not isinstance(tau, (int, float)) or not tau >= 0:
        raise ValueError(f"flexprefill_select: tau must be >= 0, got {tau!r}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"flexprefill_select: block_size must be a positive int, got {block_size!r}")
    for name, value in (("min_budget", min_budget), ("max_budget", max_budget)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"flexprefill_select: {name} must be None or a non-negative int, got {value!r}")
    if min_budget is not None and max_budget is not None and min_budget > max_budget:
        raise ValueError(f"flexprefill_select: min_budget ({min_budget}) > max_budget ({max_budget})")
    if sparsity_ratio is not None and not (isinstance(sparsity_ratio, (int, float)) and 0 < sparsity_ratio <= 1):
        raise ValueError(f"flexprefill_select: sparsity_ratio must be None or in (0, 1], got {sparsity_ratio!r}")
    bs, G, device = block_size, Hq // Hkv, q.device
    nq, nk = cdiv(Lq, bs), cdiv(Lk, bs)
    n_hat = min(bs, Lq)

    # Steps 1-2: token vertical / slash distributions of q_hat, and the pattern decision.
    vertical, slash, min_offset = last_query_scores(q, k, n_hat, causal)
    vertical, slash = vertical / n_hat, slash / n_hat
    n_off = slash.shape[-1]
    k_pool = block_mean_pool(k, bs)  # [B, Hkv, nk, D]
    q_hat_mean = q[:, :, Lq - n_hat:].float().mean(2).reshape(B, Hkv, G, D)
    estimate = torch.softmax(torch.matmul(q_hat_mean, k_pool.transpose(-1, -2)) / math.sqrt(D), dim=-1)
    vertical_blocks = torch.nn.functional.pad(vertical, (0, nk * bs - Lk)).view(B, Hq, nk, bs).sum(-1)
    query_aware = _sqrt_js_divergence(estimate.reshape(B, Hq, nk), vertical_blocks) < tau

    # Step 3: how many token verticals / slashes, and which.
    counts = []
    for mass in (vertical, slash):
        n = _cover_count(mass, gamma)
        if min_budget is not None:
            n = n.clamp_min(min_budget)
        if max_budget is not None:
            n = n.clamp_max(max_budget)
        n = torch.where(query_aware, torch.full_like(n, min_budget or 0), n)
        counts.append(n.clamp(0, mass.shape[-1]))
    v_selected = _top_mask(vertical, counts[0])  # [B, Hq, Lk]
    s_selected = _top_mask(slash, counts[1])  # [B, Hq, n_off]
    v_block_cols = torch.nn.functional.pad(v_selected, (0, nk * bs - Lk)).view(B, Hq, nk, bs).any(-1)
    # Prefix counts of selected offsets answer "any selected offset in [lo, hi]" per block pair.
    s_prefix = torch.nn.functional.pad(torch.cumsum(s_selected, dim=-1), (1, 0))  # [B, Hq, n_off + 1]

    allowed = causal_block_mask(Lq, Lk, bs, bs, causal, device=device)
    forced = forced_block_mask(Lq, Lk, bs, causal, device=device)
    q_pool = block_mean_pool(q, bs).reshape(B, Hkv, G, nq, D)
    key_first = torch.arange(nk, device=device) * bs
    key_last = torch.clamp(key_first + bs, max=Lk) - 1
    mask = torch.empty(B, Hq, nq, nk, dtype=torch.bool, device=device)
    blocks_per_chunk = max(1, CHUNK_ELEMENTS // (4 * B * Hq * nk))
    for qb0 in range(0, nq, blocks_per_chunk):
        qb1 = min(nq, qb0 + blocks_per_chunk)
        c = qb1 - qb0
        rows = torch.arange(qb0, qb1, device=device)
        row_first = (Lk - Lq) + rows * bs
        row_last = (Lk - Lq) + torch.clamp((rows + 1) * bs, max=Lq) - 1
        # Offsets whose diagonal passes through block (qb, kb): [row_first - key_last, row_last - key_first].
        lo = (row_first[:, None] - key_last[None, :] - min_offset).clamp(0, n_off).reshape(1, 1, -1)
        hi = (row_last[:, None] - key_first[None, :] - min_offset + 1).clamp(0, n_off).reshape(1, 1, -1)
        slash_hit = (s_prefix.gather(-1, hi.expand(B, Hq, -1)) > s_prefix.gather(-1, lo.expand(B, Hq, -1)))
        chunk_allowed, chunk_forced = allowed[qb0:qb1], forced[qb0:qb1]
        keep = (v_block_cols[:, :, None, :] | slash_hit.view(B, Hq, c, nk)) & chunk_allowed

        # Step 4: per-row coverage of pooled block scores, for query-aware heads.
        scores = torch.matmul(q_pool[:, :, :, qb0:qb1].reshape(B, Hkv, G * c, D), k_pool.transpose(-1, -2))
        scores = (scores.view(B, Hq, c, nk) / math.sqrt(D)).masked_fill(~chunk_allowed, float("-inf"))
        pooled = torch.softmax(scores, dim=-1)
        covered = keep_until_covered(pooled, chunk_allowed, None, gamma)
        keep = (keep | (covered & query_aware[:, :, None, None])) & ~chunk_forced

        if sparsity_ratio is not None:
            cap = torch.ceil(sparsity_ratio * chunk_allowed.sum(-1).double()).long()
            room = (cap - chunk_forced.sum(-1)).clamp_min(0)  # [c]
            order = torch.sort(torch.where(keep, pooled, torch.full_like(pooled, -1.0)), dim=-1,
                               descending=True, stable=True).indices
            in_budget = torch.arange(nk, device=device) < room[:, None]  # [c, nk], by rank
            keep = keep & torch.zeros_like(keep).scatter(-1, order, in_budget.expand(B, Hq, c, nk))
        mask[:, :, qb0:qb1] = keep | chunk_forced
    index = BlockIndex.from_mask(mask, block_q=bs, block_k=bs, q_len=Lq, k_len=Lk, max_k=nk)
    return (index, query_aware) if return_patterns else index
