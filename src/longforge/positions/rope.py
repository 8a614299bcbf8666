"""RoPE scaling: read a checkpoint's rotary settings, plan the new `rope_parameters` with a method of
positions.methods, write the rescaled checkpoint, and compute the frequencies any plan gives."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from longforge.config import PositionSpec
from longforge.errors import LongforgeError
from longforge.files import atomic_write_text, is_inside, writing
from longforge.hf import (begin_checkpoint, check_checkpoint, clone_or_copy, copy_tokenizer, finish_checkpoint, load_config,
                          weight_files)
from longforge.positions.methods import ROPE_METHODS, dynamic_ntk_theta  # noqa: F401 (the methods' registry, here too)


@dataclass(frozen=True)
class RopeInfo:
    """What a checkpoint's config says about its rotary embedding."""

    head_dim: int
    rotary_dim: int
    theta: float
    original_length: int
    max_position_embeddings: int
    current: dict[str, Any]
    original_from: str = "max_position_embeddings"

    @property
    def scaled(self) -> bool:
        """True when the checkpoint already uses a scaling method."""
        return self.current.get("rope_type", "default") != "default"


@dataclass
class RopePlan:
    """The new rotary configuration for a checkpoint and how it was derived."""

    method: str
    factor: float
    rope_parameters: dict[str, Any]
    max_position_embeddings: int
    target_length: int
    info: RopeInfo
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """A JSON-able description written next to the checkpoint."""
        return {
            "method": self.method,
            "factor": self.factor,
            "original_length": self.info.original_length,
            "target_length": self.target_length,
            "rope_parameters": self.rope_parameters,
            "previous_rope_parameters": self.info.current,
            "notes": self.notes,
        }


def _rope_params(config: Any) -> dict[str, Any]:
    """The config's RoPE parameters as one flat dict, from `rope_parameters` (v5) or `rope_scaling` + `rope_theta` (4.x)."""
    raw = getattr(config, "rope_parameters", None)
    if raw is None:
        raw = getattr(config, "rope_scaling", None)
    params = dict(raw or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise LongforgeError(
            f"{type(config).__name__} has per-layer-type RoPE parameters ({', '.join(params)}); "
            "longforge only rewrites models with one rotary embedding for all layers."
        )
    if params.get("rope_theta") is None:
        legacy = getattr(config, "rope_theta", None)
        if legacy is None:
            raise LongforgeError(f"{type(config).__name__} has no rope_theta; longforge only handles RoPE models.")
        params["rope_theta"] = legacy
    kind = params.pop("type", None)
    params["rope_type"] = params.get("rope_type") or kind or "default"
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is not None and "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = partial
    return params


def rope_info(config: Any, original_length: int | None = None) -> RopeInfo:
    """Read head dim, base, original window and current scaling from a transformers config (v5 or 4.x shape)."""
    params = _rope_params(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary_dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0) or 1.0))
    max_pos = int(config.max_position_embeddings)
    # Where the pretraining window comes from, most explicit first: Llama-3.1 says 131072 at the
    # top level but 8192 inside its llama3 scaling, and 8192 is the window the factor is relative to.
    candidates = (
        ("given", original_length),
        ("rope_parameters", params.get("original_max_position_embeddings")),
        ("config", getattr(config, "original_max_position_embeddings", None)),
        ("max_position_embeddings", max_pos),
    )
    source, orig = next((k, v) for k, v in candidates if v)
    if params["rope_type"] in ("yarn", "llama3", "longrope") and source == "config":
        params["original_max_position_embeddings"] = int(orig)  # transformers gives the top-level value priority
    return RopeInfo(int(head_dim), rotary_dim, float(params["rope_theta"]), int(orig), max_pos, params, source)


def target_factor(target_length: int, original_length: int) -> float:
    """Scale factor from the target and the ORIGINAL pretraining length (UltraLong: 1M from 8K -> 128)."""
    if target_length <= original_length:
        raise LongforgeError(
            f"target length {target_length} is not above the model's original window {original_length}; "
            "choose a longer target_length."
        )
    return target_length / original_length


def _plan_notes(info: RopeInfo, spec: PositionSpec, factor: float, target_length: int) -> list[str]:
    """What the user should know about a plan: replaced scaling, guessed windows, factors that miss the target."""
    notes: list[str] = []
    old = info.current
    if info.scaled and spec.method == "none":
        notes.append(f"kept the checkpoint's existing {old['rope_type']} scaling (factor {old.get('factor')}) unchanged")
    elif info.scaled:
        notes.append(
            f"replaced the checkpoint's existing {old['rope_type']} scaling "
            f"(factor {old.get('factor')}) with {spec.method}, relative to the original window {info.original_length}"
        )
        if info.original_from == "max_position_embeddings":
            notes.append(
                f"the config does not state its original window; assumed max_position_embeddings "
                f"{info.original_length} (pass --original-length / model.original_length if that is wrong)"
            )
    if spec.method in ("pi", "dynamic", "yarn", "llama3") and factor * info.original_length < target_length:
        notes.append(
            f"factor {factor:g} covers {factor * info.original_length:.0f} tokens, less than the target {target_length}"
        )
    if spec.method == "dynamic":
        notes.append("dynamic NTK changes the frequencies with the longest position of each forward (inference-time scaling)")
    return notes


def plan_rope(config: Any, spec: PositionSpec, target_length: int, original_length: int | None = None) -> RopePlan:
    """Compute the new rope_parameters for a config, a method and a target length."""
    method = ROPE_METHODS.pick(spec.method)
    info = rope_info(config, original_length)
    if spec.factor is not None and spec.factor < 1:
        raise LongforgeError(f"RoPE factor {spec.factor:g} is below 1 and would shrink the window; use a factor >= 1.")
    factor = spec.factor if spec.factor is not None else target_factor(target_length, info.original_length)
    params = method.parameters(info, spec, float(factor))
    notes = _plan_notes(info, spec, float(factor), target_length)
    # HF's dynamic NTK treats max_position_embeddings as the original window.
    max_pos = info.original_length if params["rope_type"] == "dynamic" else target_length
    return RopePlan(spec.method, float(factor), params, int(max_pos), int(target_length), info, notes)


def inv_freq(params: dict[str, Any], rotary_dim: int, max_position_embeddings: int, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies and attention factor for rope_parameters, computed from the formulas (float64)."""
    base = float(params["rope_theta"])
    d = rotary_dim
    idx = np.arange(0, d, 2, dtype=np.float64)
    default = 1.0 / base ** (idx / d)
    kind = params.get("rope_type", "default")
    if kind == "default":
        return default, 1.0
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise LongforgeError(f"rope_type {kind!r} is not supported by longforge; use one of {', '.join(ROPE_METHODS)}.")
    # Like transformers, a YaRN config without a factor means max_position_embeddings / original window.
    factor = float(params.get("factor") or max_position_embeddings / params["original_max_position_embeddings"])
    if kind == "linear":
        return default / factor, 1.0
    if kind == "dynamic":
        n = max(seq_len or max_position_embeddings, max_position_embeddings)
        b = base * ((factor * n / max_position_embeddings) - (factor - 1)) ** (d / (d - 2))
        return 1.0 / b ** (idx / d), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(params, d, default, factor)
    return _llama3_inv_freq(params, default, factor), 1.0


def _yarn_inv_freq(params: dict[str, Any], d: int, default: np.ndarray, factor: float) -> tuple[np.ndarray, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp linearly in index between beta_fast and beta_slow."""
    base = float(params["rope_theta"])
    orig = int(params["original_max_position_embeddings"])
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def dim_for(rotations: float) -> float:
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 = extrapolate (unchanged), 0 = interpolate (divided by factor)
    inv = (default / factor) * (1 - keep) + default * keep
    att = params.get("attention_factor")
    if att is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")

        def m(scale: float, k: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

        att = m(factor, mscale) / m(factor, mscale_all) if mscale and mscale_all else m(factor)
    return inv, float(att)


def _llama3_inv_freq(params: dict[str, Any], default: np.ndarray, factor: float) -> np.ndarray:
    """Llama 3: divide long wavelengths by factor, keep short ones, blend smoothly in between."""
    orig = float(params["original_max_position_embeddings"])
    low_f, high_f = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    wavelen = 2 * math.pi / default
    scaled = np.where(wavelen > orig / low_f, default / factor, default)
    smooth = (orig / wavelen - low_f) / (high_f - low_f)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high_f) & (wavelen <= orig / low_f)
    return np.where(medium, blended, scaled)


def freq_table(plan: RopePlan) -> list[dict[str, float]]:
    """Per frequency index: wavelength, original (unscaled), current and new inverse frequency, and new / original."""
    info = plan.info
    original, _ = inv_freq({"rope_theta": info.theta}, info.rotary_dim, info.max_position_embeddings)
    try:
        current, _ = inv_freq(info.current, info.rotary_dim, info.max_position_embeddings)
    except LongforgeError:  # a scaling longforge does not model (e.g. longrope) is replaced; show no current column
        current = np.full_like(original, np.nan)
    new, _ = inv_freq(plan.rope_parameters, info.rotary_dim, plan.max_position_embeddings, seq_len=plan.target_length)
    return [
        {"index": i, "wavelength": 2 * math.pi / o, "inv_freq": o, "current_inv_freq": c, "new_inv_freq": n, "ratio": n / o}
        for i, (o, c, n) in enumerate(zip(original.tolist(), current.tolist(), new.tolist()))
    ]


def apply_rope(model_dir: Path, out_dir: Path, spec: PositionSpec, target_length: int, original_length: int | None = None,
               trust_remote_code: bool = False) -> RopePlan:
    """Write a checkpoint whose config uses the planned rope; weights are reflinked where the disk allows, else copied."""
    model_dir = check_checkpoint(model_dir)
    config = load_config(model_dir, trust_remote_code)
    plan = plan_rope(config, spec, target_length, original_length)
    out_dir = Path(out_dir)
    if is_inside(out_dir, model_dir) or is_inside(model_dir, out_dir):
        raise LongforgeError(f"--out must differ from the model folder and lie outside it ({out_dir} overlaps "
                             f"{model_dir}); longforge never rewrites the input checkpoint: choose a new output folder.")
    if not weight_files(model_dir):
        raise LongforgeError(f"{model_dir} has no weight files (*.safetensors or pytorch_model*.bin); pass a complete checkpoint.")
    # Written whole into a temp folder, then renamed: an interrupted rope never leaves a checkpoint that looks done,
    # and an existing --out is replaced only when longforge wrote it.
    tmp = begin_checkpoint(out_dir, "rope output folder")
    config.rope_parameters = plan.rope_parameters
    config.max_position_embeddings = plan.max_position_embeddings
    with writing(tmp):
        config.save_pretrained(tmp)
        # Never hard links: editing the base in place would silently change this checkpoint too.
        how = {clone_or_copy(f, tmp / f.name) for f in weight_files(model_dir)}
        copy_tokenizer(model_dir, tmp)
    plan.notes.append(f"weights {' and '.join(sorted(how))} from {model_dir}"
                      + (" (copy-on-write: no extra disk until one side changes)" if how == {"reflinked"} else ""))
    atomic_write_text(tmp / "longforge_rope.json", json.dumps(plan.summary(), indent=2))
    finish_checkpoint(tmp, out_dir, "rope output folder")
    return plan
