"""`longforge eval` in one process against `torchrun --nproc-per-node 2`, on CPU, on the same 320 passkey prompts.

Issue 18 measured the old behaviour (evaluation on rank 0, the other process waiting): 2 processes took 1.7x the
time of one. Now each process generates a share of the batches. The script builds a tokenizer and a small Llama
(4 layers, hidden 256, window 2048, random weights), then times the whole command (start, model load, prompts,
generation, writing) and reads the evaluation's own time from summary.json, for:

  - one process on one thread, and on two (all the machine's cores);
  - torchrun with 2 processes of one thread each;
  - with --before SRC (a `src` folder of an earlier longforge), torchrun with 2 processes on that code.

Every configuration must write the same passkey.json (checked). A 2-core machine bounds the speed-up at 2x. The
configurations run in turn, `--repeat` rounds; the table gives each one's best round (the machine may be shared) and
every round's evaluation time.

  python benchmarks/eval_parallel_cpu.py --out /tmp/evalpar [--before /tmp/before/src] [--repeat 3]  # ~3 min a round
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WORDS = "alpha beta gamma delta river stone cloud green blue yellow grass sky sun pass key remember what is the".split()
LENGTHS = "256,384,512,768,1024,1280,1536,2048"  # 8 lengths x 10 depths x 4 trials = 320 prompts


def build(work: Path) -> Path:
    """A tokenizer and a 4-layer Llama with random weights in work/model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longforge.demo.tokenizer import train_tokenizer
    from longforge.eval.passkey import FILLER, NEEDLE, QUESTION

    model = work / "model"
    if (model / "config.json").is_file():
        return model
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(50)]
    texts += [" ".join(FILLER) + " " + NEEDLE.format(key=rng.randint(10000, 99999)) + " " + QUESTION for _ in range(20)]
    tok = train_tokenizer(texts, 400, model, model_max_length=2048)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(model)
    return model


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(name: str, processes: int, threads: int, src: Path, model: Path, out: Path) -> dict:
    """Run one configuration; its wall time, the evaluation's own time, and its passkey.json."""
    head = [sys.executable, "-m", "longforge"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(_port()),
        "-m", "longforge"]
    cmd = head + ["eval", str(model), "--out", str(out), "--device", "cpu", "--tasks", "passkey", "--lengths", LENGTHS,
                  "--depths", "10", "--trials", "4", "--passkey-batch-size", "8"]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "LONGFORGE_QUIET": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"name": name, "processes": processes, "threads": threads, "wall_s": round(wall, 1),
            "eval_s": summary["seconds"], "passkey": (out / "passkey.json").read_bytes(),
            "prompts": len(json.loads((out / "passkey.json").read_text())["samples"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--before", type=Path, help="`src` of an earlier longforge, timed under torchrun too")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every configuration")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build(args.out)
    src = ROOT / "src"
    configs = [("1 process, 1 thread", 1, 1, src, "p1t1"), ("1 process, 2 threads", 1, 2, src, "p1t2"),
               ("torchrun, 2 processes x 1 thread", 2, 1, src, "p2t1")]
    if args.before:
        configs.append(("before: torchrun, 2 processes x 1 thread", 2, 1, args.before, "b2t1"))
    rounds = [[timed(name, p, t, code, model, args.out / folder) for name, p, t, code, folder in configs]
              for _ in range(args.repeat)]
    best = [min((r[i] for r in rounds), key=lambda x: x["eval_s"]) for i in range(len(configs))]
    ref = best[0]
    print("| configuration | prompts | wall time (s) | evaluation (s), best | every round (s) | vs 1 process, 1 thread | passkey.json |")
    print("|---|---|---|---|---|---|---|")
    for i, b in enumerate(best):
        same = all(r[i]["passkey"] == rounds[0][0]["passkey"] for r in rounds)
        print(f"| {b['name']} | {b['prompts']} | {b['wall_s']} | {b['eval_s']} | "
              f"{', '.join(str(r[i]['eval_s']) for r in rounds)} | {ref['eval_s'] / b['eval_s']:.2f}x | "
              f"{'same bytes' if same else 'DIFFERENT'} |")


if __name__ == "__main__":
    main()
