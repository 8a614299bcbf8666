"""Greedy generation for long prompts: chunked prefill into a KV cache, logits only where needed."""

from __future__ import annotations

from typing import Any

import torch

PREFILL_CHUNK = 8192


@torch.no_grad()
def greedy_generate(model: Any, prompts: torch.Tensor, max_new_tokens: int, prefill_chunk: int = PREFILL_CHUNK,
                    stop_ids: set[int] | None = None) -> torch.Tensor:
    """Greedy continuation of equal-length prompts (B, L); returns the new tokens (B, <= max_new_tokens)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    prompts = prompts.to(device)
    cache = DynamicCache(config=model.config)
    b, n = prompts.shape
    logits = None
    for start in range(0, n, prefill_chunk):
        chunk = prompts[:, start : start + prefill_chunk]
        logits = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    assert logits is not None
    out = []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    nxt = logits[:, -1].argmax(-1)
    for i in range(max_new_tokens):
        out.append(nxt)
        if stop_ids:
            done |= torch.isin(nxt, torch.tensor(sorted(stop_ids), device=device))
            if bool(done.all()):
                break
        if i + 1 == max_new_tokens:
            break
        logits = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1)
    return torch.stack(out, dim=1)
