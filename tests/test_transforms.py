"""Position-id transforms: exact on hand-made cases, properties under hypothesis."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from longforge.positions.transforms import contiguous, doc_ids_from_starts, pose


def test_doc_ids_and_restarting_positions() -> None:
    docs = doc_ids_from_starts(np.array([0, 3, 5]), 8)
    assert docs.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert contiguous(docs, restart=True).tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert contiguous(docs, restart=False).tolist() == list(range(8))


@settings(max_examples=200, deadline=None)
@given(seq=st.integers(2, 512), extra=st.integers(0, 4096), seed=st.integers(0, 2**32 - 1))
def test_pose_ids_increase_and_stay_below_the_target(seq: int, extra: int, seed: int) -> None:
    target = seq + extra
    p = pose(seq, target, np.random.default_rng(seed))
    assert len(p) == seq and p[0] == 0
    assert np.all(np.diff(p) >= 1) and p[-1] < target
    assert np.sum(np.diff(p) > 1) <= 1  # one skip at most: two contiguous chunks
