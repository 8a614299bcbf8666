"""Fused elementwise ops: the same math as the models' own, wired into every layer, falling back when compiling fails."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from longforge.model import fused
from longforge.model.memory import apply_lean_norms


def identity(fn):  # the wiring without a compiler: CPU tests cannot build Triton kernels
    return fn


@pytest.fixture
def restore_rope(monkeypatch):
    """Put transformers' Llama RoPE back after the test (fuse_rope replaces it module-wide)."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, fused.ROPE_FUNCTION, getattr(modeling_llama, fused.ROPE_FUNCTION))
    return modeling_llama


def test_fused_functions_are_the_models_own_expressions(restore_rope) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    cos, sin = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    want = restore_rope.apply_rotary_pos_emb(q, k, cos, sin)
    got = fused.rope(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    g, u = torch.randn(5, 7, dtype=torch.bfloat16), torch.randn(5, 7, dtype=torch.bfloat16)
    assert torch.equal(fused.silu_mul(g, u), torch.nn.SiLU()(g) * u)


def _loss_and_grads(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fused_model_equals_the_unfused_one(restore_rope) -> None:
    ids = torch.randint(1, 50, (2, 40))
    plain = make_tiny_model(50)
    apply_lean_norms(plain)
    ref_loss, ref_grads = _loss_and_grads(plain, ids)
    model = make_tiny_model(50)
    calls = []

    def counting(fn):
        def run(*a, **k):
            calls.append(fn.__name__)
            return fn(*a, **k)
        return run

    changed = fused.apply_fused_ops(model, compiler=counting)
    assert changed == {"mlp": 2, "rope": 1, "norm": 5}
    loss, grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    # Every fused function ran: 2 MLPs and 2 RoPEs forward, 5 norms forward and backward.
    assert sorted(set(calls)) == ["rms_backward", "rms_forward", "rope", "silu_mul"]
    assert calls.count("silu_mul") == 2 and calls.count("rope") == 2 and calls.count("rms_backward") == 5


def test_a_function_that_fails_to_compile_runs_eagerly_with_one_warning() -> None:
    def broken(fn):
        def run(*a, **k):
            raise RuntimeError("triton: no compiler\nmore")
        return run

    f = fused.Compiled(fused.silu_mul, broken)
    g, u = torch.randn(3), torch.randn(3)
    with pytest.warns(UserWarning, match="silu_mul did not compile .*no compiler"):
        assert torch.equal(f(g, u), F.silu(g) * u)
    assert f.failed
    assert torch.equal(f(g, u), F.silu(g) * u)  # no second warning, no second try

    def out_of_memory(fn):
        def run(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return run

    with pytest.raises(torch.OutOfMemoryError):
        fused.Compiled(fused.silu_mul, out_of_memory)(g, u)


def test_only_silu_gate_up_down_mlps_are_fused(restore_rope) -> None:
    model = make_tiny_model(50)
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    changed = fused.apply_fused_ops(model, norms=False, compiler=identity)
    assert changed == {"mlp": 1, "rope": 1, "norm": 0}
    assert not fused.fused_available(torch.device("cpu"))
    assert sys.modules[type(model.model.layers[0].self_attn).__module__].apply_rotary_pos_emb is not None
