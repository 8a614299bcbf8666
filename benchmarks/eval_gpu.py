"""Benchmark: longforge's generation engine against `model.generate` on a Llama-3.1-8B-shaped model at 128K tokens.

One run measures, on the same model and prompt:
  1. correctness of the engine on this GPU: last-position logits of chunked prefill (KV on the device and
     offloaded to CPU) against one full forward pass;
  2. a 128K-token passkey prompt answered by `model.generate` (transformers, SDPA) and by the engine with the
     KV cache on the GPU and in pinned CPU memory: wall time and peak GPU memory of each;
  3. prefill throughput against the forward FLOP rate (2 N_layers + 2 n_layers d L per token, causal);
  4. the time of a full 40 x 10 passkey grid up to 128K: the prompts are built for real (tokenizer time
     measured), and the model time is extrapolated from one prompt at each of several grid lengths (the whole
     grid would take tens of minutes), with t(L) = a L + b L^2 fitted to them.

Random weights (bf16) are enough for speed. The tokenizer is a small byte-level BPE trained here (nothing is
downloaded); prompt lengths are exact in its tokens.

Usage (GPU):  PYTHONPATH=$PWD/src python benchmarks/eval_gpu.py --out $OUT/eval_gpu.json
Usage (CPU):  PYTHONPATH=$PWD/src python benchmarks/eval_gpu.py --tiny --out /tmp/eval_gpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from longforge.inference import Engine  # noqa: E402
from longforge.eval.grid import spread_lengths  # noqa: E402
from longforge.eval.passkey import FILLER, NEEDLE, QUESTION, build_grid  # noqa: E402

GIB = 2**30
H200_PEAK = 989e12  # bf16 dense, the datasheet's; about 790e12 measured on an 8K matmul here


def model_config(tiny: bool, length: int) -> Any:
    """Llama-3.1-8B's shape (or a tiny one for CPU), llama3 RoPE scaling, window `length`."""
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    shape = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
             if tiny else dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                               intermediate_size=14336))
    return LlamaConfig(vocab_size=128256, max_position_embeddings=max(length, 131072), rope_parameters=rope,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=None,
                       pad_token_id=0, attn_implementation="sdpa", **shape)


def build_model(cfg: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Random weights created directly on the device in the target dtype (no 32 GB fp32 copy on the host)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def make_tokenizer(folder: Path) -> Any:
    """A byte-level BPE tokenizer trained on passkey text (digits one per token), saved and reloaded."""
    from longforge.demo.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    texts = [" ".join(FILLER) + " " + NEEDLE.format(key=int(rng.integers(10000, 100000))) + " " + QUESTION for _ in range(200)]
    return train_tokenizer(texts, 400, folder, model_max_length=10**7)


def sync(device: torch.device) -> float:
    """Wall time once queued device work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak(device: torch.device) -> int:
    """Free what can be freed and restart the peak-memory counter; returns memory allocated now."""
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak(device: torch.device) -> int:
    """Peak GPU memory allocated since the last reset (PyTorch's allocator), in bytes."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


@torch.no_grad()
def check_logits(model: Any, ids: torch.Tensor, chunk: int, device: torch.device) -> dict[str, Any]:
    """Last-position logits of the engine's chunked prefill (both KV places) against one full forward pass."""
    ref = model(input_ids=ids.to(device), logits_to_keep=1).logits[0, -1].float()
    out: dict[str, Any] = {"tokens": ids.shape[1], "chunk": chunk}
    logits = {}
    for place in ("device", "cpu") if device.type == "cuda" else ("device",):
        eng = Engine(model, prefill_chunk=chunk, kv_cache=place, stop_on_eos=False)
        store = eng._store(ids.shape[1])
        with eng._attached(store):  # the model's attention goes through the store while prefilling
            h = None
            for s in range(0, ids.shape[1], chunk):
                h = eng._run_decoder(ids[:, s:s + chunk].to(device), s, store)
        assert h is not None
        logits[place] = model.get_output_embeddings()(h[:, -1])[0].float()
        err = (logits[place] - ref).abs().max().item() / ref.abs().max().item()
        out[f"kv_{place}_rel_err"] = round(err, 5)
        out[f"kv_{place}_same_argmax"] = bool(logits[place].argmax() == ref.argmax())
    if "cpu" in logits:
        out["offload_equals_device"] = bool(torch.equal(logits["cpu"], logits["device"]))
    return out


@torch.no_grad()
def run_generate(model: Any, ids: torch.Tensor, new: int, device: torch.device) -> dict[str, Any]:
    """transformers' model.generate, greedy, exactly `new` new tokens."""
    base = reset_peak(device)
    t0 = sync(device)
    out = model.generate(ids.to(device), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    t1 = sync(device)
    return {"seconds": t1 - t0, "peak_gib": peak(device) / GIB, "peak_over_start_gib": (peak(device) - base) / GIB,
            "tokens": out[0, ids.shape[1]:].tolist()}


@torch.no_grad()
def run_engine(engine: Engine, ids: torch.Tensor, new: int, device: torch.device) -> dict[str, Any]:
    """The engine, greedy, exactly `new` new tokens (no early stop, like generate)."""
    base = reset_peak(device)
    t0 = sync(device)
    rows = engine.generate(ids, new)
    t1 = sync(device)
    return {"seconds": t1 - t0, "peak_gib": peak(device) / GIB, "peak_over_start_gib": (peak(device) - base) / GIB,
            "tokens": rows[0], **{k: v for k, v in engine.last.items()}}


def public_kernels(fn: Any) -> Any:
    """Run fn with the engine restricted to public SDPA kernels (its attention before the private fast paths)."""
    from longforge.inference import kernels as attention

    saved = attention._usable
    attention._usable = lambda *a: False  # type: ignore[assignment]
    try:
        return fn()
    finally:
        attention._usable = saved


def prefill_flops(n_layer_params: int, layers: int, d_attn: int, length: int) -> float:
    """Forward FLOPs to prefill `length` tokens: 2 N per token for the layers' matmuls, causal attention 2 L d L^2."""
    return 2.0 * n_layer_params * length + 2.0 * layers * d_attn * length * length


@torch.no_grad()
def grid_time(model: Any, tok: Any, top: int, measure: list[int], device: torch.device, chunk: int,
              kv: str) -> dict[str, Any]:
    """Build the whole 40 x 10 passkey grid for real; time one prompt at several of its lengths; extrapolate."""
    lengths = spread_lengths(1024, top, 40, "linear")
    t0 = time.perf_counter()
    grid = build_grid(tok, lengths, [float(x) for x in np.linspace(0, 1, 10)], 1, seed=0)
    build_s = time.perf_counter() - t0
    engine = Engine(model, prefill_chunk=chunk, kv_cache=kv)  # type: ignore[arg-type]
    by_len = {p.length: p for p in grid if p.depth == 0.5 or abs(p.depth - 5 / 9) < 1e-9}
    chosen = [min(lengths, key=lambda L: abs(L - m)) for m in measure]
    times = {}
    for L in chosen:
        p = by_len[L]
        x = torch.tensor([p.ids])
        t = sync(device)
        engine.generate(x, 8, stop=None)
        times[L] = sync(device) - t
    xs = np.array(list(times), dtype=np.float64)
    ys = np.array(list(times.values()))
    coef, *_ = np.linalg.lstsq(np.stack([xs, xs**2], 1), ys, rcond=None)
    predict = lambda L: float(coef[0] * L + coef[1] * L * L)  # noqa: E731
    model_s = sum(10 * predict(L) for L in lengths)
    return {"lengths": [lengths[0], lengths[-1]], "cells": len(grid), "build_prompts_s": build_s,
            "measured_prompt_s": {str(k): v for k, v in times.items()},
            "fit": {"a_s_per_token": coef[0], "b_s_per_token2": coef[1]},
            "fit_max_rel_err": float(max(abs(predict(L) - v) / v for L, v in times.items())),
            "model_s_extrapolated": model_s, "total_s_extrapolated": model_s + build_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results file.")
    ap.add_argument("--tiny", action="store_true", help="Tiny model on CPU (checks the script; numbers mean nothing).")
    ap.add_argument("--length", type=int, default=None, help="Prompt + answer tokens (default 131072; 2048 with --tiny).")
    ap.add_argument("--new-tokens", type=int, default=8, help="Tokens to generate (the passkey protocol's 8).")
    ap.add_argument("--chunk", type=int, default=8192, help="Engine prefill chunk.")
    ap.add_argument("--extra-chunk", type=int, default=32768, help="One more KV-on-GPU run with this chunk (0: none).")
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--memory-share", type=float, default=0.5,
                    help="The kv_cache=auto run may use this share of generate's measured peak GPU memory.")
    ap.add_argument("--budget-s", type=int, default=480, help="Skip the grid timing when less than 150 s of this remain.")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    length = args.length or (2048 if args.tiny else 131072)
    chunk = min(args.chunk, length // 4) if args.tiny else args.chunk
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("LONGFORGE_QUIET", "1")
    t_start = time.perf_counter()
    res: dict[str, Any] = {"date": dt.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
                           "torch": torch.__version__, "python": platform.python_version(),
                           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                           "length": length, "new_tokens": args.new_tokens, "chunk": chunk, "dtype": str(dtype)}
    import transformers

    res["transformers"] = transformers.__version__
    cfg = model_config(args.tiny, length)
    t = time.perf_counter()
    model = build_model(cfg, device, dtype)
    res["model_build_s"] = time.perf_counter() - t
    n_layers = sum(p.numel() for p in model.model.layers.parameters())
    res["params"] = {"total": sum(p.numel() for p in model.parameters()), "layers": n_layers}
    res["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    res["kv_cache_gib_at_length"] = kv_per_token * length / GIB if dtype == torch.bfloat16 else 2 * kv_per_token * length / GIB
    tok = make_tokenizer(Path(tempfile.mkdtemp(prefix="lf-bench-tok-")))
    prompt = build_grid(tok, [length - args.new_tokens], [0.5], 1, seed=0)[0]
    ids = torch.tensor([prompt.ids])
    res["prompt_tokens"] = ids.shape[1]
    print(f"model {res['params']['total'] / 1e9:.2f}B params ({res['weights_gib']:.1f} GiB) on {res['device']}; "
          f"prompt {ids.shape[1]} tokens; KV cache {res['kv_cache_gib_at_length']:.1f} GiB", flush=True)

    def save() -> None:
        res["wall_s"] = time.perf_counter() - t_start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=float))

    def phase(name: str, fn: Any) -> Any:
        """Run one measurement; a failure is recorded (and printed) and the benchmark goes on."""
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - a benchmark must report what it could measure
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{name}: FAILED {res['errors'][name]}", flush=True)
            out = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()
        return out

    # 1. Correctness on this device, 8K tokens in chunks of 1K (exercises the lower-right causal kernel).
    short = ids[:, : min(8192, ids.shape[1])]
    res["check"] = phase("check", lambda: check_logits(model, short, max(64, short.shape[1] // 8), device))
    print("check:", res["check"], flush=True)

    # Warm-up (kernels, cuBLAS handles) on a short prompt, both paths.
    warm = ids[:, : min(4096, ids.shape[1])]
    phase("warmup", lambda: (model.generate(warm.to(device), max_new_tokens=2, do_sample=False, pad_token_id=0,
                                            eos_token_id=None),
                             Engine(model, prefill_chunk=chunk, stop_on_eos=False).generate(warm, 2)))

    # 2. The 128K prompt: generate, engine (KV on GPU), engine (KV in CPU memory: cold, then warm pool).
    runs: dict[str, Any] = {}
    res["runs"] = runs
    plan: list[tuple[str, Any]] = [
        ("hf_generate", lambda: run_generate(model, ids, args.new_tokens, device)),
        ("hf_generate_prefill_only", lambda: run_generate(model, ids, 1, device)),
        ("longforge_kv_gpu", lambda: run_engine(Engine(model, prefill_chunk=chunk, kv_cache="device", stop_on_eos=False),
                                                ids, args.new_tokens, device)),
    ]
    if args.extra_chunk and not args.tiny:
        plan.append((f"longforge_kv_gpu_chunk{args.extra_chunk}",
                     lambda: run_engine(Engine(model, prefill_chunk=args.extra_chunk, kv_cache="device", stop_on_eos=False),
                                        ids, args.new_tokens, device)))
    plan.append(("longforge_kv_gpu_public_kernels",
                 lambda: public_kernels(lambda: run_engine(Engine(model, prefill_chunk=chunk, kv_cache="device",
                                                                  stop_on_eos=False), ids, args.new_tokens, device))))
    offload = Engine(model, prefill_chunk=chunk, kv_cache="cpu", stop_on_eos=False)
    if device.type == "cuda":
        plan += [("longforge_kv_cpu_cold", lambda: run_engine(offload, ids, args.new_tokens, device)),
                 ("longforge_kv_cpu", lambda: run_engine(offload, ids, args.new_tokens, device))]
        # kv_cache auto under a budget of a share of generate's peak (measured above, in this run).
        auto: dict[str, Engine] = {}

        def run_auto() -> dict[str, Any]:
            if not auto:
                auto["engine"] = Engine(model, prefill_chunk=chunk, kv_cache="auto", stop_on_eos=False,
                                        gpu_memory_gib=args.memory_share * runs["hf_generate"]["peak_gib"])
            return run_engine(auto["engine"], ids, args.new_tokens, device)
        plan += [("longforge_kv_auto_cold", run_auto), ("longforge_kv_auto", run_auto)]
    for name, fn in plan:
        r = phase(name, fn)
        if r is not None:
            runs[name] = r
            print(f"{name}:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "tokens"}, flush=True)
    res["kv_auto_budget_gib"] = args.memory_share * runs["hf_generate"]["peak_gib"] if "hf_generate" in runs else None
    if offload.pool.buffers:
        res["pinned_host_gib"] = sum(k.numel() * k.element_size() * 2 for k, _ in offload.pool.buffers.values()) / GIB
    offload.pool.buffers.clear()
    ref_tokens = runs.get("hf_generate", {}).get("tokens")
    for name, r in runs.items():
        if name != "hf_generate_prefill_only":
            r["same_tokens_as_generate"] = r["tokens"] == ref_tokens

    # 3. Prefill throughput against the forward FLOP rate.
    flops = prefill_flops(n_layers, cfg.num_hidden_layers, cfg.hidden_size, ids.shape[1])
    res["prefill"] = {"flops": flops}
    for name, r in runs.items():
        if name == "hf_generate":
            continue
        sec = r["seconds"] if name == "hf_generate_prefill_only" else r["prefill_s"]
        res["prefill"][name] = {"seconds": sec, "tokens_per_s": ids.shape[1] / sec, "tflops_per_s": flops / sec / 1e12,
                                "fraction_of_989": flops / sec / H200_PEAK}
    for name in ("longforge_kv_cpu", "longforge_kv_auto"):
        if name in runs:
            r = runs[name]
            res["prefill"][f"{name}_decode_s_per_token"] = r["decode_s"] / max(r["decode_steps"], 1)
    save()

    # 4. The 40 x 10 passkey grid (skipped when the time budget is nearly spent).
    if not args.skip_grid:
        left = args.budget_s - (time.perf_counter() - t_start)
        top = length
        measure = [int(x) for x in np.linspace(top / 16, top, 5)]
        if left < 150 and not args.tiny:
            res.setdefault("errors", {})["grid"] = f"skipped: {left:.0f} s of the {args.budget_s} s budget left"
        else:
            res["grid"] = phase("grid", lambda: grid_time(model, tok, top, measure, device, chunk, "device"))
            print("grid:", res["grid"], flush=True)
    save()
    print_summary(res)


def print_summary(res: dict[str, Any]) -> None:
    """The section for benchmarks/RESULTS.md."""
    runs = res.get("runs", {})
    g = runs.get("hf_generate")
    lines = [f"\n## Eval engine vs model.generate, {res['length'] // 1024}K prompt ({res['date']})",
             f"- command: `{res['command']}`",
             f"- machine: {res['device']}, torch {res['torch']}, transformers {res['transformers']}, Python {res['python']}",
             f"- model: {'tiny Llama (--tiny)' if res['params']['total'] < 1e9 else 'Llama-3.1-8B shape'}, random weights, {res['dtype'].replace('torch.', '')}, "
             f"{res['params']['total'] / 1e9:.2f}B parameters ({res['weights_gib']:.1f} GiB); KV cache at "
             f"{res['length']} tokens {res['kv_cache_gib_at_length']:.1f} GiB",
             f"- prompt {res['prompt_tokens']} tokens (passkey, needle at 50%), {res['new_tokens']} new tokens, greedy; "
             f"engine prefill chunk {res['chunk']}",
             f"- correctness on this device (chunked prefill vs one full forward, last-position logits): {res.get('check')}",
             "",
             "| run | wall s | prefill s | decode s | peak GPU GiB | time / generate's | peak / generate's | same tokens as generate |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        rel_t = f"{r['seconds'] / g['seconds']:.2f}" if g else "-"
        rel_m = f"{r['peak_gib'] / g['peak_gib']:.2f}" if g and g["peak_gib"] else "-"
        lines.append(f"| {name} | {r['seconds']:.2f} | {r.get('prefill_s', float('nan')):.2f} | "
                     f"{r.get('decode_s', float('nan')):.2f} | {r['peak_gib']:.1f} | {rel_t} | {rel_m} | "
                     f"{r.get('same_tokens_as_generate', '-')} |")
    p = res.get("prefill", {})
    lines.append("")
    lines.append(f"- prefill FLOPs at {res['prompt_tokens']} tokens: {p.get('flops', 0) / 1e15:.2f} PFLOP "
                 "(2 N_layers L + 2 n_layers d L^2, causal)")
    for name in runs:
        if name in p:
            q = p[name]
            lines.append(f"  - {name}: {q['tokens_per_s']:.0f} tokens/s, {q['tflops_per_s']:.0f} TFLOP/s = "
                         f"{100 * q['fraction_of_989']:.0f}% of 989 (about {100 * q['tflops_per_s'] / 790:.0f}% of the ~790 measured)")
    if "longforge_kv_cpu_decode_s_per_token" in p:
        lines.append(f"- KV in pinned CPU memory: decode {p['longforge_kv_cpu_decode_s_per_token']:.3f} s/token (the whole "
                     f"cache crosses PCIe per token); pinned host memory {res.get('pinned_host_gib', 0):.1f} GiB")
    if "longforge_kv_auto_decode_s_per_token" in p:
        a = runs["longforge_kv_auto"]
        lines.append(f"- kv_cache auto under {res['kv_auto_budget_gib']:.1f} GiB: {a.get('kv_layers_on_gpu')} layers' KV on the "
                     f"GPU, {a.get('kv_layers_in_host_memory')} in host memory; decode "
                     f"{p['longforge_kv_auto_decode_s_per_token']:.3f} s/token")
    if res.get("grid"):
        gr = res["grid"]
        lines.append(f"- 40 x 10 passkey grid ({gr['lengths'][0]}..{gr['lengths'][1]} tokens, {gr['cells']} prompts, batch 1): "
                     f"building all prompts {gr['build_prompts_s']:.0f} s (measured); model time "
                     f"{gr['model_s_extrapolated'] / 60:.1f} min EXTRAPOLATED from one prompt at "
                     f"{', '.join(gr['measured_prompt_s'])} tokens (fit t = aL + bL^2, max error "
                     f"{100 * gr['fit_max_rel_err']:.0f}%); total about {gr['total_s_extrapolated'] / 60:.1f} min")
    for name, err in res.get("errors", {}).items():
        lines.append(f"- {name}: {err}")
    lines.append(f"- benchmark wall time {res['wall_s']:.0f} s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
