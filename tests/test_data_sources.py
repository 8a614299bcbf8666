"""Sources: every input format, repository grouping, and bad input counted with its location, never a crash."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longforge.config import SourceSpec
from longforge.data import sources
from longforge.data.sources import Document, Reject, Rejects, check_source, iter_documents, iter_items, source_format
from longforge.errors import LongforgeError


def _split(items: list) -> tuple[list[Document], list[Reject]]:
    return [i for i in items if isinstance(i, Document)], [i for i in items if isinstance(i, Reject)]


def test_zstd_jsonl_and_a_folder_of_jsonl_files(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")  # the `zstd` extra (in `dev`)

    folder = tmp_path / "shards"
    folder.mkdir()
    lines = "\n".join(json.dumps({"text": f"doc {i}"}) for i in range(3)) + "\n{broken\n"
    (folder / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    with gzip.open(folder / "a.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "first"}) + "\n")
    (folder / ".hidden.jsonl").write_text("{}\n")
    spec = SourceSpec(name="z", path=folder)
    assert source_format(spec) == "jsonl"
    docs, rej = _split(list(iter_items(spec)))
    assert [d.text for d in docs] == ["first", "doc 0", "doc 1", "doc 2"]  # files in name order, hidden ones skipped
    assert [(r.reason, r.location.rsplit("/", 1)[1]) for r in rej] == [("malformed JSON", "b.jsonl.zst:4")]


def test_truncated_gzip_is_an_unreadable_file_and_the_next_file_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    blob = gzip.compress(("\n".join(json.dumps({"text": "x" * 50 + str(i)}) for i in range(2000)) + "\n").encode())
    (folder / "a.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (folder / "b.jsonl").write_text(json.dumps({"text": "after"}) + "\n")
    docs, rej = _split(list(iter_items(SourceSpec(name="c", path=folder))))
    assert 0 < len(docs) < 2001 and docs[-1].text == "after"
    assert len(rej) == 1 and rej[0].reason == "unreadable file" and "a.jsonl.gz:" in rej[0].location


def _parquet(path: Path, rows: list[dict], row_group_size: int = 2, schema: pa.Schema | None = None) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_streams_rows_and_rejects_bad_ones(tmp_path: Path) -> None:
    schema = pa.schema([("content", pa.binary()), ("n", pa.int64())])
    rows = [{"content": b"alpha", "n": 1}, {"content": None, "n": 2}, {"content": b"  ", "n": 3},
            {"content": b"bad \xff", "n": 4}, {"content": "caf\u00e9".encode(), "n": 5}]
    _parquet(tmp_path / "t.parquet", rows, schema=schema)
    spec = SourceSpec(name="p", path=tmp_path / "t.parquet", text_field="content")
    docs, rej = _split(list(iter_items(spec)))
    assert [d.text for d in docs] == ["alpha", "caf\u00e9"]
    assert docs[1].location.endswith("t.parquet:row 4")
    assert [(r.reason, r.location.rsplit(":", 1)[1]) for r in rej] == [
        ("missing field 'content'", "row 1"), ("empty document", "row 2"), ("invalid UTF-8", "row 3")]


def test_parquet_without_the_field_is_one_clear_error_before_work(tmp_path: Path) -> None:
    _parquet(tmp_path / "t.parquet", [{"body": "x", "n": 1}])
    with pytest.raises(LongforgeError, match=r"has no column 'text' \(columns: body, n\); set `text_field`"):
        check_source(SourceSpec(name="p", path=tmp_path / "t.parquet"))
    with pytest.raises(LongforgeError, match="holds int64, not text"):
        check_source(SourceSpec(name="p", path=tmp_path / "t.parquet", text_field="n"))


def test_damaged_parquet_file_is_counted_and_the_folder_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    _parquet(folder / "a.parquet", [{"text": "one"}, {"text": "two"}])
    (folder / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    _parquet(folder / "c.parquet", [{"text": "three"}])
    rejects = Rejects()
    docs = list(iter_documents(SourceSpec(name="q", path=folder), rejects))
    assert [d.text for d in docs] == ["one", "two", "three"]
    assert rejects.summary() == {"q": {"unreadable file": 1}}


def _save_to_disk(folder: Path, rows: list[dict]) -> None:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream files listed in state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    half = len(rows) // 2
    names = []
    for k, part in enumerate((table.slice(0, half), table.slice(half))):
        name = f"data-{k:05d}-of-00002.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(part, max_chunksize=2)
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_split": "train"}))
    (folder / "dataset_info.json").write_text("{}")


def test_hugging_face_dataset_saved_to_disk(tmp_path: Path) -> None:
    root = tmp_path / "dd"
    _save_to_disk(root / "train", [{"text": f"t{i}", "repo": "r"} for i in range(5)])
    _save_to_disk(root / "validation", [{"text": "v0", "repo": "r"}, {"text": "v1", "repo": "r"}])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    spec = SourceSpec(name="hf", path=root)
    assert source_format(spec) == "hf_disk"
    docs, rej = _split(list(iter_items(spec)))
    assert [d.text for d in docs] == ["t0", "t1", "t2", "t3", "t4", "v0", "v1"] and not rej
    assert docs[3].location.endswith("train/data-00001-of-00002.arrow:row 1")
    one = list(iter_items(SourceSpec(name="hf", path=root / "validation")))
    assert [d.text for d in one] == ["v0", "v1"]


def test_group_by_joins_a_repository_into_one_document(tmp_path: Path) -> None:
    rows = [{"text": "a.py", "repo": "x"}, {"text": "b.py", "repo": "x"}, {"text": "c.py", "repo": "y"},
            {"text": "d.py", "repo": None}, {"text": "e.py", "repo": "x"}]
    _parquet(tmp_path / "code.parquet", rows)
    spec = SourceSpec(name="code", path=tmp_path / "code.parquet", group_by="repo", group_joiner="\n#\n")
    docs, _ = _split(list(iter_items(spec)))
    assert [d.text for d in docs] == ["a.py\n#\nb.py", "c.py", "d.py", "e.py"]
    assert [d.records for d in docs] == [2, 1, 1, 1]
    # Repository x comes back after y: still joined only with its neighbours, and flagged so the manifest counts it.
    assert [d.piece for d in docs] == [False, False, False, True]
    assert "(group 'x', 2 records)" in docs[0].location
    with pytest.raises(LongforgeError, match="no column 'repository'"):
        check_source(SourceSpec(name="code", path=tmp_path / "code.parquet", group_by="repository"))


def test_group_by_in_jsonl_and_a_group_larger_than_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 10)
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"text": t, "meta": {"repo": "r"}}) + "\n" for t in ("aaaa", "bbbb", "cccc")))
    docs, _ = _split(list(iter_items(SourceSpec(name="r", path=path, group_by="meta", group_joiner=""))))
    assert [d.text for d in docs] == ["aaaabbbb", "cccc"] and [d.piece for d in docs] == [False, True]


def test_big_text_file_is_read_in_pieces_cut_at_line_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 16)
    (tmp_path / "big.txt").write_text("line one\nline two\nline three\nend")
    docs, _ = _split(list(iter_items(SourceSpec(name="t", path=tmp_path / "big.txt"))))
    assert "".join(d.text for d in docs) == "line one\nline two\nline three\nend"
    assert all(d.text.endswith("\n") for d in docs[:-1]) and all(d.piece for d in docs)
    assert docs[1].location.endswith("big.txt@9")


def test_missing_and_empty_sources_fail_before_work(tmp_path: Path) -> None:
    with pytest.raises(LongforgeError, match="does not exist; fix `path`"):
        check_source(SourceSpec(name="gone", path=tmp_path / "nope.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongforgeError, match="has no files"):
        check_source(SourceSpec(name="e", path=tmp_path / "empty"))
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "readme.txt").write_text("x")
    with pytest.raises(LongforgeError, match="has no JSONL files"):
        check_source(SourceSpec(name="j", path=tmp_path / "j", format="jsonl"))
    with pytest.raises(LongforgeError, match="`group_by` needs records"):
        check_source(SourceSpec(name="j", path=tmp_path / "j", group_by="repo"))
