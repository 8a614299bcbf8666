"""Attention with document masks, the loss, the loop, accumulation, resume and NaN handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from longforge.config import StageSpec
from longforge.errors import LongforgeError
from longforge.model.attention import use_longforge_attention
from longforge.positions.transforms import contiguous, doc_ids_from_starts
from longforge.train.batches import IGNORE, Batch, targets
from longforge.model.loss import chunked_lm_loss
from longforge.train.loop import train_model
from longforge.train.parallelize import forward_loss


def _packed(lengths: list[int], vocab: int, seed: int = 0, counting: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed documents of random tokens, or of counting sequences (k, k+1, ...) that a model can learn."""
    g = torch.Generator().manual_seed(seed)
    if counting:
        ids = torch.cat([(torch.randint(1, vocab, (1,), generator=g) + torch.arange(n)) % (vocab - 1) + 1 for n in lengths])[None]
    else:
        ids = torch.randint(1, vocab, (1, sum(lengths)), generator=g)
    starts = np.cumsum([0] + lengths[:-1])
    docs = doc_ids_from_starts(starts, sum(lengths))
    return ids, torch.from_numpy(docs)[None], torch.from_numpy(contiguous(docs, restart=True))[None]


def test_document_masked_attention_equals_each_document_alone() -> None:
    model = make_tiny_model(50)
    lengths = [7, 12, 5]
    ids, docs, pos = _packed(lengths, 50)
    alone = []
    with torch.no_grad():
        start = 0
        for n in lengths:
            alone.append(model(input_ids=ids[:, start : start + n]).logits)
            start += n
        use_longforge_attention(model)
        packed = model(input_ids=ids, position_ids=pos, lf_doc_ids=docs).logits
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)


def test_without_doc_ids_it_is_plain_causal_attention() -> None:
    model = make_tiny_model(50)
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        use_longforge_attention(model)
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=1e-5, atol=1e-5)


def test_targets_skip_the_first_token_of_each_document() -> None:
    ids, docs, pos = _packed([3, 4], 50)
    labels, w = targets(Batch(ids, docs, pos))
    assert labels[0, :2].tolist() == ids[0, 1:3].tolist()
    assert labels[0, 2] == IGNORE  # position 2 would predict the first token of document 2
    assert labels[0, -1] == IGNORE
    assert w.sum() == 5
    lw = torch.ones_like(ids, dtype=torch.float32)
    lw[0, 4] = 10.0
    _, w2 = targets(Batch(ids, docs, pos, lw))
    assert w2[0, 3] == 10.0 and w2.sum() == 14


def test_chunked_loss_equals_full_cross_entropy() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    h = torch.randn(2, 11, 8)
    labels = torch.randint(0, 30, (2, 11))
    w = torch.rand(2, 11)
    w[0, 3] = 0
    full = (F.cross_entropy(head(h).reshape(-1, 30), labels.reshape(-1), reduction="none") * w.reshape(-1)).sum()
    torch.testing.assert_close(chunked_lm_loss(h, head, labels, w, chunk=4), full)


class _Source:
    """Deterministic random micro-batches of packed documents."""

    def __init__(self, vocab: int, micro: int, seq: int = 24, fail_at: int | None = None):
        self.vocab, self.micro, self.seq, self.fail_at = vocab, micro, seq, fail_at

    def rows(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [_packed([9, self.seq - 9], self.vocab, seed=1000 * step + r, counting=True) for r in range(4)]

    def batch(self, step: int, micro: int) -> Batch:
        if self.fail_at is not None and step == self.fail_at:
            raise KeyboardInterrupt
        rows = self.rows(step)[micro * self.micro : (micro + 1) * self.micro]
        return Batch(*(torch.cat(c) for c in zip(*rows)))


def test_gradient_accumulation_matches_one_big_batch() -> None:
    grads, losses = [], []
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        model = make_tiny_model(50)
        use_longforge_attention(model)
        src = _Source(50, micro)
        batches = [src.batch(0, m) for m in range(accum)]
        total = sum(targets(b)[1].sum() for b in batches)
        loss = 0.0
        for b in batches:
            s, _ = forward_loss(model, b, document_mask=True)
            (s / total).backward()
            loss += float(s.detach() / total)
        losses.append(loss)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) == pytest.approx(losses[2], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-4, atol=1e-6)


def _spec(steps: int = 6) -> StageSpec:
    return StageSpec(steps=steps, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=2, save_every=2)


def test_loss_goes_down_and_final_checkpoint_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = make_tiny_model(50)
    src = _Source(50, 2)
    res = train_model(model, src, _spec(12), tmp_path / "run", torch.device("cpu"))
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < log[0]["loss"]
    reloaded = AutoModelForCausalLM.from_pretrained(res.final)
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k


class _HeldOut(_Source):
    """Other rows than the training source's (their own seeds), several documents each."""

    def rows(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [_packed([5, 11, self.seq - 16], self.vocab, seed=777_000 + 1000 * step + r) for r in range(4)]


def test_validation_loss_is_each_held_out_document_scored_alone(tmp_path: Path) -> None:
    """val_loss is logged every val_every steps and after the last; at the last step it is the final model's mean
    next-token loss over the held-out batches, each document scored alone by plain transformers."""
    from transformers import AutoModelForCausalLM

    spec = StageSpec(steps=5, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=1, save_every=5, val_every=2,
                     val_batches=2)
    held = _HeldOut(50, 4)
    res = train_model(make_tiny_model(50), _Source(50, 2), spec, tmp_path / "run", torch.device("cpu"), validation=held)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4, 5]
    final = AutoModelForCausalLM.from_pretrained(res.final).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(2):
            ids, docs, _ = held.batch(i, 0).input_ids, held.batch(i, 0).doc_ids, None
            for row, row_docs in zip(ids, docs):
                for d in row_docs.unique():
                    doc = row[row_docs == d][None]
                    logits = final(input_ids=doc).logits[0, :-1]
                    total += float(F.cross_entropy(logits, doc[0, 1:], reduction="sum"))
                    count += doc.shape[1] - 1
    assert log[-1]["val_loss"] == pytest.approx(total / count, rel=1e-5)


def test_interrupted_training_resumes_bitwise(tmp_path: Path) -> None:
    straight = make_tiny_model(50)
    train_model(straight, _Source(50, 2), _spec(), tmp_path / "a", torch.device("cpu"))
    resumed = make_tiny_model(50)
    with pytest.raises(KeyboardInterrupt):
        train_model(resumed, _Source(50, 2, fail_at=3), _spec(), tmp_path / "b", torch.device("cpu"))
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-0000002"]
    fresh = make_tiny_model(50, seed=99)  # different init: everything must come from the checkpoint
    train_model(fresh, _Source(50, 2), _spec(), tmp_path / "b", torch.device("cpu"))
    for (k, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    la = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in la] == [json.loads(x)["loss"] for x in lb]


def test_nan_loss_stops_naming_the_step(tmp_path: Path) -> None:
    model = make_tiny_model(50)
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(LongforgeError, match=r"loss became nan .* at step 0; no checkpoint was written yet"):
        train_model(model, _Source(50, 2), _spec(), tmp_path / "n", torch.device("cpu"))


def test_tensorboard_scalars_mirror_the_log(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = StageSpec(steps=3, batch_size=2, lr=1e-3, save_every=3, tensorboard=True)
    train_model(make_tiny_model(50), _Source(50, 2), spec, tmp_path / "tb", torch.device("cpu"))
    acc = EventAccumulator(str(tmp_path / "tb" / "tb"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    log = [json.loads(x)["loss"] for x in (tmp_path / "tb" / "log.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(log, rel=1e-6)


@pytest.mark.parametrize("optimizer,precision", [("adamw", "auto"), ("adamw_bf16", "bf16")])
def test_optimizer_in_backward_equals_the_ordinary_step(tmp_path: Path, optimizer: str, precision: str) -> None:
    runs = []
    for in_backward in (False, True):
        torch.manual_seed(0)  # the bf16 optimizer's rounding noise comes from the global generator
        model = make_tiny_model(50)
        spec = StageSpec(steps=4, batch_size=4, lr=3e-3, save_every=4, clip_grad=0, optimizer=optimizer,
                         precision=precision, optimizer_in_backward=in_backward)
        train_model(model, _Source(50, 4), spec, tmp_path / str(in_backward), torch.device("cpu"))
        log = [json.loads(x) for x in (tmp_path / str(in_backward) / "log.jsonl").read_text().splitlines()]
        runs.append((model.state_dict(), log))
    (ref, ref_log), (got, log) = runs
    if optimizer == "adamw":
        # Per-parameter AdamW is the same arithmetic whenever it runs: identical weights and logs.
        for k in ref:
            assert torch.equal(ref[k], got[k]), k
        assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
        assert [r["grad_norm"] for r in log] == pytest.approx([r["grad_norm"] for r in ref_log], rel=1e-5)
    else:
        # Stochastic rounding draws its noise in another parameter order: equal in distribution, not bitwise.
        assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], rel=2e-2)
        assert log[-1]["loss"] < log[0]["loss"]


def test_optimizer_in_backward_refuses_what_it_cannot_do() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set clip_grad: 0"):
        StageSpec(steps=1, optimizer_in_backward=True)
    with pytest.raises(ValidationError, match="set grad_accum: 1"):
        StageSpec(steps=1, optimizer_in_backward=True, clip_grad=0, grad_accum=2)
    with pytest.raises(ValidationError, match="set offload_activations: true"):
        StageSpec(steps=1, resident_layers=2)
    from types import SimpleNamespace

    from longforge.model.parallel import Layout
    from longforge.train.loop import step_in_backward

    two = SimpleNamespace(layout=Layout(2, 0, 2, 1, torch.device("cpu")))
    with pytest.raises(LongforgeError, match="works in one process"):
        step_in_backward(two, None)
