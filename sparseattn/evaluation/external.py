"""LongBench and InfiniteBench files a user already has (``sparseattn eval --data-dir DIR``).

Nothing is downloaded. Every ``*.jsonl`` file under the folder is read, one example per line:

- LongBench (``THUDM/LongBench`` ``data/*.jsonl``): ``context``, ``input``, ``answers`` (list).
- InfiniteBench (``xinrongzhang2022/InfiniteBench`` ``*.jsonl``): ``context``, ``input``,
  ``answer`` (a string or a list), optional ``options`` (multiple choice).

The prompt is ``context``, then ``input`` (and the options), framed like the RULER tasks (chat
template when the tokenizer has one). A context too long for the length is cut in the middle, as
LongBench does: the first and last halves of the token budget are kept. Scoring: token F1 for
every LongBench file (LongBench itself uses ROUGE for summaries and edit similarity for code, so
those numbers are not LongBench's) and for open InfiniteBench tasks; substring match for
InfiniteBench's retrieval tasks (``passkey``, ``number_string``, ``kv_retrieval``) and options.

Example:
    >>> import json, tempfile, pathlib
    >>> from sparseattn.evaluation.external import find_data_files, load_examples
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> row = {"input": "Who?", "context": "Ada wrote it.", "answers": ["Ada"], "dataset": "qa"}
    >>> _ = (folder / "qa.jsonl").write_text(json.dumps(row) + "\\n")
    >>> [(f.name, f.suite) for f in find_data_files(folder)]
    [('longbench/qa', 'longbench')]
    >>> load_examples(find_data_files(folder)[0], limit=5)[0]["answers"]
    ['Ada']
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .ruler import TaskPrompt, frame_ids

__all__ = ["DataFile", "build_prompt", "find_data_files", "load_examples"]

_SUBSTRING_TASKS = {"passkey", "number_string", "kv_retrieval"}
_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class DataFile:
    """One ``*.jsonl`` file: ``name`` (``"<suite>/<file stem>"``, the task name in results), ``suite``, ``path``."""

    name: str
    suite: str
    path: Path


def _suite_of(row: dict, path: Path) -> str:
    if not isinstance(row, dict) or "context" not in row or "input" not in row:
        raise ValueError(f"{path}: the first line has no 'context' and 'input' fields (LongBench / InfiniteBench)")
    if "answers" in row:
        return "longbench"
    if "answer" in row:
        return "infinitebench"
    raise ValueError(f"{path}: the first line has neither 'answers' (LongBench) nor 'answer' (InfiniteBench)")


def find_data_files(data_dir) -> list[DataFile]:
    """The LongBench / InfiniteBench ``*.jsonl`` files under ``data_dir``, sorted by path.

    Raises:
        ValueError: ``data_dir`` is not a folder, holds no ``*.jsonl`` file, or a file has another format.
    """
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise ValueError(f"--data-dir {data_dir} is not a folder")
    files = []
    for path in sorted(folder.rglob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        try:
            suite = _suite_of(json.loads(first), path)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: the first line is not JSON: {err}") from None
        files.append(DataFile(f"{suite}/{path.stem}", suite, path))
    if not files:
        raise ValueError(f"--data-dir {data_dir} holds no *.jsonl file")
    return files


def load_examples(data_file: DataFile, limit: int) -> list[dict]:
    """The first ``limit`` examples: ``{"context", "input", "options", "answers": [str, ...]}``."""
    examples = []
    with open(data_file.path, encoding="utf-8") as f:
        for line in f:
            if len(examples) >= limit:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            answers = row.get("answers", row.get("answer"))
            answers = [answers] if isinstance(answers, (str, int, float)) else list(answers or [])
            if not answers:
                raise ValueError(f"{data_file.path}: an example has no answer")
            examples.append({"context": row["context"], "input": row["input"], "options": row.get("options") or [],
                             "answers": [str(a) for a in answers]})
    return examples


def build_prompt(tokenizer, data_file: DataFile, example: dict, length: int, *, chat: bool | None = None,
                 index: int = 0) -> TaskPrompt:
    """``example`` as a prompt of at most ``length`` tokens (the context cut in the middle if needed)."""
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    question = f"Question: {example['input']}"
    if example["options"]:
        question += "\nOptions:\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(example["options"]))
    before, after = frame_ids(tokenizer, chat, "Read the following text and answer the question after it.",
                              question, "")
    context = tokenizer(example["context"], add_special_tokens=False)["input_ids"]
    budget = length - len(before) - len(after)
    if budget < 16:
        raise ValueError(f"{data_file.name}: length {length} leaves no room for the context "
                         f"(the question and template take {len(before) + len(after)} tokens)")
    truncated = len(context) > budget
    if truncated:
        context = context[:budget // 2] + context[len(context) - (budget - budget // 2):]
    stem = data_file.path.stem.lower()
    metric = "part" if data_file.suite == "infinitebench" and (stem in _SUBSTRING_TASKS or example["options"]) else "f1"
    return TaskPrompt(data_file.name, before + context + after, example["answers"], metric, _MAX_NEW_TOKENS,
                      {"suite": data_file.suite, "file": str(data_file.path), "index": index,
                       "truncated": truncated, "chat": chat})
