"""Perplexity against length: token-weighted mean NLL of long documents truncated at each length."""

from __future__ import annotations

import math
from typing import Any

import torch

from longforge.errors import LongforgeError
from longforge.progress import progress_bar
from longforge.train.loop import chunked_lm_loss


@torch.no_grad()
def window_nll(model: Any, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and target count of a batch of windows (B, L), without the full logits."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    weights = torch.zeros(ids.shape, dtype=torch.float32, device=device)
    weights[:, :-1] = 1.0
    total = chunked_lm_loss(hidden, model.get_output_embeddings(), labels, weights)
    return float(total), int(weights.sum())


@torch.no_grad()
def run_ppl(model: Any, docs: list[list[int]], lengths: list[int], num_docs: int, label: str = "ppl") -> dict[str, Any]:
    """Perplexity at each length over the first `num_docs` documents at least that long."""
    rows = []
    with progress_bar() as bar:
        task = bar.add_task(f"{label}: lengths", total=len(lengths))
        for L in lengths:
            pool = [d[:L] for d in docs if len(d) >= L][:num_docs]
            if not pool:
                rows.append({"length": L, "documents": 0, "tokens": 0, "nll": None, "ppl": None})
                bar.update(task, advance=1)
                continue
            nll, n = 0.0, 0
            for d in pool:
                a, b = window_nll(model, torch.tensor([d]))
                nll += a
                n += b
            rows.append({"length": L, "documents": len(pool), "tokens": n, "nll": nll / n, "ppl": math.exp(nll / n)})
            bar.update(task, advance=1)
    if all(r["documents"] == 0 for r in rows):
        raise LongforgeError(f"no perplexity document reaches even {min(lengths)} tokens; give longer documents or shorter lengths.")
    return {"task": "ppl", "lengths": lengths, "rows": rows}
