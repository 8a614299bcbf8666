"""Data folders that are whole, checked against the model, locked while written and resumable after an interruption."""

from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from longforge.cli import app
from longforge.config import DataSpec, SourceSpec, parse_recipe
from longforge.data import build, pipeline, sources
from longforge.data.build import build_data
from longforge.data.pack import Packed
from longforge.data.sources import Document, Reject, iter_items
from longforge.data.store import PackedDataset, ShardWriter
from longforge.data.verify import check_data_for_model, verify_folder
from longforge.errors import LongforgeError
from longforge.train.batches import PackedBatches

from conftest import random_text

TIMINGS = ("seconds", "cpu_seconds", "tokens_per_second")


def _store(root: Path, n: int = 23, seq_len: int = 16, shard: int = 5, vocab: int = 1000) -> Path:
    rng = np.random.default_rng(0)
    w = ShardWriter(root, seq_len, vocab_size=vocab, shard_sequences=shard)
    for _ in range(n):
        starts = np.unique(np.r_[0, rng.integers(1, seq_len, rng.integers(0, 4))]).astype(np.int32)
        w.add(Packed(rng.integers(0, vocab, seq_len), starts))
    w.close()
    return root


def _edit_index(root: Path, fn) -> None:  # noqa: ANN001
    index = json.loads((root / "index.json").read_text())
    fn(index)
    (root / "index.json").write_text(json.dumps(index))


def _said(res) -> str:  # noqa: ANN001
    """A command's output with rich's wrapping and table borders taken out."""
    return " ".join(res.output.replace("│", " ").split())


def _flip(path: Path, at: int, mask: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- whole folders


def test_an_index_listing_part_of_the_shards_is_refused(tmp_path: Path) -> None:
    root = _store(tmp_path / "d")
    assert len(PackedDataset(root)) == 23

    def drop_last(index: dict) -> None:  # the "index.json listing 4 of 9 shards", counts adjusted to match
        index["num_sequences"] -= index["shards"].pop()["num_sequences"]

    _edit_index(root, drop_last)
    with pytest.raises(LongforgeError, match=r"lists 4 token shards but the folder also holds tokens-00004.bin, so it "
                                             r"would train on part of the data"):
        PackedDataset(root)

    other = _store(tmp_path / "e")
    shutil.copy(other / "tokens-00001.bin", other / "tokens-00007.bin")  # a stray shard of another build
    with pytest.raises(LongforgeError, match="also holds tokens-00007.bin"):
        PackedDataset(other)


def test_num_sequences_that_do_not_add_up_are_refused(tmp_path: Path) -> None:
    root = _store(tmp_path / "d")
    _edit_index(root, lambda index: index.update(num_sequences=30))
    with pytest.raises(LongforgeError, match=r"its shards hold 23 sequences but index.json says num_sequences=30"):
        PackedDataset(root)
    _edit_index(root, lambda index: index.update(num_sequences=23))
    _edit_index(root, lambda index: index["shards"][1].update(num_sequences=4))
    with pytest.raises(LongforgeError, match="not whole|missing or damaged"):
        PackedDataset(root)


def test_a_shard_of_another_size_than_recorded_is_refused_on_load(tmp_path: Path) -> None:
    root = _store(tmp_path / "d")
    np.save(root / "costs-00002.npy", np.zeros(6, dtype=np.int64))  # one cost too many: a file of another size
    with pytest.raises(LongforgeError, match=r"missing or damaged \(costs-00002.npy holds \d+ bytes, not the \d+ recorded\)"):
        PackedDataset(root)


DAMAGED_INDEXES = {
    "cut short": b'{"seq_len": 16, "shar',
    "not an object": b"[1, 2]",
    "not text": b"\xff\xfe",
    "empty object": b"{}",
    "a shard outside the folder": json.dumps({"format": 3, "seq_len": 16, "dtype": "uint16", "num_sequences": 1, "shards": [
        {"tokens": "../../etc/passwd", "starts": "s", "offsets": "o", "costs": "c", "num_sequences": 1}]}).encode(),
}


@pytest.mark.parametrize("content", DAMAGED_INDEXES.values(), ids=DAMAGED_INDEXES.keys())
def test_a_damaged_index_is_one_sentence(tmp_path: Path, content: bytes) -> None:
    root = _store(tmp_path / "d")
    (root / "index.json").write_bytes(content)
    with pytest.raises(LongforgeError, match=r"index.json is damaged \(.*\); rebuild the folder with `longforge data build`"):
        PackedDataset(root)
    res = CliRunner().invoke(app, ["data", "verify", str(root)])
    assert res.exit_code == 1 and isinstance(res.exception, LongforgeError)  # main() prints it as one line, exit 2


def test_data_verify_finds_a_flipped_byte(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    spec = DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl"),
                             SourceSpec(name="short", path=corpus_dir / "short.jsonl")], plan="none", shard_sequences=8,
                    token_budget=4000, replay={"token_budget": 300, "seq_len": 32, "sources": ["short"]})
    build_data(spec, tokenizer_dir, 64, out)
    res = CliRunner().invoke(app, ["data", "verify", str(out)])
    assert res.exit_code == 0, res.output
    assert f"{out}: every shard is whole" in _said(res) and f"{out / 'replay'}: every shard is whole" in _said(res)
    _flip(out / "tokens-00001.bin", 40)  # the low bit of a token id: still a valid id, so only the checksum sees it
    _flip(out / "replay" / "starts-00000.npy", -4)
    assert len(PackedDataset(out)) > 0  # the fast path cannot see a flipped bit; verify does
    res = CliRunner().invoke(app, ["data", "verify", str(out)])
    assert res.exit_code == 1 and isinstance(res.exception, LongforgeError)
    assert "tokens-00001.bin 8 damaged: tokens-00001.bin does not match its checksum" in _said(res)
    assert "damaged: starts-00000.npy does not match its checksum" in _said(res)
    assert "damaged data" in str(res.exception) and "1 of" in str(res.exception)
    rep = verify_folder(out)
    assert [s.name for s in rep.shards if not s.ok] == ["tokens-00001.bin"]
    assert not verify_folder(out / "replay").ok


def test_data_verify_checks_ids_and_starts_without_checksums(tmp_path: Path) -> None:
    root = _store(tmp_path / "d", vocab=300)

    def as_format_2(index: dict) -> None:  # what longforge wrote before checksums
        index["format"] = 2
        for s in index["shards"]:
            for key in ("bytes", "blake2b", "max_token"):
                s.pop(key)

    _edit_index(root, as_format_2)
    assert len(PackedDataset(root)) == 23
    res = CliRunner().invoke(app, ["data", "verify", str(root)])
    assert res.exit_code == 0, res.output
    assert f"{root} has no checksums (written by an older longforge, format 2)" in _said(res)
    tokens = np.memmap(root / "tokens-00002.bin", dtype=np.uint16, mode="r+")
    tokens[3] = 300  # one past the vocabulary
    tokens.flush()
    del tokens
    np.save(root / "starts-00004.npy", np.load(root / "starts-00004.npy")[::-1].copy())  # same size, not rising
    rep = verify_folder(root)
    assert [(s.name, s.problems) for s in rep.shards if not s.ok] == [
        ("tokens-00002.bin", ["tokens-00002.bin holds token id 300, beyond the vocabulary of 300"]),
        ("tokens-00004.bin", ["starts-00004.npy holds document starts that are not rising from 0 below seq_len 16"])]


# ---------------------------------------------------------------- data against the model


def _train_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["train", str(model), "--data", str(data), "--out", str(out), "--steps", "1", "--device", "cpu",
            "--save-every", "1"]


def test_token_ids_beyond_the_model_vocabulary_are_refused_before_training(corpus_dir: Path, tokenizer_dir: Path,
                                                                           tmp_path: Path, one_thread) -> None:  # noqa: ANN001
    from conftest import make_tiny_model

    data = tmp_path / "d"
    build_data(DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none", token_budget=2000),
               tokenizer_dir, 64, data)
    small = tmp_path / "small"
    make_tiny_model(100).save_pretrained(small)  # 100 token embeddings; the data's ids go up to 299
    with pytest.raises(LongforgeError, match=r"vocabulary of 300 tokens, but model .*small has 100 token embeddings"):
        check_data_for_model(data, small)
    res = CliRunner().invoke(app, _train_args(small, data, tmp_path / "t"))
    assert isinstance(res.exception, LongforgeError) and "100 token embeddings" in str(res.exception)
    assert not (tmp_path / "t" / "checkpoints").exists()  # refused before any step

    # An id past the vocabulary in the shards (a flipped high bit): one sentence at the batch, not an IndexError.
    model = tmp_path / "model"
    make_tiny_model(300).save_pretrained(model)
    tokens = np.memmap(data / "tokens-00000.bin", dtype=np.uint16, mode="r+").reshape(-1, 64)
    tokens[:, 5] = 5000  # in every sequence, so the first batch holds one
    tokens.flush()
    del tokens
    res = CliRunner().invoke(app, _train_args(model, data, tmp_path / "t2"))
    assert isinstance(res.exception, LongforgeError), res.exception
    assert "holds token id 5000, outside its vocabulary of 300" in str(res.exception)


def test_data_built_with_another_tokenizer_is_refused_before_training(corpus_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    from longforge.demo.tokenizer import train_tokenizer

    rng = random.Random(7)
    other = tmp_path / "other-tok"
    train_tokenizer([random_text(rng, 200)[::-1] for _ in range(50)], 300, other, model_max_length=4096)  # same size
    data = tmp_path / "d"
    build_data(DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none", token_budget=2000),
               other, 64, data)
    assert json.loads((data / "index.json").read_text())["vocab_size"] == 300
    with pytest.raises(LongforgeError, match=r"built with the tokenizer of .*other-tok, whose vocabulary differs from model"):
        check_data_for_model(data, model_dir)
    res = CliRunner().invoke(app, _train_args(model_dir, data, tmp_path / "t"))
    assert isinstance(res.exception, LongforgeError) and "whose vocabulary differs" in str(res.exception)


def test_a_recipe_whose_data_tokenizer_differs_from_the_model_stops_before_training(micro_recipe: dict, tmp_path: Path) -> None:
    from longforge.demo.tokenizer import train_tokenizer
    from longforge.runner import run_recipe

    rng = random.Random(7)
    other = tmp_path / "other-tok"
    train_tokenizer([random_text(rng, 200)[::-1] for _ in range(50)], 300, other, model_max_length=4096)
    micro_recipe["data"]["tokenizer"] = str(other)
    with pytest.raises(LongforgeError, match="whose vocabulary differs"):
        run_recipe(parse_recipe(micro_recipe), tmp_path / "run")
    assert not (tmp_path / "run" / "train" / "extend" / "checkpoints").exists()


def test_data_of_the_models_own_tokenizer_passes(corpus_dir: Path, tokenizer_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "d"
    build_data(DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none", token_budget=2000),
               tokenizer_dir, 64, data)
    ds = check_data_for_model(data, model_dir)
    batch = PackedBatches(ds, 2, 1, seed=0).batch(0, 0)
    assert int(batch.input_ids.max()) < 300


# ---------------------------------------------------------------- UTF-8 boundaries


@pytest.mark.parametrize("limit", [13, 14, 15, 16, 17])
def test_a_huge_line_without_newline_is_cut_between_characters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               limit: int) -> None:
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", limit)
    text = "ab\u00e9\u20ac\U0001f600c" * 6  # 1-, 2-, 3- and 4-byte characters: every limit cuts inside one somewhere
    (tmp_path / "one-line.txt").write_text(text, encoding="utf-8")
    items = list(iter_items(SourceSpec(name="t", path=tmp_path / "one-line.txt")))
    assert not [i for i in items if isinstance(i, Reject)], [i for i in items if isinstance(i, Reject)]
    docs = [i for i in items if isinstance(i, Document)]
    assert "".join(d.text for d in docs) == text
    assert all(len(d.text.encode()) <= limit for d in docs) and len(docs) > 1
    offsets = [int(d.location.rsplit("@", 1)[1]) for d in docs]
    assert offsets == list(np.cumsum([0] + [len(d.text.encode()) for d in docs[:-1]]))


def test_invalid_utf8_in_a_huge_line_is_still_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 16)
    (tmp_path / "bad.txt").write_bytes(b"good text here, " + b"bad \xff byte" + b" more good text")
    items = list(iter_items(SourceSpec(name="t", path=tmp_path / "bad.txt")))
    assert [i.reason for i in items if isinstance(i, Reject)] == ["invalid UTF-8"]


# ---------------------------------------------------------------- one writer per folder


def test_two_builds_into_one_folder_the_second_is_refused(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "d"
    inside, go_on = threading.Event(), threading.Event()
    real_run = build._Build.run

    def slow_run(self) -> None:  # noqa: ANN001 - the first build pauses while it holds the folder
        inside.set()
        go_on.wait(30)
        real_run(self)

    monkeypatch.setattr(build._Build, "run", slow_run)
    first_spec = DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none", token_budget=2000)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            build_data(first_spec, tokenizer_dir, 64, out)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(30)
    monkeypatch.setattr(build._Build, "run", real_run)
    second = DataSpec(sources=[SourceSpec(name="short", path=corpus_dir / "short.jsonl")], plan="none")
    with pytest.raises(LongforgeError, match=r"data folder .*/d is in use by pid \d+ on .* since .*; wait for it to finish"):
        build_data(second, tokenizer_dir, 64, out)
    go_on.set()
    t.join(60)
    assert not errors
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["sources"]) == ["long"] and verify_folder(out).ok  # only the first corpus, whole


def test_a_folder_of_user_files_is_never_built_into(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "index.json").write_text("{}")  # a data-looking name among them does not make the folder longforge's
    spec = DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none", token_budget=2000)
    with pytest.raises(LongforgeError, match=r"already holds files longforge did not write \(index.json, notes.txt\)"):
        build_data(spec, tokenizer_dir, 64, out)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "index.json").read_text() == "{}"
    old = tmp_path / "old"  # a folder written by an older longforge (no mark) is recognised and rebuilt
    shutil.copytree(_store(tmp_path / "s"), old)
    build_data(spec, tokenizer_dir, 64, old)
    assert verify_folder(old).ok


# ---------------------------------------------------------------- resuming an interrupted build


class _Stop(Exception):
    """Stands for a crash after a shard."""


def _resume_corpus(root: Path) -> list[SourceSpec]:
    rng = random.Random(3)
    root.mkdir()
    with (root / "long.jsonl").open("w") as fh:
        for i in range(30):
            fh.write(json.dumps({"text": random_text(rng, rng.randint(100, 600))}) + "\n")
            if i % 7 == 3:
                fh.write("{broken json\n")
    with (root / "short.jsonl").open("w") as fh:
        for _ in range(120):
            fh.write(json.dumps({"text": random_text(rng, rng.randint(5, 60))}) + "\n")
    return [SourceSpec(name="long", path=root / "long.jsonl", weight=0.7),
            SourceSpec(name="short", path=root / "short.jsonl", weight=0.3)]


def _spec(srcs: list[SourceSpec], **kw) -> DataSpec:
    base = dict(sources=srcs, plan="length_thresholds", short_threshold=40, short_keep_prob=0.5, long_threshold=300,
                long_repeat=1.5, token_budget=12000, shard_sequences=6,
                sentence_filter={"keep_prob": 0.5, "budget_fraction": 0.8, "sources": ["long"]},
                replay={"token_budget": 800, "seq_len": 16, "max_document_tokens": 64})
    return DataSpec(**{**base, **kw})


def _same_folder(a: Path, b: Path) -> None:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert "build-state.json" not in names
    for name in names:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if name.endswith("manifest.json"):
            mx, my = json.loads(x), json.loads(y)
            for k in TIMINGS:
                mx.pop(k), my.pop(k)
            assert mx == my
        else:
            assert x == y, name


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    real = build._Build._save_state
    calls = []

    def save_then_stop(self) -> None:  # noqa: ANN001
        real(self)
        calls.append(1)
        if len(calls) == k:
            raise _Stop()

    monkeypatch.setattr(build._Build, "_save_state", save_then_stop)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of a few KB, so a small corpus is read in many batches and written in many shards."""
    monkeypatch.setattr(pipeline, "FIRST_BATCH_BYTES", 512)
    monkeypatch.setattr(pipeline, "BATCH_BYTES", 2048)


@pytest.mark.parametrize(("plan", "k"), [("length_thresholds", 1), ("length_thresholds", 2), ("length_thresholds", 5),
                                         ("length_thresholds", 9), ("long_short_mix", 3)])
def test_an_interrupted_build_resumes_to_an_identical_folder(tokenizer_dir: Path, tmp_path: Path, small_batches: None,
                                                             monkeypatch: pytest.MonkeyPatch, plan: str, k: int) -> None:
    srcs = _resume_corpus(tmp_path / "corpus")
    if plan == "long_short_mix":  # two packers, and every source read to its end (no budget)
        srcs = [srcs[0].model_copy(update={"role": "long"}), srcs[1].model_copy(update={"role": "short"})]
        spec = _spec(srcs, plan=plan, token_budget=None)
    else:
        spec = _spec(srcs)
    whole = build_data(spec, tokenizer_dir, 64, tmp_path / "whole", seed=4)
    assert len(json.loads((tmp_path / "whole" / "index.json").read_text())["shards"]) > 10
    assert whole["rejects"] and whole["replay"]["sequences"] > 6

    out = tmp_path / "cut"
    real = build._Build._save_state
    _interrupt_after(monkeypatch, k)
    with pytest.raises(_Stop):
        build_data(spec, tokenizer_dir, 64, out, seed=4)
    monkeypatch.setattr(build._Build, "_save_state", real)
    assert (out / "build-state.json").is_file() and not (out / "index.json").exists()
    first = (out / "tokens-00000.bin").stat()
    real_resumed, resumed = build._resumed, []

    def spy(*args):  # noqa: ANN002, ANN202
        resumed.append(real_resumed(*args))
        return resumed[-1]

    monkeypatch.setattr(build, "_resumed", spy)
    build_data(spec, tokenizer_dir, 64, out, seed=4)
    assert resumed[0] is not None  # it continued, and did not write the first shard again
    assert (out / "tokens-00000.bin").stat().st_mtime_ns == first.st_mtime_ns
    _same_folder(tmp_path / "whole", out)
    assert verify_folder(out).ok and verify_folder(out / "replay").ok



def test_a_build_killed_after_a_shard_resumes_to_an_identical_folder(tokenizer_dir: Path, tmp_path: Path,
                                                                    small_batches: None) -> None:
    """A real crash: the process ends at once (no cleanup, buffers unwritten), like kill -9."""
    import subprocess
    import sys

    spec = _spec(_resume_corpus(tmp_path / "corpus"))
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    script = (
        "import os, sys; from pathlib import Path\n"
        "from longforge.config import DataSpec\n"
        "from longforge.data import build, pipeline\n"
        "pipeline.FIRST_BATCH_BYTES, pipeline.BATCH_BYTES = 512, 2048\n"
        "real, calls = build._Build._save_state, []\n"
        "def crash(self):\n"
        "    real(self); calls.append(1)\n"
        "    if len(calls) == 4: os._exit(9)\n"
        "build._Build._save_state = crash\n"
        "spec = DataSpec.model_validate_json(Path(sys.argv[1]).read_text())\n"
        "build.build_data(spec, Path(sys.argv[2]), 64, Path(sys.argv[3]), seed=4)\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(build.__file__).parents[2])}
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "spec.json"), str(tokenizer_dir), str(tmp_path / "cut")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 9, res.stderr
    assert (tmp_path / "cut" / "build-state.json").is_file()
    first = (tmp_path / "cut" / "tokens-00000.bin").stat().st_mtime_ns
    build_data(spec, tokenizer_dir, 64, tmp_path / "cut", seed=4)
    assert (tmp_path / "cut" / "tokens-00000.bin").stat().st_mtime_ns == first  # continued, not started again
    build_data(spec, tokenizer_dir, 64, tmp_path / "whole", seed=4)
    _same_folder(tmp_path / "whole", tmp_path / "cut")


def test_an_interrupted_build_with_other_settings_starts_afresh(tokenizer_dir: Path, tmp_path: Path, small_batches: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(_resume_corpus(tmp_path / "corpus"))
    out = tmp_path / "cut"
    real = build._Build._save_state
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(_Stop):
        build_data(spec, tokenizer_dir, 64, out, seed=4)
    monkeypatch.setattr(build._Build, "_save_state", real)
    other = spec.model_copy(update={"shard_sequences": 7})
    build_data(other, tokenizer_dir, 64, out, seed=5)
    build_data(other, tokenizer_dir, 64, tmp_path / "fresh", seed=5)
    _same_folder(tmp_path / "fresh", out)

    # A damaged record of the interrupted build is not trusted either: the build starts afresh.
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(_Stop):
        build_data(spec, tokenizer_dir, 64, out, seed=4)
    monkeypatch.setattr(build._Build, "_save_state", real)
    (out / "build-state.json").write_text('{"version": 1, "fingerp')
    build_data(spec, tokenizer_dir, 64, out, seed=4)
    build_data(spec, tokenizer_dir, 64, tmp_path / "fresh4", seed=4)
    _same_folder(tmp_path / "fresh4", out)


def test_a_changed_source_is_not_resumed(tokenizer_dir: Path, tmp_path: Path, small_batches: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    srcs = _resume_corpus(tmp_path / "corpus")
    spec = _spec(srcs)
    out = tmp_path / "cut"
    real = build._Build._save_state
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(_Stop):
        build_data(spec, tokenizer_dir, 64, out, seed=4)
    monkeypatch.setattr(build._Build, "_save_state", real)
    lines = (tmp_path / "corpus" / "long.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "corpus" / "long.jsonl").write_text("".join(lines[1:]))  # the first record removed: positions shift
    build_data(spec, tokenizer_dir, 64, out, seed=4)
    build_data(spec, tokenizer_dir, 64, tmp_path / "fresh", seed=4)
    _same_folder(tmp_path / "fresh", out)


# ---------------------------------------------------------------- what a budget leaves unread


def test_the_summary_says_where_a_budget_stopped_reading(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    from longforge.data.report import summary_lines

    src = tmp_path / "s.jsonl"
    lines = [json.dumps({"text": random_text(random.Random(i), 300)}) for i in range(400)] + ["{broken"]
    src.write_text("\n".join(lines) + "\n")
    spec = DataSpec(sources=[SourceSpec(name="s", path=src)], plan="none", token_budget=3000)
    m = build_data(spec, tokenizer_dir, 64, tmp_path / "d")
    st = m["sources"]["s"]
    assert st["budget_full_at"].startswith(f"{src}:") and 0 < st["records_read"] < 401
    assert not m["rejects"]  # the broken record at the end was never read
    text = " ".join(summary_lines(m))
    assert f"s: reading stopped at {st['budget_full_at']} after {st['records_read']:,} records, as its budget was full; " \
           "records after it were not read, so not checked" in text
    unbudgeted = build_data(spec.model_copy(update={"token_budget": None}), tokenizer_dir, 64, tmp_path / "e")
    assert unbudgeted["sources"]["s"]["budget_full_at"] is None and unbudgeted["rejects"] == {"s": {"malformed JSON": 1}}
    assert unbudgeted["sources"]["s"]["records_read"] == 401


def test_data_verify_reads_format_1_folders(tmp_path: Path) -> None:
    toks = np.arange(24, dtype=np.uint16).reshape(3, 8)
    np.save(tmp_path / "tokens-00000.npy", toks)
    np.save(tmp_path / "starts-00000.npy", np.array([0, 0, 4, 0], dtype=np.int32))
    np.save(tmp_path / "offsets-00000.npy", np.array([0, 1, 3, 4]))
    (tmp_path / "index.json").write_text(json.dumps({"format": 1, "seq_len": 8, "dtype": "uint16", "num_sequences": 3,
                                                     "shards": [{"tokens": "tokens-00000.npy", "starts": "starts-00000.npy",
                                                                 "offsets": "offsets-00000.npy", "num_sequences": 3}]}))
    rep = verify_folder(tmp_path)
    assert rep.ok and not rep.checksums and rep.notes
    np.save(tmp_path / "tokens-00000.npy", toks[:2])
    assert verify_folder(tmp_path).shards[0].problems == ["tokens-00000.npy holds an array of shape (2, 8), not (3, 8)"]
