"""RULER's results read back: the report's columns and its RULER section, `eval compare`'s metrics, and the table
`longforge eval` prints."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from longforge.eval.task import Columns, Metric, Results


def columns(evals: dict[str, Results], original: int) -> Columns:
    """The report's columns: the average over tasks and lengths, and the effective length (none when no model ran RULER)."""
    if not any("ruler" in e for e in evals.values()):
        return [], [[] for _ in evals]
    rows = []
    for e in evals.values():
        if "ruler" in e:
            rs = e["ruler"]["summary"]
            eff = rs.get("effective_length")
            rows.append([f"{rs['overall']:.1f}", "-" if eff is None else str(eff)])
        else:
            rows.append(["-"] * 2)
    return ["ruler avg", "ruler effective"], rows


def details(evals: dict[str, Results]) -> Columns | None:
    """RULER scores per task and length, one row per (model, task), plus each model's average row."""
    runs = {k: v["ruler"] for k, v in evals.items() if "ruler" in v}
    if not runs:
        return None
    lengths = sorted({int(L) for r in runs.values() for L in r["summary"]["average"]})
    header = ["model", "task", *[str(L) for L in lengths]]
    rows = []
    for label, r in runs.items():
        s = r["summary"]
        for task, scores in s["per_task"].items():
            rows.append([label, task, *[f"{scores[str(L)]:.1f}" if str(L) in scores else "-" for L in lengths]])
        eff = s.get("effective_length")
        rows.append([label, f"average (effective: {eff or '-'})",
                     *[f"{s['average'][str(L)]:.1f}" if str(L) in s["average"] else "-" for L in lengths]])
    return header, rows


def _mean(d: dict[str, float]) -> float | None:
    return sum(d.values()) / len(d) if d else None


def compare(ra: Results, rb: Results) -> list[Metric]:
    """Each RULER task's mean over lengths, the average at each length, and the effective length, for A and B."""
    sa, sb = ra.get("ruler", {}).get("summary", {}), rb.get("ruler", {}).get("summary", {})
    if not sa and not sb:
        return []
    rows = []
    for task in list(dict.fromkeys([*sa.get("per_task", {}), *sb.get("per_task", {})])):
        ta, tb = sa.get("per_task", {}).get(task, {}), sb.get("per_task", {}).get(task, {})
        rows.append(Metric(f"RULER {task}, mean over lengths", _mean(ta), _mean(tb), "%"))
    avg_a, avg_b = sa.get("average", {}), sb.get("average", {})
    rows += [Metric(f"RULER average @{L}", avg_a.get(L), avg_b.get(L), "%") for L in sorted({*avg_a, *avg_b}, key=int)]
    return rows + [Metric("RULER effective length", sa.get("effective_length"), sb.get("effective_length"), "tokens")]


def table(name: str, summary: dict[str, Any]) -> Table:
    """`longforge eval`'s RULER table: each task's score per length and the average (`name` is already escaped)."""
    lengths = sorted({int(L) for L in summary["average"]})
    title = f"{name}: RULER (effective length {summary.get('effective_length') or '-'}, threshold {summary['threshold']})"
    t = Table(title=title, min_width=min(len(title), 80))  # a table of few lengths would wrap its title line by line
    t.add_column("task")
    for L in lengths:
        t.add_column(str(L), justify="right")
    for task, scores in summary["per_task"].items():
        t.add_row(task, *[f"{scores[str(L)]:.1f}" if str(L) in scores else "-" for L in lengths])
    t.add_row("average", *[f"{summary['average'][str(L)]:.1f}" if str(L) in summary["average"] else "-" for L in lengths])
    if summary.get("left_out"):
        t.caption = f"left out (no file given): {', '.join(summary['left_out'])}"
    return t
