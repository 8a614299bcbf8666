"""Before/after comparison of two evaluation results: a table of every shared metric and side-by-side plots.

Each side is either an eval output folder (it holds summary.json, as written by `longforge eval` or by a
run's eval stage) or a run directory, which stands for its eval/final folder (or its only eval folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longforge.errors import LongforgeError
from longforge.eval.registry import EVAL_TASKS, load_results
from longforge.files import atomic_write_text, writing


def resolve(path: Path) -> Path:
    """The eval folder a path stands for: itself, or a run directory's eval/final (or its only eval/<label>)."""
    path = Path(path)
    if (path / "summary.json").is_file():
        return path
    evals = sorted(p for p in (path / "eval").glob("*") if (p / "summary.json").is_file()) if (path / "eval").is_dir() else []
    if not path.exists():
        raise LongforgeError(f"{path} does not exist; pass an eval output folder or a run directory.")
    if not evals:
        raise LongforgeError(f"{path} has no evaluation results (summary.json, or eval/<model>/summary.json); run `longforge eval` first.")
    final = [p for p in evals if p.name == "final"]
    if final:
        return final[0]
    if len(evals) == 1:
        return evals[0]
    names = ", ".join(str(p) for p in evals)
    raise LongforgeError(f"{path} holds several results ({names}) and none is 'final'; pass one of those folders.")


def labels_for(a: Path, b: Path, given: tuple[Any, Any] = (None, None)) -> tuple[str, str]:
    """Short distinct names for the two sides: the labels their evaluations were given, else folder names, else
    run/folder, else A and B."""
    ga, gb = (str(g).strip() if isinstance(g, str) else "" for g in given)
    if ga and gb and ga != gb:
        return ga, gb
    if a.name != b.name:
        return a.name, b.name
    la, lb = f"{a.parent.parent.name}/{a.name}", f"{b.parent.parent.name}/{b.name}"
    return (la, lb) if la != lb else ("A", "B")


def metric_rows(ra: dict[str, Any], rb: dict[str, Any]) -> list[dict[str, Any]]:
    """(metric, A, B, B - A) for every metric either side has, task by task; higher is better except perplexity."""
    return [m.row() for task in EVAL_TASKS.values() for m in task.compare(ra, rb)]


def fmt(x: float | None, unit: str) -> str:
    """A table cell."""
    if x is None:
        return "-"
    if unit == "tokens":
        return f"{x:.0f}"
    return f"{x:.1f}" if unit == "%" else f"{x:.2f}"


def compare(a: Path, b: Path, out: Path) -> dict[str, Any]:
    """Write compare.json, compare.md and the plots for results A (before) and B (after); returns them."""
    fa, fb = resolve(a), resolve(b)
    ra, rb = load_results(fa), load_results(fb)
    la, lb = labels_for(fa, fb, (ra["summary"].get("label"), rb["summary"].get("label")))
    out = Path(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    rows = metric_rows(ra, rb)
    original = int(rb["summary"].get("original_length") or ra["summary"].get("original_length") or 0)
    plots: dict[str, str] = {}
    for task in EVAL_TASKS.values():
        if task.name in ra and task.name in rb:
            plots[task.name] = str(task.plot({la: ra[task.name], lb: rb[task.name]}, original, out / f"{task.name}.png"))
    result = {"a": {"label": la, "path": str(fa)}, "b": {"label": lb, "path": str(fb)}, "rows": rows, "plots": plots}
    atomic_write_text(out / "compare.json", json.dumps(result, indent=1))
    lines = [f"# {la} -> {lb}", "", f"A = {fa}, B = {fb}", "", f"| metric | {la} | {lb} | change |", "|---|---|---|---|"]
    lines += [f"| {r['metric']} | {fmt(r['a'], r['unit'])} | {fmt(r['b'], r['unit'])} | {_delta(r)} |" for r in rows]
    lines += [""] + [f"![{k}]({Path(v).name})" for k, v in plots.items()]
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    return result


def _delta(r: dict[str, Any]) -> str:
    d = r["delta"]
    if d is None:
        return "-"
    return f"{d:+.0f}" if r["unit"] == "tokens" else (f"{d:+.1f}" if r["unit"] == "%" else f"{d:+.2f}")
