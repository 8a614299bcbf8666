"""Benchmark: training throughput, MFU and peak memory of longforge's engine against plain transformers.

Each case runs in its own process (so an out-of-memory case cannot disturb the next). Random weights
and tokens; real model shapes; MFU counted as REFERENCE.md section 4 (causal, no recompute, 989 TFLOP/s).

  python benchmarks/train_gpu.py --suite engine --out results.json     # 1B/3B at 64K vs transformers, 8B at 64K
  python benchmarks/train_gpu.py --suite depth --out results.json      # 8B shape at reduced depth, long sequences
  python benchmarks/train_gpu.py --suite tiny --out results.json       # the same code path on CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

SUITES: dict[str, list[dict[str, Any]]] = {
    "engine": [
        {"shape": "llama-3.2-1b", "seq": 65536, "impl": "hf"},
        {"shape": "llama-3.2-1b", "seq": 65536, "impl": "longforge"},
        {"shape": "llama-3.2-3b", "seq": 65536, "impl": "hf"},
        {"shape": "llama-3.2-3b", "seq": 65536, "impl": "longforge"},
        {"shape": "llama-3.1-8b", "seq": 65536, "impl": "longforge"},
    ],
    "engine2": [
        {"shape": "llama-3.2-1b", "seq": 65536, "impl": "hf"},
        {"shape": "llama-3.2-1b", "seq": 65536, "impl": "longforge", "policy": "save_attention"},
        {"shape": "llama-3.1-8b", "seq": 65536, "impl": "longforge", "policy": "save_attention"},
    ],
    "depth": [
        {"shape": "llama-3.1-8b", "layers": L, "seq": s, "impl": "longforge", "steps": 1, "frugal": True, "warmup": False}
        for s in (131072, 524288) for L in (2, 4)
    ],
    "tiny": [
        {"shape": "tiny", "seq": 256, "impl": "hf", "steps": 2},
        {"shape": "tiny", "seq": 256, "impl": "longforge", "steps": 2},
        {"shape": "tiny", "seq": 256, "impl": "longforge", "steps": 1, "frugal": True, "layers": 1},
        {"shape": "tiny", "seq": 256, "impl": "longforge", "steps": 1, "policy": "save_attention"},
    ],
}


def build(case: dict[str, Any], device: Any) -> Any:
    """A randomly initialised Llama of the case's shape, bf16, on the device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPES[case["shape"]])
    if case.get("layers"):
        shape["num_hidden_layers"] = case["layers"]
    cfg = LlamaConfig(**shape, max_position_embeddings=max(case["seq"], 8192), rope_parameters=dict(ROPE))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16)


def run_hf(case: dict[str, Any], device: Any) -> dict[str, Any]:
    """Plain transformers: SDPA, gradient checkpointing, pure-bf16 fused AdamW, loss from model(labels=...)."""
    import torch

    model = build(case, device)
    model.config._attn_implementation = "sdpa"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, case["seq"]), device=device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, case, model.config, device)


def run_longforge(case: dict[str, Any], device: Any) -> dict[str, Any]:
    """longforge's engine: the same optimizer, flash attention, chunked LM head, memory savers as configured."""
    import torch

    from longforge.config import StageSpec
    from longforge.model.parallel import Layout
    from longforge.train.batches import Batch, targets
    from longforge.train.loop import prepare
    from longforge.train.optim import make_optimizer

    model = build(case, device)
    frugal = case.get("frugal", False)
    spec = StageSpec(steps=1, precision="bf16", optimizer="adamw_bf16" if frugal else "adamw", document_mask=False,
                     activation_checkpointing="on", offload_activations=frugal and device.type == "cuda",
                     mlp_tile=16384 if frugal else 0, checkpoint_policy=case.get("policy", "full"))
    engine = prepare(model, spec, Layout(1, 0, 1, 1, device), case["seq"])
    opt = make_optimizer(engine.net, spec.optimizer, 1e-5, (0.9, 0.95), 0.0)
    ids = torch.randint(0, model.config.vocab_size, (1, case["seq"]), device=device)
    zeros = torch.zeros_like(ids)
    batch = Batch(ids, zeros, torch.arange(case["seq"], device=device)[None])
    labels, weights = targets(batch)

    def step() -> None:
        (engine.micro_loss(batch, labels, weights) / weights.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = timed(step, case, model.config, device)
    out["settings"] = {"attention": engine.backend, "precision": spec.precision, "optimizer": spec.optimizer,
                       "checkpointing": spec.checkpoint_policy, "offload_activations": spec.offload_activations, "mlp_tile": spec.mlp_tile}
    return out


def timed(step: Any, case: dict[str, Any], config: Any, device: Any) -> dict[str, Any]:
    """Warm up once, then time `steps` steps; tokens/s, MFU and peak memory."""
    import torch

    from longforge.train.flops import flops_per_token, peak_flops

    steps = case.get("steps", 3)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if case.get("warmup", True):
        step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    tps = case["seq"] / dt
    peak = peak_flops(device)
    return {"step_s": round(dt, 3), "tokens_per_s": round(tps, 1),
            "mfu": round(flops_per_token(config, case["seq"]) * tps / peak, 4) if peak else None,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One case in this process; out-of-memory is a result, not a crash."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        res = (run_hf if case["impl"] == "hf" else run_longforge)(case, device)
    except torch.OutOfMemoryError as e:
        res = {"oom": True, "detail": str(e).splitlines()[0][:200]}
    return {**case, **res, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=sorted(SUITES))
    ap.add_argument("--case", help="JSON of one case (used by the suite's subprocesses)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.case:
        args.out.write_text(json.dumps(run_case(json.loads(args.case))))
        return
    results = []
    for case in SUITES[args.suite]:
        tmp = args.out.with_suffix(".case.json")
        env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case), "--out", str(tmp)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not tmp.exists():
            res = {**case, "error": (proc.stderr or proc.stdout)[-600:]}
        else:
            res = json.loads(tmp.read_text())
            tmp.unlink()
        results.append(res)
        print(summary_line(res), flush=True)
        args.out.write_text(json.dumps(results, indent=1))


def summary_line(r: dict[str, Any]) -> str:
    """One line per case for the log."""
    name = f"{r['shape']}{'/' + str(r['layers']) + 'L' if r.get('layers') else ''} seq={r['seq']} {r['impl']}"
    if r.get("policy"):
        name += f" ({r['policy']})"
    if r.get("oom"):
        return f"{name}: out of memory"
    if r.get("error"):
        return f"{name}: error {r['error'][-300:]}"
    mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "-"
    return f"{name}: {r['tokens_per_s']:.0f} tok/s, step {r['step_s']} s, MFU {mfu}, peak {r['peak_mem_gib']} GiB"


if __name__ == "__main__":
    main()
