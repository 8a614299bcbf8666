"""Sampling plans: how many times each document is emitted and why, as pure seedable functions of its length."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from longforge.config import DataSpec

LENGTH_BUCKETS = (0, 256, 1024, 4096, 16384, 65536, 262144, 1 << 62)

# Why a document got no copy; index 0 means it was kept.
KEPT, SHORT_NOT_SAMPLED, BELOW_SEQ_LEN = 0, 1, 2
DROP_REASONS = {SHORT_NOT_SAMPLED: "short, not sampled", BELOW_SEQ_LEN: "long source, shorter than seq_len"}

# (lengths, role, spec, seq_len, rng) -> (copies per document, reason code per document)
PlanFn = Callable[[np.ndarray, str, DataSpec, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _short(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def bucket_name(n_tokens: int) -> str:
    """The length bucket label of a document length, e.g. '1K-4K'."""
    for lo, hi in zip(LENGTH_BUCKETS, LENGTH_BUCKETS[1:]):
        if lo <= n_tokens < hi:
            return f"{_short(lo)}-{_short(hi)}" if hi < 1 << 62 else f">={_short(lo)}"
    raise AssertionError(n_tokens)


BUCKET_NAMES = tuple(bucket_name(lo) for lo in LENGTH_BUCKETS[:-1])


def bucket_index(lengths: np.ndarray) -> np.ndarray:
    """Index into BUCKET_NAMES of every length."""
    return np.searchsorted(np.asarray(LENGTH_BUCKETS[1:-1]), np.asarray(lengths), side="right")


def _repeat(expected: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Copies with mean `expected`: its whole part, plus one more with the fractional part's probability."""
    whole = int(expected)
    frac = expected - whole
    extra = (rng.random(n) < frac).astype(np.int64) if frac > 0 else np.zeros(n, dtype=np.int64)
    return whole + extra


def _keep_short(lengths: np.ndarray, spec: DataSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # One draw per document whatever its length, so a document's fate does not depend on its neighbours' lengths.
    coin = rng.random(len(lengths)) < spec.short_keep_prob
    short = lengths < spec.short_threshold
    copies = np.where(short, coin.astype(np.int64), 1)
    reasons = np.where(short & ~coin, SHORT_NOT_SAMPLED, KEPT)
    return copies, reasons


def plan_none(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every document once."""
    n = len(lengths)
    return np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)


def plan_upsample_long(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fu et al.: documents shorter than short_threshold kept with short_keep_prob, the others once (per-source budgets keep domain shares)."""
    return _keep_short(lengths, spec, rng)


def plan_length_thresholds(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """UltraLong: downsample documents < short_threshold, repeat those > long_threshold long_repeat times on average."""
    copies, reasons = _keep_short(lengths, spec, rng)
    rep = _repeat(spec.long_repeat, len(lengths), rng)
    copies = np.where(lengths > spec.long_threshold, rep, copies)
    return copies, reasons


def plan_long_short_mix(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ProLong: long sources keep only documents of at least seq_len tokens; short sources keep everything."""
    n = len(lengths)
    if role == "short":
        return np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    long_enough = lengths >= seq_len
    return long_enough.astype(np.int64), np.where(long_enough, KEPT, BELOW_SEQ_LEN)


PLANS: dict[str, PlanFn] = {
    "none": plan_none,
    "upsample_long": plan_upsample_long,
    "length_thresholds": plan_length_thresholds,
    "long_short_mix": plan_long_short_mix,
}


def plan_copies(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Copies and drop reasons for a batch of document lengths under the recipe's plan."""
    return PLANS[spec.plan](np.asarray(lengths, dtype=np.int64), role, spec, seq_len, rng)


def copies(n_tokens: int, spec: DataSpec, rng: np.random.Generator, seq_len: int = 0, role: str = "long") -> int:
    """Times one document of n_tokens is emitted under the plan (0 = dropped)."""
    return int(plan_copies(np.array([n_tokens]), role, spec, seq_len, rng)[0][0])


def max_copies(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int) -> np.ndarray:
    """The most copies documents of these lengths can get under the plan (bounds what a source can yield)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    short_max = 1.0 if spec.short_keep_prob > 0 else 0.0
    if spec.plan == "none" or (spec.plan == "long_short_mix" and role == "short"):
        return np.ones(len(lengths))
    if spec.plan == "long_short_mix":
        return (lengths >= seq_len).astype(np.float64)
    out = np.where(lengths < spec.short_threshold, short_max, 1.0)
    if spec.plan == "length_thresholds":
        out = np.where(lengths > spec.long_threshold, float(np.ceil(spec.long_repeat)), out)
    return out


def expected_copies(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int) -> np.ndarray:
    """Mean copies of documents of these lengths under the plan (for estimates before any work)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    short = lengths < spec.short_threshold
    if spec.plan == "none":
        return np.ones(len(lengths))
    if spec.plan == "upsample_long":
        return np.where(short, spec.short_keep_prob, 1.0)
    if spec.plan == "length_thresholds":
        return np.where(lengths > spec.long_threshold, spec.long_repeat, np.where(short, spec.short_keep_prob, 1.0))
    if role == "short":
        return np.ones(len(lengths))
    return (lengths >= seq_len).astype(np.float64)


def source_budgets(weights: list[float], token_budget: int | None) -> list[int | None]:
    """Each source's share of the token budget, proportional to its weight."""
    if token_budget is None:
        return [None] * len(weights)
    total = sum(weights)
    return [int(round(token_budget * w / total)) for w in weights]


def mix_budgets(weights: list[float], roles: list[str], token_budget: int | None, long_share: float) -> list[int | None]:
    """ProLong's mix: long_share of the budget to the long sources, the rest to the short ones, each split by weight."""
    if token_budget is None:
        return [None] * len(weights)
    out: list[int | None] = []
    for w, r in zip(weights, roles):
        share = long_share if r == "long" else 1 - long_share
        group = sum(wi for wi, ri in zip(weights, roles) if ri == r)
        out.append(int(round(token_budget * share * w / group)))
    return out
