"""Benchmark: how long building RULER's prompts takes on the CPU, per task, and a hash of every prompt built.

The prompts are what `longforge eval --tasks ruler` answers; on a GPU the next task's prompts are built on a thread
while the current one is answered, so building time hides behind answering only while it is shorter. The hash says
whether two versions of the code build the same prompts (same tokenizer, lengths, samples and seed).

Usage:  PYTHONPATH=$PWD/src python benchmarks/ruler_build_cpu.py --tokenizer .smol/tok --out /tmp/ruler_build.json
(.smol/tok: SmolLM2's tokenizer files, `../shared/REALMODEL.md`; any local tokenizer folder works.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from longforge.eval.prompts import PromptFormat  # noqa: E402
from longforge.eval.ruler.generators import Resources  # noqa: E402
from longforge.eval.ruler.run import build_task  # noqa: E402
from ruler_real_gpu import SEED, SELF_CONTAINED  # noqa: E402  (the real-model benchmark's tasks and seed)


def main() -> None:
    """Command line: see the module's docstring."""
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="A local tokenizer folder.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", default=",".join(SELF_CONTAINED))
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--chat-template", action="store_true", help="Render prompts in the tokenizer's chat template.")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)  # a local folder; its files are read, no code is run
    fmt = PromptFormat(chat_template=args.chat_template)
    lengths = [int(x) for x in args.lengths.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv), "commit": commit,
              "cores": os.cpu_count(), "lengths": lengths, "samples": args.samples, "tasks": {}}
    total = 0.0
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        prompts, skipped = build_task(task, tok, lengths, args.samples, args.seed, Resources(), fmt)
        took = time.perf_counter() - t0
        total += took
        digest = hashlib.sha1(json.dumps([(p.length, p.ids, p.text) for p in prompts]).encode()).hexdigest()[:16]
        result["tasks"][task] = {"seconds": round(took, 2), "prompts": len(prompts), "sha1": digest, "skipped": skipped}
        print(f"{task}: {len(prompts)} prompts in {took:.1f} s (sha1 {digest})", flush=True)
    result["seconds"] = round(total, 2)
    print(f"all: {total:.1f} s on {os.cpu_count()} cores", flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
