"""Sentence boundaries of packed token sequences, derived at batch time from the tokens (for LongRecipe's PIT)."""

from __future__ import annotations

from typing import Any

import numpy as np

SENTENCE_END = (".", "?", "!")


def is_sentence_end(text: str) -> bool:
    """True when a token's text ends a sentence: it contains a newline or ends with '.', '?' or '!' (spaces aside)."""
    return "\n" in text or text.rstrip(" \t").endswith(SENTENCE_END)


def sentence_end_mask(tokenizer: Any) -> np.ndarray:
    """Boolean mask over the tokenizer's ids: True for tokens that end a sentence (LongRecipe splits on . ? ! and newlines)."""
    n = len(tokenizer)
    # One id at a time, so each token's own text is judged (decoding a run would merge neighbours).
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return np.fromiter((is_sentence_end(t) for t in texts), dtype=bool, count=n)


def sentence_starts(tokens: np.ndarray, end_mask: np.ndarray, doc_starts: np.ndarray | None = None) -> np.ndarray:
    """Sorted start offsets of the sentence segments of a token array: 0, every document start, and every token after a run of sentence ends."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    ends = np.zeros(n, dtype=bool)
    known = tokens < len(end_mask)  # ids beyond the tokenizer (padded embeddings) never end a sentence
    ends[known] = end_mask[tokens[known]]
    # A segment ends after the LAST of consecutive enders (".\n\n" stays one boundary, not three tiny segments).
    after_run = np.flatnonzero(ends[:-1] & ~ends[1:]) + 1
    docs = np.asarray(doc_starts if doc_starts is not None else [], dtype=np.int64)
    docs = docs[(docs > 0) & (docs < n)]
    return np.unique(np.concatenate([[0] if n else [], after_run, docs]).astype(np.int64))
