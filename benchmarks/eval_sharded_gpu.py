"""Benchmark: one prompt longer than one GPU holds, its KV cache sharded by sequence over the GPUs of a torchrun job.

The Llama-3.1-8B shape (random bf16 weights, meta-llama/Llama-3.1-8B's config: hidden 4096, intermediate 14336,
32 layers, 32 query / 8 KV heads, vocab 128256, llama3 RoPE factor 8, theta 500000) answers one prompt of each
length (random tokens; the answer's length forced: no end-of-sequence stop) through longforge's engine with
`kv_shards` = every process (inference/sharded.py). Per length: prefill time, decoding ms/token, per-GPU peak
memory (allocated and reserved by PyTorch) and host peak RSS, against the FLOP model of the prompt (2 N_layers per
token, replicated on every GPU, plus causal attention 2 n_layers d L^2 split over the GPUs) and against reading the
weights and the shard once per decoded token. Lengths up to `--single-max` also run on one GPU alone (the engine as
one process runs it, the other GPUs idle) in the same run: the time ratio and whether the tokens agree.

At 1,048,576 tokens the KV cache is 128 GiB (64 GiB per GPU on two) beside 15 GiB of weights; one H200 holds 139 GiB.

Usage (2 GPUs, about 6-8 minutes):
  torchrun --nproc-per-node 2 benchmarks/eval_sharded_gpu.py --out $OUT/eval_sharded.json
Usage (CPU check of the script, gloo, tiny model, numbers mean nothing):
  torchrun --nproc-per-node 2 benchmarks/eval_sharded_gpu.py --smoke --out /tmp/eval_sharded.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_gpu import build_model, model_config, prefill_flops  # noqa: E402
from longforge.inference import Engine  # noqa: E402
from longforge.inference import kernels  # noqa: E402
from longforge.inference.sharded import kv_group, shard_sizes  # noqa: E402

GIB = 2**30
H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e, the datasheet's
REFERENCE_RATE = 550e12  # FLOP/s per GPU: the prefill target for the 8B shape on one H200


def host_peak_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def reset(device: torch.device) -> None:
    """Free what can be freed and restart the GPU peak counters."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peaks(device: torch.device) -> dict[str, float]:
    """Peak GPU memory since the last reset: allocated by tensors and reserved by PyTorch's allocator, GiB."""
    if device.type != "cuda":
        return {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def gathered(value: Any) -> list[Any]:
    """`value` from every process, by rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


@torch.no_grad()
def run(engine: Engine, ids: list[int], new: int, device: torch.device) -> dict[str, Any]:
    """One prompt through the engine: its tokens, timings and this process's memory peaks."""
    reset(device)
    t0 = time.perf_counter()
    tokens = engine.generate([ids], new)[0]
    wall = time.perf_counter() - t0
    last = engine.last
    steps = max(1, int(last.get("decode_steps", 0)))
    out = {"tokens": tokens, "wall_s": wall, "prefill_s": last["prefill_s"], "decode_s": last["decode_s"],
           "decode_steps": last.get("decode_steps", 0), "decode_ms_per_token": 1000 * last["decode_s"] / steps,
           "kv_positions_here": last.get("kv_positions_here"), **gpu_peaks(device), "host_peak_rss_gib": host_peak_gib()}
    engine.release()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results file (written by the first process).")
    ap.add_argument("--smoke", action="store_true", help="Tiny model on CPU over gloo (checks the script end to end).")
    ap.add_argument("--lengths", default=None,
                    help="Comma-separated prompt lengths (default 131072,1048576; with --smoke 300,1000).")
    ap.add_argument("--single-max", type=int, default=None,
                    help="Lengths up to this also run on one GPU alone (default 131072; with --smoke 1000).")
    ap.add_argument("--new-tokens", type=int, default=8, help="Tokens generated per prompt (forced: no EOS stop).")
    ap.add_argument("--chunk", type=int, default=8192, help="Prefill chunk (activations stay one chunk's).")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("LONGFORGE_QUIET", "1")
    smoke = args.smoke or not torch.cuda.is_available()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if smoke:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        torch.set_num_threads(1)
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    dtype = torch.float32 if smoke else torch.bfloat16
    lengths = [int(x) for x in (args.lengths or ("300,1000" if smoke else "131072,1048576")).split(",")]
    single_max = args.single_max if args.single_max is not None else (1000 if smoke else 131072)
    chunk = min(args.chunk, 64) if smoke else args.chunk
    main_process = rank == 0
    t_start = time.perf_counter()

    def say(text: str) -> None:
        if main_process:
            print(f"[{time.perf_counter() - t_start:6.1f}s] {text}", flush=True)

    cfg = model_config(smoke, max(lengths))
    t = time.perf_counter()
    model = build_model(cfg, device, dtype)
    for p in model.parameters():  # the same weights on every process, whatever each GPU's random stream did
        dist.broadcast(p.data, src=0)
    build_s = time.perf_counter() - t
    n_layer_params = sum(p.numel() for p in model.model.layers.parameters())
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize
    res: dict[str, Any] = {
        "date": dt.date.today().isoformat(), "command": " ".join(["torchrun", f"--nproc-per-node {world}", *sys.argv]),
        "torch": torch.__version__, "python": platform.python_version(), "processes": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (gloo)",
        "model": "tiny Llama (--smoke)" if smoke else "Llama-3.1-8B shape, random weights", "dtype": str(dtype),
        "weights_gib": weights_gib, "kv_gib_per_token_million": kv_per_token * 2**20 / GIB, "chunk": chunk,
        "new_tokens": args.new_tokens, "model_build_s": build_s, "runs": {}}
    say(f"model {weights_gib:.1f} GiB on {world} x {res['device']}; lengths {lengths}; chunk {chunk}")
    group = kv_group(world, rank, world)
    sharded = Engine(model, prefill_chunk=chunk, stop_on_eos=False, cuda_graphs="off", kv_shards=world,
                     kv_group=group)
    alone = Engine(model, prefill_chunk=chunk, stop_on_eos=False, kv_cache="device")

    def save() -> None:
        res["wall_s"] = time.perf_counter() - t_start
        res["kernel_checks"] = {" ".join(str(x) for x in k): v for k, v in kernels._verdicts.items()}
        if main_process:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1))

    g = torch.Generator().manual_seed(0)
    for length in sorted(lengths):
        ids = torch.randint(1, cfg.vocab_size, (length,), generator=g).tolist()
        sharded.kv_shards_for([length], args.new_tokens)  # a prompt too long even sharded: one sentence, now
        entry: dict[str, Any] = {"prompt_tokens": length,
                                 "kv_gib_total": kv_per_token * (length + args.new_tokens) / GIB,
                                 "kv_positions_per_process": shard_sizes(length, chunk, world, args.new_tokens)}
        attn = 2.0 * cfg.num_hidden_layers * cfg.hidden_size * length * length
        linear = prefill_flops(n_layer_params, cfg.num_hidden_layers, cfg.hidden_size, length) - attn
        entry["flops"] = {"linear": linear, "attention_causal": attn, "total": linear + attn,
                          "per_gpu_sharded": linear + attn / world}
        say(f"{length:,} tokens: sharded over {world} processes ...")
        got = run(sharded, ids, args.new_tokens, device)
        per_process = gathered({k: got[k] for k in ("peak_allocated_gib", "peak_reserved_gib", "host_peak_rss_gib",
                                                     "kv_positions_here")})
        model_s = entry["flops"]["per_gpu_sharded"] / REFERENCE_RATE
        shard_bytes = max(entry["kv_positions_per_process"]) * kv_per_token
        read_ms = 1000 * (weights_gib * GIB + shard_bytes) / H200_BANDWIDTH
        entry["sharded"] = {**{k: got[k] for k in ("wall_s", "prefill_s", "decode_s", "decode_steps",
                                                   "decode_ms_per_token")},
                            "tokens": got["tokens"], "per_process": per_process,
                            "prefill_tflops_per_gpu": entry["flops"]["total"] / got["prefill_s"] / world / 1e12,
                            "prefill_vs_flop_model_at_550": got["prefill_s"] / model_s,
                            "decode_vs_reading_weights_and_shard": got["decode_ms_per_token"] / read_ms}
        s = entry["sharded"]
        say(f"  prefill {s['prefill_s']:.1f} s ({s['prefill_tflops_per_gpu']:.0f} TFLOP/s per GPU causal-counted, "
            f"{s['prefill_vs_flop_model_at_550']:.2f}x the FLOP model at 550), decode {s['decode_ms_per_token']:.1f} "
            f"ms/token ({s['decode_vs_reading_weights_and_shard']:.2f}x reading weights + shard); peak GPU "
            f"{max(p['peak_allocated_gib'] for p in per_process):.1f} GiB allocated / "
            f"{max(p['peak_reserved_gib'] for p in per_process):.1f} reserved; host RSS "
            f"{max(p['host_peak_rss_gib'] for p in per_process):.1f} GiB")
        res["runs"][str(length)] = entry
        save()
        if length <= single_max:
            say(f"{length:,} tokens: one process alone ...")
            one = run(alone, ids, args.new_tokens, device) if main_process else None
            dist.barrier()
            if main_process:
                assert one is not None
                entry["one_process"] = {k: one[k] for k in ("wall_s", "prefill_s", "decode_s", "decode_ms_per_token",
                                                            "peak_allocated_gib", "peak_reserved_gib", "tokens")}
                entry["sharded_over_one_time"] = s["wall_s"] / one["wall_s"]
                entry["prefill_ratio"] = s["prefill_s"] / one["prefill_s"]
                entry["tokens_equal"] = s["tokens"] == one["tokens"]
                say(f"  one process: prefill {one['prefill_s']:.1f} s, decode {one['decode_ms_per_token']:.1f} "
                    f"ms/token, peak {one['peak_allocated_gib']:.1f} GiB; sharded/one time "
                    f"{entry['sharded_over_one_time']:.2f}x (prefill {entry['prefill_ratio']:.2f}x); "
                    f"same tokens: {entry['tokens_equal']}")
            save()
    say(f"done in {time.perf_counter() - t_start:.0f} s; results in {args.out}")
    save()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
