"""What the generation tasks share: length spreads, batching prompts of equal token length, the lengths x depths summary."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from longforge.progress import progress_bar


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task: its token ids and everything needed to score and reproduce it."""

    length: int
    ids: list[int]
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


def spread_lengths(lo: int, hi: int, n: int, spacing: str = "log") -> list[int]:
    """n lengths from lo to hi (log or linear spacing), rounded to multiples of 8, hi kept exact."""
    if n == 1 or lo >= hi:
        return [hi]
    raw = np.geomspace(lo, hi, n) if spacing == "log" else np.linspace(lo, hi, n)
    return sorted({max(8, int(round(x / 8)) * 8) for x in raw[:-1]} | {hi})


def depth_values(depths: int) -> list[float]:
    """`depths` needle depths spread evenly from 0 (start) to 1 (end); one depth means the middle."""
    return [float(x) for x in np.linspace(0, 1, depths)] if depths > 1 else [0.5]


def batch_size_for(length: int, batch_size: int, batch_tokens: int) -> int:
    """Prompts per batch at this length: at most batch_size, and at most batch_tokens tokens in all (at least one)."""
    return max(1, min(batch_size, batch_tokens // max(length, 1)))


def generate_all(engine: Any, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int,
                 score: Callable[[Prompt, str], dict[str, Any]], label: str, batch_size: int = 8,
                 batch_tokens: int = 131072, stop: Callable[[Prompt, str], bool] | None = None) -> list[dict[str, Any]]:
    """Generate for every prompt (equal token lengths batched together) and score each output; returns samples in input order."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p.ids)].append(i)
    outputs: dict[int, dict[str, Any]] = {}
    with progress_bar() as bar:
        task = bar.add_task(f"{label}: prompts", total=len(prompts))
        for n in sorted(groups):
            idx = groups[n]
            step = batch_size_for(n, batch_size, batch_tokens)
            for s in range(0, len(idx), step):
                chunk = [prompts[i] for i in idx[s:s + step]]
                x = torch.tensor([p.ids for p in chunk])

                def row_stop(row: int, toks: list[int], chunk: list[Prompt] = chunk) -> bool:
                    return stop(chunk[row], tokenizer.decode(toks, skip_special_tokens=True)) if stop else False

                rows = engine.generate(x, max_new_tokens, stop=row_stop if stop else None)
                for i, p, toks in zip(idx[s:s + step], chunk, rows):
                    out = tokenizer.decode(toks, skip_special_tokens=True)
                    outputs[i] = {"length": p.length, "prompt_tokens": len(p.ids), **p.meta, "output": out,
                                  "new_tokens": len(toks), **score(p, out)}
                bar.update(task, advance=len(chunk))
    return [outputs[i] for i in range(len(prompts))]


def summarize_grid(samples: list[dict[str, Any]], lengths: list[int], depths: list[float], key: str) -> dict[str, Any]:
    """Mean of `key` per (length, depth) cell, per length, and overall."""
    cell: dict[tuple[int, float], list[float]] = defaultdict(list)
    for s in samples:
        cell[(s["length"], s["depth"])].append(float(s[key]))
    grid = [[float(np.mean(cell[(L, d)])) if cell[(L, d)] else float("nan") for d in depths] for L in lengths]
    per_length = {str(L): float(np.nanmean(row)) for L, row in zip(lengths, grid)}
    return {"grid": grid, "per_length": per_length, "accuracy": float(np.mean([float(s[key]) for s in samples]))}
