"""Packing documents into fixed-length sequences, recording where each document starts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Packed:
    """One packed sequence: its tokens and the offsets where documents start inside it."""

    tokens: np.ndarray
    starts: np.ndarray


def doc_lengths(starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Lengths of the document pieces of a sequence, from its start offsets."""
    return np.diff(np.append(np.asarray(starts, dtype=np.int64), seq_len))


def sum_squared_lengths(starts: np.ndarray, seq_len: int) -> int:
    """Sum of squared document lengths: proportional to the attention cost of a document-masked sequence."""
    n = doc_lengths(starts, seq_len)
    return int((n * n).sum())


@dataclass
class Packer:
    """Joins documents with a separator and cuts the stream into sequences of seq_len tokens."""

    seq_len: int
    prefix: Sequence[int] = field(default_factory=list)
    suffix: Sequence[int] = field(default_factory=list)
    dtype: type = np.int64

    def __post_init__(self) -> None:
        self._prefix = np.asarray(self.prefix, dtype=self.dtype)
        self._suffix = np.asarray(self.suffix, dtype=self.dtype)
        self._buf = np.empty(self.seq_len, dtype=self.dtype)
        self._fill = 0
        self._starts: list[int] = []

    def add(self, doc: Sequence[int] | np.ndarray) -> Iterator[Packed]:
        """Append one document; yield every sequence that became full."""
        # A document continuing into the next sequence starts there (for that sequence) at offset 0.
        self._starts.append(self._fill)
        for part in (self._prefix, np.asarray(doc, dtype=self.dtype), self._suffix):
            pos = 0
            while pos < len(part):
                take = min(len(part) - pos, self.seq_len - self._fill)
                self._buf[self._fill : self._fill + take] = part[pos : pos + take]
                self._fill += take
                pos += take
                if self._fill == self.seq_len:
                    yield self._cut()

    def _cut(self) -> Packed:
        out = Packed(self._buf.copy(), np.asarray(sorted({0, *self._starts}), dtype=np.int32))
        self._fill = 0
        self._starts = []
        return out

    @property
    def pending_tokens(self) -> int:
        """Tokens held back because they do not fill a whole sequence."""
        return self._fill

    def state(self) -> dict[str, list[int]]:
        """The held-back tokens and starts, to resume packing later."""
        return {"tokens": self._buf[: self._fill].tolist(), "starts": list(self._starts)}

    def restore(self, state: dict[str, list[int]]) -> None:
        """Continue from a state returned by `state()`."""
        toks = state["tokens"]
        self._buf[: len(toks)] = toks
        self._fill = len(toks)
        self._starts = list(state["starts"])


def separator_tokens(separator: str, tokenizer: object) -> tuple[list[int], list[int]]:
    """(prefix, suffix) token ids placed around each document for a separator setting."""
    if separator == "none":
        return [], []
    if separator == "eos":
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("the tokenizer has no EOS token; use separator 'bos', 'none' or 'text:<s>'")
        return [], [int(eos)]
    if separator == "bos":
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError("the tokenizer has no BOS token; use separator 'eos', 'none' or 'text:<s>'")
        return [int(bos)], []
    assert separator.startswith("text:")
    ids = tokenizer(separator[5:], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return list(ids), []
