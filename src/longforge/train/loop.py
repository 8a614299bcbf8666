"""The training loop: token-averaged loss over the global batch, chunked LM head, parallel layouts, checkpoints and resume."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from longforge.config import StageSpec
from longforge.errors import LongforgeError
from longforge.files import FolderLock, atomic_write_json, atomic_write_text, claim_dir, read_json
from longforge.hf import save_model
from longforge.model.attention import resolve_backend, use_longforge_attention
from longforge.model.fused import apply_fused_ops, fused_available
from longforge.model.memory import ActivationOffload, apply_checkpointing, apply_lean_norms, apply_tiled_mlp
from longforge.model.parallel import Layout, SequenceParallel, all_reduce_sum, apply_fsdp, check_layout
from longforge.progress import progress_bar, say
from longforge.train.batches import Batch, BatchSource, targets
from longforge.train.checkpoint import barrier, checkpoints, load_checkpoint, read_meta, save_checkpoint
from longforge.train.flops import attention_context, flops_per_token, peak_flops
from longforge.train.optim import StepInBackward, make_optimizer
from longforge.train.resume import check_resume, current_records
from longforge.train.schedule import lr_at

LOSS_CHUNK = 4096
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


def _ce_chunk(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    return (F.cross_entropy(logits, labels, reduction="none") * w).sum()


def chunked_lm_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, weights: torch.Tensor,
                    chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Weighted sum of token losses, computing the LM head in chunks so the full logits never exist."""
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    w = weights.reshape(-1)
    keep = w > 0
    h, lab, w = h[keep], lab[keep], w[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    assert getattr(lm_head, "bias", None) is None, "LM heads with a bias are not supported"
    weight = lm_head.weight
    for i in range(0, h.shape[0], chunk):
        part = slice(i, i + chunk)
        if torch.is_grad_enabled():
            # Recompute each chunk's logits in backward instead of keeping them.
            total = total + checkpoint(_ce_chunk, h[part], weight, lab[part], w[part], use_reentrant=False)
        else:
            total = total + _ce_chunk(h[part], weight, lab[part], w[part])
    return total


class LossModel(torch.nn.Module):
    """A causal LM whose forward returns the summed weighted loss (so FSDP gathers the LM head once per step)."""

    def __init__(self, lm: Any):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                **attention_kwargs: Any) -> torch.Tensor:
        """Summed weighted next-token loss of the given tokens."""
        out = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **attention_kwargs)
        return chunked_lm_loss(out.last_hidden_state, self.lm.get_output_embeddings(), labels, weights)


@dataclass
class Engine:
    """A model made ready for one training layout: attention back-end, memory savers, sharding."""

    net: LossModel
    layout: Layout
    spec: StageSpec
    backend: str
    seq_len: int
    autocast: bool = False
    offload: ActivationOffload | None = None

    def attention_kwargs(self, doc_ids: torch.Tensor) -> dict[str, Any]:
        """What the attention function needs: full-sequence document ids and the sequence-parallel group."""
        kw: dict[str, Any] = {"lf_backend": self.backend}
        if self.spec.document_mask:
            kw["lf_doc_ids"] = doc_ids
        if self.layout.sp > 1:
            kw["lf_sp"] = SequenceParallel(self.layout.sp_group, self.layout.sp)
        return kw

    def micro_loss(self, batch: Batch, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Summed loss of this process's slice of one micro-batch."""
        ids, pos = batch.input_ids, batch.position_ids
        if self.layout.sp > 1:
            # Every rank of a sequence-parallel group holds the same rows; each keeps its slice of the sequence.
            n = ids.shape[1] // self.layout.sp
            cut = slice(self.layout.sp_rank * n, (self.layout.sp_rank + 1) * n)
            ids, pos, labels, weights = ids[:, cut], pos[:, cut], labels[:, cut], weights[:, cut]
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)
        offload = self.offload() if self.offload is not None else contextlib.nullcontext()
        with offload, amp:
            return self.net(ids, pos, labels, weights, **self.attention_kwargs(batch.doc_ids))


def resolve_precision(spec: StageSpec, device: torch.device) -> str:
    """fp32 on CPU, bf16 with fp32 master weights on CUDA, unless the spec says otherwise."""
    if spec.precision != "auto":
        return spec.precision
    return "bf16-mixed" if device.type == "cuda" else "fp32"


def prepare(model: Any, spec: StageSpec, layout: Layout, seq_len: int) -> Engine:
    """Attention back-end, precision, checkpointing, fused ops, tiled MLP, lean norms and FSDP2 sharding, in that order."""
    check_layout(model.config, seq_len, spec.sp)
    n_layers = len(model.model.layers)
    if spec.resident_layers > n_layers:
        raise LongforgeError(f"resident_layers {spec.resident_layers} is more than the model's {n_layers} layers; "
                             f"use at most {n_layers} (all of them means nothing is offloaded).")
    use_longforge_attention(model)
    precision = resolve_precision(spec, layout.device)
    if precision == "bf16":
        model.to(torch.bfloat16)
    checkpointing = spec.activation_checkpointing == "on" or (
        spec.activation_checkpointing == "auto" and layout.device.type == "cuda")
    if checkpointing:
        apply_checkpointing(model, spec.checkpoint_policy)
    fused = spec.fused_ops == "on" or (spec.fused_ops == "auto" and fused_available(layout.device))
    if fused:
        apply_fused_ops(model, norms=spec.lean_norm)  # before tiling: the tiles call the fused MLP
    if spec.mlp_tile:
        apply_tiled_mlp(model, spec.mlp_tile)
    if spec.lean_norm and not fused:
        apply_lean_norms(model)
    model.to(layout.device)
    net = LossModel(model)
    if layout.distributed:
        apply_fsdp(net, model.model.layers, layout, torch.bfloat16 if precision == "bf16-mixed" else None)
    net.train()
    offload = None
    if spec.offload_activations and layout.device.type == "cuda":
        offload = ActivationOffload(model.model.layers, spec.resident_layers)
    backend = resolve_backend(spec.attention, layout.device, spec.document_mask, precision == "bf16")
    # Without FSDP's mixed-precision policy, bf16-mixed means fp32 weights under bf16 autocast.
    autocast = precision == "bf16-mixed" and not layout.distributed and layout.device.type == "cuda"
    return Engine(net, layout, spec, backend, seq_len, autocast, offload)


def export_final(engine: Engine, out: Path, tokenizer_from: Path | None, dtype: torch.dtype) -> Path:
    """Write the trained model as a plain HF safetensors checkpoint (gathered on the main process)."""
    lm = engine.net.lm
    if not engine.layout.distributed:
        lm.eval()
        lm.set_attn_implementation("sdpa")
        if dtype != next(lm.parameters()).dtype:
            lm.to(dtype)
        return save_model(lm, out, tokenizer_from=tokenizer_from)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(engine.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if engine.layout.is_main:
        config = lm.config
        config._attn_implementation = "sdpa"
        # The class the model was loaded as: no auto-class lookup, so no checkpoint code is looked for or run.
        fresh = type(lm)._from_config(config, dtype=dtype)
        fresh.load_state_dict({k[len("lm."):]: v for k, v in full.items()})
        save_model(fresh, out, tokenizer_from=tokenizer_from)
    barrier(engine.layout)
    return out


def _export_dtype(model: Any) -> torch.dtype:
    """The dtype of the checkpoint the model was loaded from (bf16 checkpoints stay bf16), else the parameters' dtype."""
    declared = getattr(model, "_lf_source_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    if isinstance(declared, str) and hasattr(torch, declared):
        return getattr(torch, declared)
    return next(model.parameters()).dtype


def forward_loss(model: Any, batch: Batch, document_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss sum, weight sum) of one micro-batch on a single process (a reference for tests)."""
    labels, weights = targets(batch)
    kwargs = {"lf_doc_ids": batch.doc_ids} if document_mask else {}
    out = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs)
    return chunked_lm_loss(out.last_hidden_state, model.get_output_embeddings(), labels, weights), weights.sum()


def old_train_folder(folder: Path) -> bool:
    """A training output written before folders were marked: only what train_model and the runner put there."""
    return all(p.name in TRAIN_ENTRIES for p in folder.iterdir() if not p.name.startswith("."))


def train_model(model: Any, source: BatchSource, spec: StageSpec, out: Path, device: torch.device,
                tokenizer_from: Path | None = None, label: str = "train", layout: Layout | None = None) -> TrainResult:
    """Train for spec.steps, resuming from the newest checkpoint in out/checkpoints; export out/final.

    `out` is claimed (a folder of user files is refused) and locked while training, so two runs never mix in it.
    """
    layout = layout or Layout(1, 0, 1, 1, device)
    out = Path(out)
    lock = None
    if layout.is_main:
        claim_dir(out, "training output folder", ours=old_train_folder)
        lock = FolderLock(out, "training output folder").acquire()
    try:
        barrier(layout)
        return _train(model, source, spec, out, tokenizer_from, label, layout)
    finally:
        if lock is not None:
            lock.release()


def _train(model: Any, source: BatchSource, spec: StageSpec, out: Path, tokenizer_from: Path | None, label: str,
           layout: Layout) -> TrainResult:
    """train_model's work, in a folder it holds."""
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
    export_dtype = _export_dtype(model)
    probe = source.batch(0, 0)
    engine = prepare(model, spec, layout, probe.input_ids.shape[1])
    optimizer = make_optimizer(engine.net, spec.optimizer, spec.lr, spec.betas, spec.weight_decay)
    stepper = step_in_backward(engine, optimizer) if spec.optimizer_in_backward else None
    start = 0
    last_loss = float("nan")
    if meta is not None:
        load_checkpoint(last_good, engine.net, optimizer, layout)
        start, last_loss = int(meta["step"]), float(meta.get("loss", last_loss))
        if "loader" in meta and hasattr(source, "load_state_dict"):
            # The loader continues after the last sequence the checkpoint saw, even with another batch or world size.
            source.load_state_dict(meta["loader"])
        say(f"{label}: resuming from step {start} of {spec.steps} (checkpoint {last_good})")
    log_path = out / "log.jsonl"
    if layout.is_main:
        _truncate_log(log_path, start)
    peak = peak_flops(layout.device)
    t_start = time.time()
    tokens_done = 0
    log = log_path.open("a") if layout.is_main else None
    board = _tensorboard(out / "tb") if spec.tensorboard and layout.is_main else None
    try:
        with progress_bar() as bar:
            task = bar.add_task(f"{label}: step", total=spec.steps, completed=start, visible=layout.is_main)
            for step in range(start, spec.steps):
                rec = _train_step(engine, optimizer, source, step, peak, stepper)
                if not math.isfinite(rec["loss"]) or not math.isfinite(rec["grad_norm"]):
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                    raise LongforgeError(
                        f"{label}: loss became {rec['loss']} (grad norm {rec['grad_norm']}) at step {step}; {where}. "
                        "Lower the learning rate or check the data.")
                tokens_done += rec["tokens"]
                last_loss = rec["loss"]
                if log is not None:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if board is not None:
                    for key, value in rec.items():
                        if key != "step" and isinstance(value, (int, float)):
                            board.add_scalar(f"train/{key}", value, rec["step"])
                bar.update(task, advance=1, description=f"{label}: loss {last_loss:.3f}")
                if (step + 1) % spec.save_every == 0 or step + 1 == spec.steps:
                    extra: dict[str, Any] = {"loss": last_loss, **records}
                    if hasattr(source, "state_dict"):
                        extra["loader"] = source.state_dict(step + 1)
                    last_good = save_checkpoint(ck_dir, step + 1, engine.net, optimizer, layout, extra)
    finally:
        if log is not None:
            log.close()
        if board is not None:
            board.close()
    final = export_final(engine, out / "final", tokenizer_from, export_dtype)
    if layout.is_main:
        # Written after the export is whole: a re-run that finds it (and no newer checkpoint) has nothing to do.
        atomic_write_json(final / FINAL_RECORD, {"step": spec.steps, "checkpoint": last_good.name if last_good else None,
                                                  "loss": last_loss})
    barrier(layout)
    return TrainResult(final, spec.steps, last_loss, tokens_done, time.time() - t_start)


def _finished(final: Path, meta: dict[str, Any], spec: StageSpec) -> bool:
    """Whether the newest checkpoint is the last step and final/ was exported from it (nothing left to do)."""
    record = read_json(final / FINAL_RECORD)
    return (int(meta["step"]) == spec.steps and isinstance(record, dict) and record.get("step") == spec.steps
            and (final / "config.json").is_file())


def step_in_backward(engine: Engine, optimizer: torch.optim.Optimizer) -> StepInBackward:
    """The optimizer hooked into backward (optimizer_in_backward), refused where gradients are sharded."""
    if engine.layout.distributed:
        raise LongforgeError("optimizer_in_backward works in one process (FSDP2 already shards the gradients over "
                             "several); turn it off for runs under torchrun.")
    return StepInBackward(engine.net, optimizer)


def _train_step(engine: Engine, optimizer: torch.optim.Optimizer, source: BatchSource, step: int,
                peak: float | None, stepper: StepInBackward | None = None) -> dict[str, Any]:
    """One optimizer step over spec.grad_accum micro-batches (or updates during backward); the step's log record."""
    spec, layout = engine.spec, engine.layout
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
        part = engine.micro_loss(b, labels, weights)
        # FSDP averages gradients over processes; scaling by their number turns that into the sum we want.
        (part * layout.world / total_w).backward()
        loss_sum += part.detach()
    loss = float(all_reduce_sum(loss_sum, layout) / total_w)
    if stepper is not None:
        grad_norm = stepper.grad_norm()  # the weights were updated during backward
    else:
        grad_norm = _clip(engine.net, spec.clip_grad)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if layout.device.type == "cuda":
        torch.cuda.synchronize(layout.device)
    dt = time.time() - t0
    n_tok = sum(b.num_tokens for b in micro) * layout.dp
    rec: dict[str, Any] = {"step": step + 1, "loss": round(loss, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                           "tokens": n_tok, "tokens_per_s": round(n_tok / max(dt, 1e-9), 1), "seconds": round(dt, 4)}
    if engine.offload is not None:
        rec["offloaded_gib"] = round(engine.offload.host_bytes / 2**30, 3)
    if peak:
        docs = _doc_lengths(micro) if spec.document_mask else [b.input_ids.shape[1] for b in micro for _ in b.input_ids]
        rec["mfu"] = round(flops_per_token(engine.net.lm.config, attention_context(docs)) * n_tok / dt / (peak * layout.world), 4)
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(layout.device) / 2**30, 2)
    return rec


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
