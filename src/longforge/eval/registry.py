"""Every benchmark longforge runs, in the order results are run, shown and compared.

Adding a benchmark: a module that runs it and reads its results (an EvalTask, see eval/task.py), its entry here,
and its section in the eval spec (config.EvalSpec, a field named like the task).
"""

from __future__ import annotations

import json
from pathlib import Path

from longforge.config import EvalSpec
from longforge.eval import niah, passkey, ppl, ruler
from longforge.eval.task import EvalTask, Results

EVAL_TASKS: dict[str, EvalTask] = {t.name: t for t in (passkey.EVAL_TASK, niah.EVAL_TASK, ruler.EVAL_TASK, ppl.EVAL_TASK)}


def enabled(spec: EvalSpec) -> list[EvalTask]:
    """The tasks the spec runs (those whose section is set), in registry order."""
    return [t for t in EVAL_TASKS.values() if t.section(spec) is not None]


def load_results(folder: Path) -> Results:
    """One model's results from an eval folder: summary.json and the result file of every task that ran."""
    out: Results = {"summary": json.loads((folder / "summary.json").read_text())}
    for name in EVAL_TASKS:
        if (folder / f"{name}.json").is_file():
            out[name] = json.loads((folder / f"{name}.json").read_text())
    return out
