"""Benchmark: training throughput, MFU and peak memory of longforge's engine against plain transformers.

Each case runs in its own process (so an out-of-memory case cannot disturb the next). Random weights
and tokens; real model shapes; MFU counted as REFERENCE.md section 4 (causal, no recompute, 989 TFLOP/s).

  python benchmarks/train_gpu.py --suite engine --out results.json     # 1B/3B at 64K vs transformers, 8B at 64K
  python benchmarks/train_gpu.py --suite depth --out results.json      # 8B shape at reduced depth, long sequences
  python benchmarks/train_gpu.py --suite tiny --out results.json       # the same code path on CPU, tiny shapes
  python benchmarks/train_gpu.py --suite dist2 --devices 0,1 --out r.json  # 8B on 2 GPUs (FSDP2 + sequence parallel)
  python benchmarks/train_gpu.py --suite ring2 ring2long --devices 0,1 --out r.json  # SmolLM2-135M (9 heads), SP 2 = ring
  python benchmarks/train_gpu.py --suite ring2 ring2long --smoke --out r.json        # the same cases on CPU, tiny

A case with "gpus": N > 1 runs under torchrun with N processes on the first N of --devices, FSDP2 over all of
them and sequence parallelism of degree "sp" (default N): Ulysses where the degree divides the heads, else ring
attention ("sp_kind" forces one). "docs": n packs n documents per sequence and trains with document masks.
Suites on disjoint --devices may run at once.
benchmarks/train_peers_gpu.py adds the peers suites (transformers, + Liger, longforge; five real shapes).
"probe" cases (one step, no warm-up) measure memory for the per-layer model in benchmarks/memory_model.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# The real models' config.json values that shape a step (their weights are not needed: random ones are as fast).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         rms_norm_eps=1e-5),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         rms_norm_eps=1e-5),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                         rms_norm_eps=1e-5),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         rms_norm_eps=1e-5),
    # Qwen2.5-0.5B's config.json (q/k/v projections carry a bias in Qwen2; no sliding window).
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rms_norm_eps=1e-6, use_sliding_window=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    # SmolLM2's head counts at a CPU size (head_dim 16), for --smoke.
    "tiny-h9": dict(hidden_size=144, intermediate_size=288, num_hidden_layers=2, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=16, vocab_size=512, tie_word_embeddings=True),
    # Qwen2.5-0.5B's head counts and architecture at a CPU size (head_dim 8), for --smoke.
    "tiny-qwen2": dict(arch="qwen2", hidden_size=112, intermediate_size=224, num_hidden_layers=2,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
                       rms_norm_eps=1e-6, use_sliding_window=False),
}
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA32_ROPE = {**ROPE, "factor": 32.0}  # Llama-3.2's config.json (3.1 has factor 8)
SHAPE_ROPE = {"llama-3.2-1b": LLAMA32_ROPE, "llama-3.2-3b": LLAMA32_ROPE,
              "smollm2-135m": {"rope_type": "default", "rope_theta": 100000.0},
              "tiny-h9": {"rope_type": "default", "rope_theta": 100000.0},
              "qwen2.5-0.5b": {"rope_type": "default", "rope_theta": 1000000.0},
              "tiny-qwen2": {"rope_type": "default", "rope_theta": 1000000.0}}



def SCALE(gpus: int, seq: int) -> dict[str, Any]:  # noqa: N802 - reads like a table row
    """A scaling case: the 8B shape cut to 2 layers, MLP tiles, warm-up then one timed step."""
    return {"shape": "llama-3.1-8b", "layers": 2, "seq": seq, "impl": "longforge", "gpus": gpus, "sp": gpus,
            "steps": 1, "mlp_tile": 16384}


def PROBE(gpus: int, seq: int, layers: int) -> dict[str, Any]:  # noqa: N802
    """A memory probe: the frugal settings, one step without warm-up, at a reduced depth."""
    return {"shape": "llama-3.1-8b", "layers": layers, "seq": seq, "impl": "longforge", "gpus": gpus, "sp": gpus,
            "steps": 1, "warmup": False, "probe": True}


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
    # Item 1 again with the fused elementwise ops (the default on CUDA), transformers in the same run.
    "engine3": [
        {"shape": "llama-3.2-1b", "seq": 65536, "impl": "hf"},
        {"shape": "llama-3.2-1b", "seq": 65536, "impl": "longforge", "policy": "save_attention"},
        {"shape": "llama-3.2-3b", "seq": 65536, "impl": "hf"},
        {"shape": "llama-3.2-3b", "seq": 65536, "impl": "longforge", "policy": "save_attention"},
    ],
    "depth": [
        {"shape": "llama-3.1-8b", "layers": L, "seq": s, "impl": "longforge", "steps": 1, "frugal": True, "warmup": False}
        for s in (131072, 524288) for L in (2, 4)
    ],
    # Issue 5, item 2: the 8B shape at full depth on two GPUs, sequence-parallel and data-parallel.
    "dist2": [
        {"shape": "llama-3.1-8b", "seq": 65536, "impl": "longforge", "gpus": 2, "sp": 2, "policy": "save_attention",
         "steps": 2},
        {"shape": "llama-3.1-8b", "seq": 131072, "impl": "longforge", "gpus": 2, "sp": 2, "policy": "save_attention",
         "steps": 2},
        {"shape": "llama-3.1-8b", "seq": 65536, "impl": "longforge", "gpus": 2, "sp": 1, "policy": "save_attention",
         "steps": 2},
    ],
    # The one-GPU row that dist2 is compared with, measured in the same run.
    "one8b": [{"shape": "llama-3.1-8b", "seq": 65536, "impl": "longforge", "policy": "save_attention", "steps": 2}],
    # Scaling at reduced depth (time per layer is what scales); same settings on 1, 2 and 4 GPUs.
    "scale1": [SCALE(1, 262144), SCALE(1, 524288)],
    "scale2": [SCALE(2, 524288)],
    "scale4": [SCALE(4, 524288), SCALE(4, 1048576)],
    # Memory probes for the per-layer memory model: checkpoints offloaded, bf16 AdamW, tiled MLP, one step.
    "probe1a": [PROBE(1, 262144, 1), PROBE(1, 262144, 2), PROBE(1, 262144, 4)],
    "probe1b": [PROBE(1, 524288, 2)],
    "probe2": [PROBE(2, 1048576, 1)],
    "probe4": [PROBE(4, 1048576, 1), PROBE(4, 1048576, 2), PROBE(4, 2097152, 1), PROBE(4, 1048576, 4)],
    # Where the time of a step goes (kernel categories from the profiler), 8B shape cut to 4 layers, 64K tokens.
    "profile": [{"shape": "llama-3.1-8b", "layers": 4, "seq": 65536, "impl": "longforge", "policy": "save_attention",
                 "steps": 2, "profile": True, "fused_ops": f} for f in ("off", "on")],
    # The fused elementwise ops on the full-depth 8B shape at 64K, against the unfused engine in the same run.
    "fused8b": [{"shape": "llama-3.1-8b", "seq": 65536, "impl": "longforge", "policy": "save_attention", "steps": 2,
                 "fused_ops": f} for f in ("off", "on")],
    # Probes again with the fused ops (the default on CUDA since they landed), for the per-token coefficient.
    "probef": [PROBE(1, 262144, 1), PROBE(1, 262144, 2), PROBE(1, 262144, 4), PROBE(1, 524288, 2)],
    # One step of the full-depth 8B shape at 512K on one GPU: 4 layers run, the other 28 stand in as ballast
    # (their weights, gradients, moments and checkpointed inputs: some on the GPU, the rest pinned on the host).
    "full1": [{**PROBE(1, 524288, 4), "resident": 1, "full_depth": 32, "full_resident": 8},
              {**PROBE(1, 524288, 4), "resident": 2, "full_depth": 32, "full_resident": 12, "in_backward": True}],
    # The same at 1M tokens on two GPUs (FSDP2 + sequence parallel 2: 512K tokens per GPU), 2 layers run.
    "full2": [{**PROBE(2, 1048576, 2), "resident": 1, "full_depth": 32, "full_resident": 10}],
    # Four GPUs (issue 9): 2M and 2.5M tokens (512K and 640K per GPU), one layer run, 31 as ballast.
    "full4": [{**PROBE(4, 2097152, 1), "full_depth": 32, "full_resident": 13},
              {**PROBE(4, 2621440, 1), "full_depth": 32, "full_resident": 12}],
    "full4b": [{**PROBE(4, 2621440, 1), "full_depth": 32, "full_resident": 12}],  # rerun: ballast pinned in pieces
    # Eight GPUs (issue 9): 4M tokens, 512K per GPU. Two steps: the first compiles, the second is timed.
    "full8": [{**PROBE(8, 4194304, 1), "full_depth": 32, "full_resident": 19, "steps": 2}],
    # The ballast method checked against a real full-depth step (1M tokens on 8 GPUs, every layer input on the GPU):
    # one layer run with 31 as ballast, then all 32 layers run, same settings, one step each.
    "check8": [{**PROBE(8, 1048576, 1), "resident": 1, "full_depth": 32, "full_resident": 32},
               {**PROBE(8, 1048576, 32), "resident": 32, "init_moments": True}],
    # The same check on one GPU: 128K with every layer input on the GPU, 256K with 12 of 32 there and 20 offloaded.
    "check1": [{**PROBE(1, 131072, 1), "resident": 1, "full_depth": 32, "full_resident": 32},
               {**PROBE(1, 131072, 32), "resident": 32, "init_moments": True},
               {**PROBE(1, 262144, 2), "resident": 1, "full_depth": 32, "full_resident": 12},
               {**PROBE(1, 262144, 32), "resident": 12, "init_moments": True}],
    # Scaling on the 8-GPU machine (issue 9), lanes on disjoint GPUs, then all eight (benchmarks/scale_gpu.sh x8a):
    # strong at 512K (1, 2, 4, 8 GPUs) and 1M (2, 4, 8); weak at 128K per GPU (128K, 256K, 512K, 1M).
    # The one-GPU 512K row also runs with the attention's earlier call split (one call per KV group).
    "s8_one": [SCALE(1, 524288), {**SCALE(1, 524288), "attn_budget": 2**31 - 1}],
    "s8_small": [SCALE(1, 131072)],
    "s8_two": [SCALE(2, 1048576)],
    "s8_four": [SCALE(4, 524288), SCALE(4, 1048576)],
    "s8_two_a": [SCALE(2, 262144)],
    "s8_two_b": [SCALE(2, 524288)],
    "s8_eight": [SCALE(8, 524288), SCALE(8, 1048576)],
    # The lean RMSNorm's effect on one recomputed layer's working set, against the plain norm in the same run.
    "lean": [{**PROBE(1, 262144, 1), "lean_norm": False}, PROBE(1, 262144, 1),
             {**PROBE(1, 262144, 2), "lean_norm": False}, PROBE(1, 262144, 2)],
    # Issue 19, item 4: SmolLM2-135M (9 query heads: Ulysses cannot use SP 2) with document masks, ring attention
    # at SP 2 over 2 GPUs against one GPU at the same tokens per sequence.
    # ring2 at 64K, ring2long at 128K (each pair about 2.5 minutes, most of it compiling).
    "ring2": [{"shape": "smollm2-135m", "seq": 65536, "impl": "longforge", "docs": 8, "steps": 2, **lay}
              for lay in ({}, {"gpus": 2, "sp": 2})],
    "ring2long": [{"shape": "smollm2-135m", "seq": 131072, "impl": "longforge", "docs": 8, "steps": 2, **lay}
                  for lay in ({}, {"gpus": 2, "sp": 2})],
    "tinydist": [
        {"shape": "tiny", "seq": 256, "impl": "longforge", "gpus": 2, "sp": 2, "steps": 2},
        {"shape": "tiny", "seq": 256, "impl": "longforge", "gpus": 2, "sp": 1, "steps": 2},
        {"shape": "tiny", "seq": 512, "impl": "longforge", "gpus": 2, "sp": 2, "steps": 1, "probe": True, "layers": 1},
    ],
    "tiny": [
        {"shape": "tiny", "seq": 256, "impl": "hf", "steps": 2},
        {"shape": "tiny", "seq": 256, "impl": "longforge", "steps": 2},
        {"shape": "tiny", "seq": 256, "impl": "longforge", "steps": 1, "frugal": True, "layers": 1},
        {"shape": "tiny", "seq": 256, "impl": "longforge", "steps": 1, "policy": "save_attention"},
    ],
}


SUITES["check1r"] = [c for c in SUITES["check1"] if not c.get("full_depth")]  # check1's real steps alone


def build(case: dict[str, Any], device: Any) -> Any:
    """A randomly initialised model of the case's shape (Llama, or Qwen2 where the shape says), bf16, on the device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(SHAPES[case["shape"]])
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if shape.pop("arch", "llama") == "qwen2" else (
        LlamaConfig, LlamaForCausalLM)
    if case.get("layers"):
        shape["num_hidden_layers"] = case["layers"]
    rope = SHAPE_ROPE.get(case["shape"], ROPE)
    cfg = config_class(**shape, max_position_embeddings=max(case["seq"], 8192), rope_parameters=dict(rope))
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(cfg)
    return model.to(torch.bfloat16)


def tokens(seq: int, vocab: int, seed: int = 0) -> Any:
    """One row of `seq` random token ids, the same for every implementation given the seed (made on the CPU)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (1, seq), generator=gen)


def optimizer_settings(case: dict[str, Any]) -> tuple[float, tuple[float, float], float]:
    """(lr, betas, weight decay) the case gives under "opt", else the engine cases' settings."""
    opt = case.get("opt") or {}
    return opt.get("lr", 1e-5), tuple(opt.get("betas", (0.9, 0.95))), opt.get("weight_decay", 0.0)


def run_hf(case: dict[str, Any], device: Any, patch: Any = None) -> dict[str, Any]:
    """Plain transformers: SDPA, gradient checkpointing, pure-bf16 fused AdamW, loss from model(labels=...).

    `patch(model)` changes the model first and returns what it did (the peers benchmark's Liger kernels). With
    case["opt"] the optimizer takes those settings and the engine's parameter groups (decay on matrices only).
    """
    import torch

    model = build(case, device)
    patched = patch(model) if patch is not None else None
    model.config._attn_implementation = "sdpa"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    fused = device.type == "cuda"
    if case.get("opt"):
        from longforge.train.optim import param_groups

        lr, betas, decay = optimizer_settings(case)
        opt = torch.optim.AdamW(param_groups(model, decay), lr=lr, betas=betas, eps=1e-8, fused=fused or None)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    ids = tokens(case["seq"], model.config.vocab_size).to(device)

    losses: list[Any] = []  # kept on the device (no sync inside a step); read after the timing

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)

    from longforge.model.parallel import Layout

    out = timed(step, case, model.config, Layout.single(device))
    extra = {"patched": patched} if patched is not None else {}
    return {**out, "losses": [round(float(x), 4) for x in losses], **extra}


def run_longforge(case: dict[str, Any], device: Any) -> dict[str, Any]:
    """longforge's engine: the same optimizer, flash attention, chunked LM head, memory savers as configured."""
    import torch

    from longforge.config import StageSpec
    from longforge.model.parallel import Layout, init_layout
    from longforge.train.batches import Batch, targets
    from longforge.train.parallelize import parallelize
    from longforge.train.optim import StepInBackward, make_optimizer

    began = time.perf_counter()
    if case.get("attn_budget"):  # the attention's call budget (longforge.model.attention.CALL_ELEMENTS) for A/B runs
        import longforge.model.attention as attention

        attention.CALL_ELEMENTS = case["attn_budget"]
    sp = case.get("sp", case.get("gpus", 1))
    layout = init_layout(sp=sp, device=device.type) if case.get("gpus", 1) > 1 else Layout.single(device)
    model = build(case, layout.device)
    frugal = case.get("frugal", False) or case.get("probe", False)
    in_backward = case.get("in_backward", False)
    docs = case.get("docs", 0)
    spec = StageSpec(steps=1, precision="bf16", optimizer="adamw_bf16" if frugal else "adamw", document_mask=docs > 0,
                     sequence_parallel=case.get("sp_kind", "auto"), attention=case.get("attention", "auto"),
                     activation_checkpointing="on", offload_activations=frugal and device.type == "cuda",
                     resident_layers=case.get("resident", 0), optimizer_in_backward=in_backward,
                     clip_grad=0 if in_backward else 1.0,
                     mlp_tile=16384 if frugal else case.get("mlp_tile", 0), checkpoint_policy=case.get("policy", "full"),
                     sp=sp, lean_norm=case.get("lean_norm", True), fused_ops=case.get("fused_ops", "auto"))
    engine = parallelize(model, spec, layout, case["seq"])
    opt = make_optimizer(engine.net, spec.optimizer, *optimizer_settings(case))
    stepper = StepInBackward(engine.net, opt) if in_backward else None
    if case.get("init_moments"):  # the optimizer's state before the first step, as every later step has it
        init_moments(opt)
    held = ballast(case, model.config, layout, opt) if case.get("full_depth") else None
    if held and layout.is_main:
        print(f"ballast {held['sizes']} ready after {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    # Ranks of one sequence-parallel group hold the same sequence; data-parallel replicas differ.
    ids = tokens(case["seq"], model.config.vocab_size, layout.dp_rank).to(layout.device)
    doc_ids, pos = packed_documents(case["seq"], docs)
    batch = Batch(ids, doc_ids.to(layout.device), pos.to(layout.device))
    labels, weights = targets(batch)

    losses: list[Any] = []  # mean loss per step, kept on the device (no sync inside a step)

    def step() -> None:
        loss = engine.micro_loss(batch, labels, weights) / weights.sum()
        loss.backward()
        losses.append(loss.detach())
        if stepper is None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    setup = time.perf_counter() - began
    out = timed(step, case, model.config, layout)
    out["setup_s"] = round(setup, 1)
    if not layout.distributed:  # with several processes each holds its part's loss
        out["losses"] = [round(float(x), 4) for x in losses]
    if held:
        out["ballast"] = held["sizes"]
    if engine.offload is not None:
        out["offloaded_gib"] = round(engine.offload.host_bytes / 2**30, 2)
        out["resident_gib"] = round(engine.offload.kept_bytes / 2**30, 2)
    out["settings"] = {"attention": engine.backend, "precision": spec.precision, "optimizer": spec.optimizer,
                       "checkpointing": spec.checkpoint_policy, "offload_activations": spec.offload_activations,
                       "resident_layers": spec.resident_layers, "optimizer_in_backward": in_backward,
                       "mlp_tile": spec.mlp_tile, "lean_norm": spec.lean_norm, "fused_ops": spec.fused_ops, "world": layout.world, "dp": layout.dp, "sp": layout.sp,
                       "fsdp": layout.world if layout.distributed else 1, "document_mask": spec.document_mask,
                       "sp_kind": engine.attention.sp.kind if engine.attention.sp is not None else "none"}
    if docs:  # MFU counts the attention documents allow (causal within each), as the training loop logs it
        lengths = torch.unique_consecutive(doc_ids[0], return_counts=True)[1].tolist()
        out["doc_lengths"] = lengths
        if out.get("mfu") is not None:
            from longforge.train.flops import attention_context, flops_per_token

            out["mfu_causal"] = out["mfu"]  # the whole sequence counted as one causal document, as without masks
            out["mfu"] = round(flops_per_token(model.config, attention_context(lengths)) * out["tokens_per_s"]
                               / (peak_flops_of(layout) * layout.world), 4)
    return out


def peak_flops_of(layout: Any) -> float:
    """The bf16 peak of this layout's GPU."""
    from longforge.train.flops import peak_flops

    return float(peak_flops(layout.device) or 0.0)


def packed_documents(seq: int, n: int) -> tuple[Any, Any]:
    """Document ids and restarted positions (1, seq) of n documents of fixed pseudo-random lengths (one without n)."""
    import torch

    if n <= 1:
        return torch.zeros(1, seq, dtype=torch.long), torch.arange(seq)[None]
    gen = torch.Generator().manual_seed(n)
    cuts = sorted(torch.randperm(seq - 1, generator=gen)[: n - 1].add(1).tolist())
    docs = torch.zeros(seq, dtype=torch.long)
    for c in cuts:
        docs[c:] += 1
    starts = torch.tensor([0] + cuts)
    pos = torch.arange(seq) - starts[docs]
    return docs[None], pos[None]


def init_moments(opt: Any) -> None:
    """Make the bf16 AdamW moments of every parameter now (a first step would make them only in its update)."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt.init_state(p)


def ballast(case: dict[str, Any], config: Any, layout: Any, opt: Any) -> dict[str, Any]:
    """Memory standing in for the layers a reduced-depth probe leaves out, so its peak is the full-depth step's.

    A full_depth-layer step of which `layers` run holds, beyond this probe: the other layers' bf16 weights,
    bf16 gradients (none with the optimizer in backward) and bf16 AdamW moments on the GPU (sharded over the
    processes), and their checkpointed inputs: `full_resident` - `resident` of them on the GPU, the rest in
    pinned host memory, one pinned buffer per layer as the offload makes them. The probe's own moments are
    made up front (a first step would make them only in its update).
    """
    import torch
    from memory_model import LAYER_PARAMS

    init_moments(opt)
    missing = case["full_depth"] - case["layers"]
    per_param = 2 + 4 + (0 if case.get("in_backward") else 2)
    local = case["seq"] // layout.sp
    layer_input = local * config.hidden_size * 2
    gpu_inputs = case.get("full_resident", 0) - case.get("resident", 0)
    host_inputs = missing - gpu_inputs
    if not 0 <= gpu_inputs <= missing:
        raise ValueError(f"full_resident {case.get('full_resident', 0)} must lie between resident "
                         f"{case.get('resident', 0)} and resident + the {missing} missing layers")
    gpu_bytes = missing * LAYER_PARAMS * per_param // layout.world + gpu_inputs * layer_input
    gpu = torch.empty(gpu_bytes, dtype=torch.uint8, device=layout.device)
    from longforge.model.memory import to_host

    # Pinned in the offload's own pieces (whole 5 GiB buffers would be rounded up to 8 GiB by the pinned cache).
    host = [to_host(torch.ones(layer_input, dtype=torch.uint8, device=layout.device))[2] for _ in range(host_inputs)]
    if layout.device.type == "cuda":
        torch.cuda.synchronize()
    return {"tensors": (gpu, host), "sizes": {"gpu_gib": round(gpu_bytes / 2**30, 2), "host_gib": round(
        host_inputs * layer_input / 2**30, 2), "missing_layers": missing, "gpu_inputs": gpu_inputs, "host_inputs": host_inputs}}


def host_peak_gib() -> float:
    """This process's peak resident memory (pinned offload buffers included), from /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _reduce(value: float, layout: Any, op: str) -> float:
    """max or sum of one number over every process (the number itself with one process)."""
    import torch
    import torch.distributed as dist

    if not layout.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=layout.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(t.item())


def timed(step: Any, case: dict[str, Any], config: Any, layout: Any) -> dict[str, Any]:
    """Warm up once (or count the first of `steps` as the warm-up), time the rest; tokens/s, MFU, peak memory (max over ranks).

    After every step the result so far is written to PARTIAL (when set), so a case stopped by its time limit
    still reports the steps it finished.
    """
    import torch

    device = layout.device
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        if layout.distributed:
            torch.distributed.barrier()

    steps = case.get("steps", 3)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first = None
    if case.get("warmup", True):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    out: dict[str, Any] = {}
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        out = measure(times, first, case, config, layout)
        if layout.is_main:
            print(f"step {i + 1}/{steps}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
            if PARTIAL is not None:
                PARTIAL.write_text(json.dumps({**case, **out, "partial": i + 1 < steps}))
    if case.get("profile") and cuda:
        out["profile"] = profile_step(step)
    return out


def measure(times: list[float], first: float | None, case: dict[str, Any], config: Any, layout: Any) -> dict[str, Any]:
    """Step time (median; without a warm-up the first step only counts when it is the only one), tokens/s, MFU, memory."""
    import torch

    from longforge.train.flops import flops_per_token, peak_flops

    cuda = layout.device.type == "cuda"
    counted = times[1:] if first is None and len(times) > 1 else times
    dt = sorted(counted)[len(counted) // 2]
    tps = case["seq"] * layout.dp / dt
    peak = peak_flops(layout.device)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    gpu_reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    host = host_peak_gib()
    return {"step_s": round(dt, 3), "step_times_s": [round(t, 3) for t in times],
            **({"warmup_s": round(first, 3)} if first is not None else {}),
            "compile_in_step": first is None and len(times) == 1, "tokens_per_s": round(tps, 1),
            "mfu": round(flops_per_token(config, case["seq"]) * tps / (peak * layout.world), 4) if peak else None,
            "peak_mem_gib": round(_reduce(gpu_peak, layout, "max"), 2) if cuda else None,
            "peak_reserved_gib": round(_reduce(gpu_reserved, layout, "max"), 2) if cuda else None,
            "host_peak_gib_per_rank": round(_reduce(host, layout, "max"), 2),
            "host_peak_gib_total": round(_reduce(host, layout, "sum"), 2)}


KERNEL_KINDS = (  # first match wins; names as cuBLAS, cuDNN, flash and PyTorch give their kernels on Hopper
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
    ("copy", ("memcpy", "memset", "copy")),
    ("nccl", ("nccl",)),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
)


def kernel_kind(name: str) -> str:
    """The category of a CUDA kernel by its name (elementwise and reductions are what is left)."""
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "elementwise/other")


def profile_step(step: Any) -> dict[str, Any]:
    """One more step under the profiler: GPU time by kernel category, the top kernels, and the step's wall time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    kernels = [(e.key, e.self_device_time_total / 1e6, e.count) for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    kinds: dict[str, float] = {}
    for name, sec, _ in kernels:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + sec
    busy = sum(kinds.values())
    top = sorted(kernels, key=lambda k: -k[1])[:25]
    # Where the host waits or works (a step whose GPU idles between kernels): the runtime calls that block on the
    # device, and the operators with the most host time of their own.
    host = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    waits = {e.key: {"calls": e.count, "s": round(e.self_cpu_time_total / 1e6, 4)} for e in host
             if any(w in e.key for w in ("Synchronize", "cudaMemcpy", "item", "_local_scalar_dense", "nonzero"))}
    busiest = sorted(host, key=lambda e: -e.self_cpu_time_total)[:20]
    return {"wall_s_profiled": round(wall, 3), "gpu_busy_s": round(busy, 3),
            "by_kind_s": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": n[:160], "s": round(sec, 4), "calls": c, "kind": kernel_kind(n)} for n, sec, c in top],
            "host_waits": waits,
            "host_top": [{"op": e.key[:120], "self_s": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count}
                         for e in busiest]}


RUNNERS: dict[str, Any] = {"hf": run_hf, "longforge": run_longforge}  # case["impl"] -> runner (others may add)


class OutOfMemoryOnRank(RuntimeError):
    """One rank of a multi-GPU case ran out of memory (carries the result to write)."""

    def __init__(self, result: dict[str, Any]):
        super().__init__(result["detail"])
        self.result = result


PARTIAL: Path | None = None  # where a case process writes its result so far (set by main)


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One case in this process (or this torchrun rank); out-of-memory is a result, not a crash."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        res = RUNNERS[case["impl"]](case, device)
    except torch.OutOfMemoryError as e:
        res = {"oom": True, "detail": str(e).splitlines()[0][:200]}
        if case.get("gpus", 1) > 1:
            # The other ranks wait in a collective: say so and fail, so torchrun stops them all.
            raise OutOfMemoryOnRank({**case, **res, "rank": int(os.environ.get("RANK", "0"))}) from e
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    return {**case, **res, "device": name}


def launch(case: dict[str, Any], tmp: Path, devices: list[str] | None, timeout: float,
           script: str = __file__) -> dict[str, Any]:
    """Run one case in a fresh process of `script --case` (torchrun for several GPUs) on the given devices; errors
    become results."""
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    gpus = case.get("gpus", 1)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[:gpus])
    cmd = [sys.executable, script, "--case", json.dumps(case), "--out", str(tmp)]
    if gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"] + cmd[1:]
    partial = partial_path(tmp)
    partial.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # torchrun's workers run in sessions of their own and would keep holding the GPUs
        stdout, stderr = proc.communicate()
        done = json.loads(partial.read_text()) if partial.exists() else {}
        return {**case, **done, "timeout": True, "error": f"timed out after {timeout:.0f} s: {stderr[-600:]}"}
    wall = round(time.perf_counter() - t0, 1)
    if not tmp.exists():
        done = json.loads(partial.read_text()) if partial.exists() else {}
        return {**case, **done, "error": f"exit {proc.returncode}: " + (stderr or stdout)[-1200:], "wall_s": wall}
    res = json.loads(tmp.read_text())
    tmp.unlink()
    return {**res, "wall_s": wall}


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (found through /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def partial_path(out: Path) -> Path:
    """Where the case process writing `out` keeps its result so far."""
    return out.with_name(out.name + ".partial")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=sorted(SUITES), nargs="+")
    ap.add_argument("--case", help="JSON of one case (used by the suite's subprocesses)")
    ap.add_argument("--devices", help="GPUs for this suite's cases, e.g. 0,1 (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--case-timeout", type=float, default=400.0, help="seconds before a case is stopped")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true",
                    help="run the suite's cases at a tiny shape (SmolLM2's head counts) and 1/256 of the length, on CPU")
    args = ap.parse_args()
    if args.case:
        global PARTIAL
        PARTIAL = partial_path(args.out)
        try:
            res = run_case(json.loads(args.case))
        except OutOfMemoryOnRank as e:
            args.out.write_text(json.dumps(e.result))
            sys.exit(1)
        if int(os.environ.get("RANK", "0")) == 0:
            args.out.write_text(json.dumps(res))
        return
    devices = args.devices.split(",") if args.devices else None
    results = []
    cases = [c for name in args.suite for c in SUITES[name]]
    if args.smoke:
        cases = [smoke(c) for c in cases]
    for case in cases:
        res = launch(case, args.out.with_suffix(".case.json"), devices, args.case_timeout)
        results.append(res)
        print(summary_line(res), flush=True)
        args.out.write_text(json.dumps(results, indent=1))


def smoke(case: dict[str, Any]) -> dict[str, Any]:
    """A case cut to a CPU check of its code path: the tiny 9-head shape, 1/256 of the length, its layout kept."""
    return {**case, "shape": "tiny-h9", "seq": max(case["seq"] // 256, 64), "layers": None, "smoke": True}


def summary_line(r: dict[str, Any]) -> str:
    """One line per case for the log."""
    name = f"{r['shape']}{'/' + str(r['layers']) + 'L' if r.get('layers') else ''} seq={r['seq']} {r['impl']}"
    if r.get("gpus", 1) > 1:
        name += f" x{r['gpus']} sp={r.get('sp', r['gpus'])}"
    if r.get("settings", {}).get("sp_kind") not in (None, "none"):
        name += f" ({r['settings']['sp_kind']})"
    if r.get("docs"):
        name += f" ({r['docs']} documents, masked)"
    if r.get("policy"):
        name += f" ({r['policy']})"
    if r.get("lean_norm") is False:
        name += " (plain norms)"
    if r.get("fused_ops"):
        name += f" (fused ops {r['fused_ops']})"
    if r.get("in_backward"):
        name += " (optimizer in backward)"
    if r.get("attn_budget"):
        name += f" (attention calls <= {r['attn_budget']} query elements)"
    if r.get("full_depth"):
        name += f" (as {r['full_depth']} layers, {r.get('full_resident', 0)} resident)"
    if r.get("oom"):
        return f"{name}: out of memory"
    if r.get("error"):
        return f"{name}: error {r['error'][-300:]}"
    mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "-"
    prof = r.get("profile")
    kinds = f", GPU time by kind {prof['by_kind_s']}" if prof else ""
    return (f"{name}: {r['tokens_per_s']:.0f} tok/s, step {r['step_s']} s, MFU {mfu}, peak {r['peak_mem_gib']} GiB "
            f"(reserved {r.get('peak_reserved_gib')}), host {r.get('host_peak_gib_per_rank')} GiB/rank{kinds}")


if __name__ == "__main__":
    main()
