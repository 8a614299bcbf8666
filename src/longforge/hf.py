"""Reading and writing Hugging Face checkpoint folders."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from longforge.errors import LongforgeError
from longforge.files import OWNER_MARK, claim_dir, clear_dir, fsync_dir, remove_dir, writing

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


def check_checkpoint(path: Path, what: str = "model") -> Path:
    """Fail clearly unless `path` is a folder with a config.json."""
    path = Path(path)
    if not path.is_dir():
        raise LongforgeError(f"{what} folder {path} does not exist; pass a Hugging Face checkpoint folder.")
    if not (path / "config.json").is_file():
        raise LongforgeError(f"{path} has no config.json; pass a Hugging Face checkpoint folder (config.json + weights).")
    return path


def read_config(path: Path) -> dict[str, Any]:
    """The raw config.json of a checkpoint folder."""
    path = check_checkpoint(path)
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise LongforgeError(f"{path / 'config.json'} is not valid JSON ({e.msg} at line {e.lineno}); repair or re-export it.") from None


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available else cpu; refuse cuda when there is none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LongforgeError("device 'cuda' was asked for but PyTorch sees no CUDA GPU; use --device cpu.")
    return torch.device(device)


def load_model(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Load a causal LM from a checkpoint folder onto a device, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = check_checkpoint(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LongforgeError(f"could not load a causal LM from {path}: {first}") from None
    # Remember the dtype on disk so a trained model is exported the way it came (bf16 stays bf16).
    declared = read_config(path).get("dtype") or read_config(path).get("torch_dtype")
    model._lf_source_dtype = getattr(torch, declared) if isinstance(declared, str) and hasattr(torch, declared) else dtype
    return model.to(device).eval()


def load_tokenizer(path: Path) -> Any:
    """Load the tokenizer of a checkpoint (or tokenizer) folder."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise LongforgeError(f"tokenizer folder {path} does not exist; pass the model folder or a tokenizer folder.")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LongforgeError(f"could not load a tokenizer from {path}: {first}") from None


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of a checkpoint folder next to another checkpoint."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file() and not (dst / name).exists():
            shutil.copy2(f, dst / name)


# Linux's FICLONE ioctl (_IOW(0x94, 9, int)): a copy-on-write clone of a whole file on btrfs, XFS and similar.
FICLONE = 0x40049409


def clone_or_copy(src: Path, dst: Path) -> str:
    """Reflink a file (no extra disk, yet independent of the source) or copy it; returns which.

    Never a hard link: editing the source in place must not change a checkpoint longforge wrote.
    """
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fcntl.ioctl(fo.fileno(), FICLONE, fi.fileno())
        shutil.copystat(src, dst)
        return "reflinked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def weight_files(path: Path) -> list[Path]:
    """The weight files (and their index) of a checkpoint folder."""
    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.safetensors.index.json"))
    files += sorted(Path(path).glob("pytorch_model*.bin")) + sorted(Path(path).glob("pytorch_model.bin.index.json"))
    return files


def longforge_checkpoint(folder: Path) -> bool:
    """Whether a folder is a checkpoint an earlier longforge wrote and may replace.

    Marked folders, folders with longforge's own notes (longforge_rope.json, longforge_merge.json), and the `final/`
    of a training stage written before folders were marked (its stage folder holds STARTED.json or log.jsonl).
    """
    folder = Path(folder)
    if (folder / OWNER_MARK).is_file() or any(folder.glob("longforge_*.json")):
        return True
    parent = folder.parent
    return (folder / "config.json").is_file() and any((parent / n).is_file() for n in ("STARTED.json", "DONE.json", "log.jsonl"))


def begin_checkpoint(out: Path, what: str) -> Path:
    """Check that `out` may be (re)written and return an empty temp folder beside it, marked as longforge's.

    A folder at `out` holding files longforge did not write is refused with one sentence, before any work.
    """
    out = Path(out)
    if out.exists():
        claim_dir(out, what, ours=longforge_checkpoint)
    return clear_dir(out.with_name(f".{out.name}.longforge-tmp"), f"temporary {what}")


def finish_checkpoint(tmp: Path, out: Path, what: str) -> Path:
    """Put a finished temp folder in place of `out`, replacing only a folder longforge wrote (or an empty one)."""
    out = Path(out)
    if out.exists():
        remove_dir(claim_dir(out, what, ours=longforge_checkpoint), what)
    tmp.rename(out)
    fsync_dir(out.parent)
    return out


def save_model(model: Any, out: Path, tokenizer_from: Path | None = None) -> Path:
    """Save a model as a plain HF safetensors checkpoint (plus the tokenizer files when given).

    The folder is written beside `out`, marked as longforge's, then renamed into place; an existing `out` is replaced
    only when longforge wrote it.
    """
    tmp = begin_checkpoint(out, "model output folder")
    with writing(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, tmp)
    return finish_checkpoint(tmp, out, "model output folder")
