"""Benchmark: RULER on a real model (SmolLM2-135M-Instruct), longforge eval end to end, and three engines on the same
prompts.

1. `longforge eval run MODEL --tasks ruler` (the command a user runs, chat template on) for the self-contained tasks x
   lengths x samples: wall time from the command's start to its exit (model load, prompt building, generation,
   scoring, writing), prompts/s and tokens/s (prompt tokens plus generated ones), and the scores.
2. On a subset of the same prompts (the first --peer-samples samples of every task and length: identical prompts,
   since every sample is drawn from its own seed), in one process:
   (a) the engine as it was before batched decoding (rows of equal length together, eager, a host sync per token,
       no prefix reuse, no fused kernels; batches of 8 prompts, at most 131072 tokens: the old defaults);
   (b) the engine now, with its defaults (batches sized by the GPU's memory);
   (c) transformers' batched `model.generate` (left-padded, SDPA, 8 prompts per batch, each task's answer budget,
       stopping when every row reached end-of-sequence), scored by the same scorer. longforge also stops a row once
       its answer is complete (the score can no longer change), so it generates fewer tokens: both counts are kept.
   Time per prompt and the scores of each, so the ratios are on identical prompts and settings.

Usage (GPU):  PYTHONPATH=$PWD/src python benchmarks/ruler_real_gpu.py --model DIR --out $OUT/ruler_real.json
Usage (CPU, checks the script):  ... --model DIR --smoke --out /tmp/ruler_real.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_engine import left_pad  # noqa: E402
from longforge.config import RulerSpec  # noqa: E402
from longforge.eval.grid import Prompt, generate_all  # noqa: E402
from longforge.eval.prompts import PromptFormat  # noqa: E402
from longforge.eval.ruler.generators import Resources  # noqa: E402
from longforge.eval.ruler.run import build_task  # noqa: E402
from longforge.eval.ruler.scoring import answer_done, score  # noqa: E402
from longforge.eval.ruler.tasks import TASKS  # noqa: E402
from longforge.inference import Engine  # noqa: E402

SELF_CONTAINED = RulerSpec().task_list()  # the tasks that need no file: longforge eval's default
SEED = 1234  # longforge eval's default seed: the subset's prompts are the command's


def run_cli(model: Path, tasks: list[str], lengths: list[int], samples: int, out: Path, device: str,
            timeout: float | None = None, procs: int = 1) -> dict[str, Any]:
    """`longforge eval run` as a user runs it (under `torchrun --nproc-per-node procs` when procs > 1, the prompts
    shared over the GPUs): wall time and the RULER result file."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)] if procs > 1 else []
    cmd = [sys.executable, *launcher, "-m", "longforge", "eval", "run", str(model), "--tasks", "ruler", "--ruler-tasks",
           ",".join(tasks), "--ruler-lengths", ",".join(map(str, lengths)), "--samples", str(samples),
           "--chat-template", "--device", device, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / "ruler_cli.log"  # streamed, so a run stopped by a time limit still shows how far it got
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    if rc != 0:
        return {"command": " ".join(cmd[1:]), "rc": rc, "log": str(log), "wall_s": round(wall, 1)}
    res = json.loads((out / "ruler.json").read_text())
    prompt_tokens = sum(s["prompt_tokens"] for s in res["samples"])
    new_tokens = sum(s["new_tokens"] for s in res["samples"])
    n = len(res["samples"])
    shown = ("torchrun " + " ".join(cmd[3:6]) + " ") if procs > 1 else ""
    return {"command": shown + "longforge " + " ".join(cmd[3 + len(launcher):]), "rc": 0, "procs": procs,
            "wall_s": round(wall, 2), "prompts": n,
            "prompts_per_s": round(n / wall, 1), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "tokens_per_s": round((prompt_tokens + new_tokens) / wall), "engine": res.get("engine"),
            "scores": res["summary"]}


def build(tokenizer: Any, tasks: list[str], lengths: list[int], samples: int) -> dict[str, list[Prompt]]:
    """Every task's prompts for the subset (chat template, longforge eval's seed)."""
    fmt = PromptFormat(chat_template=True)
    return {t: build_task(t, tokenizer, lengths, samples, SEED, Resources(), fmt)[0] for t in tasks}


def run_engine(engine: Any, tokenizer: Any, prompts: dict[str, list[Prompt]], batch_size: int,
               batch_tokens: int) -> dict[str, Any]:
    """Generate and score every task's prompts through longforge's batching; time and mean score per task."""
    sync()
    t0 = time.perf_counter()
    scores, new = {}, 0
    for task, ps in prompts.items():
        done = generate_all(engine, tokenizer, ps, TASKS[task].max_new_tokens,
                            lambda p, out, task=task: {"score": score(task, out, p.meta["answers"])}, task,
                            batch_size, batch_tokens,
                            stop=lambda p, text, task=task: answer_done(task, text, p.meta["answers"]))
        scores[task] = round(100 * sum(s["score"] for s in done) / len(done), 1)
        new += sum(s["new_tokens"] for s in done)
    sync()
    return {"wall_s": round(time.perf_counter() - t0, 3), "new_tokens": new, "scores": scores}


def run_generate(model: Any, tokenizer: Any, prompts: dict[str, list[Prompt]], batch_size: int) -> dict[str, Any]:
    """transformers' batched generate on the same prompts: left-padded batches of one length bucket, greedy."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sync()
    t0 = time.perf_counter()
    scores, new = {}, 0
    for task, ps in prompts.items():
        got = []
        order = sorted(range(len(ps)), key=lambda i: len(ps[i].ids))
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(ps[i].ids) for i in idx)
            ids, mask = left_pad([list(ps[i].ids) for i in idx], pad)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=TASKS[task].max_new_tokens, pad_token_id=pad)
            for r, i in enumerate(idx):
                toks = out[r, width:].tolist()
                eos = model.generation_config.eos_token_id
                stops = set(eos if isinstance(eos, list) else [eos])
                cut = next((j for j, t in enumerate(toks) if t in stops or t == pad), len(toks))
                new += cut
                text = tokenizer.decode(toks[:cut], skip_special_tokens=True)
                got.append(score(task, text, ps[i].meta["answers"]))
        scores[task] = round(100 * sum(got) / len(got), 1)
    sync()
    return {"wall_s": round(time.perf_counter() - t0, 3), "new_tokens": new, "scores": scores}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", default=",".join(SELF_CONTAINED))
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--peer-samples", type=int, default=5, help="Samples per task and length for (a), (b), (c).")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--skip-peers", action="store_true", help="Only the longforge eval command, not the three engines.")
    ap.add_argument("--procs", type=int, default=1, help="Run the command under torchrun with this many processes "
                    "(one GPU each).")
    ap.add_argument("--cli-timeout", type=float, default=None, help="Stop the longforge eval command after this long.")
    ap.add_argument("--smoke", action="store_true", help="CPU, 2 tasks at 4096, 2 samples: checks the script.")
    args = ap.parse_args()
    tasks, lengths = args.tasks.split(","), [int(x) for x in args.lengths.split(",")]
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        tasks, lengths, args.samples, args.peer_samples = ["niah_single_1", "vt"], [4096], 2, 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
                              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    if not args.skip_cli:
        result["cli"] = run_cli(args.model, tasks, lengths, args.samples, args.out.parent / "ruler_cli", device,
                                args.cli_timeout, args.procs)
        print(json.dumps({k: v for k, v in result["cli"].items() if k not in ("engine", "scores")}), flush=True)
        save()
    if args.skip_peers:
        return
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    t0 = time.perf_counter()
    prompts = build(tokenizer, tasks, lengths, args.peer_samples)
    n = sum(len(p) for p in prompts.values())
    prompt_tokens = sum(len(p.ids) for ps in prompts.values() for p in ps)
    result["subset"] = {"prompts": n, "prompt_tokens": prompt_tokens, "build_s": round(time.perf_counter() - t0, 2)}
    old = Engine(model, ragged=False, cuda_graphs="off", sync_every=1, prefix_reuse=False, fused="off")
    new = Engine(model)
    runs = {
        "b_engine_now_warmup": lambda: run_engine(new, tokenizer, prompts, 256, new.batch_tokens_budget()),
        "a_engine_before": lambda: run_engine(old, tokenizer, prompts, 8, 131072),
        "b_engine_now": lambda: run_engine(new, tokenizer, prompts, 256, new.batch_tokens_budget()),
        "c_model_generate": lambda: run_generate(model, tokenizer, prompts, 8),
    }
    for name, fn in runs.items():
        r = fn()
        r["prompts_per_s"] = round(n / r["wall_s"], 2)
        r["tokens_per_s"] = round((prompt_tokens + r["new_tokens"]) / r["wall_s"])
        result[name] = r
        print(name, json.dumps(r), flush=True)
        save()
    b = result["b_engine_now"]["wall_s"]
    result["speedup_now_over_before"] = round(result["a_engine_before"]["wall_s"] / b, 2)
    result["speedup_now_over_generate"] = round(result["c_model_generate"]["wall_s"] / b, 2)
    save()


if __name__ == "__main__":
    main()
