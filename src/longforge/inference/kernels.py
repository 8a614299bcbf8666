"""Causal attention of a chunk of queries against keys that end with the chunk (the mask aligned to the last key).

This is what chunked prefill and decoding need. On CUDA the fastest exact kernel PyTorch offers depends on the
shape (benchmarks/attention_gpu.py, H100, torch 2.11):
  - square (the chunk is all there is): SDPA with is_causal, which runs cuDNN on Hopper (~590 TFLOP/s);
  - a long chunk after a long past: cuDNN twice, the past without a mask and the chunk against itself with a
    causal mask, merged through their log-sum-exps; no public kernel aligns a causal mask to the last key except
    FlashAttention (~350 TFLOP/s) and the memory-efficient kernel;
  - few queries (decoding, a short last chunk): FlashAttention's forward, aligned to the last key, grouped heads
    in place (0.2 ms for one query at 128K keys, against 0.8 ms for the lower-right-masked SDPA calls). Plain
    SDPA is as fast for one query once warm, but it runs cuDNN, which builds an execution plan for every new key
    length, that is every decoding step: 69 ms per token on an H200 on a prompt's first pass, against 29 ms for
    FlashAttention through the public grouped calls in the same run.
The split and FlashAttention paths use private ATen ops, so each is checked once per device, dtype and head
shape against the public SDPA path on a small input; one that fails or disagrees is not used again and the next
candidate runs.

Decoding a batch of rows of different lengths (decode_attention): each row's one new query attends to the first
`used[b]` keys of its row of a buffer (B, capacity, Hkv, D). On CUDA FlashAttention's variable-length forward
reads each row's used keys only (`seqused_k`, lengths on the device: no host sync, so a CUDA graph can replay it);
elsewhere, or when that kernel fails its check, SDPA with a boolean mask over the buffer (exact; on CPU the
reference the tests compare against).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from longforge.model.attention import causal_sdpa

SPLIT_MIN_QUERIES = 512  # below this a chunk is decoding-sized: one flash call beats two cuDNN calls and a merge
CHECK_TOLERANCE = 2e-2  # relative to the largest output, bf16 (the kernels agree to ~3e-3 on the benchmark)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "float | None"], torch.Tensor]
_verdicts: dict[tuple[str, str, torch.dtype, int, int, int], bool] = {}


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention of the last q positions against k/v: (B, H, Lq, D) x (B, Hkv, Lk, D) -> (B, H, Lq, D)."""
    lq, lk = q.shape[2], k.shape[2]
    if not q.is_cuda or lq == lk:
        # CPU (tests, the demo), or a square chunk (SDPA runs cuDNN on Hopper): one call.
        return causal_sdpa(q, k, v, scale)
    for name in ("split", "flash") if lq >= SPLIT_MIN_QUERIES else ("flash",):
        if _usable(name, q, k):
            return KERNELS[name](q, k, v, scale)
    return sdpa_lower_right(q, k, v, scale)


def sdpa_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Public-API path: SDPA per query-head group with a lower-right causal bias (the memory-efficient kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    # Query heads g*rep..g*rep+rep-1 share KV head g; one group member at a time never expands the long keys.
    groups = q.view(b, hkv, h // hkv, lq, d) if q.is_contiguous() else q.reshape(b, hkv, h // hkv, lq, d)
    mask = causal_lower_right(lq, lk) if 1 < lq != lk else None
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        outs = [F.scaled_dot_product_attention(groups[:, :, r], k, v, attn_mask=mask, is_causal=mask is None and lq > 1,
                                               scale=scale) for r in range(h // hkv)]
    return torch.stack(outs, dim=2).view(b, h, lq, d)


def flash_last(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """FlashAttention forward on (B, L, H, D) views; its causal mask is aligned to the last key, grouped heads native."""
    lq, lk = q.shape[2], k.shape[2]
    out = torch.ops.aten._flash_attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None,
                                                  lq, lk, 0.0, lq > 1, False, scale=scale)[0]
    return out.transpose(1, 2)


def cudnn_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN attention and its log-sum-exp, (B, H, Lq, D) and (B, H, Lq, 1) fp32; causal only for square inputs."""
    b, h, lq, d = q.shape
    hkv = k.shape[1]
    if h != hkv and not causal:
        # Without a mask a query row is independent of its neighbours, so the query heads that share a KV head
        # can be laid end to end as one longer head: one call, no copies of the long keys and values.
        q = q.reshape(b, hkv, (h // hkv) * lq, d)
    elif h != hkv:
        k, v = (t.repeat_interleave(h // hkv, 1) for t in (k, v))  # the chunk's own keys: small
    out, lse = cudnn_op(q, k, v, causal, scale)
    return out.reshape(b, h, lq, d), lse.reshape(b, h, lq, 1).float()


def cudnn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
             scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's cuDNN attention with equal head counts: output and log-sum-exp (tests replace it on CPU)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                  scale=scale)[:2]
    return out, lse


def split_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The past without a mask plus the chunk with a causal one, on cuDNN, merged exactly by log-sum-exp."""
    past = k.shape[2] - q.shape[2]
    o1, l1 = cudnn_with_lse(q, k[:, :, :past], v[:, :, :past], False, scale)
    o2, l2 = cudnn_with_lse(q, k[:, :, past:], v[:, :, past:], True, scale)
    return merge_by_lse(o1, l1, o2, l2).to(q.dtype)


def merge_by_lse(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two key sets from each part's output and log-sum-exp (fp32)."""
    total = torch.logaddexp(l1, l2)
    return o1.float() * torch.exp(l1 - total) + o2.float() * torch.exp(l2 - total)


def merge_with_lse(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor,
                   l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_by_lse that also gives the union's log-sum-exp (for merging again, across processes)."""
    return merge_by_lse(o1, l1, o2, l2), torch.logaddexp(l1, l2)


KERNELS: dict[str, Kernel] = {"split": split_cudnn, "flash": flash_last}
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "float | None"], torch.Tensor]


def _usable(name: str, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether kernel `name` runs and matches the public path for this device, dtype and head shape (checked once)."""
    key = (name, str(q.device), q.dtype, q.shape[1], k.shape[1], q.shape[3])
    if key not in _verdicts:
        _verdicts[key] = _agrees(KERNELS[name], q.shape[1], k.shape[1], q.shape[3], q.device, q.dtype,
                                 SPLIT_MIN_QUERIES if name == "split" else 3)
    return _verdicts[key]


def _agrees(kernel: Kernel, h: int, hkv: int, d: int, device: torch.device, dtype: torch.dtype, lq: int) -> bool:
    """Run `kernel` on a small random input laid out as models make it; compare it with sdpa_lower_right."""
    g = torch.Generator(device=device).manual_seed(0)
    lk = 4 * lq
    q = torch.randn(1, lq, h, d, device=device, dtype=dtype, generator=g).transpose(1, 2)
    k, v = (torch.randn(1, lk, hkv, d, device=device, dtype=dtype, generator=g).transpose(1, 2) for _ in range(2))
    try:
        got = kernel(q, k, v, None).float()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    want = sdpa_lower_right(q, k, v, None).float()
    return got.shape == want.shape and bool((got - want).abs().max() <= CHECK_TOLERANCE * want.abs().max())


# ---- decoding rows of different lengths against one buffer


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, used: torch.Tensor,
                     scale: float | None) -> torch.Tensor:
    """One new query per row against the first used[b] keys of its row: (B, H, 1, D) x (B, C, Hkv, D) -> (B, H, 1, D).

    `used` (B,) int32 stays on the device; keys past a row's length are never read by the flash path and get no
    weight on the masked one.
    """
    if q.is_cuda and _decode_usable("flash_decode", q, k):
        return DECODE_KERNELS["flash_decode"](q, k, v, used, scale)
    return masked_decode(q, k, v, used, scale)


def masked_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, used: torch.Tensor,
                  scale: float | None) -> torch.Tensor:
    """Exact path: SDPA over the whole buffer with a per-row length mask, the query heads of a KV head as its rows."""
    b, h, _, d = q.shape
    cap, hkv = k.shape[1], k.shape[2]
    mask = (torch.arange(cap, device=q.device)[None] < used[:, None])[:, None, None]  # (B, 1, 1, C)
    # One query per head: the heads sharing a KV head are independent rows of one attention, so grouped-query
    # attention needs no copy of the keys.
    groups = q.reshape(b, hkv, h // hkv, d)
    out = F.scaled_dot_product_attention(groups, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(b, h, 1, d)


_offsets: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, used: torch.Tensor,
                 scale: float | None) -> torch.Tensor:
    """FlashAttention's variable-length forward: row b's query against its first used[b] keys, grouped heads native."""
    b, h, _, d = q.shape
    cap, hkv = k.shape[1], k.shape[2]
    key = (b, cap, str(q.device))
    if key not in _offsets:  # made once per shape (eagerly, before any graph capture reads them)
        rows = torch.arange(b + 1, dtype=torch.int32, device=q.device)
        _offsets[key] = (rows, rows * cap)
    cu_q, cu_k = _offsets[key]
    out = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2).reshape(b, h, d), k.view(b * cap, hkv, d), v.view(b * cap, hkv, d), cu_q, cu_k, 1, cap,
        0.0, False, False, scale=scale, seqused_k=used)[0]
    return out.view(b, 1, h, d).transpose(1, 2)


DECODE_KERNELS: dict[str, DecodeKernel] = {"flash_decode": flash_decode}


def _decode_usable(name: str, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether decode kernel `name` runs and matches the masked path for this device, dtype and head shape (checked once)."""
    key = (name, str(q.device), q.dtype, q.shape[1], k.shape[2], q.shape[3])
    if key not in _verdicts:
        _verdicts[key] = _decode_agrees(DECODE_KERNELS[name], q.shape[1], k.shape[2], q.shape[3], q.device, q.dtype)
    return _verdicts[key]


def _decode_agrees(kernel: DecodeKernel, h: int, hkv: int, d: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Run `kernel` on three rows of different lengths in a small buffer; compare it with masked_decode."""
    g = torch.Generator(device=device).manual_seed(0)
    b, cap = 3, 96
    q = torch.randn(b, 1, h, d, device=device, dtype=dtype, generator=g).transpose(1, 2)
    k, v = (torch.randn(b, cap, hkv, d, device=device, dtype=dtype, generator=g) for _ in range(2))
    used = torch.tensor([1, 40, cap], dtype=torch.int32, device=device)
    try:
        got = kernel(q, k, v, used, None).float()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    want = masked_decode(q, k, v, used, None).float()
    return got.shape == want.shape and bool((got - want).abs().max() <= CHECK_TOLERANCE * want.abs().max())


# ---- attention with its log-sum-exp, for keys split over processes (inference/sharded.py)

LSE_KEY_BLOCK = 1 << 26  # scores per block of the exact fallback path: bounds its memory at any key count


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, Lq, D) against k/v (B, Hkv, Lk, D) and its log-sum-exp: (B, H, Lq, D) and (B, H, Lq, 1),
    both fp32; `causal` only for a chunk against itself (Lq == Lk).

    On CUDA cuDNN for chunk-sized queries, FlashAttention for few (decoding), each checked once like the other
    kernels; elsewhere (CPU: the tests' reference) exact fp32 arithmetic over blocks of keys.
    """
    if q.is_cuda:
        if q.shape[2] >= SPLIT_MIN_QUERIES and _usable("split", q, k):
            try:
                out, lse = cudnn_with_lse(q, k, v, causal, scale)
                return out.float(), lse
            except RuntimeError:  # a shape the small check did not cover (a very long shard): FlashAttention from now
                _verdicts[("split", str(q.device), q.dtype, q.shape[1], k.shape[1], q.shape[3])] = False
        if _lse_usable(q, k):
            return flash_with_lse(q, k, v, causal, scale)
    return math_with_lse(q, k, v, causal, scale)


def flash_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's forward and its log-sum-exp (grouped heads native), as attention_lse returns them."""
    lq, lk = q.shape[2], k.shape[2]
    res = torch.ops.aten._flash_attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None,
                                                  lq, lk, 0.0, causal and lq > 1, False, scale=scale)
    out, lse = res[0], res[1]
    return out.transpose(1, 2).float(), lse[:, :, :lq, None].float()


def math_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 attention and log-sum-exp, key block by key block (merged by log-sum-exp): any device, any length."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    rep = h // hkv
    scale = d ** -0.5 if scale is None else scale
    # The query heads of a KV head as rows of one attention: no copy of the keys for grouped-query attention.
    qg = q.float().reshape(b, hkv, rep * lq, d) * scale
    rows = torch.arange(lq, device=q.device).repeat(rep)[:, None]  # each row's query position
    block = max(1, LSE_KEY_BLOCK // max(1, b * h * lq))
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    for start in range(0, lk, block):
        kb, vb = k[:, :, start:start + block].float(), v[:, :, start:start + block].float()
        s = qg @ kb.transpose(-1, -2)
        if causal:
            cols = torch.arange(start, start + kb.shape[2], device=q.device)[None]
            s = s.masked_fill(cols > rows + (lk - lq), float("-inf"))
        part_lse = torch.logsumexp(s, -1, keepdim=True)
        # A row with every key masked in this block has lse -inf: its weights are 0, not NaN.
        p = torch.exp(s - torch.where(torch.isinf(part_lse), torch.zeros_like(part_lse), part_lse))
        part = p @ vb
        if out is None or lse is None:
            out, lse = part, part_lse
        else:
            out, lse = merge_with_lse(out, lse, part, part_lse)
    assert out is not None and lse is not None
    return out.reshape(b, h, lq, d), lse.reshape(b, h, lq, 1)


def _lse_usable(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether flash_with_lse runs and matches math_with_lse (output and log-sum-exp) here (checked once)."""
    key = ("flash_lse", str(q.device), q.dtype, q.shape[1], k.shape[1], q.shape[3])
    if key not in _verdicts:
        _verdicts[key] = _lse_agrees(q.shape[1], k.shape[1], q.shape[3], q.device, q.dtype)
    return _verdicts[key]


def _lse_agrees(h: int, hkv: int, d: int, device: torch.device, dtype: torch.dtype) -> bool:
    """flash_with_lse against math_with_lse on a small input, with and without the causal mask."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 24, h, d, device=device, dtype=dtype, generator=g).transpose(1, 2)
    k, v = (torch.randn(1, 24, hkv, d, device=device, dtype=dtype, generator=g).transpose(1, 2) for _ in range(2))
    try:
        for causal in (False, True):
            got, got_lse = flash_with_lse(q, k, v, causal, None)
            want, want_lse = math_with_lse(q, k, v, causal, None)
            if got.shape != want.shape or got_lse.shape != want_lse.shape:
                return False
            if (got - want).abs().max() > CHECK_TOLERANCE * want.abs().max() or (got_lse - want_lse).abs().max() > 0.05:
                return False
    except (RuntimeError, TypeError, NotImplementedError, IndexError):
        return False
    return True
