"""The training loop: token-averaged loss over the global batch, chunked LM head, checkpoints and resume."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from longforge.config import StageSpec
from longforge.errors import LongforgeError
from longforge.hf import save_model
from longforge.model.attention import use_longforge_attention
from longforge.progress import progress_bar
from longforge.train.batches import Batch, BatchSource, targets
from longforge.train.schedule import lr_at

LOSS_CHUNK = 4096
KEEP_CHECKPOINTS = 2


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) stage reports."""

    final: Path
    steps: int
    last_loss: float
    tokens: int
    seconds: float


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
    bias = getattr(lm_head, "bias", None)
    assert bias is None, "LM heads with a bias are not supported"
    for i in range(0, h.shape[0], chunk):
        part = slice(i, i + chunk)
        if torch.is_grad_enabled():
            # Recompute each chunk's logits in backward instead of keeping them.
            total = total + checkpoint(_ce_chunk, h[part], lm_head.weight, lab[part], w[part], use_reentrant=False)
        else:
            total = total + _ce_chunk(h[part], lm_head.weight, lab[part], w[part])
    return total


def forward_loss(model: Any, batch: Batch, document_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss sum, weight sum) of one micro-batch."""
    labels, weights = targets(batch)
    kwargs = {"lf_doc_ids": batch.doc_ids} if document_mask else {}
    out = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs)
    loss_sum = chunked_lm_loss(out.last_hidden_state, model.get_output_embeddings(), labels, weights)
    return loss_sum, weights.sum()


def _checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in step order (a checkpoint is complete once its meta.json exists)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / "meta.json").is_file())


def save_checkpoint(folder: Path, step: int, model: Any, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
    """Write model, optimizer and RNG state atomically (temp folder, then rename); keep the last few."""
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}, tmp / "rng.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **extra}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoints(folder)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG state; returns the checkpoint's meta."""
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return json.loads((path / "meta.json").read_text())


def make_optimizer(model: Any, spec: StageSpec) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases or 1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=1e-8)


def train_model(model: Any, source: BatchSource, spec: StageSpec, out: Path, device: torch.device,
                tokenizer_from: Path | None = None, label: str = "train") -> TrainResult:
    """Train `model` for spec.steps, resuming from the newest checkpoint in out/checkpoints; export out/final."""
    out = Path(out)
    ck_dir = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    use_longforge_attention(model)
    model.train()
    optimizer = make_optimizer(model, spec)
    start = 0
    existing = _checkpoints(ck_dir)
    if existing:
        meta = load_checkpoint(existing[-1], model, optimizer)
        start = int(meta["step"])
    log_path = out / "log.jsonl"
    _truncate_log(log_path, start)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    t_start = time.time()
    tokens_done = 0
    last_loss = float("nan")
    last_good = existing[-1] if existing else None
    with progress_bar() as bar, log_path.open("a") as log:
        task = bar.add_task(f"{label}: step", total=spec.steps, completed=start)
        for step in range(start, spec.steps):
            t0 = time.time()
            lr = lr_at(step, spec)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro = [source.batch(step, m).to(device) for m in range(spec.grad_accum)]
            total_w = sum(targets(b)[1].sum() for b in micro)
            if float(total_w) == 0:
                raise LongforgeError(f"step {step} has no target tokens (every token is masked); check the data and its separators.")
            loss_total = 0.0
            for b in micro:
                with autocast:
                    loss_sum, _ = forward_loss(model, b, spec.document_mask)
                # Normalise by the whole global batch's target count, so accumulation and layout never change the loss.
                (loss_sum / total_w).backward()
                loss_total += float(loss_sum.detach()) / float(total_w)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip_grad))
            if not math.isfinite(loss_total) or not math.isfinite(grad_norm):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise LongforgeError(
                    f"{label}: loss became {loss_total} (grad norm {grad_norm}) at step {step}; {where}. Lower the learning rate or check the data."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_tok = sum(b.num_tokens for b in micro)
            tokens_done += n_tok
            dt = time.time() - t0
            last_loss = loss_total
            rec = {"step": step + 1, "loss": round(loss_total, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                   "tokens": n_tok, "tokens_per_s": round(n_tok / max(dt, 1e-9), 1), "seconds": round(dt, 4)}
            if device.type == "cuda":
                rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.update(task, advance=1, description=f"{label}: loss {loss_total:.3f}")
            if (step + 1) % spec.save_every == 0 or step + 1 == spec.steps:
                last_good = save_checkpoint(ck_dir, step + 1, model, optimizer, {"loss": loss_total})
    model.eval()
    model.set_attn_implementation("sdpa")
    final = save_model(model, out / "final", tokenizer_from=tokenizer_from)
    return TrainResult(final, spec.steps, last_loss, tokens_done, time.time() - t_start)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step, so a resumed run's log reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))
