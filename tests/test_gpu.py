"""GPU-only checks (skipped without CUDA): the same numerics on the device as on the CPU reference."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from longforge.config import StageSpec
from longforge.model.attention import use_longforge_attention
from test_train import _packed, _Source

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("hidden", [32, 64], ids=["head8-dense", "head16-flex"])
def test_document_masked_attention_on_cuda_matches_cpu(hidden: int) -> None:
    model = make_tiny_model(50, hidden=hidden)
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


@pytest.mark.parametrize("budget", [None, 2 * 512 * 64 * 2, 2 * 512 * 64], ids=["whole", "kv-groups", "one-head"])
@pytest.mark.parametrize("backend", ["varlen", "flex", "sdpa"])
def test_cuda_backends_match_the_dense_reference(backend: str, budget: int | None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import longforge.model.attention as attention
    from longforge.model.attention import attend

    if budget is not None:  # split into calls of 2 query heads (1 KV head each), or 1 query head
        monkeypatch.setattr(attention, "CALL_ELEMENTS", budget)
    torch.manual_seed(0)
    b, h, kv, s, d = 2, 8, 2, 512, 64
    q, k, v = (torch.randn(b, n, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (h, kv, kv))
    docs = None
    if backend != "sdpa":
        docs = torch.zeros(b, s, dtype=torch.long, device="cuda")
        docs[0, 100:] = 1
        docs[0, 300:] = 2
        docs[1, 7:] = 1
    out = attend(q, k, v, docs, backend, None)
    ref = attend(q.float(), k.float(), v.float(), docs, "dense", None)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), r.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("resident", [0, 1])
def test_offloaded_checkpoints_change_nothing_numerically(resident: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import longforge.model.memory as memory
    from longforge.model.memory import ActivationOffload, apply_checkpointing

    monkeypatch.setattr(memory, "HOST_PIECE", 1 << 18)  # each 1.6 MB layer input in 7 pinned buffers

    torch.manual_seed(0)
    ids, docs, pos = (t.cuda() for t in _packed([300, 500], 50, seed=1))
    results = []
    for offload in (False, True):
        # 800 tokens x 512 features in fp32 is 1.6 MB: above the offload threshold.
        model = make_tiny_model(50, window=1024, hidden=512).cuda()
        use_longforge_attention(model)
        apply_checkpointing(model)
        model.train()
        store = ActivationOffload(model.model.layers, resident)
        with store() if offload else contextlib.nullcontext():
            loss = model(input_ids=ids, position_ids=pos, lf_doc_ids=docs, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        if offload:
            assert store.kept_bytes == resident * 800 * 512 * 4  # the last layer's fp32 input stayed
            assert store.host_bytes >= (2 - resident) * 800 * 512 * 4
    (ref_loss, ref_grads), (loss, grads) = results
    # Copies are exact; only the attention backward's atomics may reorder sums.
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_fused_ops_match_the_unfused_model(dtype: torch.dtype) -> None:
    from transformers.models.llama import modeling_llama

    from longforge.model.fused import ROPE_FUNCTION, apply_fused_ops
    from longforge.model.memory import apply_lean_norms

    original = getattr(modeling_llama, ROPE_FUNCTION)
    ids = torch.randint(1, 50, (2, 300), device="cuda")
    results = []
    try:
        for fuse in (False, True):
            model = make_tiny_model(50, window=512, hidden=128).to("cuda", dtype)
            apply_fused_ops(model) if fuse else apply_lean_norms(model)
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            results.append((loss.detach().float(), [p.grad.float() for p in model.parameters()]))
    finally:
        setattr(modeling_llama, ROPE_FUNCTION, original)
    (ref_loss, ref_grads), (loss, grads) = results
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # compiled kernels round once where eager rounds per op
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=tol * 10, atol=tol * 10)


def test_cuda_rng_state_round_trips_through_a_checkpoint_file(tmp_path: Path) -> None:
    from longforge.train.checkpoint import load_rng, save_rng

    torch.cuda.manual_seed_all(123)
    save_rng(tmp_path / "rng-0.safetensors")
    first = torch.rand(8, device="cuda")
    torch.cuda.manual_seed_all(999)
    load_rng(tmp_path, 0)
    assert torch.equal(torch.rand(8, device="cuda"), first)


def test_interrupted_training_on_cuda_resumes_where_it_stopped(tmp_path: Path) -> None:
    from longforge.train.loop import train_model

    spec = StageSpec(steps=6, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=2, save_every=2)
    cuda = torch.device("cuda")
    train_model(make_tiny_model(50), _Source(50, 2), spec, tmp_path / "a", cuda)
    with pytest.raises(KeyboardInterrupt):
        train_model(make_tiny_model(50), _Source(50, 2, fail_at=3), spec, tmp_path / "b", cuda)
    train_model(make_tiny_model(50, seed=99), _Source(50, 2), spec, tmp_path / "b", cuda)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    # Atomic adds in CUDA backward kernels make two runs equal to rounding, not bitwise.
    assert lb == pytest.approx(la, rel=1e-3) and len(lb) == 6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_kill_9_under_torchrun_on_two_gpus_resumes_the_run(model_dir: Path, corpus_dir: Path, tokenizer_dir: Path,
                                                            tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    import psutil

    from longforge.config import DataSpec, SourceSpec
    from longforge.data.build import build_data
    from test_parallel import _free_port

    build_data(DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none", token_budget=8000),
               tokenizer_dir, 64, tmp_path / "data")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
                "-m", "longforge", "train", str(model_dir), "--data", str(tmp_path / "data"), "--out", str(out),
                "--steps", "30", "--batch-size", "2", "--lr", "1e-3", "--save-every", "5", "--device", "cuda"]

    res = subprocess.run(cmd(tmp_path / "straight"), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    proc = subprocess.Popen(cmd(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ck.is_dir() and any(p.name.startswith("step-0000010") for p in ck.iterdir())):
        time.sleep(0.05)
    tree = psutil.Process(proc.pid)
    for p in [*tree.children(recursive=True), tree]:  # torchrun's workers too: no chance to clean up
        p.kill()
    proc.wait()
    time.sleep(2)
    assert not (tmp_path / "killed" / "final").exists()
    res = subprocess.run(cmd(tmp_path / "killed"), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    a = [json.loads(x)["loss"] for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 30 and b == pytest.approx(a, rel=1e-3)


def test_fp32_queries_under_autocast_take_the_flash_varlen_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16-mixed training: RoPE leaves the queries fp32; under autocast they go to varlen in bf16, as SDPA would
    compute them, not to the fp32 flex path."""
    import longforge.model.attention as attention
    from longforge.model.attention import attend

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("flex was used")

    monkeypatch.setattr(attention, "_flex", refuse)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 512, 64, device="cuda") for n in (8, 2, 2))
    docs = torch.zeros(2, 512, dtype=torch.long, device="cuda")
    docs[0, 200:] = 1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attend(q, k, v, docs, "varlen", None)
    assert out.dtype == torch.bfloat16
    ref = attend(q, k, v, docs, "dense", None)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
