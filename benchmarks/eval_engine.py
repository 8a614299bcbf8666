"""Benchmark: batched decoding in the inference engine against the engine as it was and against `model.generate`.

For the SmolLM2-135M shape and the Llama-3.2-1B shape (random bf16 weights, the real configs' values) and for
batches of RULER-like prompts at 4K, 8K, 16K and 32K tokens (random tokens, lengths a little under the nominal
one and all different, as RULER's are), one run measures with a forced generation length (EOS ignored):
  (a) the engine as it was: rows of equal length together, so one prompt at a time here, eager, a host sync
      after every token: Engine(model, ragged=False, cuda_graphs="off", sync_every=1, prefix_reuse=False);
  (b) the engine now: the whole batch at once in one cache, CUDA-graph decoding with fused RMSNorm, RoPE and
      SwiGLU kernels, a host visit every 8 tokens (a first call, which captures the graph, and a second one that
      replays it; and the second call without the fused kernels);
  (c) transformers' batched model.generate on the same prompts, left-padded, its own cache, SDPA;
and for each: the time of prefill and of decoding, ms per decoding step, decoded tokens per second (rows x steps
/ decoding time) and end to end (new tokens / wall time), peak GPU memory. The memory-bandwidth bound of a
decoding step is the weights' bytes (the LM head's matrix, not the embedding rows) plus the batch's KV bytes at
the middle of the generation, over 4.8 TB/s (an H200's HBM3e); each mode's step time is given against it.
A passkey-like grid (one haystack, the needle at several depths) measures prefix reuse: the new engine's prefill
with and without it, and the prompt tokens it did not compute.

Usage (GPU, ~3 minutes on an H200):  PYTHONPATH=$PWD/src python benchmarks/eval_engine.py --out $OUT/eval_engine.json
Usage (CPU, tiny shape, checks the script; numbers mean nothing):
    PYTHONPATH=$PWD/src python benchmarks/eval_engine.py --smoke --out /tmp/eval_engine.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(ROOT / "benchmarks"))
from eval_gpu import reset_peak, sync  # noqa: E402
from longforge.inference import Engine  # noqa: E402
from longforge.inference.engine import PAD_TO, PREFIX_MIN, _Batch  # noqa: E402
from longforge.inference.prefill import Fill  # noqa: E402

GIB = 2**30
HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e, the datasheet's
SHAPES: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M's config.json
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # meta-llama/Llama-3.2-1B's config.json
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    # meta-llama/Llama-3.1-8B's config.json
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    # CPU check of the script
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
                 max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    """Random weights in the target dtype, made on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa", **SHAPES[shape])
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def prompts_at(length: int, rows: int, vocab: int, seed: int) -> list[list[int]]:
    """`rows` random prompts of different lengths between 15/16 of `length` and `length` (ids above the specials)."""
    g = torch.Generator().manual_seed(seed)
    span = max(1, length // 16)
    lengths = [length - (i * span) // rows for i in range(rows)]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def grid_prompts(length: int, depths: int, vocab: int, seed: int) -> list[list[int]]:
    """A passkey-like grid at one length: one haystack, a 12-token needle at `depths` depths, a 20-token question."""
    g = torch.Generator().manual_seed(seed)
    hay = torch.randint(3, vocab, (length - 32,), generator=g).tolist()
    needle = torch.randint(3, vocab, (12,), generator=g).tolist()
    question = torch.randint(3, vocab, (20,), generator=g).tolist()
    at = [round(i * (len(hay) - 1) / max(1, depths - 1)) for i in range(depths)]
    return [hay[:d] + needle + hay[d:] + question for d in at]


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0


def weight_bytes(model: Any) -> int:
    """Bytes a decoding step reads of the weights: every parameter, less the input embedding when it is a matrix of
    its own (a step reads only its rows); a tied embedding is read whole by the LM head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    if emb is not model.get_output_embeddings().weight:
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes_per_token(model: Any) -> int:
    cfg = model.config
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem


def step_bound_s(model: Any, lengths: list[int], new: int) -> float:
    """The memory-bandwidth bound of one decoding step of the whole batch, at the middle of the generation."""
    kv = sum(n + new // 2 for n in lengths) * kv_bytes_per_token(model)
    return (weight_bytes(model) + kv) / HBM_BYTES_PER_S


def run_engine(engine: Engine, rows: list[list[int]], new: int, device: torch.device) -> dict[str, Any]:
    """One generate call of the whole batch: wall time, the engine's own prefill/decode split and counts."""
    reset_peak(device)
    t0 = sync(device)
    out = engine.generate(rows, new)
    wall = sync(device) - t0
    last = engine.last
    steps = last["decode_steps"]  # summed over the groups when rows of equal length ran together
    return {"wall_s": wall, "prefill_s": last["prefill_s"], "decode_s": last["decode_s"], "decode_steps": steps,
            "decoded_tokens": sum(len(t) - 1 for t in out), "host_visits": last.get("host_visits"),
            "groups": last.get("groups", 1), "ms_per_step": 1e3 * last["decode_s"] / max(1, steps),
            "cuda_graph": bool(last.get("cuda_graph")), "prefill_tokens": last.get("prefill_tokens"),
            "prefix_saved_tokens": last.get("prefix_saved_tokens"), "peak_gib": peak_gib(device), "tokens": out}


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as transformers' batched generate takes them: left-padded ids and their attention mask."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def run_hf(model: Any, rows: list[list[int]], new: int, device: torch.device) -> dict[str, Any]:
    """transformers' batched generate, left-padded: the prefill alone (1 new token), then the whole generation."""
    width = max(map(len, rows))
    ids, mask = (t.to(device) for t in left_pad(rows))
    times = {}
    out = None
    for n in (1, new):
        reset_peak(device)
        t0 = sync(device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        times[n] = sync(device) - t0
    assert out is not None
    decode = max(0.0, times[new] - times[1])
    return {"wall_s": times[new], "prefill_s": times[1], "decode_s": decode, "decode_steps": new - 1,
            "decoded_tokens": len(rows) * (new - 1), "ms_per_step": 1e3 * decode / max(1, new - 1),
            "peak_gib": peak_gib(device),
            "tokens": out[:, width:].tolist()}


def summarise(res: dict[str, Any], rows: int, new: int, bound_s: float) -> dict[str, Any]:
    """Rates and the distance from the bandwidth bound (the tokens themselves are dropped)."""
    out = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in res.items() if k != "tokens"}
    out["decode_tokens_per_s"] = round(res["decoded_tokens"] / res["decode_s"], 1) if res["decode_s"] > 0 else None
    out["end_to_end_tokens_per_s"] = round(rows * new / res["wall_s"], 1)
    out["step_over_bound"] = round(res["ms_per_step"] / (1e3 * bound_s), 2)
    return out


def bench_length(model: Any, shape: str, length: int, rows: int, new: int, old_rows: int, chunk: int,
                 device: torch.device, prefix_min: int, pad_to: int, unfused: bool = True,
                 hf: bool = True) -> dict[str, Any]:
    """Modes (a), (b) twice and (c) on one batch of prompts of about `length` tokens."""
    batch = prompts_at(length, rows, model.config.vocab_size, seed=length)
    lengths = [len(r) for r in batch]
    bound = step_bound_s(model, lengths, new)
    old_bound = step_bound_s(model, lengths[:1], new)
    row: dict[str, Any] = {"shape": shape, "length": length, "rows": rows, "prompt_lengths": [min(lengths), max(lengths)],
                           "new_tokens": new, "bound_ms_per_step": round(1e3 * bound, 4),
                           "bound_ms_per_step_one_row": round(1e3 * old_bound, 4)}
    old = Engine(model, prefill_chunk=chunk, stop_on_eos=False, ragged=False, cuda_graphs="off", sync_every=1,
                 prefix_reuse=False)
    a = run_engine(old, batch[:old_rows], new, device)  # one prompt at a time: its rate is the batch's
    row["a_old_engine"] = {**summarise(a, old_rows, new, old_bound), "rows_measured": old_rows}
    new_engine = Engine(model, prefill_chunk=chunk, stop_on_eos=False, prefix_min=prefix_min, pad_to=pad_to)
    b1 = run_engine(new_engine, batch, new, device)
    b2 = run_engine(new_engine, batch, new, device)
    row["b_new_engine_first_call"] = summarise(b1, rows, new, bound)
    row["b_new_engine"] = summarise(b2, rows, new, bound)
    row["b_describe"] = new_engine.describe()
    row["b_rows_equal_to_a"] = sum(x == y for x, y in zip(b2["tokens"], a["tokens"]))
    row["b_calls_equal"] = b1["tokens"] == b2["tokens"]
    new_engine.release()  # its cache and graph: not counted in the next engine's peak memory
    if new_engine.fused and unfused:  # the same without the fused RMSNorm, RoPE and SwiGLU kernels (second call: graph reused)
        unfused = Engine(model, prefill_chunk=chunk, stop_on_eos=False, prefix_min=prefix_min, pad_to=pad_to,
                         fused="off")
        run_engine(unfused, batch, new, device)
        row["b_new_engine_unfused"] = summarise(run_engine(unfused, batch, new, device), rows, new, bound)
        del unfused
    del new_engine, old
    if hf:
        c = run_hf(model, batch, new, device)
        row["c_model_generate"] = summarise(c, rows, new, bound)
    else:
        row["c_model_generate"] = {"skipped": "beyond --hf-max-length", "ms_per_step": None,
                                   "decode_tokens_per_s": None, "end_to_end_tokens_per_s": None}
    row["speedup_b_over_a_decode_tokens_per_s"] = _ratio(row["b_new_engine"]["decode_tokens_per_s"],
                                                         row["a_old_engine"]["decode_tokens_per_s"])
    row["speedup_b_over_a_end_to_end"] = _ratio(row["b_new_engine"]["end_to_end_tokens_per_s"],
                                                row["a_old_engine"]["end_to_end_tokens_per_s"])
    row["speedup_b_over_c_end_to_end"] = _ratio(row["b_new_engine"]["end_to_end_tokens_per_s"],
                                                row["c_model_generate"]["end_to_end_tokens_per_s"])
    return row


def prefill_flops(model: Any, length: int) -> float:
    """Forward FLOPs of prefilling `length` tokens, causal-counted as eval_gpu.py does: 2 N per token for the layers'
    matmuls (embedding and LM head left out) and 2 n_layers d L^2 for causal attention."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name)
    return 2.0 * n * length + 2.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * length * length


def bench_prefill(model: Any, shape: str, length: int, chunks: list[int], device: torch.device) -> dict[str, Any]:
    """One prompt of `length` tokens prefilled (one new token) with each chunk size, with the fused RMSNorm, RoPE and
    SwiGLU kernels (the engine's default on CUDA) and without: seconds and TFLOP/s, warm."""
    ids = prompts_at(length, 1, model.config.vocab_size, seed=length + 1)[0][:length]
    ids = ids + [5] * (length - len(ids))
    flops = prefill_flops(model, length)
    out: dict[str, Any] = {"shape": shape, "length": length, "flops": flops}
    for chunk in chunks:
        for fused in (False, True) if device.type == "cuda" else (False,):
            eng = Engine(model, prefill_chunk=chunk, stop_on_eos=False, kv_cache="device",
                         fused="auto" if fused else "off")
            times = []
            for _ in range(2):  # the first pass builds cuDNN's plans for the chunk shapes
                reset_peak(device)
                t0 = sync(device)
                eng.generate([ids], 1)
                times.append(sync(device) - t0)
            eng.release()
            name = f"chunk_{chunk}" + ("_fused" if fused else "")
            out[name] = {"cold_s": round(times[0], 4), "s": round(times[1], 4),
                         "tflops_per_s": round(flops / times[1] / 1e12, 1), "peak_gib": round(peak_gib(device), 2)}
            print(json.dumps({"prefill": shape, "length": length, "mode": name, **out[name]}), flush=True)
            del eng
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def bench_prefix(model: Any, shape: str, length: int, depths: int, new: int, chunk: int,
                 device: torch.device, prefix_min: int, pad_to: int) -> dict[str, Any]:
    """A grid's depths at one length: the new engine with and without prefix reuse (same tokens expected)."""
    batch = grid_prompts(length, depths, model.config.vocab_size, seed=7)
    out: dict[str, Any] = {"shape": shape, "length": length, "depths": depths}
    tokens = {}
    for reuse in (False, True, False, True):  # the second of each: warm (cuDNN plans built)
        eng = Engine(model, prefill_chunk=chunk, stop_on_eos=False, prefix_reuse=reuse, prefix_min=prefix_min,
                     pad_to=pad_to)
        res = run_engine(eng, batch, new, device)
        tokens[reuse] = res["tokens"]
        out["reuse" if reuse else "no_reuse"] = {**{k: res[k] for k in ("prefill_s", "prefill_tokens",
                                                                        "prefix_saved_tokens", "wall_s")},
                                                 "fills": sum(isinstance(s, Fill) for s in
                                                              _Batch.sorted(batch, eng.prefix_min, eng.pad_to, eng.worth).plan)}
    out["prefill_speedup"] = _ratio(out["no_reuse"]["prefill_s"], out["reuse"]["prefill_s"])
    out["same_tokens"] = tokens[True] == tokens[False]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results file.")
    ap.add_argument("--smoke", action="store_true", help="Tiny shape on the CPU (checks the script; numbers mean nothing).")
    ap.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b")
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--new-tokens", type=int, default=64, help="Forced generation length.")
    ap.add_argument("--batch-tokens", type=int, default=262144,
                    help="Rows per batch: this many prompt tokens, at most --rows.")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--old-rows", type=int, default=4,
                    help="Prompts the old engine runs (one at a time; its rate is the batch's).")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--budget-s", type=float, default=420, help="Skip what is left once this much time has passed.")
    ap.add_argument("--rows-at", default="", help="Rows per length, e.g. 4096:16,131072:1 (else --batch-tokens).")
    ap.add_argument("--hf-max-length", type=int, default=1 << 30, help="model.generate only up to this length.")
    ap.add_argument("--no-unfused", action="store_true", help="Skip the run without fused decoding kernels.")
    ap.add_argument("--prefill-lengths", default="", help="Also prefill one prompt at these lengths (TFLOP/s).")
    ap.add_argument("--prefill-chunks", default="8192", help="Chunk sizes for --prefill-lengths.")
    ap.add_argument("--grid-length", type=int, default=16384, help="Prefix-reuse grid length (0: skip).")
    args = ap.parse_args()
    prefix_min, pad_to = PREFIX_MIN, PAD_TO
    if args.smoke:
        torch.set_num_threads(1)  # a tiny model is all per-op overhead: threads only add synchronisation
        device, dtype = torch.device("cpu"), torch.float32
        shapes, lengths, new, chunk, prefix_min, pad_to = ["tiny"], [64, 128], 6, 32, 8, 8
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes, lengths = args.shapes.split(","), [int(x) for x in args.lengths.split(",")]
        new, chunk = args.new_tokens, args.chunk
    start = time.perf_counter()
    import transformers

    result: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
        "hbm_bytes_per_s": HBM_BYTES_PER_S, "args": {k: str(v) for k, v in vars(args).items()},
        "lengths": [], "prefix_reuse": [], "skipped": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    for shape in shapes:
        model = build_model(shape, device, dtype)
        result.setdefault("models", {})[shape] = {"weight_bytes_per_step": weight_bytes(model),
                                                  "kv_bytes_per_token": kv_bytes_per_token(model)}
        for length in lengths:
            if time.perf_counter() - start > args.budget_s:
                result["skipped"].append(f"{shape} {length}")
                continue
            rows_at = dict(tuple(map(int, x.split(":"))) for x in args.rows_at.split(",") if x)
            rows = 3 if args.smoke else rows_at.get(length, max(1, min(args.rows, args.batch_tokens // length)))
            old_rows = min(rows, 2 if args.smoke else args.old_rows)
            row = bench_length(model, shape, length, rows, new, old_rows, chunk, device, prefix_min, pad_to,
                               unfused=not args.no_unfused, hf=length <= args.hf_max_length)
            row["elapsed_s"] = round(time.perf_counter() - start, 1)
            result["lengths"].append(row)
            print(json.dumps({k: row[k] for k in ("shape", "length", "rows", "bound_ms_per_step")}),
                  {m: (row[m]["ms_per_step"], row[m]["decode_tokens_per_s"], row[m]["end_to_end_tokens_per_s"])
                   for m in ("a_old_engine", "b_new_engine", "c_model_generate")}, flush=True)
            save()
        for length in [int(x) for x in args.prefill_lengths.split(",") if x]:
            if time.perf_counter() - start > args.budget_s:
                result["skipped"].append(f"{shape} prefill {length}")
                continue
            result.setdefault("prefill", []).append(
                bench_prefill(model, shape, length, [int(x) for x in args.prefill_chunks.split(",")], device))
            save()
        grid_length = 96 if args.smoke else args.grid_length
        if grid_length and time.perf_counter() - start <= args.budget_s:
            result["prefix_reuse"].append(bench_prefix(model, shape, grid_length, 4 if args.smoke else 8, new,
                                                       chunk, device, prefix_min, pad_to))
            print(json.dumps(result["prefix_reuse"][-1]), flush=True)
        else:
            result["skipped"].append(f"{shape} prefix reuse")
        save()
        del model
        reset_peak(device)
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    save()


if __name__ == "__main__":
    main()
