"""Reading and writing Hugging Face checkpoint folders."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from longforge.errors import LongforgeError
from longforge.files import OWNER_MARK, atomic_write_text, claim_dir, clear_dir, fsync_dir, read_json, remove_dir, writing
from longforge.integrity import REFETCH, check_side_files, verify_checkpoint

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


def own_code_error(path: Path, where: str = "config.json", what: str = "model") -> LongforgeError:
    """The one sentence for a checkpoint that needs its own Python code while the user did not opt in."""
    return LongforgeError(f"{path} ships its own {what} code (auto_map in {where}) and longforge does not run code "
                          "from checkpoints; pass --trust-remote-code (or model.trust_remote_code: true) only if you trust it")


def needs_own_code(path: Path) -> bool:
    """Whether transformers would have to import Python files shipped in the checkpoint to build its config/model.

    A known model_type is built by transformers' own classes even when config.json carries an auto_map.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = read_config(path)
    return isinstance(config, dict) and bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _asks_for_code(e: BaseException) -> bool:
    """Whether transformers refused because loading needs code from the checkpoint (trust_remote_code)."""
    return "trust_remote_code" in str(e)


def load_config(path: Path, trust_remote_code: bool = False, weights: bool = True) -> Any:
    """A checkpoint's transformers config (the folder checked whole, or only its config with weights=False)."""
    from transformers import AutoConfig

    path = check_checkpoint(path, weights=weights)
    if not trust_remote_code and needs_own_code(path):
        raise own_code_error(path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if _asks_for_code(e) and not trust_remote_code:
            raise own_code_error(path) from None
        raise LongforgeError(f"could not read the config of {path}: {_first_line(e)}; repair or re-export config.json.") from None


def load_model(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> Any:
    """Load a causal LM from a checkpoint folder onto a device, in eval mode (checkpoint code only with trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    path = check_checkpoint(path)
    if not trust_remote_code and needs_own_code(path):
        raise own_code_error(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        if _asks_for_code(e) and not trust_remote_code:
            raise own_code_error(path) from None
        raise LongforgeError(f"could not load a causal LM from {path}: {_first_line(e)}") from None
    # Remember the dtype on disk so a trained model is exported the way it came (bf16 stays bf16),
    # and the folder it came from, so a resumed training can check it continues the same model.
    declared = read_config(path).get("dtype") or read_config(path).get("torch_dtype")
    model._lf_source_dtype = getattr(torch, declared) if isinstance(declared, str) and hasattr(torch, declared) else dtype
    model._lf_source_dir = path
    return model.to(device).eval()


# Files a tokenizer can be built from besides tokenizer.json and a vocab.json + merges.txt pair; the slow ones need
# a package transformers does not require to be converted.
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
TIKTOKEN_FILES = ("tokenizer.tiktoken",)
VOCAB_FILES = (*SENTENCEPIECE_FILES, "vocab.txt", *TIKTOKEN_FILES)
SETTINGS_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
NO_TOKENIZER_FIX = "copy the tokenizer files of the model it came from into it, or pass a folder that has them"


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer of a checkpoint (or tokenizer) folder (checkpoint code only with trust_remote_code)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise LongforgeError(f"tokenizer folder {path} does not exist; pass the model folder or a tokenizer folder.")
    check_side_files(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    # transformers and the tokenizers library fail on a folder's content with many types (OSError, ValueError,
    # KeyError, AttributeError, tokenizers' plain Exception): each is the folder's problem, said in one sentence.
    except Exception as e:  # noqa: BLE001
        if _asks_for_code(e) and not trust_remote_code:
            # The code transformers asked for is the tokenizer's own, or (to find the tokenizer class) the model's.
            tok_config = read_json(path / "tokenizer_config.json")
            if isinstance(tok_config, dict) and tok_config.get("auto_map"):
                raise own_code_error(path, "tokenizer_config.json", "tokenizer") from None
            raise own_code_error(path) from None
        raise LongforgeError(_tokenizer_problem(path) or f"could not load a tokenizer from {path} ({_one_line(e)}); "
                             "re-download or re-export its tokenizer files.") from None


def _tokenizer_problem(path: Path) -> str | None:
    """What is wrong with a tokenizer folder transformers could not load, in one sentence, when it can be told."""
    has_json = (path / "tokenizer.json").is_file()
    vocab, merges = (path / "vocab.json").is_file(), (path / "merges.txt").is_file()
    if not has_json and not any((path / f).is_file() for f in VOCAB_FILES) and not (vocab and merges):
        if vocab or merges:
            have, lack = ("vocab.json", "merges.txt") if vocab else ("merges.txt", "vocab.json")
            return (f"{path} has {have} but no {lack} (and no tokenizer.json or tokenizer.model), so it holds no whole "
                    f"tokenizer; {NO_TOKENIZER_FIX}.")
        return (f"{path} has no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt); "
                f"{NO_TOKENIZER_FIX}.")
    if not has_json:
        # A slow-only tokenizer is converted by a package transformers does not require.
        for files, package in ((SENTENCEPIECE_FILES, "sentencepiece"), (TIKTOKEN_FILES, "tiktoken")):
            found = [f for f in files if (path / f).is_file()]
            if found and importlib.util.find_spec(package) is None:
                return (f"{path} has only a slow tokenizer ({found[0]}, no tokenizer.json), and reading it needs the "
                        f"{package} package; pip install {package}, or copy the model's tokenizer.json into it.")
    else:
        content = read_json(path / "tokenizer.json")
        if not isinstance(content, dict):
            return f"{path / 'tokenizer.json'} holds a JSON {_json_kind(content)}, not a tokenizer; {REFETCH}."
        missing = [f"`{k}`" for k in ("model", "added_tokens") if k not in content]
        if missing:
            return f"{path / 'tokenizer.json'} is not a whole tokenizer (it has no {' or '.join(missing)}); {REFETCH}."
    for name in SETTINGS_FILES:
        if (path / name).is_file() and not isinstance(content := read_json(path / name), dict):
            return f"{path / name} holds a JSON {_json_kind(content)}, not an object of settings; {REFETCH}."
    return None


def _json_kind(value: Any) -> str:
    """A JSON value's kind in JSON's words (list, string, number, ...)."""
    kinds = {list: "list", str: "string", int: "number", float: "number", bool: "true/false value", dict: "object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _one_line(e: BaseException) -> str:
    """An exception's whole message on one line (transformers' messages run over several), or its type's name."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


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
    """Make a finished temp folder portable, then put it in place of `out`, replacing only a folder longforge wrote."""
    out = Path(out)
    with writing(tmp):
        make_portable(tmp)
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


# Tokenizer classes only transformers 5 knows, and the class transformers 4.x builds the same tokenizer.json with
# (transformers 5 reads that name as the same class, so nothing changes there).
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def effective_rope(config: dict[str, Any]) -> dict[str, Any] | None:
    """The flat RoPE parameters transformers 5 builds from a raw config.json, or None when there are none to rewrite.

    Like transformers 5: `rope_scaling` wins over `rope_parameters`, a top-level `rope_theta` and `partial_rotary_factor`
    fill what is missing, and `type` names the rope_type when `rope_type` does not. Per-layer-type parameters (a dict
    of dicts) and configs without a stated rope_theta (the class default would apply) give None: left as they are.
    """
    raw = config.get("rope_scaling") or config.get("rope_parameters")
    if raw is not None and not isinstance(raw, dict):
        return None
    params = dict(raw or {})
    if any(isinstance(v, dict) for v in params.values()):
        return None
    if params.get("rope_theta") is None:
        params.pop("rope_theta", None)
        if config.get("rope_theta") is None:
            return None
        params["rope_theta"] = config["rope_theta"]
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as transformers 4.x and 5.x read it alike: `rope_parameters` (5.x), `rope_scaling` and `rope_theta` (4.x).

    `rope_scaling` is the parameters without `rope_theta` (4.x reads the base at the top level), None for unscaled RoPE.
    transformers 5 prefers `rope_scaling` and fills `rope_theta` from the top level, so it rebuilds the same parameters.
    """
    params = effective_rope(config)
    if params is None:
        return config
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    out = {**config, "rope_parameters": params, "rope_theta": params["rope_theta"],
           "rope_scaling": None if params["rope_type"] == "default" else scaling}
    if "partial_rotary_factor" in params:
        out["partial_rotary_factor"] = params["partial_rotary_factor"]
    return out


def context_window(config: dict[str, Any]) -> int | None:
    """The longest input a raw config is set up for: max_position_embeddings, times the factor for dynamic NTK.

    transformers' dynamic NTK reads max_position_embeddings as the original window and scales it by `factor`.
    """
    window = config.get("max_position_embeddings")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    params = effective_rope(config) or {}
    if params.get("rope_type") == "dynamic" and isinstance(params.get("factor"), (int, float)):
        return int(round(window * float(params["factor"])))
    return window


def portable_tokenizer_config(tok: dict[str, Any], window: int | None) -> dict[str, Any]:
    """tokenizer_config.json with a class transformers 4.x knows and `model_max_length` set to the model's window.

    transformers 5 saves extra special tokens as a list under `extra_special_tokens`, which 4.x reads as a dict of
    named tokens (and fails on); both read the list under `additional_special_tokens`.
    """
    out = dict(tok)
    if out.get("tokenizer_class") in PORTABLE_TOKENIZER_CLASSES:
        out["tokenizer_class"] = PORTABLE_TOKENIZER_CLASSES[out["tokenizer_class"]]
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        known = out.get("additional_special_tokens")
        known = known if isinstance(known, list) else []
        out["additional_special_tokens"] = known + [t for t in extra if t not in known]
        del out["extra_special_tokens"]
    if window is not None:
        out["model_max_length"] = window
    return out


def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_file_modes(folder: Path) -> None:
    """Give every file in a written checkpoint the mode a plain open() gives (0644 under the usual umask).

    safetensors writes each weight file as a private temp file (0600) and renames it, so trained or merged weights
    would otherwise be unreadable to the other users and services that config.json and the tokenizer are readable to.
    """
    mode = 0o666 & ~_umask()
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink() and (f.stat().st_mode & 0o777) != mode:
            os.chmod(f, mode)


def _write_json_if_changed(path: Path, old: Any, new: Any, sort_keys: bool) -> None:
    """Rewrite a JSON file atomically only when its content changes (in the layout transformers writes)."""
    if new != old:
        atomic_write_text(path, json.dumps(new, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def make_portable(folder: Path) -> None:
    """Make a written checkpoint load alike in transformers 4.x and 5.x and in the tools built on them.

    config.json gets `rope_scaling` and `rope_theta` beside `rope_parameters` (4.x would otherwise drop the scaling
    silently), tokenizer_config.json a tokenizer class 4.x knows and the model's window as `model_max_length`, and
    every file plain read permissions. Files this changes were written by longforge into its own temp folder.
    """
    folder = Path(folder)
    window = None
    config = read_json(folder / "config.json")
    if isinstance(config, dict):
        _write_json_if_changed(folder / "config.json", config, portable_config(config), sort_keys=True)
        window = context_window(config)
    tok = read_json(folder / "tokenizer_config.json")
    if isinstance(tok, dict):
        _write_json_if_changed(folder / "tokenizer_config.json", tok, portable_tokenizer_config(tok, window), sort_keys=False)
    plain_file_modes(folder)
