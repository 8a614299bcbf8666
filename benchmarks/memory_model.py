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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--gpu-gib", type=float, default=118.0,
                    help="usable allocated GiB per GPU: an H200's 140 less the ~18%% the probes reserved beyond it")
    args = ap.parse_args()
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
