"""The shard store and the loader: round trips, the old format, ssq ordering, rank sharding and resuming mid-epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longforge.data.pack import Packed, sum_squared_lengths
from longforge.data.store import LoaderPlan, PackedDataset, ShardWriter
from longforge.errors import LongforgeError
from longforge.train.batches import PackedBatches


def _store(root: Path, n: int = 23, seq_len: int = 16, shard: int = 5, order: str = "shuffle") -> list[Packed]:
    rng = np.random.default_rng(0)
    w = ShardWriter(root, seq_len, vocab_size=1000, shard_sequences=shard, meta={"batch_order": order})
    seqs = []
    for _ in range(n):
        starts = np.unique(np.r_[0, rng.integers(1, seq_len, rng.integers(0, 4))]).astype(np.int32)
        seqs.append(Packed(rng.integers(0, 1000, seq_len), starts))
        w.add(seqs[-1])
    w.close()
    return seqs


def test_writer_and_dataset_round_trip(tmp_path: Path) -> None:
    seqs = _store(tmp_path)
    ds = PackedDataset(tmp_path)
    assert len(ds) == 23 and len(ds.index["shards"]) == 5 and ds.index["dtype"] == "uint16"
    for i, s in enumerate(seqs):
        tokens, starts = ds.get(i)
        assert tokens.tolist() == s.tokens.tolist() and starts.tolist() == s.starts.tolist()
    assert ds.costs().tolist() == [sum_squared_lengths(s.starts, 16) for s in seqs]
    (tmp_path / "tokens-00001.bin").write_bytes(b"\0" * 10)
    with pytest.raises(LongforgeError, match="missing or damaged"):
        PackedDataset(tmp_path)


def test_format_1_folders_still_load(tmp_path: Path) -> None:
    toks = np.arange(24, dtype=np.uint16).reshape(3, 8)
    np.save(tmp_path / "tokens-00000.npy", toks)
    np.save(tmp_path / "starts-00000.npy", np.array([0, 0, 4, 0], dtype=np.int32))
    np.save(tmp_path / "offsets-00000.npy", np.array([0, 1, 3, 4]))
    (tmp_path / "index.json").write_text(json.dumps({"format": 1, "seq_len": 8, "dtype": "uint16", "num_sequences": 3,
                                                     "shards": [{"tokens": "tokens-00000.npy", "starts": "starts-00000.npy",
                                                                 "offsets": "offsets-00000.npy", "num_sequences": 3}]}))
    ds = PackedDataset(tmp_path)
    assert ds.get(1)[0].tolist() == list(range(8, 16)) and ds.get(1)[1].tolist() == [0, 4]
    assert ds.costs().tolist() == [64, 32, 64]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 5), st.booleans())
def test_each_epoch_reads_every_sequence_once(n: int, batch: int, seed: int, ssq: bool) -> None:
    plan = LoaderPlan(n, batch, seed)
    steps = -(-3 * n // batch)
    stream = np.concatenate([plan.indices(s) for s in range(steps)])[: 3 * n]
    for e in range(3):
        assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n))
    if ssq:  # ordering by cost only reorders inside a global batch
        sorted_plan = LoaderPlan(n, batch, seed, costs=np.random.default_rng(seed).integers(0, 100, n))
        for s in range(steps):
            assert sorted(sorted_plan.indices(s).tolist()) == sorted(plan.indices(s).tolist())


def test_ssq_order_keeps_each_batch_and_balances_ranks() -> None:
    costs = np.array([5, 100, 7, 60, 1, 80, 30, 2])
    plain, ssq = LoaderPlan(8, 8, 1), LoaderPlan(8, 8, 1, costs=costs)
    assert sorted(plain.indices(0).tolist()) == sorted(ssq.indices(0).tolist())
    assert costs[ssq.indices(0)].tolist() == [100, 80, 60, 30, 7, 5, 2, 1]
    # Two ranks, micro-batches of 2: at each micro-step the ranks hold neighbours in cost.
    r0, r1 = ssq.rank_indices(0, 0, 2), ssq.rank_indices(0, 1, 2)
    assert costs[r0].tolist() == [100, 60, 7, 2] and costs[r1].tolist() == [80, 30, 5, 1]
    assert np.array_equal(np.sort(np.r_[r0, r1]), np.sort(plain.indices(0)))


def _ids(src: PackedBatches, step: int) -> list[list[int]]:
    return [src.batch(step, m).input_ids.tolist() for m in range(src.grad_accum)]


@pytest.mark.parametrize("order", ["shuffle", "ssq"])
def test_interrupted_loader_resumes_without_repeating_or_skipping(tmp_path: Path, order: str) -> None:
    """Interrupt at step k, save the state, resume in a new loader, compare with an uninterrupted run."""
    _store(tmp_path, n=23, order=order)
    ds = PackedDataset(tmp_path)
    full = PackedBatches(ds, micro_batch=2, grad_accum=2, seed=5)
    assert full.order == order
    k, steps = 3, 12  # 12 steps of 4 sequences cross two epoch boundaries of 23
    state = json.loads(json.dumps(full.state_dict(k)))  # what a checkpoint stores
    resumed = PackedBatches(PackedDataset(tmp_path), micro_batch=2, grad_accum=2, seed=5)
    assert resumed.load_state_dict(state) == k
    for step in range(k, steps):
        assert _ids(resumed, step) == _ids(full, step)
        b1, b2 = resumed.batch(step, 1), full.batch(step, 1)
        assert torch.equal(b1.doc_ids, b2.doc_ids) and torch.equal(b1.position_ids, b2.position_ids)


def test_resuming_with_another_world_size_reads_the_rest_of_the_epoch(tmp_path: Path) -> None:
    _store(tmp_path, n=24)
    ds = PackedDataset(tmp_path)
    one = PackedBatches(ds, micro_batch=2, grad_accum=1, seed=0)  # 2 sequences per step
    seen = [r for s in range(5) for r in one.plan.indices(s).tolist()]
    state = one.state_dict(5)
    ranks = [PackedBatches(ds, micro_batch=1, grad_accum=2, seed=0, rank=r, world=2) for r in range(2)]
    for r in ranks:
        assert r.load_state_dict(state) == 5
    for step in range(5, 12):  # 4 sequences per step now; 10 + 7*4 = 38 > 24: the epoch ends at step 8 + 2 sequences
        seen += [x for r in ranks for x in r.plan.rank_indices(step, r.rank, r.world).tolist()]
    assert sorted(seen[:24]) == list(range(24))  # the first epoch: every sequence exactly once
    assert len(set(seen[24:])) == len(seen[24:])  # the second one has begun without repeats


def test_a_state_from_other_data_or_seed_is_refused(tmp_path: Path) -> None:
    _store(tmp_path / "a", n=10)
    _store(tmp_path / "b", n=11)
    a = PackedBatches(PackedDataset(tmp_path / "a"), 2, 1, seed=0)
    b = PackedBatches(PackedDataset(tmp_path / "b"), 2, 1, seed=0)
    with pytest.raises(LongforgeError, match="num_sequences=10 but this run has 11"):
        b.load_state_dict(a.state_dict(2))
    other_seed = PackedBatches(PackedDataset(tmp_path / "a"), 2, 1, seed=1)
    with pytest.raises(LongforgeError, match="seed=0 but this run has 1"):
        other_seed.load_state_dict(a.state_dict(2))
    with pytest.raises(LongforgeError, match="before this loader's resumed step"):
        a.load_state_dict(a.state_dict(4))
        a.batch(1, 0)
