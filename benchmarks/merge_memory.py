"""Benchmark: peak memory of `longforge merge` against the obvious merge (load both models, average, save).

Usage: python benchmarks/merge_memory.py [--hidden 1024 --layers 16] [--record]
Both merges run in their own process; peak resident memory is the child's ru_maxrss.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NAIVE = """
import sys, torch
from transformers import AutoModelForCausalLM
a = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
b = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
sb = b.state_dict()
with torch.no_grad():
    for k, v in a.state_dict().items():
        v.mul_(0.5).add_(sb[k], alpha=0.5)
a.save_pretrained(sys.argv[3])
"""


def child_peak(cmd: list[str]) -> tuple[float, float]:
    """Run a command under /usr/bin/time -v; its wall time and peak resident memory (GiB).

    (ru_maxrss of children would count the parent's pages copied at fork, so the child measures itself.)
    """
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], check=True, capture_output=True, text=True,
                          env={**os.environ, "LONGFORGE_QUIET": "1"})
    kib = next(int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident set size" in line)
    return time.time() - t0, kib / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path(tempfile.mkdtemp(prefix="lf-merge-"))
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 4, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, vocab_size=32000)
    for i in (1, 2):
        torch.manual_seed(i)
        LlamaForCausalLM(cfg).save_pretrained(work / f"m{i}")
    size = sum(f.stat().st_size for f in (work / "m1").glob("*.safetensors")) / 2**30
    biggest = max(p.numel() for p in LlamaForCausalLM(cfg).parameters()) * 4 / 2**30
    lf_time, lf_peak = child_peak([sys.executable, "-m", "longforge", "merge", str(work / "m1"), str(work / "m2"),
                                   "--out", str(work / "lf")])
    naive_time, naive_peak = child_peak([sys.executable, "-c", NAIVE, str(work / "m1"), str(work / "m2"), str(work / "naive")])
    lines = [
        f"\n## merge memory ({dt.date.today().isoformat()})",
        f"- command: `python benchmarks/merge_memory.py --hidden {args.hidden} --layers {args.layers}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores",
        f"- two fp32 checkpoints of {size:.2f} GiB each; largest tensor {biggest:.3f} GiB",
        f"- `longforge merge`: peak RSS **{lf_peak:.2f} GiB**, {lf_time:.1f} s",
        f"- load both + average + save (transformers), same run: peak RSS **{naive_peak:.2f} GiB**, {naive_time:.1f} s",
    ]
    print("\n".join(lines))
    if args.record:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
