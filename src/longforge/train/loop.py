"""The training loop: claim the output folder, resume from the newest checkpoint, step, log, checkpoint, export.

The loss lives beside the model (model/loss.py), the model's preparation for a layout in train/parallelize.py,
checkpoints and the export in train/checkpoint.py; this module reads top to bottom as one training stage.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longforge.config import StageSpec
from longforge.errors import LongforgeError
from longforge.files import FolderLock, atomic_write_json, atomic_write_text, claim_dir, read_json
from longforge.model.parallel import Layout, all_reduce_sum
from longforge.progress import progress_bar, say
from longforge.train.batches import Batch, BatchSource, targets
from longforge.train.checkpoint import checkpoints, export_dtype, export_final, load_checkpoint, read_meta, save_checkpoint
from longforge.train.flops import attention_context, flops_per_token, peak_flops
from longforge.train.optim import StepInBackward, make_optimizer
from longforge.train.parallelize import TrainingModel, parallelize
from longforge.train.resume import check_resume, current_records
from longforge.train.schedule import lr_at

# What a training output folder holds (the runner adds its markers and an SFT stage its rejects).
TRAIN_ENTRIES = {"checkpoints", "final", "log.jsonl", "tb", "STARTED.json", "DONE.json", "rejects.jsonl"}
FINAL_RECORD = "longforge_train.json"


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) stage reports."""

    final: Path
    steps: int
    last_loss: float
    tokens: int
    seconds: float
    done_before: bool = False  # the stage had already finished: nothing was trained or exported this time


def old_train_folder(folder: Path) -> bool:
    """A training output written before folders were marked: only what train_model and the runner put there."""
    return all(p.name in TRAIN_ENTRIES for p in folder.iterdir() if not p.name.startswith("."))


def train_model(model: Any, source: BatchSource, spec: StageSpec, out: Path, device: torch.device,
                tokenizer_from: Path | None = None, label: str = "train", layout: Layout | None = None,
                validation: BatchSource | None = None) -> TrainResult:
    """Train for spec.steps, resuming from the newest checkpoint in out/checkpoints; export out/final.

    `out` is claimed (a folder of user files is refused) and locked while training, so two runs never mix in it.
    With `validation`, its first spec.val_batches global batches are scored every spec.val_every steps and after the
    last (the step's log record gets val_loss).
    """
    layout = layout or Layout.single(device)
    out = Path(out)
    lock = None
    if layout.is_main:
        claim_dir(out, "training output folder", ours=old_train_folder)
        lock = FolderLock(out, "training output folder").acquire()
    try:
        layout.barrier()
        return _train(model, source, spec, out, tokenizer_from, label, layout, validation)
    finally:
        if lock is not None:
            lock.release()


def _train(model: Any, source: BatchSource, spec: StageSpec, out: Path, tokenizer_from: Path | None, label: str,
           layout: Layout, validation: BatchSource | None = None) -> TrainResult:
    """train_model's work, in a folder it holds: resume point, preparation, the steps, the export."""
    ck_dir = out / "checkpoints"
    records = current_records(spec, getattr(model, "_lf_source_dir", None), tokenizer_from)
    existing = checkpoints(ck_dir)
    last_good = existing[-1] if existing else None
    meta = read_meta(last_good) if last_good is not None else None
    if meta is not None:
        for note in check_resume(meta, records, spec, last_good):
            say(f"{label}: {note}")
        if _finished(out / "final", meta, spec):
            if "loader" in meta and hasattr(source, "load_state_dict"):
                source.load_state_dict(meta["loader"])  # other data or another seed is refused, finished or not
            say(f"{label}: already done at step {meta['step']} (checkpoint {last_good}); final model {out / 'final'}")
            return TrainResult(out / "final", spec.steps, float(meta.get("loss", float("nan"))), 0, 0.0, done_before=True)

    dtype = export_dtype(model)  # read before preparation changes the weights' dtype
    training = parallelize(model, spec, layout, source.batch(0, 0).input_ids.shape[1])
    optimizer = make_optimizer(training.net, spec.optimizer, spec.lr, spec.betas, spec.weight_decay)
    stepper = step_in_backward(training, optimizer) if spec.optimizer_in_backward else None

    start, last_loss = 0, float("nan")
    if meta is not None:
        load_checkpoint(last_good, training.net, optimizer, layout)
        start, last_loss = int(meta["step"]), float(meta.get("loss", last_loss))
        if "loader" in meta and hasattr(source, "load_state_dict"):
            # The loader continues after the last sequence the checkpoint saw, even with another batch or world size.
            source.load_state_dict(meta["loader"])
        say(f"{label}: resuming from step {start} of {spec.steps} (checkpoint {last_good})")

    peak = peak_flops(layout.device)
    t_start = time.time()
    tokens_done = 0
    with _StepLog(out, start, spec.tensorboard and layout.is_main, layout.is_main) as log, progress_bar() as bar:
        task = bar.add_task(f"{label}: step", total=spec.steps, completed=start, visible=layout.is_main)
        for step in range(start, spec.steps):
            rec = _train_step(training, optimizer, source, step, peak, stepper)
            if not math.isfinite(rec["loss"]) or not math.isfinite(rec["grad_norm"]):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise LongforgeError(
                    f"{label}: loss became {rec['loss']} (grad norm {rec['grad_norm']}) at step {step}; {where}. "
                    "Lower the learning rate or check the data.")
            tokens_done += rec["tokens"]
            last_loss = rec["loss"]
            every = getattr(spec, "val_every", 0) or spec.steps
            if validation is not None and ((step + 1) % every == 0 or step + 1 == spec.steps):
                rec["val_loss"] = round(_validate(training, validation, getattr(spec, "val_batches", 4)), 5)
            log.write(rec)
            bar.update(task, advance=1, description=f"{label}: loss {last_loss:.3f}")
            if (step + 1) % spec.save_every == 0 or step + 1 == spec.steps:
                extra: dict[str, Any] = {"loss": last_loss, **records}
                if hasattr(source, "state_dict"):
                    extra["loader"] = source.state_dict(step + 1)
                last_good = save_checkpoint(ck_dir, step + 1, training.net, optimizer, layout, extra)

    final = export_final(training.net, layout, out / "final", tokenizer_from, dtype)
    if layout.is_main:
        # Written after the export is whole: a re-run that finds it (and no newer checkpoint) has nothing to do.
        atomic_write_json(final / FINAL_RECORD, {"step": spec.steps, "checkpoint": last_good.name if last_good else None,
                                                  "loss": last_loss})
    layout.barrier()
    return TrainResult(final, spec.steps, last_loss, tokens_done, time.time() - t_start)


class _StepLog:
    """log.jsonl (cut back to the resumed step, so it reads as one run) and TensorBoard, on the main process only."""

    def __init__(self, out: Path, start: int, tensorboard: bool, main: bool):
        self.path, self.start, self.tensorboard, self.main = out / "log.jsonl", start, tensorboard, main
        self.file: Any = None
        self.board: Any = None

    def __enter__(self) -> "_StepLog":
        if self.main:
            _truncate_log(self.path, self.start)
            self.file = self.path.open("a")
        if self.tensorboard:
            self.board = _tensorboard(self.path.parent / "tb")
        return self

    def write(self, rec: dict[str, Any]) -> None:
        """Append one step's record (flushed: a crash keeps every finished step)."""
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.board is not None:
            for key, value in rec.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(f"train/{key}", value, rec["step"])

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def _finished(final: Path, meta: dict[str, Any], spec: StageSpec) -> bool:
    """Whether the newest checkpoint is the last step and final/ was exported from it (nothing left to do)."""
    record = read_json(final / FINAL_RECORD)
    return (int(meta["step"]) == spec.steps and isinstance(record, dict) and record.get("step") == spec.steps
            and (final / "config.json").is_file())


def step_in_backward(training: TrainingModel, optimizer: torch.optim.Optimizer) -> StepInBackward:
    """The optimizer hooked into backward (optimizer_in_backward), refused where gradients are sharded."""
    if training.layout.distributed:
        raise LongforgeError("optimizer_in_backward works in one process (FSDP2 already shards the gradients over "
                             "several); turn it off for runs under torchrun.")
    return StepInBackward(training.net, optimizer)


def _train_step(training: TrainingModel, optimizer: torch.optim.Optimizer, source: BatchSource, step: int,
                peak: float | None, stepper: StepInBackward | None = None) -> dict[str, Any]:
    """One optimizer step over spec.grad_accum micro-batches (or updates during backward); the step's log record."""
    spec, layout = training.spec, training.layout
    t0 = time.time()
    lr = lr_at(step, spec)
    for g in optimizer.param_groups:
        g["lr"] = lr
    micro = [source.batch(step, m).to(layout.device) for m in range(spec.grad_accum)]
    prepared = [(b, *targets(b)) for b in micro]
    # Normalise by every target token of the global batch (all micro-batches, all data-parallel replicas),
    # so accumulation and parallel layout never change the loss. Sequence-parallel ranks share rows: count once.
    local_w = sum(w.sum() for _, _, w in prepared)
    total_w = all_reduce_sum(local_w.float() / layout.sp, layout)
    if float(total_w) == 0:
        raise LongforgeError(f"step {step} has no target tokens (every token is masked); check the data and its separators.")
    loss_sum = torch.zeros((), device=layout.device)
    for b, labels, weights in prepared:
        part = training.micro_loss(b, labels, weights)
        # FSDP averages gradients over processes; scaling by their number turns that into the sum we want.
        (part * layout.world / total_w).backward()
        loss_sum += part.detach()
    loss = float(all_reduce_sum(loss_sum, layout) / total_w)
    if stepper is not None:
        grad_norm = stepper.grad_norm()  # the weights were updated during backward
    else:
        grad_norm = _clip(training.net, spec.clip_grad)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if layout.device.type == "cuda":
        torch.cuda.synchronize(layout.device)
    dt = time.time() - t0
    n_tok = sum(b.num_tokens for b in micro) * layout.dp
    rec: dict[str, Any] = {"step": step + 1, "loss": round(loss, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                           "tokens": n_tok, "tokens_per_s": round(n_tok / max(dt, 1e-9), 1), "seconds": round(dt, 4)}
    if training.offload is not None:
        rec["offloaded_gib"] = round(training.offload.host_bytes / 2**30, 3)
    if peak:
        docs = _doc_lengths(micro) if spec.document_mask else [b.input_ids.shape[1] for b in micro for _ in b.input_ids]
        rec["mfu"] = round(flops_per_token(training.net.lm.config, attention_context(docs)) * n_tok / dt / (peak * layout.world), 4)
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(layout.device) / 2**30, 2)
    return rec


@torch.no_grad()
def _validate(training: TrainingModel, source: BatchSource, batches: int) -> float:
    """Mean next-token loss over the first `batches` global batches of a held-out source (the same every time),
    normalised as the training loss is: every target token of every process counted once."""
    layout = training.layout
    total = torch.zeros((), device=layout.device)
    weight = torch.zeros((), device=layout.device)
    for i in range(batches):
        b = source.batch(i, 0).to(layout.device)
        labels, w = targets(b)
        total += training.micro_loss(b, labels, w).detach().float()
        weight += w.sum() / layout.sp  # sequence-parallel ranks hold the same rows
    return float(all_reduce_sum(total, layout) / all_reduce_sum(weight, layout))


def _clip(net: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (0: measure only); the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm or math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _tensorboard(folder: Path) -> Any:
    """A TensorBoard writer, or a clear error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LongforgeError("`tensorboard: true` needs the tensorboard package; pip install 'longforge[tensorboard]'.") from None
    return SummaryWriter(str(folder))


def _doc_lengths(micro: list[Batch]) -> list[int]:
    """Lengths of the packed documents of some micro-batches (for attention FLOPs under document masks)."""
    out: list[int] = []
    for b in micro:
        d = b.doc_ids.cpu()
        for row in d:
            _, counts = torch.unique_consecutive(row, return_counts=True)
            out.extend(counts.tolist())
    return out


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (and a line cut by a crash), so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))
