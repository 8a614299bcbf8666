"""Build report.md and report.html for a run directory, and the terminal summary table."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from longforge import __version__
from longforge.errors import LongforgeError
from longforge.files import atomic_write_text, read_json, writing
from longforge.report.plots import loss_curves, passkey_heatmaps, ppl_curves, ruler_curves
from longforge.report.verdict import verdict
from longforge.runner import TIMELINE

TASKS = ("passkey", "niah", "ruler", "ppl")
# A run's own checks (the demo's targets), read into the verdict.
CHECKS = "demo_checks.json"


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def passkey_bands(res: dict[str, Any], original: int) -> dict[str, float | None]:
    """Accuracy inside the original window, beyond it, at 4x-8x of it, and over the whole grid."""
    per = {int(k): v for k, v in res["summary"]["per_length"].items()}
    return {
        "inside": _mean([v for L, v in per.items() if L <= original]),
        "beyond": _mean([v for L, v in per.items() if L > original]),
        "4x-8x": _mean([v for L, v in per.items() if 4 * original <= L <= 8 * original]),
        "all": res["summary"]["accuracy"],
    }


def _eval_folder(d: Path) -> dict[str, Any]:
    """One model's results: summary.json and each task's JSON that exists."""
    out = {"summary": _read(d / "summary.json")}
    for task in TASKS:
        if (d / f"{task}.json").is_file():
            out[task] = _read(d / f"{task}.json")
    return out


def collect(run_dir: Path) -> dict[str, Any]:
    """Gather every result a report shows from a run directory, or from one folder written by `longforge eval`."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").is_file():
        one = _eval_folder(run_dir)
        evals = {str(one["summary"].get("label") or run_dir.name): one}
    else:
        evals = {d.name: _eval_folder(d) for d in sorted((run_dir / "eval").glob("*")) if (d / "summary.json").is_file()}
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


def summary_rows(info: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the before/after table (passkey bands, NIAH, RULER, perplexity: whichever ran)."""
    evals = info["evals"]
    first = next(iter(evals.values()))["summary"]
    original = int(first["original_length"])
    ppl_lengths: list[str] = []
    for e in evals.values():
        for k in (e["summary"].get("ppl") or {}):
            if k not in ppl_lengths:
                ppl_lengths.append(k)
    ppl_lengths.sort(key=int)
    has = {t: any(t in e for e in evals.values()) for t in TASKS}
    header = ["model"]
    if has["passkey"]:
        header += [f"passkey <= {original}", f"passkey > {original}", "passkey 4x-8x", "passkey all"]
    if has["niah"]:
        header += [f"niah <= {original}", f"niah > {original}", "niah all"]
    if has["ruler"]:
        header += ["ruler avg", "ruler effective"]
    header += [f"ppl@{k}" for k in ppl_lengths]
    rows = []
    for label, e in evals.items():
        row = [label]
        if has["passkey"]:
            if "passkey" in e:
                b = passkey_bands(e["passkey"], original)
                row += [_pct(b["inside"]), _pct(b["beyond"]), _pct(b["4x-8x"]), _pct(b["all"])]
            else:
                row += ["-"] * 4
        if has["niah"]:
            if "niah" in e:
                b = passkey_bands(e["niah"], original)
                row += [_pct(b["inside"]), _pct(b["beyond"]), _pct(b["all"])]
            else:
                row += ["-"] * 3
        if has["ruler"]:
            if "ruler" in e:
                rs = e["ruler"]["summary"]
                eff = rs.get("effective_length")
                row += [f"{rs['overall']:.1f}", "-" if eff is None else str(eff)]
            else:
                row += ["-"] * 2
        p = e["summary"].get("ppl") or {}
        row += [f"{p[k]:.2f}" if p.get(k) else "-" for k in ppl_lengths]
        rows.append(row)
    return header, rows


def ruler_table(info: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """RULER scores per task and length, one row per (model, task), plus each model's average row."""
    evals = {k: v["ruler"] for k, v in info["evals"].items() if "ruler" in v}
    if not evals:
        return None
    lengths = sorted({int(L) for r in evals.values() for L in r["summary"]["average"]})
    header = ["model", "task", *[str(L) for L in lengths]]
    rows = []
    for label, r in evals.items():
        s = r["summary"]
        for task, scores in s["per_task"].items():
            rows.append([label, task, *[f"{scores[str(L)]:.1f}" if str(L) in scores else "-" for L in lengths]])
        eff = s.get("effective_length")
        rows.append([label, f"average (effective: {eff or '-'})",
                     *[f"{s['average'][str(L)]:.1f}" if str(L) in s["average"] else "-" for L in lengths]])
    return header, rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def rich_tables(info: dict[str, Any]) -> list[Table]:
    """The summary for the terminal: retrieval (passkey/NIAH/RULER) and perplexity tables, narrow enough for 80 columns."""
    header, rows = summary_rows(info)
    groups = {"passkey accuracy": [i for i, h in enumerate(header) if h.startswith("passkey")],
              "needle in a haystack (ROUGE-1 F1) and RULER": [i for i, h in enumerate(header) if h.startswith(("niah", "ruler"))],
              "perplexity by context length": [i for i, h in enumerate(header) if h.startswith("ppl@")]}
    tables = []
    for title, cols in groups.items():
        if not cols:
            continue
        t = Table(title=f"longforge: {title}")
        for i in [0, *cols]:
            t.add_column(header[i].replace("passkey ", ""), justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*(r[i] for i in [0, *cols]))
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
    pk = {k: v["passkey"] for k, v in evals.items() if "passkey" in v}
    if pk:
        images["Passkey retrieval"] = passkey_heatmaps(pk, original, out / "passkey.png")
    nh = {k: v["niah"] for k, v in evals.items() if "niah" in v}
    if nh:
        images["Needle in a haystack"] = passkey_heatmaps(nh, original, out / "niah.png", metric="ROUGE-1 F1",
                                                          title="Needle in a haystack")
    ru = {k: v["ruler"] for k, v in evals.items() if "ruler" in v}
    if ru:
        images["RULER"] = ruler_curves(ru, original, out / "ruler.png")
    pp = {k: v["ppl"] for k, v in evals.items() if "ppl" in v}
    if pp:
        images["Perplexity against length"] = ppl_curves(pp, original, out / "ppl.png")
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
        "ruler": ruler_table(info),
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
    if sec["ruler"]:
        parts += ["## RULER", _md_table(*sec["ruler"])]
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
    if sec["ruler"]:
        body += ["<h2>RULER</h2>", _html_table(*sec["ruler"])]
    for title, p in images.items():
        b64 = base64.b64encode(p.read_bytes()).decode()
        body.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>")
    if sec["data"][1]:
        body += ["<h2>Data</h2>", _html_table(*sec["data"])]
    body += ["<h2>Timings</h2>", _html_table(*sec["timing"])]
    if info["recipe"]:
        body.append(f"<h2>Recipe</h2><pre>{html.escape(info['recipe'])}</pre>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>longforge report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
