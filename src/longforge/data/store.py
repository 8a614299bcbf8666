"""The shard store: memory-mapped token shards with document starts, and a deterministic, resumable loader plan.

Layout of a data folder (format 2): `index.json`, then per shard k
`tokens-k.bin` (raw [num_sequences, seq_len] array of the index's dtype, written as it is packed),
`starts-k.npy` (document start offsets of every sequence, concatenated), `offsets-k.npy` (where each sequence's
starts begin in it) and `costs-k.npy` (sum of squared document lengths per sequence). Format 1 (`tokens-k.npy`)
is still read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from longforge.data.pack import Packed, sum_squared_lengths
from longforge.errors import LongforgeError

INDEX = "index.json"
FORMAT_VERSION = 2


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned integer type that holds every token id."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


class ShardWriter:
    """Writes packed sequences into shards of shard_sequences sequences, streaming tokens to disk, plus an index."""

    def __init__(self, out: Path, seq_len: int, vocab_size: int, shard_sequences: int, meta: dict[str, Any] | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.seq_len = seq_len
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.shard_sequences = shard_sequences
        self.meta = meta or {}
        self.shards: list[dict[str, Any]] = []
        self.num_sequences = 0
        self._fh: IO[bytes] | None = None
        self._in_shard = 0
        self._starts: list[np.ndarray] = []
        self._costs: list[int] = []

    def _names(self, k: int) -> dict[str, str]:
        return {"tokens": f"tokens-{k:05d}.bin", "starts": f"starts-{k:05d}.npy", "offsets": f"offsets-{k:05d}.npy",
                "costs": f"costs-{k:05d}.npy"}

    def add(self, seq: Packed) -> None:
        """Append one sequence to the current shard; a full shard is closed."""
        assert len(seq.tokens) == self.seq_len
        if self._fh is None:
            self._fh = (self.out / self._names(len(self.shards))["tokens"]).open("wb")
        self._fh.write(np.ascontiguousarray(seq.tokens, dtype=self.dtype).tobytes())
        starts = np.asarray(seq.starts, dtype=np.int32)
        self._starts.append(starts)
        self._costs.append(sum_squared_lengths(starts, self.seq_len))
        self._in_shard += 1
        self.num_sequences += 1
        if self._in_shard == self.shard_sequences:
            self._flush()

    def _flush(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        names = self._names(len(self.shards))
        np.save(self.out / names["starts"], np.concatenate(self._starts))
        np.save(self.out / names["offsets"], np.cumsum([0] + [len(s) for s in self._starts]).astype(np.int64))
        np.save(self.out / names["costs"], np.asarray(self._costs, dtype=np.int64))
        self.shards.append({**names, "num_sequences": self._in_shard})
        self._starts, self._costs, self._in_shard = [], [], 0

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
        tmp = self.out / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.out / INDEX)  # the index appears only once every shard is complete
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
        shards = self.index["shards"]
        try:
            self._tokens = [self._open_tokens(s) for s in shards]
            self._starts = [np.load(self.root / s["starts"], mmap_mode="r") for s in shards]
            self._offsets = [np.load(self.root / s["offsets"]) for s in shards]
        except (OSError, ValueError) as e:
            raise LongforgeError(f"{self.root}: a shard is missing or damaged ({e}); rebuild it with `longforge data build`.") from None
        self._first = np.cumsum([0] + [s["num_sequences"] for s in shards])
        self._costs: np.ndarray | None = None
        if len(self) == 0:
            raise LongforgeError(f"{self.root} holds no sequences; give the data stage more text or a shorter seq_len.")

    def _open_tokens(self, shard: dict[str, Any]) -> np.ndarray:
        path = self.root / shard["tokens"]
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r")
        n = int(shard["num_sequences"])
        dtype = np.dtype(self.index["dtype"])
        if path.stat().st_size != n * self.seq_len * dtype.itemsize:
            raise ValueError(f"{path.name} holds {path.stat().st_size} bytes, not {n} sequences of {self.seq_len} {dtype.name}")
        return np.memmap(path, dtype=dtype, mode="r", shape=(n, self.seq_len))

    def __len__(self) -> int:
        return int(self._first[-1])

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (int64) and document start offsets of sequence i."""
        k = int(np.searchsorted(self._first, i, side="right") - 1)
        j = i - int(self._first[k])
        off = self._offsets[k]
        return np.asarray(self._tokens[k][j], dtype=np.int64), np.asarray(self._starts[k][off[j] : off[j + 1]])

    def costs(self) -> np.ndarray:
        """Sum of squared document lengths of every sequence (computed from the starts for format 1)."""
        if self._costs is None:
            parts = []
            for k, s in enumerate(self.index["shards"]):
                if "costs" in s:
                    parts.append(np.load(self.root / s["costs"]))
                else:
                    off = self._offsets[k]
                    parts.append(np.array([sum_squared_lengths(self._starts[k][off[j] : off[j + 1]], self.seq_len)
                                           for j in range(len(off) - 1)], dtype=np.int64))
            self._costs = np.concatenate(parts)
        return self._costs

    def fingerprint(self) -> str:
        """A short hash of the index, to check that a saved loader state belongs to this data."""
        return hashlib.sha256((self.root / INDEX).read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class LoaderPlan:
    """Which sequences form each step's global batch: a pure function of (seed, step).

    Sequences are read in a fresh permutation each epoch, consumed global_batch at a time, so an epoch never
    repeats or skips one. `start_step`/`start_consumed` continue a run whose earlier steps consumed a different
    number of sequences per step (a changed batch size or world size) without repeating or skipping any.
    With `costs` (sum of squared document lengths), each global batch is ordered by cost, costliest first, and
    ranks take every world-th sequence, so the ranks hold sequences of similar attention cost at each micro-step.
    """

    num_sequences: int
    global_batch: int
    seed: int
    costs: np.ndarray | None = None
    start_step: int = 0
    start_consumed: int = 0

    def consumed(self, step: int) -> int:
        """Sequences read before `step`."""
        if step < self.start_step:
            raise LongforgeError(f"step {step} comes before this loader's resumed step {self.start_step}; resume from an earlier state.")
        return self.start_consumed + (step - self.start_step) * self.global_batch

    def indices(self, step: int) -> np.ndarray:
        """Sequence indices of the global batch at `step` (epochs reshuffle; no sequence repeats within one)."""
        first = self.consumed(step)
        k = np.arange(first, first + self.global_batch, dtype=np.int64)
        epochs, pos = np.divmod(k, self.num_sequences)
        out = np.empty_like(k)
        for e in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(e)]).permutation(self.num_sequences)
            sel = epochs == e
            out[sel] = perm[pos[sel]]
        if self.costs is not None:
            out = out[np.lexsort((out, -self.costs[out]))]  # costliest first; ties by index, so it stays deterministic
        return out

    def rank_indices(self, step: int, rank: int, world: int) -> np.ndarray:
        """The slice of the global batch that one data-parallel rank reads."""
        if self.global_batch % world:
            raise LongforgeError(f"global batch {self.global_batch} is not divisible by {world} data-parallel ranks; change batch_size.")
        batch = self.indices(step)
        if self.costs is not None:
            return batch[rank::world]
        per = self.global_batch // world
        return batch[rank * per : (rank + 1) * per]
