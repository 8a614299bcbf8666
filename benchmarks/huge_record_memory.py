"""Benchmark: `longforge data build`'s peak memory on a corpus with one huge valid JSONL record, against the same corpus
without it.

Usage: python benchmarks/huge_record_memory.py [--record-mb 20] [--docs 2000] [--work /tmp/lf-huge] [--record]

1. Makes a text pool from this machine's Python standard library (code, docstrings) and trains a 4096-token
   byte-level BPE (the demo's tokenizer) on its first 4 MB.
2. Writes two JSONL corpora: --docs documents of about 4 KB each, and the same with one record of --record-mb MB
   of the pool in the middle.
3. Builds each with `python -m longforge data build` (plan none, seq_len 4096) in a fresh process and reads that
   process's peak RSS from the kernel (ru_maxrss of the waited-for child, measured in a fresh parent each time).
--record appends the results to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_build import _stdlib_text, machine  # noqa: E402
GIB = 1 << 30
# Runs the command given and prints the peak RSS (KiB) of it, the only child this fresh process waits for.
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def stdlib_text(limit: int) -> str:
    """At least `limit` characters: the standard library's .py/.txt/.rst files, repeated when they hold fewer."""
    text = _stdlib_text(limit)
    return (text * (limit // max(len(text), 1) + 1))[:limit]


def write_corpora(work: Path, pool: str, docs: int, record_chars: int) -> tuple[Path, Path]:
    """small.jsonl (docs of ~4 KB) and huge.jsonl (the same, one record of record_chars in the middle)."""
    small, huge = work / "small.jsonl", work / "huge.jsonl"
    with small.open("w") as a, huge.open("w") as b:
        for i in range(docs):
            start = (i * 4099) % (len(pool) - 4096)
            line = json.dumps({"text": pool[start : start + 4096]}) + "\n"
            a.write(line)
            b.write(line)
            if i == docs // 2:
                b.write(json.dumps({"text": pool[:record_chars]}) + "\n")
    return small, huge


def peak_build(corpus: Path, tokenizer: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of `longforge data build` on a corpus, in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "longforge", "data", "build", "--source", str(corpus), "--tokenizer", str(tokenizer),
           "--seq-len", "4096", "--plan", "none", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LONGFORGE_QUIET": "1"}
    t0 = dt.datetime.now()
    res = subprocess.run([sys.executable, "-c", PEAK, *cmd], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"data build failed:\n{res.stdout}\n{res.stderr}")
    seconds = (dt.datetime.now() - t0).total_seconds()
    return int(res.stdout.strip().splitlines()[-1]) * 1024 / GIB, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record-mb", type=float, default=20.0)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lf-huge"))
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from longforge.demo.tokenizer import train_tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    record_chars = int(args.record_mb * 1e6)
    pool = stdlib_text(record_chars)
    tok = args.work / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        chunks = [pool[i : i + 4096] for i in range(0, 4 << 20, 4096)]
        train_tokenizer(chunks, 4096, tok, model_max_length=4096)
    small, huge = write_corpora(args.work, pool, args.docs, record_chars)
    del pool
    base, base_s = peak_build(small, tok, args.work / "out-small")
    with_huge, huge_s = peak_build(huge, tok, args.work / "out-huge")
    lines = [
        f"- command: `python benchmarks/huge_record_memory.py --record-mb {args.record_mb:g} --docs {args.docs}`",
        f"- machine: {machine()}",
        f"- corpus: {args.docs:,} JSONL records of 4 KB ({small.stat().st_size / 1e6:.1f} MB), and the same with one record of "
        f"{args.record_mb:g} MB of standard-library text ({huge.stat().st_size / 1e6:.1f} MB); tokenizer: 4096-token byte-level BPE",
        f"- peak RSS of `longforge data build` (plan none, seq_len 4096), kernel ru_maxrss: without the record **{base:.2f} GiB** "
        f"({base_s:.1f} s), with it **{with_huge:.2f} GiB** ({huge_s:.1f} s)",
    ]
    print("\n".join(lines))
    if args.record:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as fh:
            fh.write(f"\n## data build memory with a {args.record_mb:g} MB record ({dt.date.today().isoformat()})\n")
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
