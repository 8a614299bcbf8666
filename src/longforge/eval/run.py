"""The eval stage: run the spec's tasks (eval/registry.py) on one checkpoint; one <task>.json each, and summary.json."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from longforge.config import EvalSpec
from longforge.errors import LongforgeError
from longforge.eval.registry import enabled
from longforge.eval.share import SINGLE, Share
from longforge.eval.task import TaskRun
from longforge.files import atomic_write_text, writing
from longforge.hf import load_model, load_tokenizer
from longforge.inference import Engine
from longforge.inference.sharded import kv_group

# Folder names longforge itself gives checkpoints (a stage's final/, a run's rope/, a training checkpoint and the folder
# holding those): they say what a model is only together with the folder above them.
GENERIC_NAMES = re.compile(r"^(final|rope|checkpoints|step-\d+)$")


def model_label(model_dir: Path) -> str:
    """A model's name for tables and reports: its folder's name, with the folders above while that name is generic.

    `.../base/final` is "base/final" and `runs/x/train/extend/final` is "extend/final", not both "final".
    """
    # Absolute and without `.` or `..`, but symlinks kept: the name is the one the user gave, not the link's target.
    path = Path(os.path.abspath(model_dir))
    parts = path.parts[1:]  # without the root, which names nothing
    if not parts:
        return str(path)
    i = len(parts) - 1
    while i > 0 and GENERIC_NAMES.match(parts[i]):
        i -= 1
    return "/".join(parts[i:])


def check_inputs(spec: EvalSpec) -> None:
    """Fail before any work when an input file is missing or a task lacks the data it needs."""
    for key, path in spec.input_paths().items():
        if not path.exists():
            raise LongforgeError(f"`{key}` {path} does not exist; point it at the file or folder, or remove the key.")
    for task in enabled(spec):
        if task.check_inputs is not None:
            task.check_inputs(spec)


def check_prompts(spec: EvalSpec, tokenizer: Any, original_length: int, target_length: int) -> None:
    """Fail before any work when a task's shortest length cannot hold its prompt with this tokenizer.

    Builds one prompt of each grid task at its shortest length (no model needed), so a length too short for the
    task's own text is refused in preflight, not after data, rope and training ran.
    """
    for task in enabled(spec):
        if task.check_prompts is not None:
            task.check_prompts(spec, tokenizer, original_length, target_length)


def make_engine(model: Any, spec: EvalSpec, share: Share = SINGLE) -> Engine:
    """The generation engine with the recipe's inference settings; under torchrun, with the processes it may shard a
    long prompt's KV cache over (inference/sharded.py)."""
    inf = spec.inference
    return Engine(model, prefill_chunk=inf.prefill_chunk, kv_cache=inf.kv_cache, attention=inf.attention,
                  gpu_memory_gib=inf.gpu_memory_gib, cuda_graphs=inf.cuda_graphs, kv_shards=inf.kv_shards, decode_gemm=inf.decode_gemm,
                  kv_group=kv_group(inf.kv_shards, share.rank, share.world))


# Tokens the longest answer may add to a prompt (RULER's largest budget, niah's 128): for the check before any work.
ANSWER_ROOM = 128


def longest_prompt(spec: EvalSpec, original_length: int, target_length: int) -> int:
    """The longest prompt the generation tasks build (their grids' and RULER's longest length)."""
    from longforge.eval.grid import grid_lengths
    from longforge.eval.ruler.run import ruler_lengths

    longest = [max(grid_lengths(s, original_length, target_length)) for s in (spec.passkey, spec.niah) if s is not None]
    if spec.ruler is not None:
        longest.append(max(spec.ruler.lengths or ruler_lengths(target_length)))
    return max(longest, default=0)


def evaluate(model_dir: Path, spec: EvalSpec, out: Path, original_length: int, target_length: int,
             device: torch.device, label: str, trust_remote_code: bool = False, share: Share = SINGLE) -> dict[str, Any]:
    """Run the configured tasks on one checkpoint; write <task>.json for each and summary.json.

    Under torchrun every process calls this with its `share` (and its own device): each runs its share of every
    task's prompts, every process returns the same summary, and only the first process writes.
    """
    check_inputs(spec)
    if share.world == 1:
        kv_group(spec.inference.kv_shards, 0, 1)  # kv_shards N > 1 in a job of one process: one sentence, before any work
    tok = load_tokenizer(model_dir, trust_remote_code)
    check_prompts(spec, tok, original_length, target_length)
    out = Path(out)
    if share.main:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(model_dir, device, dtype, trust_remote_code)
    engine = make_engine(model, spec, share)
    longest = longest_prompt(spec, original_length, target_length)
    if longest:
        # A prompt too long even with its KV cache sharded over every process is refused now, not after other tasks.
        engine.kv_shards_for([longest], ANSWER_ROOM)
    job = TaskRun(engine, tok, spec, original_length, target_length, label, share)
    summary: dict[str, Any] = {"model": str(model_dir), "label": label, "original_length": original_length,
                               "target_length": target_length}
    t0 = time.time()
    seconds: dict[str, float] = {}
    for task in enabled(spec):
        t = time.time()
        res = task.run(job)
        if share.main:
            _write(out / f"{task.name}.json", res)
        summary[task.name] = task.summary(res)
        seconds[task.name] = round(time.time() - t, 2)
    summary["engine"] = engine.describe()
    summary["task_seconds"] = seconds
    summary["seconds"] = round(time.time() - t0, 2)
    if share.world > 1:
        summary["processes"] = share.world
    if share.main:
        _write(out / "summary.json", summary)
    return summary


def _write(path: Path, obj: Any) -> None:
    """Write JSON atomically (a reader never sees half a file; a full disk is one sentence)."""
    atomic_write_text(path, json.dumps(obj, indent=1))
