"""``sparseattn demo`` and ``sparseattn generate``: a real model, a real long prompt, every method.

The demo hides a passkey in a long prompt of standard-library source (:mod:`sparseattn.tasks`),
then answers it with dense attention (the model's own SDPA) and with each sparse method
(``sparseattn.patch(model, method=..., min_sparse_len=0, collect_stats=True)``), all on the same
prompt with greedy decoding. Per method it reports the answer, whether it holds the passkey, the
mean density of the sparse attention calls, and the prefill time (the forward over the prompt
alone, decoding excluded) against dense.

``sparseattn generate`` streams a greedy answer to any prompt with any method; ``--set`` options
are parsed by :func:`parse_overrides`.

Example:
    >>> from sparseattn.demo import parse_overrides
    >>> parse_overrides(["threshold=0.9", "stride=8", "adaptive_budget=none"])
    {'threshold': 0.9, 'stride': 8, 'adaptive_budget': None}
    >>> from sparseattn.models import load_llama                              # doctest: +SKIP
    >>> from sparseattn.demo import run_demo                                  # doctest: +SKIP
    >>> model, tokenizer = load_llama()                                       # doctest: +SKIP
    >>> result = run_demo(model, tokenizer, context=2048, methods=["xattention"])  # doctest: +SKIP
    >>> [(row["method"], row["correct"]) for row in result["rows"]]          # doctest: +SKIP
    [('dense', True), ('xattention', True)]
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch

from .tasks import build_passkey_prompt, is_correct

__all__ = ["DEMO_METHODS", "MethodResult", "config_dict", "demo_settings", "describe_methods", "greedy_decode",
           "parse_overrides", "parse_value", "run_demo", "run_generate", "table_rows"]

DEMO_METHODS = ("xattention", "flexprefill", "minference", "streaming")
TABLE_HEADERS = ("method", "settings", "answer", "correct", "density", "prefill (s)", "speedup")
MAX_DEMO_CONTEXT = 8192
# MInference's defaults (1000 verticals, 6096 slashes) are sized for 128K prompts: below ~7K tokens
# they keep every key. The demo scales the budget with the prompt instead: 10% of the keys (the
# seed's config/xattn_config.json value), 20% as verticals and 80% as slashes.
_DEMO_OVERRIDES = {"minference": {"adaptive_budget": 0.1}}
_DEMO_REASONS = {"minference": "the default 1000 verticals + 6096 slashes are sized for 128K prompts and keep "
                               "every key below ~7K tokens"}
# The options shown in the table (the JSON output has every field).
_TABLE_KEYS = {"xattention": ("threshold", "stride", "block_size"), "flexprefill": ("gamma", "tau", "block_size"),
               "minference": ("pattern", "adaptive_budget", "vertical_size", "slash_size"),
               "streaming": ("sink", "window", "block_size")}


def demo_settings(method: str, overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    """``(options, resolved config)`` of ``method`` in the demo: the demo's settings, then ``overrides``."""
    from .api import resolve_config

    options = dict(_DEMO_OVERRIDES.get(method, {}))
    options.update(overrides or {})
    return options, resolve_config(method, **options)


def config_dict(config) -> dict[str, Any]:
    """A method config's fields as plain JSON values (per-head tensors become lists)."""
    if config is None:
        return {}
    values = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values[f.name] = value.tolist() if isinstance(value, torch.Tensor) else value
    return values


def _short_settings(method: str, config: dict[str, Any]) -> str:
    """The few options worth a table column (all of them for a method we know nothing about)."""
    keys = list(_TABLE_KEYS.get(method, tuple(config)))
    if method == "minference":  # an adaptive budget replaces the two sizes
        keys = [k for k in keys if k not in (("vertical_size", "slash_size") if config.get("adaptive_budget")
                                             else ("adaptive_budget",))]
    return " ".join(f"{key}={config[key]}" for key in keys if key in config)


def describe_methods(methods: Iterable[str], overrides: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """One line per method: its main options and where they come from (defaults, the demo, the user)."""
    overrides = overrides or {}
    lines = []
    width = max((len(m) for m in methods), default=0)
    for method in methods:
        options, config = demo_settings(method, overrides.get(method))
        demo_only = {k: v for k, v in _DEMO_OVERRIDES.get(method, {}).items() if k not in overrides.get(method, {})}
        source = []
        if demo_only:
            reason = f" ({_DEMO_REASONS[method]})" if method in _DEMO_REASONS else ""
            source.append("demo setting " + ", ".join(f"{k}={v}" for k, v in demo_only.items()) + reason)
        if overrides.get(method):
            source.append("--set " + ", ".join(f"{k}={v}" for k, v in overrides[method].items()))
        lines.append(f"  {method:<{width}}  {_short_settings(method, config_dict(config))}  "
                     f"[{'; '.join(source) or 'defaults'}]")
    return lines


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, max_new_tokens: int, *, eos_ids: Iterable[int] = (),
                  warmup: int = 0) -> tuple[list[int], float, float]:
    """Greedy decoding with the prefill timed on its own.

    Args:
        model: a causal LM.
        input_ids: `[1, L]` on the model's device.
        max_new_tokens: most tokens to generate (stops early at an ``eos_ids`` token).
        eos_ids: token ids that end the answer (kept out of it).
        warmup: untimed prefills first (GPU: kernel compilation, autotuning, allocator).

    Returns:
        ``(new token ids, prefill seconds, decode seconds)``.
    """
    device = input_ids.device
    eos_ids = set(eos_ids)
    for _ in range(warmup):
        model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)  # logits of the last position only
    _sync(device)
    prefill_s = time.perf_counter() - start
    cache, generated = out.past_key_values, []
    next_id = out.logits[:, -1].argmax(-1)
    start = time.perf_counter()
    while len(generated) < max_new_tokens:
        token = int(next_id)
        if token in eos_ids:
            break
        generated.append(token)
        if len(generated) == max_new_tokens:
            break
        out = model(input_ids=next_id[:, None], past_key_values=cache, use_cache=True)
        cache, next_id = out.past_key_values, out.logits[:, -1].argmax(-1)
    _sync(device)
    return generated, prefill_s, time.perf_counter() - start


@dataclass
class MethodResult:
    """One row of the demo.

    Attributes:
        method: ``"dense"`` or a sparse method's name.
        config: the method's full config (empty for dense).
        options: the options set on top of the method's defaults (the demo's and the caller's).
        answer: the decoded answer.
        correct: whether the answer holds the passkey.
        density: mean fraction of causal blocks computed over the sparse attention calls
            (1.0 for dense).
        sparse_calls: prefill attention calls that ran sparse (one per layer).
        prefill_s: seconds of the forward over the prompt.
        decode_s: seconds of decoding the answer.
        speedup: dense prefill time / this prefill time.
    """

    method: str
    config: dict[str, Any]
    options: dict[str, Any]
    answer: str
    correct: bool
    density: float
    sparse_calls: int
    prefill_s: float
    decode_s: float
    speedup: float


def _run_one(model, tokenizer, input_ids, method, overrides, max_new_tokens, warmup, passkey) -> MethodResult:
    from .integrations.transformers import patch

    eos = _eos_ids(model, tokenizer)
    if method == "dense":
        tokens, prefill_s, decode_s = greedy_decode(model, input_ids, max_new_tokens, eos_ids=eos, warmup=warmup)
        density, calls, options, config = 1.0, 0, {}, None
    else:
        options, config = demo_settings(method, overrides)
        with patch(model, method=method, config=config, min_sparse_len=0, collect_stats=True) as handle:
            tokens, prefill_s, decode_s = greedy_decode(model, input_ids, max_new_tokens, eos_ids=eos,
                                                        warmup=warmup)
            # Warm-up prefills recorded too; the timed one is the last num_layers sparse calls.
            sparse = [s for s in handle.stats if s.reason == "sparse"]
            num_layers = model.config.get_text_config().num_hidden_layers
            sparse = sparse[-num_layers:] if warmup else sparse
        density = sum(s.density.mean().item() for s in sparse) / len(sparse) if sparse else math.nan
        calls = len(sparse)
    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return MethodResult(method, config_dict(config), options, answer, is_correct(answer, passkey), density, calls,
                        prefill_s, decode_s, speedup=math.nan)


def run_demo(model, tokenizer, *, context: int, methods: Iterable[str] = DEMO_METHODS, depth: float = 0.5,
             max_new_tokens: int = 12, overrides: dict[str, dict[str, Any]] | None = None,
             warmup: int | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Answer one passkey prompt with dense attention and with each method.

    Args:
        model, tokenizer: a causal LM (on its device, in eval mode) and its tokenizer.
        context: prompt length in tokens, chat template included.
        methods: sparse methods to compare with dense (default: the four built-in ones).
        depth: where the needle sits in the haystack, in [0, 1].
        max_new_tokens: most answer tokens (greedy).
        overrides: ``{method: {option: value}}`` on top of the demo's settings.
        warmup: untimed prefills per method (default 1 on a GPU, 0 on a CPU).
        progress: called with a line per step (the CLI prints them).

    Returns:
        ``{"prompt": {...}, "device": ..., "dtype": ..., "rows": [MethodResult as dict, ...]}``,
        dense first.
    """
    from .methods import get_method

    methods = list(methods)
    for method in methods:
        get_method(method)  # unknown names fail before the long runs
    say = progress or (lambda msg: None)
    device = next(model.parameters()).device
    warmup = (1 if device.type == "cuda" else 0) if warmup is None else warmup
    prompt = build_passkey_prompt(tokenizer, context, depth=depth)
    input_ids = torch.tensor([prompt.input_ids], device=device)
    passkey_line = f"The secret passkey is {prompt.answer}."
    say(f"Prompt: {len(prompt.input_ids)} tokens of Python standard-library source, "
        f"needle \"{passkey_line}\" at token {prompt.needle_token_index} (depth {prompt.depth:.2f})"
        + (", chat template" if prompt.chat else ""))
    with torch.no_grad():  # one-time costs (thread pools, allocator, kernel init) out of dense's timing
        model(input_ids=input_ids[:, :256], logits_to_keep=1)
    rows: list[MethodResult] = []
    for method in ["dense"] + methods:
        say(f"  {method}: prefill {context} tokens + up to {max_new_tokens} new tokens ...")
        row = _run_one(model, tokenizer, input_ids, method, (overrides or {}).get(method), max_new_tokens, warmup,
                       prompt.answer)
        row.speedup = rows[0].prefill_s / row.prefill_s if rows else 1.0
        say(f"    answer {row.answer!r} ({'correct' if row.correct else 'wrong'}), prefill {row.prefill_s:.2f} s"
            + (f", density {100 * row.density:.1f}%" if method != "dense" else ""))
        rows.append(row)
    return {
        "prompt": {"tokens": len(prompt.input_ids), "needle_token_index": prompt.needle_token_index,
                   "depth": prompt.depth, "answer": prompt.answer, "chat": prompt.chat},
        "device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "max_new_tokens": max_new_tokens, "warmup": warmup,
        "rows": [asdict(row) for row in rows],
    }


def table_rows(result: dict[str, Any]) -> list[tuple]:
    """The demo's table rows (headers: :data:`TABLE_HEADERS`)."""
    rows = []
    for row in result["rows"]:
        dense = row["method"] == "dense"
        short = "SDPA" if dense else _short_settings(row["method"], row["config"])
        rows.append((row["method"], short, repr(row["answer"][:40]), "yes" if row["correct"] else "no",
                     "100%" if dense else f"{100 * row['density']:.1f}%", f"{row['prefill_s']:.2f}",
                     f"{row['speedup']:.2f}x"))
    return rows


# --------------------------------------------------------------------------------------------
# sparseattn generate
# --------------------------------------------------------------------------------------------


def parse_value(text: str):
    """``"8"`` -> 8, ``"0.9"`` -> 0.9, ``"true"``/``"false"`` -> bool, ``"none"`` -> None, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["threshold=0.9", "stride=8"]`` -> ``{"threshold": 0.9, "stride": 8}``.

    Raises:
        ValueError: an item without ``=`` or with an empty key.
    """
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--set takes key=value (e.g. --set threshold=0.9), got {item!r}")
        options[key.strip()] = parse_value(value.strip())
    return options


def run_generate(model, tokenizer, prompt: str, *, method: str | None, overrides: dict[str, Any],
                 min_sparse_len: int, chat: bool, max_new_tokens: int, stream=None) -> dict[str, Any]:
    """Generate from ``prompt`` (greedy), streaming the new text to ``stream``; sparse with ``method``.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        prompt: the prompt text.
        method: a sparse method, or None / ``"dense"`` for the model's own attention.
        overrides: the method's config fields.
        min_sparse_len: prefills with fewer keys run dense.
        chat: wrap the prompt, stripped of surrounding whitespace, as one user message in the tokenizer's
            chat template.
        max_new_tokens: most new tokens.
        stream: a text file for the streamed output (default ``sys.stdout``).

    Returns:
        ``{"prompt_tokens", "new_tokens", "text", "seconds", "counts"}``; ``counts`` are the patch's
        calls per route (empty when dense).

    Raises:
        ValueError: an empty prompt, ``chat`` without a chat template, or bad method options.
    """
    from transformers import TextStreamer

    from .integrations.transformers import patch

    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("--chat needs a tokenizer with a chat template; this model's tokenizer has none")
        # Surrounding whitespace (a file's or echo's final newline) is no part of a chat message, and it
        # derails small models: SmolLM2 answers "What is the capital of France?\n" with nonsense.
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.strip()}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    device = next(model.parameters()).device
    ids = ids.to(device)
    stream = stream or sys.stdout

    class _Streamer(TextStreamer):  # TextStreamer prints to stdout; this one writes to ``stream``
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                  attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    counts: dict[str, int] = {}
    start = time.perf_counter()
    with torch.no_grad():
        if method in (None, "dense"):
            out = model.generate(ids, **kwargs)
        else:
            with patch(model, method=method, min_sparse_len=min_sparse_len, **overrides) as handle:
                out = model.generate(ids, **kwargs)
                counts = dict(handle.counts)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return {"prompt_tokens": ids.shape[1], "new_tokens": int(new.numel()),
            "text": tokenizer.decode(new, skip_special_tokens=True), "seconds": seconds, "counts": counts}
