"""The shard store: memory-mapped token shards with document starts, and a deterministic loader."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from longforge.data.pack import Packed
from longforge.errors import LongforgeError

INDEX = "index.json"
FORMAT_VERSION = 1


class ShardWriter:
    """Writes packed sequences into shards of fixed size plus an index."""

    def __init__(self, out: Path, seq_len: int, vocab_size: int, shard_sequences: int, meta: dict[str, Any] | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.seq_len = seq_len
        self.dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        self.vocab_size = vocab_size
        self.shard_sequences = shard_sequences
        self.meta = meta or {}
        self.shards: list[dict[str, Any]] = []
        self._tokens: list[np.ndarray] = []
        self._starts: list[np.ndarray] = []
        self.num_sequences = 0

    def add(self, seq: Packed) -> None:
        """Queue one sequence; a full shard is written to disk."""
        assert len(seq.tokens) == self.seq_len
        self._tokens.append(seq.tokens.astype(self.dtype))
        self._starts.append(seq.starts.astype(np.int32))
        self.num_sequences += 1
        if len(self._tokens) == self.shard_sequences:
            self._flush()

    def _flush(self) -> None:
        if not self._tokens:
            return
        k = len(self.shards)
        names = {"tokens": f"tokens-{k:05d}.npy", "starts": f"starts-{k:05d}.npy", "offsets": f"offsets-{k:05d}.npy"}
        np.save(self.out / names["tokens"], np.stack(self._tokens))
        np.save(self.out / names["starts"], np.concatenate(self._starts))
        np.save(self.out / names["offsets"], np.cumsum([0] + [len(s) for s in self._starts]).astype(np.int64))
        self.shards.append({**names, "num_sequences": len(self._tokens)})
        self._tokens, self._starts = [], []

    def close(self) -> dict[str, Any]:
        """Write the last shard and the index; returns the index."""
        self._flush()
        index = {
            "format": FORMAT_VERSION,
            "seq_len": self.seq_len,
            "dtype": np.dtype(self.dtype).name,
            "vocab_size": self.vocab_size,
            "num_sequences": self.num_sequences,
            "shards": self.shards,
            **self.meta,
        }
        (self.out / INDEX).write_text(json.dumps(index, indent=2))
        return index


class PackedDataset:
    """Random access to the sequences of a shard store, memory-mapped."""

    def __init__(self, root: Path):
        self.root = Path(root)
        path = self.root / INDEX
        if not path.is_file():
            raise LongforgeError(f"{self.root} is not a longforge data folder (no {INDEX}); run `longforge data build` first.")
        self.index = json.loads(path.read_text())
        self.seq_len = int(self.index["seq_len"])
        self._tokens = [np.load(self.root / s["tokens"], mmap_mode="r") for s in self.index["shards"]]
        self._starts = [np.load(self.root / s["starts"], mmap_mode="r") for s in self.index["shards"]]
        self._offsets = [np.load(self.root / s["offsets"]) for s in self.index["shards"]]
        self._first = np.cumsum([0] + [s["num_sequences"] for s in self.index["shards"]])
        if len(self) == 0:
            raise LongforgeError(f"{self.root} holds no sequences; give the data stage more text or a shorter seq_len.")

    def __len__(self) -> int:
        return int(self._first[-1])

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (int64) and document start offsets of sequence i."""
        k = int(np.searchsorted(self._first, i, side="right") - 1)
        j = i - int(self._first[k])
        off = self._offsets[k]
        return np.asarray(self._tokens[k][j], dtype=np.int64), np.asarray(self._starts[k][off[j] : off[j + 1]])


@dataclass(frozen=True)
class LoaderPlan:
    """Which sequences form each step's global batch: a pure function of (seed, step)."""

    num_sequences: int
    global_batch: int
    seed: int

    def indices(self, step: int) -> np.ndarray:
        """Sequence indices of the global batch at `step` (epochs reshuffle; no sequence repeats within one)."""
        k = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
        epochs, pos = np.divmod(k, self.num_sequences)
        out = np.empty_like(k)
        for e in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(e)]).permutation(self.num_sequences)
            sel = epochs == e
            out[sel] = perm[pos[sel]]
        return out

    def rank_indices(self, step: int, rank: int, world: int) -> np.ndarray:
        """The slice of the global batch that one data-parallel rank reads."""
        if self.global_batch % world:
            raise LongforgeError(f"global batch {self.global_batch} is not divisible by {world} data-parallel ranks; change batch_size.")
        per = self.global_batch // world
        return self.indices(step)[rank * per : (rank + 1) * per]
