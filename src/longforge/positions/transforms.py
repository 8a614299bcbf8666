"""Position-id transforms: map a packed training sequence to the position ids the model sees."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from longforge.errors import LongforgeError
from longforge.registry import Registry


def doc_ids_from_starts(starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Document index of every token, given the sorted start offsets of the documents in a sequence."""
    ids = np.zeros(seq_len, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    starts = starts[(starts > 0) & (starts < seq_len)]
    ids[starts] = 1
    return np.cumsum(ids)


def contiguous(doc_ids: np.ndarray, restart: bool) -> np.ndarray:
    """0..S-1, or restarting at 0 at every document start when `restart`."""
    n = len(doc_ids)
    pos = np.arange(n, dtype=np.int64)
    if not restart:
        return pos
    first = np.r_[True, doc_ids[1:] != doc_ids[:-1]]
    start_of = np.maximum.accumulate(np.where(first, pos, 0))
    return pos - start_of


def _check_target(name: str, seq_len: int, target_length: int) -> None:
    """Skip transforms spread a short sequence over the target range, so the target must not be shorter."""
    if target_length < seq_len:
        raise LongforgeError(
            f"{name} needs target_length ({target_length}) >= the packed training length ({seq_len}); "
            "raise target_length or shorten data.seq_len."
        )


def pose(seq_len: int, target_length: int, rng: np.random.Generator) -> np.ndarray:
    """PoSE (Zhu et al.): chunk 1 = first r1 ~ U{1..(S+1)//2} tokens at 0..r1-1; chunk 2 shifted by one bias b ~ U{0..T-S}."""
    _check_target("PoSE", seq_len, target_length)
    r1 = int(rng.integers(1, (seq_len + 1) // 2 + 1))
    bias = int(rng.integers(0, target_length - seq_len + 1))
    pos = np.arange(seq_len, dtype=np.int64)
    pos[r1:] += bias
    return pos


def random_composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` non-negative integers summing to `total`, uniform over all such splits (stars and bars)."""
    assert parts >= 1 and total >= 0
    slots = total + parts - 1
    bars = np.sort(rng.choice(slots, size=parts - 1, replace=False)) if parts > 1 else np.empty(0, dtype=np.int64)
    return np.diff(np.concatenate([[-1], bars, [slots]])).astype(np.int64) - 1


def pit(segment_starts: np.ndarray, seq_len: int, target_length: int, rng: np.random.Generator) -> np.ndarray:
    """LongRecipe PIT: contiguous inside each segment; the T - S skipped positions fall into the gaps between segments."""
    _check_target("PIT", seq_len, target_length)
    starts = np.asarray(segment_starts, dtype=np.int64)
    starts = np.unique(np.concatenate([[0], starts[(starts > 0) & (starts < seq_len)]]))
    skip = target_length - seq_len
    if len(starts) == 1 and skip > 0 and seq_len > 1:
        # No sentence boundary at all: cut once at a random token (as PoSE does) so the target is still reached.
        starts = np.array([0, int(rng.integers(1, seq_len))], dtype=np.int64)
    pos = np.arange(seq_len, dtype=np.int64)
    if len(starts) > 1:
        # Uniform over all placements of the skipped positions into the N-1 gaps, re-drawn per call, so the
        # last token lands exactly at T-1 and every gap can be anything from 0 to T-S.
        jump = np.zeros(seq_len, dtype=np.int64)
        jump[starts[1:]] = random_composition(skip, len(starts) - 1, rng)
        pos += np.cumsum(jump)
    return pos


@dataclass(frozen=True)
class Transform:
    """One way of numbering a packed training sequence's positions."""

    name: str
    # (document index per token, target length, rng, restart at documents, segment starts) -> position ids
    positions: Callable[[np.ndarray, int, np.random.Generator, bool, np.ndarray | None], np.ndarray]
    skips: bool  # spreads a sequence over the target length, so the target must not be shorter than the sequence
    sentences: bool  # needs segment starts at sentence ends, hence the tokenizer that wrote the data
    description: str


def _pit(doc_ids: np.ndarray, target: int, rng: np.random.Generator, restart: bool,
         segment_starts: np.ndarray | None) -> np.ndarray:
    if segment_starts is None:
        raise LongforgeError("the 'pit' transform needs sentence boundaries; pass segment_starts (see positions.segments).")
    return pit(segment_starts, len(doc_ids), target, rng)


# `contiguous` restarts at every document when asked; `pose` and `pit` number the whole packed sequence (strictly
# increasing, hence also within each document) and never restart: document masks come from doc_ids, and RoPE
# attention inside a masked document only sees position differences anyway.
TRANSFORMS: Registry[Transform] = Registry("position transform", [
    Transform("contiguous", lambda d, t, rng, restart, seg: contiguous(d, restart), skips=False, sentences=False,
              description="0, 1, 2, ... (restarting at each document with document masks)"),
    Transform("pose", lambda d, t, rng, restart, seg: pose(len(d), t, rng), skips=True, sentences=False,
              description="PoSE (Zhu et al.): one skip, so short sequences reach the target's positions"),
    Transform("pit", _pit, skips=True, sentences=True,
              description="LongRecipe's PIT: skips at sentence starts, spread over the target length"),
])


def position_ids(
    method: str,
    doc_ids: np.ndarray,
    target_length: int,
    rng: np.random.Generator,
    restart_per_document: bool,
    segment_starts: np.ndarray | None = None,
) -> np.ndarray:
    """Position ids for one packed sequence by transform name (`pit` needs `segment_starts`, document starts included)."""
    return TRANSFORMS.pick(method).positions(doc_ids, target_length, rng, restart_per_document, segment_starts)
