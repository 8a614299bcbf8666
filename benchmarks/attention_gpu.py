"""Benchmark: attention kernels at the shapes longforge runs, on one GPU, each checked against an fp32 reference.

Three shapes of the Llama-3.1-8B attention (32 query heads, 8 KV heads, head dim 128, bf16):
  prefill  a chunk of queries against a long past, causal aligned to the last key (lower right), as the eval
           engine's chunked prefill runs it; and decoding (one query against the whole past);
  square   causal self-attention forward over a whole prompt (what `model.generate` runs for its prefill);
  train    causal self-attention forward + backward (what each training layer runs).
  split    the training attention at one GPU's shapes under sequence parallelism, as one call per KV-head
           group (the engine before) against calls of at most CALL_ELEMENTS query elements (`--split`).
Every candidate is first compared with an fp32 reference at a small shape (output, and gradients for
`train`); only candidates that match are timed. Times are CUDA-event medians; TFLOP/s counts the causal
FLOPs (4 H D per query-key pair attended; backward 2.5 times forward, as FlashAttention's benchmarks do).

Usage (GPU): PYTHONPATH=$PWD/src python benchmarks/attention_gpu.py --out $OUT/attention.json
             PYTHONPATH=$PWD/src python benchmarks/attention_gpu.py --split --out $OUT/split.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

H, HKV, D = 32, 8, 128
Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp32 causal attention aligned to the last key, (B, H, Lq, D) x (B, Hkv, Lk, D), KV heads repeated."""
    lq, lk = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    kf, vf = (t.float().repeat_interleave(rep, 1) for t in (k, v))
    s = q.float() @ kf.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vf


def pairs(lq: int, lk: int) -> int:
    """Query-key pairs a lower-right causal mask keeps."""
    return lq * (lk - lq) + lq * (lq + 1) // 2


# ---- candidates; all take and return (B, H, L, D) ----

def longforge_kernel(name: str) -> Fn:
    """One of longforge.inference.kernels' kernels with the default scale: causal_attention is the engine's dispatch,
    sdpa_lower_right its public-API path (the engine's earlier kernel), flash_last and split_cudnn its fast paths."""
    from longforge.inference import kernels as attention

    fn = getattr(attention, name)
    return lambda q, k, v: fn(q, k, v, None)


def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn with one sequence, causal window (-1, 0), GQA if offered."""
    from torch.nn.attention.varlen import varlen_attn

    b, h, lq, d = q.shape
    lk = k.shape[2]
    params = inspect.signature(varlen_attn).parameters
    kw: dict[str, Any] = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    else:
        k, v = (t.repeat_interleave(h // t.shape[1], 1) for t in (k, v))
    cq = torch.tensor([0, lq], dtype=torch.int32, device=q.device)
    ck = torch.tensor([0, lk], dtype=torch.int32, device=q.device)
    flat = [t[0].transpose(0, 1) for t in (q, k, v)]
    return varlen_attn(*flat, cq, ck, lq, lk, **kw).transpose(0, 1)[None]


_flex: Any = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Compiled FlexAttention with a lower-right causal block mask."""
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    lq, lk = q.shape[2], k.shape[2]
    off = lk - lq

    def causal(b: Any, h: Any, qi: Any, ki: Any) -> Any:
        return ki <= qi + off

    block = create_block_mask(causal, None, None, lq, lk, device=q.device)
    return _flex(q, k, v, block_mask=block, enable_gqa=True)


def sdpa_backend(name: str) -> Fn:
    """Square causal SDPA restricted to one back-end (or the default order), GQA through enable_gqa."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
              "efficient": [SDPBackend.EFFICIENT_ATTENTION]}.get(name)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if chosen is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        with sdpa_kernel(chosen):
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            except RuntimeError:
                # Some back-ends take no grouped heads: repeat the KV heads (what a caller would do).
                rep = q.shape[1] // k.shape[1]
                return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                      is_causal=True)
    run.__doc__ = f"SDPA, back-end {name}"
    return run


DOCS = 8


def doc_ids(length: int) -> torch.Tensor:
    """DOCS equal documents packed into one sequence, as (1, L) ids."""
    return (torch.arange(length, device="cuda") * DOCS // length)[None]


def train_backend(name: str) -> Fn:
    """The training engine's document-masked attention with back-end `name` (flex or varlen)."""
    from longforge.model.attention import attend

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend(q, k, v, doc_ids(q.shape[2]), name, None)
    run.__doc__ = f"training attention, document masks, {name}"
    return run


def doc_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each document alone through the fp32 reference, concatenated."""
    ids = doc_ids(q.shape[2])[0]
    parts = [reference(q[:, :, ids == i], k[:, :, ids == i], v[:, :, ids == i]) for i in range(DOCS)]
    return torch.cat(parts, 2)


def sdpa_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA with no mask and grouped heads (exact for one query, which sees every key)."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


# ---- measurement ----

def tensors(lq: int, lk: int, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (1, H, lq, D) and k, v (1, HKV, lk, D) in bf16 as views of sequence-major buffers (as models make them)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, lq, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(1, lk, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(1, lk, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    if grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return q, k, v


def check(fn: Fn, lq: int, lk: int, grad: bool, ref_fn: Fn = reference) -> dict[str, Any]:
    """Max relative error of fn against the fp32 reference (and of the gradients when `grad`)."""
    q, k, v = tensors(lq, lk, grad)
    out = fn(q, k, v)
    ref = ref_fn(q, k, v)
    res = {"out_err": float((out.float() - ref).abs().max() / ref.abs().max())}
    if grad:
        go = torch.randn_like(ref)
        gs = torch.autograd.grad(out.float(), (q, k, v), go)
        rs = torch.autograd.grad(ref, (q, k, v), go)
        res["grad_err"] = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(gs, rs))
    res["ok"] = res["out_err"] < 2e-2 and res.get("grad_err", 0.0) < 5e-2
    return res


def timed(fn: Fn, lq: int, lk: int, grad: bool, reps: int = 5) -> float:
    """Median seconds of fn (forward, or forward + backward) over `reps` runs after two warm-ups."""
    q, k, v = tensors(lq, lk, grad)
    go = torch.randn(1, H, lq, D, device="cuda", dtype=torch.bfloat16) if grad else None
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(q, k, v)
        if grad:
            torch.autograd.grad(out, (q, k, v), go)
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
        del out
    return sorted(times)[len(times) // 2]


def case(name: str, fn: Fn, lq: int, lk: int, grad: bool, small: tuple[int, int], docs: bool = False) -> dict[str, Any]:
    """Check fn at a small shape, then time it at (lq, lk); errors are recorded, not raised."""
    row: dict[str, Any] = {"kernel": name, "lq": lq, "lk": lk, "backward": grad, "documents": DOCS if docs else 1}
    try:
        row["check"] = check(fn, *small, grad, doc_reference if docs else reference)
        if not row["check"]["ok"]:
            row["error"] = "does not match the reference"
            return row
        sec = timed(fn, lq, lk, grad)
        n_pairs = DOCS * pairs(lq // DOCS, lk // DOCS) if docs else pairs(lq, lk)
        flops = 4 * H * D * n_pairs * (3.5 if grad else 1.0)
        row.update(seconds=sec, tflops=flops / sec / 1e12)
    except Exception as e:  # noqa: BLE001 - a benchmark reports what it could not run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


# (query heads, KV heads, tokens, documents) one GPU attends over: the 8B at 512K alone, and under 8-way sequence
# parallelism (4 query heads, 1 KV head per GPU) at 1M and 2M tokens; the last with document masks (varlen).
SPLIT_SHAPES = [(32, 8, 524288, 1), (4, 1, 1048576, 1), (4, 1, 2097152, 1), (4, 1, 1048576, DOCS)]
# The engine before: the fewest KV-aligned calls under 2^31 elements. Now: calls of at most CALL_ELEMENTS.
SPLIT_BUDGETS = {"one call per KV group (before)": 2**31 - 1, "calls of <= 2^28 (now)": 2**28}


def split_case(hq: int, hkv: int, length: int, docs: int, label: str, budget: int) -> dict[str, Any]:
    """Forward + backward of the training attention at one shape and call budget: seconds and memory above inputs."""
    import longforge.model.attention as attention

    before, attention.CALL_ELEMENTS = attention.CALL_ELEMENTS, budget
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, length, h, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
               .detach().requires_grad_() for h in (hq, hkv, hkv))
    go = torch.randn(1, hq, length, D, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = (torch.arange(length, device="cuda") * docs // length)[None] if docs > 1 else None
    nq, _ = attention.head_split(hq, hkv, length * D, budget)
    row: dict[str, Any] = {"kernel": label, "q_heads": hq, "kv_heads": hkv, "tokens": length, "documents": docs,
                           "calls": hq // nq, "budget": budget}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        start.record()
        out = attention.attend(q, k, v, ids, "varlen" if ids is not None else "sdpa", None)
        grads = torch.autograd.grad(out, (q, k, v), go)
        end.record()
        torch.cuda.synchronize()
        sec = start.elapsed_time(end) / 1e3
        flops = 4 * hq * D * docs * pairs(length // docs, length // docs) * 3.5
        row.update(seconds=sec, tflops=flops / sec / 1e12,
                   scratch_gib=(torch.cuda.max_memory_allocated() - base) / 2**30,
                   grad_norms=[float(t.float().norm()) for t in grads])
        del out, grads
    except Exception as e:  # noqa: BLE001 - a benchmark reports what it could not run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    finally:
        attention.CALL_ELEMENTS = before
    del q, k, v, go
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def split_rows() -> list[dict[str, Any]]:
    """Every SPLIT_SHAPES row under each budget, after one small warm-up of both back-ends."""
    split_case(4, 1, 65536, 1, "warm-up", 2**28)
    split_case(4, 1, 65536, DOCS, "warm-up", 2**28)
    return [split_case(*shape, label, budget) for shape in SPLIT_SHAPES for label, budget in SPLIT_BUDGETS.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--past", type=int, default=131072, help="Keys in the prefill and decode cases.")
    ap.add_argument("--chunk", type=int, default=8192, help="Queries per prefill chunk.")
    ap.add_argument("--train", type=int, default=65536, help="Sequence length of the training case.")
    ap.add_argument("--quick", action="store_true", help="Only the engine's candidates and the document-mask training rows.")
    ap.add_argument("--split", action="store_true", help="Only the training attention's call split (SPLIT_SHAPES).")
    args = ap.parse_args()
    from torch.nn.attention import varlen as _v

    res: dict[str, Any] = {"date": dt.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
                           "torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                           "python": platform.python_version(),
                           "varlen_signature": str(inspect.signature(_v.varlen_attn)), "rows": []}
    if hasattr(torch._C, "_get_sdp_priority_order"):
        res["sdp_priority"] = [str(x) for x in torch._C._get_sdp_priority_order()]
    rows = res["rows"]
    if args.split:
        rows.extend(split_rows())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        print("\n| q heads / KV heads | tokens | documents | kernel | calls | s | TFLOP/s | GiB above inputs |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            t = (f"{r['seconds']:.2f} | {r['tflops']:.0f} | {r['scratch_gib']:.2f}" if "seconds" in r
                 else f"- | - | {r.get('error', '')}")
            print(f"| {r['q_heads']} / {r['kv_heads']} | {r['tokens']} | {r['documents']} | {r['kernel']} | {r['calls']} | {t} |")
        return
    engine, grouped_lower_right = longforge_kernel("causal_attention"), longforge_kernel("sdpa_lower_right")
    prefill: list[tuple[str, Fn]] = [("engine", engine), ("grouped_lower_right", grouped_lower_right),
                                     ("flash_op", longforge_kernel("flash_last")),
                                     ("split_cudnn", longforge_kernel("split_cudnn")), ("varlen", varlen),
                                     ("flex", flex)]
    for past in (args.past, args.past // 8):
        for name, fn in prefill:
            if args.quick and name in ("varlen", "flex"):
                continue
            rows.append({"shape": "prefill", **case(name, fn, args.chunk, past, False, (512, 2048))})
    rows.append({"shape": "prefill", **case("engine", engine, 4 * args.chunk, args.past, False, (512, 2048))})
    rows.append({"shape": "prefill", **case("grouped_lower_right", grouped_lower_right, 4 * args.chunk, args.past, False,
                                            (512, 2048))})
    for name, fn in (("engine", engine), ("grouped_lower_right", grouped_lower_right), ("sdpa_default", sdpa_plain)):
        rows.append({"shape": "decode", **case(name, fn, 1, args.past, False, (1, 2048))})
    for b in ("default",) if args.quick else ("default", "flash", "cudnn", "efficient"):
        rows.append({"shape": "square", **case(f"sdpa_{b}", sdpa_backend(b), args.past, args.past, False, (2048, 2048))})
    if not args.quick:
        for b in ("default", "flash", "cudnn"):
            rows.append({"shape": "train", **case(f"sdpa_{b}", sdpa_backend(b), args.train, args.train, True, (2048, 2048))})
    for b in ("flex", "varlen"):
        rows.append({"shape": "train", **case(f"{b}_documents", train_backend(b), args.train, args.train, True,
                                              (2048, 2048), docs=True)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"\n## Attention kernels ({res['date']})\n- command: `{res['command']}`\n- machine: {res['device']}, torch "
          f"{res['torch']}\n\n| shape | kernel | q x k | check (out/grad err) | ms | TFLOP/s |\n|---|---|---|---|---|---|")
    for r in rows:
        c = r.get("check", {})
        err = f"{c.get('out_err', float('nan')):.1e}" + (f"/{c['grad_err']:.1e}" if "grad_err" in c else "")
        t = f"{1e3 * r['seconds']:.1f} | {r['tflops']:.0f}" if "seconds" in r else f"- | {r.get('error', '')}"
        print(f"| {r['shape']} | {r['kernel']} | {r['lq']} x {r['lk']} | {r['documents']} | {err} | {t} |")


if __name__ == "__main__":
    main()
