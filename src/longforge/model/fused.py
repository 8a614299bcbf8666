"""The elementwise parts of a decoder layer (SwiGLU, RoPE, RMSNorm) fused into single kernels with torch.compile.

Matrix products and attention are most of a long-sequence step, but not all: on an H100 at 64K tokens the
elementwise kernels and dtype copies of a Llama layer took about a fifth of its GPU time
(benchmarks/train_gpu.py --suite profile), each op reading and writing whole (tokens x features) tensors,
several times over with recomputation. Compiling each small function once gives one kernel per function,
forward and backward. The math is the models' own, so results agree to rounding. A function that fails to
compile is used eagerly from then on, with one warning.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from longforge.model import memory

ROPE_FUNCTION = "apply_rotary_pos_emb"
SILU_CLASSES = {"SiLU", "SiLUActivation"}  # torch's and transformers' (both F.silu)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's elementwise part: silu(gate) * up."""
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(-x2, x1) for the halves of the last dimension, as Llama's RoPE rotates."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb (Llama, Mistral, Qwen2/3), the same expression."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Compiled:
    """A function compiled on first use; if compiling or running the compiled code fails, the eager function from then on."""

    def __init__(self, fn: Callable[..., Any], compiler: Callable[..., Any] | None = None):
        self.fn = fn
        self.compiled = (compiler or _compile)(fn)
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
                self.failed = True
                warnings.warn(f"longforge: fused {self.fn.__name__} did not compile ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); running it unfused", stacklevel=2)
        return self.fn(*args, **kwargs)


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile for one small function: a whole graph, shapes specialised until they vary."""
    return torch.compile(fn, fullgraph=True)


def fuse_mlp(module: Any, kernel: Callable[..., torch.Tensor]) -> bool:
    """Route a gate/up/down SiLU MLP through the fused silu * up; False when the module is not of that form."""
    act = getattr(module, "act_fn", None)
    if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) or type(act).__name__ not in SILU_CLASSES:
        return False
    module.forward = lambda x: module.down_proj(kernel(module.gate_proj(x), module.up_proj(x)))
    return True


def fuse_rope(model: Any, kernel: Callable[..., Any]) -> bool:
    """Point the model's modeling module at the fused RoPE (its attention looks the function up at call time)."""
    layers = model.model.layers
    modeling = sys.modules.get(type(layers[0].self_attn).__module__) if len(layers) else None
    if modeling is None or not hasattr(modeling, ROPE_FUNCTION):
        return False
    setattr(modeling, ROPE_FUNCTION, kernel)
    return True


def apply_fused_ops(model: Any, norms: bool = True, compiler: Callable[..., Any] | None = None) -> dict[str, int]:
    """Fuse every decoder layer's SwiGLU, the model's RoPE and (with `norms`) lean RMSNorms; returns what changed.

    Run before tiling the MLP (the tiles then call the fused forward) and instead of apply_lean_norms. The RoPE
    function is replaced in the model family's modeling module, so for every model of that family in the process
    (the same expression, compiled). `compiler` replaces torch.compile (tests pass the identity on CPU).
    """
    mlp_kernel = Compiled(silu_mul, compiler)
    mlps = sum(fuse_mlp(layer.mlp, mlp_kernel) for layer in model.model.layers)
    roped = fuse_rope(model, Compiled(rope, compiler))
    changed = 0
    if norms:
        norm = memory.lean_norm_function(Compiled(memory.rms_forward, compiler), Compiled(memory.rms_backward, compiler))
        changed = memory.apply_lean_norms(model, norm)
    return {"mlp": mlps, "rope": int(roped), "norm": changed}


def fused_available(device: torch.device) -> bool:
    """Fusing needs a CUDA device and Triton (what torch.compile generates GPU kernels with)."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
