"""RoPE scaling methods, registered by name like transformers' ROPE_INIT_FUNCTIONS: each turns a checkpoint's rotary
settings, the recipe's `positions` and a scale factor into Hugging Face `rope_parameters`.

Adding a method: write its function here, add a `RopeMethod` to ROPE_METHODS (the schema's `positions.method` takes
its values from it), and, when it writes a new rope_type, teach `rope.inv_freq` its frequencies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from longforge.registry import Registry

if TYPE_CHECKING:  # the schema reads this registry's names, so this module must not import it at load time
    from longforge.config import PositionSpec
    from longforge.positions.rope import RopeInfo


def dynamic_ntk_theta(theta: float, factor: float, rotary_dim: int) -> float:
    """The base dynamic NTK uses at factor x the original window: LongRecipe's theta (Llama-3, factor 10 -> 48.9M)."""
    d = rotary_dim
    return theta * (factor * factor - (factor - 1)) ** (d / (d - 2))


def _base(info: RopeInfo) -> dict[str, Any]:
    extra = {}
    if "partial_rotary_factor" in info.current:
        extra["partial_rotary_factor"] = info.current["partial_rotary_factor"]
    return {"rope_theta": info.theta, **extra}


def _none(info: RopeInfo, spec: PositionSpec, factor: float) -> dict[str, Any]:
    return dict(info.current)


def _pi(info: RopeInfo, spec: PositionSpec, factor: float) -> dict[str, Any]:
    return {"rope_type": "linear", **_base(info), "factor": factor}


def _ntk(info: RopeInfo, spec: PositionSpec, factor: float) -> dict[str, Any]:
    d = info.rotary_dim
    return {**_base(info), "rope_type": "default", "rope_theta": info.theta * factor ** (d / (d - 2))}


def _theta(info: RopeInfo, spec: PositionSpec, factor: float) -> dict[str, Any]:
    assert spec.theta is not None
    return {**_base(info), "rope_type": "default", "rope_theta": float(spec.theta)}


def _dynamic(info: RopeInfo, spec: PositionSpec, factor: float) -> dict[str, Any]:
    return {"rope_type": "dynamic", **_base(info), "factor": factor}


def _yarn(info: RopeInfo, spec: PositionSpec, factor: float) -> dict[str, Any]:
    p = {
        "rope_type": "yarn",
        **_base(info),
        "factor": factor,
        "original_max_position_embeddings": info.original_length,
        "beta_fast": spec.beta_fast,
        "beta_slow": spec.beta_slow,
        "truncate": spec.truncate,
    }
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        value = getattr(spec, key)
        if value is not None:
            p[key] = float(value)
    return p


def _llama3(info: RopeInfo, spec: PositionSpec, factor: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        **_base(info),
        "factor": factor,
        "low_freq_factor": spec.low_freq_factor,
        "high_freq_factor": spec.high_freq_factor,
        "original_max_position_embeddings": info.original_length,
    }


@dataclass(frozen=True)
class RopeMethod:
    """One RoPE scaling method: (checkpoint's rotary info, `positions` spec, factor) -> rope_parameters."""

    name: str
    parameters: Callable[["RopeInfo", "PositionSpec", float], dict[str, Any]]
    description: str

    def __call__(self, info: RopeInfo, spec: PositionSpec, factor: float) -> dict[str, Any]:
        """The method's rope_parameters (a record is called like the plain function it wraps)."""
        return self.parameters(info, spec, factor)


ROPE_METHODS: Registry[RopeMethod] = Registry("RoPE method", [
    RopeMethod("none", _none, "keep the checkpoint's rotary settings"),
    RopeMethod("pi", _pi, "position interpolation: every frequency divided by the factor"),
    RopeMethod("ntk", _ntk, "NTK-aware: a larger base, so low frequencies stretch and high ones stay"),
    RopeMethod("theta", _theta, "a new base given as `theta` (ProLong, LongRecipe)"),
    RopeMethod("dynamic", _dynamic, "dynamic NTK: the base grows with each forward's longest position"),
    RopeMethod("yarn", _yarn, "YaRN: interpolate low frequencies, keep high ones, scale attention"),
    RopeMethod("llama3", _llama3, "Llama 3.1: long wavelengths divided by the factor, short ones kept"),
])
