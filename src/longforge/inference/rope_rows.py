"""Dynamic NTK RoPE with each row's own frequencies, so prompts of different lengths decode in one batch.

transformers rescales a dynamic-NTK model's RoPE base by the longest position of each forward pass (and keeps the
grown frequencies): a row decoded alone is rotated for its own length, but in a batch for the longest row's. Here
the model's rotary module computes, for each row, the frequencies transformers would use for that row alone: its
last position + 1 (the prompt's length in a one-pass prefill, the current length in a decoding step), the same
formula as `transformers.modeling_rope_utils._compute_dynamic_ntk_parameters`, as tensor operations (no host sync,
so decoding steps can be captured in a CUDA graph). It is checked against the model's own rotary module at a few
lengths before use, bit for bit; where it differs (another transformers, another RoPE) the engine keeps its
equal-length path.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch

Rope = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _rotary(model: Any) -> Any:
    """The model's one rotary module (decoder.rotary_emb), or None."""
    return getattr(getattr(model, "model", None), "rotary_emb", None)


def dynamic_inv_freq(config: Any, lengths: torch.Tensor) -> torch.Tensor:
    """(rows, dim/2) inverse frequencies of dynamic NTK for each row's sequence length (rows, 1), in float32."""
    params = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    factor, window = params["factor"], config.max_position_embeddings
    seq = torch.clamp(lengths, min=window)  # at or below the window: the original frequencies
    base = params["rope_theta"] * ((factor * seq / window) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=lengths.device, dtype=torch.float) / dim))


def row_rope(config: Any, scaling: float) -> Rope:
    """A rotary forward (x, position_ids) -> (cos, sin) with each row rotated for its own length."""
    def forward(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = dynamic_inv_freq(config, position_ids[:, -1:] + 1)  # (rows, dim/2)
        freqs = position_ids[..., None].float() * inv[:, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(dtype=x.dtype), (emb.sin() * scaling).to(dtype=x.dtype)

    return forward


def per_row_rope(model: Any) -> Rope | None:
    """The per-row rotary forward for a dynamic-NTK model, if it equals the model's own rotary module, row by row,
    at lengths inside and past the window; else None."""
    rotary = _rotary(model)
    if rotary is None or not hasattr(rotary, "attention_scaling"):
        return None
    fn = row_rope(model.config, rotary.attention_scaling)
    window = model.config.max_position_embeddings
    device = next((b.device for b in rotary.buffers()), torch.device("cpu"))
    x = torch.zeros(1, dtype=torch.float32, device=device)
    try:
        with torch.no_grad():
            for n in (window // 2, window, window + 1, 3 * window + 5):
                pos = torch.arange(n, device=device)[None]
                fresh = copy.deepcopy(rotary)  # grows its frequencies as transformers does for one sequence
                want = fresh(x, pos)
                got = fn(x, pos)
                step = torch.tensor([[n]], device=device)  # then one decoding step after it, as generate grows
                want_step, got_step = fresh(x, step), fn(x, step)
                if not all(torch.equal(a, b) for a, b in zip((*want, *want_step), (*got, *got_step))):
                    return None
    except Exception:  # noqa: BLE001 - a rotary module of another form: the equal-length path
        return None
    return fn


@contextlib.contextmanager
def rows_rotated(model: Any, fn: Rope | None) -> Iterator[None]:
    """The model's rotary module computes each row's own frequencies inside the block (nothing changes with None)."""
    rotary = _rotary(model)
    if fn is None or rotary is None:
        yield
        return
    rotary.forward = fn
    try:
        yield
    finally:
        del rotary.forward
