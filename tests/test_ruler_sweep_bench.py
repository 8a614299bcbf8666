"""benchmarks/ruler_sweep_gpu.py on the CPU (its --smoke mode): one process and two (gloo) run the same prompts, every
row generates exactly its task's answer budget, and both produce the same tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ruler_sweep_gpu.py"


def _run(cmd: list[str], out: Path) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_sweep_benchmark_runs_on_one_and_two_processes(tmp_path: Path, tokenizer_dir: Path) -> None:
    args = ["--smoke", "--tokenizer", str(tokenizer_dir), "--samples", "1"]
    one = _run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "one.json")], tmp_path / "one.json")
    # --standalone: a free rendezvous port (other torchrun jobs on this machine may hold the default one).
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
                *args, "--out", str(tmp_path / "two.json")], tmp_path / "two.json")
    assert one["processes"] == 1 and two["processes"] == 2
    assert set(one["sweep"]) == set(two["sweep"]) and one["sweep"]
    for task, got in one["sweep"].items():
        assert got["forced_length_held"] and two["sweep"][task]["forced_length_held"]
        assert got["tokens_sha1"] == two["sweep"][task]["tokens_sha1"], task  # every sample as one process's
        for L, row in got["lengths"].items():
            assert row["model_s"] > 0 and row["decode_steps"] == row["batches"] * (got["new_tokens_each"] - 1)
            ranks = two["sweep"][task]["lengths"][L]["per_process"]
            assert sum(r["prompts"] for r in ranks) == row["prompts"]
    built = sum(v["prompts"] for t in one["build"]["per_task"].values() for v in t.values())
    assert one["totals"]["prompts"] == two["totals"]["prompts"] == built > 0
    assert one["distinct_decode_shapes"] >= 1 and one["hf"]["per_length"]  # model.generate ran beside the engine
    assert "hf: model.generate runs in the one-process command only" in two["skipped"]
    merged = tmp_path / "merged.json"
    subprocess.run([sys.executable, str(SCRIPT), "--merge", str(tmp_path / "one.json"), str(tmp_path / "one.json"),
                    "--out", str(merged)], check=True, capture_output=True, timeout=120)
    assert json.loads(merged.read_text())["totals"]["prompts"] == 2 * built
