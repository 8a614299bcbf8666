"""RULER's scoring: its metrics per task, when an answer is complete, the summary and the effective length."""

from __future__ import annotations

from typing import Any

import numpy as np

from longforge.eval.metrics import all_found, string_match_all, string_match_part
from longforge.eval.ruler.tasks import TASKS

THRESHOLD = 85.6  # Llama-2-7B's RULER average at 4K: the bar for "effective length"


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score(task: str, prediction: str, answers: list[str]) -> float:
    """RULER's metric for the task, in [0, 1]."""
    return METRICS[TASKS[task].metric](prediction, answers)


def answer_done(task: str, text: str, answers: list[str]) -> bool:
    """True once more tokens cannot change the score: every reference found (any one, for QA)."""
    if TASKS[task].metric == "string_match_part":
        return any(a.lower() in text.lower() for a in answers)
    return all_found(text, answers)


def effective_length(average: dict[int, float], threshold: float = THRESHOLD) -> int | None:
    """Longest tested length whose average, and every shorter one's, beats the threshold (None if the shortest fails)."""
    best = None
    for length in sorted(average):
        if average[length] > threshold:
            best = length
        else:
            break
    return best


def summarize(samples: list[dict[str, Any]], tasks: list[str], lengths: list[int], threshold: float,
              skipped: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Per-task scores per length (0-100), their average per length, and the effective length.

    A length where some task could not fit is averaged over the tasks that ran and marked incomplete;
    the effective length is read off the complete lengths only.
    """
    skipped = skipped or {}
    per_task: dict[str, dict[str, float]] = {}
    for t in tasks:
        per_task[t] = {}
        for L in lengths:
            vals = [s["score"] for s in samples if s["task"] == t and s["length"] == L]
            if vals:
                per_task[t][str(L)] = 100 * float(np.mean(vals))
    average: dict[str, float] = {}
    complete: dict[str, bool] = {}
    for L in lengths:
        ran = [per_task[t][str(L)] for t in tasks if str(L) in per_task[t]]
        if ran:
            average[str(L)] = float(np.mean(ran))
            complete[str(L)] = len(ran) == len(tasks)
    eff = effective_length({int(k): v for k, v in average.items() if complete[k]}, threshold)
    return {"per_task": per_task, "average": average, "complete": complete, "skipped": skipped,
            "effective_length": eff, "threshold": threshold, "tasks_averaged": tasks,
            "overall": float(np.mean(list(average.values()))) if average else float("nan")}
