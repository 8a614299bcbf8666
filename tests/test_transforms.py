"""Position-id transforms: exact on hand-made cases, properties under hypothesis, coverage against exact expectations."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longforge.errors import LongforgeError
from longforge.positions.transforms import contiguous, doc_ids_from_starts, pit, pose, position_ids, random_composition


def test_doc_ids_and_restarting_positions() -> None:
    docs = doc_ids_from_starts(np.array([0, 3, 5]), 8)
    assert docs.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert contiguous(docs, restart=True).tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert contiguous(docs, restart=False).tolist() == list(range(8))


def test_pit_on_a_hand_made_case() -> None:
    # Segments [0,3) [3,5) [5,8); 12 - 8 = 4 skipped positions split over the 2 gaps.
    seen = set()
    for seed in range(200):
        p = pit(np.array([0, 3, 5]), 8, 12, np.random.default_rng(seed))
        g1, g2 = int(p[3] - 3), int(p[5] - 5 - p[3] + 3)
        assert p.tolist() == [0, 1, 2, 3 + g1, 4 + g1, 5 + g1 + g2, 6 + g1 + g2, 7 + g1 + g2]
        assert g1 + g2 == 4 and p[-1] == 11
        seen.add((g1, g2))
    assert seen == {(0, 4), (1, 3), (2, 2), (3, 1), (4, 0)}


def test_random_composition_is_uniform_over_all_splits() -> None:
    # 4 skipped positions into 3 gaps: C(6, 2) = 15 splits, each with probability 1/15.
    rng = np.random.default_rng(0)
    counts = Counter(tuple(random_composition(4, 3, rng).tolist()) for _ in range(15000))
    assert len(counts) == 15 and all(sum(c) == 4 and min(c) >= 0 for c in counts)
    assert max(abs(n / 15000 - 1 / 15) for n in counts.values()) < 0.01  # 5.4 standard deviations of one cell
    assert random_composition(0, 4, rng).tolist() == [0, 0, 0, 0]
    assert random_composition(7, 1, rng).tolist() == [7]


@st.composite
def packed(draw: st.DrawFn, min_len: int = 1, max_len: int = 400) -> tuple[int, np.ndarray, np.ndarray]:
    """A sequence length, its document starts and its segment starts (a superset of the document starts)."""
    n = draw(st.integers(min_len, max_len))
    docs = np.array(sorted({0, *draw(st.lists(st.integers(0, n - 1), max_size=6))}))
    sents = draw(st.lists(st.integers(0, n - 1), max_size=40))
    return n, docs, np.unique(np.concatenate([docs, sents])).astype(np.int64)


def _within_docs_strictly_increasing(p: np.ndarray, docs: np.ndarray) -> bool:
    """True when position ids increase by at least one between neighbours of the same document."""
    d = doc_ids_from_starts(docs, len(p))
    same = d[1:] == d[:-1]
    return bool(np.all(np.diff(p)[same] >= 1))


@settings(max_examples=60, deadline=None)
@given(case=packed(), extra=st.integers(0, 3000))
def test_contiguous_properties(case: tuple[int, np.ndarray, np.ndarray], extra: int) -> None:
    n, docs, _ = case
    target = n + extra
    d = doc_ids_from_starts(docs, n)
    plain = position_ids("contiguous", d, target, np.random.default_rng(0), restart_per_document=False)
    assert plain.tolist() == list(range(n))
    restart = position_ids("contiguous", d, target, np.random.default_rng(0), restart_per_document=True)
    assert np.all(restart[docs] == 0) and _within_docs_strictly_increasing(restart, docs)
    assert np.all(np.diff(restart)[d[1:] == d[:-1]] == 1) and restart.max() < target


@settings(max_examples=80, deadline=None)
@given(case=packed(min_len=2), extra=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1))
def test_pose_properties(case: tuple[int, np.ndarray, np.ndarray], extra: int, seed: int) -> None:
    n, docs, _ = case
    target = n + extra
    p = position_ids("pose", doc_ids_from_starts(docs, n), target, np.random.default_rng(seed), True)
    assert len(p) == n and p[0] == 0 and p[-1] < target
    assert np.all(np.diff(p) >= 1) and _within_docs_strictly_increasing(p, docs)  # never restarts at documents
    jumps = np.flatnonzero(np.diff(p) > 1)
    assert len(jumps) <= 1  # two contiguous chunks
    r1 = jumps[0] + 1 if len(jumps) else None
    if r1 is not None:
        assert 1 <= r1 <= (n + 1) // 2 and p[r1] - r1 <= target - n  # chunk 1 = first r1 tokens; bias <= T - S
    assert np.array_equal(p, pose(n, target, np.random.default_rng(seed)))  # a pure function of the seed


@settings(max_examples=80, deadline=None)
@given(case=packed(), extra=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1))
def test_pit_properties(case: tuple[int, np.ndarray, np.ndarray], extra: int, seed: int) -> None:
    n, docs, segs = case
    target = n + extra
    p = position_ids("pit", doc_ids_from_starts(docs, n), target, np.random.default_rng(seed), True, segment_starts=segs)
    assert len(p) == n and p[0] == 0 and p[-1] < target
    assert np.all(np.diff(p) >= 1) and _within_docs_strictly_increasing(p, docs)
    if n > 1:
        assert p[-1] == target - 1  # the skipped positions all land somewhere: the last token reaches the target
    inside = np.ones(n, dtype=bool)
    inside[segs] = False  # tokens that are not the first of a segment
    if len(segs) > 1:
        assert np.all(np.diff(p)[inside[1:]] == 1)  # contiguous inside every segment; gaps only at segment starts
    else:
        assert np.sum(np.diff(p) > 1) <= 1  # no boundary: one random cut instead
    assert np.array_equal(p, pit(segs, n, target, np.random.default_rng(seed)))


def _buckets(counts: np.ndarray, k: int) -> np.ndarray:
    """Sum a per-position count array into k equal buckets."""
    return np.add.reduceat(counts, np.linspace(0, len(counts), k + 1).astype(int)[:-1])


@settings(max_examples=25, deadline=None)
@given(case=packed(min_len=40, max_len=300), factor=st.integers(2, 16), seed=st.integers(0, 2**32 - 1))
def test_every_bucket_of_the_target_range_is_hit(case: tuple[int, np.ndarray, np.ndarray], factor: int, seed: int) -> None:
    n, docs, segs = case
    target = n * factor
    d = doc_ids_from_starts(docs, n)
    rng = np.random.default_rng(seed)
    for method in ("pose", "pit"):
        if method == "pit" and len(segs) < 3:
            continue  # with one gap, PIT puts every skipped position into it: no middle segment can roam
        hits = np.zeros(target, dtype=np.int64)
        for _ in range(300):
            np.add.at(hits, position_ids(method, d, target, rng, True, segment_starts=segs), 1)
        assert np.all(_buckets(hits, 8) > 0), method


def _pose_expected(n: int, target: int) -> np.ndarray:
    """Exact expected number of tokens at each position per PoSE sample."""
    r_max, biases = (n + 1) // 2, target - n + 1
    exp = np.zeros(target)
    for r1 in range(1, r_max + 1):
        exp[:r1] += 1  # chunk 1
        exp[r1 : r1 + biases + n - r1 - 1] += np.convolve(np.full(biases, 1 / biases), np.ones(n - r1))
    return exp / r_max


def _pit_expected(starts: np.ndarray, n: int, target: int) -> np.ndarray:
    """Exact expected number of tokens at each position per PIT sample (gap sums under a uniform composition)."""
    k, m = target - n, len(starts) - 1
    lengths = np.diff(np.r_[starts, n])
    g = np.arange(k + 1)

    def log_comb(a: np.ndarray, b: int) -> np.ndarray:
        return np.array([math.lgamma(x + 1) - math.lgamma(b + 1) - math.lgamma(x - b + 1) for x in a])

    exp = np.zeros(target)
    for i, (s, ln) in enumerate(zip(starts, lengths)):
        if i == 0 or i == m:
            pmf = (g == 0).astype(float) if i == 0 else (g == k).astype(float)
        else:  # G_i = sum of the first i of m gaps
            pmf = np.exp(log_comb(g + i - 1, i - 1) + log_comb(k - g + m - i - 1, m - i - 1) - log_comb(np.array([k + m - 1]), m - 1))
        exp[s : s + k + ln] += np.convolve(pmf, np.ones(ln))
    return exp


def test_coverage_matches_the_exact_expectation() -> None:
    # 4000 samples of a 256-token sequence spread over 2048 positions, in 16 buckets of 128 positions.
    # Stated tolerance: every bucket is hit, and its mean count per sample is within 5 standard errors
    # (from the samples' own spread) and within 10% of the exact expectation.
    n, target, samples, k = 256, 2048, 4000, 16
    rng = np.random.default_rng(7)
    starts = np.unique(np.r_[0, np.cumsum(rng.integers(3, 30, size=40))])
    starts = starts[starts < n]
    d = np.zeros(n, dtype=np.int64)
    for method, expected in (("pose", _pose_expected(n, target)), ("pit", _pit_expected(starts, n, target))):
        assert expected.sum() == pytest.approx(n)
        per_sample = np.stack([
            np.bincount(position_ids(method, d, target, rng, False, segment_starts=starts) // (target // k), minlength=k)
            for _ in range(samples)
        ])
        mean, se = per_sample.mean(0), per_sample.std(0, ddof=1) / math.sqrt(samples)
        want = _buckets(expected, k)
        assert np.all(per_sample.sum(0) > 0), method
        assert np.all(np.abs(mean - want) <= 5 * se), (method, ((mean - want) / se).round(1))
        np.testing.assert_allclose(mean, want, rtol=0.10, err_msg=method)


@pytest.mark.parametrize(
    ("method", "target", "segs", "message"),
    [
        ("pose", 50, None, r"PoSE needs target_length \(50\) >= the packed training length \(100\)"),
        ("pit", 99, np.array([0, 50]), r"PIT needs target_length \(99\) >= the packed training length \(100\)"),
        ("pit", 400, None, "the 'pit' transform needs sentence boundaries"),
        ("skip", 400, None, "unknown position transform 'skip'; use one of contiguous, pose, pit"),
    ],
)
def test_bad_transform_input_is_one_clear_error(method: str, target: int, segs: np.ndarray | None, message: str) -> None:
    with pytest.raises(LongforgeError, match=message):
        position_ids(method, np.zeros(100, dtype=np.int64), target, np.random.default_rng(0), True, segment_starts=segs)
