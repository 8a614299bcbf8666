"""Memory savers for long sequences: activation checkpointing (optionally offloaded to CPU) and a tiled MLP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def _keep_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective checkpointing policy: keep attention kernels' outputs, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    name = str(op)
    if "attention" in name or "attn" in name:
        if "backward" not in name:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def apply_checkpointing(model: Any, policy: str = "full") -> None:
    """Recompute each decoder layer in backward instead of keeping its activations (transformers' own hook).

    `save_attention` keeps the attention kernel's outputs, so backward does not run attention forward again:
    at long sequences attention is most of the work, so this buys speed for S x (q, k, v, out) memory per layer.
    """
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if policy == "save_attention":
        from functools import partial

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_attention)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# Saved tensors smaller than this stay on the GPU: a copy's latency costs more than the memory is worth.
OFFLOAD_MIN_BYTES = 1 << 20


def should_offload(t: torch.Tensor, min_bytes: int = OFFLOAD_MIN_BYTES) -> bool:
    """Whether a tensor autograd saves goes to CPU memory: large GPU activations only, never parameters.

    Parameters are saved by every LM-head chunk of the loss (64 chunks at 256K tokens); copying the
    1 GiB head once per chunk was what made a naive `save_on_cpu` cost 64 GiB of host memory and most of the step.
    """
    if t.device.type != "cuda" or isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad):
        return False
    return t.numel() * t.element_size() >= min_bytes


def _pack(t: torch.Tensor) -> Any:
    if not should_offload(t):
        return t
    host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=True)
    # Stream-ordered: kernels that reuse t's memory run after this copy on the same stream.
    host.copy_(t, non_blocking=True)
    return (t.device, host)


def _unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)


@contextlib.contextmanager
def offload_saved_activations(enabled: bool, device: torch.device) -> Iterator[None]:
    """Keep the large activations autograd saves (with checkpointing: each layer's input) in pinned CPU memory."""
    if enabled and device.type == "cuda":
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    else:
        yield


def tiled(forward: Any, tile: int) -> Any:
    """A module forward that runs over the sequence in tiles, recomputing each tile in backward.

    The intermediate activation (tokens x intermediate_size) then never exists for the whole sequence:
    at 512K tokens and 14336 features it would be 15 GB per tensor in bf16.
    """

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] <= tile:
            return forward(x)
        parts = []
        for chunk in x.split(tile, dim=-2):
            if torch.is_grad_enabled():
                parts.append(checkpoint(forward, chunk, use_reentrant=False))
            else:
                parts.append(forward(chunk))
        return torch.cat(parts, dim=-2)

    return run


def apply_tiled_mlp(model: Any, tile: int) -> None:
    """Make every decoder layer's MLP run in sequence tiles (same parameters and names, same results)."""
    for layer in model.model.layers:
        mlp = layer.mlp
        if not getattr(mlp, "_lf_tiled", False):
            mlp.forward = tiled(mlp.forward, tile)
            mlp._lf_tiled = True
