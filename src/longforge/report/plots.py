"""Matplotlib figures for the report (headless)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from longforge.files import writing  # noqa: E402


def _save(fig: Any, path: Path) -> None:
    """Write a figure as PNG (a full disk is one sentence) and free it."""
    try:
        with writing(path):
            fig.savefig(path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def passkey_heatmaps(results: dict[str, dict[str, Any]], original_length: int, path: Path,
                     metric: str = "passkey accuracy", title: str = "Passkey retrieval") -> Path:
    """Side-by-side heatmaps (length x depth) of a grid task's score, one per model, with the original window marked."""
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2 if _rows(results) <= 12 else 7.5), squeeze=False)
    im = None
    for ax, (label, res) in zip(axes[0], results.items()):
        grid = np.array(res["summary"]["grid"], dtype=float)
        lengths, depths = res["lengths"], res["depths"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)), [f"{d * 100:.0f}" for d in depths])
        step = max(1, len(lengths) // 12)  # at most ~12 length labels, e.g. every 4th of Fu et al.'s 40
        ax.set_yticks(range(0, len(lengths), step), [str(x) for x in lengths[::step]])
        ax.set_xlabel("needle depth (%)")
        if ax is axes[0][0]:
            ax.set_ylabel("prompt length (tokens)")
        acc = res["summary"]["accuracy"]
        ax.set_title(f"{label}: {acc * 100:.0f}% overall")
        if grid.size <= 150:
            # Sized to the cell (about 4.2 inches over the rows) and dark on light cells, light on dark ones.
            size = float(np.clip(200 / max(grid.shape), 7, 12))
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    v = grid[i, j]
                    ax.text(j, i, f"{v * 100:.0f}", ha="center", va="center", fontsize=size,
                            color="white" if v < 0.2 or v > 0.85 else "black", fontweight="bold")
        inside = [i for i, x in enumerate(lengths) if x <= original_length]
        if inside and len(inside) < len(lengths):
            ax.axhline(max(inside) + 0.5, color="black", linewidth=1.5, linestyle="--")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=metric)
    fig.suptitle(f"{title} (dashed line: original window {original_length})")
    _save(fig, path)
    return path


def _rows(results: dict[str, dict[str, Any]]) -> int:
    return max(len(r["lengths"]) for r in results.values())


def ruler_curves(results: dict[str, dict[str, Any]], original_length: int, path: Path) -> Path:
    """RULER: the task average against length per model (with the effective-length bar), and per-task scores at the longest length."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    threshold = None
    for label, res in results.items():
        avg = res["summary"]["average"]
        xs = sorted(int(k) for k in avg)
        eff = res["summary"].get("effective_length")
        ax.plot(xs, [avg[str(x)] for x in xs], marker="o", label=f"{label} (effective {eff or '-'})")
        threshold = res["summary"].get("threshold", threshold)
    if threshold is not None:
        ax.axhline(threshold, color="gray", linestyle=":", linewidth=1, label=f"threshold {threshold}")
    ax.axvline(original_length, color="gray", linestyle="--", linewidth=1, label="original window")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 100)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("average score (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("RULER average against length")
    tasks = list(next(iter(results.values()))["summary"]["per_task"])
    width = 0.8 / max(len(results), 1)
    for i, (label, res) in enumerate(results.items()):
        per = res["summary"]["per_task"]
        vals = []
        for t in tasks:
            scores = per.get(t, {})
            vals.append(scores[max(scores, key=int)] if scores else 0.0)
        bx.bar(np.arange(len(tasks)) + i * width, vals, width, label=label)
    bx.set_xticks(np.arange(len(tasks)) + width * (len(results) - 1) / 2, tasks, rotation=60, ha="right", fontsize=8)
    bx.set_ylim(0, 100)
    bx.set_ylabel("score at the longest length (%)")
    bx.legend(fontsize=8)
    bx.set_title("RULER per task")
    _save(fig, path)
    return path


def ppl_curves(results: dict[str, dict[str, Any]], original_length: int, path: Path) -> Path:
    """Perplexity against length, one line per model, log-log."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, res in results.items():
        rows = [r for r in res["rows"] if r["ppl"] is not None]
        ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], marker="o", label=label)
    ax.axvline(original_length, color="gray", linestyle="--", linewidth=1, label="original window")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("Perplexity against length (held-out documents)")
    _save(fig, path)
    return path


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (a shorter window at the start), so the trend shows through noise."""
    c = np.cumsum(np.concatenate([[0.0], np.asarray(values, dtype=float)]))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return ((c[idx] - c[lo]) / (idx - lo)).tolist()


def loss_curves(logs: dict[str, Path], path: Path) -> Path:
    """Training loss per step for each stage's log.jsonl: raw and faint, with a trailing mean drawn over it."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, log in logs.items():
        recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        steps, loss = [r["step"] for r in recs], [r["loss"] for r in recs]
        window = max(1, len(loss) // 10)
        (raw,) = ax.plot(steps, loss, linewidth=0.8, alpha=0.3)
        ax.plot(steps, smooth(loss, window), color=raw.get_color(), linewidth=2,
                label=f"{label} (mean of {window} steps)" if window > 1 else label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per target token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, path)
    return path
