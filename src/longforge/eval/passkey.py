"""The passkey retrieval task: prompts fitted to a token length, a lengths x depths grid, exact-match scoring."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longforge.config import EvalSpec
from longforge.errors import LongforgeError
from longforge.inference import as_engine
from longforge.eval.grid import (Prompt, depth_values, generate_all, grid_by_length, grid_columns, grid_lengths, grid_metrics,
                                 shortest_prompt, spread_lengths, summarize_grid)
from longforge.eval.metrics import answer_complete_integer, first_integer
from longforge.eval.prompts import NOISE_SENTENCES, PromptFormat, TextHaystack, fit_count, prompt_hash
from longforge.eval.share import SINGLE, Share
from longforge.eval.task import EvalTask, TaskRun

FILLER = NOISE_SENTENCES
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_NEW_TOKENS = 8
_ASK, _PREFIX = "What is the pass key?", "The pass key is"
PLAIN = PromptFormat()

__all__ = ["FILLER", "NEEDLE", "QUESTION", "PasskeyPrompt", "build_grid", "first_integer", "fit_sentences",
           "haystack_text", "passkey_text", "run_passkey", "spread_lengths", "summarize"]


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
    """Filler sentences with the needle inserted before sentence `needle_at`, then the question (plain format)."""
    parts = [FILLER[i % len(FILLER)] for i in range(sentences)]
    if needle is not None:
        parts.insert(needle_at, needle)
    return " " + " ".join(parts) + " " + QUESTION


def passkey_parts(units: int, depth: float, key: int, haystack: TextHaystack | None = None) -> tuple[str, str, int]:
    """(user text, answer prefix, needle sentence index) with `units` filler sentences (or corpus words).

    With the noise filler, user + prefix is exactly the Landmark/YaRN passkey prompt.
    """
    parts = [FILLER[i % len(FILLER)] for i in range(units)] if haystack is None else haystack.sentences(units)
    at = int(round(depth * len(parts)))
    parts.insert(at, NEEDLE.format(key=key))
    return " " + " ".join(parts) + " " + _ASK, " " + _PREFIX, at


def passkey_text(sentences: int, depth: float, key: int, fmt: PromptFormat = PLAIN, tokenizer: Any = None,
                 haystack: TextHaystack | None = None) -> tuple[str, int]:
    """The prompt text with `sentences` filler sentences (or corpus words) and the needle at `depth` (0 = start, 1 = end)."""
    user, prefix, at = passkey_parts(sentences, depth, key, haystack)
    return (user + prefix if not fmt.chat_template else fmt.render(tokenizer, user, prefix)), at


def fit_sentences(tokenizer: Any, length: int, key: int, fmt: PromptFormat = PLAIN, guess: int | None = None,
                  haystack: TextHaystack | None = None) -> int:
    """Most filler sentences (or corpus words) whose prompt stays within `length` tokens (the model's own tokenizer)."""

    def n_tokens(s: int) -> int:
        return len(fmt.encode(tokenizer, passkey_text(s, 0.5, key, fmt, tokenizer, haystack)[0]))

    return fit_count(n_tokens, length, "passkey prompt", guess=guess or max(1, length // 6))


def build_grid(tokenizer: Any, lengths: list[int], depths: list[float], trials: int, seed: int,
               fmt: PromptFormat = PLAIN, haystack: TextHaystack | None = None) -> list[PasskeyPrompt]:
    """Every prompt of the grid, deterministic given the seed; each at most its length in tokens."""
    rng = np.random.default_rng(seed)
    prompts = []
    per_token = 1 / 6  # sentences per token, refined from each fitted length to guess the next
    for length in sorted(lengths):
        s = fit_sentences(tokenizer, length, 55555, fmt, guess=max(1, int(per_token * length)), haystack=haystack)
        per_token = max(s, 1) / length
        for depth in depths:
            for t in range(trials):
                key = int(rng.integers(10000, 100000))
                s_cell = s
                text, at = passkey_text(s_cell, depth, key, fmt, tokenizer, haystack)
                ids = fmt.encode(tokenizer, text)
                while len(ids) > length and s_cell > 0:  # this key tokenizes longer than the probe: drop filler, never truncate
                    s_cell -= 1
                    text, at = passkey_text(s_cell, depth, key, fmt, tokenizer, haystack)
                    ids = fmt.encode(tokenizer, text)
                if len(ids) > length:
                    raise LongforgeError(f"a passkey prompt needs {len(ids)} tokens with this tokenizer; raise the shortest length above {length}.")
                prompts.append(PasskeyPrompt(length, depth, t, key, text, ids, at))
    return prompts


def summarize(samples: list[dict[str, Any]], lengths: list[int], depths: list[float]) -> dict[str, Any]:
    """Accuracy per cell, per length, and overall."""
    return summarize_grid(samples, lengths, depths, "correct")


@torch.no_grad()
def run_passkey(model: Any, tokenizer: Any, lengths: list[int], depths: int, trials: int, seed: int,
                batch_size: int = 8, label: str = "passkey", fmt: PromptFormat = PLAIN,
                batch_tokens: int = 131072, haystack: Path | None = None, share: Share = SINGLE) -> dict[str, Any]:
    """Generate and score the whole grid (this process's share of it, under torchrun); returns every sample and the summary."""
    engine = as_engine(model)
    depth_list = depth_values(depths)
    lengths = sorted(lengths)
    hay = TextHaystack.load(haystack, max_words=4 * max(lengths) + 1000) if haystack is not None else None
    grid = build_grid(tokenizer, lengths, depth_list, trials, seed, fmt, hay)
    prompts = [Prompt(p.length, p.ids, p.text, {"depth": p.depth, "trial": p.trial, "key": p.key,
                                                "needle_sentence": p.needle_sentence,
                                                "prompt_sha1": prompt_hash(p.text)}) for p in grid]

    def score(p: Prompt, out: str) -> dict[str, Any]:
        got = first_integer(out)
        return {"answer": got, "correct": got == p.meta["key"], "score": float(got == p.meta["key"])}

    samples = generate_all(engine, tokenizer, prompts, MAX_NEW_TOKENS, score, label, batch_size, batch_tokens,
                           stop=lambda p, text: answer_complete_integer(text), share=share)
    return {"task": "passkey", "lengths": lengths, "depths": depth_list, "trials": trials, "seed": seed,
            "haystack": "noise" if hay is None else hay.describe(),
            "format": {"chat_template": fmt.chat_template}, "engine": _describe(engine),
            "samples": samples, "summary": summarize(samples, lengths, depth_list)}


def _describe(engine: Any) -> dict[str, Any]:
    return engine.describe() if hasattr(engine, "describe") else {"path": type(engine).__name__}


# ---- how the eval stage runs the task and how its results are read (the registry's entry)


def run_task(job: TaskRun) -> dict[str, Any]:
    """The passkey grid of the eval spec on one model."""
    pk = job.spec.passkey
    assert pk is not None
    return run_passkey(job.engine, job.tokenizer, grid_lengths(pk, job.original_length, job.target_length), pk.depths,
                       pk.trials, job.spec.seed, job.batch_size(pk.batch_size), label=f"{job.label} passkey", fmt=job.fmt,
                       batch_tokens=job.batch_tokens, haystack=pk.haystack, share=job.share)


def check_prompts(spec: EvalSpec, tokenizer: Any, original_length: int, target_length: int) -> None:
    """Refuse, before any work, a shortest length that cannot hold the passkey prompt with this tokenizer."""
    pk = spec.passkey
    assert pk is not None
    shortest = min(grid_lengths(pk, original_length, target_length))
    hay = TextHaystack.load(pk.haystack, max_words=4 * shortest + 1000) if pk.haystack else None
    fmt = PromptFormat(spec.inference.chat_template, spec.inference.system_prompt)
    shortest_prompt("eval.passkey", lambda: build_grid(tokenizer, [shortest], [0.0], 1, spec.seed, fmt, hay))


def _plot(results: dict[str, dict[str, Any]], original: int, path: Path) -> Path:
    from longforge.report.plots import passkey_heatmaps

    return passkey_heatmaps(results, original, path)


EVAL_TASK = EvalTask(
    name="passkey", title="Passkey retrieval", terminal="passkey accuracy", run=run_task,
    summary=lambda res: res["summary"],
    columns=lambda evals, original: grid_columns("passkey", evals, original, ("inside", "beyond", "4x-8x", "all")),
    compare=lambda ra, rb: grid_metrics("passkey", "passkey accuracy", ra, rb), plot=_plot,
    check_prompts=check_prompts, by_length=grid_by_length)
