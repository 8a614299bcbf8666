"""What a training stage runs with, recorded in every checkpoint and compared when the stage resumes.

A resume continues one run: the same learning rate and schedule, optimizer, model and tokenizer. Anything else
would mix two runs under one folder, so it is refused with the setting that differs. `steps` alone may change;
the schedule is then recomputed for the new total (lr stays a pure function of step and settings, so every later
resume and the log agree), and the change is printed with the lr it gives at the next step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longforge.config import StageSpec
from longforge.errors import LongforgeError
from longforge.files import content_stamp
from longforge.hf import weight_files
from longforge.train.schedule import lr_at

# The settings that define the optimisation a checkpoint is part of (steps is handled on its own).
SETTINGS = ("lr", "schedule", "warmup_steps", "min_lr_ratio", "optimizer", "betas", "weight_decay")
TOKENIZER_IDENTITY = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                      "special_tokens_map.json")


def settings_record(spec: StageSpec) -> dict[str, Any]:
    """The stage's optimisation settings as JSON values."""
    rec = {k: getattr(spec, k) for k in SETTINGS}
    rec["betas"] = list(rec["betas"])
    rec["steps"] = spec.steps
    return rec


def _identity(files: list[Path]) -> list[list[Any]]:
    """Name, size and content hash of each file (not its mtime: a copy of the same model is the same model)."""
    out = []
    for f in files:
        stamp = content_stamp(f)
        _, size, _, digest = stamp[1]
        out.append([f.name, size, digest])
    return out


def folder_record(path: Path | None, names: tuple[str, ...] | None = None) -> dict[str, Any] | None:
    """Where a model or tokenizer folder is and what it holds (config and weights, or the tokenizer files)."""
    if path is None or not Path(path).is_dir():
        return None
    path = Path(path)
    if names is None:
        files = [path / "config.json"] + weight_files(path)
    else:
        files = [path / n for n in names]
    return {"path": str(path.resolve()), "files": _identity([f for f in files if f.is_file()])}


def current_records(spec: StageSpec, model_dir: Path | None, tokenizer_dir: Path | None) -> dict[str, Any]:
    """What this run trains with: settings, model folder and tokenizer (stored in each checkpoint's meta.json)."""
    return {"settings": settings_record(spec), "model": folder_record(model_dir),
            "tokenizer": folder_record(tokenizer_dir, TOKENIZER_IDENTITY)}


def _say_values(rec: dict[str, Any], keys: list[str]) -> str:
    return " and ".join(f"{k} {rec.get(k)!r}" if isinstance(rec.get(k), str) else f"{k} {rec.get(k)}" for k in keys)


def check_resume(meta: dict[str, Any], now: dict[str, Any], spec: StageSpec, checkpoint: Path) -> list[str]:
    """Refuse a resume that would mix runs (one sentence naming what differs); return notes on what is allowed."""
    fix = "or train into a new --out to start afresh"
    step = int(meta["step"])
    if step > spec.steps:
        raise LongforgeError(f"checkpoint {checkpoint} is at step {step}, past the {spec.steps} steps asked for; "
                             f"pass --steps {step} or more to continue it, {fix}.")
    if "settings" not in meta:
        return [f"checkpoint {checkpoint.name} was written by an older longforge that recorded no settings, so its lr, "
                "schedule, model and tokenizer are not checked against this run"]
    old, new = meta["settings"], now["settings"]
    differ = [k for k in SETTINGS if old.get(k) != new[k]]
    if differ:
        raise LongforgeError(f"checkpoint {checkpoint} was trained with {_say_values(old, differ)}, but this run asks "
                             f"for {_say_values(new, differ)}; resume with the same setting{'s' if len(differ) > 1 else ''}, {fix}.")
    notes = []
    for what, noun in (("model", "config or weights"), ("tokenizer", "tokenizer files")):
        note = _check_folder(what, noun, meta.get(what), now[what], checkpoint, fix)
        if note:
            notes.append(note)
    if old.get("steps") != spec.steps:
        notes.append(steps_change(old["steps"], spec, step))
    return notes


def _check_folder(what: str, noun: str, old: dict[str, Any] | None, new: dict[str, Any] | None, checkpoint: Path,
                  fix: str) -> str | None:
    """Refuse another model or tokenizer; a moved folder with the same files is only noted."""
    if old is None or new is None:
        return None
    if old["files"] != new["files"]:
        if old["path"] == new["path"]:
            raise LongforgeError(f"checkpoint {checkpoint} continues the {what} in {old['path']}, whose {noun} have "
                                 f"changed since; restore that {what}, {fix}.")
        raise LongforgeError(f"checkpoint {checkpoint} continues the {what} in {old['path']}, but this run loads "
                             f"{new['path']}, whose {noun} differ; resume with {old['path']}, {fix}.")
    if old["path"] != new["path"]:
        return f"the {what} folder is now {new['path']} (was {old['path']}); its {noun} are the same"
    return None


def steps_change(old_steps: int, spec: StageSpec, step: int) -> str:
    """How a changed `steps` changes the schedule from the resumed step on (lr recomputed for the new total)."""
    verb = "raised" if spec.steps > old_steps else "lowered"
    head = f"steps {verb} from {old_steps} to {spec.steps}"
    if step >= spec.steps:
        return f"{head}: the checkpoint at step {step} already reached it"
    before = spec.model_copy(update={"steps": old_steps})
    last, nxt = lr_at(step - 1, before), lr_at(step, spec)
    if spec.schedule == "constant":
        return f"{head}: the schedule is constant, so the lr does not change ({nxt:.2e} at step {step + 1})"
    return (f"{head}: the schedule is recomputed for {spec.steps} steps; lr at step {step + 1} is {nxt:.2e} "
            f"instead of continuing from {last:.2e}")
