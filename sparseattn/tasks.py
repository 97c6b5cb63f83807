"""Long-context prompts: a needle-in-a-haystack retrieval prompt of an exact token length.

The haystack is real text that every machine has offline: the Python standard library's own
source files (``os.path.dirname(os.__file__)``), in a fixed order (:data:`HAYSTACK_FILES` first,
then the remaining top-level ``.py`` files by name). A one-line needle such as
``"The secret passkey is 71432."`` goes in at a chosen depth, on its own line, and a question
asks for it; the prompt ends with the answer's first words (:data:`ANSWER_PREFIX`), so the next
tokens the model writes are the passkey. The prompt is assembled from token ids, so its length is
exact: ``length`` tokens, chat template included. (A later module builds a full RULER-style suite.)

Example:
    >>> from sparseattn.tasks import haystack_text, is_correct
    >>> haystack_text(1000).splitlines()[0]
    '# File: textwrap.py'
    >>> is_correct(" 71432.", "71432"), is_correct("714320", "71432")
    (True, False)
    >>> from sparseattn.models import load_llama                       # doctest: +SKIP
    >>> from sparseattn.tasks import build_passkey_prompt              # doctest: +SKIP
    >>> _, tokenizer = load_llama()                                     # doctest: +SKIP
    >>> prompt = build_passkey_prompt(tokenizer, 2048, depth=0.5)       # doctest: +SKIP
    >>> len(prompt.input_ids), prompt.needle_token_index, prompt.answer  # doctest: +SKIP
    (2048, 1002, '71432')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ANSWER_PREFIX", "HAYSTACK_FILES", "PasskeyPrompt", "build_passkey_prompt", "haystack_text", "is_correct"]

# Read first, in this order: modules with plenty of prose, present from Python 3.10 to 3.14.
HAYSTACK_FILES = ("textwrap.py", "heapq.py", "bisect.py", "functools.py", "contextlib.py", "fractions.py",
                  "dataclasses.py", "argparse.py", "enum.py", "inspect.py", "typing.py")
_QUESTION = "What is the secret passkey mentioned in the text above? Answer with the number only."
_INSTRUCTION = "Below is some Python source code. Somewhere in it there is a secret passkey. Remember it."
# The answer's first words, given: the model's next tokens are then the passkey itself (as RULER does).
ANSWER_PREFIX = "The secret passkey is"
# The needle moves back at most this many tokens to start on a line of its own.
LINE_REACH = 32


@dataclass(frozen=True)
class PasskeyPrompt:
    """A retrieval prompt.

    Attributes:
        input_ids: the prompt's token ids (exactly the requested length).
        text: the prompt decoded back to text.
        answer: the passkey the model should answer with.
        needle_token_index: position of the needle's first token in ``input_ids``.
        haystack_tokens: haystack tokens around the needle (before + after).
        depth: the needle's position as a fraction of the haystack, as placed.
        chat: whether the chat template was applied.
    """

    input_ids: list[int]
    text: str
    answer: str
    needle_token_index: int
    haystack_tokens: int
    depth: float
    chat: bool


def _stdlib_files() -> list[Path]:
    folder = Path(os.path.dirname(os.__file__))
    preferred = [folder / name for name in HAYSTACK_FILES if (folder / name).is_file()]
    rest = sorted(p for p in folder.glob("*.py") if p.name not in HAYSTACK_FILES)
    return preferred + rest


def haystack_text(min_chars: int) -> str:
    """At least ``min_chars`` characters of standard-library source (fewer only if the library is smaller)."""
    parts, total = [], 0
    for path in _stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(f"# File: {path.name}\n{source}\n")
        total += len(parts[-1])
        if total >= min_chars:
            break
    return "".join(parts)


def _template_parts(tokenizer, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack."""
    marker = "\u2063HAYSTACK\u2063"
    content = f"{_INSTRUCTION}\n\n{marker}\n\n{_QUESTION}"
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        # The template may add BOS itself; don't let the tokenizer add another.
        special = False
    else:
        text = content + "\nAnswer: "
        special = True
    before, after = (text + ANSWER_PREFIX).split(marker)
    encode = lambda s, add: tokenizer(s, add_special_tokens=add)["input_ids"]  # noqa: E731
    return encode(before, special), encode(after, False)


def _snap_to_line_end(tokenizer, ids: list[int], position: int, reach: int = LINE_REACH) -> int:
    """The nearest position at or before ``position`` (within ``reach``) whose token starts with a newline.

    Byte-level BPE keeps newlines out of word tokens (a newline and the next line's indentation
    form one token), so inserting before such a token puts the needle between two lines.
    """
    for pos in range(position, max(-1, position - reach - 1), -1):
        if pos < len(ids) and tokenizer.decode(ids[pos:pos + 1]).startswith("\n"):
            return pos
    return position


def build_passkey_prompt(tokenizer, length: int, *, depth: float = 0.5, passkey: str = "71432",
                         chat: bool | None = None) -> PasskeyPrompt:
    """A needle-in-a-haystack prompt of exactly ``length`` tokens.

    Args:
        tokenizer: the model's tokenizer (a ``transformers`` tokenizer).
        length: total prompt tokens, template and question included.
        depth: where the needle goes, as a fraction of the haystack in [0, 1] (default 0.5); the
            needle goes on a line of its own, at most :data:`LINE_REACH` tokens before that point
            (mid-line, exactly there, if no line ends that close).
        passkey: the digits to hide (default ``"71432"``).
        chat: apply the tokenizer's chat template (default: when it has one).

    Returns:
        A :class:`PasskeyPrompt`.

    Raises:
        ValueError: ``depth`` outside [0, 1], a non-digit passkey, ``chat=True`` without a chat
            template, or a ``length`` too short for the question and template.
    """
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    if not (isinstance(passkey, str) and passkey.isdigit()):
        raise ValueError(f"passkey must be a string of digits, got {passkey!r}")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat is None:
        chat = has_template
    elif chat and not has_template:
        raise ValueError("chat=True, but the tokenizer has no chat template")
    if isinstance(length, bool) or not isinstance(length, int):
        raise ValueError(f"length must be an int (tokens), got {length!r}")
    before, after = _template_parts(tokenizer, chat)
    needle = tokenizer(f"\nThe secret passkey is {passkey}.\n", add_special_tokens=False)["input_ids"]
    fixed = len(before) + len(after) + len(needle)
    budget = length - fixed
    if budget < 16:
        raise ValueError(f"length must be at least {fixed + 16} tokens (template, question and needle take "
                         f"{fixed}), got {length}")
    chars = 8 * budget
    while True:
        text = haystack_text(chars)
        hay = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(hay) >= budget or len(text) < chars:
            break
        chars *= 2
    if len(hay) < budget:
        raise ValueError(f"the standard library's source has only {len(hay)} tokens, {budget} are needed")
    hay = hay[:budget]
    split = _snap_to_line_end(tokenizer, hay, round(depth * budget)) if 0 < depth < 1 else round(depth * budget)
    ids = before + hay[:split] + needle + hay[split:] + after
    return PasskeyPrompt(input_ids=ids, text=tokenizer.decode(ids), answer=passkey,
                         needle_token_index=len(before) + split, haystack_tokens=budget,
                         depth=split / budget, chat=chat)


def is_correct(answer: str, passkey: str) -> bool:
    """Whether the passkey's digits appear in ``answer`` (as one number)."""
    return passkey in "".join(ch if ch.isdigit() else " " for ch in answer).split()
