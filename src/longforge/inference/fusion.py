"""Fewer kernels in a decoding step and a prefill chunk: the model's RMSNorms, RoPE and SwiGLU as single compiled
kernels while the engine runs it (and, when asked, a decoding step's linear layers as inference/skinny.py's kernel).

A decoding step computes one token per row, so its matrix products are small and most of its kernels are tiny
elementwise ones: transformers' RMSNorm is about eight kernels, RoPE about ten, SwiGLU two, per layer; in a CUDA
graph each still costs about 3 us, which for a 30-layer 135M model was most of a 4 ms step (benchmarks/
eval_engine.py). model/fused.py's compiled functions (the same expressions) make each one kernel. In a prefill chunk
the same fusion saves memory traffic: the 8B shape's prefill went from 505 to 567 TFLOP/s at 32K tokens and from 543
to 574 at 128K (H200, 2026-11-30). The engine puts them in while it prefills and decodes (or captures the step) and
takes them out after, so scoring and the model outside the engine are as they were; every row of a batch, and a row
alone, runs with the same kernels.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from longforge.model.fused import ROPE_FUNCTION, Compiled, fuse_mlp, rope, silu_mul
from longforge.model.memory import LEAN_NORM_CLASSES, rms_forward


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (rms_forward without the inverse RMS a backward would keep)."""
    return rms_forward(x, weight, eps)[0]


class DecodeKernels:
    """The compiled functions, made once per process and shared by every engine (compiling takes seconds)."""

    def __init__(self, compiler: Callable[..., Any] | None = None, linear: Callable[..., torch.Tensor] | None = None):
        self.norm = Compiled(rms_norm, compiler)
        self.rope = Compiled(rope, compiler)
        self.mlp = Compiled(silu_mul, compiler)
        self.linear = linear  # (x, weight, bias) -> x @ weight.T + bias for the decoder's and the head's linears; None: torch's


_kernels: dict[tuple[str, str], DecodeKernels] = {}


def decode_kernels(phase: str = "decode", gemm: str = "cublas") -> DecodeKernels:
    """The process's compiled functions for one phase: decoding steps, or prefill chunks (compiled apart, so the
    chunks' shapes never count against the decoding functions' recompile limit); gemm 'triton' also routes the
    linear layers to the weight-streaming kernel."""
    if (phase, gemm) not in _kernels:
        from longforge.inference import skinny

        _kernels[phase, gemm] = DecodeKernels(linear=skinny.linear if gemm == "triton" else None)
    return _kernels[phase, gemm]


@contextlib.contextmanager
def fused_decoding(model: Any, kernels: DecodeKernels) -> Iterator[int]:
    """Route the model's RMSNorms, RoPE and SiLU MLPs (and, with `kernels.linear`, its linear layers) through
    `kernels` inside the block; yields how many modules changed. Modules that already have a forward of their own
    (training's lean norms, fused MLPs) are left alone."""
    patched: list[Any] = []
    for module in model.modules():
        if "forward" in vars(module):
            continue
        if kernels.linear is not None and isinstance(module, torch.nn.Linear):
            module.forward = (lambda m, f: lambda x: f(x, m.weight, m.bias))(module, kernels.linear)
            patched.append(module)
        elif type(module).__name__ in LEAN_NORM_CLASSES:
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
            module.forward = (lambda m, e: lambda x: kernels.norm(x, m.weight, e))(module, eps)
            patched.append(module)
        elif fuse_mlp(module, kernels.mlp):
            patched.append(module)
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    modeling = sys.modules.get(type(layers[0].self_attn).__module__) if len(layers) else None
    previous = getattr(modeling, ROPE_FUNCTION, None) if modeling is not None else None
    if previous is not None:
        setattr(modeling, ROPE_FUNCTION, kernels.rope)
    try:
        yield len(patched) + (previous is not None)
    finally:
        for module in patched:
            del module.forward
        if previous is not None:
            setattr(modeling, ROPE_FUNCTION, previous)
