"""Position-id transforms: map a packed training sequence to the position ids the model sees."""

from __future__ import annotations

import numpy as np

from longforge.errors import LongforgeError


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


def pose(seq_len: int, target_length: int, rng: np.random.Generator) -> np.ndarray:
    """PoSE (Zhu et al.): two chunks, the second shifted by one bias uniform over the target range."""
    if target_length < seq_len:
        raise LongforgeError(f"PoSE needs target_length ({target_length}) >= the training length ({seq_len}).")
    r1 = int(rng.integers(1, (seq_len + 1) // 2 + 1))
    bias = int(rng.integers(0, target_length - seq_len + 1))
    pos = np.arange(seq_len, dtype=np.int64)
    pos[r1:] += bias
    return pos


def position_ids(
    method: str,
    doc_ids: np.ndarray,
    target_length: int,
    rng: np.random.Generator,
    restart_per_document: bool,
) -> np.ndarray:
    """Position ids for one packed sequence by transform name."""
    if method == "contiguous":
        return contiguous(doc_ids, restart_per_document)
    if method == "pose":
        return pose(len(doc_ids), target_length, rng)
    raise LongforgeError(f"unknown position transform {method!r}; use 'contiguous' or 'pose'.")
