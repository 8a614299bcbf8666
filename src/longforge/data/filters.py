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
    """Per-token-id facts a filter needs: does the token end a sentence, does it hold a digit, its text."""

    ends_sentence: np.ndarray
    has_digit: np.ndarray
    pieces: tuple[str, ...] = ()

    @classmethod
    def from_strings(cls, pieces: list[str]) -> "VocabTables":
        """Tables from the decoded text of every token id, in id order."""
        ends = np.array([any(c in p for c in SENTENCE_ENDS) for p in pieces], dtype=bool)
        digit = np.array([any(c.isdigit() for c in p) for p in pieces], dtype=bool)
        return cls(ends, digit, tuple(pieces))


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


@dataclass(frozen=True)
class ImpactfulProfile:
    """LongRecipe's selection: keep sentences holding impactful token types, densest first; drop the others."""

    impactful: np.ndarray  # per token id: is its type one of the profile's selected types

    def scores(self, ids: np.ndarray, bounds: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Share of impactful tokens in each sentence; -inf for sentences with none."""
        if not len(ids):
            return np.zeros(0)
        count = np.add.reduceat(self.impactful[ids].astype(np.int64), bounds[:-1])
        density = count / np.maximum(np.diff(bounds), 1)
        return np.where(count > 0, density, -np.inf)


@dataclass(frozen=True)
class RandomSentences:
    """The ablation baseline: sentences in random order, up to the same budget."""

    def scores(self, ids: np.ndarray, bounds: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A uniform random score per sentence."""
        return rng.random(len(bounds) - 1)


def profile_filter(spec: SentenceFilterSpec, tables: VocabTables) -> ImpactfulProfile:
    """The filter of an impactful-token profile written by `longforge analyze impactful`."""
    import json

    from longforge.analyze.impactful import builtin_type
    from longforge.errors import LongforgeError

    assert spec.profile is not None
    try:
        selected = set(json.loads(spec.profile.read_text())["selected"])
    except (OSError, ValueError, KeyError):
        raise LongforgeError(f"{spec.profile} is not a profile.json from `longforge analyze impactful`; run it first.") from None
    if not selected:
        raise LongforgeError(f"{spec.profile} selects no token type; lower its threshold or use method 'digits'.")
    # Built-in types carry the part-of-speech names (NUM, PRON, AUX, ...), so spaCy profiles map onto them too.
    types = np.array([builtin_type(p) in selected for p in tables.pieces], dtype=bool)
    return ImpactfulProfile(types)


FILTERS: dict[str, Callable[[SentenceFilterSpec, VocabTables], SentenceFilter]] = {
    "digits": lambda spec, tables: DigitHeuristic(tables, spec.keep_prob),
    "profile": profile_filter,
    "random": lambda spec, tables: RandomSentences(),
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
