"""The eval stage: run the configured tasks on one checkpoint and write one JSON per task plus summary.json."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from longforge.config import EvalSpec, SourceSpec
from longforge.data.sources import Rejects, iter_documents
from longforge.errors import LongforgeError
from longforge.inference import Engine
from longforge.eval.grid import spread_lengths
from longforge.eval.niah import Needle, build_niah, run_niah
from longforge.eval.passkey import build_grid, run_passkey
from longforge.eval.ppl import run_ppl
from longforge.eval.prompts import PromptFormat, TextHaystack
from longforge.eval.ruler import check_tasks, ruler_lengths, run_ruler
from longforge.files import atomic_write_text, writing
from longforge.hf import load_model, load_tokenizer

TASK_FILES = ("passkey", "niah", "ruler", "ppl")
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


def grid_lengths(spec: Any, original_length: int, target_length: int) -> list[int]:
    """A grid's lengths: given, or spread from a quarter of the original window to the target."""
    if spec.lengths:
        return sorted(spec.lengths)
    lo = spec.min_length or max(original_length // 4, 64)  # below ~64 tokens no task prompt fits
    hi = spec.max_length or target_length
    return spread_lengths(lo, hi, spec.num_lengths, spec.spacing)


def passkey_lengths(spec: EvalSpec, original_length: int, target_length: int) -> list[int]:
    """The passkey grid's lengths: given, or spread from a quarter of the original window to the target."""
    assert spec.passkey is not None
    return grid_lengths(spec.passkey, original_length, target_length)


def ppl_lengths(lengths: list[int] | None, original_length: int, target_length: int) -> list[int]:
    """Perplexity lengths: given, or doubling from a quarter of the original window to the target."""
    if lengths:
        return sorted(lengths)
    out, n = [], max(original_length // 4, 16)
    while n < target_length:
        out.append(n)
        n *= 2
    return out + [target_length]


def load_ppl_docs(spec: EvalSpec, tokenizer: Any) -> list[list[int]]:
    """Tokenized held-out documents for perplexity, longest first."""
    assert spec.ppl is not None
    src = SourceSpec(name="ppl", path=spec.ppl.source, text_field=spec.ppl.text_field)
    rejects = Rejects()
    texts = [d.text for d in iter_documents(src, rejects)]
    if not texts:
        raise LongforgeError(f"eval.ppl.source {spec.ppl.source} has no usable documents; point it at long text.")
    enc = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return sorted((e.ids for e in enc), key=len, reverse=True)


def check_inputs(spec: EvalSpec) -> None:
    """Fail before any work when an input file is missing or a RULER task lacks the data it needs."""
    for key, path in spec.input_paths().items():
        if not path.exists():
            raise LongforgeError(f"`{key}` {path} does not exist; point it at the file or folder, or remove the key.")
    if spec.ruler is not None:
        r = spec.ruler
        check_tasks(r.task_list(), r.essays, r.squad, r.hotpotqa)


def check_prompts(spec: EvalSpec, tokenizer: Any, original_length: int, target_length: int) -> None:
    """Fail before any work when the shortest passkey or NIAH length cannot hold the task's prompt with this tokenizer.

    Builds one prompt of each grid task at its shortest length (no model needed), so a length too short for the
    task's own text is refused in preflight, not after data, rope and training ran.
    """
    fmt = PromptFormat(spec.inference.chat_template, spec.inference.system_prompt)
    if spec.passkey is not None:
        shortest = min(passkey_lengths(spec, original_length, target_length))
        hay = TextHaystack.load(spec.passkey.haystack, max_words=4 * shortest + 1000) if spec.passkey.haystack else None
        _shortest_prompt("eval.passkey", lambda: build_grid(tokenizer, [shortest], [0.0], 1, spec.seed, fmt, hay))
    if spec.niah is not None:
        nh = spec.niah
        shortest = min(grid_lengths(nh, original_length, target_length))
        hay = TextHaystack.load(nh.haystack, max_words=4 * shortest + 1000) if nh.haystack else None
        needle = Needle(nh.needle, nh.question, nh.answer_prefix)
        _shortest_prompt("eval.niah", lambda: build_niah(tokenizer, [shortest], [0.5], 1, needle, hay, fmt, spec.seed))


def _shortest_prompt(key: str, build: Any) -> None:
    """Run a prompt builder; its 'raise the shortest length' error names the recipe key."""
    try:
        build()
    except LongforgeError as e:
        raise LongforgeError(f"`{key}.lengths`: {e}") from None


def make_engine(model: Any, spec: EvalSpec) -> Engine:
    """The generation engine with the recipe's inference settings."""
    inf = spec.inference
    return Engine(model, prefill_chunk=inf.prefill_chunk, kv_cache=inf.kv_cache, attention=inf.attention,
                  gpu_memory_gib=inf.gpu_memory_gib)


def evaluate(model_dir: Path, spec: EvalSpec, out: Path, original_length: int, target_length: int,
             device: torch.device, label: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """Run the configured tasks on one checkpoint; write <task>.json for each and summary.json."""
    check_inputs(spec)
    tok = load_tokenizer(model_dir, trust_remote_code)
    check_prompts(spec, tok, original_length, target_length)
    out = Path(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(model_dir, device, dtype, trust_remote_code)
    engine = make_engine(model, spec)
    inf = spec.inference
    fmt = PromptFormat(inf.chat_template, inf.system_prompt)
    summary: dict[str, Any] = {"model": str(model_dir), "label": label, "original_length": original_length,
                               "target_length": target_length}
    t0 = time.time()
    seconds: dict[str, float] = {}
    if spec.passkey is not None:
        t = time.time()
        pk = spec.passkey
        res = run_passkey(engine, tok, passkey_lengths(spec, original_length, target_length), pk.depths, pk.trials,
                          spec.seed, pk.batch_size, label=f"{label} passkey", fmt=fmt, batch_tokens=inf.batch_tokens,
                          haystack=pk.haystack)
        _write(out / "passkey.json", res)
        summary["passkey"] = res["summary"]
        seconds["passkey"] = round(time.time() - t, 2)
    if spec.niah is not None:
        t = time.time()
        nh = spec.niah
        res = run_niah(engine, tok, grid_lengths(nh, original_length, target_length), nh.depths, nh.trials, spec.seed,
                       haystack=nh.haystack, needle=Needle(nh.needle, nh.question, nh.answer_prefix),
                       batch_size=nh.batch_size, label=f"{label} niah", fmt=fmt, batch_tokens=inf.batch_tokens,
                       max_new_tokens=nh.max_new_tokens)
        _write(out / "niah.json", res)
        summary["niah"] = {k: v for k, v in res["summary"].items() if k != "grid"}
        seconds["niah"] = round(time.time() - t, 2)
    if spec.ruler is not None:
        t = time.time()
        r = spec.ruler
        res = run_ruler(engine, tok, r.task_list(), sorted(r.lengths) if r.lengths else ruler_lengths(target_length),
                        r.samples, spec.seed, essays=r.essays, squad=r.squad, hotpotqa=r.hotpotqa, fmt=fmt,
                        batch_size=r.batch_size, batch_tokens=inf.batch_tokens, label=f"{label} ruler",
                        threshold=r.threshold, max_new_tokens=r.max_new_tokens)
        _write(out / "ruler.json", res)
        summary["ruler"] = res["summary"]
        seconds["ruler"] = round(time.time() - t, 2)
    if spec.ppl is not None:
        t = time.time()
        docs = load_ppl_docs(spec, tok)
        lengths = ppl_lengths(spec.ppl.lengths, original_length, target_length)
        res = run_ppl(engine, docs, lengths, spec.ppl.num_docs, label=f"{label} ppl", stride=spec.ppl.stride)
        _write(out / "ppl.json", res)
        summary["ppl"] = {str(r["length"]): r["ppl"] for r in res["rows"]}
        seconds["ppl"] = round(time.time() - t, 2)
    summary["engine"] = engine.describe()
    summary["task_seconds"] = seconds
    summary["seconds"] = round(time.time() - t0, 2)
    _write(out / "summary.json", summary)
    return summary


def _write(path: Path, obj: Any) -> None:
    """Write JSON atomically (a reader never sees half a file; a full disk is one sentence)."""
    atomic_write_text(path, json.dumps(obj, indent=1))
