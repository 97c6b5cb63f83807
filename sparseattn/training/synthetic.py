"""Retrieval-heavy synthetic training data in real text, offline: passkeys hidden in Python source.

Each example is exactly ``seq_len`` tokens: an instruction, a window of real text (the Python
standard library's own source, read from this machine) with 1..``max_needles`` needles on lines of
their own at random depths, then one question per needle followed by its answer::

    Below is some Python source code. Somewhere in it there are secret passkeys. Remember them.
    ... source ... The secret passkey for amber falcon is 48213. ... source ...
    What is the secret passkey for amber falcon? The secret passkey for amber falcon is 48213.

With one needle the wording is the eval task's (``The secret passkey is 48213.``; see
:mod:`sparseattn.tasks`). Answering needs attention back across thousands of tokens, so the
loss rewards exactly the heads that must stay full. ``loss_on="answers"`` (default) takes the
loss on the answer digits only (as DuoAttention's synthetic passkey data); ``"all"`` on every token.

The source files of :data:`sparseattn.tasks.HAYSTACK_FILES` (the eval haystack) are left out, so
training text and eval text differ. Item ``i`` depends only on ``(seed, i)``: the dataset is
map-style and reproducible, so a resumed run sees exactly the examples an uninterrupted one would.

Example:
    >>> from sparseattn.training.data import ByteTokenizer
    >>> from sparseattn.training.synthetic import SyntheticRetrievalDataset
    >>> data = SyntheticRetrievalDataset(ByteTokenizer(), seq_len=1024, num_samples=4, seed=0)
    >>> item = data[0]
    >>> item["input_ids"].shape, item["doc_lengths"].tolist()
    (torch.Size([1024]), [1024])
    >>> answers = ByteTokenizer().decode(item["input_ids"][item["labels"] != -100])
    >>> answers.replace(".", " ").split() == [a for a in data.answers(0)]
    True
"""

from __future__ import annotations

import os
import random
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..tasks import HAYSTACK_FILES
from .data import IGNORE_INDEX, TokenizedDocument

__all__ = ["SyntheticRetrievalDataset", "corpus_files"]

_INSTRUCTION = "Below is some Python source code. Somewhere in it there are secret passkeys. Remember them.\n\n"
_ADJECTIVES = ("amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gentle", "hollow", "ivory", "jolly",
               "keen", "lunar", "mellow", "noble", "olive", "proud", "quiet", "rusty", "silver", "tidal")
_NOUNS = ("falcon", "harbor", "lantern", "meadow", "otter", "pepper", "quarry", "raven", "saddle", "thistle",
          "umbra", "violet", "walnut", "yarrow", "zephyr", "badger", "cedar", "dune", "ember", "fjord")
_LOSS_ON = ("answers", "all")
# How far back (tokens) a needle may move to start on a line of its own.
_LINE_REACH = 32


def corpus_files() -> list[Path]:
    """Standard-library source files used as haystack text (sorted; the eval haystack's files excluded)."""
    folder = Path(os.path.dirname(os.__file__))
    return sorted(p for p in folder.glob("*.py") if p.name not in HAYSTACK_FILES)


class SyntheticRetrievalDataset(torch.utils.data.Dataset):
    """Map-style dataset of passkey-retrieval rows (see the module docstring).

    Args:
        tokenizer: a transformers tokenizer (or :class:`~sparseattn.training.data.ByteTokenizer`).
        seq_len: tokens per example (each example is one document filling one row).
        num_samples: dataset length.
        seed: item ``i`` is generated from ``(seed, i)``.
        max_needles: each example hides 1..``max_needles`` needles (uniform).
        loss_on: ``"answers"`` (default) or ``"all"``.
        corpus_tokens: haystack tokens to tokenize up front (default ``max(64 x seq_len, 200_000)``,
            capped by the corpus).

    Items: ``input_ids`` / ``labels`` `[seq_len]` int64, ``doc_lengths`` ``[seq_len]``.
    """

    def __init__(self, tokenizer, seq_len: int, num_samples: int, *, seed: int = 0, max_needles: int = 4,
                 loss_on: str = "answers", corpus_tokens: int | None = None):
        for name, value, low in (("seq_len", seq_len, 64), ("num_samples", num_samples, 1),
                                 ("max_needles", max_needles, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if loss_on not in _LOSS_ON:
            raise ValueError(f"loss_on must be one of {list(_LOSS_ON)}, got {loss_on!r}")
        self.tokenizer = tokenizer
        self.seq_len, self.num_samples, self.seed = seq_len, num_samples, seed
        self.max_needles, self.loss_on = max_needles, loss_on
        self.corpus_tokens = corpus_tokens or max(64 * seq_len, 200_000)
        # Fail now, not mid-training: the longest key, max_needles times, must leave room for text.
        longest = max((f"{a} {n}" for a in _ADJECTIVES for n in _NOUNS), key=len)
        fixed = len(self._encode(_INSTRUCTION)) + 2 + self.max_needles * (
            len(self._encode(f"\nThe secret passkey for {longest} is 99999.\n"))
            + len(self._encode(f"\n\nWhat is the secret passkey for {longest}? The secret passkey for {longest} is"
                               " 99999.")))
        if seq_len - fixed < 16 * max_needles:
            raise ValueError(f"seq_len={seq_len} is too short for {max_needles} needle(s) and their questions (about "
                             f"{fixed} tokens plus text); raise seq_len or lower max_needles")

    def __len__(self) -> int:
        return self.num_samples

    # ---- corpus --------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @cached_property
    def _corpus(self) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, positions whose token starts a line), tokenized once, lazily."""
        pieces, total = [], 0
        for path in corpus_files():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            ids = self._encode(f"# File: {path.name}\n{text}\n")
            pieces.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
            if total >= self.corpus_tokens:
                break
        if total < self.seq_len:
            raise ValueError(f"the standard library's source has only {total} tokens; seq_len={self.seq_len} needs "
                             "more")
        ids = np.concatenate(pieces)
        # A token that starts with a newline begins a line (byte-level BPE keeps newlines out of words).
        starts_line = {t: self.tokenizer.decode([int(t)]).startswith("\n") for t in np.unique(ids)}
        line_starts = np.flatnonzero(np.fromiter((starts_line[t] for t in ids), dtype=bool, count=ids.size))
        return ids, line_starts

    # ---- examples -----------------------------------------------------------------------------
    def _rng(self, index: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + index)

    def _plan(self, index: int):
        """Keys and values of example ``index`` (the first draws of its generator)."""
        rng = self._rng(index)
        count = rng.randint(1, self.max_needles)
        names = rng.sample([f"{a} {n}" for a in _ADJECTIVES for n in _NOUNS], count) if count > 1 else [None]
        values = [str(rng.randint(10000, 99999)) for _ in names]
        return rng, names, values

    def answers(self, index: int) -> list[str]:
        """The passkeys of example ``index``, in the order they are asked for."""
        rng, names, values = self._plan(index)
        order = list(range(len(names)))
        rng.shuffle(order)
        return [values[i] for i in order]

    def example(self, index: int) -> TokenizedDocument:
        """Example ``index`` as a document of exactly ``seq_len`` tokens."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng, names, values = self._plan(index)
        order = list(range(len(names)))
        rng.shuffle(order)
        subject = ["The secret passkey is" if name is None else f"The secret passkey for {name} is" for name in names]
        needles = [self._encode(f"\n{s} {v}.\n") for s, v in zip(subject, values)]
        head = [self.tokenizer.bos_token_id] if getattr(self.tokenizer, "bos_token_id", None) is not None else []
        head += self._encode(_INSTRUCTION)
        tail_ids, tail_labels = [], []
        dot = self._encode(".")
        for i in order:
            question = ("What is the secret passkey mentioned in the text above?" if names[i] is None
                        else f"What is the secret passkey for {names[i]}?")
            q_ids = self._encode(f"\n\n{question} {subject[i]}")
            a_ids = self._encode(f" {values[i]}")
            tail_ids += q_ids + a_ids + dot
            tail_labels += [IGNORE_INDEX] * len(q_ids) + a_ids + [IGNORE_INDEX] * len(dot)
        budget = self.seq_len - len(head) - sum(map(len, needles)) - len(tail_ids)
        if budget < 16 * len(needles):
            raise ValueError(f"seq_len={self.seq_len} is too short for {len(needles)} needle(s) and their questions "
                             f"({self.seq_len - budget} tokens); raise seq_len or lower max_needles")
        ids, line_starts = self._corpus
        start = rng.randrange(0, ids.size - budget + 1)
        hay = ids[start:start + budget].tolist()
        hay_line_starts = line_starts[(line_starts > start) & (line_starts < start + budget)] - start
        cuts = sorted(self._snap(rng.randrange(1, budget), hay_line_starts) for _ in needles)
        body, prev = [], 0
        for cut, needle in zip(cuts, needles):
            body += hay[prev:cut] + needle
            prev = cut
        body += hay[prev:]
        input_ids = head + body + tail_ids
        if self.loss_on == "answers":
            labels = [IGNORE_INDEX] * (len(head) + len(body)) + tail_labels
        else:
            labels = list(input_ids)
        return TokenizedDocument(input_ids, labels, splittable=False)

    @staticmethod
    def _snap(position: int, line_starts: np.ndarray) -> int:
        """The last line start in ``(position - reach, position]``, else ``position`` (mid-line)."""
        i = np.searchsorted(line_starts, position, side="right") - 1
        if i >= 0 and position - line_starts[i] <= _LINE_REACH:
            return int(line_starts[i])
        return position

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        doc = self.example(index)
        return {"input_ids": torch.tensor(doc.input_ids, dtype=torch.int64),
                "labels": torch.tensor(doc.labels, dtype=torch.int64),
                "doc_lengths": torch.tensor([self.seq_len], dtype=torch.int64)}
