"""Benchmark: a RULER sweep on the Llama-3.1-8B shape (random bf16 weights), 4K-128K, on one H200 and on two, against
the FLOP/bandwidth model of the same prompts and against transformers' batched `model.generate`.

Prompts: RULER's 6 self-contained tasks (niah_single_1, niah_multikey_2, niah_multikey_3, vt, cwe, fwe), built by
longforge's own builder (eval/ruler/run.py build_task: every sample fitted to its length minus the task's answer
budget, seed 1234 as `longforge eval`), plain format, tokenized with the SmolLM2 tokenizer at --tokenizer (no hub
access); its ids (< 49152) are used as they are in the 8B vocabulary (128256). Random weights answer nothing, so every
row generates exactly its task's answer budget (128 niah, 30 vt, 120 cwe, 50 fwe): no end-of-sequence stop, no
answer-complete stop; the work is deterministic and the scores mean nothing.

1. The sweep (`--parts sweep`): longforge's engine with its defaults (Engine(model, stop_on_eos=False)) through the eval
   path's own batching, as `longforge eval --tasks ruler` runs it: one `generate_all` per task over the command's
   lengths, batches of at most 256 prompts and `Engine.batch_tokens_budget()` prompt tokens (TaskRun.batch_size /
   batch_tokens' GPU defaults; measured once after the warm-up, the smallest over the processes so every process
   cuts the same batches), and under `torchrun` every process runs its share of the batches (eval/share.py's split,
   Share(rank, world)) and the samples are gathered, as `torchrun ... -m longforge eval` does.
   Recorded per task and length: prompt building (s), prompts and tokens, the engine's prefill and decode seconds,
   decode steps, host visits, padding and shared-prefix tokens, batches and their shapes, and the FLOP/bandwidth model
   of the same batches; per command: CUDA-graph captures and distinct (rows, capacity, width) decode shapes, wall
   time, a digest of the outputs (one GPU and two must agree), peak memory per process.
2. The comparison (`--parts hf`, one process only): transformers' batched `model.generate` (left-padded, SDPA, greedy,
   exactly the answer budget: min_new_tokens = max_new_tokens, no EOS) on the first --hf-samples samples of every
   task at lengths up to --hf-max-length, batches of at most --hf-rows rows and --hf-batch-tokens tokens, until
   --hf-budget-s is spent (what was left out is listed; out of memory is a result); and the engine, with its
   defaults, on exactly the same prompts in the same command. Per task and length: both times and their ratio.

The model (`model_s`): prefill at 575e12 FLOP/s causal-counted (eval_engine.py's prefill_flops: 2 N_layers per token
plus 2 n_layers d L^2; 575 is the fused prefill measured on an H200 by benchmarks/eval_engine.py, 567-580 TFLOP/s at
32K-128K), plus, per batch, (answer budget - 1) decode steps x (the weights a step reads + the batch's KV at the middle
of its generation) / 4.8e12 B/s (an H200's HBM3e). It is computed on the batches the engine ran. Per task and length:
`ratio` = the engine's calls (GPU-seconds, summed over the processes) over `model_s`; per task and in `totals`:
`wall_over_model` = the task's wall time over `model_wall_s`, the model of each process's own batches, the slowest
process's (one GPU: all of them), the issue's "within 1.3x" (`within_target`).

Estimates (`--plan [--world 2] --samples N --lengths ...` prints the model's seconds without a GPU; the engine's batch
budget on an H200 is ~454K prompt tokens: 25 rows at 4K, 13 at 32K, 6 at 64K, 3 at 128K). One H200, 25 samples x 6
tasks = 150 prompts per length: 4K 19 s, 8K 39 s, 16K 86 s, 32K 209 s, 64K 566 s, 128K 1718 s (a 128K prompt's
prefill alone is 11 s). Two H200s split whole batches of one task (eval/share.py), so they gain only where a task has
several batches in the command: 4K-32K x 25 together 186 s (352 on one), 64K x 25 295 s (5 batches: 3 to one GPU),
128K x 6 206 s (2 batches, one each), x 12 412 s, x 25 894 s. Each command adds about 1-1.5 min: the 8B model built
on the GPU, the warm-up (the fused kernels compile), the prompts (~3 s per task at 128K for 2 samples on a 2-core CPU;
a slice builds samples 0..start+n-1 and keeps its own). A command runs at most 10 minutes (--budget-s 540 by default:
a length the model says will not fit is left out before any work, a task that would pass it is not started; both are
listed under `skipped`), so 64K and 128K at 25 samples need slices of samples (--sample-start; every sample comes from
its own seed, so the slices are the full run's prompts; tested) merged with --merge. At 1.0-1.3x the model:
  one H200:  4K-32K x 25 (--parts sweep)                            ~6-8 min
             4K-32K x 4 (--parts hf: model.generate + the engine)   ~5-6 min
             64K x 8 (25: 8 + 8 + 9, --sample-start 0, 8, 16)        ~4-5.5 min each
             128K x 5 (25: five commands)                           ~7-9 min each, ~40 min in all
  two H200s: 4K-32K x 25                                            ~4-5.5 min
             64K x 25                                               ~6.5-8 min
             128K x 6 (25: 6, 6, 6, 7 at --sample-start 0, 6, 12, 18) ~5-7.5 min each
The issue's ">= 25 samples per task and length" at 128K is ~29 min of model time on one H200 and ~15 on two, more
than one 30-minute session's device time holds with the rest. The ratio measured/model per length depends little on
the sample count (the batches have the same size), so fewer samples at 128K on one GPU still give it.

Usage (GPU, one H200; results under $OUT):
  PYTHONPATH=$PWD/src python benchmarks/ruler_sweep_gpu.py --tokenizer SMOLLM2_DIR --lengths 4096,8192,16384,32768 \
      --samples 25 --parts sweep --out $OUT/sweep_1gpu_4k-32k.json
Two H200s (the same prompts spread over both processes):
  PYTHONPATH=$PWD/src torchrun --standalone --nproc-per-node 2 benchmarks/ruler_sweep_gpu.py --tokenizer SMOLLM2_DIR \
      --lengths 4096,8192,16384,32768 --samples 25 --out $OUT/sweep_2gpu_4k-32k.json
Slices into one table:  python benchmarks/ruler_sweep_gpu.py --merge a.json b.json ... --out merged.json
CPU check (tiny model, numbers mean nothing):  ... ruler_sweep_gpu.py --smoke --tokenizer DIR --out /tmp/s1.json
  and   torchrun --standalone --nproc-per-node 2 benchmarks/ruler_sweep_gpu.py --smoke --tokenizer DIR --out /tmp/s2.json (gloo)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_engine import SHAPES, build_model, kv_bytes_per_token, left_pad, prefill_flops, weight_bytes  # noqa: E402
from ruler_real_gpu import SELF_CONTAINED  # noqa: E402
from longforge.config import EvalSpec  # noqa: E402
from longforge.eval.grid import Prompt, batch_plan, generate_all  # noqa: E402
from longforge.eval.prompts import PromptFormat  # noqa: E402
from longforge.eval.ruler.generators import Resources  # noqa: E402
from longforge.eval.ruler.run import build_task  # noqa: E402
from longforge.eval.ruler.scoring import score  # noqa: E402
from longforge.eval.ruler.tasks import TASKS  # noqa: E402
from longforge.eval.share import Share  # noqa: E402
from longforge.eval.task import TaskRun  # noqa: E402
from longforge.files import atomic_write_json  # noqa: E402
from longforge.inference import Engine  # noqa: E402
from longforge.inference.engine import _Batch  # noqa: E402
from longforge.inference.sharded import kv_group  # noqa: E402

PREFILL_FLOPS_PER_S = 575e12  # the fused prefill of the 8B shape on an H200 (eval_engine.py: 567-580 at 32K-128K)
HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e, the datasheet's
TARGET = 1.3  # the issue's: measured within 1.3x of the model
GIB = 2**30
# The CPU check: the tiny shape with room for the tokenizer's ids.
SHAPES["smoke"] = {**SHAPES["tiny"], "vocab_size": 49152, "max_position_embeddings": 8192,
                   "tie_word_embeddings": False}  # untied, as the 8B: a tied tiny model only repeats its last token


class SweepEngine(Engine):
    """The engine, unchanged, noting every generate call: its rows, wall time, the engine's own record, and whether it
    captured a new decoding graph (the engine keeps one captured shape; a new shape is a new capture)."""

    def __init__(self, model: Any, **settings: Any):
        super().__init__(model, **settings)
        self.calls: list[dict[str, Any]] = []
        self.captures = 0
        self.outputs: dict[str, list[int]] = {}  # new tokens by prompt digest (one GPU and two must agree)

    def generate(self, prompts: Any, max_new_tokens: int, stop: Any = None) -> list[list[int]]:
        rows = [list(r) for r in prompts]
        batch = _Batch.sorted(rows, self.prefix_min, self.pad_to, self.worth)
        capacity, width = self._shape(batch, max_new_tokens)  # the key the engine's graph is captured for
        kept = self._graphed
        t0 = self._sync()
        out = super().generate(rows, max_new_tokens, stop)
        wall = self._sync() - t0
        captured = self._graphed is not None and self._graphed is not kept
        self.captures += captured
        self.calls.append({"lengths": [len(r) for r in rows], "new": max_new_tokens, "wall_s": wall,
                           "shape": [len(rows), capacity, width], "captured": captured, **self.last})
        self.outputs.update({digest(r): t for r, t in zip(rows, out)})
        return out


def digest(ids: list[int]) -> str:
    """A prompt's identity (its token ids)."""
    return hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]


_COUNTS: dict[int, tuple[float, float, int, int]] = {}  # by id(model): what the model below reads of it


def model_seconds(model: Any, batches: list[list[int]], new: int) -> dict[str, float]:
    """The FLOP/bandwidth model of batches (prompt lengths each) generating exactly `new` tokens per row."""
    if id(model) not in _COUNTS:
        # eval_engine.py's prefill_flops(model, n) = a n + b n^2; its parameter walk, once (thousands of calls here).
        a = prefill_flops(model, 1) - (b := (prefill_flops(model, 2) - 2 * prefill_flops(model, 1)) / 2)
        _COUNTS[id(model)] = (a, b, weight_bytes(model), kv_bytes_per_token(model))
    a, b, w, kv = _COUNTS[id(model)]
    prefill = sum(a * n + b * n * n for bt in batches for n in bt) / PREFILL_FLOPS_PER_S
    decode = sum((new - 1) * (w + sum(n + new // 2 for n in bt) * kv) for bt in batches) / HBM_BYTES_PER_S
    return {"prefill_s": prefill, "decode_s": decode, "s": prefill + decode}


def nominal(n: int, lengths: list[int]) -> int:
    """The sweep length a prompt of n tokens was built for (the smallest at least n)."""
    return min(L for L in lengths if L >= n)


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def r4(x: float) -> float:
    return round(x, 4)


class Job:
    """This process's place in the command (rank, world, device) and its agreed decisions."""

    def __init__(self, smoke: bool):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if smoke:
            self.device = torch.device("cpu")
            torch.set_num_threads(1)  # a tiny model is all per-op overhead; and 2 cores are shared
        else:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist

            if smoke:
                dist.init_process_group("gloo")
            else:
                dist.init_process_group("nccl", device_id=self.device)
        self.share = Share(self.rank, self.world)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agreed(self, value: Any) -> Any:
        """The first process's value on every process (decisions that must be the same everywhere)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gathered(self, value: Any) -> list[Any]:
        """Every process's value, by rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, value)
        return parts

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def build_prompts(tokenizer: Any, tasks: list[str], lengths: list[int], samples: int, start: int,
                  seed: int) -> tuple[dict[str, list[Prompt]], dict[str, Any]]:
    """Every task's prompts at every length (samples start..start+samples-1), timed per task and length."""
    fmt = PromptFormat()
    prompts: dict[str, list[Prompt]] = {}
    info: dict[str, Any] = {}
    for task in tasks:
        prompts[task] = []
        for L in lengths:
            t0 = time.perf_counter()
            got, skipped = build_task(task, tokenizer, [L], start + samples, seed, Resources(), fmt)
            got = got[start:]
            prompts[task] += got
            info.setdefault(task, {})[str(L)] = {
                "build_s": r4(time.perf_counter() - t0), "prompts": len(got),
                "prompt_tokens": sum(len(p.ids) for p in got),
                "prompt_lengths": [min((len(p.ids) for p in got), default=0), max((len(p.ids) for p in got), default=0)],
                **({"skipped": skipped[str(L)]} if skipped else {})}
    return prompts, info


def task_seconds(model: Any, n: list[int], new: int, batch_size: int, batch_tokens: int, world: int) -> float:
    """The model's time of one task's prompts (token counts `n`) on `world` processes: the eval path's batches, dealt as
    eval/share.py deals them (costliest first, by tokens), each process its own; the slowest process's time."""
    batches = [[n[i] for i in b] for b in batch_plan(n, batch_size, batch_tokens, True)]
    costs = [float(sum(x + new for x in b)) for b in batches]
    return max(model_seconds(model, [batches[i] for i in Share(r, world).mine(costs)], new)["s"] for r in range(world))


def planned(model: Any, tasks: list[str], lengths: list[int], samples: int, batch_size: int, batch_tokens: int,
            world: int) -> dict[str, float]:
    """The model's seconds per length before any work (prompts taken at their length minus the answer budget)."""
    return {str(L): sum(task_seconds(model, [L - TASKS[t].max_new_tokens] * samples, TASKS[t].max_new_tokens,
                                     batch_size, batch_tokens, world) for t in tasks) for L in lengths}


def run_sweep(engine: SweepEngine, tokenizer: Any, prompts: dict[str, list[Prompt]], lengths: list[int],
              batch_size: int, batch_tokens: int, job: Job, budget_s: float, t_start: float,
              result: dict[str, Any], save: Any) -> None:
    """Each task through generate_all (this process's share of its batches), then per length: measured vs model."""
    sweep: dict[str, Any] = result.setdefault("sweep", {})
    for task, ps in prompts.items():
        new = TASKS[task].max_new_tokens
        expect = task_seconds(engine.model, [len(p.ids) for p in ps], new, batch_size, batch_tokens, job.world)
        # Not started when the model says it would end past the budget (a command has a wall-clock limit).
        if job.agreed(time.perf_counter() - t_start + 1.15 * expect > budget_s):
            result["skipped"].append(f"sweep {task}: {expect:.0f} s more by the model would pass "
                                     f"--budget-s {budget_s:.0f}")
            continue
        first_call = len(engine.calls)
        job.barrier()
        t0 = sync(job.device)
        samples = generate_all(engine, tokenizer, ps, new,
                               lambda p, out, task=task: {"score": score(task, out, p.meta["answers"])},
                               f"sweep {task}", batch_size, batch_tokens, stop=None, share=job.share)
        wall = sync(job.device) - t0
        mine = engine.calls[first_call:]
        parts = job.gathered(mine)
        forced = all(s["new_tokens"] == new for s in samples)
        tokens: dict[str, list[int]] = {}
        keys = [digest(p.ids) for p in ps]
        for part in job.gathered({k: engine.outputs[k] for k in keys if k in engine.outputs}):
            tokens.update(part)
        every = [tokens.get(k) for k in keys]
        # The model's wall time of this task: each process's own batches, the slowest process (one GPU: all of them).
        model_wall = max(model_seconds(engine.model, [c["lengths"] for c in calls], new)["s"] for calls in parts)
        entry: dict[str, Any] = {"wall_s": r4(wall), "model_wall_s": r4(model_wall),
                                 "wall_over_model": r4(wall / model_wall) if model_wall else None,
                                 "new_tokens_each": new, "forced_length_held": forced,
                                 "tokens_sha1": hashlib.sha1(json.dumps(every).encode()).hexdigest()[:16],
                                 "lengths": {}}
        for L in lengths:
            at = [(rank, c) for rank, calls in enumerate(parts) for c in calls
                  if nominal(max(c["lengths"]), lengths) == L]
            if at:
                entry["lengths"][str(L)] = length_row(engine.model, at, new, job.world)
        sweep[task] = entry
        if job.main:
            print(f"[{time.perf_counter() - t_start:7.1f}s] sweep {task}: {len(samples)} prompts in {wall:.1f} s; "
                  + ", ".join(f"{L}: {v['measured_gpu_s']:.1f}/{v['model_s']:.1f} s = {v['ratio']}x"
                              for L, v in entry["lengths"].items()), flush=True)
        save()


def length_row(model: Any, at: list[tuple[int, dict[str, Any]]], new: int, world: int) -> dict[str, Any]:
    """One task at one length: the engine's calls (with the process that made each) summed, against the model."""
    calls = [c for _, c in at]

    def total(key: str) -> float:
        return sum(c.get(key, 0) for c in calls)

    m = model_seconds(model, [c["lengths"] for c in calls], new)
    gpu_s = total("wall_s")
    row = {"prompts": sum(len(c["lengths"]) for c in calls), "prompt_tokens": sum(sum(c["lengths"]) for c in calls),
           "batches": len(calls), "batch_rows": sorted({len(c["lengths"]) for c in calls}),
           "decode_shapes": sorted({tuple(c["shape"]) for c in calls}), "captures": int(total("captured")),
           "measured_gpu_s": r4(gpu_s),  # the engine's calls, summed over the processes (one GPU: its time)
           "prefill_s": r4(total("prefill_s")), "decode_s": r4(total("decode_s")),
           **{k: int(total(k)) for k in ("decode_steps", "host_visits", "padding_tokens", "prefix_saved_tokens")},
           "cuda_graph_batches": sum(bool(c.get("cuda_graph")) for c in calls),
           "model_prefill_s": r4(m["prefill_s"]), "model_decode_s": r4(m["decode_s"]), "model_s": r4(m["s"]),
           "ratio": r4(gpu_s / m["s"]) if m["s"] else None,
           "prefill_ratio": r4(total("prefill_s") / m["prefill_s"]) if m["prefill_s"] else None,
           "decode_ratio": r4(total("decode_s") / m["decode_s"]) if m["decode_s"] else None}
    if world > 1:
        row["per_process"] = []
        for rank in range(world):
            mine = [c for r, c in at if r == rank]
            row["per_process"].append({"batches": len(mine), "prompts": sum(len(c["lengths"]) for c in mine),
                                       "measured_s": r4(sum(c["wall_s"] for c in mine)),
                                       "model_s": r4(model_seconds(model, [c["lengths"] for c in mine], new)["s"])})
    return row


def totals(result: dict[str, Any], lengths: list[int], world: int) -> dict[str, Any]:
    """Per length and over the sweep: measured against the model (GPU-seconds), and the wall time."""
    sweep = result.get("sweep", {})
    out: dict[str, Any] = {"per_length": {}}
    for L in lengths:
        rows = [t["lengths"][str(L)] for t in sweep.values() if str(L) in t["lengths"]]
        if not rows:
            continue
        gpu, model = sum(r["measured_gpu_s"] for r in rows), sum(r["model_s"] for r in rows)
        out["per_length"][str(L)] = {"prompts": sum(r["prompts"] for r in rows), "measured_gpu_s": r4(gpu),
                                     "model_s": r4(model), "ratio": r4(gpu / model) if model else None,
                                     "prefill_ratio": r4(sum(r["prefill_s"] for r in rows)
                                                         / max(1e-12, sum(r["model_prefill_s"] for r in rows))),
                                     "decode_ratio": r4(sum(r["decode_s"] for r in rows)
                                                        / max(1e-12, sum(r["model_decode_s"] for r in rows)))}
    per = out["per_length"].values()
    gpu, model = sum(r["measured_gpu_s"] for r in per), sum(r["model_s"] for r in per)
    wall = sum(t["wall_s"] for t in sweep.values())
    model_wall = sum(t["model_wall_s"] for t in sweep.values())
    out.update({"prompts": sum(r["prompts"] for r in per), "measured_gpu_s": r4(gpu), "model_s": r4(model),
                "ratio": r4(gpu / model) if model else None, "wall_s": r4(wall),
                # The job's wall against the model of the same batches on the same processes (the issue's 1.3x).
                "model_wall_s": r4(model_wall), "wall_over_model": r4(wall / model_wall) if model_wall else None,
                # The job's wall against the model spread perfectly over its processes (one GPU: the same ratio).
                "wall_over_model_per_gpu": r4(wall * world / model) if model else None,
                "within_target": bool(model_wall and wall / model_wall <= TARGET)})
    return out


def run_hf(model: Any, engine: SweepEngine, tokenizer: Any, prompts: dict[str, list[Prompt]], lengths: list[int],
           args: argparse.Namespace, device: torch.device, batch_size: int, batch_tokens: int, t_start: float,
           result: dict[str, Any], save: Any) -> None:
    """model.generate and the engine on the same prompts (the first --hf-samples samples of each task and length)."""
    hf: dict[str, Any] = result.setdefault("hf", {"per_length": {}, "skipped": []})
    spent = 0.0
    oom = False
    for L in lengths:
        if L > args.hf_max_length:
            hf["skipped"].append(f"{L}: beyond --hf-max-length {args.hf_max_length}")
            continue
        if oom:
            hf["skipped"].append(f"{L}: model.generate ran out of memory at a shorter length")
            continue
        if time.perf_counter() - t_start > args.budget_s:
            hf["skipped"].append(f"{L}: over --budget-s")
            continue
        at: dict[str, Any] = {}
        for task, ps in prompts.items():
            sub = [p for p in ps if p.length == L][:args.hf_samples]
            if not sub:
                continue
            if spent > args.hf_budget_s or time.perf_counter() - t_start > args.budget_s:
                hf["skipped"].append(f"{L} {task}: over --hf-budget-s {args.hf_budget_s:.0f} s or --budget-s")
                continue
            new = TASKS[task].max_new_tokens
            rows = max(1, min(args.hf_rows, args.hf_batch_tokens // L))
            engine.release()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = sync(device)
            try:
                hf_tokens = hf_generate(model, [p.ids for p in sub], new, rows, device)
            except torch.cuda.OutOfMemoryError as e:
                oom = True
                hf["skipped"].append(f"{L} {task}: model.generate out of memory with {rows} rows ({str(e).splitlines()[0][:160]})")
                gc.collect()
                torch.cuda.empty_cache()
                break
            hf_s = sync(device) - t0
            spent += hf_s
            t0 = sync(device)
            generate_all(engine, tokenizer, sub, new, lambda p, out: {}, f"hf-peer {task}", batch_size, batch_tokens)
            eng_s = sync(device) - t0
            m = model_seconds(model, [[len(p.ids) for p in sub[i:i + rows]] for i in range(0, len(sub), rows)], new)
            at[task] = {"prompts": len(sub), "hf_rows": rows, "hf_s": r4(hf_s), "engine_s": r4(eng_s),
                        "hf_over_engine": r4(hf_s / eng_s), "model_s_hf_batches": r4(m["s"]),
                        "hf_over_model": r4(hf_s / m["s"]), "hf_new_tokens_forced": all(len(t) == new for t in hf_tokens)}
        if at:
            hs, es = sum(v["hf_s"] for v in at.values()), sum(v["engine_s"] for v in at.values())
            hf["per_length"][str(L)] = {"tasks": at, "hf_s": r4(hs), "engine_s": r4(es), "hf_over_engine": r4(hs / es)}
            print(f"[{time.perf_counter() - t_start:7.1f}s] model.generate {L}: {hs:.1f} s, engine {es:.1f} s on the "
                  f"same {sum(v['prompts'] for v in at.values())} prompts ({hs / es:.2f}x)", flush=True)
        save()
    done = hf["per_length"].values()
    if done:
        hs, es = sum(v["hf_s"] for v in done), sum(v["engine_s"] for v in done)
        hf["overall"] = {"hf_s": r4(hs), "engine_s": r4(es), "hf_over_engine": r4(hs / es)}


@torch.no_grad()
def hf_generate(model: Any, rows: list[list[int]], new: int, per_batch: int, device: torch.device) -> list[list[int]]:
    """transformers' batched greedy generate, left-padded, exactly `new` tokens per row (no EOS)."""
    out: list[list[int]] = []
    for b in range(0, len(rows), per_batch):
        chunk = rows[b:b + per_batch]
        width = max(map(len, chunk))
        ids, mask = left_pad(chunk)
        got = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
        out += got[:, width:].tolist()
    return out


def merge(files: list[Path], out: Path) -> None:
    """Slices of one sweep (same shape, processes and rates; different lengths or samples) into one table."""
    parts = [json.loads(f.read_text()) for f in files]
    keys = {(p["shape"], p["processes"], p["rates"]["prefill_flops_per_s"]) for p in parts}
    if len(keys) != 1:
        raise SystemExit(f"--merge: the files differ in shape, processes or rates: {sorted(keys)}")
    merged: dict[str, Any] = {"merged_from": [str(f) for f in files], "shape": parts[0]["shape"],
                              "processes": parts[0]["processes"], "rates": parts[0]["rates"], "sweep": {},
                              "skipped": [s for p in parts for s in p.get("skipped", [])]}
    lengths: set[int] = set()
    wall = 0.0
    for p in parts:
        wall += sum(t["wall_s"] for t in p.get("sweep", {}).values())
        for task, t in p.get("sweep", {}).items():
            dst = merged["sweep"].setdefault(task, {"wall_s": 0.0, "model_wall_s": 0.0, "lengths": {}})
            dst["wall_s"] += t["wall_s"]
            dst["model_wall_s"] += t["model_wall_s"]
            for L, row in t["lengths"].items():
                lengths.add(int(L))
                d = dst["lengths"].setdefault(L, {})
                for k in ("prompts", "prompt_tokens", "batches", "captures", "measured_gpu_s", "prefill_s", "decode_s",
                          "decode_steps", "host_visits", "model_prefill_s", "model_decode_s", "model_s"):
                    d[k] = d.get(k, 0) + row[k]
                d["ratio"] = r4(d["measured_gpu_s"] / d["model_s"])
    merged["totals"] = totals(merged, sorted(lengths), merged["processes"])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, merged)
    print(json.dumps(merged["totals"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results (written after every task).")
    ap.add_argument("--tokenizer", type=Path, help="A local tokenizer folder (the SmolLM2 one); its ids are used as they are.")
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--tasks", default=",".join(SELF_CONTAINED))
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--samples", type=int, default=25, help="Samples per task and length.")
    ap.add_argument("--sample-start", type=int, default=0,
                    help="First sample (slices of one sweep: every sample comes from its own seed).")
    ap.add_argument("--seed", type=int, default=EvalSpec().seed)
    ap.add_argument("--parts", default="sweep,hf", help="sweep (the engine on every prompt), hf (model.generate and the "
                                                        "engine on the first --hf-samples; one process only).")
    ap.add_argument("--budget-s", type=float, default=540,
                    help="Lengths the model predicts past this are left out before any work, and the tasks still "
                         "to run once it has passed (listed under `skipped`).")
    ap.add_argument("--hf-samples", type=int, default=4, help="model.generate: samples per task and length.")
    ap.add_argument("--hf-max-length", type=int, default=32768)
    ap.add_argument("--hf-rows", type=int, default=8, help="model.generate: rows per batch at most ...")
    ap.add_argument("--hf-batch-tokens", type=int, default=65536, help="... and this many prompt tokens.")
    ap.add_argument("--hf-budget-s", type=float, default=240, help="model.generate: no new batch after this long.")
    ap.add_argument("--plan", action="store_true", help="Print the model's seconds per length (no GPU, no prompts).")
    ap.add_argument("--gpu-gib", type=float, default=139.8, help="--plan: the GPU's memory (an H200's).")
    ap.add_argument("--world", type=int, default=1, help="--plan: processes (GPUs).")
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="Prompt tokens per batch (longforge's inference.batch_tokens); default: the engine's budget.")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 1024 and 2048 tokens, 2 samples.")
    ap.add_argument("--merge", type=Path, nargs="+", help="Merge these result files (slices) into --out.")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("LONGFORGE_QUIET", "1")
    tasks = args.tasks.split(",")
    lengths = sorted(int(x) for x in args.lengths.split(","))
    parts = set(args.parts.split(","))
    if args.plan:
        plan(args, tasks, lengths)
        return
    if args.tokenizer is None:
        raise SystemExit("--tokenizer: give a local tokenizer folder (the SmolLM2 one).")
    if args.smoke:
        args.shape, lengths, args.samples, args.hf_max_length = "smoke", [1024, 2048], min(args.samples, 2), 2048
    job = Job(args.smoke)
    skipped = []
    if job.world > 1 and "hf" in parts:
        parts.discard("hf")  # model.generate is the one-process command's comparison
        skipped.append("hf: model.generate runs in the one-process command only")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    t_start = time.perf_counter()
    import transformers
    from transformers import AutoTokenizer

    result: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
        "command": " ".join((["torchrun", f"--nproc-per-node {job.world}"] if job.world > 1 else ["python"]) + sys.argv),
        "device": torch.cuda.get_device_name(job.device) if job.device.type == "cuda" else "cpu",
        "processes": job.world, "torch": torch.__version__, "transformers": transformers.__version__,
        "shape": args.shape, "dtype": str(dtype).replace("torch.", ""), "tokenizer": str(args.tokenizer),
        "tasks": tasks, "samples": args.samples, "sample_start": args.sample_start, "seed": args.seed,
        "parts": sorted(parts),
        "rates": {"prefill_flops_per_s": PREFILL_FLOPS_PER_S, "hbm_bytes_per_s": HBM_BYTES_PER_S,
                  "note": "prefill at 575 TFLOP/s (the fused prefill measured on an H200 by eval_engine.py, "
                          "567-580 at 32K-128K), causal-counted; decode steps x (weights + batch KV) / 4.8 TB/s"},
        "target_ratio": TARGET, "skipped": skipped}

    def save() -> None:
        if job.main:
            result["elapsed_s"] = round(time.perf_counter() - t_start, 2)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(args.out, result)

    t = time.perf_counter()
    model = build_model(args.shape, job.device, dtype)
    if job.world > 1:
        import torch.distributed as dist

        for p in model.parameters():  # the same weights on every process, whatever each device's random stream did
            dist.broadcast(p.data, src=0)
    result["setup"] = {"model_build_s": r4(time.perf_counter() - t), "weight_bytes_per_step": weight_bytes(model),
                       "kv_bytes_per_token": kv_bytes_per_token(model)}
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    engine = SweepEngine(model, stop_on_eos=False, kv_group=kv_group("auto", job.rank, job.world))
    # Warm-up: the fused kernels compile and the attention kernels are checked once per process, not in the sweep.
    t = sync(job.device)
    engine.generate([[5] * 600, [6] * 700], 16)
    result["setup"]["warmup_s"] = r4(sync(job.device) - t)
    engine.release()
    engine.calls.clear()
    engine.captures = 0
    gc.collect()
    if job.device.type == "cuda":
        torch.cuda.empty_cache()
    run = TaskRun(engine, tokenizer, EvalSpec(), 8192, max(lengths), "sweep", job.share)
    own = args.batch_tokens or run.batch_tokens  # what longforge eval's RULER run gets on this device
    every = job.gathered(own)
    batch_tokens = min(every)  # every process must cut the same batches
    batch_size = run.batch_size(None)
    result["batching"] = {"batch_size": batch_size, "batch_tokens": batch_tokens, "batch_tokens_per_process": every}
    result["engine"] = engine.describe()
    predicted = planned(model, tasks, lengths, args.samples, batch_size, batch_tokens, job.world)
    keep, acc = [], 0.0
    for L in lengths:
        acc += predicted[str(L)]
        if acc * 1.15 > args.budget_s and keep:
            result["skipped"].append(f"length {L}: the model predicts {acc:.0f} s with it, past --budget-s {args.budget_s:.0f}")
            continue
        keep.append(L)
    result["model_predicted_s"] = {L: round(v, 1) for L, v in predicted.items()}
    lengths = keep
    result["lengths"] = lengths
    if job.main:
        print(f"{result['device']} x {job.world}; {args.shape}; lengths {lengths}; {args.samples} samples from "
              f"{args.sample_start}; batches of <= {batch_size} prompts, <= {batch_tokens} tokens; model predicts "
              f"{sum(predicted[str(L)] for L in lengths):.0f} s", flush=True)
    t = time.perf_counter()
    prompts, info = build_prompts(tokenizer, tasks, lengths, args.samples, args.sample_start, args.seed)
    result["build"] = {"s": r4(time.perf_counter() - t), "per_task": info}
    save()
    if "sweep" in parts:
        t = time.perf_counter()
        run_sweep(engine, tokenizer, prompts, lengths, batch_size, batch_tokens, job, args.budget_s, t_start, result,
                  save)
        result["sweep_wall_s"] = r4(time.perf_counter() - t)
        result["totals"] = totals(result, lengths, job.world)
        result["cuda_graph_captures"] = sum(job.gathered(engine.captures))
        shapes = job.gathered(sorted({tuple(c["shape"]) for c in engine.calls}))
        result["decode_shapes"] = sorted({tuple(s) for ss in shapes for s in ss})
        result["distinct_decode_shapes"] = len(result["decode_shapes"])
        peak = torch.cuda.max_memory_allocated(job.device) / GIB if job.device.type == "cuda" else 0.0
        result["peak_gib_per_process"] = [round(x, 2) for x in job.gathered(peak)]
        save()
        if job.main:
            tot = result["totals"]
            print(f"sweep: {tot['prompts']} prompts; wall {tot['wall_s']:.1f} s against the model's {tot['model_wall_s']:.1f}"
                  f" s = {tot['wall_over_model']}x (target {TARGET}x); the engine's calls {tot['measured_gpu_s']:.1f} "
                  f"GPU-s against {tot['model_s']:.1f} = {tot['ratio']}x; {result['cuda_graph_captures']} graph "
                  f"captures, {result['distinct_decode_shapes']} decode shapes", flush=True)
    if "hf" in parts:
        run_hf(model, engine, tokenizer, prompts, lengths, args, job.device, batch_size, batch_tokens, t_start, result,
               save)
    result["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    save()
    if job.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def plan(args: argparse.Namespace, tasks: list[str], lengths: list[int]) -> None:
    """The model's seconds per length on one GPU for --samples, without a GPU: the shape on the meta device, the
    batch budget as the engine would size it on a GPU of --gpu-gib (half the memory free after the weights)."""
    model = build_model(args.shape, torch.device("meta"), torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    batch_tokens = args.batch_tokens or int(0.5 * (0.9 * args.gpu_gib * GIB - weights) / kv_bytes_per_token(model))
    got = planned(model, tasks, lengths, args.samples, 256, batch_tokens, args.world)
    print(f"{args.shape}: batch_tokens {batch_tokens}; the model's seconds on {args.world} GPU(s) (the slowest's), "
          f"{args.samples} samples x {len(tasks)} tasks:")
    for L, s in got.items():
        print(f"  {L:>7}: {s:7.1f} s alone")
    together = sum(task_seconds(model, [L - TASKS[t].max_new_tokens for L in lengths for _ in range(args.samples)],
                                TASKS[t].max_new_tokens, 256, batch_tokens, args.world) for t in tasks)
    print(f"  total: {sum(got.values()):.1f} s, one length at a time; {together:.1f} s with the lengths together "
          f"(one generate_all per task, as the sweep runs them)")


if __name__ == "__main__":
    main()
