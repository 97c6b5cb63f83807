"""Benchmark inputs: random q/k/v, fixed-density block indices, and LLM-like synthetic q/k/v."""

from __future__ import annotations

import math

import torch

from ..index import BlockIndex, causal_block_mask, diagonal_block_range


def random_qkv(batch, q_heads, kv_heads, seq_len, head_dim, *, dtype=torch.bfloat16, device="cuda", seed=0,
               q_len=None, requires_grad=False):
    """Standard-normal q `[B, Hq, Lq, D]`, k/v `[B, Hkv, L, D]`."""
    g = torch.Generator(device=device).manual_seed(seed)
    q_len = seq_len if q_len is None else q_len
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=g, device=device, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def random_block_index(batch, heads, q_len, k_len, block_size, density, *, device="cuda", seed=0,
                       causal=True, group_size: int = 1) -> BlockIndex:
    """Random causal blocks at about ``density`` of the causal blocks, plus block 0 and the diagonal.

    Each allowed block is kept with probability chosen so that the expected total, forced blocks
    included, is ``density`` of the allowed blocks. Built on the device with no host loop.
    ``group_size > 1`` draws one pattern per group of consecutive heads (a GQA group sharing its
    selection), instead of one per head.
    """
    allowed = causal_block_mask(q_len, k_len, block_size, block_size, causal, device=device)
    nq, nk = allowed.shape
    forced = torch.zeros_like(allowed)
    forced[:, 0] = True
    first, last = diagonal_block_range(q_len, k_len, block_size, block_size, device=device)
    cols = torch.arange(nk, device=device)
    forced |= (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])
    forced &= allowed
    n_allowed, n_forced = allowed.sum().item(), forced.sum().item()
    p = max(0.0, min(1.0, (density * n_allowed - n_forced) / max(1, n_allowed - n_forced)))
    g = torch.Generator(device=device).manual_seed(seed)
    if heads % group_size:
        raise ValueError(f"heads ({heads}) must be a multiple of group_size ({group_size})")
    rand = torch.rand(batch, heads // group_size, nq, nk, generator=g, device=device) < p
    rand = rand.repeat_interleave(group_size, dim=1)
    mask = (rand & allowed) | forced
    return BlockIndex.from_mask(mask, block_q=block_size, block_k=block_size, q_len=q_len, k_len=k_len)


def llm_like_qkv(batch, q_heads, kv_heads, seq_len, head_dim, *, dtype=torch.bfloat16, device="cuda", seed=0,
                 heads_seed=None, sink_strength=12.0, local_strength=16.0, vertical_count=32, vertical_strength=6.0,
                 match_count=64, match_strength=12.0, noise=0.3):
    """Synthetic q/k/v whose attention has the structure of real LLM heads.

    The logit ``q_i . k_j / sqrt(D)`` is the sum of planted components and noise. Each component
    adds ``sqrt(s) * D**0.25 * u`` to both q and k along a unit direction ``u``, which contributes
    exactly ``s`` to the logit of a matching pair:

    - **sinks** (``sink_strength``): the first 4 keys and every query share a direction;
    - **local decay** (``local_strength`` at distance 0): a RoPE-like code of 16 rotations with
      geometric frequencies from 1 to ``1/L`` radians per token, so the logit falls roughly like
      ``s * (1 - log(d) / log(L))`` with distance ``d``;
    - **verticals** (``vertical_strength``): ``vertical_count`` random key positions share a
      direction with every query;
    - **distant matches** (``match_strength``): ``match_count`` random (query, earlier key) pairs
      share a random content vector (retrieval);

    plus noise of logit standard deviation ``noise``. Heads differ: each KV head scales every
    strength by its own random factor in [0.5, 1.5], so some heads are local and some vertical.
    ``benchmarks/NOTES.md`` records the calibration: the exact 90%-mass block density it gives
    (run 1: 8.5% at 128K for seed L; run 18d: 5.7-12.8% at 128K over twelve seeds on the GPU).
    Methods' densities vary with the seed more than the oracle's does; ``sparseattn bench methods
    --seeds`` reports the spread.

    The draws come from a generator on ``device``, and CPU and CUDA generators give different
    streams: the same seed is a different input on a different device.

    ``heads_seed`` separates the model from the prompt: the per-head strengths (the "model") are
    then drawn from ``heads_seed`` and everything else (directions, vertical columns, matches,
    noise, values) from ``seed``. The strengths are the generator's first draw, so
    ``llm_like_qkv(..., seed=c, heads_seed=s)`` has the heads of ``llm_like_qkv(..., seed=s)`` with
    another prompt: a held-out calibration input for thresholds or patterns searched per head.
    ``heads_seed=None`` (default) draws both from ``seed``, the same stream as before it existed.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    f32 = dict(device=device, dtype=torch.float32)
    B, Hq, Hkv, L, D = batch, q_heads, kv_heads, seq_len, head_dim
    G = Hq // Hkv
    root = D ** 0.25

    def rand(*shape):
        return torch.randn(*shape, generator=g, **f32)

    def unit(*shape):
        x = rand(*shape)
        return x / x.norm(dim=-1, keepdim=True)

    def amp(strength, which):  # [B, Hkv, 1, 1]: per-head amplitude of a component
        return (strength * head_scale[which]).sqrt() * root

    head_scale = 0.5 + torch.rand(4, B, Hkv, 1, 1, generator=g, **f32)
    if heads_seed is not None:  # the same first draw from the model's own seed
        heads = torch.Generator(device=device).manual_seed(heads_seed)
        head_scale = 0.5 + torch.rand(4, B, Hkv, 1, 1, generator=heads, **f32)
    # Coordinates of std sqrt(noise) on both sides give a logit noise std of `noise`.
    q = rand(B, Hkv, G, L, D) * math.sqrt(noise)
    k = rand(B, Hkv, L, D) * math.sqrt(noise)

    d_sink = unit(B, Hkv, 1, D)
    q += (amp(sink_strength, 0) * d_sink).unsqueeze(2)
    k[:, :, :4] += amp(sink_strength, 0) * d_sink

    pairs = 16
    basis = torch.linalg.qr(rand(D, D)).Q[:, : 2 * pairs].T  # [2*pairs, D], orthonormal rows
    freqs = float(max(L, 2)) ** (-torch.arange(pairs, **f32) / (pairs - 1))  # 1 .. 1/L rad/token
    angle = torch.arange(L, **f32)[:, None] * freqs[None, :]
    code = torch.stack([angle.cos(), angle.sin()], -1).reshape(L, 2 * pairs) @ basis / math.sqrt(pairs)
    k += amp(local_strength, 1) * code  # code_i . code_j = mean_f cos(w_f (i - j))
    q += (amp(local_strength, 1) * code).unsqueeze(2)

    d_vert = unit(B, Hkv, 1, D)
    cols = torch.randint(4, max(5, L), (vertical_count,), generator=g, device=device) % L
    q += (amp(vertical_strength, 2) * d_vert).unsqueeze(2)
    k[:, :, cols] += amp(vertical_strength, 2) * d_vert

    if match_count and L > 1:
        qi = torch.randint(1, L, (match_count,), generator=g, device=device)
        kj = (torch.rand(match_count, generator=g, **f32) * qi).long()
        content = unit(B, Hkv, match_count, D) * amp(match_strength, 3)
        k[:, :, kj] += content
        q[:, :, :, qi] += content.unsqueeze(2)
    v = rand(B, Hkv, L, D)
    return q.reshape(B, Hq, L, D).to(dtype), k.to(dtype), v.to(dtype)


def parse_seeds(text: str) -> list[int | None]:
    """Seeds of ``llm_like_qkv`` from ``"L,1,2"``: integers, ``None`` for ``L`` (the length itself,
    the methods suite's historical input). Raises ``ValueError`` on anything else or an empty list.

    >>> parse_seeds("L, 1,2")
    [None, 1, 2]
    """
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        seeds = [None if x.upper() == "L" else int(x) for x in items]
    except ValueError:
        seeds = []
    if not seeds:
        raise ValueError(f"seeds are comma-separated integers or L (the length), got {text!r}")
    return seeds


def _blocks_needed(mass: torch.Tensor, coverage: float) -> torch.Tensor:
    """Fewest entries along the last dim holding ``coverage`` of its sum (mass of one query block per key block)."""
    mass = mass / mass.sum(-1, keepdim=True)
    return (mass.sort(-1, descending=True).values.cumsum(-1) < coverage).sum(-1) + 1


@torch.no_grad()
def oracle_density_from_mass(block_mass: torch.Tensor, q_len: int, k_len: int, block_size: int,
                             coverage: float = 0.9, *, rows_per_chunk: int = 64) -> float:
    """``oracle_density`` over every query block, from an exact block mass already computed
    (``calibrate.exact_block_mass``, `[B, Hq, nq, nk]`, causal): per query block the fewest key blocks
    holding ``coverage`` of its mass, over all causal blocks of all heads.

    Example:
        >>> m = torch.tensor([[[[2.0, 0.0], [1.4, 0.6]]]])  # 2 query blocks of 2 rows
        >>> oracle_density_from_mass(m, 4, 4, 2, 0.9)  # 1 + 2 blocks needed of 1 + 2 causal ones
        1.0
    """
    from ..index import causal_block_mask

    B, H, nq, nk = block_mass.shape
    needed = 0
    for r0 in range(0, nq, rows_per_chunk):
        needed += _blocks_needed(block_mass[:, :, r0:r0 + rows_per_chunk].double(), coverage).sum().item()
    allowed = causal_block_mask(q_len, k_len, block_size, block_size, True, device=block_mass.device).sum().item()
    return needed / (B * H * allowed)


@torch.no_grad()
def oracle_density(q, k, block_size, coverage=0.9, *, query_blocks=None, seed=0):
    """Exact-attention oracle: mean fraction of causal blocks needed to cover ``coverage`` of each row's mass.

    Computes the exact softmax of sampled query blocks (``query_blocks``; None = all) against all
    keys, sums probabilities per key block, and counts the fewest blocks reaching ``coverage``.
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    nq = -(-L // block_size)
    rows = torch.arange(nq, device=q.device)
    if query_blocks is not None and query_blocks < nq:
        g = torch.Generator(device="cpu").manual_seed(seed)
        rows = torch.randperm(nq, generator=g)[:query_blocks].to(q.device)
    fractions = []
    scale = 1.0 / math.sqrt(D)
    kf = k.float()
    for r in rows.tolist():
        r0, r1 = r * block_size, min(L, (r + 1) * block_size)
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, G * (r1 - r0), D)
        s = torch.matmul(qc, kf[:, :, :r1].transpose(-1, -2)) * scale  # [B, Hkv, G*rows, r1]
        qpos = torch.arange(r0, r1, device=q.device).repeat(G)
        s = s.masked_fill(torch.arange(r1, device=q.device)[None, :] > qpos[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        nkb = -(-r1 // block_size)
        pad = nkb * block_size - r1
        mass = torch.nn.functional.pad(p, (0, pad)).reshape(B, Hkv, G, r1 - r0, nkb, block_size).sum((-1, -3))
        needed = _blocks_needed(mass, coverage)  # [B, Hkv, G]
        fractions.append((needed.float() / nkb).mean().item())
    # Weight rows by their number of causal blocks, as density is defined over all causal blocks.
    weights = [(-(-min(L, (r + 1) * block_size) // block_size)) for r in rows.tolist()]
    return sum(f * w for f, w in zip(fractions, weights)) / sum(weights)
