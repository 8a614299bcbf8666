"""Sampling plans: how many times each document is emitted, as pure seedable functions."""

from __future__ import annotations

import numpy as np

from longforge.config import DataSpec

LENGTH_BUCKETS = (0, 256, 1024, 4096, 16384, 65536, 262144, 1 << 62)


def bucket_name(n_tokens: int) -> str:
    """The length bucket label of a document length, e.g. '1K-4K'."""
    for lo, hi in zip(LENGTH_BUCKETS, LENGTH_BUCKETS[1:]):
        if lo <= n_tokens < hi:
            return f"{_short(lo)}-{_short(hi)}" if hi < 1 << 62 else f">={_short(lo)}"
    raise AssertionError(n_tokens)


def _short(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def copies(n_tokens: int, spec: DataSpec, rng: np.random.Generator) -> int:
    """Times a document of n_tokens is emitted under the plan (0 = dropped)."""
    if spec.plan == "none":
        return 1
    short = n_tokens < spec.short_threshold
    if short:
        # Fu et al. / UltraLong: keep short documents only with a probability.
        return int(rng.random() < spec.short_keep_prob)
    if spec.plan == "length_thresholds" and n_tokens > spec.long_threshold:
        return spec.long_repeat
    return 1


def source_budgets(weights: list[float], token_budget: int | None) -> list[int | None]:
    """Each source's share of the token budget, proportional to its weight."""
    if token_budget is None:
        return [None] * len(weights)
    total = sum(weights)
    return [int(round(token_budget * w / total)) for w in weights]
