"""Matrix products of a decoding step (a few rows against a large weight) as one Triton kernel that streams the weight.

A decoding step multiplies `rows` (1-32) activations by every weight matrix, so its time is the time to read the
weights. On an H200, cuBLAS's kernels for these shapes (M=16 against the Llama-3.1-8B matrices) ran at about 3.4 TB/s
of the 4.8 TB/s the memory gives, with split-K reductions as extra kernels (benchmarks/RESULTS.md, "Evaluation engine:
batched, graph-captured decoding"). This kernel gives each program a block of output features and walks the whole
inner dimension for it, so there is no reduction kernel, and a row's result does not depend on how many rows share
the call (the same tiles, in the same order): a prompt decoded alone or in a batch gets the same numbers.

`Engine(decode_gemm="triton")` routes the decoding step's linear layers here; "cublas" (the default until the GPU
benchmark `benchmarks/decode_gemm_gpu.py` shows it pays) keeps torch's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Beyond this a step's product is no longer bound by reading the weight alone. Every call computes a block of this
# many rows (absent rows masked), so a row's numbers never depend on how many rows came with it.
MAX_ROWS = 32
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Tiles:
    """One launch configuration: output features and inner elements per program, warps and pipeline stages."""

    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 4


def tiles_for(n: int, k: int, sms: int = 132) -> Tiles:
    """The configuration for an (n x k) weight: the widest feature block that still gives every SM a program."""
    block_n = 64
    while block_n > 16 and -(-n // block_n) < sms:
        block_n //= 2
    return Tiles(block_n, 256 if k >= 256 else max(16, 1 << (k - 1).bit_length()))


_kernel: Any = None


def _build() -> Any:
    """The Triton kernel, made on first use (importing Triton costs time and is not needed off the GPU)."""
    import triton
    import triton.language as tl

    @triton.jit
    def skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                      HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = tl.arange(0, BLOCK_M)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        inner = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(tl.cdiv(K, BLOCK_K)):
            kk = i * BLOCK_K + inner
            x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :],
                        mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_wn + kk[None, :],
                        mask=(cols[:, None] < N) & (kk[None, :] < K), other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

    return skinny_kernel


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes this product: few rows, a supported dtype, one device, contiguous rows of the weight."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (0 < rows <= MAX_ROWS and x.dtype == weight.dtype and x.dtype in DTYPES and weight.dim() == 2
            and x.device == weight.device and weight.stride(1) == 1 and x.shape[-1] == weight.shape[1])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  tiles: Tiles | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for at most MAX_ROWS rows of x, by the weight-streaming kernel."""
    global _kernel
    if _kernel is None:
        _kernel = _build()
    n, k = weight.shape
    flat = x.reshape(-1, k)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    m = flat.shape[0]
    t = tiles or tiles_for(n, k, _sms(x.device))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _kernel[(-(-n // t.block_n),)](
        flat, weight, bias if bias is not None else weight, y, m, n, k, flat.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_M=MAX_ROWS, BLOCK_N=t.block_n,
        BLOCK_K=t.block_k, num_warps=t.warps, num_stages=t.stages)
    return y.reshape(*x.shape[:-1], n)


def _sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100/H200; the interpreter on CPU has none)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel where it applies, else torch's linear."""
    if usable(x, weight):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)

