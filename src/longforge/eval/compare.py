"""Before/after comparison of two evaluation results: a table of every shared metric and side-by-side plots.

Each side is either an eval output folder (it holds summary.json, as written by `longforge eval` or by a
run's eval stage) or a run directory, which stands for its eval/final folder (or its only eval folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longforge.errors import LongforgeError
from longforge.files import atomic_write_text, writing

TASKS = ("passkey", "niah", "ruler", "ppl")


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


def load(folder: Path) -> dict[str, Any]:
    """summary.json and every task JSON of an eval folder."""
    out: dict[str, Any] = {"summary": json.loads((folder / "summary.json").read_text())}
    for t in TASKS:
        if (folder / f"{t}.json").is_file():
            out[t] = json.loads((folder / f"{t}.json").read_text())
    return out


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
    """(metric, A, B, B - A) for every metric either side has; higher is better except perplexity."""
    rows: list[dict[str, Any]] = []

    def add(metric: str, a: float | None, b: float | None, unit: str, better: str = "higher") -> None:
        rows.append({"metric": metric, "a": a, "b": b, "delta": None if a is None or b is None else b - a,
                     "unit": unit, "better": better})

    for task, name in (("passkey", "passkey accuracy"), ("niah", "NIAH ROUGE-1 F1")):
        pa, pb = ra.get(task, {}).get("summary", {}), rb.get(task, {}).get("summary", {})
        if not pa and not pb:
            continue
        per_a, per_b = pa.get("per_length", {}), pb.get("per_length", {})
        for L in sorted({*per_a, *per_b}, key=int):
            add(f"{name} @{L}", _x100(per_a.get(L)), _x100(per_b.get(L)), "%")
        add(f"{name}, all", _x100(pa.get("accuracy")), _x100(pb.get("accuracy")), "%")
    sa, sb = ra.get("ruler", {}).get("summary", {}), rb.get("ruler", {}).get("summary", {})
    if sa or sb:
        for task in list(dict.fromkeys([*sa.get("per_task", {}), *sb.get("per_task", {})])):
            ta, tb = sa.get("per_task", {}).get(task, {}), sb.get("per_task", {}).get(task, {})
            add(f"RULER {task}, mean over lengths", _mean(ta), _mean(tb), "%")
        avg_a, avg_b = sa.get("average", {}), sb.get("average", {})
        for L in sorted({*avg_a, *avg_b}, key=int):
            add(f"RULER average @{L}", avg_a.get(L), avg_b.get(L), "%")
        add("RULER effective length", sa.get("effective_length"), sb.get("effective_length"), "tokens")
    qa, qb = ra["summary"].get("ppl") or {}, rb["summary"].get("ppl") or {}
    for L in sorted({*qa, *qb}, key=int):
        add(f"perplexity @{L}", qa.get(L), qb.get(L), "", better="lower")
    return rows


def _x100(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _mean(d: dict[str, float]) -> float | None:
    return sum(d.values()) / len(d) if d else None


def fmt(x: float | None, unit: str) -> str:
    """A table cell."""
    if x is None:
        return "-"
    if unit == "tokens":
        return f"{x:.0f}"
    return f"{x:.1f}" if unit == "%" else f"{x:.2f}"


def compare(a: Path, b: Path, out: Path) -> dict[str, Any]:
    """Write compare.json, compare.md and the plots for results A (before) and B (after); returns them."""
    from longforge.report.plots import passkey_heatmaps, ppl_curves, ruler_curves

    fa, fb = resolve(a), resolve(b)
    ra, rb = load(fa), load(fb)
    la, lb = labels_for(fa, fb, (ra["summary"].get("label"), rb["summary"].get("label")))
    out = Path(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    rows = metric_rows(ra, rb)
    original = int(rb["summary"].get("original_length") or ra["summary"].get("original_length") or 0)
    plots: dict[str, str] = {}
    both = {t: {la: ra[t], lb: rb[t]} for t in TASKS if t in ra and t in rb}
    if "passkey" in both:
        plots["passkey"] = str(passkey_heatmaps(both["passkey"], original, out / "passkey.png"))
    if "niah" in both:
        plots["niah"] = str(passkey_heatmaps(both["niah"], original, out / "niah.png", metric="ROUGE-1 F1",
                                             title="Needle in a haystack"))
    if "ruler" in both:
        plots["ruler"] = str(ruler_curves(both["ruler"], original, out / "ruler.png"))
    if "ppl" in both:
        plots["ppl"] = str(ppl_curves(both["ppl"], original, out / "ppl.png"))
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
