"""Training FLOPs per token and model FLOPs utilisation, counted as REFERENCE.md section 4 does."""

from __future__ import annotations

from typing import Any

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def matmul_params(config: Any) -> int:
    """Parameters that take part in matrix products per token (everything but the embedding lookup)."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or d // heads
    attn = d * heads * hd * 2 + d * kv * hd * 2
    mlp = 3 * d * config.intermediate_size
    return config.num_hidden_layers * (attn + mlp) + d * config.vocab_size


def flops_per_token(config: Any, context: float) -> float:
    """6*N_matmul + 6*L*(heads*head_dim)*context: forward and backward, causal, no recomputation."""
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6.0 * matmul_params(config) + 6.0 * config.num_hidden_layers * heads * hd * context


def attention_context(doc_lengths: list[int]) -> float:
    """The causal context that a token attends to on average under document masking, scaled like S for one document."""
    total = sum(doc_lengths)
    return sum(n * n for n in doc_lengths) / total if total else 0.0


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of the GPU, when known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
