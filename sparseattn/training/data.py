"""Training data: local files -> tokenized documents -> packed fixed-length rows with document boundaries.

Sources (:func:`read_records`): plain text files (one document each), ``.jsonl`` (one JSON object
per line), ``.json`` (a list of objects), ``.parquet`` (needs ``pyarrow``), or folders of them
(walked in sorted order). A record is one of

- ``{"text": ...}``: a document; loss on every token;
- ``{"prompt": ..., "answer": ...}`` (``"completion"`` / ``"response"`` for ``"answer"``): an SFT
  example; loss on the answer tokens (and the end-of-sequence token) only;
- ``{"input_ids": [...]}`` with optional ``"labels"``: already tokenized.

Packing (:func:`pack_documents`) concatenates documents into rows of exactly ``seq_len`` tokens and
records each document's length, so attention never crosses a document (the attention function
gets ``cu_seqlens``) and positions restart at 0 in each document. A text document that does not
fit is split, its remainder continuing the next row as a new document; an SFT example is never
split (it starts a new row; one longer than a row is dropped and counted). The first token of
every document piece carries no loss (its prediction would come from the previous document). The
last row is padded with a pad "document" that carries no loss.

:class:`PackedCollator` turns a micro-batch of rows into **one** packed row `[1, rows x seq_len]`
with ``position_ids``, ``cu_seq_lens_q`` (int32) and ``max_length_q``: the keyword arguments
transformers' flash-attention path uses and :class:`~sparseattn.training.model.PruLongModel` takes.

Example:
    >>> from sparseattn.training.data import (ByteTokenizer, PackedCollator, PackedDataset, pack_documents,
    ...                                       tokenize_record)
    >>> tok = ByteTokenizer()
    >>> docs = [tokenize_record({"text": "hello world"}, tok), tokenize_record({"prompt": "2+2=", "answer": "4"}, tok)]
    >>> rows = pack_documents(docs, seq_len=16, pad_token_id=tok.pad_token_id)
    >>> [row.doc_lengths for row in rows]
    [[13, 3], [7, 9]]
    >>> batch = PackedCollator()([PackedDataset(rows)[0]])
    >>> batch["position_ids"].tolist()[0]
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 1, 2]
    >>> batch["cu_seq_lens_q"].tolist(), batch["max_length_q"]
    ([0, 13, 16], 13)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

try:
    import pyarrow.parquet as pq
except ImportError:  # optional: only .parquet files need it
    pq = None

logger = logging.getLogger("sparseattn")

__all__ = ["IGNORE_INDEX", "ByteTokenizer", "PackedCollator", "PackedDataset", "PackedRow", "TokenizedDocument",
           "pack_documents", "read_records", "tokenize_record"]

IGNORE_INDEX = -100
_ANSWER_KEYS = ("answer", "completion", "response")
_JSON_SUFFIXES = {".jsonl", ".json"}


@dataclass(frozen=True)
class TokenizedDocument:
    """One document's tokens and labels (``labels[i]`` is the target at position ``i``; the model shifts).

    Attributes:
        input_ids: token ids.
        labels: same length; :data:`IGNORE_INDEX` where no loss is taken.
        splittable: may be split across rows (text); False for SFT examples.
    """

    input_ids: list[int]
    labels: list[int]
    splittable: bool = True

    def __post_init__(self):
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackedRow:
    """``seq_len`` tokens made of whole or split documents.

    Attributes:
        input_ids: `[seq_len]` int64.
        labels: `[seq_len]` int64, :data:`IGNORE_INDEX` where no loss is taken.
        doc_lengths: lengths of the documents in order (they sum to ``seq_len``).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    doc_lengths: list[int] = field(default_factory=list)


# ---- reading ------------------------------------------------------------------------------------


def _files(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"training data path {str(path)!r} does not exist")


def _records_of(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}, line {number}: not JSON ({err})") from None
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json data file must hold a list of records (use .jsonl for one per line)")
        yield from data
    elif suffix == ".parquet":
        if pq is None:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); or convert it to .jsonl")
        yield from pq.read_table(path).to_pylist()
    else:
        try:
            yield {"text": path.read_text(encoding="utf-8")}
        except UnicodeDecodeError:
            logger.warning("sparseattn: skipping %s (not UTF-8 text)", path)


def read_records(paths: Iterable[str | os.PathLike], max_records: int | None = None) -> Iterator[dict]:
    """Records from files and folders (see the module docstring), in a fixed order."""
    count = 0
    for path in _files(paths):
        for record in _records_of(path):
            if not isinstance(record, dict):
                raise ValueError(f"{path}: every record must be a JSON object, got {type(record).__name__}")
            yield record
            count += 1
            if max_records is not None and count >= max_records:
                return


# ---- tokenizing ---------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []


def _eos(tokenizer) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if eos is not None else []


def tokenize_record(record: dict, tokenizer, *, chat_template: bool = False) -> TokenizedDocument:
    """Tokenize one record (text, prompt/answer, or input_ids; see the module docstring).

    Args:
        record: the record.
        tokenizer: a transformers tokenizer (or :class:`ByteTokenizer`).
        chat_template: wrap an SFT prompt in the tokenizer's chat template as a user turn.
    """
    if "input_ids" in record:
        ids = [int(t) for t in record["input_ids"]]
        labels = [int(t) for t in record.get("labels", ids)]
        return TokenizedDocument(ids, labels, splittable="labels" not in record)
    if "text" in record:
        ids = _bos(tokenizer) + _encode(tokenizer, str(record["text"])) + _eos(tokenizer)
        return TokenizedDocument(ids, list(ids), splittable=True)
    answer_key = next((key for key in _ANSWER_KEYS if key in record), None)
    if "prompt" in record and answer_key is not None:
        prompt = str(record["prompt"])
        if chat_template:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("chat_template=True, but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            prompt_ids = _encode(tokenizer, text)
        else:
            prompt_ids = _bos(tokenizer) + _encode(tokenizer, prompt)
        answer_ids = _encode(tokenizer, str(record[answer_key])) + _eos(tokenizer)
        return TokenizedDocument(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
                                 splittable=False)
    raise ValueError(f"a record needs 'text', 'prompt' + one of {list(_ANSWER_KEYS)}, or 'input_ids'; "
                     f"got keys {sorted(record)}")


# ---- packing ------------------------------------------------------------------------------------


def pack_documents(docs: Iterable[TokenizedDocument], seq_len: int, pad_token_id: int) -> list[PackedRow]:
    """Pack documents into rows of exactly ``seq_len`` tokens (see the module docstring)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    rows: list[PackedRow] = []
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    dropped = 0

    def flush():
        if not lengths:
            return
        room = seq_len - len(ids)
        if room:
            ids.extend([pad_token_id] * room)
            labels.extend([IGNORE_INDEX] * room)
            lengths.append(room)
        if any(label != IGNORE_INDEX for label in labels):
            rows.append(PackedRow(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), list(lengths)))
        ids.clear(), labels.clear(), lengths.clear()

    for doc in docs:
        if len(doc) == 0:
            continue
        if not doc.splittable:
            if len(doc) > seq_len:
                dropped += 1
                continue
            if len(doc) > seq_len - len(ids):
                flush()
        pos = 0
        while pos < len(doc):
            take = min(seq_len - len(ids), len(doc) - pos)
            piece_labels = list(doc.labels[pos:pos + take])
            piece_labels[0] = IGNORE_INDEX  # predicted from the previous document: no loss
            ids.extend(doc.input_ids[pos:pos + take])
            labels.extend(piece_labels)
            lengths.append(take)
            pos += take
            if len(ids) == seq_len:
                flush()
    flush()
    if dropped:
        logger.warning("sparseattn: dropped %d SFT example(s) longer than seq_len=%d tokens", dropped, seq_len)
    return rows


class PackedDataset(torch.utils.data.Dataset):
    """Map-style dataset of :class:`PackedRow`: items are dicts of tensors (see :class:`PackedCollator`)."""

    def __init__(self, rows: Sequence[PackedRow]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"input_ids": torch.from_numpy(row.input_ids), "labels": torch.from_numpy(row.labels),
                "doc_lengths": torch.tensor(row.doc_lengths, dtype=torch.int64)}


class PackedCollator:
    """A list of rows (``input_ids``, ``labels``, ``doc_lengths``) -> one packed row for the model.

    Returns ``input_ids`` and ``labels`` `[1, total]`, ``position_ids`` `[1, total]` (restarting at
    each document), ``cu_seq_lens_q`` `[N + 1]` int32, ``max_length_q`` (int).
    """

    def __call__(self, features: list[dict]) -> dict:
        input_ids = torch.cat([f["input_ids"] for f in features])
        labels = torch.cat([f["labels"] for f in features])
        lengths = torch.cat([torch.as_tensor(f["doc_lengths"], dtype=torch.int64) for f in features])
        if int(lengths.sum()) != input_ids.numel():
            raise ValueError(f"doc_lengths sum to {int(lengths.sum())}, but the rows hold {input_ids.numel()} tokens")
        starts = torch.cumsum(lengths, 0) - lengths
        position_ids = torch.arange(input_ids.numel()) - torch.repeat_interleave(starts, lengths)
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None],
                "cu_seq_lens_q": cu, "max_length_q": int(lengths.max())}


# ---- a tokenizer for tests and tiny models ------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258; 0 pad, 1 BOS, 2 EOS): offline, for tiny random models and tests.

    Implements the parts of the transformers tokenizer interface that this package uses.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    chat_template = None
    vocab_size = 259
    _OFFSET = 3

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [b + self._OFFSET for b in text.encode("utf-8")]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(i - self._OFFSET for i in ids if i >= self._OFFSET).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size
