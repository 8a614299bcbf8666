"""Scorers of generated answers: exact integer match, RULER's substring matches, ROUGE-1 F1."""

from __future__ import annotations

import re
from collections import Counter

_CONTROL = re.compile(r"[\x00-\x1f]")
_WORD = re.compile(r"[a-z0-9]+")


def first_integer(text: str) -> int | None:
    """The first integer in a generated answer, or None."""
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def clean_prediction(text: str) -> str:
    """RULER's post-processing: control characters become newlines, then the ends are stripped."""
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of references found in the prediction (case-insensitive substring), RULER's metric for synthetic tasks."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = clean_prediction(prediction).lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1.0 when any reference is found in the prediction (case-insensitive substring), RULER's metric for QA."""
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    pred = clean_prediction(prediction).lower()
    return max(1.0 if r.lower() in pred else 0.0 for r in references)


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words (the default tokenisation of ROUGE, without stemming)."""
    return _WORD.findall(text.lower())


def rouge1(reference: str, prediction: str) -> dict[str, float]:
    """ROUGE-1 precision, recall and F1 between a reference and a prediction (unigram overlap with counts)."""
    ref, pred = Counter(rouge_tokens(reference)), Counter(rouge_tokens(prediction))
    overlap = sum((ref & pred).values())
    if overlap == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    p = overlap / sum(pred.values())
    r = overlap / sum(ref.values())
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r)}


def answer_complete_integer(text: str) -> bool:
    """True once the text holds an integer followed by something else, so the first integer can no longer change."""
    return re.search(r"\d+\D", text) is not None


def all_found(text: str, references: list[str]) -> bool:
    """True once every reference is a substring of the text (case-insensitive): more tokens cannot change the score."""
    low = text.lower()
    return all(r.lower() in low for r in references)
