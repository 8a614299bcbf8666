"""Packing documents into fixed-length sequences, recording where each document starts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Packed:
    """One packed sequence: its tokens and the offsets where documents start inside it."""

    tokens: np.ndarray
    starts: np.ndarray


@dataclass
class Packer:
    """Joins documents with a separator and cuts the stream into sequences of seq_len tokens."""

    seq_len: int
    prefix: list[int] = field(default_factory=list)
    suffix: list[int] = field(default_factory=list)
    _buf: list[int] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list)

    def add(self, doc: list[int]) -> Iterator[Packed]:
        """Append one document; yield every sequence that became full."""
        self._starts.append(len(self._buf))
        self._buf.extend(self.prefix)
        self._buf.extend(doc)
        self._buf.extend(self.suffix)
        while len(self._buf) >= self.seq_len:
            yield self._cut()

    def _cut(self) -> Packed:
        n = self.seq_len
        tokens = np.asarray(self._buf[:n], dtype=np.int64)
        inside = [s for s in self._starts if s < n]
        # A document continuing from the previous sequence starts (for this sequence) at offset 0.
        starts = sorted({0, *inside})
        rest = [s - n for s in self._starts if s >= n]
        self._buf = self._buf[n:]
        self._starts = rest
        return Packed(tokens, np.asarray(starts, dtype=np.int32))

    @property
    def pending_tokens(self) -> int:
        """Tokens held back because they do not fill a whole sequence."""
        return len(self._buf)


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
