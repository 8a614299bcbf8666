"""Benchmark: where a decoding step's time goes, and the decode attention kernels against the bandwidth bound.

1. Decode attention alone (random keys and values in the engine's buffer layout, one query per row): FlashAttention's
   variable-length forward as the engine uses it (`flash_decode`; it runs FlashAttention's split-KV kernel), for the
   Llama-3.1-8B and SmolLM2-135M head shapes at several rows x lengths; microseconds per call and the bytes of keys
   and values read over that time (TB/s). (A split of each row's keys into pieces merged by log-sum-exp on top of it
   was tried on 2026-11-30 and ran 1.6-3.4x slower: the kernel already splits; it was removed.)
2. A profile of whole decoding steps of the 8B shape (eager, so each kernel shows): the kernel time of a generation
   of 33 tokens minus that of 1 token (the prefill), per step, by kind (matrix products, attention, other).

Usage (GPU, ~2 minutes):  PYTHONPATH=$PWD/src python benchmarks/decode_profile_gpu.py --out $OUT/decode_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_engine import build_model, prompts_at  # noqa: E402

from longforge.inference import Engine  # noqa: E402
from longforge.inference import kernels as K  # noqa: E402

HEADS = {"llama-3.1-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}
CASES = {"llama-3.1-8b": [(64, 4096), (16, 4096), (8, 16384), (4, 32768), (1, 131072), (2, 262144)],
         "smollm2-135m": [(64, 8192), (16, 32768), (4, 131072)]}


def time_call(fn: Any, n: int = 50) -> float:
    """Mean seconds per call over n calls after three warm-up calls (CUDA events)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / n


def kernels_bench(device: torch.device) -> list[dict[str, Any]]:
    """Per decode kernel: time per call and effective bandwidth over the keys and values it must read."""
    rows = []
    for shape, cases in CASES.items():
        h, hkv, d = HEADS[shape]
        for b, n in cases:
            cap = n + 256
            q = torch.randn(b, 1, h, d, device=device, dtype=torch.bfloat16).transpose(1, 2).contiguous()
            k, v = (torch.randn(b, cap, hkv, d, device=device, dtype=torch.bfloat16) for _ in range(2))
            used = torch.full((b,), n, dtype=torch.int32, device=device)
            kv_bytes = 2 * b * n * hkv * d * 2
            row: dict[str, Any] = {"shape": shape, "rows": b, "keys": n, "kv_gib": round(kv_bytes / 2**30, 3)}
            ref = K.masked_decode(q, k, v, used, None).float() if b * n <= 2**20 else None
            for name, fn in (("flash_decode", K.flash_decode),):
                s = time_call(lambda fn=fn: fn(q, k, v, used, None))
                row[name] = {"us": round(1e6 * s, 1), "tb_per_s": round(kv_bytes / s / 1e12, 2)}
                if ref is not None:
                    row[name]["max_rel_err"] = float((fn(q, k, v, used, None).float() - ref).abs().max() / ref.abs().max())
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def kind(name: str) -> str:
    """A kernel's kind from its name."""
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n:  # before matmul: flash templates name cutlass
        return "attention"
    if any(x in n for x in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "gemv", "splitk")):
        return "matmul"
    if "triton" in n:
        return "triton (fused norm/rope/swiglu)"
    return "other"


def kernel_times(fn: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Kernel seconds by kind and by name of one call of fn (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind(e.name)] += e.device_time_total / 1e6
            by_name[e.name[:80]] += e.device_time_total / 1e6
    return by_kind, by_name


def step_profile(device: torch.device, cases: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Kernel time per decoding step of the 8B shape by kind: generation of 33 tokens minus 1, over 32."""
    model = build_model("llama-3.1-8b", device, torch.bfloat16)
    out = []
    for b, n in cases:
        rows = prompts_at(n, b, model.config.vocab_size, seed=n)
        eng = Engine(model, stop_on_eos=False, cuda_graphs="off", kv_cache="device")
        eng.generate(rows, 33)  # warm: compiled kernels, cuDNN plans
        one, one_names = kernel_times(lambda: eng.generate(rows, 1))
        many, many_names = kernel_times(lambda: eng.generate(rows, 33))
        per = {k: round(1e3 * (many[k] - one.get(k, 0.0)) / 32, 3) for k in many}
        names = sorted(((1e3 * (many_names[k] - one_names.get(k, 0.0)) / 32, k) for k in many_names), reverse=True)
        row = {"rows": b, "length": n, "ms_per_step_by_kind": per, "ms_per_step_kernels": round(sum(per.values()), 3),
               "top_kernels_ms": [(round(t, 3), k) for t, k in names[:12]]}
        print(json.dumps(row), flush=True)
        out.append(row)
        eng.release()
        del eng
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", default="16:4096,1:131072", help="rows:length cases to profile (8B shape)")
    args = ap.parse_args()
    device = torch.device("cuda")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                              "kernels": kernels_bench(device)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    cases = [tuple(map(int, c.split(":"))) for c in args.profile.split(",") if c]
    result["step_profile"] = step_profile(device, cases)  # type: ignore[arg-type]
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
