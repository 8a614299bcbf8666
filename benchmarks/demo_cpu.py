"""Benchmark: `longforge demo` from nothing (empty cache, empty run dir); wall time and the demo's targets.

Usage: python benchmarks/demo_cpu.py [--device cpu] [--seed 0] [--record] [--docs]
--record appends the result to benchmarks/RESULTS.md; --docs copies the report figures to docs/demo/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_build import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--docs", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lf-demo-bench-"))
    env = {**os.environ, "LONGFORGE_CACHE": str(work / "cache")}
    cmd = ["longforge", "demo", "--out", str(work / "run"), "--device", args.device, "--seed", str(args.seed)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    wall = time.time() - t0
    print(proc.stdout[-4000:])
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        sys.exit(proc.returncode)
    checks = json.loads((work / "run" / "demo_checks.json").read_text())["checks"]
    stages = {}
    for done in sorted(work.glob("**/DONE.json")):
        rec = json.loads(done.read_text())
        name = str(done.parent.relative_to(work)).replace("cache/", "").split("/", 1)[-1]
        stages[name] = rec["seconds"]
    summary = json.loads((work / "run" / "report" / "summary.json").read_text())
    # Hashes of the trained weights: equal hashes across runs of one seed show the demo is reproducible on a machine.
    weights = {name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for name, f in (
        ("base", next(work.glob("cache/*/base/final/model.safetensors"))),
        ("extended", work / "run" / "train" / "extend" / "final" / "model.safetensors"))}
    result = {"wall_seconds": round(wall, 1), "checks": checks, "stages": stages, "table": summary, "weights_sha256": weights}
    print(json.dumps(result, indent=1))
    if args.docs:
        dest = ROOT / "docs" / "demo"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("passkey.png", "ppl.png", "loss.png"):
            shutil.copy2(work / "run" / "report" / name, dest / name)
        shutil.copy2(work / "run" / "report" / "report.md", dest / "report.md")
    if args.record:
        record(result, " ".join(["python", "benchmarks/demo_cpu.py", *sys.argv[1:]]))
    shutil.rmtree(work, ignore_errors=True)


def record(result: dict, command: str) -> None:
    """Append a section to benchmarks/RESULTS.md."""
    header, rows = result["table"]["header"], result["table"]["rows"]
    lines = [
        f"\n## longforge demo from nothing ({dt.date.today().isoformat()})",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- wall time, everything included (corpus, tokenizer, base pretraining, data, rope, training, eval, report): "
        f"**{result['wall_seconds'] / 60:.1f} min** (target: 10 min)",
        "- stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["stages"].items()),
        "- weights (sha256, first 16): " + ", ".join(f"{k} {v}" for k, v in result["weights_sha256"].items()),
        "",
        "| check | measured | target | |",
        "|---|---|---|---|",
    ]
    for c in result["checks"]:
        val = "-" if c["value"] is None else f"{c['value'] * 100:.0f}%"
        lines.append(f"| {c['check']} | {val} | {c['target']} | {'pass' if c['pass'] else 'MISS'} |")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    path = ROOT / "benchmarks" / "RESULTS.md"
    if not path.exists():
        path.write_text("# Benchmark results\n\nEach section: the command, the machine, the date, and what it measured.\n")
    with path.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
