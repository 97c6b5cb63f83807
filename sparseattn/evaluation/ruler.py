"""RULER-style long-context tasks, generated offline with any tokenizer at a target token length.

Each task turns ``(tokenizer, length, seed)`` into a :class:`TaskPrompt`: token ids, the answers,
the metric, and metadata (needle positions, keys, counts). The same arguments always give the
same prompt. Tasks (after RULER, Hsieh et al. 2024):

============== ==================================================================== ========
task           the prompt                                                           answers
============== ==================================================================== ========
niah_single    one "special magic number" needle in a haystack                      1
niah_multikey  four needles with different keys; one is asked                       1
niah_multivalue four needles with one key and four values; all are asked           4
niah_multiquery four keys; all four are asked                                       4
passkey        "The pass key is 71432. Remember it." in a haystack                  1
vt             variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... 5
kv_retrieval   a JSON object of UUID pairs; the value of one key                    1
cwe            common words: a numbered word list, the 10 most frequent words      10
fwe            frequent words: Zipf-distributed coded words, the 3 most frequent    3
============== ==================================================================== ========

Needle tasks (``niah_*``, ``passkey``, ``vt``) put one-line needles into a haystack
(:mod:`~sparseattn.evaluation.haystack`: standard-library source, repeated noise, or a folder) at
seeded depths, each on a line of its own; their prompts are assembled from token ids and have
exactly ``length`` tokens. List tasks (``kv_retrieval``, ``cwe``, ``fwe``) grow their list to the
longest that fits: ``length`` minus at most one item's tokens. The prompt ends with the answer's
first words (RULER's answer prefix), inside the chat template's assistant turn when the tokenizer
has one (as :mod:`sparseattn.tasks` does). Scoring: :mod:`~sparseattn.evaluation.scoring`.

Example:
    >>> from transformers import AutoTokenizer                                   # doctest: +SKIP
    >>> from sparseattn.evaluation.ruler import generate                         # doctest: +SKIP
    >>> p = generate("niah_single", tokenizer, 1024, seed=0)                     # doctest: +SKIP
    >>> len(p.input_ids), p.answers, p.metric                                    # doctest: +SKIP
    (1024, ['4176394'], 'all')
"""

from __future__ import annotations

import collections
import json
import random
import string
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from ..tasks import _snap_to_line_end
from .haystack import haystack_ids, source_name, word_pool

__all__ = ["TASKS", "TaskPrompt", "TaskSpec", "frame_ids", "generate"]

# Extra haystack tokens to draw a seeded starting line from, so samples read different text.
_START_REACH = 2048
_MARKER = "\u2063CONTEXT\u2063"


@dataclass(frozen=True)
class TaskPrompt:
    """One generated prompt.

    Attributes:
        task: the task's name.
        input_ids: the prompt's token ids (template, context, question, answer prefix).
        answers: the strings a correct answer contains.
        metric: how :func:`sparseattn.evaluation.scoring.score` scores it (``"all"``, ``"part"``, ``"f1"``).
        max_new_tokens: tokens to generate for the answer.
        metadata: what was generated (keys, needle token positions, depths, counts, haystack).
    """

    task: str
    input_ids: list[int]
    answers: list[str]
    metric: str
    max_new_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: ``build(tokenizer, length, rng, source, chat) -> TaskPrompt`` and a description."""

    name: str
    build: Callable[..., TaskPrompt]
    description: str


def frame_ids(tokenizer, chat: bool, instruction: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the context: instruction, context, question, answer prefix.

    With ``chat`` the user turn holds instruction, context and question, and the assistant turn
    starts with ``answer_prefix``; otherwise plain text ending ``"\\nAnswer: " + answer_prefix``.
    """
    content = f"{instruction}\n\n{_MARKER}\n\n{question}"
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        special = False  # the template adds BOS itself if the model wants one
    else:
        text, special = content + ("\nAnswer: " if answer_prefix else "\nAnswer:"), True
    before, after = (text + answer_prefix).split(_MARKER)
    return (tokenizer(before, add_special_tokens=special)["input_ids"],
            tokenizer(after, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------
# Shared builders
# --------------------------------------------------------------------------------------------


def _needle_prompt(tokenizer, length, rng, source, chat, *, task, instruction, question, answer_prefix, needles,
                   answers, max_new_tokens, metadata, metric="all") -> TaskPrompt:
    """``needles`` (one line each, in this order) at seeded increasing depths of a haystack: exactly ``length`` tokens."""
    before, after = frame_ids(tokenizer, chat, instruction, question, answer_prefix)
    needle_ids = [tokenizer(f"\n{n}\n", add_special_tokens=False)["input_ids"] for n in needles]
    fixed = len(before) + len(after) + sum(map(len, needle_ids))
    budget = length - fixed
    if budget < 16:
        raise ValueError(f"{task}: length must be at least {fixed + 16} tokens (template, question and needles "
                         f"take {fixed}), got {length}")
    # Standard-library text is plentiful: start each sample at a seeded line. A user's folder may hold
    # barely enough, and the noise is the same everywhere: start at the top.
    reach = min(_START_REACH, budget) if source == "stdlib" else 0
    hay = haystack_ids(tokenizer, source, budget + reach)
    start = _snap_to_line_end(tokenizer, hay, rng.randrange(reach + 1)) if reach else 0
    hay = hay[start:start + budget]
    depths = sorted(rng.random() for _ in needles)
    splits = sorted(_snap_to_line_end(tokenizer, hay, round(d * budget)) for d in depths)
    ids, positions, prev = list(before), [], 0
    for split, needle in zip(splits, needle_ids):
        ids += hay[prev:split]
        positions.append(len(ids))
        ids += needle
        prev = split
    ids += hay[prev:] + after
    meta = dict(metadata, haystack=source_name(source), haystack_start=start, needle_token_index=positions,
                depth=[s / budget for s in splits], chat=chat)
    return TaskPrompt(task, ids, answers, metric, max_new_tokens, meta)


def _fit_list(tokenizer, length, task, before, after, render: Callable[[int], str]) -> tuple[list[int], int]:
    """The longest ``render(n)`` (n >= 1 items) whose prompt fits ``length`` tokens: ``(ids, n)``."""
    def ids_for(n):
        return before + tokenizer(render(n), add_special_tokens=False)["input_ids"] + after

    best = ids_for(1)
    if len(best) > length:
        raise ValueError(f"{task}: length {length} is too short for the template and one item ({len(best)} tokens)")
    lo, hi = 1, 2
    while len(ids := ids_for(hi)) <= length:  # grow until too long
        lo, best, hi = hi, ids, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ids = ids_for(mid)
        if len(ids) <= length:
            lo, best = mid, ids
        else:
            hi = mid
    return best, lo


def _number(rng, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _keys(rng, count: int) -> list[str]:
    pool, keys = word_pool(), []
    while len(keys) < count:
        key = f"{rng.choice(pool)}-{rng.choice(pool)}"
        if key not in keys:
            keys.append(key)
    return keys


def _joined(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

_NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the numbers afterwards.")


def _niah(tokenizer, length, rng, source, chat, *, task, num_keys=1, num_values=1, num_queries=1):
    keys = _keys(rng, num_keys)
    values = [[_number(rng, 7) for _ in range(num_values)] for _ in keys]
    needles = [(k, v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = keys[:num_queries]
    answers = [v for k in asked for v in values[keys.index(k)]]
    many = len(answers) > 1
    what = "numbers" if many else "number"
    question = (f"What {'are all the' if many else 'is the'} special magic {what} for {_joined(asked)} "
                "mentioned in the provided text?")
    prefix = f"The special magic {what} for {_joined(asked)} mentioned in the provided text {'are' if many else 'is'}"
    return _needle_prompt(tokenizer, length, rng, source, chat, task=task, instruction=_NIAH_INSTRUCTION,
                          question=question, answer_prefix=prefix,
                          needles=[f"One of the special magic numbers for {k} is: {v}." for k, v in needles],
                          answers=answers, max_new_tokens=128 if many else 16,  # RULER: 128
                          metadata={"keys": keys, "asked": asked, "needles": needles})


def _passkey(tokenizer, length, rng, source, chat, *, task):
    key = _number(rng, 5)
    return _needle_prompt(
        tokenizer, length, rng, source, chat, task=task,
        instruction="There is an important piece of information hidden inside a lot of irrelevant text. "
                    "Find it and memorize it. I will quiz you about it.",
        question="What is the pass key?", answer_prefix="The pass key is",
        needles=[f"The pass key is {key}. Remember it. {key} is the pass key."], answers=[key], max_new_tokens=8,
        metadata={"passkey": key})


def _variable_tracking(tokenizer, length, rng, source, chat, *, task, hops=4):
    value = _number(rng, 5)
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
    return _needle_prompt(
        tokenizer, length, rng, source, chat, task=task,
        instruction="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        question=f"Question: Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=f"According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
                      f"are assigned the value {value}, they are:",
        needles=chain, answers=names, max_new_tokens=32, metadata={"value": value, "chain": chain})


_KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."


def _kv_retrieval(tokenizer, length, rng, source, chat, *, task):
    pairs: list[tuple[str, str]] = []
    depth = rng.random()

    def render(n):
        while len(pairs) < n:
            pairs.append((str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                          str(uuid.UUID(int=rng.getrandbits(128), version=4))))
        items = pairs[1:n]
        items.insert(int(depth * n), pairs[0])  # the asked pair, at a seeded depth of the object
        return "JSON data:\n" + json.dumps(dict(items), indent=1)

    render(1)
    key, value = pairs[0]
    before, after = frame_ids(tokenizer, chat, _KV_INSTRUCTION, f'Key: "{key}"',
                              "The value associated with the specified key is:")
    ids, n = _fit_list(tokenizer, length, task, before, after, render)
    return TaskPrompt(task, ids, [value], "all", 48, {"pairs": n, "key": key, "depth": depth, "chat": chat})


def _common_words(tokenizer, length, rng, source, chat, *, task, num_common=10):
    pool = list(word_pool())
    rng.shuffle(pool)
    common = pool[:num_common]
    # RULER's frequencies at long context (30 vs 3), scaled down so short prompts keep a clear gap.
    freq_common = max(3, min(30, length // 160))
    freq_rare = max(1, freq_common // 10)
    order_seed = rng.getrandbits(32)

    def render(n):
        if num_common + n > len(pool):
            raise ValueError(f"{task}: the word pool has {len(pool)} words; {num_common + n} are needed")
        words = common * freq_common + pool[num_common:num_common + n] * freq_rare
        random.Random(order_seed + n).shuffle(words)
        return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    before, after = frame_ids(tokenizer, chat, "Below is a numbered list of words. In these words, some appear more "
                              "often than others. Memorize the ones that appear most often.",
                              f"Question: What are the {num_common} most common words in the above list?",
                              f"The top {num_common} words that appear most often in the list are:")
    ids, n = _fit_list(tokenizer, length, task, before, after, render)
    return TaskPrompt(task, ids, common, "all", 12 * num_common,
                      {"rare_words": n, "freq_common": freq_common, "freq_rare": freq_rare, "chat": chat})


def _frequent_words(tokenizer, length, rng, source, chat, *, task, alpha=2.0, vocab_size=800, top=3):
    vocab: list[str] = []
    while len(vocab) < vocab_size:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
        if word not in vocab:
            vocab.append(word)
    weights = [1.0 / (r + 1) ** alpha for r in range(vocab_size)]
    drawn: list[str] = []

    def render(n):
        while len(drawn) < n:
            drawn.extend(rng.choices(vocab, weights, k=max(64, n - len(drawn))))
        return " ".join(drawn[:n])

    before, after = frame_ids(tokenizer, chat, "Read the following coded text and track the frequency of each coded "
                              "word. Find the three most frequently appeared coded words.",
                              "Question: Do not provide any explanation. What are the three most frequently "
                              "appeared words in the above coded text?",
                              "According to the coded text above, the three most frequently appeared words are:")
    ids, n = _fit_list(tokenizer, length, task, before, after, render)
    counts = collections.Counter(drawn[:n]).most_common(top + 1)
    answers = [w for w, _ in counts[:top]]
    return TaskPrompt(task, ids, answers, "all", 32,
                      {"words": n, "top_counts": [c for _, c in counts], "tie": counts[-1][1] == counts[-2][1],
                       "chat": chat})


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("niah_single", lambda *a, **k: _niah(*a, **k), "one needle, one key"),
    TaskSpec("niah_multikey", lambda *a, **k: _niah(*a, num_keys=4, **k), "four keys, one asked"),
    TaskSpec("niah_multivalue", lambda *a, **k: _niah(*a, num_values=4, **k), "one key, four values, all asked"),
    TaskSpec("niah_multiquery", lambda *a, **k: _niah(*a, num_keys=4, num_queries=4, **k), "four keys, all asked"),
    TaskSpec("passkey", _passkey, "a 5-digit pass key"),
    TaskSpec("vt", _variable_tracking, "variable tracking, one chain of 4 hops"),
    TaskSpec("kv_retrieval", _kv_retrieval, "JSON key-value retrieval (UUIDs)"),
    TaskSpec("cwe", _common_words, "common-word extraction, top 10"),
    TaskSpec("fwe", _frequent_words, "frequent-word extraction, top 3 (Zipf, alpha 2)"),
]}


def generate(task: str, tokenizer, length: int, *, seed: int = 0, haystack: str = "stdlib",
             chat: bool | None = None) -> TaskPrompt:
    """A prompt of ``task`` with about ``length`` tokens (exactly for needle tasks).

    Args:
        task: a name in :data:`TASKS`.
        tokenizer: the model's tokenizer.
        length: prompt tokens, template included.
        seed: the sample's seed; the prompt is a function of ``(task, length, seed)`` and the haystack.
        haystack: ``"stdlib"``, ``"repeat"`` or a folder of text files (needle tasks only).
        chat: apply the tokenizer's chat template (default: when it has one).

    Returns:
        A :class:`TaskPrompt`.

    Raises:
        ValueError: an unknown task, ``chat=True`` without a template, or a length too short.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {sorted(TASKS)}")
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive int (tokens), got {length!r}")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat is None:
        chat = has_template
    elif chat and not has_template:
        raise ValueError("chat=True, but the tokenizer has no chat template")
    rng = random.Random(f"{task}/{length}/{seed}")
    prompt = TASKS[task].build(tokenizer, length, rng, haystack, chat, task=task)
    prompt.metadata["seed"] = seed
    return prompt

