"""Sentence selection (LongRecipe): split a tokenized document into sentences, score them, keep the best up to a budget.

A filter only scores sentences; splitting and the budget are shared, so LongRecipe's released heuristic (sentences
with a digit always kept) and the impactful-token profile (a later filter) plug in the same way: write a class with
`scores(ids, bounds, rng)` and register a factory in FILTERS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from longforge.config import SentenceFilterSpec

SENTENCE_ENDS = ".\n?!"


@dataclass(frozen=True)
class VocabTables:
    """Per-token-id facts a filter needs: does the token end a sentence, does it hold a digit."""

    ends_sentence: np.ndarray
    has_digit: np.ndarray

    @classmethod
    def from_strings(cls, pieces: list[str]) -> "VocabTables":
        """Tables from the decoded text of every token id, in id order."""
        ends = np.array([any(c in p for c in SENTENCE_ENDS) for p in pieces], dtype=bool)
        digit = np.array([any(c.isdigit() for c in p) for p in pieces], dtype=bool)
        return cls(ends, digit)


def vocab_tables(tokenizer: Any) -> VocabTables:
    """Tables for a Hugging Face tokenizer, decoding every id on its own."""
    backend = tokenizer.backend_tokenizer
    n = backend.get_vocab_size(with_added_tokens=True)
    return VocabTables.from_strings(backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False))


def sentence_bounds(ids: np.ndarray, ends_sentence: np.ndarray) -> np.ndarray:
    """Start offsets of the sentences of a token sequence, then its length: a sentence ends after a token holding . \\n ? or !."""
    ends = np.flatnonzero(ends_sentence[ids]) + 1
    ends = ends[ends < len(ids)]
    return np.concatenate([[0], ends, [len(ids)]]).astype(np.int64)


class SentenceFilter(Protocol):
    """Scores the sentences of one document: higher is kept first; -inf is never kept."""

    def scores(self, ids: np.ndarray, bounds: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


@dataclass(frozen=True)
class DigitHeuristic:
    """LongRecipe's released heuristic: a sentence with a digit is always wanted; any other with probability keep_prob."""

    tables: VocabTables
    keep_prob: float

    def scores(self, ids: np.ndarray, bounds: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """2 for sentences with a digit, 1 for the others that win the draw, -inf for the rest."""
        digit_count = np.add.reduceat(self.tables.has_digit[ids].astype(np.int64), bounds[:-1]) if len(ids) else np.zeros(0)
        lucky = rng.random(len(bounds) - 1) < self.keep_prob
        return np.where(digit_count > 0, 2.0, np.where(lucky, 1.0, -np.inf))


FILTERS: dict[str, Callable[[SentenceFilterSpec, VocabTables], SentenceFilter]] = {
    "digits": lambda spec, tables: DigitHeuristic(tables, spec.keep_prob),
}


def select_sentences(ids: np.ndarray, bounds: np.ndarray, scores: np.ndarray, budget: int) -> np.ndarray:
    """The tokens of the best-scored sentences that fit in `budget` tokens, in document order.

    Sentences are taken by descending score (earlier first on ties) until the next one would pass the budget,
    so a lower-scored sentence is never taken in place of a better one that did not fit.
    """
    lengths = np.diff(bounds)
    wanted = np.flatnonzero(np.isfinite(scores))
    order = wanted[np.lexsort((wanted, -scores[wanted]))]
    fits = np.cumsum(lengths[order]) <= budget
    keep = np.sort(order[fits])
    if len(keep) == 0:
        return ids[:0]
    return np.concatenate([ids[bounds[i] : bounds[i + 1]] for i in keep])


@dataclass
class SentenceSelection:
    """The filter stage: applies a SentenceFilter to every document long enough, with the recipe's budget."""

    spec: SentenceFilterSpec
    tables: VocabTables

    def __post_init__(self) -> None:
        self.filter = FILTERS[self.spec.method](self.spec, self.tables)

    def apply(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The document's kept tokens (all of them when it is shorter than min_document_tokens)."""
        if len(ids) < self.spec.min_document_tokens or len(ids) == 0:
            return ids
        bounds = sentence_bounds(ids, self.tables.ends_sentence)
        budget = int(self.spec.budget_fraction * len(ids))
        return select_sentences(ids, bounds, self.filter.scores(ids, bounds, rng), budget)
