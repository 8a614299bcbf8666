"""Training checkpoints (DCP model and optimizer state, RNG state in safetensors, and meta.json; read without running
code) and the export of the trained model as a plain Hugging Face checkpoint.

A run folder may come from someone else, so nothing in a checkpoint is unpickled freely: DCP's `.metadata` goes
through an allow-list unpickler that builds only DCP's own metadata classes, its non-tensor items (optimizer
settings) through `torch.load(weights_only=True)`, and RNG state is tensors plus JSON in a safetensors file.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from longforge.errors import LongforgeError
from longforge.files import atomic_write_bytes, atomic_write_json, disk_error, fsync_dir, read_json, writing
from longforge.hf import save_model
from longforge.model.parallel import Layout
from longforge.progress import say

KEEP_CHECKPOINTS = 2
STEP_NAME = re.compile(r"^step-(\d{7})$")
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# Every class a DCP .metadata pickle names (found by recording find_class on real checkpoints), and nothing else.
_ALLOWED = {
    (_METADATA_MODULE, "Metadata"),
    (_METADATA_MODULE, "MetadataIndex"),
    (_METADATA_MODULE, "StorageMeta"),
    (_METADATA_MODULE, "TensorProperties"),
    (_METADATA_MODULE, "TensorStorageMetadata"),
    (_METADATA_MODULE, "BytesStorageMetadata"),
    (_METADATA_MODULE, "ChunkStorageMetadata"),
    (_METADATA_MODULE, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name ("torch.strided") to the layout
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id is the path the checkpoint was saved to.
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"),
}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


def foreign_pickle(path: Path, name: str) -> LongforgeError:
    """The sentence for a pickle in a checkpoint that names something longforge never writes there."""
    return LongforgeError(f"checkpoint {path} holds a pickled object of type {name} that longforge does not load; "
                          "it may not come from longforge (delete that checkpoint folder, or train into a new --out).")


class _ForeignClass(pickle.UnpicklingError):
    """A pickle named a class outside the allow-list."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata objects only: any other class or function a pickle names is refused before it is touched."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)  # dtypes, layouts, memory formats: values, not callables
        raise _ForeignClass(f"{module}.{name}")


def read_dcp_metadata(path: Path, stream: io.BufferedIOBase) -> Any:
    """Unpickle a DCP .metadata stream with the allow-list; refuse anything else in one sentence."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(stream).load()
    except _ForeignClass as e:
        raise foreign_pickle(path, e.name) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise LongforgeError(f"checkpoint {path} has a damaged .metadata file ({type(e).__name__}); delete that "
                             "checkpoint folder to resume from the one before, or train into a new --out.") from None
    if not isinstance(metadata, Metadata):
        raise foreign_pickle(path, f"{type(metadata).__module__}.{type(metadata).__qualname__}")
    return metadata


class SafeReader(FileSystemReader):
    """torch DCP's file reader, but its metadata is read with the allow-list unpickler instead of plain pickle."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """The checkpoint's Metadata, built only from DCP's own classes."""
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            metadata = read_dcp_metadata(Path(self.path), fh)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _weights_only_load(path: Path, value: io.BytesIO | io.BufferedIOBase, **kwargs: Any) -> Any:
    """torch.load limited to tensors and plain containers; a pickle naming anything else is refused in one sentence."""
    try:
        return torch.load(value, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            # torch's own text suggests weights_only=False, exactly what must not be done with a received file.
            raise LongforgeError(f"checkpoint {path} holds a pickle longforge cannot read as plain data; it may be "
                                 "damaged or not come from longforge (delete that checkpoint folder, or train into a "
                                 "new --out).") from None
        name = found.group(1)
        raise foreign_pickle(path, name if "." in name else f"builtins.{name}") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but non-tensor items (optimizer settings) are read with torch.load(weights_only=True)."""

    def __init__(self, path: Path, **kwargs: Any):
        super().__init__(**kwargs)
        self.path = Path(path)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        """Put one non-tensor item into the state dict being loaded."""
        from torch.distributed.checkpoint._traverse import set_element

        obj = _weights_only_load(self.path, value)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# ---------------------------------------------------------------- RNG state


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG streams as tensors (torch, cuda, numpy, python) and the few scalars beside them."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "python": torch.tensor(internal, dtype=torch.int64)}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    scalars = {"numpy": [name, int(pos), int(has_gauss), float(cached)], "python": [version, gauss_next]}
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = scalars["python"]
    random.setstate((version, tuple(int(x) for x in tensors["python"].tolist()), gauss_next))
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_rng(path: Path) -> None:
    """Write this process's RNG state as a safetensors file (tensors, and the scalars as JSON metadata)."""
    from safetensors.torch import save

    tensors, scalars = rng_state()
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, {"longforge_rng": json.dumps(scalars)}))


def load_rng(folder: Path, rank: int) -> None:
    """Restore this rank's RNG state from a checkpoint, if it holds one (a larger world has ranks without)."""
    from safetensors import SafetensorError, safe_open

    path, legacy = folder / f"rng-{rank}.safetensors", folder / f"rng-{rank}.pt"
    try:
        if path.is_file():
            with safe_open(str(path), "pt") as fh:
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
                scalars = json.loads((fh.metadata() or {})["longforge_rng"])
        elif legacy.is_file():
            path = legacy
            tensors, scalars = _legacy_rng(legacy)
            say(f"{folder.name}: RNG state read from the older rng-{rank}.pt format as plain tensors (nothing in it is run)")
        else:
            return
        set_rng_state(tensors, scalars)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise LongforgeError(f"checkpoint {folder} has a damaged {path.name} ({type(e).__name__}: {_first_line(e)}); "
                             "delete that checkpoint folder to resume from the one before, or train into a new --out.") from None


def _legacy_rng(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The RNG state of an older longforge's rng-<rank>.pt, read with weights_only (tensors and numpy's array only)."""
    # numpy's state is a uint32 array: these globals rebuild an empty array and fill it from bytes, nothing else.
    rebuild = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct  # numpy 2 moved it
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), rebuild, (rebuild, "numpy.core.multiarray._reconstruct")]
    with torch.serialization.safe_globals(allowed), path.open("rb") as fh:
        state = _weights_only_load(path.parent, fh)
    name, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    tensors = {"torch": state["torch"], "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "python": torch.tensor(internal, dtype=torch.int64)}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = s
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(cached)], "python": [version, gauss_next]}


# ---------------------------------------------------------------- checkpoint folders


def read_meta(path: Path) -> dict[str, Any] | None:
    """A checkpoint's meta.json, or None when it is missing or damaged (the checkpoint is then incomplete)."""
    meta = read_json(path / "meta.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        return None
    return meta


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in step order: step-NNNNNNN folders whose meta.json is whole."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP_NAME.match(p.name) and p.is_dir() and read_meta(p) is not None)


def _ours(path: Path) -> bool:
    """Whether a step folder was written by longforge (it was renamed into place holding meta.json)."""
    return path.is_dir() and not path.is_symlink() and STEP_NAME.match(path.name) is not None and (path / "meta.json").is_file()


def _first_failure(e: CheckpointException) -> BaseException:
    """The exception of the first failing rank inside DCP's wrapper."""
    for exc, _ in e.failures.values():
        return exc
    return e


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def save_checkpoint(folder: Path, step: int, net: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: Layout,
                    extra: dict[str, Any]) -> Path:
    """Save model, optimizer and RNG state into a temp folder, write meta.json last, then rename (atomic)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}"
    if layout.is_main:
        if final.exists() and not _ours(final):
            raise LongforgeError(f"{final} exists but was not written by longforge (no meta.json); move it away so "
                                 "the checkpoint of that step can be saved.")
        with writing(tmp):
            if tmp.exists():
                shutil.rmtree(tmp)  # a temp folder of ours, left by an interrupted save of this step
            tmp.mkdir(parents=True)
    layout.barrier()
    model_sd, optim_sd = get_state_dict(net, optimizer)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    except CheckpointException as e:
        exc = _first_failure(e)
        if isinstance(exc, OSError):
            raise disk_error(exc, tmp) from None
        raise
    save_rng(tmp / f"rng-{layout.rank}.safetensors")
    layout.barrier()
    if layout.is_main:
        # meta.json marks the checkpoint complete, so it is written (and flushed) after everything else.
        atomic_write_json(tmp / "meta.json", {"step": step, "world": layout.world, "sp": layout.sp, **extra})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(folder)
        for old in checkpoints(folder)[:-KEEP_CHECKPOINTS]:
            if _ours(old):
                shutil.rmtree(old, ignore_errors=True)
    layout.barrier()
    return final


def load_checkpoint(path: Path, net: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: Layout) -> dict[str, Any]:
    """Restore model, optimizer and RNG state saved by save_checkpoint, running no code from the files; returns its meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    meta = read_meta(path)
    if meta is None:
        raise LongforgeError(f"checkpoint {path} has no readable meta.json; delete it to resume from the one before.")
    # DCP reshards model and optimizer state to the current layout; RNG streams are per process.
    model_sd, optim_sd = get_state_dict(net, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path), storage_reader=SafeReader(path), planner=SafeLoadPlanner(path))
    except CheckpointException as e:
        # DCP wraps what went wrong on each rank; ours is already one sentence, anything else becomes one.
        exc = _first_failure(e)
        if isinstance(exc, LongforgeError):
            raise exc from None
        raise LongforgeError(f"checkpoint {path} could not be read ({type(exc).__name__}: {_first_line(exc)}); delete "
                             "that checkpoint folder to resume from the one before, or train into a new --out.") from None
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    load_rng(path, layout.rank)
    return meta


def export_dtype(model: Any) -> torch.dtype:
    """The dtype of the checkpoint the model was loaded from (bf16 checkpoints stay bf16), else the parameters' dtype."""
    declared = getattr(model, "_lf_source_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    if isinstance(declared, str) and hasattr(torch, declared):
        return getattr(torch, declared)
    return next(model.parameters()).dtype


def export_final(net: torch.nn.Module, layout: Layout, out: Path, tokenizer_from: Path | None, dtype: torch.dtype) -> Path:
    """Write the trained model (`net.lm`, maybe sharded) as a plain HF safetensors checkpoint, gathered on the main
    process."""
    lm: Any = net.lm
    if not layout.distributed:
        lm.eval()
        lm.set_attn_implementation("sdpa")
        if dtype != next(lm.parameters()).dtype:
            lm.to(dtype)
        return save_model(lm, out, tokenizer_from=tokenizer_from)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if layout.is_main:
        config = lm.config
        config._attn_implementation = "sdpa"
        # The class the model was loaded as: no auto-class lookup, so no checkpoint code is looked for or run.
        fresh = type(lm)._from_config(config, dtype=dtype)
        fresh.load_state_dict({k[len("lm."):]: v for k, v in full.items()})
        save_model(fresh, out, tokenizer_from=tokenizer_from)
    layout.barrier()
    return out
