"""The decoding step's weight-streaming matrix-product kernel (inference/skinny.py): its numbers against F.linear, a
row alone against the same row in a batch, how the engine routes a step's linear layers to it, and the option's
place in fingerprints. The kernel itself runs on a GPU, or on the CPU in Triton's interpreter when Triton is here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from longforge.config import EvalSpec
from longforge.inference import Engine
from longforge.inference.fusion import DecodeKernels, fused_decoding
from longforge.inference.skinny import MAX_ROWS, Tiles, tiles_for, usable
from longforge.stages.base import fingerprint

ROOT = Path(__file__).resolve().parents[1]

# Checks run in a fresh interpreter process: Triton reads TRITON_INTERPRET when a kernel is defined.
INTERPRETED = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from longforge.inference.skinny import Tiles, skinny_linear
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for m, n, k, bias, tiles in ((1, 40, 64, False, Tiles(16, 64)), (5, 100, 300, True, Tiles(32, 128)),
                                     (17, 64, 512, False, None), (32, 33, 48, True, Tiles(16, 16))):
            x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            b = torch.randn(n, dtype=dtype) if bias else None
            y = skinny_linear(x, w, b, tiles)
            ref = F.linear(x.float(), w.float(), None if b is None else b.float())
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            assert y.dtype == dtype and y.shape == (m, n) and err < tol, (dtype, m, n, k, err)
            assert torch.equal(skinny_linear(x[2:3], w, b, tiles)[0], y[2]) if m > 2 else True
    x, w = torch.randn(2, 3, 64), torch.randn(20, 64)
    assert torch.allclose(skinny_linear(x, w), F.linear(x, w), atol=1e-5)
    print("ok")
""")


def _interpreter_works() -> str | None:
    """Why Triton's interpreter cannot run here (None when it can): Triton absent, or a NumPy it does not run on."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    probe = ("import triton, triton.language as tl, torch\n"
             "@triton.jit\ndef k(p, n):\n    for i in range(tl.cdiv(n, 4)):\n        tl.store(p + i, i)\n"
             "t = torch.zeros(2, dtype=torch.int32); k[(1,)](t, 8); assert t.tolist() == [0, 1]")
    r = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=120)
    return None if r.returncode == 0 else f"Triton's interpreter does not run here: {r.stderr.strip().splitlines()[-1:]}"


def test_skinny_kernel_equals_linear_in_the_interpreter() -> None:
    why = _interpreter_works()
    if why:
        pytest.skip(why)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_which_products_the_kernel_takes() -> None:
    w = torch.zeros(16, 8)
    assert usable(torch.zeros(MAX_ROWS, 8), w) and usable(torch.zeros(2, 3, 8), w)
    assert not usable(torch.zeros(MAX_ROWS + 1, 8), w)  # a prefill chunk: torch's
    assert not usable(torch.zeros(4, 8, dtype=torch.float64), w.double())
    assert not usable(torch.zeros(4, 8, dtype=torch.bfloat16), w)  # mixed dtypes
    assert not usable(torch.zeros(4, 8), torch.zeros(8, 16).t())  # a transposed weight's rows are not contiguous


def test_tiles_give_every_sm_a_program() -> None:
    assert tiles_for(14336, 4096) == Tiles(64, 256)  # 224 programs
    assert tiles_for(4096, 4096) == Tiles(16, 256)  # 64 features would leave 68 of 132 SMs idle
    assert tiles_for(1024, 4096).block_n == 16 and tiles_for(576, 576).block_k == 256
    assert tiles_for(128256, 4096, sms=132).block_n == 64 and tiles_for(64, 48).block_k == 64


def test_fused_decoding_routes_every_linear_while_asked(one_thread) -> None:  # noqa: ANN001
    """With a linear function the decoder's 7 linear layers per layer and the head go through it, with the same
    results; without one, none does; after the block the modules are as they were."""
    model = make_tiny_model(50, window=128)
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    want = model(ids).logits
    seen: list[tuple[int, ...]] = []

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(tuple(weight.shape))
        return F.linear(x, weight, bias)

    identity = lambda fn: fn  # noqa: E731 - no compiling on the CPU
    with fused_decoding(model, DecodeKernels(identity, linear=linear)) as changed:
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert len(seen) == 2 * 7 + 1 and (50, 32) in seen  # q, k, v, o, gate, up, down per layer, and the head
    assert changed == 2 * 7 + 1 + 2 * 2 + 1 + 2 + 1  # linears, norms (2 per layer + final), MLPs, RoPE
    assert not any("forward" in vars(m) for m in model.modules())
    seen.clear()
    with fused_decoding(model, DecodeKernels(identity)):
        model(ids)
    assert seen == []


def test_engine_decode_gemm_option() -> None:
    model = make_tiny_model(50, window=128)
    with pytest.raises(ValueError, match="decode_gemm must be 'cublas' or 'triton'"):
        Engine(model, decode_gemm="cutlass")  # type: ignore[arg-type]
    assert Engine(model, decode_gemm="triton").describe()["decode_gemm"] == "cublas"  # no GPU: torch's


def test_decode_gemm_is_in_fingerprints_only_when_changed() -> None:
    """Evaluations recorded before the option existed keep their fingerprints; choosing the kernel changes them."""
    default = EvalSpec()
    dump = default.model_dump(mode="json")
    assert dump["inference"].pop("decode_gemm") == "cublas"
    assert default.settings() == dump
    triton = EvalSpec.model_validate({"inference": {"decode_gemm": "triton"}})
    assert triton.settings()["inference"]["decode_gemm"] == "triton"
    assert fingerprint([triton.settings()]) != fingerprint([default.settings()])


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 25, 32])
def test_skinny_kernel_on_cuda_bf16(rows: int) -> None:
    """The 8B shape's q and down products in bf16: within rounding of float32 math, a row alone bitwise the same."""
    from longforge.inference.skinny import skinny_linear

    g = torch.Generator(device="cuda").manual_seed(rows)
    for n, k in ((4096, 4096), (1024, 4096), (4096, 14336)):
        w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16()
        x = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
        b = torch.randn(n, device="cuda", generator=g).bfloat16()
        y = skinny_linear(x, w, b)
        ref = F.linear(x.float(), w.float(), b.float())
        assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2
        assert torch.equal(skinny_linear(x[-1:], w, b)[0], y[-1])


@pytest.mark.gpu
def test_engine_with_the_kernel_decodes_the_same_tokens() -> None:
    """A float32 model on CUDA: decoding with the kernel (fused kernels, CUDA graphs) gives cuBLAS's tokens."""
    model = make_tiny_model(60, window=4096, hidden=256).to("cuda")
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 60, (n,), generator=g).tolist() for n in (700, 64, 1300)]
    want = Engine(model, prefill_chunk=512, stop_on_eos=False).generate(rows, 30)
    eng = Engine(model, prefill_chunk=512, stop_on_eos=False, decode_gemm="triton")
    assert eng.describe()["decode_gemm"] == "triton"
    assert eng.generate(rows, 30) == want
    assert eng.last["cuda_graph"] and eng.graph_failure is None, eng.describe()


def test_the_benchmark_runs_in_the_interpreter(tmp_path: Path) -> None:
    why = _interpreter_works()
    if why:
        pytest.skip(why)
    import json

    out = tmp_path / "decode_gemm.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_gemm_gpu.py"), "--smoke", "--rows", "1,3",
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["products"]) == 6 * 2 and all(p["row_alone_equal"] and p["rel_err"] < 2e-3 for p in res["products"])
