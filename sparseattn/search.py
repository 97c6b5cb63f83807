"""Offline search of MInference's per-(layer, head) patterns (METHODS.md, MInference step 6).

For each layer, the model's post-RoPE `q`/`k` are captured on calibration text
(:func:`sparseattn.bench.capture.capture_qkv`). Every candidate pattern builds its index for all
heads of the layer at once (the same selectors the method runs: Triton on a GPU, the fp32
reference on a CPU). Per head and candidate two numbers are measured, in query chunks (nothing
``L x L`` at once):

- **recall**: the exact attention mass the index keeps, ``sum_{(i, j) in index} softmax(q_i k^T)_j``,
  averaged over query rows (1 = every row keeps all of its mass);
- **cost**: (query, key) pairs the kernel computes (the index's causal element mask) plus the
  estimation's score pairs (``2 n Lk`` for vertical-and-slash, ``nq nk`` for block_sparse), as a
  fraction of dense causal attention's pairs. FLOPs are proportional to pairs (``4 D`` per pair).

Each head takes the candidate of highest recall whose cost is at most ``flops_budget``
(ties: lower cost, then candidate order); a head that no candidate fits takes the cheapest one.
The result is a :class:`sparseattn.methods.minference.MInferencePatterns`, written as the versioned
JSON documented there and loaded by model name or path with ``load_minference_patterns``.

The candidates' sizes are tokens, chosen relative to the calibration length (:func:`default_candidates`),
and are stored as tokens: search at about the prompt lengths you will run (the embedded model's
context is 8K; its table was searched at 4K).

Command line (wired as ``sparseattn search``; the exact command of the shipped table is in its
``search.command`` field and in docs/methods.md)::

    python -m sparseattn.search --model default --tokens 4096 --budget 0.25
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .allocation import allocate_mean
from .index import VerticalSlashIndex, cdiv
from .methods.minference import PATTERN_DIR, PATTERNS, MInferenceConfig, MInferencePatterns, model_key, select_blocks

__all__ = ["Candidate", "add_search_parser", "default_candidates", "measure_candidates", "run_search",
           "search_minference"]

logger = logging.getLogger("sparseattn")

DEFAULT_BUDGET = 0.25
DEFAULT_TOKENS = 4096
_CHUNK_ELEMENTS = 1 << 24  # probabilities per query chunk (64 MiB of fp32)


@dataclass(frozen=True)
class Candidate:
    """One pattern with its sizes: ``v``/``s`` mean verticals/slashes, sink/window, or top-k blocks/0."""

    pattern: str
    v: int
    s: int

    def __post_init__(self):
        MInferenceConfig(head_patterns=((self.pattern, self.v, self.s),))  # validates

    def config(self, last_q: int, block_size: int) -> MInferenceConfig:
        if self.pattern == "vertical_and_slash":
            return MInferenceConfig(vertical_size=self.v, slash_size=self.s, last_q=last_q, block_size=block_size)
        if self.pattern == "a_shape":
            return MInferenceConfig(pattern="a_shape", sink=self.v, window=self.s, block_size=block_size)
        return MInferenceConfig(pattern="block_sparse", top_k=max(1, self.v), block_size=block_size)

    def as_list(self) -> list:
        return [self.pattern, self.v, self.s]


def default_candidates(length: int, block_size: int = 64) -> list[Candidate]:
    """Up to 15 candidates scaled to the calibration ``length``, costing ~10-50% of dense there:
    vertical-and-slash ``v in L/{128,32,8}`` x ``s in L/{64,32,16}``, A-shape ``(64, L/32), (64, L/16),
    (128, L/8)`` and block_sparse ``top_k in nk/{16,8,4}`` (``nk = L / block_size``).

    Example:
        >>> [c.as_list() for c in default_candidates(4096)][:2]
        [['vertical_and_slash', 32, 64], ['vertical_and_slash', 32, 128]]
    """
    L, nk = length, cdiv(length, block_size)
    out = [Candidate("vertical_and_slash", max(1, L // dv), max(1, L // ds))
           for dv in (128, 32, 8) for ds in (64, 32, 16)]
    out += [Candidate("a_shape", sink, max(1, L // dw)) for sink, dw in ((64, 32), (64, 16), (128, 8))]
    out += [Candidate("block_sparse", max(1, nk // d), 0) for d in (16, 8, 4)]
    return list(dict.fromkeys(out))  # short lengths can repeat a candidate


def _as_ranges(index) -> VerticalSlashIndex:
    """Any index as key ranges + columns (a BlockIndex's blocks are ranges at block starts)."""
    if isinstance(index, VerticalSlashIndex):
        return index
    starts = torch.where(index.indices >= 0, index.indices * index.block_k, torch.full_like(index.indices, -1))
    B, H, nq, _ = starts.shape
    none = torch.full((B, H, nq, 1), -1, dtype=torch.int32, device=starts.device)
    return VerticalSlashIndex(starts, index.counts, none, torch.zeros_like(index.counts), index.block_q,
                              index.block_k, index.q_len, index.k_len)


def _estimation_pairs(candidate: Candidate, q_len: int, k_len: int, last_q: int, block_size: int) -> float:
    if candidate.pattern == "vertical_and_slash":
        return 2.0 * min(last_q, q_len) * k_len  # log-sum-exp pass + sums pass
    if candidate.pattern == "block_sparse":
        return float(cdiv(q_len, block_size) * cdiv(k_len, block_size))
    return 0.0


def _build_indices(q, k, candidates: list[Candidate], last_q: int, block_size: int) -> list[VerticalSlashIndex]:
    """Every candidate's index for all heads; the vertical-and-slash candidates share one estimation."""
    Lq, Lk = q.shape[2], k.shape[2]
    indices, scores = [], None
    for c in candidates:
        if c.pattern != "vertical_and_slash":
            indices.append(_as_ranges(select_blocks(q, k, c.config(last_q, block_size), causal=True)))
            continue
        from .kernels.minference_index import last_query_scores_fast, vertical_slash_index_fast
        from .reference.minference import last_query_scores

        if scores is None:
            estimate = last_query_scores_fast if q.is_cuda else last_query_scores
            scores = estimate(q, k, min(last_q, Lq), True)[:2]
        indices.append(vertical_slash_index_fast(*scores, vertical_sizes=c.v, slash_sizes=c.s, q_len=Lq, k_len=Lk,
                                                 block_size=block_size))
    return indices


@torch.no_grad()
def measure_candidates(q: torch.Tensor, k: torch.Tensor, candidates: list[Candidate], *, last_q: int = 64,
                       block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall and cost of every candidate on one layer's `q [B, Hq, L, D]`, `k [B, Hkv, L, D]` (causal).

    The exact probabilities are computed once per chunk of query blocks and summed over each
    block's rows (`[B, Hq, blocks, Lk]`); a candidate's kept mass is then, per query block, prefix-sum
    differences over its key ranges plus its columns' entries. Its pairs are the index's exact
    token-level count (``VerticalSlashIndex.density``).

    Returns:
        ``(recall, cost)``, each `[len(candidates), Hq]` fp32 (averaged over the batch): the mean
        kept attention mass per query row, and the computed pairs (+ estimation) over dense causal pairs.

    Example:
        >>> q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16)
        >>> recall, cost = measure_candidates(q, k, [Candidate("a_shape", 256, 256)], block_size=64)
        >>> round(recall.min().item(), 4), round(cost.max().item(), 4)  # everything kept, at dense cost
        (1.0, 1.0)
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, bs, device = Hq // Hkv, block_size, q.device
    indices = _build_indices(q, k, candidates, last_q, bs)
    kf_t = k.float().transpose(-1, -2)
    kpos = torch.arange(Lk, device=device)
    kept = torch.zeros(len(candidates), B, Hq, dtype=torch.float64, device=device)
    rows_per_chunk = max(bs, _CHUNK_ELEMENTS // (B * Hq * Lk) // bs * bs)
    for r0 in range(0, Lq, rows_per_chunk):
        r1 = min(Lq, r0 + rows_per_chunk)
        rows, qb0 = r1 - r0, r0 // bs
        scores = torch.matmul(q[:, :, r0:r1].float().reshape(B, Hkv, G * rows, D), kf_t) / math.sqrt(D)
        pos = torch.arange(r0, r1, device=device) + (Lk - Lq)  # [rows] absolute positions
        scores = scores.view(B, Hq, rows, Lk).masked_fill(kpos > pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # exact, 0 past each row's diagonal
        scores = None
        nb = cdiv(rows, bs)
        if nb * bs != rows:  # a partial last block
            probs = torch.nn.functional.pad(probs, (0, 0, 0, nb * bs - rows))
        block_mass = probs.view(B, Hq, nb, bs, Lk).sum(3)
        probs = None
        prefix = torch.nn.functional.pad(torch.cumsum(block_mass, dim=-1, dtype=torch.float64), (1, 0))
        for c, index in enumerate(indices):
            starts = index.range_starts[:, :, qb0:qb0 + nb].long()  # [B, Hq, nb, width]
            valid = torch.arange(starts.shape[-1], device=device) < index.range_counts[:, :, qb0:qb0 + nb, None]
            lo = torch.where(valid, starts, torch.zeros_like(starts))
            hi = torch.where(valid, (starts + index.block_k).clamp_max(Lk), lo)
            kept[c] += (prefix.gather(-1, hi) - prefix.gather(-1, lo)).sum((-1, -2))
            cols = index.columns[:, :, qb0:qb0 + nb].long()
            c_valid = torch.arange(cols.shape[-1], device=device) < index.column_counts[:, :, qb0:qb0 + nb, None]
            mass = block_mass.gather(-1, torch.where(c_valid, cols, torch.zeros_like(cols)))
            kept[c] += torch.where(c_valid, mass, torch.zeros((), device=device)).sum((-1, -2), dtype=torch.float64)
    dense_pairs = Lq * (Lk - Lq) + Lq * (Lq + 1) / 2
    estimation = torch.tensor([_estimation_pairs(c, Lq, Lk, last_q, bs) for c in candidates], device=device,
                              dtype=torch.float64)
    pairs = torch.stack([index.density(True).double() * dense_pairs for index in indices])  # [n, B, Hq]
    recall = (kept / Lq).mean(1)
    cost = ((pairs + estimation[:, None, None]) / dense_pairs).mean(1)
    return recall.float(), cost.float()


def choose(recall: torch.Tensor, cost: torch.Tensor, flops_budget: float,
           target_recall: float | None = None, scope: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the candidate of highest recall with ``cost <= flops_budget`` (ties: cheaper, then earlier).

    With ``target_recall`` the rule turns around, to the cheapest choices within the budget that keep
    the target:

    - ``scope="layer"`` (default): the mean recall over the heads reaches it at the least mean cost
      (:func:`sparseattn.allocation.allocate_mean`: cost goes to the heads where it buys most mass);
    - ``scope="head"``: every head reaches it with its cheapest such candidate (ties: earlier); a
      head that none reaches falls back to the highest recall within the budget.

    Returns ``(choice [Hq] long, fits [Hq] bool)``; heads that nothing fits take the cheapest candidate.

    Example:
        >>> recall = torch.tensor([[0.9, 0.5], [0.99, 0.99], [0.95, 0.6]])
        >>> cost = torch.tensor([[0.1, 0.1], [0.5, 0.05], [0.1, 0.2]])
        >>> choose(recall, cost, 0.2)
        (tensor([2, 1]), tensor([True, True]))
        >>> choose(recall, cost, 1.0, target_recall=0.9, scope="head")  # head 0: 0.9 at 0.1 beats 0.99 at 0.5
        (tensor([0, 1]), tensor([True, True]))
    """
    if scope not in ("layer", "head"):
        raise ValueError(f"scope must be 'layer' or 'head', got {scope!r}")
    n = recall.shape[0]
    order = torch.arange(n, dtype=torch.float64, device=recall.device)[:, None]
    # Lexicographic: recall, then lower cost, then earlier candidate.
    key = recall.double() * 1e6 - cost.double() * 1e-2 - order * 1e-9
    fits = cost <= flops_budget
    best = torch.where(fits, key, torch.full_like(key, -math.inf)).argmax(0)
    if target_recall is not None:
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall!r}")
        if scope == "layer":
            best = allocate_mean(recall, cost, target_recall, allowed=fits)
        else:
            reach = fits & (recall >= target_recall)
            cheap = torch.where(reach, -cost.double() - order * 1e-9, torch.full_like(key, -math.inf)).argmax(0)
            best = torch.where(reach.any(0), cheap, best)
    cheapest = cost.argmin(0)
    any_fit = fits.any(0)
    return torch.where(any_fit, best, cheapest), any_fit


def search_minference(model, tokenizer=None, *, input_ids: torch.Tensor | None = None, texts=None,
                      length: int = DEFAULT_TOKENS, flops_budget: float = DEFAULT_BUDGET,
                      target_recall: float | None = None, target_scope: str = "layer",
                      candidates: list[Candidate] | None = None, last_q: int = 64, block_size: int = 64,
                      layers=None, layers_per_pass: int | None = None, model_name: str | None = None,
                      aliases=(), progress: bool = True, info: dict | None = None) -> MInferencePatterns:
    """Search every (layer, query head) of ``model`` for the MInference pattern of best recall under a FLOPs budget.

    Args:
        model: a Hugging Face causal LM whose attention goes through ``ALL_ATTENTION_FUNCTIONS``.
        tokenizer: its tokenizer (needed unless ``input_ids`` is given).
        input_ids: `[B, L]` calibration token ids; default: ``texts`` joined, or Python standard
            library source (:func:`sparseattn.bench.capture.real_text_ids`), cut to ``length``.
        texts: calibration strings (joined with blank lines) used when ``input_ids`` is None.
        length: calibration tokens (default 4096).
        flops_budget: the largest cost (fraction of dense causal attention) a head may take (default 0.25).
        target_recall: if set, the cheapest choices within the budget keeping this recall
            (:func:`choose`) instead of the highest recall: per layer as the mean over its heads
            (``target_scope="layer"``, default) or for every head (``"head"``).
        target_scope: ``"layer"`` or ``"head"``, see ``target_recall``.
        candidates: patterns to try (default :func:`default_candidates` of the length).
        last_q, block_size: MInference's estimation rows and block size.
        layers: layer indices to search (default all).
        layers_per_pass: layers captured per forward pass (default: as many as fit ~1 GiB of q/k/v).
        model_name: stored as the table's ``model`` (default: the model config's ``name_or_path`` key).
        aliases: other names to find the table by.
        progress: show a progress bar (tqdm) over layers.
        info: extra provenance merged into the table's ``search`` record (e.g. the command line).

    Returns:
        :class:`MInferencePatterns` (``save(path)`` writes the JSON).
    """
    from tqdm.auto import tqdm

    from .bench.capture import capture_qkv, real_text_ids

    if not 0 < flops_budget <= 1:
        raise ValueError(f"flops_budget must be in (0, 1], got {flops_budget!r}")
    if target_recall is not None and not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall!r}")
    if target_scope not in ("layer", "head"):
        raise ValueError(f"target_scope must be 'layer' or 'head', got {target_scope!r}")
    start = time.perf_counter()
    calibration = "caller's input_ids"
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("search_minference needs a tokenizer, or input_ids")
        if texts is not None:
            text = "\n\n".join([texts] if isinstance(texts, str) else list(texts))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) < length:
                raise ValueError(f"texts give {len(ids)} tokens, fewer than length={length}")
            input_ids = torch.tensor([ids[:length]])
            calibration = "caller's texts"
        else:
            input_ids = real_text_ids(tokenizer, length)
            calibration = "sparseattn.bench.capture.real_text_ids: Python standard-library source"
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    L = input_ids.shape[1]
    candidates = list(candidates) if candidates is not None else default_candidates(L, block_size)
    if not candidates:
        raise ValueError("candidates must not be empty")
    cfg = model.config
    num_layers = cfg.num_hidden_layers
    layers = list(range(num_layers)) if layers is None else sorted(set(layers))
    if layers_per_pass is None:
        heads = cfg.num_attention_heads + 2 * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_layer = input_ids.numel() * heads * head_dim * 4
        layers_per_pass = max(1, (1 << 30) // max(1, per_layer))

    table: dict[int, tuple] = {}
    scores: dict[int, tuple] = {}
    chosen_costs, over_budget = [], 0
    bar = tqdm(total=len(layers), desc="minference search", unit="layer", disable=not progress)
    for p0 in range(0, len(layers), layers_per_pass):
        captured = capture_qkv(model, input_ids, layers=layers[p0:p0 + layers_per_pass])
        for layer in layers[p0:p0 + layers_per_pass]:
            q, k, _ = captured.pop(layer)
            recall, cost = measure_candidates(q, k, candidates, last_q=last_q, block_size=block_size)
            choice, fits = choose(recall, cost, flops_budget, target_recall, target_scope)
            heads = range(q.shape[1])
            table[layer] = tuple(tuple(candidates[int(choice[h])].as_list()) for h in heads)
            scores[layer] = tuple(float(recall[choice[h], h]) for h in heads)
            chosen_costs += [float(cost[choice[h], h]) for h in heads]
            over_budget += int((~fits).sum())
            bar.set_postfix(recall=f"{sum(scores[layer]) / len(scores[layer]):.3f}")
            bar.update(1)
        captured = None  # release the activations before the next pass
    bar.close()

    counts = {p: sum(e[0] == p for heads in table.values() for e in heads) for p in sorted(PATTERNS)}
    all_recall = [r for rs in scores.values() for r in rs]
    name = model_name or str(getattr(cfg, "name_or_path", "") or "model")
    record = {
        "calibration": calibration,
        "tokens": int(L), "batch": int(input_ids.shape[0]), "flops_budget": flops_budget,
        "rule": ("highest recall within the budget" if target_recall is None else
                 f"cheapest within the budget keeping recall {target_recall} "
                 + ("as the mean over each layer's heads" if target_scope == "layer" else "in every head")),
        "cost": "computed (query, key) pairs + estimation pairs, over dense causal pairs",
        "recall": "exact attention mass kept, mean over query rows",
        "block_size": block_size, "last_q": last_q,
        "candidates": [c.as_list() for c in candidates],
        "summary": {"mean_recall": round(sum(all_recall) / len(all_recall), 6),
                    "mean_cost": round(sum(chosen_costs) / len(chosen_costs), 6),
                    "heads_over_budget": over_budget, "patterns": counts},
        "device": str(next(model.parameters()).device),
        "torch": torch.__version__, "seconds": round(time.perf_counter() - start, 1),
    }
    record.update(info or {})
    return MInferencePatterns(name, table, scores, tuple(aliases), record)


# ---- command line ---------------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="default", help="a Hugging Face model folder, a .gguf file, or "
                        "'default' (the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens (default 4096)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help="largest cost per head, as a fraction of dense causal attention (default 0.25)")
    parser.add_argument("--target-recall", type=float, default=None,
                        help="the cheapest patterns keeping this exact-attention recall, instead of the highest "
                        "recall within the budget")
    parser.add_argument("--target-scope", choices=("layer", "head"), default="layer",
                        help="--target-recall as the mean over each layer's heads (default) or for every head")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--last-q", type=int, default=64)
    parser.add_argument("--layers", default=None, help="comma-separated layer indices (default all)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", default=None, help="JSON path (default sparseattn/data/minference/<model>.json "
                        "inside the package)")
    parser.add_argument("--name", default=None, help="model name stored in the file (default: from --model)")
    parser.set_defaults(func=run_search)
    return parser


_DESCRIPTION = ("Capture q/k of every layer on calibration text (Python standard-library source) and pick, per "
                "(layer, query head), the MInference pattern of highest exact attention recall whose cost fits the "
                "FLOPs budget; write a versioned JSON table loadable by model name or path.")


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``search`` command to an ``argparse`` subparsers object (its ``func`` is :func:`run_search`)."""
    parser = subparsers.add_parser(
        "search", help="offline MInference pattern search: best pattern per (layer, head) under a FLOPs budget",
        description=_DESCRIPTION)
    return _add_arguments(parser)


def _model_identity(model_arg: str) -> tuple[str, tuple[str, ...]]:
    from .models import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAMES

    if model_arg.lower() in DEFAULT_MODEL_NAMES:
        name = DEFAULT_MODEL_FILE.split(".")[0]  # SmolLM2-135M-Instruct
        return name, tuple(sorted(DEFAULT_MODEL_NAMES))
    base = Path(model_arg.rstrip("/\\")).name
    for suffix in (".gguf", ".json"):
        base = base[: -len(suffix)] if base.lower().endswith(suffix) else base
    return base, ()


def run_search(args) -> int:
    """Run the ``search`` command (``args`` from :func:`add_search_parser`); prints a summary, returns 0."""
    from .models import load_llama

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers = None if not args.layers else [int(x) for x in args.layers.split(",")]
    name, aliases = _model_identity(args.model)
    name = args.name or name
    out = Path(args.out) if args.out else PATTERN_DIR / f"{model_key(name)}.json"
    command = " ".join(["sparseattn search"] + _argv_for(args))
    print(f"Loading {args.model} on {device} ...", flush=True)
    model, tokenizer = load_llama(args.model, device=device)
    patterns = search_minference(model, tokenizer, length=args.tokens, flops_budget=args.budget,
                                 target_recall=args.target_recall, target_scope=args.target_scope,
                                 block_size=args.block_size, last_q=args.last_q, layers=layers, model_name=name,
                                 aliases=aliases, info={"command": command})
    path = patterns.save(out)
    summary = patterns.search["summary"]
    print(f"{name}: {len(patterns.layers)} layers; mean recall {summary['mean_recall']:.4f}, mean cost "
          f"{summary['mean_cost']:.4f} of dense (budget {args.budget}); patterns {summary['patterns']}; "
          f"{summary['heads_over_budget']} heads over budget; {patterns.search['seconds']} s")
    print(f"wrote {path}")
    return 0


def _argv_for(args) -> list[str]:
    """The command-line flags that reproduce ``args``."""
    flags = [f"--model {args.model}", f"--tokens {args.tokens}", f"--budget {args.budget}",
             f"--block-size {args.block_size}", f"--last-q {args.last_q}"]
    if args.target_recall is not None:
        flags.append(f"--target-recall {args.target_recall} --target-scope {args.target_scope}")
    if args.layers:
        flags.append(f"--layers {args.layers}")
    if args.name:
        flags.append(f"--name {args.name}")
    return flags


def main(argv=None) -> int:
    parser = _add_arguments(argparse.ArgumentParser(prog="python -m sparseattn.search", description=_DESCRIPTION))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
