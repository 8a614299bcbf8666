"""Benchmark: longforge against its peers, in one run on one GPU, on real model shapes (issue 19, item 1).

Shapes (real config.json values, random weights, bf16): SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.2-3B,
Llama-3.1-8B, at 32K, 64K and 128K tokens per sequence. At each length, in this order:
  hf         plain transformers: SDPA, gradient checkpointing, fused AdamW, bf16 weights, loss from model(labels=...)
  liger      the same plus Liger kernels (apply_liger_kernel_to_llama / _qwen2: fused linear cross-entropy, RMSNorm,
             SwiGLU, RoPE)
  longforge  longforge's engine (save_attention; where that does not fit, the run falls back to full recomputation
             for this and the longer lengths), one document
  longforge  the same with 8 packed documents per sequence (document masks)
Same for every case of a shape and length: the token ids (seed 0), one sequence per step, AdamW (fused on CUDA)
lr 1e-5, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only (the engine's parameter groups), bf16
weights and moments, no gradient clipping. Documents: 8 per sequence, cut at fixed seeded points (train_gpu.py's
packed_documents: the same cuts for every shape at one length).

Measured after one warm-up step: tokens/s (median step), peak GPU memory (allocated and reserved), MFU against
989 TFLOP/s with attention counted causal over the whole sequence (REFERENCE.md section 4: 6*N_matmul +
6*L*heads*head_dim*S, no recomputation) for every row ("mfu_causal"); rows with documents also give "mfu_docs",
the attention the documents allow (S replaced by sum(len^2)/S). The causal count is the one to compare across rows:
the same tokens do the same useful work. Each case runs in its own process (train_gpu.py's launch): an
out-of-memory case is recorded as "does not fit", a case over its time as "timeout", and a kind that did not fit (or
timed out) at one length is recorded, not run, at the longer ones. Results are rewritten after every case. Every
case runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; each row keeps its first-step losses (the kinds
without documents start from the same weights and tokens, so their first losses agree to bf16 rounding).

On the GPU machine (torch 2.11, transformers 5.x, triton 3.6; carry [".whl"] holding pydantic's wheels and
liger_kernel-0.8.5-py3-none-any.whl, whose only requirements are torch and triton), one suite per command:
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/train_peers_gpu.py --suite peers135m --devices 0 \
      --deadline-s 560 --out $OUT/peers135m.json
Suites and their minutes on one H200 if every case fits (upper bounds: a case that does not fit costs 20-40 s and
makes its kind's longer lengths free; --plan prints each case's estimate; on the small shapes most of the time is
process start, model build and torch.compile, not steps):
  peers135m ~7    peers05b ~8    peers1b ~9    peers3b-32k64k ~7    peers3b-128k ~8
  peers8b-32k ~3.5    peers8b-64k ~5    peers8b-128k-peers ~5 (transformers, Liger)    peers8b-128k-longforge ~3.5
  peers3b, peers8b   one shape at every length (~14, ~20: more than one 10-minute command)
  peers              every shape (~55)
A kind that did not fit at a shorter length is known only within one run: the 128K slices run it again (a quick
out-of-memory). --deadline-s starts no case after that many seconds and cuts the last one short, so a command with a
wall-clock limit still ends with every row written.
  python3 benchmarks/train_peers_gpu.py --suite peers --smoke --out r.json   # every case kind on CPU, tiny shapes
  python3 benchmarks/train_peers_gpu.py --plan --suite peers8b-64k            # the cases and their expected seconds
  python3 benchmarks/train_peers_gpu.py --table a.json b.json                 # one markdown table of results files
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpu  # noqa: E402  (benchmarks/ is this script's folder)

PEER_OPT = {"lr": 1e-5, "betas": [0.9, 0.95], "weight_decay": 0.1}
DOCS = 8
LENGTHS = (32768, 65536, 131072)
SHAPES = {"135m": "smollm2-135m", "05b": "qwen2.5-0.5b", "1b": "llama-3.2-1b", "3b": "llama-3.2-3b",
          "8b": "llama-3.1-8b"}
# Expected MFU (the work done, attention counted as the documents allow) and per-process overhead in seconds (start,
# model build, torch.compile) of each kind, for --plan and the step counts: rough, from the wall times of the
# engine3 and fused8b rows in benchmarks/results/ (1B at 64K: transformers 31%, longforge 38%; 8B: 48%).
EXPECTED_MFU = {"hf": 0.30, "liger": 0.32, "longforge": 0.40}
OVERHEAD_S = {"hf": 20, "liger": 25, "longforge": 30}


def step_estimate(shape: str, seq: int, impl: str, docs: int = 0) -> float:
    """Expected seconds of one step of a case kind at this shape and length (from EXPECTED_MFU)."""
    from types import SimpleNamespace

    from longforge.train.flops import attention_context, flops_per_token

    cfg = SimpleNamespace(**{k: v for k, v in train_gpu.SHAPES[shape].items() if k != "arch"})
    context = attention_context(train_gpu.packed_documents(seq, docs)[0].unique(return_counts=True)[1].tolist())
    return seq * flops_per_token(cfg, context) / (EXPECTED_MFU[impl] * 989e12)


def steps_for(shape: str, seq: int) -> int:
    """Timed steps after the warm-up: more where a step is short (its time varies more), fewer where it is long."""
    est = step_estimate(shape, seq, "longforge")
    return 5 if est < 2 else 3 if est < 10 else 2 if est < 30 else 1


def peer_cases(shape: str, seqs: tuple[int, ...] = LENGTHS) -> list[dict[str, Any]]:
    """Every kind at every length of one shape, shortest length first, the peers before longforge at each."""
    cases = []
    for seq in seqs:
        base = {"shape": shape, "seq": seq, "opt": PEER_OPT, "steps": steps_for(shape, seq), "peers": True}
        cases += [{**base, "impl": "hf"}, {**base, "impl": "liger"}]
        for docs in (0, DOCS):
            cases.append({**base, "impl": "longforge", "policy": "save_attention", "fallback": {"policy": "full"},
                          **({"docs": docs} if docs else {})})
    return cases


SUITES: dict[str, list[dict[str, Any]]] = {f"peers{k}": peer_cases(v) for k, v in SHAPES.items()}
# Slices of the two large shapes that each end within a 10-minute command.
SUITES["peers3b-32k64k"] = peer_cases("llama-3.2-3b", (32768, 65536))
SUITES["peers3b-128k"] = peer_cases("llama-3.2-3b", (131072,))
SUITES["peers8b-32k"] = peer_cases("llama-3.1-8b", (32768,))
SUITES["peers8b-64k"] = peer_cases("llama-3.1-8b", (65536,))
SUITES["peers8b-128k-peers"] = [c for c in peer_cases("llama-3.1-8b", (131072,)) if c["impl"] != "longforge"]
SUITES["peers8b-128k-longforge"] = [c for c in peer_cases("llama-3.1-8b", (131072,)) if c["impl"] == "longforge"]
SUITES["peers"] = [c for k in SHAPES for c in SUITES[f"peers{k}"]]
# Where the small shape's step time goes (issue 19, item 2): every kind at 32K with one more step under the profiler.
SUITES["profile135m"] = [{**c, "steps": 3, "profile": True} for c in peer_cases("smollm2-135m", (32768,))]


class Unavailable(RuntimeError):
    """A case kind that cannot run on this machine (its result says why; the suite goes on)."""


def apply_liger(model: Any) -> dict[str, Any]:
    """Liger's kernels on the model (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE); what each piece now is."""
    import torch

    if importlib.util.find_spec("liger_kernel") is None:
        raise Unavailable("liger-kernel not installed")
    if not torch.cuda.is_available():
        raise Unavailable("liger-kernel needs a CUDA GPU (its kernels are Triton)")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2
    except ImportError as e:
        raise Unavailable(f"liger-kernel does not import: {e}") from e
    apply = apply_liger_kernel_to_qwen2 if model.config.model_type == "qwen2" else apply_liger_kernel_to_llama
    apply(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True, model=model)
    from importlib.metadata import version

    modeling = sys.modules[type(model).__module__]
    return {"liger_kernel": version("liger-kernel"), "mlp": model.model.layers[0].mlp._get_name(),
            "norm": model.model.norm.forward.__qualname__, "rope": modeling.apply_rotary_pos_emb.__name__,
            "loss": model.forward.__module__}


train_gpu.RUNNERS["liger"] = lambda case, device: train_gpu.run_hf(case, device, patch=apply_liger)


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One case in this process: train_gpu's runner, with an unavailable kind as a result."""
    try:
        return train_gpu.run_case(case)
    except Unavailable as e:
        return {**case, "unavailable": str(e)}
    except RuntimeError as e:  # a kernel launch (Triton's) can report it as a plain CUDA error
        if "out of memory" not in str(e).lower():
            raise
        return {**case, "oom": True, "detail": str(e).splitlines()[0][:200]}


def failed(r: dict[str, Any]) -> str | None:
    """Why a result stops its kind at longer lengths: "oom" or "timeout" (else None; a case the deadline cut short
    says nothing of the longer lengths)."""
    return "oom" if r.get("oom") else "timeout" if r.get("timeout") and not r.get("cut_by_deadline") else None


def kind_of(case: dict[str, Any]) -> tuple[Any, ...]:
    """What a case is apart from its length."""
    return case["shape"], case["impl"], case.get("docs", 0), case.get("layers")


def run_suite(cases: list[dict[str, Any]], out: Path, devices: list[str] | None, case_timeout: float,
              deadline: float | None) -> list[dict[str, Any]]:
    """Every case in order, results rewritten after each; kinds that failed are not run again at longer lengths, and
    a case whose "fallback" overrides fit where it did not keeps them for its kind's longer lengths."""
    began = time.monotonic()
    results: list[dict[str, Any]] = []
    stopped: dict[tuple[Any, ...], dict[str, Any]] = {}
    carried: dict[tuple[Any, ...], dict[str, Any]] = {}
    for case in cases:
        kind = kind_of(case)
        case = {**case, **carried.get(kind, {})}
        left = None if deadline is None else deadline - (time.monotonic() - began)
        if kind in stopped:
            prev = stopped[kind]
            res = {**case, failed(prev): True, "not_run": f"{failed(prev)} at {prev['seq']} tokens"}
        elif left is not None and left < 30:
            res = {**case, "not_run": f"deadline ({deadline:.0f} s) reached"}
        else:
            res = attempt(case, out, devices, case_timeout, left)
            fallback = case.get("fallback") or {}
            if failed(res) == "oom" and any(case.get(k) != v for k, v in fallback.items()):
                retry = {**case, **fallback}
                left = None if deadline is None else deadline - (time.monotonic() - began)
                if left is None or left >= 30:
                    res["superseded"] = True  # the retry below is this kind's row at this length
                    results.append(res)
                    print(summary_line(res), flush=True)
                    res = attempt(retry, out, devices, case_timeout, left)
                    if not failed(res):
                        carried[kind] = fallback
            if failed(res):
                stopped[kind] = res
        results.append(res)
        print(summary_line(res), flush=True)
        write_results(out, results)
    return results


def attempt(case: dict[str, Any], out: Path, devices: list[str] | None, timeout: float,
            left: float | None) -> dict[str, Any]:
    """One case in its own process (train_gpu.launch running this script) for at most `timeout` seconds or what is
    `left` before the deadline, its MFU fields named for the table."""
    cut = left is not None and left < timeout
    res = train_gpu.launch(case, out.with_suffix(".case.json"), devices, left if cut else timeout, script=__file__)
    if cut and res.get("timeout"):
        res["cut_by_deadline"] = True
    if res.get("mfu") is not None:
        res.setdefault("mfu_causal", res["mfu"])  # rows without documents: the one count there is
        if res.get("docs"):
            res["mfu_docs"] = res["mfu"]
    return res


def write_results(out: Path, results: list[dict[str, Any]]) -> None:
    """The results so far, replacing the file whole (a run stopped mid-write leaves the previous version)."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)


def shape_of(r: dict[str, Any]) -> str:
    """The model shape a row stands for (a smoke row: the tiny shape and the real one it stands in for)."""
    return f"{r['shape']} for {r['real_shape']}" if r.get("real_shape") else r["shape"]


def label(r: dict[str, Any]) -> str:
    """The row's kind in words."""
    if r["impl"] == "hf":
        return "transformers"
    if r["impl"] == "liger":
        return "transformers + Liger"
    policy = "full recomputation" if r.get("policy") == "full" else r.get("policy", "full recomputation")
    return f"longforge, {r['docs']} documents ({policy})" if r.get("docs") else f"longforge ({policy})"


def outcome(r: dict[str, Any]) -> str | None:
    """Why a row has no measurement, in words (None when it has one)."""
    if r.get("not_run"):
        if r.get("oom"):
            return f"does not fit (not run: {r['not_run']})"
        return f"not run: {r['not_run']}"
    if r.get("unavailable"):
        return f"not run: {r['unavailable']}"
    if r.get("oom"):
        return "does not fit"
    if r.get("timeout"):
        if r.get("cut_by_deadline"):
            return "not finished: stopped by the deadline"
        return f"timeout{' after ' + str(len(r['step_times_s'])) + ' steps' if r.get('step_times_s') else ''}"
    if r.get("error"):
        return "error: " + r["error"].strip().splitlines()[-1][-200:] if r["error"].strip() else "error"
    return None


def summary_line(r: dict[str, Any]) -> str:
    """One line per case for the log."""
    name = f"{shape_of(r)} seq={r['seq']} {label(r)}"
    why = outcome(r)
    if why:
        return f"{name}: {why}"
    docs = f", MFU with documents {r['mfu_docs'] * 100:.1f}%" if r.get("mfu_docs") is not None else ""
    mfu = f"{r['mfu_causal'] * 100:.1f}%" if r.get("mfu_causal") is not None else "-"
    loss = f", first loss {r['losses'][0]}" if r.get("losses") else ""
    return (f"{name}: {r['tokens_per_s']:.0f} tok/s, step {r['step_s']} s, MFU {mfu}{docs}, peak {gib(r)}{loss}"
            f"{', ' + str(r['patched']) if r.get('patched') else ''}")


def gib(r: dict[str, Any]) -> str:
    """Peak GPU memory allocated (and reserved) in GiB; "-" on the CPU."""
    if r.get("peak_mem_gib") is None:
        return "-"
    return f"{r['peak_mem_gib']} GiB (reserved {r.get('peak_reserved_gib')})"


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table of result rows (fallen-back attempts left out), with each longforge row's speed-up over the
    faster peer at its shape and length."""
    rows = [r for r in results if not r.get("superseded")]
    best: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["impl"] in ("hf", "liger") and outcome(r) is None:
            key = (shape_of(r), r["seq"])
            best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
    lines = ["| model shape | tokens/seq | run | tokens/s | MFU (causal) | MFU (documents) | peak GiB | first loss | "
             "vs faster peer |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        why = outcome(r)
        head = f"| {shape_of(r)} | {r['seq']} | {label(r)} |"
        if why:
            lines.append(f"{head} {why} | | | | | |")
            continue
        peer = best.get((shape_of(r), r["seq"]))
        vs = f"{r['tokens_per_s'] / peer:.2f}x" if peer and r["impl"] == "longforge" else ""
        docs = f"{r['mfu_docs'] * 100:.1f}%" if r.get("mfu_docs") is not None else ""
        mfu = f"{r['mfu_causal'] * 100:.1f}%" if r.get("mfu_causal") is not None else "-"
        peak = r["peak_mem_gib"] if r.get("peak_mem_gib") is not None else "-"
        loss = r["losses"][0] if r.get("losses") else ""
        lines.append(f"{head} {r['tokens_per_s']:,.0f} | {mfu} | {docs} | {peak} | {loss} | {vs} |")
    return "\n".join(lines)


def smoke(case: dict[str, Any]) -> dict[str, Any]:
    """A case cut to a CPU check of its code path: a tiny shape with the real one's head counts and architecture
    (SmolLM2's for the Llamas, Qwen2.5's for Qwen), 1/256 of the length, one timed step."""
    tiny = "tiny-qwen2" if train_gpu.SHAPES[case["shape"]].get("arch") == "qwen2" else "tiny-h9"
    return {**case, "shape": tiny, "seq": max(case["seq"] // 256, 64), "steps": 1, "smoke": True,
            "real_shape": case["shape"]}


def plan(cases: list[dict[str, Any]]) -> str:
    """Each case with its expected seconds (overhead, warm-up and timed steps at EXPECTED_MFU), and the total."""
    lines, total = [], 0.0
    for c in cases:
        s = OVERHEAD_S[c["impl"]] + (1 + c["steps"]) * step_estimate(c["shape"], c["seq"], c["impl"], c.get("docs", 0))
        total += s
        lines.append(f"{c['shape']} seq={c['seq']} {label(c)}: ~{s:.0f} s ({c['steps']} timed steps)")
    return "\n".join(lines + [f"total ~{total / 60:.1f} min if every case fits (an OOM costs ~20-40 s, a skip none)"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), nargs="+")
    ap.add_argument("--case", help="JSON of one case (used by the suite's subprocesses)")
    ap.add_argument("--devices", help="the GPU for this suite's cases, e.g. 0 (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--case-timeout", type=float, default=400.0, help="seconds before a case is stopped")
    ap.add_argument("--deadline-s", type=float, help="start no case after this many seconds; cut the last one's time "
                    "to what is left (so a command with a wall-clock limit ends with every row written)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="every case at a tiny shape and 1/256 of the length, on CPU")
    ap.add_argument("--plan", action="store_true", help="print the suite's cases and expected seconds; run nothing")
    ap.add_argument("--table", type=Path, nargs="+", help="print a markdown table of these results files; run nothing")
    args = ap.parse_args()
    if args.table:
        print(table([r for p in args.table for r in json.loads(p.read_text())]))
        return
    if args.case:
        train_gpu.PARTIAL = train_gpu.partial_path(args.out)
        args.out.write_text(json.dumps(run_case(json.loads(args.case))))
        return
    if not args.suite:
        ap.error("give --suite (or --table)")
    cases = [c for name in args.suite for c in SUITES[name]]
    if args.plan:
        print(plan(cases))
        return
    if args.out is None:
        ap.error("give --out")
    if args.smoke:  # the Llama shapes all map to one tiny shape: each tiny case once
        tiny = [smoke(c) for c in cases]
        keys = [json.dumps({k: v for k, v in c.items() if k != "real_shape"}, sort_keys=True) for c in tiny]
        cases = [c for i, c in enumerate(tiny) if keys[i] not in keys[:i]]
    run_suite(cases, args.out, args.devices.split(",") if args.devices else None, args.case_timeout, args.deadline_s)
    print(table(json.loads(args.out.read_text())), flush=True)


if __name__ == "__main__":
    main()
