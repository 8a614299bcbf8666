"""Per-layer memory model of one training step of the Llama-3.1-8B shape, fitted to the probes of train_gpu.py.

The probes ran the 8B shape cut to 1, 2 or 4 layers (bf16 weights, bf16 AdamW, every layer recomputed in
backward, layer inputs offloaded to pinned CPU memory, MLP in 16K tiles) for one step without warm-up, on
1, 2 and 4 GPUs with Ulysses degree = GPUs. Per rank, with s = sequence / GPUs tokens and L layers:

    GPU peak  = a + b*s + c*L/p + e/p       (working set of one layer ~ s; weights + grads sharded over p)
    host peak = h0 + h1*s + k*L*s           (k: one offloaded layer input per layer, d*2 bytes per token)

The fit is checked against every probe (residuals printed), its per-layer terms against the analytic
numbers, and then extrapolated to 32 layers in the steady state (optimizer moments allocated, which a first
step without warm-up does not yet have) to find the longest sequence per GPU count. Files named lean*.json
hold same-run pairs with and without the lean RMSNorm; their per-token difference shifts the model.

  python benchmarks/memory_model.py benchmarks/results/scale-2026-11-22

With --full-depth it reads instead the runs that stand the missing layers in as ballast (train_gpu.py suites
full1/full2/full4/full8: their weights, gradients, moments and checkpointed inputs allocated, not computed),
splits each peak into ballast, own state and the working set of the layers run, and from those working sets
(grown by the one-GPU probes' slope per token) finds the longest full-depth step per machine, choosing how
many layers keep their inputs on the GPU (resident_layers):

  python benchmarks/memory_model.py benchmarks/results/train-2026-11-22 --full-depth --gpu-gib 128
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

GIB = 2**30
HIDDEN = 4096
LAYER_PARAMS = 218_112_000  # one Llama-3.1-8B decoder layer: 4096*(4096+1024+1024+4096) + 3*4096*14336 + 2*4096
EMBED_PARAMS = 2 * 128256 * 4096  # input embedding and the (untied) LM head
LAYERS = 32


def probes(folder: Path) -> list[dict[str, Any]]:
    """Every successful probe row; host numbers only from runs whose offload kept parameters in place."""
    rows = []
    for f in sorted(folder.glob("*.json")):
        if f.name.startswith("lean"):
            continue  # plain-vs-lean pairs: see lean_saving()
        for r in json.loads(f.read_text()):
            if r.get("probe") and "peak_mem_gib" in r:
                # The p1 runs predate the offload fix (they copied the LM head once per loss chunk).
                rows.append({**r, "host_ok": not f.name.startswith("p1_"), "file": f.name})
    return rows


def lean_saving(folder: Path) -> tuple[float, float] | None:
    """GiB per local token that lean RMSNorms save on the GPU and on the host, from same-run plain/lean probe pairs."""
    gpu, host = [], []
    for f in sorted(folder.glob("lean*.json")):
        rows = json.loads(f.read_text())
        plain = {(r.get("gpus", 1), r["seq"], r["layers"]): r for r in rows if r.get("lean_norm") is False}
        for r in rows:
            key = (r.get("gpus", 1), r["seq"], r["layers"])
            if r.get("lean_norm") is not False and key in plain and "peak_mem_gib" in r:
                local = r["seq"] / key[0]
                gpu.append((plain[key]["peak_mem_gib"] - r["peak_mem_gib"]) / local)
                host.append((plain[key]["host_peak_gib_per_rank"] - r["host_peak_gib_per_rank"]) / local)
    return (float(np.mean(gpu)), float(np.mean(host))) if gpu else None


def fit_gpu(rows: list[dict[str, Any]]) -> np.ndarray:
    """Least-squares a, b, c, e of the GPU model (GiB, s in tokens)."""
    x = np.array([[1.0, r["seq"] / r["gpus"], r["layers"] / r["gpus"], 1 / r["gpus"]] for r in rows])
    y = np.array([r["peak_mem_gib"] for r in rows])
    return np.linalg.lstsq(x, y, rcond=None)[0]


def fit_host(rows: list[dict[str, Any]]) -> np.ndarray:
    """Least-squares h0, h1, k of the host model (GiB per rank)."""
    use = [r for r in rows if r["host_ok"]]
    x = np.array([[1.0, r["seq"] / r["gpus"], r["layers"] * r["seq"] / r["gpus"]] for r in use])
    y = np.array([r["host_peak_gib_per_rank"] for r in use])
    return np.linalg.lstsq(x, y, rcond=None)[0]


def gpu_model(g: np.ndarray, seq: float, gpus: int, layers: int, steady: bool = True) -> float:
    """Predicted GPU peak per rank; steady adds the bf16 AdamW moments (4 bytes per parameter, sharded)."""
    a, b, c, e = g
    peak = a + b * seq / gpus + c * layers / gpus + e / gpus
    if steady:
        peak += 4 * (LAYER_PARAMS * layers + EMBED_PARAMS) / gpus / GIB
    return peak


def host_model(h: np.ndarray, seq: float, gpus: int, layers: int) -> float:
    """Predicted pinned + resident host memory per rank."""
    h0, h1, k = h
    return h0 + h1 * seq / gpus + k * layers * seq / gpus


def longest(g: np.ndarray, h: np.ndarray, gpus: int, gpu_gib: float, host_gib: float, step: int = 65536) -> dict[str, Any]:
    """Longest sequence (multiple of `step` x GPUs) whose predicted GPU and host peaks fit, and what binds."""
    seq, why = 0, "nothing fits"
    while True:
        nxt = seq + step * gpus
        over_gpu = gpu_model(g, nxt, gpus, LAYERS) > gpu_gib
        over_host = host_model(h, nxt, gpus, LAYERS) * gpus > host_gib
        if over_gpu or over_host:
            why = "GPU memory" if over_gpu else "host memory"
            break
        seq = nxt
    return {"gpus": gpus, "longest": seq, "limit": why,
            "gpu_gib": round(gpu_model(g, seq, gpus, LAYERS), 1), "host_gib_total": round(host_model(h, seq, gpus, LAYERS) * gpus, 1)}


def rows_of(folder: Path, prefix: str) -> list[dict[str, Any]]:
    """Every measured row (peak memory present) of the JSON files in folder whose names start with prefix."""
    out = []
    for f in sorted(folder.glob(f"{prefix}*.json")):
        data = json.loads(f.read_text())
        out += [{**r, "file": f.name} for r in (data if isinstance(data, list) else [data])]
    return out


def per_token_slope(probes: list[dict[str, Any]]) -> float:
    """GiB per local token of a one-GPU probe's peak at fixed depth (the working set's growth with length)."""
    by_depth: dict[int, list[tuple[int, float]]] = {}
    for r in probes:
        if r.get("gpus", 1) == 1 and "peak_mem_gib" in r and not r.get("full_depth"):
            by_depth.setdefault(r["layers"], []).append((r["seq"], r["peak_mem_gib"]))
    slopes = [(b[1] - a[1]) / (b[0] - a[0]) for pts in by_depth.values() if len(pts) > 1
              for a, b in [sorted(pts)[:2]]]
    return float(np.mean(slopes))


def state_bytes(layers: int, gpus: int, in_backward: bool) -> float:
    """bf16 weights, bf16 AdamW moments and (unless updated in backward) bf16 gradients, sharded over the GPUs."""
    return (LAYER_PARAMS * layers + EMBED_PARAMS) * (2 + 4 + (0 if in_backward else 2)) / gpus


def decompose(r: dict[str, Any]) -> dict[str, float]:
    """A ballast run's peaks split: the working set of the layers run (GPU) and the non-layer offloads (host)."""
    p, local = r["gpus"], r["seq"] // r["gpus"]
    layer_input = local * HIDDEN * 2
    real_resident = r.get("resident", 0)
    present = state_bytes(r["layers"], p, r.get("in_backward", False))
    work = r["peak_mem_gib"] * GIB - r["ballast"]["gpu_gib"] * GIB - present - real_resident * layer_input
    host = r["host_peak_gib_per_rank"] * GIB - r["ballast"]["host_gib"] * GIB - (r["layers"] - real_resident) * layer_input
    return {"working_gib": work / GIB, "host_rest_gib": host / GIB, "local": local}


def oom_working_set(r: dict[str, Any]) -> float:
    """Lower bound on the working set of a ballast run that ran out of memory, from the allocator's message."""
    import re

    used = float(re.search(r"has ([0-9.]+) GiB memory in use", r["detail"]).group(1))
    asked = float(re.search(r"Tried to allocate ([0-9.]+) GiB", r["detail"]).group(1))
    p, local = r["gpus"], r["seq"] // r["gpus"]
    missing = r["full_depth"] - r["layers"]
    ballast = missing * LAYER_PARAMS * 8 / p + (r["full_resident"] - r.get("resident", 0)) * local * HIDDEN * 2
    own = state_bytes(r["layers"], p, False) + r.get("resident", 0) * local * HIDDEN * 2
    return used + asked - (ballast + own) / GIB


def plan(gpus: int, local: int, work_gib: float, host_rest_gib: float, gpu_gib: float, host_gib: float,
         in_backward: bool = False) -> dict[str, Any] | None:
    """The most resident layers that fit the GPU at this length, and whether the rest fits the host; None if not."""
    layer_input = local * HIDDEN * 2 / GIB
    fixed = state_bytes(LAYERS, gpus, in_backward) / GIB + work_gib
    resident = min(LAYERS, int((gpu_gib - fixed) // layer_input))
    if resident < 0:
        return None
    host = gpus * (host_rest_gib + (LAYERS - resident) * layer_input)
    if host > host_gib:
        return None
    return {"resident": resident, "gpu_gib": round(fixed + resident * layer_input, 1), "host_gib": round(host, 1)}


def full_depth_report(folder: Path, gpu_gib: float) -> None:
    """Full-depth (ballast) runs decomposed, and the longest full-depth step per machine they imply."""
    probes = rows_of(folder, "probef")
    slope = per_token_slope(probes)
    print(f"working set grows {slope * GIB / 1024:.1f} KiB per local token (one-GPU probes at 256K and 512K)")
    runs = [r for r in rows_of(folder, "full") if "peak_mem_gib" in r and r.get("peak_mem_gib")]
    work: dict[tuple[int, bool], tuple[int, float]] = {}
    host_rest: list[tuple[int, float]] = []
    print("\nrun                                   GPU GiB  ballast  working set | host GiB/rank  ballast  non-layer")
    for r in runs:
        d = decompose(r)
        key = (r["gpus"], bool(r.get("in_backward")))
        if key not in work or d["local"] < work[key][0]:
            work[key] = (d["local"], d["working_gib"])
        host_rest.append((d["local"], d["host_rest_gib"]))
        name = f"{r['gpus']} GPU {r['seq'] // 1024}K, {r['layers']} of 32 run, {r['full_resident']} resident"
        print(f"{name:<38}{r['peak_mem_gib']:8.1f} {r['ballast']['gpu_gib']:8.1f} {d['working_gib']:11.1f} |"
              f" {r['host_peak_gib_per_rank']:13.1f} {r['ballast']['host_gib']:8.1f} {d['host_rest_gib']:10.1f}")
    h_slope = np.polyfit([x for x, _ in host_rest], [y for _, y in host_rest], 1)
    print(f"non-layer host memory per rank: {h_slope[1]:.1f} GiB + {h_slope[0] * GIB / 1024:.1f} KiB per local token")
    for r in rows_of(folder, "full"):
        if r.get("oom"):
            bound = oom_working_set(r)
            print(f"\n{r['gpus']} GPUs at {r['seq'] // 1024}K with {r['full_resident']} resident: out of memory "
                  f"({r['detail'][:110]}...): its working set is at least {bound:.1f} GiB (used + requested - ballast "
                  "- own state - resident inputs; the used memory includes non-PyTorch memory, hence 'about')")
            work.setdefault((r["gpus"], False), (r["seq"] // r["gpus"], bound))
    machines = ((1, 125, False), (1, 125, True), (2, 251, False), (4, 503, False), (8, 550, False))
    print(f"\nlongest full-depth step, GPU limit {gpu_gib} GiB allocated, host limit 90% of its memory:")
    for gpus, host_total, inb in machines:
        measured = work.get((gpus, inb)) or work.get((gpus, False))
        if measured is None:
            print(f"  {gpus} H200: no full-depth run measured its working set")
            continue
        best = None
        for local in range(65536, 4 * 1048576, 65536):
            w = measured[1] + slope * (local - measured[0])
            res = plan(gpus, local, w, float(np.polyval(h_slope, local)), gpu_gib, 0.9 * host_total, inb)
            if res:
                best = {"tokens": local * gpus, **res}
        label = f"{gpus} H200 ({host_total} GiB host){', optimizer in backward' if inb else ''}"
        ran = max((r["seq"] for r in runs if r["gpus"] == gpus and bool(r.get("in_backward")) == inb), default=None)
        print(f"  {label:<45} {best}; longest run: {ran}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--gpu-gib", type=float, default=118.0,
                    help="usable allocated GiB per GPU: an H200's 140 less the ~18%% the probes reserved beyond it")
    ap.add_argument("--full-depth", action="store_true",
                    help="analyse full*.json runs (reduced depth + ballast for the other layers) and probef*.json probes")
    args = ap.parse_args()
    if args.full_depth:
        full_depth_report(args.folder, args.gpu_gib)
        return
    rows = probes(args.folder)
    g, h = fit_gpu(rows), fit_host(rows)
    print(f"GPU  = {g[0]:.2f} + {g[1] * 1024:.4f} GiB per 1K local tokens + {g[2]:.3f} GiB x layers/p + {g[3]:.2f}/p")
    print(f"     per layer {g[2]:.3f} GiB vs analytic bf16 weights + bf16 grads {4 * LAYER_PARAMS / GIB:.3f} GiB")
    print(f"host = {h[0]:.2f} + {h[1] * 1024:.4f} GiB per 1K local tokens + {h[2] * 1024 * 1024:.2f} MiB per 1K local tokens x layers")
    print(f"     per layer and token {h[2] * GIB:.0f} bytes vs analytic one bf16 hidden state {2 * HIDDEN} bytes")
    print("\nprobe                                  GPU meas  model   host meas  model")
    for r in rows:
        gm = gpu_model(g, r["seq"], r["gpus"], r["layers"], steady=False)
        hm = host_model(h, r["seq"], r["gpus"], r["layers"])
        host = f"{r['host_peak_gib_per_rank']:9.1f} {hm:6.1f}" if r["host_ok"] else "   (v1 offload)"
        print(f"{r['gpus']} GPU {r['seq']:>8} tok {r['layers']} layers {r['file']:<16} {r['peak_mem_gib']:7.1f} {gm:6.1f} {host}")
    variants = [("plain RMSNorm (as probed)", g, h)]
    saving = lean_saving(args.folder)
    if saving:
        dg, dh = saving
        print(f"\nlean RMSNorm saves {dg * 2**20:.1f} KiB per local token on the GPU and {dh * 2**20:.1f} KiB on the host "
              "(same-run pairs)")
        variants.append(("lean RMSNorm (the default)", g - np.array([0, dg, 0, 0]), h - np.array([0, dh, 0])))
    for name, gv, hv in variants:
        print(f"\nlongest full-depth (32 layers) step, steady state, predicted, {name}:")
        for gpus, host in ((1, 128), (1, 512), (2, 256), (4, 512), (8, 560)):
            res = longest(gv, hv, gpus, args.gpu_gib, host - 16)
            print(f"  {gpus} H200, {host} GiB host: {res['longest']:>9} tokens, limited by {res['limit']} "
                  f"(GPU {res['gpu_gib']} GiB, host {res['host_gib_total']} GiB)")


if __name__ == "__main__":
    main()
