"""Reading and writing Hugging Face checkpoint folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from longforge.errors import LongforgeError
from longforge.integrity import verify_checkpoint

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


def check_checkpoint(path: Path, what: str = "model", weights: bool = True) -> Path:
    """Fail with one sentence unless `path` is a whole checkpoint folder (config, weights, tokenizer files).

    `weights=False` is for callers that read only config.json.
    """
    return verify_checkpoint(path, what, weights=weights)


def read_config(path: Path) -> dict[str, Any]:
    """The raw config.json of a checkpoint folder (checked to parse and name a model_type)."""
    path = check_checkpoint(path, weights=False)
    return json.loads((path / "config.json").read_bytes())


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


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link a file (no extra disk) or copy it when linking is impossible; returns which."""
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def weight_files(path: Path) -> list[Path]:
    """The weight files (and their index) of a checkpoint folder."""
    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.safetensors.index.json"))
    files += sorted(Path(path).glob("pytorch_model*.bin")) + sorted(Path(path).glob("pytorch_model.bin.index.json"))
    return files


def save_model(model: Any, out: Path, tokenizer_from: Path | None = None) -> Path:
    """Save a model as a plain HF safetensors checkpoint (plus the tokenizer files when given)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
