"""What the generation tasks share: length spreads, batching prompts by length (spread over torchrun's processes), the
lengths x depths summary."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from longforge.errors import LongforgeError
from longforge.eval.share import SINGLE, Share
from longforge.eval.task import Metric
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


def length_slack(shortest: int) -> int:
    """How many tokens a ragged batch's longest prompt may exceed its shortest: about 5%, at least a few tokens."""
    return max(4, shortest // 20)


def batch_plan(lengths: Sequence[int], batch_size: int, batch_tokens: int, ragged: bool) -> list[list[int]]:
    """Prompt indices in batches, shortest prompts first, each batch within batch_size and batch_tokens.

    Equal-length engines get batches of prompts of exactly one length; a ragged engine (one that takes rows of
    different lengths) gets prompts of similar length together: at most `length_slack` tokens apart.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if batches:
            last = batches[-1]
            first = lengths[last[0]]
            fits = n == first or (ragged and n - first <= length_slack(first))
            if fits and len(last) < batch_size_for(n, batch_size, batch_tokens):
                last.append(i)
                continue
        batches.append([i])
    return batches


def generate_all(engine: Any, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int,
                 score: Callable[[Prompt, str], dict[str, Any]], label: str, batch_size: int = 8,
                 batch_tokens: int = 131072, stop: Callable[[Prompt, str], bool] | None = None,
                 share: Share = SINGLE) -> list[dict[str, Any]]:
    """Generate for every prompt (batched by length, see batch_plan) and score each output; samples in input order.

    Under torchrun (`share`) each process runs its share of the batches and every process gets every sample; a
    batch is the same whichever process runs it, so the samples are those of one process.
    """
    ragged = bool(getattr(engine, "ragged", False))
    batches = batch_plan([len(p.ids) for p in prompts], batch_size, batch_tokens, ragged)
    # What a batch costs: the tokens it reads and at most writes (prefill and decoding).
    costs = [float(sum(len(prompts[i].ids) + max_new_tokens for i in b)) for b in batches]
    # A batch whose KV cache is sharded over a group of processes (a prompt longer than one GPU holds) is run by every
    # process of one group together; the groups share those batches, and every process shares the others alone.
    # Decided (and a prompt too long even sharded refused) before any work, the same way on every process.
    shards = getattr(engine, "kv_shards_for", None)
    joint = [b for b, idx in enumerate(batches)
             if shards is not None and shards([len(prompts[i].ids) for i in idx], max_new_tokens) > 1]
    alone = [b for b in range(len(batches)) if b not in set(joint)]
    mine = [alone[i] for i in share.mine([costs[b] for b in alone])]
    if joint:
        group = engine.kv_group
        engine.sharded_prompts.extend(len(prompts[i].ids) for b in joint for i in batches[b])
        # First, so that every process of a group reaches its shared batches at the same point.
        mine = [joint[i] for i in Share(group.index, group.count).mine([costs[b] for b in joint])] + mine

    def work() -> dict[int, dict[str, Any]]:
        outputs: dict[int, dict[str, Any]] = {}
        with progress_bar() as bar:
            task = bar.add_task(f"{label}: prompts", total=sum(len(batches[b]) for b in mine))
            for b in mine:
                idx = batches[b]
                chunk = [prompts[i] for i in idx]
                x: Any = [list(p.ids) for p in chunk] if ragged else torch.tensor([p.ids for p in chunk])

                def row_stop(row: int, toks: list[int], chunk: list[Prompt] = chunk) -> bool:
                    return stop(chunk[row], tokenizer.decode(toks, skip_special_tokens=True)) if stop else False

                rows = engine.generate(x, max_new_tokens, stop=row_stop if stop else None)
                for i, p, toks in zip(idx, chunk, rows):
                    out = tokenizer.decode(toks, skip_special_tokens=True)
                    outputs[i] = {"length": p.length, "prompt_tokens": len(p.ids), **p.meta, "output": out,
                                  "new_tokens": len(toks), **score(p, out)}
                bar.update(task, advance=len(chunk))
        return outputs

    outputs = share.collect(work)
    return [outputs[i] for i in range(len(prompts))]


def summarize_grid(samples: list[dict[str, Any]], lengths: list[int], depths: list[float], key: str) -> dict[str, Any]:
    """Mean of `key` per (length, depth) cell, per length, and overall."""
    cell: dict[tuple[int, float], list[float]] = defaultdict(list)
    for s in samples:
        cell[(s["length"], s["depth"])].append(float(s[key]))
    grid = [[float(np.mean(cell[(L, d)])) if cell[(L, d)] else float("nan") for d in depths] for L in lengths]
    per_length = {str(L): float(np.nanmean(row)) for L, row in zip(lengths, grid)}
    return {"grid": grid, "per_length": per_length, "accuracy": float(np.mean([float(s[key]) for s in samples]))}


def grid_lengths(spec: Any, original_length: int, target_length: int) -> list[int]:
    """A grid's lengths (a passkey or NIAH section): given, or spread from a quarter of the original window to the target."""
    if spec.lengths:
        return sorted(spec.lengths)
    lo = spec.min_length or max(original_length // 4, 64)  # below ~64 tokens no task prompt fits
    hi = spec.max_length or target_length
    return spread_lengths(lo, hi, spec.num_lengths, spec.spacing)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def grid_bands(result: dict[str, Any], original: int) -> dict[str, float | None]:
    """A grid task's mean score inside the original window, beyond it, at 4x-8x of it, and over the whole grid."""
    per = {int(k): v for k, v in result["summary"]["per_length"].items()}
    return {
        "inside": _mean([v for L, v in per.items() if L <= original]),
        "beyond": _mean([v for L, v in per.items() if L > original]),
        "4x-8x": _mean([v for L, v in per.items() if 4 * original <= L <= 8 * original]),
        "all": result["summary"]["accuracy"],
    }


def percent(x: float | None) -> str:
    """A 0-1 score as a whole percentage, or '-'."""
    return "-" if x is None else f"{x * 100:.0f}%"


def grid_columns(task: str, evals: dict[str, Any], original: int, bands: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    """The report's columns of a grid task: the given bands per model (none when no model ran the task)."""
    if not any(task in e for e in evals.values()):
        return [], [[] for _ in evals]
    names = {"inside": f"<= {original}", "beyond": f"> {original}", "4x-8x": "4x-8x", "all": "all"}
    header = [f"{task} {names[b]}" for b in bands]
    rows = []
    for e in evals.values():
        if task in e:
            got = grid_bands(e[task], original)
            rows.append([percent(got[b]) for b in bands])
        else:
            rows.append(["-"] * len(bands))
    return header, rows


def grid_by_length(summary: dict[str, Any]) -> dict[str, str]:
    """A grid task's score per length, as `longforge eval` prints it."""
    return {L: f"{v:.0%}" for L, v in (summary or {}).get("per_length", {}).items() if v is not None}


def x100(x: float | None) -> float | None:
    """A 0-1 score in percent (None stays None)."""
    return None if x is None else 100 * x


def grid_metrics(task: str, name: str, ra: dict[str, Any], rb: dict[str, Any]) -> list[Metric]:
    """A grid task's score per length and over the grid, for A and B (`eval compare`)."""
    pa, pb = ra.get(task, {}).get("summary", {}), rb.get(task, {}).get("summary", {})
    if not pa and not pb:
        return []
    per_a, per_b = pa.get("per_length", {}), pb.get("per_length", {})
    rows = [Metric(f"{name} @{L}", x100(per_a.get(L)), x100(per_b.get(L)), "%") for L in sorted({*per_a, *per_b}, key=int)]
    return rows + [Metric(f"{name}, all", x100(pa.get("accuracy")), x100(pb.get("accuracy")), "%")]


def shortest_prompt(key: str, build: Callable[[], Any]) -> None:
    """Run a prompt builder at a task's shortest length; its 'raise the shortest length' error names the recipe key."""
    try:
        build()
    except LongforgeError as e:
        raise LongforgeError(f"`{key}.lengths`: {e}") from None
