"""The passkey retrieval task: prompts fitted to a token length, a lengths x depths grid, exact-match scoring."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from longforge.errors import LongforgeError
from longforge.eval.generate import greedy_generate
from longforge.progress import progress_bar

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_NEW_TOKENS = 8


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt of the grid, with everything needed to score and reproduce it."""

    length: int
    depth: float
    trial: int
    key: int
    text: str
    ids: list[int]
    needle_sentence: int


def haystack_text(sentences: int, needle: str | None, needle_at: int) -> str:
    """Filler sentences with the needle inserted before sentence `needle_at`, then the question."""
    parts = [FILLER[i % len(FILLER)] for i in range(sentences)]
    if needle is not None:
        parts.insert(needle_at, needle)
    return " " + " ".join(parts) + " " + QUESTION


def passkey_text(sentences: int, depth: float, key: int) -> tuple[str, int]:
    """The prompt text with `sentences` filler sentences and the needle at `depth` (0 = start, 1 = end)."""
    at = int(round(depth * sentences))
    return haystack_text(sentences, NEEDLE.format(key=key), at), at


def fit_sentences(tokenizer: Any, length: int, key: int) -> int:
    """Most filler sentences whose prompt stays within `length` tokens (binary search, the model's tokenizer)."""

    def n_tokens(s: int) -> int:
        return len(tokenizer(passkey_text(s, 0.5, key)[0], add_special_tokens=False)["input_ids"])

    if n_tokens(0) > length:
        raise LongforgeError(
            f"a passkey prompt needs at least {n_tokens(0)} tokens with this tokenizer; raise the shortest length above {length}."
        )
    lo, hi = 0, 1
    while n_tokens(hi) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if n_tokens(mid) <= length:
            lo = mid
        else:
            hi = mid
    return lo


def build_grid(tokenizer: Any, lengths: list[int], depths: list[float], trials: int, seed: int) -> list[PasskeyPrompt]:
    """Every prompt of the grid, deterministic given the seed."""
    rng = np.random.default_rng(seed)
    prompts = []
    for length in lengths:
        s = fit_sentences(tokenizer, length, 55555)
        for depth in depths:
            for t in range(trials):
                key = int(rng.integers(10000, 100000))
                text, at = passkey_text(s, depth, key)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                prompts.append(PasskeyPrompt(length, depth, t, key, text, list(ids), at))
    return prompts


def first_integer(text: str) -> int | None:
    """The first integer in a generated answer, or None."""
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def spread_lengths(lo: int, hi: int, n: int) -> list[int]:
    """n lengths from lo to hi, evenly spaced on a log scale and rounded to multiples of 8 (hi kept exact)."""
    if n == 1 or lo >= hi:
        return [hi]
    raw = np.geomspace(lo, hi, n)
    out = sorted({max(8, int(round(x / 8)) * 8) for x in raw[:-1]} | {hi})
    return out


@torch.no_grad()
def run_passkey(model: Any, tokenizer: Any, lengths: list[int], depths: int, trials: int, seed: int,
                batch_size: int = 8, label: str = "passkey") -> dict[str, Any]:
    """Generate and score the whole grid; returns every sample and the summary."""
    depth_values = [float(x) for x in np.linspace(0, 1, depths)] if depths > 1 else [0.5]
    grid = build_grid(tokenizer, lengths, depth_values, trials, seed)
    groups: dict[int, list[PasskeyPrompt]] = defaultdict(list)
    for p in grid:
        groups[len(p.ids)].append(p)
    samples = []
    with progress_bar() as bar:
        task = bar.add_task(f"{label}: prompts", total=len(grid))
        for n in sorted(groups):
            items = groups[n]
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                x = torch.tensor([p.ids for p in chunk])
                new = greedy_generate(model, x, MAX_NEW_TOKENS)
                for p, toks in zip(chunk, new.tolist()):
                    out = tokenizer.decode(toks, skip_special_tokens=True)
                    got = first_integer(out)
                    samples.append({
                        "length": p.length, "prompt_tokens": len(p.ids), "depth": p.depth, "trial": p.trial,
                        "key": p.key, "output": out, "answer": got, "correct": got == p.key,
                        "prompt_sha1": hashlib.sha1(p.text.encode()).hexdigest()[:12],
                    })
                bar.update(task, advance=len(chunk))
    return {"task": "passkey", "lengths": lengths, "depths": depth_values, "trials": trials, "seed": seed,
            "samples": samples, "summary": summarize(samples, lengths, depth_values)}


def summarize(samples: list[dict[str, Any]], lengths: list[int], depths: list[float]) -> dict[str, Any]:
    """Accuracy per cell, per length, and overall."""
    cell: dict[tuple[int, float], list[bool]] = defaultdict(list)
    for s in samples:
        cell[(s["length"], s["depth"])].append(bool(s["correct"]))
    grid = [[float(np.mean(cell[(L, d)])) if cell[(L, d)] else float("nan") for d in depths] for L in lengths]
    per_length = {str(L): float(np.nanmean(row)) for L, row in zip(lengths, grid)}
    return {"grid": grid, "per_length": per_length, "accuracy": float(np.mean([s["correct"] for s in samples]))}
