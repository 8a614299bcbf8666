"""Sampling plans: how many times each document is emitted and why, as pure seedable functions of its length."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from longforge.registry import Registry

if TYPE_CHECKING:  # the schema reads this registry's names, so this module must not import it at load time
    from longforge.config import DataSpec

LENGTH_BUCKETS = (0, 256, 1024, 4096, 16384, 65536, 262144, 1 << 62)

# Why a document got no copy; index 0 means it was kept.
KEPT, SHORT_NOT_SAMPLED, BELOW_SEQ_LEN = 0, 1, 2
DROP_REASONS = {SHORT_NOT_SAMPLED: "short, not sampled", BELOW_SEQ_LEN: "long source, shorter than seq_len"}

# (lengths, role, spec, seq_len, rng) -> (copies per document, reason code per document)
PlanFn = Callable[[np.ndarray, str, "DataSpec", int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


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


def _most_once(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int) -> np.ndarray:
    return np.ones(len(lengths))


def _most_short_kept(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int) -> np.ndarray:
    return np.where(lengths < spec.short_threshold, 1.0 if spec.short_keep_prob > 0 else 0.0, 1.0)


def _most_thresholds(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int) -> np.ndarray:
    out = _most_short_kept(lengths, role, spec, seq_len)
    return np.where(lengths > spec.long_threshold, float(np.ceil(spec.long_repeat)), out)


def _mean_short_kept(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int) -> np.ndarray:
    return np.where(lengths < spec.short_threshold, spec.short_keep_prob, 1.0)


def _mean_thresholds(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int) -> np.ndarray:
    return np.where(lengths > spec.long_threshold, spec.long_repeat, _mean_short_kept(lengths, role, spec, seq_len))


def _long_enough(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int) -> np.ndarray:
    """Both the most and the mean copies under long_short_mix: a short source keeps all, a long one what fills seq_len."""
    return np.ones(len(lengths)) if role == "short" else (lengths >= seq_len).astype(np.float64)


# (lengths, role, spec, seq_len) -> copies per document, for estimates before any work
BoundFn = Callable[[np.ndarray, str, "DataSpec", int], np.ndarray]


@dataclass(frozen=True)
class SamplingPlan:
    """One sampling plan: its random draw, the most and the mean copies it gives (for estimates), and its budgets."""

    name: str
    copies: PlanFn
    most: BoundFn
    mean: BoundFn
    # Sources have roles: long sources share long_share of the budget, and long and short data are packed apart.
    by_role: bool
    description: str

    def budgets(self, spec: DataSpec) -> list[int | None]:
        """Each source's share of the token budget."""
        weights = [s.weight for s in spec.sources]
        if self.by_role:
            return mix_budgets(weights, [s.role for s in spec.sources], spec.token_budget, spec.long_share)
        return source_budgets(weights, spec.token_budget)


PLANS: Registry[SamplingPlan] = Registry("sampling plan", [
    SamplingPlan("none", plan_none, _most_once, _most_once, by_role=False, description="every document once"),
    SamplingPlan("upsample_long", plan_upsample_long, _most_short_kept, _mean_short_kept, by_role=False,
                 description="Fu et al.: short documents kept with short_keep_prob"),
    SamplingPlan("length_thresholds", plan_length_thresholds, _most_thresholds, _mean_thresholds, by_role=False,
                 description="UltraLong: short documents downsampled, long ones repeated"),
    SamplingPlan("long_short_mix", plan_long_short_mix, _long_enough, _long_enough, by_role=True,
                 description="ProLong: long sources filtered to seq_len, short ones packed apart, mixed by long_share"),
])


def plan_copies(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Copies and drop reasons for a batch of document lengths under the recipe's plan."""
    return PLANS[spec.plan].copies(np.asarray(lengths, dtype=np.int64), role, spec, seq_len, rng)


def copies(n_tokens: int, spec: DataSpec, rng: np.random.Generator, seq_len: int = 0, role: str = "long") -> int:
    """Times one document of n_tokens is emitted under the plan (0 = dropped)."""
    return int(plan_copies(np.array([n_tokens]), role, spec, seq_len, rng)[0][0])


def max_copies(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int) -> np.ndarray:
    """The most copies documents of these lengths can get under the plan (bounds what a source can yield)."""
    return PLANS[spec.plan].most(np.asarray(lengths, dtype=np.int64), role, spec, seq_len)


def expected_copies(lengths: np.ndarray, role: str, spec: DataSpec, seq_len: int) -> np.ndarray:
    """Mean copies of documents of these lengths under the plan (for estimates before any work)."""
    return PLANS[spec.plan].mean(np.asarray(lengths, dtype=np.int64), role, spec, seq_len)


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
