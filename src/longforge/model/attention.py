"""Attention with document masks, plugged into transformers through its attention interface."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

ATTN_NAME = "longforge"
_registered = False


def document_causal_mask(doc_ids: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
    """Boolean (B, 1, S, S) mask: causal and within the same document (True = may attend)."""
    s = doc_ids.shape[-1]
    kv_len = kv_len or s
    causal = torch.ones(s, kv_len, dtype=torch.bool, device=doc_ids.device).tril(diagonal=kv_len - s)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def longforge_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Exact causal attention, restricted to each packed document when `lf_doc_ids` is passed."""
    doc_ids: torch.Tensor | None = kwargs.get("lf_doc_ids")
    q_len, kv_len = query.shape[-2], key.shape[-2]
    gqa = query.shape[1] != key.shape[1]
    if doc_ids is not None:
        mask = document_causal_mask(doc_ids.to(query.device), kv_len)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    elif attention_mask is not None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=gqa)
    elif q_len == kv_len:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1, scale=scaling, enable_gqa=gqa)
    else:
        # Decoding against a cache: the new queries see every cached key and the causal part of themselves.
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(diagonal=kv_len - q_len)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Mask builder for our attention: it makes its own masks, so transformers must not build one."""
    return None


def register() -> str:
    """Register longforge attention with transformers (idempotent); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_NAME, longforge_attention)
        AttentionMaskInterface.register(ATTN_NAME, _no_mask)
        _registered = True
    return ATTN_NAME


def use_longforge_attention(model: Any) -> None:
    """Switch a loaded transformers model to longforge attention."""
    model.set_attn_implementation(register())
