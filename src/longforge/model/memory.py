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


@contextlib.contextmanager
def offload_saved_activations(enabled: bool, device: torch.device) -> Iterator[None]:
    """Keep the tensors autograd saves (with checkpointing: each layer's input) in pinned CPU memory."""
    if enabled and device.type == "cuda":
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
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
