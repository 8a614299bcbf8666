"""Model merging, tensor by tensor straight from safetensors: memory stays near two tensors, not two models."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from longforge.errors import LongforgeError
from longforge.files import atomic_write_json, is_inside, writing
from longforge.hf import begin_checkpoint, check_checkpoint, context_window, copy_tokenizer, finish_checkpoint, read_config
from longforge.progress import progress_bar

ARCH_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "vocab_size")
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
FROM_CODE = {v: k for k, v in DTYPES.items()}


def _shards(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a checkpoint folder."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LongforgeError(f"{path} has no .safetensors files; merge needs safetensors checkpoints (re-save with save_pretrained).")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                where[k] = f
    return where


def _header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (dtype, shape, offsets per tensor)."""
    with path.open("rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(n))


def check_compatible(a: Path, b: Path) -> None:
    """Refuse checkpoints whose architecture or tensor shapes differ."""
    ca, cb = read_config(a), read_config(b)
    for k in ARCH_KEYS:
        if ca.get(k) != cb.get(k):
            raise LongforgeError(f"cannot merge: `{k}` differs ({ca.get(k)!r} in {a} vs {cb.get(k)!r} in {b}); merge checkpoints of one architecture.")


class StreamingWriter:
    """Writes a safetensors file one tensor at a time: the header is computed up front from shapes and dtypes."""

    def __init__(self, path: Path, specs: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None = None):
        self.path = path
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, code, shape in specs:
            size = math.prod(shape) * torch.tensor([], dtype=FROM_CODE[code]).element_size()
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self.expected = [(name, header[name]) for name, _, _ in specs]
        with writing(path):
            self.fh = path.open("wb")
            self.fh.write(struct.pack("<Q", len(blob)) + blob)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (in the order given to the constructor)."""
        want, spec = self.expected[self.next]
        assert name == want and list(tensor.shape) == spec["shape"] and DTYPES[tensor.dtype] == spec["dtype"], name
        with writing(self.path):
            self.fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.next += 1

    def close(self) -> None:
        """Finish the file (every tensor must have been written)."""
        assert self.next == len(self.expected), "not every tensor was written"
        with writing(self.path):
            self.fh.close()


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of two tensors seen as vectors (linear when they are nearly parallel)."""
    af, bf = a.reshape(-1).float(), b.reshape(-1).float()
    na, nb = af.norm(), bf.norm()
    if na < eps or nb < eps:
        return ((1 - t) * af + t * bf).reshape(a.shape)
    cos = torch.clamp(torch.dot(af, bf) / (na * nb), -1.0, 1.0)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-4:
        return ((1 - t) * af + t * bf).reshape(a.shape)
    s = torch.sin(theta)
    out = torch.sin((1 - t) * theta) / s * af + torch.sin(t * theta) / s * bf
    return out.reshape(a.shape)


def _combine(name: str, tensors: list[torch.Tensor], weights: list[float], method: str) -> torch.Tensor:
    """Merge one tensor across models, computed in fp32 and cast back to the first model's dtype."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape:
            raise LongforgeError(f"cannot merge: tensor {name} has shape {tuple(t.shape)} vs {tuple(first.shape)}.")
    if not first.is_floating_point():
        return first
    if method == "slerp":
        return slerp(tensors[0], tensors[1], weights[1]).to(first.dtype)
    acc = first.float() * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        acc.add_(t.float(), alpha=w)
    return acc.to(first.dtype)


def merge(models: list[Path], weights: list[float], out: Path, method: str = "linear",
          config_from: int | None = None) -> dict[str, Any]:
    """Merge checkpoints tensor by tensor (LongRecipe: 0.5 original + 0.5 extended); returns what was done."""
    if method not in ("linear", "slerp"):
        raise LongforgeError(f"merge method {method!r} is not one of linear, slerp.")
    if len(models) != len(weights):
        raise LongforgeError(f"{len(models)} models but {len(weights)} weights; give one weight per model (e.g. --weights 0.5,0.5).")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise LongforgeError(f"merge weights sum to {sum(weights)}; make them sum to 1 (e.g. 0.5,0.5).")
    if method == "slerp" and len(models) != 2:
        raise LongforgeError(f"slerp merges exactly two models, not {len(models)}; use method linear for more.")
    models = [check_checkpoint(m) for m in models]
    for m in models[1:]:
        check_compatible(models[0], m)
    maps = [_shards(m) for m in models]
    names = set(maps[0])
    for m, mp in zip(models[1:], maps[1:]):
        if set(mp) != names:
            missing = sorted(names ^ set(mp))[:3]
            raise LongforgeError(f"cannot merge: tensor names differ between {models[0]} and {m} (e.g. {missing}).")
    if config_from is None:
        # Keep the rope config of the longest-context model (the extended one); a dynamic NTK model states its
        # original window as max_position_embeddings, so the window is read with its factor.
        lens = [context_window(read_config(m)) or 0 for m in models]
        config_from = lens.index(max(lens))
    out = Path(out)
    for m in models:
        if is_inside(m, out) or is_inside(out, m):
            raise LongforgeError(f"merge output {out} overlaps the input checkpoint {m}; choose a new output folder.")
    tmp = begin_checkpoint(out, "merge output folder")
    by_file: dict[Path, list[str]] = {}
    for k, f in maps[0].items():
        by_file.setdefault(f, []).append(k)
    with progress_bar() as bar:
        task = bar.add_task(f"merge ({method})", total=len(names))
        for f, keys in sorted(by_file.items()):
            header = _header(f)
            keys = sorted(keys, key=lambda k: header[k]["data_offsets"][0])
            writer = StreamingWriter(tmp / f.name, [(k, header[k]["dtype"], header[k]["shape"]) for k in keys],
                                     header.get("__metadata__"))
            for k in keys:
                tensors = []
                for mp in maps:
                    with safe_open(str(mp[k]), "pt") as fh:
                        tensors.append(fh.get_tensor(k))
                writer.write(k, _combine(k, tensors, weights, method))
                del tensors
                bar.update(task, advance=1)
            writer.close()
    src = models[config_from]
    with writing(out):
        for name in ("config.json", "generation_config.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        for idx in models[0].glob("*.safetensors.index.json"):
            shutil.copy2(idx, tmp / idx.name)
        copy_tokenizer(src, tmp)
    info = {"method": method, "models": [str(m) for m in models], "weights": weights, "config_from": str(src)}
    atomic_write_json(tmp / "longforge_merge.json", info)
    finish_checkpoint(tmp, out, "merge output folder")
    return info


def merge_linear(models: list[Path], weights: list[float], out: Path, config_from: int | None = None) -> dict[str, Any]:
    """theta = sum_i w_i * theta_i per tensor."""
    return merge(models, weights, out, "linear", config_from)
