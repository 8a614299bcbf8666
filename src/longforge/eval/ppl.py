"""Perplexity against length: token-weighted mean NLL of long documents, one window per document or a sliding window."""

from __future__ import annotations

import math
from typing import Any

import torch

from longforge.errors import LongforgeError
from longforge.inference import as_engine
from longforge.progress import progress_bar


@torch.no_grad()
def window_nll(model: Any, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and target count of one window (1, L), without the full logits."""
    return as_engine(model).window_nll(ids)


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new targets) of windows over n tokens: each scores only tokens no earlier window scored."""
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + window, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            return out
        begin += stride


@torch.no_grad()
def run_ppl(model: Any, docs: list[list[int]], lengths: list[int], num_docs: int, label: str = "ppl",
            stride: int | None = None) -> dict[str, Any]:
    """Perplexity at each length.

    Without a stride: the first `num_docs` documents at least L tokens long, truncated at L, one window each
    (YaRN/PoSE's protocol). With a stride: the same tokens at every length (the first max(lengths) tokens of
    the `num_docs` longest documents), scored by windows of at most L tokens moving by the stride, so the
    curve isolates the effect of the context length.
    """
    engine = as_engine(model)
    lengths = sorted(lengths)
    rows = []
    span = max(lengths)
    with progress_bar() as bar:
        task = bar.add_task(f"{label}: lengths", total=len(lengths))
        for L in lengths:
            if stride is None:
                pool = [d[:L] for d in docs if len(d) >= L][:num_docs]
            else:
                pool = [d[:span] for d in docs[:num_docs] if len(d) >= 2]
            nll, n = 0.0, 0
            for d in pool:
                ids = torch.tensor([d])
                if stride is None:
                    a, b = engine.window_nll(ids)
                    nll, n = nll + a, n + b
                    continue
                for begin, end, new in sliding_windows(len(d), L, min(stride, L)):
                    a, b = engine.window_nll(ids[:, begin:end], score_last=new)
                    nll, n = nll + a, n + b
            row: dict[str, Any] = {"length": L, "documents": len(pool), "tokens": n,
                                   "nll": nll / n if n else None, "ppl": math.exp(nll / n) if n else None}
            if stride is not None:
                row["stride"] = min(stride, L)
            rows.append(row)
            bar.update(task, advance=1)
    if all(r["documents"] == 0 for r in rows):
        raise LongforgeError(f"no perplexity document reaches even {min(lengths)} tokens; give longer documents or shorter lengths.")
    return {"task": "ppl", "lengths": lengths, "stride": stride, "rows": rows,
            "engine": engine.describe() if hasattr(engine, "describe") else {}}
