"""Retrieval-style documents for the demo: passkey needles in noise or code haystacks, with the answer marked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from longforge.eval.passkey import FILLER, NEEDLE, QUESTION


@dataclass
class RetrievalDoc:
    """Token ids of one retrieval document and the span of its answer."""

    ids: list[int]
    answer: tuple[int, int]


class RetrievalDocs:
    """Makes passkey documents of a given token length, in the exact format of the passkey evaluation."""

    def __init__(self, tokenizer: Any, corpus_ids: np.ndarray):
        self.tok = tokenizer
        self.corpus = corpus_ids
        enc = self._enc
        self.filler = [enc(" " + s) for s in FILLER]
        self.question = enc(" " + QUESTION)
        self.dot = enc(".")

    def _enc(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _noise(self, n: int) -> list[list[int]]:
        """Filler sentences (as token lists) totalling at most n tokens."""
        out, total, i = [], 0, 0
        while total + len(self.filler[i % len(self.filler)]) <= n:
            out.append(self.filler[i % len(self.filler)])
            total += len(out[-1])
            i += 1
        return out

    def make(self, length: int, rng: np.random.Generator, haystack: str) -> RetrievalDoc:
        """A document of about `length` tokens: haystack, needle at a uniform depth, question, answer."""
        key = int(rng.integers(10000, 100000))
        needle = self._enc(" " + NEEDLE.format(key=key))
        answer = self._enc(" " + str(key))
        room = max(length - len(needle) - len(self.question) - len(answer) - len(self.dot), 0)
        if haystack == "noise":
            sentences = self._noise(room)
            at = int(rng.integers(0, len(sentences) + 1))
            before = [t for s in sentences[:at] for t in s]
            after = [t for s in sentences[at:] for t in s]
        else:
            start = int(rng.integers(0, max(len(self.corpus) - room, 1)))
            hay = self.corpus[start : start + room].tolist()
            at = int(rng.integers(0, len(hay) + 1))
            before, after = hay[:at], hay[at:]
        ids = before + needle + after + self.question
        a0 = len(ids)
        ids = ids + answer + self.dot
        return RetrievalDoc(ids, (a0, a0 + len(answer)))

    def text(self, length: int, rng: np.random.Generator, haystack: str) -> str:
        """The same document as text (for a corpus source file)."""
        return self.tok.decode(self.make(length, rng, haystack).ids, skip_special_tokens=True)
