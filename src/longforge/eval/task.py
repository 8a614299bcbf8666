"""What a benchmark is to longforge: how it runs on one model, and how its results are read back.

One EvalTask per benchmark, listed in eval/registry.py. Its `name` is its section of the eval spec (`eval.<name>`),
its `--tasks` name, its result file `<name>.json` and its plot `<name>.png`. The eval stage runs it (`run`) and keeps
`summary` of the result in summary.json; `longforge eval` prints `by_length`/`table`; the report shows `columns`,
`details` and `plot`; `eval compare` lists `compare`'s metrics and the same plot.

A model's results, as the readers get them: {"summary": summary.json, "<name>": <name>.json for each file there}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longforge.config import EvalSpec
from longforge.eval.prompts import PromptFormat
from longforge.eval.share import SINGLE, Share

# Batch limits when the spec gives none: a CPU gains little from long batches; a GPU is filled by its memory.
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 8, 256
# The terminal table of `longforge report` that NIAH and RULER share.
RETRIEVAL_TABLE = "needle in a haystack (ROUGE-1 F1) and RULER"
Results = dict[str, Any]  # one model's results: {"summary": ..., "<task>": ...}
Columns = tuple[list[str], list[list[str]]]  # a header and one row of cells per model


@dataclass(frozen=True)
class TaskRun:
    """What a task runs with: the model's generation engine and tokenizer, the eval spec, the stage's lengths, and
    this process's share of the work under torchrun."""

    engine: Any
    tokenizer: Any
    spec: EvalSpec
    original_length: int
    target_length: int
    label: str
    share: Share = SINGLE

    @property
    def fmt(self) -> PromptFormat:
        """How prompts reach the model (plain, or the chat template)."""
        return PromptFormat(self.spec.inference.chat_template, self.spec.inference.system_prompt)

    @property
    def batch_tokens(self) -> int:
        """Prompt tokens one batch holds at most: the spec's, or what the engine's device holds (CPU: 131072)."""
        given = self.spec.inference.batch_tokens
        if given is not None:
            return given
        from longforge.inference.engine import CPU_BATCH_TOKENS

        budget = getattr(self.engine, "batch_tokens_budget", None)
        return budget() if callable(budget) else CPU_BATCH_TOKENS

    def batch_size(self, given: int | None) -> int:
        """Prompts one batch holds at most: the task's setting, or 8 on a CPU and 256 on a GPU (tokens decide)."""
        if given is not None:
            return given
        device = getattr(self.engine, "device", None)
        return GPU_BATCH_SIZE if getattr(device, "type", "cpu") == "cuda" else CPU_BATCH_SIZE


@dataclass(frozen=True)
class Metric:
    """One row of `eval compare`: a metric of results A and B, its unit, and which way is better."""

    metric: str
    a: float | None
    b: float | None
    unit: str
    better: str = "higher"

    def row(self) -> dict[str, Any]:
        """The row as compare.json records it, with B - A."""
        delta = None if self.a is None or self.b is None else self.b - self.a
        return {"metric": self.metric, "a": self.a, "b": self.b, "delta": delta, "unit": self.unit, "better": self.better}


@dataclass(frozen=True)
class EvalTask:
    """One benchmark: how it runs and how its results are read (see the module's docstring)."""

    name: str
    title: str  # the report's section and plot heading
    terminal: str  # the title of the terminal table (`longforge report`) that holds its columns
    run: Callable[[TaskRun], dict[str, Any]]  # the whole result, written as <name>.json
    summary: Callable[[dict[str, Any]], Any]  # what summary.json keeps of the result
    columns: Callable[[dict[str, Results], int], Columns]  # the report's before/after columns (models by label)
    compare: Callable[[Results, Results], list[Metric]]  # A and B's metrics for `eval compare`
    plot: Callable[[dict[str, dict[str, Any]], int, Path], Path]  # results by label, original window, file
    check_inputs: Callable[[EvalSpec], None] | None = None  # before any work: the data it needs exists
    check_prompts: Callable[[EvalSpec, Any, int, int], None] | None = None  # (spec, tokenizer, original, target)
    by_length: Callable[[Any], dict[str, str]] | None = None  # `longforge eval`'s cells by length, from the summary
    metric_note: str = ""  # what its by-length cells measure, when not plain accuracy
    table: Callable[[str, Any], Any] | None = None  # `longforge eval`'s own table (label, summary entry)
    details: Callable[[dict[str, Results]], Columns | None] | None = None  # a report section of its own

    def section(self, spec: EvalSpec) -> Any:
        """The task's settings in the eval spec, or None when it does not run."""
        return getattr(spec, self.name)
