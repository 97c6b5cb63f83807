"""Reference FlexPrefill selector (Lai et al., ICLR 2025), fp32 pure PyTorch.

The ground truth of the fast GPU path (``sparseattn.kernels.flexprefill``). It is split into the
same stages, so the fast path can reuse the cheap per-head decisions unchanged and replace only the
expensive stages with kernels:

1. ``last_block_distributions``: the last-block queries' exact softmax reduced to token
   ``vertical`` / ``slash`` distributions (``L x block`` work; a fused Triton kernel on the GPU);
2. ``cover_count``: the fewest largest entries covering ``gamma`` (a sort here, a bisection kernel
   on the GPU);
3. ``plan_heads``: pattern decision and vertical / slash block choices per head (tiny tensors,
   shared with the fast path);
4. ``select_rows``: the per-query-block rule that turns a head's plan into blocks (a fused
   select-and-pack kernel on the GPU).
"""

from __future__ import annotations

import math

import torch

from sparseattn.index import BlockIndex, causal_block_mask, cdiv
from sparseattn.reference.minference import block_mean_pool, last_query_scores
from sparseattn.reference.streaming import forced_block_mask
from sparseattn.reference.xattention import CHUNK_ELEMENTS, check_qk, keep_until_covered

__all__ = [
    "check_flexprefill_args",
    "cover_count",
    "flexprefill_select",
    "last_block_distributions",
    "offset_groups",
    "plan_heads",
    "select_rows",
    "sqrt_js_divergence",
    "sum_pool",
]


def sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sqrt(JS(p || q))`` over the last dim, with ``0 log 0 = 0`` (the reference yields NaN there)."""
    m = (p + q) / 2

    def kl_to_m(x):
        return torch.where(x > 0, x * torch.log(x / m), torch.zeros((), device=x.device)).sum(-1)

    return torch.sqrt((0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)).clamp_min(0))


def cover_count(mass: torch.Tensor, gamma: float) -> torch.Tensor:
    """int64 `[...]`: fewest largest entries of `mass [..., n]` whose sum reaches ``gamma``.

    ``n`` when ``gamma >= 1`` or when even all entries stay below ``gamma`` (float rounding).
    The count depends only on the sorted values, so ties cannot change it.
    """
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


def last_block_distributions(q: torch.Tensor, k: torch.Tensor, block_size: int, causal: bool = True):
    """Token ``vertical`` and ``slash`` distributions of the last ``n = min(block_size, Lq)`` queries.

    Query ``t`` of those sits at absolute position ``pos_t = Lk - n + t`` and sees keys ``<= pos_t``
    when ``causal``. With ``P`` their exact fp32 softmax (scale ``1/sqrt(D)``):
    ``vertical[j] = sum_t P[t, j] / n`` and ``slash[a] = sum_t P[t, pos_t - o] / n`` for offset
    ``o = a + min_offset``. Both sum to 1.

    Returns:
        ``(vertical [B, Hq, Lk], slash [B, Hq, n_off], min_offset)`` with ``min_offset = 0`` causal,
        ``1 - n`` otherwise, and ``n_off = Lk - min_offset``.
    """
    n = min(block_size, q.shape[2])
    vertical, slash, min_offset = last_query_scores(q, k, n, causal)
    return vertical / n, slash / n, min_offset


def offset_groups(num_keys: int, min_offset: int, block_size: int) -> tuple[int, int]:
    """``(g_min, n_groups)``: slash offsets ``[g bs, (g+1) bs)`` form group ``g`` (floor division).

    The offsets ``[min_offset, num_keys)`` of ``last_block_distributions`` fall in groups
    ``g_min .. g_min + n_groups - 1``; group ``g`` is stored at index ``g - g_min``.
    """
    g_min = min_offset // block_size
    return g_min, (num_keys - 1) // block_size - g_min + 1


def sum_pool(x: torch.Tensor, left: int, size: int, n: int) -> torch.Tensor:
    """Sums of ``size`` consecutive entries of `x [..., m]`, after ``left`` zeros in front: `[..., n]`."""
    right = n * size - left - x.shape[-1]
    return torch.nn.functional.pad(x, (left, right)).view(*x.shape[:-1], n, size).sum(-1)


def plan_heads(vertical_blocks: torch.Tensor, slash_groups: torch.Tensor, n_vertical: torch.Tensor,
               n_slash: torch.Tensor, estimate: torch.Tensor, *, tau: float, min_budget: int | None,
               max_budget: int | None, block_size: int, slash_group0: int):
    """Per-head pattern and vertical / slash choices (steps 2-3 of ``flexprefill_select``).

    Args:
        vertical_blocks: `[B, H, nk]` vertical mass per key block.
        slash_groups: `[B, H, n_groups]` slash mass per offset group.
        n_vertical, n_slash: `[B, H]` int64 token cover counts of vertical and slash.
        estimate: `[B, H, nk]` block distribution of ``mean(q_hat)`` against mean-pooled keys.
        tau, min_budget, max_budget, block_size: as in ``flexprefill_select``.
        slash_group0: index of offset group 0 (the main diagonal) in ``slash_groups``.

    Returns:
        ``(query_aware [B, H] bool, vertical_selected [B, H, nk] bool, slash_selected [B, H, n_groups] bool)``.
    """
    query_aware = sqrt_js_divergence(estimate, vertical_blocks) < tau
    floor = cdiv(min_budget, block_size) if min_budget else 0
    ceiling = cdiv(max_budget, block_size) if max_budget is not None else None
    selected = []
    for mass, tokens, first in ((vertical_blocks, n_vertical, 0), (slash_groups, n_slash, slash_group0)):
        # Tokens to blocks by ceiling division (the reference: tokens // 128 + 1, whatever the block).
        count = torch.div(tokens + block_size - 1, block_size, rounding_mode="floor").clamp_min(floor)
        if ceiling is not None:
            count = count.clamp_max(ceiling)
        count = torch.where(query_aware, torch.full_like(count, floor), count).clamp(0, mass.shape[-1])
        # As in the reference, key block 0 (the sink) and the main-diagonal group rank first.
        score = mass.clone()
        score[..., first] = math.inf
        selected.append(_top_mask(score, count))
    return query_aware, selected[0], selected[1]


def select_rows(query_aware: torch.Tensor, vertical_selected: torch.Tensor, slash_selected: torch.Tensor,
                q_pool: torch.Tensor, k_pool: torch.Tensor, *, q_len: int, k_len: int, block_size: int, gamma: float,
                sparsity_ratio: float | None, causal: bool, g_min: int) -> torch.Tensor:
    """The block mask from a head plan (steps 4-6 of ``flexprefill_select``): `[B, Hq, nq, nk]` bool.

    ``q_pool [B, Hq, nq, D]`` and ``k_pool [B, Hkv, nk, D]`` are fp32 block means.
    """
    B, Hq, nq, D = q_pool.shape
    Hkv, nk = k_pool.shape[1], k_pool.shape[2]
    G, bs, device = Hq // Hkv, block_size, q_pool.device
    n_groups = slash_selected.shape[-1]
    allowed = causal_block_mask(q_len, k_len, bs, bs, causal, device=device)
    forced = forced_block_mask(q_len, k_len, bs, causal, device=device)
    # Prefix counts of selected groups answer "any selected group in [lo, hi]" per block pair.
    s_prefix = torch.nn.functional.pad(torch.cumsum(slash_selected, dim=-1), (1, 0))  # [B, Hq, n_groups + 1]
    key_first = torch.arange(nk, device=device) * bs
    key_last = torch.clamp(key_first + bs, max=k_len) - 1
    q_pool = q_pool.reshape(B, Hkv, G, nq, D)
    mask = torch.empty(B, Hq, nq, nk, dtype=torch.bool, device=device)
    blocks_per_chunk = max(1, CHUNK_ELEMENTS // (4 * B * Hq * nk))
    for qb0 in range(0, nq, blocks_per_chunk):
        qb1 = min(nq, qb0 + blocks_per_chunk)
        c = qb1 - qb0
        rows = torch.arange(qb0, qb1, device=device)
        row_first = (k_len - q_len) + rows * bs
        row_last = (k_len - q_len) + torch.clamp((rows + 1) * bs, max=q_len) - 1
        # Block (qb, kb) holds offsets [row_first - key_last, row_last - key_first]: groups lo..hi.
        lo = torch.div(row_first[:, None] - key_last[None, :], bs, rounding_mode="floor") - g_min
        hi = torch.div(row_last[:, None] - key_first[None, :], bs, rounding_mode="floor") - g_min + 1
        lo, hi = lo.clamp(0, n_groups).reshape(1, 1, -1), hi.clamp(0, n_groups).reshape(1, 1, -1)
        slash_hit = s_prefix.gather(-1, hi.expand(B, Hq, -1)) > s_prefix.gather(-1, lo.expand(B, Hq, -1))
        chunk_allowed, chunk_forced = allowed[qb0:qb1], forced[qb0:qb1]
        keep = (vertical_selected[:, :, None, :] | slash_hit.view(B, Hq, c, nk)) & chunk_allowed

        # Query-aware heads: per-row coverage of the pooled block distribution.
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
    return mask


def check_flexprefill_args(q, k, gamma, tau, min_budget, max_budget, block_size, sparsity_ratio, name):
    """Validate the selector's arguments; return ``(B, Hq, Hkv, Lq, Lk, D)``."""
    shape = check_qk(q, k, name)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"{name}: gamma must be in (0, 1], got {gamma!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
        raise ValueError(f"{name}: tau must be >= 0, got {tau!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{name}: block_size must be a positive int, got {block_size!r}")
    for arg, value in (("min_budget", min_budget), ("max_budget", max_budget)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name}: {arg} must be None or a non-negative int, got {value!r}")
    if min_budget is not None and max_budget is not None and min_budget > max_budget:
        raise ValueError(f"{name}: min_budget ({min_budget}) > max_budget ({max_budget})")
    if sparsity_ratio is not None and (isinstance(sparsity_ratio, bool) or not isinstance(sparsity_ratio, (int, float))
                                       or not 0 < sparsity_ratio <= 1):
        raise ValueError(f"{name}: sparsity_ratio must be None or in (0, 1], got {sparsity_ratio!r}")
    return shape


def flexprefill_select(q: torch.Tensor, k: torch.Tensor, *, gamma: float = 0.9, tau: float = 0.1,
                       min_budget: int | None = None, max_budget: int | None = None, block_size: int = 128,
                       sparsity_ratio: float | None = None, causal: bool = True, return_patterns: bool = False):
    """FlexPrefill block selection: per head, a query-aware or a vertical-slash pattern.

    1. Estimate: ``q_hat`` = the last ``n = min(block_size, Lq)`` queries; their exact fp32 softmax
       over all keys (causal: keys ``<=`` each query's position) gives the token distributions
       ``vertical[j]`` (mean probability of key ``j``) and ``slash[o]`` (probability on offset
       ``o = query_pos - key_pos``, summed along the diagonal, divided by ``n``).
    2. Pattern: ``estimate = softmax(mean(q_hat) . mean-pooled K / sqrt(D))`` over key blocks against
       ``vertical`` summed per key block; ``sqrt(JS) < tau`` makes a **query-aware** head
       (``tau = 0``: none).
    3. Vertical-slash budgets: ``n_v`` / ``n_s`` = the fewest largest token verticals / slashes whose
       mass reaches ``gamma`` (all when ``gamma >= 1``), converted to blocks as ``ceil(n / bs)``,
       clamped to ``[ceil(min_budget / bs), ceil(max_budget / bs)]`` (None: unbounded) and to what
       exists. Query-aware heads use ``ceil(min_budget / bs)`` (0 if None) for both. Then the top
       ``n_v`` key blocks by vertical mass per block, and the top ``n_s`` offset groups by slash mass
       per group (group ``g`` = offsets ``[g bs, (g+1) bs)``), key block 0 and group 0 ranking first
       (ties: lower index). A selected key block is kept in every query block that may see it; a
       selected group keeps, in each query block, every key block that one of its offsets crosses.
    4. Query-aware heads also keep, per query-block row, blocks of ``softmax(mean-pooled Q .
       mean-pooled K / sqrt(D))`` (over the allowed blocks) by descending score while the mass
       before them is ``< gamma`` (the crossing block is kept; ``gamma >= 1`` keeps all).
    5. Always key block 0 and the diagonal blocks; with ``causal`` only causal blocks.
    6. ``sparsity_ratio``: each row keeps at most ``max(ceil(sparsity_ratio * allowed blocks in
       the row), forced blocks)``: the forced blocks, then the other selected blocks with the highest
       pooled score of step 4 (ties: lower block first). The ceil is taken in float64.

    Deviations from the public reference (ByteDance-Seed/FlexPrefill), on purpose:
    - Token counts become blocks by ``ceil(n / block_size)``; the reference computes
      ``n // 128 + 1`` whatever the block size (wrong for any block but 128, one block too many
      when ``n`` is a multiple of 128).
    - A selected offset group keeps every key block its offsets cross (two per query block when
      aligned); the reference keeps only block ``(i, i - g)``, which holds half of the group's
      (query, key) pairs, so its "slash" misses the other half (e.g. offsets 1..bs-1 of the first
      rows of each block).
    - Query-aware selection is per query-block row (the reference covers ``gamma * nq`` of the
      flattened ``nq x nq`` matrix, starving rows whose mass is spread out) and keeps the crossing
      block (the reference's ``cumsum <= gamma`` drops it).
    - Batch > 1, GQA without repeating K, ``Lq < Lk``, non-causal, any block size; no dense
      fallback for short inputs (the reference runs dense attention below ``2 * block_size``).
    - JS divergence treats ``0 log 0`` as 0 (the reference's NaN makes such heads vertical-slash).
    - ``min_budget=None`` means no floor (the reference uses 1 token = 1 block, which here is
      key block 0, kept anyway).

    Args:
        q: `[B, Hq, Lq, D]` queries (the last ``Lq`` positions); k: `[B, Hkv, Lk, D]`, ``Hq % Hkv == 0``.
        gamma: coverage in (0, 1] (default 0.9).
        tau: JS threshold for query-aware heads, >= 0 (default 0.1).
        min_budget: minimum verticals and slashes per head, in tokens (default None: no minimum).
        max_budget: maximum verticals and slashes per head, in tokens (default None: no maximum).
        block_size: query and key block size (default 128, the paper's).
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
    B, Hq, Hkv, Lq, Lk, D = check_flexprefill_args(q, k, gamma, tau, min_budget, max_budget, block_size,
                                                   sparsity_ratio, "flexprefill_select")
    bs, G = block_size, Hq // Hkv
    nk = cdiv(Lk, bs)
    n_hat = min(bs, Lq)

    vertical, slash, min_offset = last_block_distributions(q, k, bs, causal)
    g_min, n_groups = offset_groups(Lk, min_offset, bs)
    vertical_blocks = sum_pool(vertical, 0, bs, nk)
    slash_groups = sum_pool(slash, min_offset - g_min * bs, bs, n_groups)
    k_pool = block_mean_pool(k, bs)  # [B, Hkv, nk, D]
    q_hat_mean = q[:, :, Lq - n_hat:].float().mean(2).reshape(B, Hkv, G, D)
    estimate = torch.softmax(torch.matmul(q_hat_mean, k_pool.transpose(-1, -2)) / math.sqrt(D), dim=-1)
    query_aware, vertical_selected, slash_selected = plan_heads(
        vertical_blocks, slash_groups, cover_count(vertical, gamma), cover_count(slash, gamma),
        estimate.reshape(B, Hq, nk), tau=tau, min_budget=min_budget, max_budget=max_budget, block_size=bs,
        slash_group0=-g_min)
    mask = select_rows(query_aware, vertical_selected, slash_selected, block_mean_pool(q, bs), k_pool, q_len=Lq,
                       k_len=Lk, block_size=bs, gamma=gamma, sparsity_ratio=sparsity_ratio, causal=causal,
                       g_min=g_min)
    index = BlockIndex.from_mask(mask, block_q=bs, block_k=bs, q_len=Lq, k_len=Lk, max_k=nk)
    return (index, query_aware) if return_patterns else index
