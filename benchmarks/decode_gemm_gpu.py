"""Benchmark: a decoding step's matrix products by cuBLAS against longforge's weight-streaming Triton kernel.

Two parts, one process, one GPU:
  products  every linear layer of the Llama-3.1-8B shape (q, k/v, o, gate/up, down, LM head; bf16) at 1, 4, 16, 25
            and 32 rows: torch's F.linear (cuBLAS) against `skinny_linear` with its default tiles and (at 1 and 16
            rows) with the best of 36 tile configurations; each timed as 50 calls captured in one CUDA graph (no launch gaps), in GB/s of
            weight read and against the 4.8 TB/s of an H200's HBM3e. Also checked: the kernel's result against
            F.linear in float32 and a row alone against the same row in a batch (bitwise).
  engine    the 8B shape's decoding steps in the engine (random bf16 weights, forced generation length, CUDA graphs,
            fused kernels), decode_gemm "cublas" against "triton" on the same prompts: ms per step against the step's
            bandwidth bound (weights + the batch's KV), and whether the tokens agree.

Usage (GPU, ~3 minutes on an H200):
    PYTHONPATH=$PWD/src python benchmarks/decode_gemm_gpu.py --out $OUT/decode_gemm.json
Usage (CPU: Triton's interpreter, a tiny shape; checks the script, numbers mean nothing):
    TRITON_INTERPRET=1 PYTHONPATH=$PWD/src python benchmarks/decode_gemm_gpu.py --smoke --out /tmp/decode_gemm.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from eval_engine import HBM_BYTES_PER_S, SHAPES, build_model, prompts_at, run_engine, step_bound_s, summarise  # noqa: E402
from longforge.inference import Engine  # noqa: E402
from longforge.inference.skinny import Tiles, skinny_linear, tiles_for  # noqa: E402

SWEEP = [Tiles(n, k, w, s) for n in (16, 32, 64) for k in (128, 256, 512) for w in (4, 8) for s in (3, 4)]


def products_of(shape: str) -> dict[str, tuple[int, int]]:
    """(out, in) features of each distinct linear layer of a Llama shape."""
    c = SHAPES[shape]
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    return {"q": (c["num_attention_heads"] * d, h), "k/v": (c["num_key_value_heads"] * d, h),
            "o": (h, c["num_attention_heads"] * d), "gate/up": (i, h), "down": (h, i), "lm_head": (c["vocab_size"], h)}


def graph_time(fn: Any, device: torch.device, calls: int = 50, repeats: int = 5) -> float:
    """Seconds per call of `fn`, `calls` of them captured in one CUDA graph and replayed (best of `repeats`)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()  # compile and warm up outside the capture
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        best = min(best, start.elapsed_time(end) / 1e3 / calls)
    return best


def bench_product(name: str, n: int, k: int, rows: int, device: torch.device, dtype: torch.dtype,
                  sweep: list[Tiles]) -> dict[str, Any]:
    """One product at one row count: cuBLAS, the kernel's default tiles, the best swept tiles; errors and invariance."""
    g = torch.Generator(device="cpu").manual_seed(rows * 7919 + n)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    x = torch.randn(rows, k, generator=g).to(device, dtype)
    ref = F.linear(x.float(), w.float())
    out = skinny_linear(x, w)
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    cublas_err = ((F.linear(x, w).float() - ref).abs().max() / ref.abs().max()).item()
    alone = torch.equal(skinny_linear(x[:1], w)[0], out[0])
    nbytes = w.numel() * w.element_size()
    t_cublas = graph_time(lambda: F.linear(x, w), device)
    default = tiles_for(n, k, torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132)
    t_default = graph_time(lambda: skinny_linear(x, w, tiles=default), device)
    swept: list[tuple[float, Tiles]] = []
    for t in sweep:
        try:
            swept.append((graph_time(lambda t=t: skinny_linear(x, w, tiles=t), device), t))
        except Exception as e:  # noqa: BLE001 - a tile that does not compile (shared memory) is skipped, and said
            print(f"  {name} rows {rows}: tiles {t} skipped ({type(e).__name__})", flush=True)
    best_t, best = min(swept, key=lambda s: s[0]) if swept else (t_default, default)

    def rate(s: float) -> float:
        return round(nbytes / s / 1e9, 1)

    res = {"product": name, "out": n, "in": k, "rows": rows, "weight_mb": round(nbytes / 1e6, 1),
           "cublas_us": round(t_cublas * 1e6, 2), "cublas_gbs": rate(t_cublas),
           "kernel_us": round(t_default * 1e6, 2), "kernel_gbs": rate(t_default), "kernel_tiles": default.__dict__,
           "best_us": round(best_t * 1e6, 2), "best_gbs": rate(best_t), "best_tiles": best.__dict__,
           "kernel_over_cublas": round(t_default / t_cublas, 3), "best_over_cublas": round(best_t / t_cublas, 3),
           "bound_us": round(nbytes / HBM_BYTES_PER_S * 1e6, 2), "rel_err": err, "cublas_rel_err": cublas_err,
           "row_alone_equal": alone}
    print(f"  {name:8s} {n:6d}x{k:<6d} rows {rows:2d}: cuBLAS {res['cublas_gbs']:7.1f} GB/s, kernel "
          f"{res['kernel_gbs']:7.1f} ({res['kernel_over_cublas']:.2f}x the time), best {res['best_gbs']:7.1f} "
          f"{best.__dict__}; err {err:.1e} (cuBLAS {cublas_err:.1e}); alone==batch {alone}", flush=True)
    return res


def bench_engine(shape: str, length: int, rows: int, new: int, device: torch.device) -> dict[str, Any]:
    """The engine's decoding steps with cuBLAS and with the kernel, on the same prompts (second, warm calls)."""
    model = build_model(shape, device, torch.bfloat16)
    prompts = prompts_at(length, rows, model.config.vocab_size, seed=length)
    bound = step_bound_s(model, [len(p) for p in prompts], new)
    out: dict[str, Any] = {"shape": shape, "length": length, "rows": rows, "new_tokens": new,
                           "bound_ms": round(bound * 1e3, 3)}
    tokens = {}
    for gemm in ("cublas", "triton"):
        eng = Engine(model, stop_on_eos=False, kv_cache="device", decode_gemm=gemm)
        run_engine(eng, prompts, new, device)  # captures the graph, compiles
        res = run_engine(eng, prompts, new, device)
        tokens[gemm] = res["tokens"]
        out[gemm] = {**summarise(res, rows, new, bound), "engine": eng.describe()}
        eng.release()
        print(f"  engine {shape} {rows} x {length} {gemm}: {res['ms_per_step']:.2f} ms/step, bound "
              f"{bound * 1e3:.2f} ms: {out[gemm]['step_over_bound']}x", flush=True)
    out["triton_over_cublas"] = round(out["triton"]["ms_per_step"] / out["cublas"]["ms_per_step"], 3)
    out["same_tokens"] = tokens["cublas"] == tokens["triton"]
    del model
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return out


def main() -> None:
    """Command line: see the module's docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,4,16,25,32", help="Rows per product (a decoding batch).")
    ap.add_argument("--sweep-rows", default="1,16", help="Row counts at which the tiles are swept ('' for none).")
    ap.add_argument("--engine", default="4096:16,16384:8", help="Engine runs: length:rows,... ('' skips them).")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="CPU (TRITON_INTERPRET=1), tiny shape, fp16, no engine.")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = "tiny" if args.smoke else args.shape
    dtype = torch.float16 if args.smoke else torch.bfloat16  # the interpreter has no bfloat16
    sweep_rows = {int(r) for r in args.sweep_rows.split(",") if r} if not args.smoke else set()
    result: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv), "shape": shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__, "hbm_bytes_per_s": HBM_BYTES_PER_S, "products": [], "engine": []}
    print(f"{result['device']}; {shape}; products at rows {args.rows}", flush=True)
    for name, (n, k) in products_of(shape).items():
        for rows in (int(r) for r in args.rows.split(",")):
            result["products"].append(bench_product(name, n, k, rows, device, dtype, SWEEP if rows in sweep_rows else []))
            args.out.write_text(json.dumps(result, indent=1))
    if not args.smoke:
        for spec in filter(None, args.engine.split(",")):
            length, rows = (int(v) for v in spec.split(":"))
            result["engine"].append(bench_engine(shape, length, rows, args.new_tokens, device))
            args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
