"""Sentence boundaries from tokens, and PIT wired through the batch source and the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from longforge.config import parse_recipe
from longforge.data.pack import Packed
from longforge.data.store import PackedDataset, ShardWriter
from longforge.errors import LongforgeError
from longforge.positions.segments import is_sentence_end, sentence_end_mask, sentence_starts
from longforge.train.batches import PackedBatches


@pytest.mark.parametrize(
    ("text", "ends"),
    [(".", True), ("?", True), ("!", True), ("\n", True), (".\n\n", True), ("ok.", True), (". ", True),
     ("!)", False), ("a", False), (" the", False), (",", False), ("x\ny", True), ("</s>", False), ("", False)],
)
def test_which_token_texts_end_a_sentence(text: str, ends: bool) -> None:
    assert is_sentence_end(text) == ends


def test_sentence_starts_on_hand_made_tokens() -> None:
    mask = np.zeros(10, dtype=bool)
    mask[[1, 2]] = True  # ids 1 and 2 end sentences (say "." and "\n")
    tokens = np.array([5, 5, 1, 5, 1, 2, 2, 5, 5, 1, 5, 99])  # 99: beyond the tokenizer, never an end
    # Ends at 2, 4-6 (one run), 9; a document starts at 8; segments start at 0, 3, 7, 8, 10.
    assert sentence_starts(tokens, mask, np.array([0, 8])).tolist() == [0, 3, 7, 8, 10]
    assert sentence_starts(tokens, mask).tolist() == [0, 3, 7, 10]
    assert sentence_starts(np.array([1, 1]), mask).tolist() == [0]  # a run at the end starts nothing
    assert sentence_starts(np.array([], dtype=np.int64), mask).tolist() == []


def test_sentence_end_mask_from_a_real_tokenizer(tokenizer: Any) -> None:
    mask = sentence_end_mask(tokenizer)
    assert mask.shape == (len(tokenizer),)
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    assert [t for t, m in zip(texts, mask) if m] == [t for t in texts if is_sentence_end(t)]
    assert mask.sum() >= 2  # the fixture corpus has "." and newlines
    ids = tokenizer("alpha beta. gamma delta. river", add_special_tokens=False)["input_ids"]
    starts = sentence_starts(np.array(ids), mask).tolist()
    pieces = [tokenizer.decode(ids[a:b]) for a, b in zip(starts, starts[1:] + [len(ids)])]
    assert "".join(pieces) == "alpha beta. gamma delta. river"
    assert [p.strip() for p in pieces] == ["alpha beta.", "gamma delta.", "river"]


def _store(root: Path, rows: list[tuple[list[int], list[int]]], vocab: int = 300) -> PackedDataset:
    """A shard store written by hand from (tokens, document starts) rows."""
    writer = ShardWriter(root, len(rows[0][0]), vocab, shard_sequences=2)
    for tokens, starts in rows:
        writer.add(Packed(np.array(tokens), np.array(starts)))
    writer.close()
    return PackedDataset(root)


def test_packed_batches_use_pit_with_boundaries_from_the_tokens(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros(300, dtype=bool)
    mask[7] = True  # token 7 ends a sentence
    rows = []
    for _ in range(4):
        tokens = rng.integers(10, 300, size=64)
        tokens[rng.choice(63, size=6, replace=False)] = 7
        rows.append((tokens.tolist(), [0, 40]))
    ds = _store(tmp_path / "data", rows)
    src = PackedBatches(ds, 2, 1, seed=3, transform="pit", target_length=512, sentence_ends=mask)
    b = src.batch(0, 0)
    assert b.position_ids.shape == (2, 64)
    for row in range(2):
        tokens, pos = b.input_ids[row].numpy(), b.position_ids[row].numpy()
        segs = sentence_starts(tokens, mask, np.array([0, 40]))
        assert 40 in segs.tolist() and pos[0] == 0 and pos[-1] == 511
        step = np.diff(pos)
        inside = np.ones(64, dtype=bool)
        inside[segs] = False
        assert np.all(step[inside[1:]] == 1) and np.all(step >= 1)
        assert b.doc_ids[row].tolist() == [0] * 40 + [1] * 24  # document masks from document starts, not positions
    assert np.array_equal(b.position_ids, src.batch(0, 0).position_ids)  # a pure function of (seed, step)
    again = PackedBatches(ds, 2, 1, seed=3, transform="pit", target_length=512, sentence_ends=mask).plan.indices(1)
    later = src.batch(1, 0)
    assert np.array_equal(later.input_ids[0].numpy(), ds.get(int(again[0]))[0])


def test_packed_batches_reject_what_cannot_work(tmp_path: Path) -> None:
    ds = _store(tmp_path / "data", [(list(range(10, 74)), [0])] * 2)
    with pytest.raises(LongforgeError, match="needs the tokenizer's sentence ends"):
        PackedBatches(ds, 1, 1, 0, transform="pit", target_length=512)
    with pytest.raises(LongforgeError, match="spreads 64-token sequences over target_length 32"):
        PackedBatches(ds, 1, 1, 0, transform="pose", target_length=32)
    with pytest.raises(LongforgeError, match="unknown position transform 'yarn'"):
        PackedBatches(ds, 1, 1, 0, transform="yarn", target_length=512)


def test_run_trains_with_pit_position_ids(micro_recipe: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longforge.runner import run_recipe
    from longforge.train import batches

    micro_recipe["data"]["seq_len"] = 64
    micro_recipe["positions"]["transform"] = "pit"
    micro_recipe["eval"] = {"passkey": {"lengths": [64], "depths": 1, "trials": 1}, "models": ["final"]}
    micro_recipe["stages"][0].update(steps=2, save_every=2)
    seen: list[Any] = []
    real = batches.PackedBatches.batch

    def record(self: PackedBatches, step: int, micro: int) -> Any:
        out = real(self, step, micro)
        seen.append((self.sentence_ends, out))
        return out

    monkeypatch.setattr(batches.PackedBatches, "batch", record)
    run_recipe(parse_recipe(micro_recipe), tmp_path / "run")
    assert len(seen) == 3  # train_model reads step 0 once for the sequence length, then steps 0 and 1
    for ends, b in seen:
        assert ends is not None and ends.sum() >= 2
        assert b.position_ids.shape == (2, 64) and np.all(b.position_ids[:, -1].numpy() == 255)  # target 256
        assert np.all(np.diff(b.position_ids.numpy(), axis=1) >= 1)


def test_run_refuses_a_skip_transform_without_room(micro_recipe: dict, tmp_path: Path) -> None:
    from longforge.runner import run_recipe

    micro_recipe["data"]["seq_len"] = 512
    micro_recipe["positions"]["transform"] = "pose"
    with pytest.raises(LongforgeError, match="`data.seq_len` 512 is longer than `target_length` 256"):
        run_recipe(parse_recipe(micro_recipe), tmp_path / "run")
