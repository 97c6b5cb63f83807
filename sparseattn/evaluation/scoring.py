"""Scoring answers: RULER's string-match recall and LongBench's token F1.

Example:
    >>> from sparseattn.evaluation.scoring import score
    >>> score(" 1234567 and 7654321.", ["1234567", "7654321", "1111111"], "all")
    0.6666666666666666
    >>> score("It is Paris", ["paris", "Lyon"], "part")
    1.0
    >>> round(score("the cat sat on the mat", ["a cat sat"], "f1"), 3)
    0.667
"""

from __future__ import annotations

import collections
import re
import string

__all__ = ["METRICS", "clean_prediction", "score", "string_match_all", "string_match_part", "token_f1"]

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_prediction(text: str) -> str:
    """RULER's post-processing: control characters become newlines, then strip."""
    return _CONTROL.sub("\n", text).strip()


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of ``answers`` found in ``prediction`` (case-insensitive substrings): RULER's recall."""
    pred = clean_prediction(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """1 if any answer is in ``prediction`` (case-insensitive), else 0: RULER's QA metric."""
    pred = clean_prediction(prediction).lower()
    return float(any(a.lower() in pred for a in answers))


def _words(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, answers: list[str]) -> float:
    """Best word-overlap F1 over ``answers`` (SQuAD normalization: case, punctuation, articles), as LongBench's QA."""
    pred = _words(prediction)
    best = 0.0
    for answer in answers:
        ref = _words(answer)
        common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
        if common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


METRICS = {"all": string_match_all, "part": string_match_part, "f1": token_f1}


def score(prediction: str, answers: list[str], metric: str) -> float:
    """``prediction`` scored against ``answers`` with ``metric`` (a key of :data:`METRICS`), in [0, 1]."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; metrics are {sorted(METRICS)}")
    if not answers:
        raise ValueError("answers must not be empty")
    return METRICS[metric](prediction, list(answers))
