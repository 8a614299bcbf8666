"""Regenerate the figures of docs/positions.md: `python docs/make_positions_figures.py` (writes PNGs next to this file)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from longforge.config import PositionSpec  # noqa: E402
from longforge.positions.rope import dynamic_ntk_theta, freq_table, inv_freq, plan_rope  # noqa: E402
from longforge.positions.transforms import doc_ids_from_starts, position_ids  # noqa: E402

HERE = Path(__file__).resolve().parent

# Llama-3.1-8B's published config.json values (RoPE part only; no weights are needed).
LLAMA31_8B = LlamaConfig(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=1, intermediate_size=14336,
    vocab_size=128256, max_position_embeddings=131072,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
TARGET = 1 << 20  # 1M tokens: factor 128 from the original 8192


def frequency_figure(path: Path) -> Path:
    """New / original inverse frequency against wavelength, for each method taking Llama-3.1-8B to 1M tokens."""
    longrecipe_theta = dynamic_ntk_theta(500000.0, TARGET / 8192, 128)
    methods = [
        ("pi (linear), s=128", PositionSpec(method="pi")),
        ("ntk (NTK-aware base), s=128", PositionSpec(method="ntk")),
        ("theta 1.28e8 (ProLong's 512K base)", PositionSpec(method="theta", theta=1.28e8)),
        (f"theta {longrecipe_theta:.2g} (LongRecipe rule = dynamic NTK at 1M)", PositionSpec(method="theta", theta=longrecipe_theta)),
        ("yarn alpha=1 beta=32 (paper), s=128", PositionSpec(method="yarn", beta_slow=1, beta_fast=32)),
        ("yarn alpha=1 beta=4 (UltraLong), s=128", PositionSpec(method="yarn", beta_slow=1, beta_fast=4)),
        ("llama3 low=1 high=4, s=128", PositionSpec(method="llama3")),
    ]
    fig, ax = plt.subplots(figsize=(9, 5.2))
    for label, spec in methods:
        rows = freq_table(plan_rope(LLAMA31_8B, spec, TARGET))
        ax.plot([r["wavelength"] for r in rows], [r["ratio"] for r in rows], marker=".", markersize=3, label=label)
    rows = freq_table(plan_rope(LLAMA31_8B, PositionSpec(method="none"), TARGET))
    ax.plot([r["wavelength"] for r in rows], [r["current_inv_freq"] / r["inv_freq"] for r in rows], "k--", linewidth=1,
            label="as shipped: llama3 s=8 (to 128K)")
    for x, text in ((8192, "original window 8K"), (TARGET, "target 1M")):
        ax.axvline(x, color="grey", linewidth=0.8, linestyle=":")
        ax.text(x, 1.5e-4, text, rotation=90, va="bottom", ha="right", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 3)
    ax.set_xlabel("wavelength of the frequency (tokens per full turn, original base 500000)")
    ax.set_ylabel("new inv_freq / original inv_freq")
    ax.set_title("Llama-3.1-8B (head_dim 128, theta 5e5, original 8192) extended to 1M tokens")
    ax.legend(fontsize=7.5, loc="lower left")
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _synthetic_sequence(seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Document starts (documents of ~1/3 of the sequence) and sentence starts (sentences of ~25 tokens)."""
    docs = np.unique(np.r_[0, np.cumsum(rng.integers(seq_len // 6, seq_len // 2, size=8))])
    docs = docs[docs < seq_len]
    sents = np.cumsum(rng.geometric(1 / 25, size=seq_len // 5))
    return docs, np.unique(np.r_[docs, sents[sents < seq_len]])


def coverage_figure(path: Path, seq_len: int = 4096, target: int = 32768, samples: int = 2000) -> Path:
    """How often each position of the target range is used per training sequence, for each transform."""
    rng = np.random.default_rng(0)
    docs, segs = _synthetic_sequence(seq_len, rng)
    doc_ids = doc_ids_from_starts(docs, seq_len)
    width = 256
    centers = np.arange(width // 2, target, width)
    fig, ax = plt.subplots(figsize=(9, 4.6))
    for method, restart in (("contiguous", False), ("pose", False), ("pit", False)):
        hits = np.zeros(target, dtype=np.int64)
        for _ in range(samples):
            p = position_ids(method, doc_ids, target, rng, restart, segment_starts=segs)
            np.add.at(hits, p[p < target], 1)
        used = hits.reshape(-1, width).mean(1) / samples
        label = {"contiguous": f"contiguous (no skip: nothing beyond {seq_len})", "pose": "pose (one skip)",
                 "pit": "pit (skips at sentence starts)"}[method]
        ax.plot(centers, np.where(used > 0, used, np.nan), label=label, linewidth=1.4)  # log axis: unused = no line
    ax.axhline(seq_len / target, color="grey", linestyle=":", linewidth=1, label=f"uniform share {seq_len}/{target}")
    ax.axvline(seq_len, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_ylim(8e-4, 1.5)
    ax.set_xlim(0, target)
    ax.set_xlabel("position id")
    ax.set_ylabel("probability the position is used in a sequence")
    ax.set_title(f"Coverage of a {target // 1024}K target by {seq_len // 1024}K training sequences "
                 f"({samples} samples, buckets of {width})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> None:
    """Write both figures into docs/."""
    for p in (frequency_figure(HERE / "positions_frequencies.png"), coverage_figure(HERE / "positions_coverage.png")):
        print(f"wrote {p}")
    theta = dynamic_ntk_theta(500000.0, TARGET / 8192, 128)
    inv, _ = inv_freq({"rope_theta": theta}, 128, 8192)
    print(f"LongRecipe-rule theta at 1M: {theta:.4g}; longest wavelength {2 * math.pi / inv[-1]:.3g} tokens")


if __name__ == "__main__":
    main()
