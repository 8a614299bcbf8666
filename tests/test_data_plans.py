"""Sampling plans, sentence selection and packing: pure functions, checked on hand-made cases and with hypothesis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from longforge.config import DataSpec, SentenceFilterSpec, SourceSpec
from longforge.data.filters import DigitHeuristic, SentenceSelection, VocabTables, select_sentences, sentence_bounds
from longforge.data.pack import Packer, doc_lengths, sum_squared_lengths
from longforge.data.sampling import (
    bucket_index, expected_copies, max_copies, mix_budgets, plan_copies, BUCKET_NAMES,
)


def _spec(**kw) -> DataSpec:
    srcs = [SourceSpec(name="a", path=Path("."), role="long"), SourceSpec(name="b", path=Path("."), role="short")]
    return DataSpec(sources=srcs, **kw)


def test_length_thresholds_with_a_fractional_repeat() -> None:
    spec = _spec(plan="length_thresholds", short_threshold=100, short_keep_prob=0.0, long_threshold=1000, long_repeat=2.5)
    lengths = np.array([50] * 4 + [500] * 4 + [5000] * 20000)
    copies, reasons = plan_copies(lengths, "long", spec, 0, np.random.default_rng(0))
    assert copies[:4].tolist() == [0] * 4 and reasons[:4].tolist() == [1] * 4
    assert copies[4:8].tolist() == [1] * 4
    assert set(copies[8:].tolist()) == {2, 3} and abs(copies[8:].mean() - 2.5) < 0.02
    assert max_copies(lengths[[0, 4, 8]], "long", spec, 0).tolist() == [0, 1, 3]
    assert expected_copies(lengths[[0, 4, 8]], "long", spec, 0).tolist() == [0, 1, 2.5]


def test_long_short_mix_keeps_long_documents_of_long_sources_only() -> None:
    spec = _spec(plan="long_short_mix")
    lengths = np.array([10, 99, 100, 5000])
    c, r = plan_copies(lengths, "long", spec, 100, np.random.default_rng(0))
    assert c.tolist() == [0, 0, 1, 1] and r.tolist() == [2, 2, 0, 0]
    c, r = plan_copies(lengths, "short", spec, 100, np.random.default_rng(0))
    assert c.tolist() == [1, 1, 1, 1]
    # ProLong's 60/40: long sources share 60% by weight, short ones 40%.
    assert mix_budgets([3, 1, 1, 3], ["long", "long", "short", "short"], 1000, 0.6) == [450, 150, 100, 300]


def test_upsample_long_decisions_do_not_depend_on_the_neighbours() -> None:
    spec = _spec(short_threshold=100, short_keep_prob=0.5)
    a, _ = plan_copies(np.array([10, 10, 10, 10]), "long", spec, 0, np.random.default_rng(3))
    b, _ = plan_copies(np.array([10, 500, 10, 10]), "long", spec, 0, np.random.default_rng(3))
    assert a[[0, 2, 3]].tolist() == b[[0, 2, 3]].tolist() and b[1] == 1


def test_length_buckets() -> None:
    assert [BUCKET_NAMES[i] for i in bucket_index(np.array([0, 255, 256, 4095, 4096, 1 << 20]))] == [
        "0-256", "0-256", "256-1K", "1K-4K", "4K-16K", ">=256K"]


# ---------------------------------------------------------------- sentence selection

# A toy vocabulary: id -> text piece.
PIECES = ["the", " cat", ".", " 7", "\n", " sat", "?", "!", " 42."]
TABLES = VocabTables.from_strings(PIECES)


def test_vocab_tables_and_sentence_bounds() -> None:
    assert TABLES.ends_sentence.tolist() == [False, False, True, False, True, False, True, True, True]
    assert TABLES.has_digit.tolist() == [False, False, False, True, False, False, False, False, True]
    ids = np.array([0, 1, 2, 0, 3, 4, 5, 6, 0, 1])
    assert sentence_bounds(ids, TABLES.ends_sentence).tolist() == [0, 3, 6, 8, 10]
    assert sentence_bounds(np.array([0, 2]), TABLES.ends_sentence).tolist() == [0, 2]


def test_select_sentences_by_score_within_budget_in_document_order() -> None:
    ids = np.arange(10)
    bounds = np.array([0, 3, 6, 8, 10])  # sentence lengths 3, 3, 2, 2
    scores = np.array([1.0, 2.0, -np.inf, 1.0])
    # Priority order: sentence 1 (score 2), then 0 and 3 (score 1, earlier first); it stops at the first that does not fit.
    assert select_sentences(ids, bounds, scores, 5).tolist() == [3, 4, 5]
    assert select_sentences(ids, bounds, scores, 8).tolist() == [0, 1, 2, 3, 4, 5, 8, 9]
    assert select_sentences(ids, bounds, scores, 2).tolist() == []  # the best sentence alone does not fit


def test_digit_heuristic_keeps_digit_sentences_and_draws_the_others() -> None:
    ids = np.array([0, 1, 2, 0, 3, 4, 5, 6, 0, 8])  # sentences: "the cat." | "the 7\n" | " sat?" | "the 42."
    bounds = sentence_bounds(ids, TABLES.ends_sentence)
    rng = np.random.default_rng(0)
    assert DigitHeuristic(TABLES, 0.0).scores(ids, bounds, rng).tolist() == [-np.inf, 2, -np.inf, 2]
    assert DigitHeuristic(TABLES, 1.0).scores(ids, bounds, rng).tolist() == [1, 2, 1, 2]
    sel = SentenceSelection(SentenceFilterSpec(keep_prob=0.0, budget_fraction=0.5), TABLES)
    assert sel.apply(ids, rng).tolist() == [0, 3, 4, 0, 8]
    whole = SentenceSelection(SentenceFilterSpec(min_document_tokens=11), TABLES)
    assert whole.apply(ids, rng).tolist() == ids.tolist()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(PIECES) - 1), min_size=1, max_size=60), st.floats(0.05, 1.0), st.integers(0, 2**31))
def test_sentence_selection_properties(ids_list: list[int], frac: float, seed: int) -> None:
    ids = np.array(ids_list)
    bounds = sentence_bounds(ids, TABLES.ends_sentence)
    scores = DigitHeuristic(TABLES, 0.5).scores(ids, bounds, np.random.default_rng(seed))
    budget = int(frac * len(ids))
    kept = select_sentences(ids, bounds, scores, budget)
    assert len(kept) <= budget
    sents = [tuple(ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    # The kept tokens are whole sentences in document order, each a wanted one (finite score).
    i, taken = 0, []
    for k, s in enumerate(sents):
        if tuple(kept[i : i + len(s)]) == s and np.isfinite(scores[k]):
            taken.append(k)
            i += len(s)
    assert i == len(kept)
    # No wanted sentence that was left out scores higher than a kept one while it would have fit.
    if taken:
        low = min(scores[k] for k in taken)
        for k in set(range(len(sents))) - set(taken):
            assert not (scores[k] > low and len(kept) + len(sents[k]) <= budget)


# ---------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=30), min_size=1, max_size=12),
       st.integers(2, 17), st.sampled_from([([], [0]), ([0], []), ([], []), ([7, 8], [])]))
def test_packer_is_a_lossless_cut_of_the_joined_stream(docs: list[list[int]], seq_len: int, sep: tuple) -> None:
    prefix, suffix = sep
    p = Packer(seq_len, prefix=prefix, suffix=suffix)
    out = [s for d in docs for s in p.add(d)]
    stream = [t for d in docs for t in (*prefix, *d, *suffix)]
    assert [t for s in out for t in s.tokens.tolist()] + p.state()["tokens"] == stream
    # Every document start lands where its prefix begins, and each sequence also starts "a document" at 0.
    starts_in_stream, pos = [], 0
    for d in docs:
        starts_in_stream.append(pos)
        pos += len(prefix) + len(d) + len(suffix)
    for k, s in enumerate(out):
        lo = k * seq_len
        expect = sorted({0, *(x - lo for x in starts_in_stream if lo <= x < lo + seq_len)})
        assert s.starts.tolist() == expect
        assert doc_lengths(s.starts, seq_len).sum() == seq_len


def test_packer_state_restores_the_pending_sequence() -> None:
    a = Packer(8, suffix=[0])
    list(a.add([1, 2, 3]))
    b = Packer(8, suffix=[0])
    b.restore(a.state())
    assert [s.tokens.tolist() for s in a.add([4, 5, 6, 7])] == [s.tokens.tolist() for s in b.add([4, 5, 6, 7])]


def test_sum_of_squared_document_lengths() -> None:
    assert sum_squared_lengths(np.array([0]), 8) == 64
    assert sum_squared_lengths(np.array([0, 3, 6]), 8) == 9 + 9 + 4
