"""Build report.md and report.html for a run directory, and the terminal summary table."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import platform
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from longforge import __version__
from longforge.errors import LongforgeError
from longforge.eval.grid import grid_bands
from longforge.eval.registry import EVAL_TASKS, load_results
from longforge.eval.task import EvalTask
from longforge.files import atomic_write_text, read_json, writing
from longforge.report.plots import loss_curves
from longforge.report.verdict import verdict
from longforge.runner import TIMELINE

# A run's own checks (the demo's targets), read into the verdict.
CHECKS = "demo_checks.json"
# A grid task's score inside the original window, beyond it, at 4x-8x of it and over the grid (the demo reads it).
passkey_bands = grid_bands


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def collect(run_dir: Path) -> dict[str, Any]:
    """Gather every result a report shows from a run directory, or from one folder written by `longforge eval`."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").is_file():
        one = load_results(run_dir)
        evals = {str(one["summary"].get("label") or run_dir.name): one}
    else:
        evals = {d.name: load_results(d) for d in sorted((run_dir / "eval").glob("*")) if (d / "summary.json").is_file()}
    if not evals:
        raise LongforgeError(f"{run_dir} has no evaluation results (summary.json, or eval/*/summary.json); pass a run "
                             "directory or a folder written by `longforge eval`, or run the eval stage first.")
    found = [(str(f.parent.relative_to(run_dir)), read_json(f)) for f in run_dir.glob("**/DONE.json")]
    found = [(name, rec) for name, rec in found if isinstance(rec, dict)]  # a damaged marker is a stage not done
    stages = dict(sorted(found, key=lambda item: _stage_order(item[0], item[1])))
    logs = {p.parent.name: p for p in sorted((run_dir / "train").glob("*/log.jsonl"))} if (run_dir / "train").is_dir() else {}
    manifest = _read(run_dir / "data" / "manifest.json") if (run_dir / "data" / "manifest.json").is_file() else None
    # The resolved recipe; runs written before it had its own name kept it as recipe.yaml.
    recipe_file = next((f for f in (run_dir / "resolved_recipe.yaml", run_dir / "recipe.yaml") if f.is_file()), None)
    recipe = recipe_file.read_text() if recipe_file is not None else None
    checks = read_json(run_dir / CHECKS)
    timeline = read_json(run_dir / TIMELINE)
    return {"evals": evals, "stages": stages, "logs": logs, "manifest": manifest, "recipe": recipe,
            "checks": checks.get("checks") if isinstance(checks, dict) else None,
            "timeline": timeline.get("stages", {}) if isinstance(timeline, dict) else {}}


PIPELINE = ("data", "rope", "train", "merge", "eval", "report")


def _stage_order(name: str, rec: dict[str, Any]) -> tuple[int, str]:
    """Pipeline position of a stage folder (data, rope, train/*, eval/*), then finishing time within a kind."""
    head = name.split("/")[0]
    return (PIPELINE.index(head) if head in PIPELINE else len(PIPELINE), str(rec.get("finished", "")))


def _task_columns(info: dict[str, Any]) -> list[tuple[EvalTask, list[str], list[list[str]]]]:
    """Each task's columns of the before/after table (header, one row per model), in registry order."""
    evals = info["evals"]
    original = int(next(iter(evals.values()))["summary"]["original_length"])
    return [(task, *task.columns(evals, original)) for task in EVAL_TASKS.values()]


def summary_rows(info: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the before/after table: the columns of every task that ran (eval/registry.py)."""
    header = ["model"]
    rows = [[label] for label in info["evals"]]
    for _, head, cells in _task_columns(info):
        header += head
        for row, more in zip(rows, cells):
            row += more
    return header, rows


def rich_tables(info: dict[str, Any]) -> list[Table]:
    """The summary for the terminal: one table per group of tasks (EvalTask.terminal), narrow enough for 80 columns."""
    groups: dict[str, list[tuple[EvalTask, list[str], list[list[str]]]]] = {}
    for task, head, cells in _task_columns(info):
        if head:
            groups.setdefault(task.terminal, []).append((task, head, cells))
    tables = []
    for title, parts in groups.items():
        t = Table(title=f"longforge: {title}")
        t.add_column("model", justify="left")
        for task, head, _ in parts:
            for h in head:
                # A table of one task's columns needs not repeat its name in every header.
                t.add_column(h.replace(f"{task.name} ", "") if len(parts) == 1 else h, justify="right")
        for i, label in enumerate(info["evals"]):
            t.add_row(label, *(c for _, _, cells in parts for c in cells[i]))
        tables.append(t)
    return tables


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def build_report(run_dir: Path) -> dict[str, Path]:
    """Write report/report.md, report/report.html and the PNGs; returns their paths."""
    run_dir = Path(run_dir)
    info = collect(run_dir)
    out = run_dir / "report"
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    evals = info["evals"]
    original = int(next(iter(evals.values()))["summary"]["original_length"])
    images: dict[str, Path] = {}
    for task in EVAL_TASKS.values():
        ran = {label: e[task.name] for label, e in evals.items() if task.name in e}
        if ran:
            images[task.title] = task.plot(ran, original, out / f"{task.name}.png")
    if info["logs"]:
        images["Training loss"] = loss_curves(info["logs"], out / "loss.png")
    header, rows = summary_rows(info)
    timing = [[name, f"{rec.get('seconds', 0):.1f}", rec.get("finished", ""), _status(info["timeline"].get(name))]
              for name, rec in info["stages"].items()]
    sections = _sections(info, header, rows, timing)
    md = _markdown(sections, images, info)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", _html(sections, images, info))
    atomic_write_text(out / "summary.json", json.dumps({"header": header, "rows": rows}, indent=1))
    return {"md": out / "report.md", "html": out / "report.html", **{k: v for k, v in images.items()}}


def _status(state: str | None) -> str:
    """How the last `longforge run` met a stage: ran it, or found it done earlier (cached)."""
    return {"ran": "ran", "cached": "cached (done earlier)"}.get(state or "", "-")


def _sections(info: dict[str, Any], header: list[str], rows: list[list[str]], timing: list[list[str]]) -> dict[str, Any]:
    machine = f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}"
    manifest = info["manifest"]
    data_rows = []
    if manifest:
        for name, st in manifest["sources"].items():
            data_rows.append([name, str(st["documents_seen"]), str(st["documents_kept"]), str(st["documents_dropped"]),
                              str(st["documents_repeated"]), str(st["tokens_seen"]), str(st["tokens_written"])])
    return {
        "details": [(t.title, table) for t in EVAL_TASKS.values() if t.details and (table := t.details(info["evals"]))],
        "generated": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "summary": (header, rows),
        "timing": (["stage", "seconds", "finished", "last run"], timing),
        "verdict": verdict(info["evals"], int(next(iter(info["evals"].values()))["summary"]["original_length"]),
                           info["checks"]),
        "data": (["source", "docs seen", "kept", "dropped", "repeated", "tokens seen", "tokens written"], data_rows),
    }


def _markdown(sec: dict[str, Any], images: dict[str, Path], info: dict[str, Any]) -> str:
    parts = [
        "# longforge report",
        f"Generated {sec['generated']} by longforge {__version__} on {sec['machine']}.",
    ]
    if sec["verdict"]:
        items = [ln for ln in sec["verdict"] if ln.startswith("- ")]
        parts += ["## Verdict", *(["\n".join(items)] if items else []), *(ln for ln in sec["verdict"] if not ln.startswith("- "))]
    parts += ["## Before / after", _md_table(*sec["summary"])]
    for title, table in sec["details"]:
        parts += [f"## {title}", _md_table(*table)]
    for title, p in images.items():
        parts += [f"## {title}", f"![{title}]({p.name})"]
    if sec["data"][1]:
        parts += ["## Data", _md_table(*sec["data"])]
    parts += ["## Timings", _md_table(*sec["timing"])]
    if info["recipe"]:
        parts += ["## Recipe", "```yaml", info["recipe"].rstrip(), "```"]
    return "\n\n".join(parts) + "\n"


def _md_bold(line: str) -> str:
    """HTML-escape a line and turn its **bold** markers into <b>."""
    parts = html.escape(line).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _html(sec: dict[str, Any], images: dict[str, Path], info: dict[str, Any]) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             "pre{background:#f7f7f7;padding:1em;overflow:auto}")
    body = [f"<h1>longforge report</h1><p>Generated {html.escape(sec['generated'])} by longforge {__version__} "
            f"on {html.escape(sec['machine'])}.</p>"]
    if sec["verdict"]:
        items = [ln[2:] for ln in sec["verdict"] if ln.startswith("- ")]
        prose = [ln for ln in sec["verdict"] if not ln.startswith("- ")]
        body.append("<h2>Verdict</h2>" + ("<ul>" + "".join(f"<li>{_md_bold(ln)}</li>" for ln in items) + "</ul>" if items else "")
                    + "".join(f"<p>{html.escape(ln)}</p>" for ln in prose))
    body += ["<h2>Before / after</h2>", _html_table(*sec["summary"])]
    for title, table in sec["details"]:
        body += [f"<h2>{html.escape(title)}</h2>", _html_table(*table)]
    for title, p in images.items():
        b64 = base64.b64encode(p.read_bytes()).decode()
        body.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>")
    if sec["data"][1]:
        body += ["<h2>Data</h2>", _html_table(*sec["data"])]
    body += ["<h2>Timings</h2>", _html_table(*sec["timing"])]
    if info["recipe"]:
        body.append(f"<h2>Recipe</h2><pre>{html.escape(info['recipe'])}</pre>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>longforge report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
