"""GPU-only checks (skipped without CUDA): the same numerics on the device as on the CPU reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from longforge.config import StageSpec
from longforge.model.attention import use_longforge_attention
from test_train import _packed, _Source

pytestmark = pytest.mark.gpu


def test_document_masked_attention_on_cuda_matches_cpu() -> None:
    model = make_tiny_model(50)
    use_longforge_attention(model)
    ids, docs, pos = _packed([37, 100, 11], 50)
    with torch.no_grad():
        cpu = model(input_ids=ids, position_ids=pos, lf_doc_ids=docs).logits
        model.cuda()
        gpu = model(input_ids=ids.cuda(), position_ids=pos.cuda(), lf_doc_ids=docs.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2e-3, atol=2e-3)


def test_training_on_cuda_follows_the_cpu_loss_curve(tmp_path: Path) -> None:
    from longforge.train.loop import train_model

    spec = StageSpec(steps=8, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=2, save_every=4)
    cpu = train_model(make_tiny_model(50), _Source(50, 2), spec, tmp_path / "cpu", torch.device("cpu"))
    gpu = train_model(make_tiny_model(50), _Source(50, 2), spec, tmp_path / "gpu", torch.device("cuda"))
    # bf16 autocast on the GPU against fp32 on the CPU: close, not equal.
    assert gpu.last_loss == pytest.approx(cpu.last_loss, rel=0.05)
