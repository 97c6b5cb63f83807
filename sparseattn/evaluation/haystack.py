"""Haystacks for long-context tasks: real text every machine has, a user's folder, or repeated noise.

Sources (``source`` argument):

- ``"stdlib"``: the Python standard library's own source (:func:`sparseattn.tasks.haystack_text`:
  fixed file order, offline, deterministic on a given Python).
- ``"repeat"``: RULER's synthetic noise, ``"The grass is green. The sky is blue. ..."``, one
  repetition per line.
- a folder path: its text files (``.txt .md .rst .py .json .tex .html .csv``, recursively, sorted
  by path), each preceded by a ``# File: name`` line.

:func:`haystack_ids` tokenizes a source once per tokenizer and caches the ids, so a suite of
prompts pays for tokenization once. :func:`word_pool` gives words of real text (for keys and for
word-extraction tasks).

Example:
    >>> from sparseattn.evaluation.haystack import REPEAT_SENTENCES, source_text, word_pool
    >>> source_text("repeat", 200).splitlines()[0] == REPEAT_SENTENCES
    True
    >>> len(word_pool()) > 2000
    True
"""

from __future__ import annotations

import collections
import functools
import keyword
import re
import weakref
from pathlib import Path

from ..tasks import haystack_text

__all__ = ["REPEAT_SENTENCES", "TEXT_SUFFIXES", "folder_text", "haystack_ids", "source_name", "source_text",
           "word_pool"]

REPEAT_SENTENCES = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".tex", ".html", ".csv")
# tokenizer -> {(source, chars): token ids}; weak so a dropped tokenizer frees its cache.
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def source_name(source: str) -> str:
    """``"stdlib"``, ``"repeat"`` or ``"folder:<absolute path>"`` (what results record)."""
    if source in ("stdlib", "repeat"):
        return source
    return f"folder:{Path(source).expanduser().resolve()}"


@functools.lru_cache(maxsize=4)
def folder_text(folder: str) -> str:
    """The text files under ``folder`` (see the module docstring), concatenated.

    Raises:
        ValueError: ``folder`` is not a folder or holds no readable text file.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"haystack {folder!r} is neither 'stdlib', 'repeat' nor a folder")
    parts = []
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES):
        try:
            parts.append(f"# File: {file.relative_to(path)}\n{file.read_text(encoding='utf-8')}\n")
        except (OSError, UnicodeDecodeError):
            continue
    if not parts:
        raise ValueError(f"haystack folder {folder} has no readable text file ({', '.join(TEXT_SUFFIXES)})")
    return "".join(parts)


def source_text(source: str, min_chars: int) -> str:
    """At least ``min_chars`` characters of ``source`` (fewer only if a folder or the library is smaller)."""
    if source == "stdlib":
        return haystack_text(min_chars)
    if source == "repeat":
        line = REPEAT_SENTENCES + "\n"
        return line * (min_chars // len(line) + 1)
    return folder_text(str(source))


def haystack_ids(tokenizer, source: str, min_tokens: int) -> list[int]:
    """At least ``min_tokens`` token ids of ``source`` (no special tokens), cached per tokenizer.

    Raises:
        ValueError: the source has fewer tokens than that.
    """
    cache = _CACHE.setdefault(tokenizer, {})
    for (src, _), ids in cache.items():
        if src == source and len(ids) >= min_tokens:
            return ids
    chars = 6 * min_tokens + 1000
    while True:
        text = source_text(source, chars)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= min_tokens:
            cache[(source, chars)] = ids
            return ids
        if len(text) < chars:  # the whole source is shorter
            raise ValueError(f"haystack {source_name(source)} has only {len(ids)} tokens, {min_tokens} are needed")
        chars *= 2


@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """Sorted lowercase words (4-10 letters, seen 3+ times, not Python keywords) of standard-library text.

    About 3,000+ words such as ``'parser'``, ``'longer'``, ``'child'``: real words the tokenizer
    knows, for needle keys and the word-extraction tasks. Deterministic on a given Python.
    """
    counts = collections.Counter(re.findall(r"(?<![\w.])[a-z]{4,10}(?![\w(])", haystack_text(6_000_000)))
    return tuple(sorted(w for w, n in counts.items() if n >= 3 and not keyword.iskeyword(w)))
