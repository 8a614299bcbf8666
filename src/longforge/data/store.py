"""The shard store: memory-mapped token shards with document starts, and a deterministic, resumable loader plan.

Layout of a data folder (format 3): `index.json`, then per shard k
`tokens-k.bin` (raw [num_sequences, seq_len] array of the index's dtype, written as it is packed),
`starts-k.npy` (document start offsets of every sequence, concatenated), `offsets-k.npy` (where each sequence's
starts begin in it) and `costs-k.npy` (sum of squared document lengths per sequence). The index records, per
shard, each file's size and blake2b hash and the largest token id, and the vocabulary identity of the tokenizer
that wrote it. Format 2 (the same without checksums) and format 1 (`tokens-k.npy`) are still read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from longforge.data.pack import Packed, sum_squared_lengths
from longforge.errors import LongforgeError
from longforge.files import atomic_write_text, writing

INDEX = "index.json"
# Where an interrupted `data build` records how to continue, after each complete shard; removed when the build ends.
BUILD_STATE = "build-state.json"
FORMAT_VERSION = 3
FILE_ROLES = ("tokens", "starts", "offsets", "costs")
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")
TOKEN_SHARD = re.compile(r"^tokens-\d+\.(bin|npy)$")
# Shard names are joined to the folder: plain names only, so an index cannot point outside it.
SHARD_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned integer type that holds every token id."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def new_hash() -> Any:
    """The hash used for shard checksums."""
    return hashlib.blake2b(digest_size=32)


def new_hash_of(data: bytes) -> str:
    """The checksum of some bytes."""
    h = new_hash()
    h.update(data)
    return h.hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    """Write a shard file and flush it to disk (a resumed build trusts what it recorded as complete)."""
    with writing(path), path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _npy_bytes(arr: np.ndarray) -> bytes:
    """The .npy file content of an array (hashed before it is written)."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


class ShardWriter:
    """Writes packed sequences into shards of shard_sequences sequences, streaming tokens to disk, plus an index.

    Each file's size and blake2b hash (the token stream is hashed as it is written), each shard's sequence count
    and largest token id go into the index, so a reader can check the folder is whole.
    """

    def __init__(self, out: Path, seq_len: int, vocab_size: int, shard_sequences: int, meta: dict[str, Any] | None = None):
        self.out = Path(out)
        with writing(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
        self.seq_len = seq_len
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.shard_sequences = shard_sequences
        self.meta = meta or {}
        self.shards: list[dict[str, Any]] = []
        self.num_sequences = 0
        self._fh: IO[bytes] | None = None
        self._hash = new_hash()
        self._in_shard = 0
        self._max_token = -1
        self._starts: list[np.ndarray] = []
        self._costs: list[int] = []

    def _names(self, k: int) -> dict[str, str]:
        return {"tokens": f"tokens-{k:05d}.bin", "starts": f"starts-{k:05d}.npy", "offsets": f"offsets-{k:05d}.npy",
                "costs": f"costs-{k:05d}.npy"}

    def _tokens_path(self) -> Path:
        return self.out / self._names(len(self.shards))["tokens"]

    def add(self, seq: Packed) -> None:
        """Append one sequence to the current shard; a full shard is closed."""
        assert len(seq.tokens) == self.seq_len
        top = int(np.max(seq.tokens))
        if top >= self.vocab_size:  # would wrap around in the shard's dtype, or index past the embeddings
            raise LongforgeError(f"token id {top} is beyond the tokenizer's vocabulary of {self.vocab_size}; "
                                 "the tokenizer is inconsistent: check its tokenizer.json and added tokens.")
        path = self._tokens_path()
        if self._fh is None:
            with writing(path):
                self._fh = path.open("wb")
        data = np.ascontiguousarray(seq.tokens, dtype=self.dtype).tobytes()
        with writing(path):
            self._fh.write(data)
        self._hash.update(data)
        self._max_token = max(self._max_token, top)
        starts = np.asarray(seq.starts, dtype=np.int32)
        self._starts.append(starts)
        self._costs.append(sum_squared_lengths(starts, self.seq_len))
        self._in_shard += 1
        self.num_sequences += 1
        if self._in_shard == self.shard_sequences:
            self._flush()

    def _sync_tokens(self) -> None:
        """Flush the open token file to disk."""
        if self._fh is not None:
            with writing(self._tokens_path()):
                self._fh.flush()
                os.fsync(self._fh.fileno())

    def _flush(self) -> None:
        if self._fh is None:
            return
        self._sync_tokens()
        tokens_bytes = self._fh.tell()
        self._fh.close()
        self._fh = None
        names = self._names(len(self.shards))
        blobs = {"starts": _npy_bytes(np.concatenate(self._starts)),
                 "offsets": _npy_bytes(np.cumsum([0] + [len(s) for s in self._starts]).astype(np.int64)),
                 "costs": _npy_bytes(np.asarray(self._costs, dtype=np.int64))}
        for role, blob in blobs.items():
            _write_durably(self.out / names[role], blob)
        sizes = {"tokens": tokens_bytes, **{r: len(b) for r, b in blobs.items()}}
        hashes = {"tokens": self._hash.hexdigest(), **{r: new_hash_of(b) for r, b in blobs.items()}}
        self.shards.append({**names, "num_sequences": self._in_shard, "max_token": self._max_token,
                            "bytes": sizes, "blake2b": hashes})
        self._starts, self._costs, self._in_shard, self._max_token, self._hash = [], [], 0, -1, new_hash()

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
        atomic_write_text(self.out / INDEX, json.dumps(index, indent=2))  # appears only once every shard is complete
        return index

    def abandon(self) -> None:
        """Close the open token file without finishing the shard (the build stopped; a resume truncates it)."""
        if self._fh is not None:
            with contextlib.suppress(OSError):  # a full disk may refuse the last buffered bytes: they are cut anyway
                self._fh.close()
            self._fh = None

    def state(self) -> dict[str, Any]:
        """Everything needed to continue writing after a restart: finished shards and the shard being written."""
        self._sync_tokens()
        return {"shards": self.shards, "num_sequences": self.num_sequences, "in_shard": self._in_shard,
                "max_token": self._max_token, "starts": [s.tolist() for s in self._starts], "costs": list(self._costs),
                "tokens_bytes": self._fh.tell() if self._fh is not None else 0,
                "tokens_blake2b": self._hash.hexdigest()}

    def restore(self, state: dict[str, Any]) -> str | None:
        """Continue from `state()`: drop what was written after it; returns why that is impossible, or None."""
        shards, n = state["shards"], int(state["in_shard"])
        if not (len(state["starts"]) == len(state["costs"]) == n
                and int(state["tokens_bytes"]) == n * self.seq_len * np.dtype(self.dtype).itemsize):
            return "its record of the shard being written does not add up"
        for s in shards:
            for role in FILE_ROLES:
                p = self.out / s[role]
                if not p.is_file() or p.stat().st_size != s["bytes"][role]:
                    return f"{p.name} is missing or changed"
        k = len(shards)
        self._remove_from(k + (1 if state["in_shard"] else 0))
        for role in ("starts", "offsets", "costs"):
            (self.out / self._names(k)[role]).unlink(missing_ok=True)
        path = self.out / self._names(k)["tokens"]
        size, digest = int(state["tokens_bytes"]), new_hash()
        if state["in_shard"]:
            if not path.is_file() or path.stat().st_size < size:
                return f"{path.name} is shorter than recorded"
            with writing(path):
                os.truncate(path, size)
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
            if digest.hexdigest() != state["tokens_blake2b"]:
                return f"{path.name} changed since it was recorded"
            with writing(path):
                self._fh = path.open("ab")
        else:
            path.unlink(missing_ok=True)
        self.shards, self.num_sequences, self._in_shard = list(shards), int(state["num_sequences"]), int(state["in_shard"])
        self._max_token, self._hash = int(state["max_token"]), digest
        self._starts = [np.asarray(s, dtype=np.int32) for s in state["starts"]]
        self._costs = [int(c) for c in state["costs"]]
        return None

    def _remove_from(self, k: int) -> None:
        """Delete shard files numbered k and above (written after the recorded state)."""
        for f in self.out.glob("*-*.*"):
            m = re.match(r"^(tokens|starts|offsets|costs)-(\d+)\.(bin|npy)$", f.name)
            if m and int(m.group(2)) >= k:
                f.unlink()


def _damaged_index(path: Path, why: str) -> LongforgeError:
    return LongforgeError(f"{path} is damaged ({why}); rebuild the folder with `longforge data build`.")


def read_index(root: Path) -> dict[str, Any]:
    """The index of a data folder, checked for shape; one sentence when it is missing, unreadable or damaged."""
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        if (root / BUILD_STATE).is_file():
            raise LongforgeError(f"{root} holds a data build that was interrupted (no {INDEX} yet); run the same "
                                 "`longforge data build` again to finish it.")
        raise LongforgeError(f"{root} is not a longforge data folder (no {INDEX}); run `longforge data build` first.")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise LongforgeError(f"cannot read {path} ({e.strerror or e}); check its permissions.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged_index(path, f"not valid JSON: {getattr(e, 'msg', None) or e}") from None
    if not isinstance(index, dict):
        raise _damaged_index(path, "not a JSON object")
    fmt = index.get("format", 1)
    if not isinstance(fmt, int) or fmt < 1:
        raise _damaged_index(path, f"format {fmt!r}")
    if fmt > FORMAT_VERSION:
        raise LongforgeError(f"{path} has format {fmt}, newer than this longforge reads ({FORMAT_VERSION}); "
                             "upgrade longforge or rebuild the folder.")
    for key in ("seq_len", "num_sequences"):
        v = index.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "seq_len" else 0):
            raise _damaged_index(path, f"{key} is {v!r}")
    if index.get("dtype") not in TOKEN_DTYPES:
        raise _damaged_index(path, f"dtype is {index.get('dtype')!r}")
    vocab = index.get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or vocab < 1):
        raise _damaged_index(path, f"vocab_size is {vocab!r}")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise _damaged_index(path, "no list of shards")
    for i, s in enumerate(shards):
        _check_shard_entry(path, i, s, fmt)
    return index


def _check_shard_entry(path: Path, i: int, s: Any, fmt: int) -> None:
    """One shard entry of an index: plain file names, a sequence count, and sizes and hashes when listed."""
    if not isinstance(s, dict):
        raise _damaged_index(path, f"shard {i} is not an object")
    roles = FILE_ROLES if fmt >= 2 else FILE_ROLES[:3]
    for role in roles:
        name = s.get(role)
        if not isinstance(name, str) or not SHARD_FILE.match(name):
            raise _damaged_index(path, f"shard {i} names its {role} file {name!r}")
    n = s.get("num_sequences")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise _damaged_index(path, f"shard {i} has num_sequences {n!r}")
    for key in ("bytes", "blake2b"):
        if key in s and (not isinstance(s[key], dict) or set(s[key]) != set(roles)):
            raise _damaged_index(path, f"shard {i} has a malformed {key!r} entry")


def unlisted_shards(root: Path, index: dict[str, Any]) -> list[str]:
    """Token shard files in the folder that its index does not list (an index covering part of the data)."""
    listed = {s["tokens"] for s in index["shards"]}
    return sorted(f.name for f in Path(root).iterdir() if TOKEN_SHARD.match(f.name) and f.name not in listed)


def folder_problems(root: Path, index: dict[str, Any]) -> list[str]:
    """What makes the folder as a whole inconsistent: counts that do not add up, shards the index does not list."""
    out = []
    total = sum(s["num_sequences"] for s in index["shards"])
    if total != index["num_sequences"]:
        out.append(f"its shards hold {total} sequences but {INDEX} says num_sequences={index['num_sequences']}")
    extra = unlisted_shards(root, index)
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        out.append(f"{INDEX} lists {len(index['shards'])} token shards but the folder also holds {shown}, so it "
                   "would train on part of the data")
    return out


def size_problems(root: Path, index: dict[str, Any], shard: dict[str, Any]) -> list[str]:
    """Files of one shard that are missing or have another size than recorded (cheap: no file is read)."""
    out = []
    recorded = shard.get("bytes", {})
    for role in FILE_ROLES:
        if role not in shard:
            continue
        p = Path(root) / shard[role]
        if not p.is_file():
            out.append(f"{p.name} is missing")
            continue
        size = p.stat().st_size
        if role == "tokens" and p.suffix == ".bin":
            n, dtype = shard["num_sequences"], np.dtype(index["dtype"])
            if size != n * index["seq_len"] * dtype.itemsize:
                out.append(f"{p.name} holds {size} bytes, not {n} sequences of {index['seq_len']} {dtype.name}")
                continue
        if role in recorded and size != recorded[role]:
            out.append(f"{p.name} holds {size} bytes, not the {recorded[role]} recorded")
    return out


def starts_problems(offsets: np.ndarray, n_starts: int, n: int) -> list[str]:
    """Offsets that do not index n sequences' starts: wrong length, not rising, not spanning the starts."""
    if offsets.ndim != 1 or len(offsets) != n + 1:
        return [f"its offsets list {len(offsets) - 1 if offsets.ndim == 1 else '?'} sequences, not {n}"]
    if offsets[0] != 0 or offsets[-1] != n_starts or np.any(np.diff(offsets) < 1):
        return ["its offsets do not index its document starts"]
    return []


class PackedDataset:
    """Random access to the sequences of a shard store, memory-mapped; checked on load (sizes and counts)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.index = read_index(self.root)
        self.seq_len = int(self.index["seq_len"])
        # Token ids at or above this are damage (the tokenizer has no such id); None for folders that do not say.
        self.vocab_size: int | None = self.index.get("vocab_size")
        shards = self.index["shards"]
        problems = folder_problems(self.root, self.index)
        if problems:
            raise LongforgeError(f"{self.root} is not whole: {problems[0]}; rebuild it with `longforge data build` "
                                 "(`longforge data verify` checks every shard).")
        try:
            for s in shards:
                bad = size_problems(self.root, self.index, s)
                if bad:
                    raise ValueError(bad[0])
            self._tokens = [self._open_tokens(s) for s in shards]
            self._starts = [np.load(self.root / s["starts"], mmap_mode="r") for s in shards]
            self._offsets = [np.load(self.root / s["offsets"]) for s in shards]
            for s, starts, off in zip(shards, self._starts, self._offsets):
                bad = starts_problems(off, len(starts), s["num_sequences"])
                if bad:
                    raise ValueError(f"{s['offsets']}: {bad[0]}")
        except (OSError, ValueError) as e:
            raise LongforgeError(f"{self.root}: a shard is missing or damaged ({e}); rebuild it with `longforge data build`.") from None
        self._first = np.cumsum([0] + [s["num_sequences"] for s in shards])
        self._costs: np.ndarray | None = None
        if len(self) == 0:
            raise LongforgeError(f"{self.root} holds no sequences; give the data stage more text or a shorter seq_len.")

    def _open_tokens(self, shard: dict[str, Any]) -> np.ndarray:
        path = self.root / shard["tokens"]
        n = int(shard["num_sequences"])
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
            if arr.shape != (n, self.seq_len):
                raise ValueError(f"{path.name} holds an array of shape {arr.shape}, not ({n}, {self.seq_len})")
            return arr
        dtype = np.dtype(self.index["dtype"])
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
                    try:
                        c = np.load(self.root / s["costs"])
                    except (OSError, ValueError) as e:
                        raise LongforgeError(f"{self.root}: {s['costs']} is missing or damaged ({e}); rebuild it with "
                                             "`longforge data build`.") from None
                    if c.shape != (s["num_sequences"],):
                        raise LongforgeError(f"{self.root}: {s['costs']} holds {c.shape} costs, not {s['num_sequences']}; "
                                             "rebuild it with `longforge data build`.")
                    parts.append(c)
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
