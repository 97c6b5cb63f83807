"""``sparseattn eval``: tasks x lengths x samples x methods on the same prompts, resumable.

For every (length, task, sample) one prompt is generated (:mod:`~sparseattn.evaluation.ruler`,
or a LongBench / InfiniteBench file), then answered by dense attention (the model's own SDPA) and
by each method (``sparseattn.patch(model, method, min_sparse_len=..., collect_stats=True)``), with
greedy decoding. Each answer becomes one JSON line in ``results.jsonl``: the prediction, its score,
the density of the sparse prefill calls, the prefill time (the forward over the prompt alone,
synchronized on a GPU) and the settings that produced it. Perplexity rows (one forward over real
text per length and method, :mod:`~sparseattn.evaluation.perplexity`) go to the same file.

Resuming: rows already in the file with the same settings are not computed again; a row with the
same key but other settings is an error (use another output folder). A line cut short by a kill
is dropped. On a GPU the first prefill of each (method, length) is an untimed warm-up.

Example (tiny random model, so the answers are noise):
    >>> import tempfile, torch, transformers                                       # doctest: +SKIP
    >>> from sparseattn.evaluation.runner import run_eval                          # doctest: +SKIP
    >>> rows = run_eval(model, tokenizer, tempfile.mkdtemp(), tasks=["passkey"], lengths=[512],
    ...                 samples=1, methods={"streaming": {"window": 128}})        # doctest: +SKIP
    >>> [(r["method"], r["score"]) for r in rows if r["kind"] == "task"]          # doctest: +SKIP
    [('dense', 0.0), ('streaming', 0.0)]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..api import resolve_config
from ..demo import _eos_ids, config_dict, greedy_decode, parse_overrides
from ..methods import get_method
from . import external, ruler
from .haystack import haystack_ids, source_name
from .perplexity import perplexity
from .scoring import score

logger = logging.getLogger("sparseattn")

__all__ = ["DEFAULT_METHODS", "RESULTS_FILE", "load_rows", "method_options", "run_eval"]

DEFAULT_METHODS = ("xattention", "flexprefill", "minference", "streaming")
RESULTS_FILE = "results.jsonl"


def method_options(items: Iterable[str], methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``["xattention.threshold=0.9", ...]`` -> ``{"xattention": {"threshold": 0.9}, <other method>: {}}``.

    Every method's options are checked against its config (unknown keys, bad values raise ValueError).
    """
    methods = list(methods)
    for name in methods:
        if name == "dense":
            raise ValueError("'dense' is always evaluated; list only sparse methods")
        get_method(name)
    options: dict[str, dict[str, Any]] = {name: {} for name in methods}
    for item in items:
        target, sep, rest = item.partition(".")
        if not sep or target not in options:
            raise ValueError(f"--set takes METHOD.KEY=VALUE with METHOD one of {methods}, got {item!r}")
        options[target].update(parse_overrides([rest]))
    for name, values in options.items():
        try:
            resolve_config(name, **_config_options(values))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: {err}") from err
    return options


# Options that go to patch() itself rather than to the method's config: a per-layer data file
# (``--set xattention.layer_configs=smollm2`` runs the calibrated per-head thresholds).
PATCH_OPTIONS = ("layer_configs",)


def _config_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in PATCH_OPTIONS}


def load_rows(path: Path) -> list[dict]:
    """The rows of a results file; a last line cut short (a killed run) is dropped from the file too."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    rows, good = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(data):
        logger.warning("sparseattn eval: dropping an incomplete last line of %s (a killed run)", path)
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def _key(row: Mapping) -> tuple:
    return row["kind"], row["task"], row["length"], row["sample"], row["method"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _density(stats) -> dict[str, Any]:
    """Density of the recorded prefill calls: over the sparse ones, and over all (dense calls count 1)."""
    sparse = [s.density.mean().item() for s in stats if s.reason == "sparse"]
    every = [s.density.mean().item() for s in stats]
    return {"density": sum(sparse) / len(sparse) if sparse else None,
            "density_all": sum(every) / len(every) if every else None,
            "sparse_calls": len(sparse), "dense_calls": len(every) - len(sparse)}


class _Evaluator:
    """Runs one method on one prompt (or one text for perplexity) and returns the row's measurements."""

    def __init__(self, model, tokenizer, methods, min_sparse_len, max_new_tokens=None):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.methods, self.min_sparse_len = methods, min_sparse_len
        self.device = next(model.parameters()).device
        self.eos = _eos_ids(model, tokenizer)
        self.warmed: set = set()

    def _patched(self, method):
        from ..integrations.transformers import patch

        return patch(self.model, method=method, min_sparse_len=self.min_sparse_len, collect_stats=True,
                     **self.methods[method])

    def _warm(self, method, length, run):
        """One untimed run per (method, length) on a GPU: compilation, autotuning, allocator growth."""
        if self.device.type == "cuda" and (method, length) not in self.warmed:
            with torch.no_grad():  # no autograd graph: at 32K it would hold every layer's activations
                run()
            self.warmed.add((method, length))

    def answer(self, method: str, prompt: ruler.TaskPrompt, length: int) -> dict[str, Any]:
        ids = torch.tensor([prompt.input_ids], device=self.device)
        budget = min(prompt.max_new_tokens, self.max_new_tokens or prompt.max_new_tokens)
        decode = lambda: greedy_decode(self.model, ids, budget, eos_ids=self.eos)  # noqa: E731
        if method == "dense":
            self._warm(method, length, lambda: self.model(input_ids=ids, logits_to_keep=1))
            tokens, prefill_s, decode_s = decode()
            measured = {"density": 1.0, "density_all": 1.0, "sparse_calls": 0, "dense_calls": None}
        else:
            with self._patched(method) as handle:
                self._warm(method, length, lambda: self.model(input_ids=ids, logits_to_keep=1))
                handle.reset_stats()
                tokens, prefill_s, decode_s = decode()
                measured = _density(handle.stats)
        prediction = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return dict(measured, prediction=prediction, score=score(prediction, prompt.answers, prompt.metric),
                    prefill_s=prefill_s, decode_s=decode_s, new_tokens=len(tokens))

    def perplexity(self, method: str, ids: torch.Tensor) -> dict[str, Any]:
        if method == "dense":
            return dict(perplexity(self.model, ids), density=1.0, density_all=1.0, sparse_calls=0, dense_calls=None)
        with self._patched(method) as handle:
            return dict(perplexity(self.model, ids), **_density(handle.stats))


def _dense_options(model) -> dict[str, Any]:
    return {"attn_implementation": getattr(model.config, "_attn_implementation", None)}


def run_eval(model, tokenizer, out_dir, *, tasks: Iterable[str] = tuple(ruler.TASKS), lengths: Iterable[int] = (2048,),
             samples: int = 2, methods: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
             haystack: str = "stdlib", min_sparse_len: int = 0, chat: bool | None = None,
             ppl_lengths: Iterable[int] | None = None, data_dir=None, max_new_tokens: int | None = None,
             model_name: str = "model", progress: bool = True) -> list[dict]:
    """Evaluate dense attention and each method on the same prompts; rows go to ``out_dir/results.jsonl``.

    Args:
        model, tokenizer: a causal LM (eval mode, on its device) and its tokenizer.
        out_dir: folder of ``results.jsonl`` (created; an existing file is resumed).
        tasks: names in :data:`sparseattn.evaluation.ruler.TASKS`.
        lengths: prompt lengths in tokens.
        samples: prompts per task and length (seeds ``seed * 1000 + i``).
        methods: ``{method: {option: value}}`` (default: :data:`DEFAULT_METHODS` at their defaults).
        seed: base seed of the prompts.
        haystack: ``"stdlib"``, ``"repeat"`` or a folder (needle tasks, and the perplexity text
            when it is a folder; otherwise standard-library source).
        min_sparse_len: prefill calls with fewer keys run dense (default 0: every prefill is sparse).
        chat: apply the chat template (default: when the tokenizer has one).
        ppl_lengths: perplexity text lengths (default: ``lengths``; empty: no perplexity).
        data_dir: a folder of LongBench / InfiniteBench ``*.jsonl`` files, evaluated at ``max(lengths)``
            (``samples`` examples per file, the context cut in the middle to fit).
        max_new_tokens: a cap on every task's answer tokens (default: each task's own, 8 to 120).
        model_name: recorded in every row.
        progress: show a tqdm bar.

    Returns:
        Every row of the results file (earlier runs' included), in file order.
    """
    from tqdm.auto import tqdm

    methods = {m: dict(o) for m, o in (methods if methods is not None else {m: {} for m in DEFAULT_METHODS}).items()}
    lengths = list(lengths)
    ppl_lengths = lengths if ppl_lengths is None else list(ppl_lengths)
    for task in tasks:
        if task not in ruler.TASKS:
            raise ValueError(f"unknown task {task!r}; tasks are {sorted(ruler.TASKS)}")
    configs = {m: config_dict(resolve_config(m, **_config_options(o))) for m, o in methods.items()}  # validates
    data_files = external.find_data_files(data_dir) if data_dir is not None else []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    rows = load_rows(path)
    done = {_key(r): r for r in rows}
    has_template = getattr(tokenizer, "chat_template", None) is not None
    chat = has_template if chat is None else chat
    common = {"model": model_name, "seed": seed, "haystack": source_name(haystack), "chat": chat,
              "min_sparse_len": min_sparse_len, "max_new_tokens": max_new_tokens}
    settings = {"dense": dict(common, options=_dense_options(model), min_sparse_len=None)}
    settings.update({m: dict(common, options=methods[m], config=configs[m]) for m in methods})
    settings = json.loads(json.dumps(settings, default=_json_default))  # compared with rows read back

    items: list[tuple] = []  # (kind, task, length, sample, source)
    for length in lengths:
        items += [("task", t, length, i, None) for t in tasks for i in range(samples)]
    if data_files:
        examples = {f.name: external.load_examples(f, samples) for f in data_files}
        items += [("task", f.name, max(lengths), i, f) for f in data_files for i in range(len(examples[f.name]))]
    items += [("ppl", "text", length, 0, None) for length in ppl_lengths]
    names = ["dense", *methods]
    todo = 0
    for kind, task, length, sample, _ in items:
        for name in names:
            row = done.get((kind, task, length, sample, name))
            if row is not None and row["settings"] != settings[name]:
                raise ValueError(
                    f"{path} already holds {kind} {task} length {length} sample {sample} {name} with other settings "
                    f"({row['settings']} vs now {settings[name]}); write to another --out folder or delete the file")
            todo += row is None
    evaluator = _Evaluator(model, tokenizer, methods, min_sparse_len, max_new_tokens)
    bar = tqdm(total=len(items) * len(names), initial=len(items) * len(names) - todo, disable=not progress,
               desc="sparseattn eval", unit="run")
    with open(path, "a", encoding="utf-8") as f:
        for kind, task, length, sample, source in items:
            missing = [n for n in names if (kind, task, length, sample, n) not in done]
            if not missing:
                continue
            if kind == "ppl":
                text_source = haystack if haystack not in ("stdlib", "repeat") else "stdlib"
                ids = torch.tensor([haystack_ids(tokenizer, text_source, length)[:length]])
                prompt_info = {"prompt_tokens": length, "text": source_name(text_source)}
            elif source is not None:
                prompt = external.build_prompt(tokenizer, source, examples[source.name][sample], length, chat=chat,
                                               index=sample)
                prompt_info = {"prompt_tokens": len(prompt.input_ids), "answers": prompt.answers,
                               "metric": prompt.metric, "max_new_tokens": prompt.max_new_tokens,
                               "metadata": prompt.metadata}
            else:
                prompt = ruler.generate(task, tokenizer, length, seed=seed * 1000 + sample, haystack=haystack,
                                        chat=chat)
                prompt_info = {"prompt_tokens": len(prompt.input_ids), "answers": prompt.answers,
                               "metric": prompt.metric, "max_new_tokens": prompt.max_new_tokens,
                               "metadata": prompt.metadata}
            for name in missing:
                bar.set_postfix_str(f"{task} {length} #{sample} {name}")
                measured = evaluator.perplexity(name, ids) if kind == "ppl" else evaluator.answer(name, prompt, length)
                row = {"kind": kind, "task": task, "length": length, "sample": sample, "method": name,
                       **prompt_info, **measured, "settings": settings[name]}
                f.write(json.dumps(row, default=_json_default) + "\n")
                f.flush()
                rows.append(row)
                done[_key(row)] = row
                bar.update(1)
    bar.close()
    return rows


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
