"""The inference attention kernels: the split-and-merge path and the once-per-shape check, exercised on CPU."""

from __future__ import annotations

import pytest
import torch

from longforge.inference import kernels as A


def math_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cuDNN op returns, computed in fp64 (equal head counts required, as the real op needs)."""
    assert q.shape[1] == k.shape[1], "cuDNN op called with grouped heads"
    s = (q.double() @ k.double().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if causal:
        assert q.shape[2] == k.shape[2], "causal cuDNN call must be square"
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ v.double()).to(q.dtype), lse


def models_layout(lq: int, lk: int, h: int, hkv: int, d: int = 16) -> tuple[torch.Tensor, ...]:
    """q, k, v as (B, H, L, D) views of sequence-major buffers, as transformers' projections give them."""
    g = torch.Generator().manual_seed(lq * 1000 + lk)
    q = torch.randn(2, lq, h, d, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, lk, hkv, d, generator=g).transpose(1, 2) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("lq,lk", [(5, 23), (16, 16 + 1), (9, 9 * 5)])
def test_split_at_the_chunk_start_equals_one_causal_call(monkeypatch, h: int, hkv: int, lq: int, lk: int) -> None:
    monkeypatch.setattr(A, "cudnn_op", math_cudnn)
    q, k, v = models_layout(lq, lk, h, hkv)
    want = A.causal_attention(q, k, v, None)  # CPU: one SDPA call with an explicit lower-right mask
    got = A.split_cudnn(q, k, v, None)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_by_lse_of_two_halves_is_attention_over_both() -> None:
    q, k, v = models_layout(3, 10, 2, 2)
    o1, l1 = math_cudnn(q, k[:, :, :4], v[:, :, :4], False, None)
    o2, l2 = math_cudnn(q, k[:, :, 4:], v[:, :, 4:], False, None)
    whole, _ = math_cudnn(q, k, v, False, None)
    merged = A.merge_by_lse(o1, l1[..., None].float(), o2, l2[..., None].float())
    torch.testing.assert_close(merged, whole.float(), rtol=1e-5, atol=1e-6)


def test_a_kernel_is_used_only_after_it_agrees_once(monkeypatch) -> None:
    monkeypatch.setattr(A, "_verdicts", {})
    q, k, v = models_layout(4, 12, 4, 2)
    wrong = lambda q, k, v, s: A.sdpa_lower_right(q, k, v, s) + 1.0  # noqa: E731
    monkeypatch.setitem(A.KERNELS, "flash", wrong)
    assert not A._usable("flash", q, k)
    monkeypatch.setitem(A.KERNELS, "flash", A.sdpa_lower_right)
    assert not A._usable("flash", q, k), "a verdict is kept for the shape"
    monkeypatch.setattr(A, "_verdicts", {})
    assert A._usable("flash", q, k)
    broken = lambda q, k, v, s: (_ for _ in ()).throw(RuntimeError("no kernel"))  # noqa: E731
    monkeypatch.setattr(A, "_verdicts", {})
    monkeypatch.setitem(A.KERNELS, "flash", broken)
    assert not A._usable("flash", q, k)


def test_lower_right_public_path_matches_the_cpu_mask() -> None:
    for lq, lk in [(1, 9), (4, 12), (7, 7)]:
        q, k, v = models_layout(lq, lk, 8, 2)
        torch.testing.assert_close(A.sdpa_lower_right(q, k, v, None), A.causal_attention(q, k, v, None))


@pytest.mark.gpu
@pytest.mark.parametrize("lq,lk", [(1, 3000), (37, 3000), (600, 3000), (1024, 1024)])
def test_cuda_kernels_are_used_and_match_the_reference(lq: int, lk: int) -> None:
    """bf16 on the GPU: the fast kernels pass their check, and causal_attention matches fp32 math."""
    g = torch.Generator(device="cuda").manual_seed(lq)
    q = torch.randn(1, lq, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k, v = (torch.randn(1, lk, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2) for _ in range(2))
    assert A._usable("flash", q, k)
    if lq >= A.SPLIT_MIN_QUERIES:
        assert A._usable("split", q, k)
    s = q.float() @ k.float().repeat_interleave(4, 1).transpose(-1, -2) / 128**0.5
    s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device="cuda").tril(lk - lq), float("-inf"))
    want = torch.softmax(s, -1) @ v.float().repeat_interleave(4, 1)
    got = A.causal_attention(q, k, v, None).float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
