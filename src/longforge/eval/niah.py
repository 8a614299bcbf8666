"""Needle in a haystack (Fu et al. 2024 / UltraLong): a sentence needle in noise or a user corpus, lengths x depths,
scored by ROUGE-1 F1 between the needle and the answer (Fu et al.'s score)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longforge.config import EvalSpec
from longforge.errors import LongforgeError
from longforge.eval.task import RETRIEVAL_TABLE, EvalTask, TaskRun
from longforge.inference import as_engine
from longforge.eval.grid import (Prompt, depth_values, generate_all, grid_by_length, grid_columns, grid_lengths, grid_metrics,
                                 shortest_prompt, summarize_grid)
from longforge.eval.metrics import rouge1, rouge_tokens
from longforge.eval.prompts import NOISE_SENTENCES, PromptFormat, TextHaystack, depth_of, fit_count, insert_at_depths, noise_sentences, prompt_hash
from longforge.eval.share import SINGLE, Share

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_PREFIX = "The best thing to do in San Francisco is"
MAX_NEW_TOKENS = 50  # Fu et al.


@dataclass(frozen=True)
class Needle:
    """The fact hidden in the haystack, the question that asks for it and the start of the answer."""

    text: str = NEEDLE
    question: str = QUESTION
    answer_prefix: str = ANSWER_PREFIX

    def answer_part(self) -> str:
        """The part of the needle the model must produce after the answer prefix."""
        if self.text.lower().startswith(self.answer_prefix.lower()):
            return self.text[len(self.answer_prefix):].strip()
        return self.text


def haystack_sentences(haystack: TextHaystack | None) -> Callable[[int, int], list[str]]:
    """(n units, offset) -> sentences: noise sentences, or n words of the user's corpus split into sentences."""
    return noise_sentences if haystack is None else haystack.sentences


def niah_parts(sentences: list[str], depth: float, needle: Needle) -> tuple[str, str, int]:
    """(user text, answer prefix, needle sentence index) for a haystack and a depth."""
    parts, where = insert_at_depths(sentences, [needle.text], [depth])
    context = " ".join(parts)
    return f"{context}\n\nQuestion: {needle.question}", f"\nAnswer: {needle.answer_prefix}", where[0]


def build_niah(tokenizer: Any, lengths: list[int], depths: list[float], trials: int, needle: Needle,
               haystack: TextHaystack | None, fmt: PromptFormat, seed: int) -> list[Prompt]:
    """Every prompt of the grid, at most its length in tokens, the needle once at each depth.

    Trial 0 starts the haystack at its beginning (Fu et al.'s single trial); later trials start at seeded
    offsets into the corpus (or the noise cycle), so trials differ.
    """
    units = haystack_sentences(haystack)
    span = len(haystack.words) if haystack is not None else len(NOISE_SENTENCES)
    rng = np.random.default_rng(seed)
    offsets = [0] + [int(rng.integers(0, span)) for _ in range(trials - 1)]
    prompts: list[Prompt] = []
    per_token = 1.0
    for length in sorted(lengths):
        for t, offset in enumerate(offsets):

            def n_tokens(n: int, offset: int = offset) -> int:
                user, prefix, _ = niah_parts(units(n, offset), 0.5, needle)
                return len(fmt.encode(tokenizer, fmt.render(tokenizer, user, prefix)))

            n = fit_count(n_tokens, length, "needle-in-a-haystack prompt", guess=max(1, int(per_token * length)))
            per_token = max(n, 1) / length
            for depth in depths:
                m = n
                while True:  # the depth can change tokenization at the seams by a token or two
                    user, prefix, at = niah_parts(units(m, offset), depth, needle)
                    text = fmt.render(tokenizer, user, prefix)
                    ids = fmt.encode(tokenizer, text)
                    if len(ids) <= length or m == 0:
                        break
                    m -= 1
                if len(ids) > length:
                    raise LongforgeError(f"a needle-in-a-haystack prompt needs {len(ids)} tokens; raise the shortest length above {length}.")
                prompts.append(Prompt(length, ids, text, {
                    "depth": depth, "trial": t, "haystack_offset": offset, "needle_sentence": at,
                    "needle_char_depth": round(depth_of(user[: user.rindex("\n\nQuestion:")], needle.text), 4), "prompt_sha1": prompt_hash(text)}))
    return prompts


def score_answer(needle: Needle, output: str) -> dict[str, Any]:
    """ROUGE-1 of the needle's fact (the needle minus the answer prefix the prompt already gives) against the
    answer's first line, so an answer that says nothing scores 0; exact = the whole fact is in the answer."""
    first = output.strip().split("\n")[0]
    fact = needle.answer_part()
    r = rouge1(fact, first)
    words = " ".join(rouge_tokens(fact))
    exact = bool(words) and words in " ".join(rouge_tokens(first))
    return {"rouge1_f1": r["f1"], "rouge1_recall": r["recall"], "exact": exact, "score": r["f1"]}


def answer_done(text: str) -> bool:
    """The answer is one line: once a line break follows some text, the score can no longer change."""
    stripped = text.lstrip()
    return "\n" in stripped and bool(stripped.split("\n")[0].strip())


@torch.no_grad()
def run_niah(model: Any, tokenizer: Any, lengths: list[int], depths: int, trials: int, seed: int,
             haystack: Path | None = None, needle: Needle = Needle(), batch_size: int = 8, label: str = "niah",
             fmt: PromptFormat = PromptFormat(), batch_tokens: int = 131072,
             max_new_tokens: int = MAX_NEW_TOKENS, share: Share = SINGLE) -> dict[str, Any]:
    """Generate and score the NIAH grid; returns every sample and the summary (mean ROUGE-1 F1 per cell)."""
    engine = as_engine(model)
    lengths = sorted(lengths)
    depth_list = depth_values(depths)
    hay = TextHaystack.load(haystack, max_words=4 * max(lengths) + 1000) if haystack is not None else None
    prompts = build_niah(tokenizer, lengths, depth_list, trials, needle, hay, fmt, seed)
    samples = generate_all(engine, tokenizer, prompts, max_new_tokens, lambda p, out: score_answer(needle, out), label,
                           batch_size, batch_tokens, stop=lambda p, text: answer_done(text), share=share)
    summary = summarize_grid(samples, lengths, depth_list, "rouge1_f1")
    summary["exact"] = float(np.mean([s["exact"] for s in samples]))
    return {"task": "niah", "lengths": lengths, "depths": depth_list, "trials": trials, "seed": seed,
            "needle": needle.text, "question": needle.question, "answer_prefix": needle.answer_prefix,
            "haystack": "noise" if hay is None else hay.describe(), "metric": "rouge1_f1",
            "format": {"chat_template": fmt.chat_template},
            "engine": engine.describe() if hasattr(engine, "describe") else {"path": type(engine).__name__},
            "samples": samples, "summary": summary}


# ---- how the eval stage runs the task and how its results are read (the registry's entry)

def _needle(spec: EvalSpec) -> Needle:
    nh = spec.niah
    assert nh is not None
    return Needle(nh.needle, nh.question, nh.answer_prefix)


def run_task(job: TaskRun) -> dict[str, Any]:
    """The NIAH grid of the eval spec on one model."""
    nh = job.spec.niah
    assert nh is not None
    return run_niah(job.engine, job.tokenizer, grid_lengths(nh, job.original_length, job.target_length), nh.depths,
                    nh.trials, job.spec.seed, haystack=nh.haystack, needle=_needle(job.spec), batch_size=job.batch_size(nh.batch_size),
                    label=f"{job.label} niah", fmt=job.fmt, batch_tokens=job.batch_tokens, max_new_tokens=nh.max_new_tokens,
                    share=job.share)


def check_prompts(spec: EvalSpec, tokenizer: Any, original_length: int, target_length: int) -> None:
    """Refuse, before any work, a shortest length that cannot hold the NIAH prompt with this tokenizer."""
    nh = spec.niah
    assert nh is not None
    shortest = min(grid_lengths(nh, original_length, target_length))
    hay = TextHaystack.load(nh.haystack, max_words=4 * shortest + 1000) if nh.haystack else None
    fmt = PromptFormat(spec.inference.chat_template, spec.inference.system_prompt)
    shortest_prompt("eval.niah", lambda: build_niah(tokenizer, [shortest], [0.5], 1, _needle(spec), hay, fmt, spec.seed))


def _plot(results: dict[str, dict[str, Any]], original: int, path: Path) -> Path:
    from longforge.report.plots import passkey_heatmaps

    return passkey_heatmaps(results, original, path, metric="ROUGE-1 F1", title="Needle in a haystack")


EVAL_TASK = EvalTask(
    name="niah", title="Needle in a haystack", terminal=RETRIEVAL_TABLE, run=run_task,
    summary=lambda res: {k: v for k, v in res["summary"].items() if k != "grid"},
    columns=lambda evals, original: grid_columns("niah", evals, original, ("inside", "beyond", "all")),
    compare=lambda ra, rb: grid_metrics("niah", "NIAH ROUGE-1 F1", ra, rb), plot=_plot,
    check_prompts=check_prompts, by_length=grid_by_length, metric_note="ROUGE-1 F1")
