"""Model merging: a weighted average of checkpoints, one shard at a time, straight from safetensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longforge.errors import LongforgeError
from longforge.hf import check_checkpoint, copy_tokenizer, read_config

ARCH_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "vocab_size")


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


def check_compatible(a: Path, b: Path) -> None:
    """Refuse checkpoints whose architecture or tensor shapes differ."""
    ca, cb = read_config(a), read_config(b)
    for k in ARCH_KEYS:
        if ca.get(k) != cb.get(k):
            raise LongforgeError(f"cannot merge: `{k}` differs ({ca.get(k)!r} in {a} vs {cb.get(k)!r} in {b}); merge checkpoints of one architecture.")


def merge_linear(models: list[Path], weights: list[float], out: Path, config_from: int | None = None) -> dict[str, Any]:
    """theta = sum_i w_i * theta_i per tensor (LongRecipe merges original and extended at 0.5/0.5)."""
    if len(models) != len(weights):
        raise LongforgeError(f"{len(models)} models but {len(weights)} weights; give one weight per model (e.g. --weights 0.5,0.5).")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise LongforgeError(f"merge weights sum to {sum(weights)}; make them sum to 1 (e.g. 0.5,0.5).")
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
        # Keep the rope config of the longest-context model (the extended one).
        lens = [read_config(m).get("max_position_embeddings", 0) for m in models]
        config_from = lens.index(max(lens))
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    by_file: dict[Path, list[str]] = {}
    for k, f in maps[0].items():
        by_file.setdefault(f, []).append(k)
    index: dict[str, str] = {}
    for f, keys in sorted(by_file.items()):
        merged: dict[str, torch.Tensor] = {}
        for k in sorted(keys):
            acc = None
            for mp, w in zip(maps, weights):
                with safe_open(str(mp[k]), "pt") as fh:
                    t = fh.get_tensor(k)
                if acc is not None and t.shape != acc.shape:
                    raise LongforgeError(f"cannot merge: tensor {k} has shape {tuple(t.shape)} vs {tuple(acc.shape)}.")
                acc = t.double() * w if acc is None else acc + t.double() * w
                dtype = t.dtype
            assert acc is not None
            merged[k] = acc.to(dtype).contiguous()
            index[k] = f.name
        save_file(merged, str(tmp / f.name), metadata={"format": "pt"})
    src = models[config_from]
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    for idx in src.glob("*.safetensors.index.json"):
        shutil.copy2(idx, tmp / idx.name)
    copy_tokenizer(src, tmp)
    info = {"method": "linear", "models": [str(m) for m in models], "weights": weights, "config_from": str(src)}
    (tmp / "longforge_merge.json").write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info
