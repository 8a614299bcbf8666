"""The data stage: sources with bad records, sampling plans, packing, the shard store and the loader."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from longforge.config import DataSpec, SourceSpec
from longforge.data.build import build_data
from longforge.data.pack import Packer
from longforge.data.sampling import bucket_name, copies, source_budgets
from longforge.data.sources import Rejects, iter_documents
from longforge.data.store import LoaderPlan, PackedDataset
from longforge.errors import LongforgeError


def _write_bad_jsonl(path: Path) -> None:
    lines = [
        json.dumps({"text": "a good document"}).encode(),
        b"{not json",
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "bad \xff byte"}',
        b"",
        json.dumps({"text": "another good one"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_bad_records_are_counted_and_kept_aside(tmp_path: Path) -> None:
    src = tmp_path / "s.jsonl"
    _write_bad_jsonl(src)
    rejects = Rejects(tmp_path / "rejects.jsonl")
    docs = list(iter_documents(SourceSpec(name="s", path=src), rejects))
    rejects.close()
    assert [d.text for d in docs] == ["a good document", "another good one"]
    assert docs[1].location.endswith("s.jsonl:8")
    assert rejects.summary() == {"s": {"empty document": 1, "field 'text' is not text": 1, "invalid UTF-8": 1,
                                       "malformed JSON": 1, "missing field 'text'": 1}}
    logged = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert {r["location"].rsplit(":", 1)[1] for r in logged} == {"2", "3", "4", "5", "6"}


def test_gzip_jsonl_and_text_folders(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"content": "zipped"}) + "\n")
    docs = list(iter_documents(SourceSpec(name="z", path=tmp_path / "a.jsonl.gz", text_field="content"), Rejects()))
    assert [d.text for d in docs] == ["zipped"]
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("first")
    (folder / "sub" / "two.md").write_text("second")
    (folder / "bin.dat").write_bytes(b"\xff\xfe\x00")
    rej = Rejects()
    docs = list(iter_documents(SourceSpec(name="t", path=folder), rej))
    assert sorted(d.text for d in docs) == ["first", "second"]
    assert rej.summary() == {"t": {"invalid UTF-8": 1}}


def test_missing_source_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LongforgeError, match="does not exist; fix `path`"):
        list(iter_documents(SourceSpec(name="gone", path=tmp_path / "x.jsonl"), Rejects()))


def test_packer_records_document_starts() -> None:
    p = Packer(8, suffix=[0])
    out = list(p.add([1, 2, 3])) + list(p.add([4, 5, 6, 7, 8, 9])) + list(p.add([10, 11]))
    assert out[0].tokens.tolist() == [1, 2, 3, 0, 4, 5, 6, 7]
    assert out[0].starts.tolist() == [0, 4]
    # The second sequence starts mid-document (offset 0 counts as a start) and holds the third document at 3.
    assert len(out) == 1 and p.pending_tokens == 6
    out += list(p.add([12, 13]))
    assert out[1].tokens.tolist() == [8, 9, 0, 10, 11, 0, 12, 13]
    assert out[1].starts.tolist() == [0, 3, 6]


def test_upsample_long_keeps_long_and_a_fraction_of_short() -> None:
    spec = DataSpec(sources=[SourceSpec(name="a", path=Path("."))], short_threshold=100, short_keep_prob=0.1)
    rng = np.random.default_rng(0)
    assert all(copies(500, spec, rng) == 1 for _ in range(100))
    kept = sum(copies(50, spec, rng) for _ in range(10000))
    assert 850 < kept < 1150
    spec2 = DataSpec(sources=[SourceSpec(name="a", path=Path("."))], plan="length_thresholds", short_threshold=100,
                     long_threshold=1000, long_repeat=3)
    assert copies(5000, spec2, rng) == 3 and copies(500, spec2, rng) == 1
    assert source_budgets([3, 1], 1000) == [750, 250]
    assert bucket_name(100) == "0-256" and bucket_name(3000) == "1K-4K" and bucket_name(1 << 20) == ">=256K"


def _spec(corpus_dir: Path, **kw) -> DataSpec:
    sources = [SourceSpec(name="long", path=corpus_dir / "long.jsonl", domain="web", weight=0.75),
               SourceSpec(name="short", path=corpus_dir / "short.jsonl", domain="chat", weight=0.25)]
    return DataSpec(sources=sources, short_threshold=64, **kw)


def test_build_data_writes_shards_manifest_and_is_deterministic(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    spec = _spec(corpus_dir, token_budget=4000, shard_sequences=5)
    m = build_data(spec, tokenizer_dir, 128, tmp_path / "a", seed=3)
    ds = PackedDataset(tmp_path / "a")
    assert len(ds) == m["sequences"] > 5  # more than one shard
    assert len(json.loads((tmp_path / "a" / "index.json").read_text())["shards"]) > 1
    tokens, starts = ds.get(len(ds) - 1)
    assert tokens.shape == (128,) and starts[0] == 0 and np.all(np.diff(starts) > 0)
    st = m["sources"]["long"]
    assert st["tokens_written"] <= 3000 + 5 and st["documents_dropped"] == 0
    assert m["sources"]["short"]["documents_dropped"] > 0  # short docs are mostly dropped by upsample_long
    assert set(m["domains"]) == {"web", "chat"}
    m2 = build_data(spec, tokenizer_dir, 128, tmp_path / "b", seed=3)
    assert m2["sequences"] == m["sequences"]
    for i in range(len(ds)):
        a, b = ds.get(i), PackedDataset(tmp_path / "b").get(i)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_build_data_too_little_text_is_a_clear_error(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LongforgeError, match="less than one sequence of seq_len 4096"):
        build_data(_spec(corpus_dir, token_budget=100), tokenizer_dir, 4096, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before any work
    with pytest.raises(LongforgeError, match="fewer than seq_len"):
        build_data(_spec(corpus_dir, short_keep_prob=0.0), tokenizer_dir, 1 << 20, tmp_path / "d")


def test_loader_plan_is_pure_and_covers_each_epoch() -> None:
    plan = LoaderPlan(num_sequences=10, global_batch=4, seed=7)
    assert np.array_equal(plan.indices(3), LoaderPlan(10, 4, 7).indices(3))
    first_epoch = np.concatenate([plan.indices(s) for s in range(2)] + [plan.indices(2)[:2]])
    assert sorted(first_epoch.tolist()) == list(range(10))  # no repeats, no gaps within an epoch
    ranks = [plan.rank_indices(5, r, 2) for r in range(2)]
    assert np.array_equal(np.concatenate(ranks), plan.indices(5))
    with pytest.raises(LongforgeError, match="not divisible by 3"):
        plan.rank_indices(0, 0, 3)


def test_long_short_mix_packs_long_and_short_data_apart_at_the_ratio(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    sources = [SourceSpec(name="long", path=corpus_dir / "long.jsonl", role="long"),
               SourceSpec(name="short", path=corpus_dir / "short.jsonl", role="short")]
    spec = DataSpec(sources=sources, plan="long_short_mix", long_share=0.75, token_budget=1600, separator="eos")
    m = build_data(spec, tokenizer_dir, 128, tmp_path / "mix")
    long, short = m["sources"]["long"], m["sources"]["short"]
    assert long["budget"] == 1200 and short["budget"] == 400
    assert long["dropped_by_reason"].get("long source, shorter than seq_len", 0) == long["documents_dropped"]
    assert short["documents_dropped"] == 0
    mx = m["mix"]
    assert mx["long_sequences"] + mx["short_sequences"] == m["sequences"]
    assert abs(mx["long_share"] - 0.75) < 0.1
    # Short data is packed apart from long data: a long-source sequence holds documents of >= 128 tokens only,
    # so it has at most 2 pieces; short sequences hold many documents.
    ds = PackedDataset(tmp_path / "mix")
    pieces = sorted(len(ds.get(i)[1]) for i in range(len(ds)))
    assert pieces[: mx["long_sequences"]][-1] <= 2 and pieces[-1] > 2


def test_replay_set_and_sentence_filter(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    spec = _spec(corpus_dir, plan="none", token_budget=3000,
                 sentence_filter={"keep_prob": 0.0, "budget_fraction": 0.4},
                 replay={"token_budget": 300, "seq_len": 32, "max_document_tokens": 64, "sources": ["short"]})
    m = build_data(spec, tokenizer_dir, 128, tmp_path / "r", seed=1)
    for st in m["sources"].values():
        assert st["tokens_removed_by_filter"] > 0
        assert st["tokens_written"] <= 0.4 * st["tokens_seen"] + 1
    r = m["replay"]
    assert r["keep_prob_from"] == "estimate" and 0 < r["keep_prob"] <= 1
    assert set(r["by_source"]) == {"short"} and r["tokens_written"] > 0
    rep = PackedDataset(tmp_path / "r" / "replay")
    assert rep.seq_len == 32 and len(rep) == r["sequences"] > 0
    assert rep.index["plan"] == "replay"


def test_sentence_filter_touches_only_the_sources_it_names(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    spec = _spec(corpus_dir, plan="none", token_budget=3000,
                 sentence_filter={"keep_prob": 0.0, "budget_fraction": 0.4, "sources": ["long"]})
    m = build_data(spec, tokenizer_dir, 128, tmp_path / "r", seed=1)
    assert m["sources"]["long"]["tokens_removed_by_filter"] > 0
    assert m["sources"]["short"]["tokens_removed_by_filter"] == 0
    with pytest.raises(ValueError, match="sentence_filter.sources names 'nope', which is not a source"):
        _spec(corpus_dir, sentence_filter={"sources": ["nope"]})


def test_an_impossible_budget_is_refused_before_any_work(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    spec = _spec(corpus_dir, token_budget=10_000_000)
    with pytest.raises(LongforgeError, match=r"source 'long' is asked for 7,500,000 tokens .* can give at most [\d,]+ under plan "
                                             r"upsample_long \(estimated from the whole source, tokenized\)"):
        build_data(spec, tokenizer_dir, 128, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_builds_are_byte_identical_and_bad_records_reach_the_manifest(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.jsonl"
    _write_bad_jsonl(bad)
    pq.write_table(pa.table({"text": ["parquet doc " * 20, None, ""]}), tmp_path / "p.parquet")
    sources = [SourceSpec(name="long", path=corpus_dir / "long.jsonl"), SourceSpec(name="bad", path=bad),
               SourceSpec(name="pq", path=tmp_path / "p.parquet"), SourceSpec(name="short", path=corpus_dir / "short.jsonl")]
    spec = DataSpec(sources=sources, plan="none", shard_sequences=3, batch_order="ssq")
    a = build_data(spec, tokenizer_dir, 64, tmp_path / "a", seed=2)
    build_data(spec, tokenizer_dir, 64, tmp_path / "b", seed=2)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        if name != "manifest.json":
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["rejects"]["bad"] == {"empty document": 1, "field 'text' is not text": 1, "invalid UTF-8": 1,
                                   "malformed JSON": 1, "missing field 'text'": 1}
    assert a["rejects"]["pq"] == {"empty document": 1, "missing field 'text'": 1}
    logged = [json.loads(x) for x in (tmp_path / "a" / "rejects.jsonl").read_text().splitlines()]
    assert len(logged) == 7 and {r["location"] for r in logged if r["source"] == "pq"} == {f"{tmp_path}/p.parquet:row 1", f"{tmp_path}/p.parquet:row 2"}
    assert json.loads((tmp_path / "a" / "index.json").read_text())["batch_order"] == "ssq"
    # Rebuilding into the same folder with bigger shards leaves no stale shard behind.
    build_data(spec.model_copy(update={"shard_sequences": 1000}), tokenizer_dir, 64, tmp_path / "a", seed=2)
    assert len(list((tmp_path / "a").glob("tokens-*.bin"))) == 1


def test_data_inspect_prints_tables_and_writes_a_histogram(corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from longforge.cli import app

    out = tmp_path / "d"
    res = CliRunner().invoke(app, ["data", "build", "--source", f"{corpus_dir / 'long.jsonl'},name=books,domain=books",
                                   "--source", f"{corpus_dir / 'short.jsonl'},name=web,role=short",
                                   "--tokenizer", str(tokenizer_dir), "--seq-len", "128", "--out", str(out),
                                   "--short-threshold", "64", "--replay-budget", "200", "--replay-seq-len", "32"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["data", "inspect", str(out)])
    assert res.exit_code == 0, res.output
    for text in ("books", "1K-4K", "short, not sampled", "replay set (replay/)"):
        assert text in res.output
    png = out / "length_histogram.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
