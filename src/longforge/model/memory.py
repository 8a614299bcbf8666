"""Memory savers for long sequences: activation checkpointing (optionally offloaded to CPU), a tiled MLP and lean RMSNorms."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
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
    # transformers 5.23 renamed the hook (the old name warns until v6); 5.17, the floor we test, has only the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
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


# Pinned host buffers are at most this big. PyTorch's pinned-memory cache rounds every request up to a power of
# two, so one 6 GiB layer input (768K tokens x 4096 x 2 bytes) would take 8 GiB; in pieces it takes 6.
HOST_PIECE = 1 << 28


def to_host(t: torch.Tensor) -> tuple[torch.device, torch.Size, list[torch.Tensor]]:
    """Copy t into pinned host buffers of at most HOST_PIECE bytes (stream-ordered, non-blocking)."""
    flat = t.detach().reshape(-1)
    pieces = []
    for part in flat.split(max(1, HOST_PIECE // t.element_size())):
        host = torch.empty(part.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        # Stream-ordered: kernels that reuse t's memory run after this copy on the same stream.
        host.copy_(part, non_blocking=True)
        pieces.append(host)
    return t.device, t.shape, pieces


def from_host(device: torch.device, shape: torch.Size, pieces: list[torch.Tensor]) -> torch.Tensor:
    """The tensor to_host saved, back on its device (contiguous)."""
    out = torch.empty(sum(p.numel() for p in pieces), dtype=pieces[0].dtype, device=device)
    start = 0
    for piece in pieces:
        out[start:start + piece.numel()].copy_(piece, non_blocking=True)
        start += piece.numel()
    return out.view(shape)


def _unpack(packed: Any) -> torch.Tensor:
    return packed if isinstance(packed, torch.Tensor) else from_host(*packed)


class ActivationOffload:
    """Moves the large tensors autograd saves (with checkpointing: each layer's input) to pinned host memory.

    The last `resident` decoder layers keep theirs on the GPU: each such layer costs tokens x hidden x 2 bytes
    of GPU memory and saves as much host memory, which is how a step that overflows the host fits when the
    GPU has room. The last layers are the ones kept because backward needs their inputs first. A forward hook
    on every layer moves a cursor, so a tensor saved between layer i-1's end and layer i's end is layer i's.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], resident: int = 0,
                 offloadable: Callable[[torch.Tensor], bool] = should_offload):
        if not 0 <= resident <= len(layers):
            raise ValueError(f"resident_layers must be between 0 and the model's {len(layers)} layers, not {resident}")
        self.resident = frozenset(range(len(layers) - resident, len(layers)))
        self.offloadable = offloadable
        self.cursor = 0
        self.host_bytes = 0  # moved to the host in the current forward
        self.kept_bytes = 0  # kept on the GPU because their layer is resident
        for i, layer in enumerate(layers):
            layer.register_forward_hook(self._after(i))

    def _after(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.cursor = i + 1

        return hook

    def pack(self, t: torch.Tensor) -> Any:
        """Keep t (small, a parameter, or a resident layer's), or copy it to the host and keep the copy."""
        if not self.offloadable(t):
            return t
        nbytes = t.numel() * t.element_size()
        if self.cursor in self.resident:
            self.kept_bytes += nbytes
            return t
        self.host_bytes += nbytes
        return to_host(t)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """Offload during one forward pass (autograd brings the tensors back in backward)."""
        self.cursor, self.host_bytes, self.kept_bytes = 0, 0, 0
        with torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack):
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


# Norm classes whose forward is exactly `weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)`.
LEAN_NORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


def rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's RMSNorm forward and the fp32 inverse RMS it used."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


def rms_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the input and the weight of rms_forward, from the input and the inverse RMS."""
    n = x.float() * rstd
    grad_w = (grad * n.to(x.dtype)).reshape(-1, grad.shape[-1]).float().sum(0).to(weight.dtype)
    g = (grad * weight).float()
    # d/dx of x * rstd(x): rstd * (g - n * mean(g * n)) over the feature dimension.
    grad_x = (rstd * (g - n * (g * n).mean(-1, keepdim=True))).to(x.dtype)
    return grad_x, grad_w


def lean_norm_function(forward: Any = rms_forward, backward: Any = rms_backward) -> Any:
    """RMSNorm as an autograd function that saves its input (own dtype) and the fp32 inverse RMS, recomputing the rest.

    Autograd through the plain module saves fp32 copies of the input and of the normalised input: 16 bytes
    per feature more than this, twice per layer, which at long sequences is most of a recomputed layer's memory.
    `forward`/`backward` are rms_forward/rms_backward or compiled versions of them (model/fused.py).
    """

    class LeanRMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
            y, rstd = forward(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            return y

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
            x, weight, rstd = ctx.saved_tensors
            grad_x, grad_w = backward(grad, x, weight, rstd)
            return grad_x, grad_w, None

    return LeanRMSNorm.apply


lean_rms_norm = lean_norm_function()


def apply_lean_norms(model: Any, norm: Any = None) -> int:
    """Give every Llama-family RMSNorm of the model the lean backward (or `norm`); returns how many were changed."""
    norm = norm or lean_rms_norm
    changed = 0
    for module in model.modules():
        if type(module).__name__ in LEAN_NORM_CLASSES and not getattr(module, "_lf_lean", False):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
            module.forward = (lambda m, e: lambda x: norm(x, m.weight, e))(module, eps)
            module._lf_lean = True
            changed += 1
    return changed
