"""Cheap checks that a checkpoint folder is whole before a stage reads it: config, weight files, index, tokenizer.

Only headers and small JSON files are read, so every stage can check its input model up front and refuse a
truncated download or a damaged file with one sentence, instead of a traceback later or a damaged output.
"""

from __future__ import annotations

import functools
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

from longforge.errors import LongforgeError

# The JSON files a checkpoint may carry besides config.json; transformers fails on any of them when damaged.
JSON_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "generation_config.json")
# safetensors refuses headers larger than this (and so do we, before reading one).
MAX_HEADER = 100_000_000
REFETCH = "re-download or re-export it"


def verify_checkpoint(path: Path | str, what: str = "model", weights: bool = True) -> Path:
    """Refuse with one sentence a folder that is not a whole Hugging Face checkpoint; `weights=False` checks config.json only."""
    path = Path(path)
    if not path.is_dir():
        raise LongforgeError(f"{what} folder {path} does not exist; pass a Hugging Face checkpoint folder.")
    if not (path / "config.json").is_file():
        raise LongforgeError(f"{path} has no config.json; pass a Hugging Face checkpoint folder (config.json + weights).")
    check_config(path / "config.json")
    if weights:
        check_weights(path)
        check_side_files(path)
    return path


def check_side_files(path: Path) -> None:
    """Refuse a damaged tokenizer or generation JSON file in a checkpoint or tokenizer folder."""
    for name in JSON_SIDE_FILES:
        if (path / name).is_file():
            _check_json_file(path / name, "is damaged")


def check_config(path: Path) -> dict[str, Any]:
    """A config.json that parses to an object naming its `model_type`, or one sentence saying what is wrong."""
    config = _json_file(path, "is not valid JSON")
    if not isinstance(config, dict):
        raise LongforgeError(f"{path} holds a JSON {type(config).__name__}, not an object of settings; "
                             "restore the checkpoint's config.json.")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise LongforgeError(f"{path} has no `model_type`, so it is not a Hugging Face model config; "
                             "restore the checkpoint's config.json (save_pretrained writes one).")
    return config


def _json_file(path: Path, damaged: str) -> Any:
    """A JSON file's content, or one sentence naming the file when it does not parse."""
    try:
        return json.loads(Path(path).read_bytes())
    except UnicodeDecodeError:
        raise LongforgeError(f"{path} {damaged} (it is not UTF-8 text); {REFETCH}.") from None
    except json.JSONDecodeError as e:
        raise LongforgeError(f"{path} {damaged} ({e.msg} at line {e.lineno}, column {e.colno}); {REFETCH}.") from None


def _check_json_file(path: Path, damaged: str) -> None:
    """_json_file's check without keeping the content, done once per version of the file."""
    st = path.stat()
    _checked_json(str(path), st.st_size, st.st_mtime_ns, damaged)


@functools.lru_cache(maxsize=64)
def _checked_json(path: str, size: int, mtime_ns: int, damaged: str) -> bool:
    """Cached by size and mtime: a large tokenizer.json is parsed once per command, not at every stage's check."""
    _json_file(Path(path), damaged)
    return True


def check_weights(path: Path) -> None:
    """At least one weight file; every safetensors file whole; every shard an index lists present."""
    safetensors = sorted(path.glob("*.safetensors"))
    bins = sorted(path.glob("pytorch_model*.bin"))
    indexes = sorted(path.glob("*.safetensors.index.json")) + sorted(path.glob("pytorch_model*.bin.index.json"))
    if not safetensors and not bins:
        raise LongforgeError(f"{path} has no weight files (*.safetensors or pytorch_model*.bin); pass a complete checkpoint.")
    for index in indexes:
        check_index(index)
    for f in safetensors:
        check_safetensors(f)
    for f in bins:
        check_torch_zip(f)


def check_index(index: Path) -> None:
    """Every shard a `*.index.json` lists exists beside it."""
    data = _json_file(index, "is damaged")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise LongforgeError(f"{index} has no `weight_map` of tensor names to files; {REFETCH}.")
    for shard in sorted(set(map(str, weight_map.values()))):
        f = index.parent / shard
        if Path(shard).name != shard or not f.is_file():
            raise LongforgeError(f"{index} lists {shard}, which is missing from {index.parent}; the download or copy "
                                 "is incomplete: fetch the missing shards again.")


def check_safetensors(f: Path) -> None:
    """A safetensors file is exactly 8 bytes + its JSON header + the data its tensors' offsets describe."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise LongforgeError(f"{f} is truncated ({size} bytes, not even a header); {REFETCH}.")
        n = struct.unpack("<Q", head)[0]
        if n > MAX_HEADER:
            raise LongforgeError(f"{f} is not a safetensors file (its header would be {n} bytes); {REFETCH}.")
        if 8 + n > size:
            raise LongforgeError(f"{f} is truncated ({size} bytes, its header alone needs {8 + n}); {REFETCH}.")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise LongforgeError(f"{f}: its header is damaged (not the JSON safetensors writes); {REFETCH}.") from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise LongforgeError(f"{f} is truncated ({size} bytes of the {expected} its header describes); {REFETCH}.")
    if size > expected:
        raise LongforgeError(f"{f} has {size - expected} bytes after its last tensor, so it is damaged; {REFETCH}.")


def check_torch_zip(f: Path) -> None:
    """A PyTorch zip checkpoint (.bin) still has its central directory (a truncated one does not); never unpickled."""
    with f.open("rb") as fh:
        if fh.read(2) != b"PK":
            return  # the legacy (pre-1.6) format has no cheap whole-file check
    try:
        with zipfile.ZipFile(f):
            pass
    except (zipfile.BadZipFile, OSError):
        raise LongforgeError(f"{f} is truncated (its zip directory is missing or damaged); {REFETCH}.") from None
