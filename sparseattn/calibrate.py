"""XAttention threshold calibration (``sparseattn profile``) and fidelity on real activations.

Calibration. XAttention keeps, per query-block row, blocks by descending *estimated* mass until
``tau`` of the row's estimated mass (docs/methods.md). What users care about is the *exact*
attention mass the kept blocks hold. :func:`profile_xattention` runs a model on calibration
text, captures every layer's q/k/v (``sparseattn.bench.capture``) and, for each (layer, query
head), picks the smallest threshold of a candidate grid whose selection covers at least
``target_coverage`` of the exact softmax mass. The selection is computed exactly as at run time
(the same estimator: the Triton kernel on a GPU, the fp32 reference on a CPU; the same
``keep_until_covered`` comparison in fp32), and the exact mass is an fp32 softmax computed a few
query blocks at a time, so nothing ``Lq x Lk`` is ever held.

Coverage of a query row = exact probability mass on its selected blocks (1 = nothing lost).
Two statistics over the calibration rows, per head:

- ``"mean"`` (default): mean over all query rows of all calibration sequences, i.e. the fraction
  of the head's total attention mass that the sparse kernel computes;
- ``"min_block"``: the worst query block (mean over its rows), stricter: every query block must
  reach the target, so thresholds come out higher.

Coverage is monotone non-decreasing in the threshold (a larger threshold keeps a superset of
blocks, and the fp32 sum of a superset of non-negative terms in a fixed order is not smaller), so
"the smallest candidate reaching the target" is a first crossing; the next candidate down misses
the target by construction. A head that misses even at the largest candidate gets the largest
candidate and ``reached: false`` (with 1.0 among the candidates, coverage is 1: every causal
block is kept).

The result is a versioned JSON file (format ``sparseattn.xattention_thresholds``, version 1,
documented in docs/methods.md) read by :func:`load_xattention_thresholds`, which returns
``{layer_idx: {"threshold": Tensor[Hq], "stride": S, "block_size": bs}}`` for
``patch(model, "xattention", layer_configs=...)``. Files shipped with the package live in
``sparseattn/data/xattention/<model slug>.json`` and load by model name.

Fidelity. :func:`xattention_fidelity` measures, on captured q/k/v, per layer and head and for
each threshold: the mean exact-mass recall, its 5th percentile over query rows, the relative
output error ``||o - o_dense|| / ||o_dense||`` (both fp32, same inputs, so only the selection
differs) and the density. ``benchmarks/xattn_fidelity.py`` runs it on the embedded model.

Example:
    >>> import torch, transformers
    >>> from sparseattn.calibrate import profile_xattention, load_xattention_thresholds, save_xattention_thresholds
    >>> cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(0))
    >>> doc = profile_xattention(model, ids, target_coverage=0.9, stride=8, block_size=32, progress=False)
    >>> len(doc["thresholds"]), len(doc["thresholds"][0])
    (2, 4)
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.json")
    >>> _ = save_xattention_thresholds(doc, path)
    >>> cfgs = load_xattention_thresholds(path, model=model)
    >>> sorted(cfgs), cfgs[0]["threshold"].shape, cfgs[0]["stride"]
    ([0, 1], torch.Size([4]), 8)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from .index import causal_block_mask, cdiv
from .reference.streaming import forced_block_mask
from .reference.xattention import check_qk, xattention_block_mass

logger = logging.getLogger("sparseattn")

__all__ = [
    "ALLOCATIONS",
    "DEFAULT_CANDIDATES",
    "FORMAT",
    "STATISTICS",
    "VERSION",
    "add_profile_parser",
    "attention_scales",
    "coverage_curve",
    "estimated_block_mass",
    "exact_block_mass",
    "fidelity_table",
    "load_xattention_thresholds",
    "model_display_name",
    "packaged_thresholds",
    "profile_xattention",
    "read_xattention_thresholds",
    "run_profile",
    "save_xattention_thresholds",
    "sliding_window_layers",
    "smallest_reaching",
    "summarize_fidelity",
    "thresholds_slug",
    "xattention_fidelity",
]

FORMAT = "sparseattn.xattention_thresholds"
VERSION = 1
DATA_DIR = Path(__file__).parent / "data" / "xattention"
# 0.01 .. 1.00 in steps of 0.01, plus two points between 0.99 and 1 where coverage moves fastest.
DEFAULT_CANDIDATES = tuple(sorted({round(0.01 * i, 2) for i in range(1, 101)} | {0.995, 0.999}))
STATISTICS = ("mean", "min_block")
ALLOCATIONS = ("head", "layer")
# fp32 elements of one exact-softmax chunk (scores + probabilities: ~2x this many bytes x 4).
CHUNK_ELEMENTS = 1 << 24
_REQUIRED_KEYS = ("format", "version", "model", "num_layers", "num_heads", "stride", "block_size",
                  "target_coverage", "statistic", "thresholds")


# ==================================================================================================
# Exact attention mass, estimated mass, coverage curve
# ==================================================================================================


def _row_step(B: int, Hq: int, Lk: int, block_size: int) -> int:
    """Query rows per exact-softmax chunk: whole blocks, at most ``CHUNK_ELEMENTS`` scores."""
    return max(block_size, CHUNK_ELEMENTS // max(1, B * Hq * Lk) // block_size * block_size)


def _exact_probs(q, k_grouped, r0: int, r1: int, scale: float, causal: bool) -> torch.Tensor:
    """fp32 softmax of query rows ``[r0, r1)`` over all keys: `[B, Hq, rows, Lk]` (GQA grouped, K not repeated)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k_grouped.shape[1], k_grouped.shape[3]
    qc = q[:, :, r0:r1].float().reshape(B, Hkv, Hq // Hkv, r1 - r0, D)
    scores = torch.matmul(qc, k_grouped.transpose(-1, -2)) * scale  # [B, Hkv, G, rows, Lk]
    if causal:
        qpos = torch.arange(r0, r1, device=q.device) + (Lk - Lq)
        scores = scores.masked_fill(torch.arange(Lk, device=q.device)[None, :] > qpos[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).reshape(B, Hq, r1 - r0, Lk)


def exact_block_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int, causal: bool = True,
                     scale: float | None = None) -> torch.Tensor:
    """Exact softmax attention mass per (query block, key block), fp32 `[B, Hq, nq, nk]`.

    Row ``i`` of query block ``qb`` contributes its probabilities (summing to 1 over its allowed
    keys) to the key blocks they fall in, so a row of cells sums to the block's number of query
    rows. Computed a few query blocks at a time (never ``Lq x Lk`` at once).

    Args:
        q: `[B, Hq, Lq, D]` queries, the last ``Lq`` positions. k: `[B, Hkv, Lk, D]`.
        block_size: query and key block size.
        causal: causal attention (default True).
        scale: softmax scale (default ``1/sqrt(D)``).

    Example:
        >>> m = exact_block_mass(torch.randn(1, 2, 100, 16), torch.randn(1, 1, 100, 16), block_size=32)
        >>> m.shape, torch.allclose(m.sum(-1), torch.tensor([32., 32., 32., 4.]).expand(1, 2, 4))
        (torch.Size([1, 2, 4, 4]), True)
    """
    B, Hq, _, Lq, Lk, D = check_qk(q, k, "exact_block_mass")
    bs = block_size
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    nq, nk = cdiv(Lq, bs), cdiv(Lk, bs)
    k_grouped = k.float().unsqueeze(2)  # [B, Hkv, 1, Lk, D]
    out = torch.empty(B, Hq, nq, nk, dtype=torch.float32, device=q.device)
    step = _row_step(B, Hq, Lk, bs)
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        probs = _exact_probs(q, k_grouped, r0, r1, scale, causal)
        probs = torch.nn.functional.pad(probs, (0, nk * bs - Lk, 0, cdiv(r1 - r0, bs) * bs - (r1 - r0)))
        out[:, :, r0 // bs:cdiv(r1, bs)] = probs.view(B, Hq, -1, bs, nk, bs).sum((3, 5))
    return out


def estimated_block_mass(q: torch.Tensor, k: torch.Tensor, *, stride: int, block_size: int,
                         causal: bool = True) -> torch.Tensor:
    """XAttention's antidiagonal masses from the estimator the selection uses at run time.

    CUDA tensors (with Triton available): the fused kernel ``kernels.estimate.xattention_estimate``;
    otherwise the fp32 reference ``reference.xattention.xattention_block_mass``. `[B, Hq, nq, nk]`.
    """
    if q.is_cuda:
        from .kernels import kernels_available

        if kernels_available():
            from .kernels.estimate import xattention_estimate

            return xattention_estimate(q, k, stride=stride, block_size=block_size, causal=causal)
    return xattention_block_mass(q, k, stride=stride, block_size=block_size, causal=causal)


def _check_candidates(candidates) -> list[float]:
    values = [float(c) for c in candidates]
    if not values or any(not (0 < c <= 1) or not math.isfinite(c) for c in values):
        raise ValueError(f"candidates must be non-empty thresholds in (0, 1], got {list(candidates)!r}")
    if any(b <= a for a, b in pairwise(values)):
        raise ValueError(f"candidates must be strictly increasing, got {values}")
    return values


def coverage_curve(est_mass: torch.Tensor, exact_mass: torch.Tensor, candidates: Iterable[float], *, q_len: int,
                   k_len: int, block_size: int, causal: bool = True) -> dict[str, torch.Tensor]:
    """Exact mass covered by XAttention's selection at every candidate threshold, in one sort.

    The selection rule is ``keep_until_covered``'s, evaluated for all candidates at once with the
    same fp32 comparison ``forced_mass + mass_before < tau * row_mass`` on the same sorted
    estimated masses, so the kept set at ``tau`` is exactly ``xattention_select(threshold=tau)``'s
    for the estimator that produced ``est_mass``.

    Args:
        est_mass: `[B, Hq, nq, nk]` estimated masses (``estimated_block_mass``).
        exact_mass: `[B, Hq, nq, nk]` exact masses (``exact_block_mass``), same blocks.
        candidates: increasing thresholds in (0, 1] (``G`` of them).
        q_len, k_len, block_size, causal: the geometry the masses were computed with.

    Returns:
        ``{"covered": [B, Hq, G]`` exact mass on kept blocks summed over all query rows,
        ``"block_min": [B, Hq, G]`` the smallest per-query-block coverage (mean over the block's rows),
        ``"kept": [B, Hq, G]`` kept blocks, ``"allowed"`` (0-d) causal blocks per head``}``, float64.
    """
    taus = torch.tensor(_check_candidates(candidates), dtype=torch.float32, device=est_mass.device)
    G = taus.numel()
    B, Hq, nq, nk = est_mass.shape
    bs, device = block_size, est_mass.device
    allowed = causal_block_mask(q_len, k_len, bs, bs, causal, device=device)
    forced = forced_block_mask(q_len, k_len, bs, causal, device=device)
    rows_per_block = (torch.clamp((torch.arange(nq, device=device) + 1) * bs, max=q_len)
                      - torch.arange(nq, device=device) * bs).double()
    covered = torch.zeros(B, Hq, G, dtype=torch.float64, device=device)
    block_min = torch.full((B, Hq, G), math.inf, dtype=torch.float64, device=device)
    kept = torch.zeros(B, Hq, G, dtype=torch.float64, device=device)
    taus_b = taus.view(G, 1, 1, 1, 1)
    full = (taus >= 1).view(G, 1, 1, 1, 1)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    blocks_per_chunk = max(1, CHUNK_ELEMENTS // (G * B * Hq * nk))
    for c0 in range(0, nq, blocks_per_chunk):
        c1 = min(nq, c0 + blocks_per_chunk)
        mass, exact = est_mass[:, :, c0:c1].float(), exact_mass[:, :, c0:c1].float()
        a = allowed[c0:c1].expand(mass.shape)
        f = forced[c0:c1].expand(mass.shape) & a
        others = a & ~f
        # The same fp32 operations as keep_until_covered (reference/xattention.py).
        row_mass = torch.where(a, mass, zero).sum(-1, keepdim=True)
        forced_mass = torch.where(f, mass, zero).sum(-1, keepdim=True)
        key = torch.where(others, mass, torch.full_like(mass, -1.0))
        sorted_key, order = torch.sort(key, dim=-1, descending=True, stable=True)
        before = torch.nn.functional.pad(torch.cumsum(sorted_key.clamp_min(0), dim=-1)[..., :-1], (1, 0))
        candidate = torch.gather(others, -1, order)  # [B, Hq, c, nk] sorted positions that may be added
        exact_sorted = torch.where(candidate, torch.gather(exact, -1, order), zero)
        keep = ((forced_mass + before)[None] < taus_b * row_mass[None]) | full  # [G, B, Hq, c, nk]
        keep &= candidate[None]
        per_block = torch.where(f, exact, zero).sum(-1)[None] + torch.where(keep, exact_sorted[None], zero).sum(-1)
        per_block = per_block.double().permute(1, 2, 0, 3)  # [B, Hq, G, c]
        covered += per_block.sum(-1)
        block_min = torch.minimum(block_min, (per_block / rows_per_block[c0:c1]).amin(-1))
        kept += (keep.sum(-1).double() + f.sum(-1).double()[None]).permute(1, 2, 0, 3).sum(-1)
    return {"covered": covered, "block_min": block_min, "kept": kept,
            "allowed": allowed.sum().double()}


def smallest_reaching(coverage: torch.Tensor, target: float) -> torch.Tensor:
    """Per entry of ``coverage [..., G]`` (monotone along the candidates), the index of the first
    candidate reaching ``target``; the last candidate where none does. Long, ``coverage.shape[:-1]``.

    Example:
        >>> smallest_reaching(torch.tensor([[0.5, 0.9, 0.97], [0.2, 0.4, 0.6]]), 0.9).tolist()
        [1, 2]
    """
    reached = coverage >= target
    last = torch.full(reached.shape[:-1], reached.shape[-1] - 1, dtype=torch.long, device=coverage.device)
    return torch.where(reached.any(-1), reached.long().argmax(-1), last)


# ==================================================================================================
# Profile
# ==================================================================================================


def model_display_name(path_or_name) -> str:
    """A readable model name: the embedded default's name, a GGUF stem without its quantization tag, a folder name.

    Example:
        >>> model_display_name("default"), model_display_name("/m/Llama-3.1-8B-Instruct-Q4_K_M.gguf")
        ('SmolLM2-135M-Instruct', 'Llama-3.1-8B-Instruct')
    """
    from .models import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAMES

    text = str(path_or_name)
    if text.lower() in DEFAULT_MODEL_NAMES:
        text = DEFAULT_MODEL_FILE
    name = Path(text.rstrip("/\\")).name
    if name.lower().endswith(".gguf"):
        name = re.sub(r"[.\-_](i?q\d[\w]*|f16|f32|bf16)$", "", name[:-5], flags=re.IGNORECASE)
    return name


def thresholds_slug(path_or_name) -> str:
    """File stem of a model's packaged thresholds: lower-case display name, other characters -> ``-``.

    Example:
        >>> thresholds_slug("smollm2"), thresholds_slug("Qwen/Qwen3-8B")
        ('smollm2-135m-instruct', 'qwen3-8b')
    """
    return re.sub(r"[^a-z0-9._]+", "-", model_display_name(path_or_name).lower()).strip("-.")


def attention_scales(model) -> dict[int, float]:
    """``layer_idx -> module.scaling`` for attention modules that expose both (HF convention)."""
    scales = {}
    for module in model.modules():
        layer, scaling = getattr(module, "layer_idx", None), getattr(module, "scaling", None)
        if isinstance(layer, int) and isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
            scales.setdefault(layer, float(scaling))
    return scales


def sliding_window_layers(model) -> list[int]:
    """Layers with sliding-window attention (``config.layer_types``, e.g. Gemma 3): past the window
    the integration runs them dense, and their exact attention is not plain causal, so they are
    not calibrated."""
    types = getattr(model.config.get_text_config(), "layer_types", None) or []
    return [i for i, kind in enumerate(types) if kind == "sliding_attention"]


def _calibration_ids(tokenizer_or_ids, tokens: int, sequences: int) -> tuple[torch.Tensor, str]:
    if torch.is_tensor(tokenizer_or_ids):
        ids = tokenizer_or_ids if tokenizer_or_ids.dim() == 2 else tokenizer_or_ids.reshape(1, -1)
        if ids.dim() != 2 or ids.shape[1] < 1 or ids.is_floating_point():
            raise ValueError(f"calibration ids must be an integer tensor [N, L] or [L], got "
                             f"{tuple(tokenizer_or_ids.shape)} {tokenizer_or_ids.dtype}")
        return ids, "token ids given by the caller"
    from .bench.capture import real_text_ids

    if tokens < 1 or sequences < 1:
        raise ValueError(f"tokens and sequences must be >= 1, got {tokens} and {sequences}")
    ids = real_text_ids(tokenizer_or_ids, tokens * sequences).reshape(sequences, tokens)
    return ids, "Python standard-library source (sparseattn.tasks.haystack_text), consecutive windows"


def profile_xattention(model, tokenizer_or_ids, *, target_coverage: float = 0.95, stride: int = 16,
                       block_size: int = 128, candidates: Iterable[float] = DEFAULT_CANDIDATES,
                       statistic: str = "mean", allocation: str = "head", tokens: int = 4096, sequences: int = 1,
                       layers_per_pass: int | None = None, model_name: str | None = None,
                       text_source: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Per-(layer, query head) XAttention thresholds reaching ``target_coverage`` of the exact mass.

    Args:
        model: a ``transformers`` causal LM whose attention goes through ``ALL_ATTENTION_FUNCTIONS``.
        tokenizer_or_ids: a tokenizer (calibration text: ``sequences`` consecutive windows of
            ``tokens`` tokens of Python standard-library source) or token ids `[N, L]` / `[L]`.
        target_coverage: exact attention mass the selection must keep, in (0, 1] (default 0.95).
        stride, block_size: XAttention's geometry the thresholds are for (default 16, 128).
        candidates: increasing thresholds in (0, 1] to choose from (default 0.01..1.00 by 0.01,
            plus 0.995, 0.999).
        statistic: ``"mean"`` (mean coverage over query rows) or ``"min_block"`` (worst query block).
        allocation: ``"head"`` (default): every head reaches ``target_coverage`` with its smallest
            threshold; ``"layer"``: the *mean* over each layer's heads reaches it at the least mean
            density (:func:`sparseattn.allocation.allocate_mean`), so heads whose attention is
            concentrated keep more than the target and spread-out heads less, for fewer blocks.
        tokens, sequences: calibration length and count with a tokenizer (ignored with ids).
        layers_per_pass: capture this many layers per forward pass (default all: one pass per
            sequence). Fewer layers per pass means less memory and more passes.
        model_name: recorded in the file (default ``model.config.name_or_path``'s last part).
        text_source: description of the calibration text (default: derived).
        progress: show a tqdm progress bar over (sequence, layer).

    Returns:
        The thresholds document (a dict, see docs/methods.md); write it with
        :func:`save_xattention_thresholds`.
    """
    from tqdm.auto import tqdm

    from .bench.capture import capture_qkv
    from .methods.xattention import XAttentionConfig

    XAttentionConfig(stride=stride, block_size=block_size)  # validates the geometry
    values = _check_candidates(candidates)
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {list(STATISTICS)}, got {statistic!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    if isinstance(target_coverage, bool) or not 0 < float(target_coverage) <= 1:
        raise ValueError(f"target_coverage must lie in (0, 1], got {target_coverage!r}")
    text_config = model.config.get_text_config()
    num_layers, num_heads = text_config.num_hidden_layers, text_config.num_attention_heads
    layers_per_pass = num_layers if layers_per_pass is None else int(layers_per_pass)
    if layers_per_pass < 1:
        raise ValueError(f"layers_per_pass must be >= 1, got {layers_per_pass}")
    dense_layers = sliding_window_layers(model)
    profiled = [layer for layer in range(num_layers) if layer not in dense_layers]
    ids, source = _calibration_ids(tokenizer_or_ids, tokens, sequences)
    scales = attention_scales(model)
    G = len(values)
    covered = torch.zeros(num_layers, num_heads, G, dtype=torch.float64)
    block_min = torch.full((num_layers, num_heads, G), math.inf, dtype=torch.float64)
    kept = torch.zeros(num_layers, num_heads, G, dtype=torch.float64)
    allowed = torch.zeros(num_layers, dtype=torch.float64)
    rows = 0
    dtype = device = None
    groups = [profiled[i:i + layers_per_pass] for i in range(0, len(profiled), layers_per_pass)]
    with tqdm(total=ids.shape[0] * len(profiled), desc="profile xattention", unit="layer", disable=not progress) as bar:
        for seq in ids:
            seq = seq[None]
            for group in groups:
                captured = capture_qkv(model, seq, layers=group)
                for layer in group:
                    q, k, _ = captured.pop(layer)
                    if q.shape[1] != num_heads:
                        raise ValueError(f"layer {layer} has {q.shape[1]} query heads, the config says {num_heads}")
                    dtype, device = q.dtype, q.device
                    est = estimated_block_mass(q, k, stride=stride, block_size=block_size)
                    exact = exact_block_mass(q, k, block_size=block_size, scale=scales.get(layer))
                    curve = coverage_curve(est, exact, values, q_len=q.shape[2], k_len=k.shape[2],
                                           block_size=block_size)
                    covered[layer] += curve["covered"].sum(0).cpu()
                    block_min[layer] = torch.minimum(block_min[layer], curve["block_min"].amin(0).cpu())
                    kept[layer] += curve["kept"].sum(0).cpu()
                    allowed[layer] += float(curve["allowed"]) * q.shape[0]
                    del q, k, est, exact
                    bar.update(1)
            rows += seq.shape[1]
    stat = covered / rows if statistic == "mean" else block_min
    if dense_layers:  # not calibrated: they keep everything (threshold 1.0, and "dense" when loaded)
        stat[dense_layers], kept[dense_layers], allowed[dense_layers] = 1.0, 1.0, 1.0
    reached = stat >= target_coverage  # monotone in the candidate: a suffix of the grid
    first = smallest_reaching(stat, target_coverage)
    if allocation == "layer":
        from .allocation import allocate_mean

        density = kept / allowed.clamp_min(1)[:, None, None]
        for layer in profiled:
            first[layer] = allocate_mean(stat[layer].T, density[layer].T, target_coverage)
        layer_mean = torch.gather(stat, -1, first[..., None])[..., 0].mean(-1, keepdim=True)
        reached = (layer_mean >= target_coverage - 1e-12).expand(-1, num_heads)[..., None]

    def pick(per_candidate):  # [layers, heads, G] -> the chosen candidate's value
        return torch.gather(per_candidate, -1, first[..., None])[..., 0]

    thresholds = [[1.0 if layer in dense_layers else values[int(i)] for i in row] for layer, row in enumerate(first)]
    missed = int((~reached.any(-1)).sum())
    if missed:
        logger.warning("sparseattn profile: %d (layer, head) pairs miss the target %.4g even at threshold %.4g",
                       missed, target_coverage, values[-1])
    name = model_name or model_display_name(getattr(model.config, "name_or_path", "") or type(model).__name__)
    from . import __version__

    return {
        "format": FORMAT,
        "version": VERSION,
        "model": name,
        "model_type": getattr(model.config, "model_type", None),
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": getattr(text_config, "num_key_value_heads", num_heads),
        "stride": stride,
        "block_size": block_size,
        "target_coverage": float(target_coverage),
        "statistic": statistic,
        "allocation": allocation,
        "candidates": values,
        "calibration": {"tokens": int(ids.shape[1]), "sequences": int(ids.shape[0]), "text": text_source or source,
                        "dtype": str(dtype).replace("torch.", ""), "device": getattr(device, "type", None),
                        "estimator": "triton" if device is not None and device.type == "cuda" else "reference-fp32",
                        "sparseattn_version": __version__},
        "thresholds": thresholds,
        "dense_layers": dense_layers,
        "reached": reached.any(-1).tolist(),
        "coverage": [[round(float(x), 6) for x in row] for row in pick(stat)],
        "density": [[round(float(x), 6) for x in row] for row in pick(kept) / allowed[:, None]],
    }


# ==================================================================================================
# The thresholds file
# ==================================================================================================


def save_xattention_thresholds(doc: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Validate ``doc`` and write it as JSON (one layer per line in ``thresholds``); returns the path."""
    _validate(doc, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(doc), indent=1)
    # Keep each layer's per-head list on one line: 30 layers read as 30 lines, not 300.
    compact = re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text)
    path.write_text((compact if json.loads(compact) == json.loads(text) else text) + "\n")
    return path


def packaged_thresholds() -> dict[str, Path]:
    """Thresholds shipped with the package: ``{slug: path}`` (``sparseattn/data/xattention/*.json``)."""
    return {p.stem: p for p in sorted(DATA_DIR.glob("*.json"))}


def _resolve(path_or_name) -> Path:
    path = Path(os.fspath(path_or_name)).expanduser()
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"thresholds file not found: {path}")
        return path
    shipped = packaged_thresholds()
    slug = thresholds_slug(path_or_name)
    if slug not in shipped:
        raise FileNotFoundError(
            f"no packaged XAttention thresholds for {str(path_or_name)!r} (looked for {slug}.json in {DATA_DIR}); "
            f"packaged: {sorted(shipped) or 'none'}. Pass a .json path, or make one with `sparseattn profile`")
    return shipped[slug]


def _validate(doc, where: str) -> None:
    from .methods.xattention import XAttentionConfig

    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, Mapping) else type(doc).__name__
        raise ValueError(f"{where} is not an XAttention thresholds file: expected format {FORMAT!r}, got {found!r}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: version must be a positive int, got {version!r}")
    if version > VERSION:
        raise ValueError(f"{where} has version {version}, newer than this sparseattn reads ({VERSION}); "
                         "upgrade sparseattn or re-run `sparseattn profile`")
    missing = [key for key in _REQUIRED_KEYS if key not in doc]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {missing} (required: {list(_REQUIRED_KEYS)})")
    try:
        XAttentionConfig(stride=doc["stride"], block_size=doc["block_size"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    layers, heads, thresholds = doc["num_layers"], doc["num_heads"], doc["thresholds"]
    if not isinstance(thresholds, list) or len(thresholds) != layers:
        raise ValueError(f"{where}: thresholds must be a list of num_layers={layers} per-layer lists, got "
                         f"{len(thresholds) if isinstance(thresholds, list) else type(thresholds).__name__}")
    for idx, row in enumerate(thresholds):
        if not isinstance(row, list) or len(row) != heads:
            raise ValueError(f"{where}: thresholds[{idx}] must list num_heads={heads} floats, got {row!r}")
        for value in row:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{where}: thresholds[{idx}] has {value!r}; thresholds lie in (0, 1]")
    dense = doc.get("dense_layers", [])
    if not isinstance(dense, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers
                                          for i in dense):
        raise ValueError(f"{where}: dense_layers must list layer indices in [0, {layers}), got {dense!r}")


def read_xattention_thresholds(path_or_name) -> dict[str, Any]:
    """The validated thresholds document of a ``.json`` path or a packaged model name."""
    path = _resolve(path_or_name)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    _validate(doc, str(path))
    return doc


def load_xattention_thresholds(path_or_name, *, model=None, geometry: bool = True) -> dict[int, dict[str, Any]]:
    """Per-layer XAttention options for ``patch(model, "xattention", layer_configs=...)``.

    Args:
        path_or_name: a ``.json`` thresholds file, or a model name / path whose thresholds ship with
            the package (``"default"``, ``"smollm2"``, ``"SmolLM2-135M-Instruct"``, a ``.gguf`` path
            of it; see :func:`packaged_thresholds`).
        model: when given, the file's layer and head counts must match ``model.config``.
        geometry: also set each layer's ``stride`` and ``block_size`` to the ones the thresholds
            were calibrated with (default True; a threshold means a different coverage at another
            geometry).

    Returns:
        ``{layer_idx: {"threshold": Tensor[Hq] float32, "stride": S, "block_size": bs}}``, plus
        ``"dense": True`` for the file's ``dense_layers`` (sliding-window layers, not calibrated).

    Raises:
        FileNotFoundError: no such file / no packaged thresholds for that name.
        ValueError: not a thresholds file, a newer version, bad values, or a layer/head count
            that differs from ``model``'s.
    """
    doc = read_xattention_thresholds(path_or_name)
    if model is not None:
        text_config = model.config.get_text_config()
        expected = (text_config.num_hidden_layers, text_config.num_attention_heads)
        if (doc["num_layers"], doc["num_heads"]) != expected:
            raise ValueError(
                f"thresholds for {doc['model']!r} have {doc['num_layers']} layers x {doc['num_heads']} query heads, "
                f"but the model has {expected[0]} layers x {expected[1]} query heads")
    extra = {"stride": doc["stride"], "block_size": doc["block_size"]} if geometry else {}
    dense = set(doc.get("dense_layers", []))
    return {layer: {"threshold": torch.tensor(row, dtype=torch.float32), **extra,
                    **({"dense": True} if layer in dense else {})}
            for layer, row in enumerate(doc["thresholds"])}


# ==================================================================================================
# Fidelity
# ==================================================================================================


def xattention_fidelity(captured: Mapping[int, tuple], taus: Iterable[float] = (0.9, 0.95), *, stride: int = 16,
                        block_size: int = 128, scale: float | Mapping[int, float] | None = None,
                        calibrated: Mapping[int, Mapping[str, Any]] | None = None,
                        progress: bool = False) -> list[dict[str, Any]]:
    """Recall of the exact attention mass, output error vs dense, and density, per layer, head, threshold.

    For each layer's ``(q, k, v)`` and threshold, the blocks come from ``select_blocks`` (the fused
    estimator on a GPU, the fp32 reference on a CPU). Then, in fp32 on the same inputs, per query
    row: recall = exact causal softmax mass on the selected blocks; the sparse output is that
    softmax restricted to the selected blocks and renormalized (what the block-sparse kernel
    computes), the dense output the full softmax.

    Args:
        captured: ``{layer: (q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, D])}`` (e.g. ``capture_qkv``).
        taus: scalar thresholds to evaluate (default 0.9, 0.95).
        stride, block_size: XAttention's geometry (default 16, 128).
        scale: softmax scale, or ``{layer: scale}`` (default ``1/sqrt(D)``).
        calibrated: per-layer options from :func:`load_xattention_thresholds`; adds rows with
            ``tau = "calibrated"`` (their stride and block size, if present, override the defaults).
        progress: tqdm bar over layers.

    Returns:
        Rows ``{"layer", "tau", "head", "recall", "recall_p05", "rel_error", "density"}``: recall
        is the mean over query rows (and batch), ``recall_p05`` its 5th percentile, ``rel_error``
        ``||o - o_dense|| / ||o_dense||`` over the head's rows, density the kept fraction of causal
        blocks.
    """
    from tqdm.auto import tqdm

    from .methods.xattention import XAttentionConfig, select_blocks

    settings = [(float(t), XAttentionConfig(threshold=float(t), stride=stride, block_size=block_size)) for t in taus]
    rows = []
    for layer in tqdm(sorted(captured), desc="xattention fidelity", unit="layer", disable=not progress):
        q, k, v = captured[layer]
        _, Hq, _, _, _, D = check_qk(q, k, "xattention_fidelity")
        layer_scale = scale.get(layer) if isinstance(scale, Mapping) else scale
        layer_scale = 1.0 / math.sqrt(D) if layer_scale is None else float(layer_scale)
        layer_settings = list(settings)
        if calibrated is not None:
            options = dict(calibrated[layer])
            layer_settings.append(("calibrated", XAttentionConfig(
                threshold=options["threshold"].to(q.device), stride=options.get("stride", stride),
                block_size=options.get("block_size", block_size))))
        for tau, cfg in layer_settings:
            index = select_blocks(q, k, cfg)
            stats = _masked_fidelity(q, k, v, index.to_mask(), cfg.block_size, layer_scale)
            density = index.density().float().mean(0).cpu()
            for h in range(Hq):
                rows.append({"layer": layer, "tau": tau, "head": h, "recall": round(stats["recall"][h], 6),
                             "recall_p05": round(stats["recall_p05"][h], 6),
                             "rel_error": round(stats["rel_error"][h], 6), "density": round(float(density[h]), 6)})
    return rows


def _masked_fidelity(q, k, v, blocks: torch.Tensor, block_size: int, scale: float) -> dict[str, list[float]]:
    """Per-head recall (mean, 5th percentile) and relative error of block mask ``blocks [B, Hq, nq, nk]``."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    k_grouped, v_grouped = k.float().unsqueeze(2), v.float().unsqueeze(2)
    col_block = torch.arange(Lk, device=q.device) // block_size
    recall = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    err2 = torch.zeros(B, Hq, dtype=torch.float64, device=q.device)
    ref2 = torch.zeros(B, Hq, dtype=torch.float64, device=q.device)
    step = _row_step(B, Hq, Lk, block_size)
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        probs = _exact_probs(q, k_grouped, r0, r1, scale, True)  # [B, Hq, rows, Lk], zero above the diagonal
        selected = blocks[:, :, torch.arange(r0, r1, device=q.device) // block_size][..., col_block]
        kept = torch.where(selected, probs, torch.zeros((), device=q.device))
        row_recall = kept.sum(-1)
        shape = (B, Hkv, Hq // Hkv, r1 - r0, Lk)
        dense = torch.matmul(probs.view(shape), v_grouped).view(B, Hq, r1 - r0, Dv)
        sparse = torch.matmul(kept.view(shape), v_grouped).view(B, Hq, r1 - r0, Dv) / row_recall[..., None]
        recall[:, :, r0:r1] = row_recall
        err2 += (sparse - dense).double().square().sum((2, 3))
        ref2 += dense.double().square().sum((2, 3))
    per_head = recall.transpose(0, 1).reshape(Hq, -1)
    # 5th percentile: the k-th smallest, k = ceil(0.05 n) (torch.quantile refuses > 16M elements).
    p05 = per_head.kthvalue(max(1, math.ceil(0.05 * per_head.shape[1])), dim=-1).values
    return {"recall": per_head.double().mean(-1).tolist(), "recall_p05": p05.tolist(),
            "rel_error": (err2.sum(0) / ref2.sum(0)).sqrt().tolist()}


def summarize_fidelity(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (layer, tau) means over heads, then one ``layer = "all"`` row per tau (mean over layers)."""
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["layer"], row["tau"]), []).append(row)
    keys = ("recall", "recall_p05", "rel_error", "density")
    summary = [{"layer": layer, "tau": tau, **{key: round(sum(r[key] for r in group) / len(group), 6) for key in keys},
                "min_head_recall": min(r["recall"] for r in group),
                "max_head_rel_error": max(r["rel_error"] for r in group)}
               for (layer, tau), group in groups.items()]
    for tau in dict.fromkeys(s["tau"] for s in summary):
        per_tau = [s for s in summary if s["tau"] == tau]
        summary.append({"layer": "all", "tau": tau,
                        **{key: round(sum(s[key] for s in per_tau) / len(per_tau), 6) for key in keys},
                        "min_head_recall": min(s["min_head_recall"] for s in per_tau),
                        "max_head_rel_error": max(s["max_head_rel_error"] for s in per_tau)})
    return summary


def fidelity_table(summary: Iterable[Mapping[str, Any]]) -> str:
    """Markdown: one line per layer, recall / error / density columns for each tau."""
    summary = list(summary)
    taus = list(dict.fromkeys(s["tau"] for s in summary))
    by_key = {(s["layer"], s["tau"]): s for s in summary}
    headers = ["layer"] + [f"{name} @{tau}" for tau in taus for name in ("recall", "p05", "rel err", "density")]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for layer in dict.fromkeys(s["layer"] for s in summary):
        cells = [str(layer)]
        for tau in taus:
            s = by_key[(layer, tau)]
            cells += [f"{s['recall']:.4f}", f"{s['recall_p05']:.4f}", f"{s['rel_error']:.4f}", f"{s['density']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ==================================================================================================
# Command line: `sparseattn profile` (wired in cli.py)
# ==================================================================================================


def add_profile_parser(subparsers):
    """Add the ``profile`` command to an ``argparse`` sub-parser set; returns its parser."""
    parser = subparsers.add_parser(
        "profile", help="calibrate per-head XAttention thresholds on real text (writes a JSON file)",
        description="For each (layer, query head), the smallest XAttention threshold whose block selection keeps "
                    "--target-coverage of the exact attention mass on calibration text (Python standard-library "
                    "source). Load the result with sparseattn.calibrate.load_xattention_thresholds().")
    parser.add_argument("--model", default="default", help="a Hugging Face model folder, a .gguf file, or 'default' "
                        "(the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--target-coverage", type=float, default=0.95,
                        help="exact attention mass to keep (default 0.95)")
    parser.add_argument("--statistic", choices=STATISTICS, default="mean",
                        help="mean: mean coverage over query rows; min_block: the worst query block (stricter)")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default="head",
                        help="head: every head reaches the target; layer: the mean over each layer's heads does, "
                        "at the least density")
    parser.add_argument("--stride", type=int, default=16, help="XAttention stride (4, 8, 16; default 16)")
    parser.add_argument("--block-size", type=int, default=128, help="selection block size (default 128)")
    parser.add_argument("--tokens", type=int, default=None, help="calibration tokens per sequence (default 4096 on a "
                        "CPU; on a GPU min(8192, the model's context))")
    parser.add_argument("--sequences", type=int, default=1, help="calibration sequences (default 1)")
    parser.add_argument("--candidates", default=None, help="comma-separated thresholds to choose from (default "
                        "0.01..1.00 by 0.01, plus 0.995, 0.999)")
    parser.add_argument("--layers-per-pass", type=int, default=None, help="capture this many layers per forward "
                        "pass (default all; fewer saves memory on long inputs)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", default=None, help="output JSON (default xattention-<model>.json in the current "
                        "folder)")
    parser.set_defaults(func=run_profile)
    return parser


def run_profile(args) -> int:
    """``sparseattn profile``: calibrate, write the JSON, print a per-layer summary."""
    import sys
    import time

    from .cli import UsageError, _device, _format_table, _load_model

    device = _device(args.device)
    if not 0 < args.target_coverage <= 1:
        raise UsageError(f"--target-coverage must lie in (0, 1], got {args.target_coverage}")
    try:
        candidates = DEFAULT_CANDIDATES if args.candidates is None else \
            _check_candidates(float(x) for x in args.candidates.split(",") if x.strip())
        from .methods.xattention import XAttentionConfig

        XAttentionConfig(stride=args.stride, block_size=args.block_size)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.sequences < 1 or (args.tokens is not None and args.tokens < args.block_size):
        raise UsageError(f"need --sequences >= 1 and --tokens >= --block-size, got {args.sequences}, {args.tokens}")
    model, tokenizer = _load_model(args.model, device)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 8192
    tokens = args.tokens or (min(8192, limit) if device.type == "cuda" else 4096)
    if tokens > limit:
        raise UsageError(f"--tokens {tokens} is longer than the model's context ({limit})")
    name = model_display_name(args.model)
    start = time.perf_counter()
    doc = profile_xattention(model, tokenizer, target_coverage=args.target_coverage, stride=args.stride,
                             block_size=args.block_size, candidates=candidates, statistic=args.statistic,
                             allocation=args.allocation,
                             tokens=tokens, sequences=args.sequences, layers_per_pass=args.layers_per_pass,
                             model_name=name)
    seconds = time.perf_counter() - start
    out = Path(args.out or f"xattention-{thresholds_slug(args.model)}.json")
    save_xattention_thresholds(doc, out)
    rows = []
    for layer, (thr, cov, dens) in enumerate(zip(doc["thresholds"], doc["coverage"], doc["density"])):
        rows.append([layer, f"{min(thr):.3f}", f"{sum(thr) / len(thr):.3f}", f"{max(thr):.3f}",
                     f"{min(cov):.4f}", f"{sum(dens) / len(dens):.3f}"])
    print(_format_table(["layer", "min tau", "mean tau", "max tau", f"min {args.statistic} coverage",
                         "mean density"], rows))
    print(f"\n{doc['num_layers']} layers x {doc['num_heads']} heads calibrated on {tokens} x {args.sequences} "
          f"tokens in {seconds:.1f} s; wrote {out}\nUse it: patch(model, 'xattention', "
          f"layer_configs=sparseattn.calibrate.load_xattention_thresholds({str(out)!r}))", file=sys.stdout)
    return 0
