"""Is a data folder whole and right for a model: the full check of every shard (`longforge data verify`), the
tokenizer's identity, and the check of data against a model before training."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from longforge.data.store import FILE_ROLES, INDEX, PackedDataset, folder_problems, new_hash, read_index, size_problems, starts_problems
from longforge.errors import LongforgeError
from longforge.progress import progress_bar

READ_BLOCK = 16 << 20
# A model folder holding one of these has a tokenizer to compare with the data's.
TOKENIZER_MARKS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def vocabulary_id(tokenizer: Any) -> str:
    """The identity of a tokenizer's vocabulary: a hash of every (id, token) pair, added tokens included.

    Two tokenizers with the same vocabulary give token ids the same meaning, whatever the formatting of their
    files or the transformers version that saved them.
    """
    pairs = sorted((int(i), t) for t, i in tokenizer.get_vocab().items())
    h = new_hash()
    h.update(json.dumps(pairs, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def model_vocabulary_id(model_dir: Path) -> str | None:
    """The vocabulary identity of the tokenizer in a model folder, or None when the folder has none."""
    from longforge.hf import load_tokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_MARKS):
        return None
    try:
        return vocabulary_id(load_tokenizer(model_dir))
    except LongforgeError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions for damaged files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LongforgeError(f"could not read the tokenizer of {model_dir} to compare it with the data's ({first}); "
                             "repair or re-copy its tokenizer files.") from None


def _model_vocab_size(model_dir: Path) -> int | None:
    """The number of token embeddings a model has (config vocab_size), or None when its config does not say."""
    from longforge.hf import read_config

    cfg = read_config(model_dir)
    v = cfg.get("vocab_size")
    if v is None and isinstance(cfg.get("text_config"), dict):
        v = cfg["text_config"].get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def check_data_for_model(data: Path | PackedDataset, model_dir: Path) -> PackedDataset:
    """Refuse, before training, data the model cannot read: ids beyond its vocabulary, or another tokenizer's ids."""
    ds = data if isinstance(data, PackedDataset) else PackedDataset(Path(data))
    model_dir = Path(model_dir)
    vocab = _model_vocab_size(model_dir)
    index = ds.index
    fix = f"rebuild the data with the model's tokenizer (`longforge data build --tokenizer {model_dir} ...`)"
    if vocab is not None:
        if ds.vocab_size is not None and ds.vocab_size > vocab:
            raise LongforgeError(f"data {ds.root} was tokenized with a vocabulary of {ds.vocab_size:,} tokens, but model "
                                 f"{model_dir} has {vocab:,} token embeddings (config vocab_size); {fix}, or resize "
                                 "the model's embeddings to its tokenizer.")
        tops = [s["max_token"] for s in index["shards"] if isinstance(s.get("max_token"), int)]
        if tops and max(tops) >= vocab:
            raise LongforgeError(f"data {ds.root} holds token id {max(tops):,}, beyond the {vocab:,} token embeddings of "
                                 f"model {model_dir}; {fix}.")
    ident = index.get("tokenizer_vocab")
    if isinstance(ident, str):
        theirs = model_vocabulary_id(model_dir)
        if theirs is not None and theirs != ident:
            built_with = index.get("tokenizer") or "another tokenizer"
            raise LongforgeError(f"data {ds.root} was built with the tokenizer of {built_with}, whose vocabulary differs "
                                 f"from model {model_dir}'s, so its token ids would mean other tokens; {fix}.")
    return ds


# ---------------------------------------------------------------- the full check


@dataclass
class ShardReport:
    """The result of checking one shard in full."""

    name: str
    sequences: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the shard passed every check."""
        return not self.problems


@dataclass
class FolderReport:
    """The result of checking a data folder in full: folder-wide problems and one report per shard."""

    root: Path
    format: int
    checksums: bool  # whether the index records hashes (format 3); older folders cannot show bit flips
    problems: list[str] = field(default_factory=list)
    shards: list[ShardReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be checked

    @property
    def ok(self) -> bool:
        """Whether the folder and every shard passed."""
        return not self.problems and all(s.ok for s in self.shards)


def verify_folder(root: Path) -> FolderReport:
    """Check a data folder in full: every file's size and hash, every token id, the document starts and costs."""
    root = Path(root)
    index = read_index(root)
    fmt = int(index.get("format", 1))
    shards = index["shards"]
    report = FolderReport(root, fmt, bool(shards) and all("blake2b" in s for s in shards), folder_problems(root, index))
    if index.get("vocab_size") is None:
        report.notes.append(f"its {INDEX} records no vocab_size (format {fmt}), so token ids were not checked against one")
    with progress_bar() as bar:  # every byte is read: minutes for a large folder
        task = bar.add_task(f"data verify: {root.name} shards", total=len(shards))
        for s in shards:
            report.shards.append(ShardReport(s["tokens"], s["num_sequences"], _shard_problems(root, index, s)))
            bar.advance(task)
    return report


def _shard_problems(root: Path, index: dict[str, Any], shard: dict[str, Any]) -> list[str]:
    """Everything wrong with one shard, read in full."""
    problems = size_problems(root, index, shard)
    if problems:
        return problems  # a file of the wrong size cannot be read as the index describes
    hashes = shard.get("blake2b", {})
    for role in FILE_ROLES[1:]:
        if role in shard and role in hashes and _file_hash(root / shard[role]) != hashes[role]:
            problems.append(f"{shard[role]} does not match its checksum")
    try:
        problems += _token_problems(root, index, shard)
        problems += _layout_problems(root, index, shard)
    except (OSError, ValueError) as e:
        problems.append(f"cannot be read ({e})")
    return problems


def _file_hash(path: Path) -> str:
    h = new_hash()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(READ_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _token_problems(root: Path, index: dict[str, Any], shard: dict[str, Any]) -> list[str]:
    """The token file: its checksum, and every id below the vocabulary size (one streamed pass)."""
    path = root / shard["tokens"]
    vocab, recorded = index.get("vocab_size"), shard.get("blake2b", {}).get("tokens")
    top = -1
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.shape != (shard["num_sequences"], index["seq_len"]):
            return [f"{path.name} holds an array of shape {arr.shape}, not ({shard['num_sequences']}, {index['seq_len']})"]
        top = int(arr.max()) if arr.size else -1
        digest = None
    else:
        dtype = np.dtype(index["dtype"])
        h = new_hash()
        block = READ_BLOCK - READ_BLOCK % dtype.itemsize
        with path.open("rb") as fh:
            for data in iter(lambda: fh.read(block), b""):
                h.update(data)
                if len(data):
                    top = max(top, int(np.frombuffer(data, dtype=dtype).max()))
        digest = h.hexdigest()
    out = []
    if recorded is not None and digest != recorded:
        out.append(f"{path.name} does not match its checksum")
    if vocab is not None and top >= vocab:
        out.append(f"{path.name} holds token id {top}, beyond the vocabulary of {vocab}")
    elif isinstance(shard.get("max_token"), int) and top != shard["max_token"] and digest is not None:
        out.append(f"{path.name}'s largest token id is {top}, not the {shard['max_token']} recorded")
    return out


def _layout_problems(root: Path, index: dict[str, Any], shard: dict[str, Any]) -> list[str]:
    """Document starts: offsets that index them, every sequence starting at 0, rising, inside seq_len; costs agree."""
    n, seq_len = shard["num_sequences"], index["seq_len"]
    starts = np.asarray(np.load(root / shard["starts"]), dtype=np.int64)
    offsets = np.asarray(np.load(root / shard["offsets"]), dtype=np.int64)
    if starts.ndim != 1:
        return [f"{shard['starts']} is not a flat list of starts"]
    bad = starts_problems(offsets, len(starts), n)
    if bad:
        return [f"{shard['offsets']}: {bad[0]}"]
    if n == 0:
        return []
    first = offsets[:-1]
    rising = np.diff(starts) > 0
    rising[offsets[1:-1] - 1] = True  # a new sequence may start lower than the previous one ended
    if np.any(starts[first] != 0) or not np.all(rising) or np.any(starts < 0) or np.any(starts >= seq_len):
        return [f"{shard['starts']} holds document starts that are not rising from 0 below seq_len {seq_len}"]
    if "costs" in shard:
        ends = np.append(starts[1:], seq_len)
        ends[offsets[1:] - 1] = seq_len
        want = np.add.reduceat((ends - starts) ** 2, first)
        costs = np.load(root / shard["costs"])
        if costs.shape != (n,) or not np.array_equal(costs, want):
            return [f"{shard['costs']} does not agree with the document starts"]
    return []
