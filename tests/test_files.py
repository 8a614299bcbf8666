"""Atomic writes, owned folders, locks and content stamps (longforge/files.py)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from longforge.errors import LongforgeError
from longforge.files import (
    OWNER_MARK,
    FolderLock,
    atomic_write_json,
    claim_dir,
    clear_dir,
    content_stamp,
    is_inside,
    read_json,
    remove_dir,
    safe_name,
)


@pytest.mark.parametrize("name", ["../../victim", "..", "a/b", "/abs", ".hidden", "", "x" * 101, "a..b"])
def test_safe_name_refuses_names_that_leave_their_folder(name: str) -> None:
    with pytest.raises(ValueError, match="folder name"):
        safe_name(name, "stage name")


def test_safe_name_keeps_ordinary_names() -> None:
    for name in ("extend", "stage-2", "sft_short", "v1.5"):
        assert safe_name(name, "stage name") == name


def test_is_inside(tmp_path: Path) -> None:
    assert is_inside(tmp_path / "a" / "b", tmp_path)
    assert not is_inside(tmp_path / "a" / ".." / ".." / "x", tmp_path)


def test_damaged_marker_reads_as_missing(tmp_path: Path) -> None:
    f = tmp_path / "DONE.json"
    f.write_text("")
    assert read_json(f) is None
    f.write_text('{"fingerprint": "ab')
    assert read_json(f) is None
    atomic_write_json(f, {"fingerprint": "ab"})
    assert read_json(f) == {"fingerprint": "ab"}
    assert [p.name for p in tmp_path.iterdir()] == ["DONE.json"]  # no temp file left behind


def test_claim_refuses_a_folder_of_user_files_and_clear_keeps_them(tmp_path: Path) -> None:
    user = tmp_path / "data"
    user.mkdir()
    (user / "corpus.jsonl").write_text('{"text": "mine"}\n')
    with pytest.raises(LongforgeError, match="corpus.jsonl"):
        clear_dir(user, "stage folder")
    assert (user / "corpus.jsonl").read_text() == '{"text": "mine"}\n'
    with pytest.raises(LongforgeError, match="not created by longforge"):
        remove_dir(user, "run folder")
    assert (user / "corpus.jsonl").is_file()


def test_claimed_folder_can_be_cleared_and_removed(tmp_path: Path) -> None:
    d = claim_dir(tmp_path / "new" / "stage", "stage folder")
    assert (d / OWNER_MARK).is_file()
    (d / "sub").mkdir()
    (d / "sub" / "x").write_text("1")
    (d / "y").write_text("2")
    clear_dir(d, "stage folder")
    assert sorted(p.name for p in d.iterdir()) == [OWNER_MARK]
    remove_dir(d, "stage folder")
    assert not d.exists()


def test_empty_folder_is_adopted_and_legacy_output_recognised(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (claim_dir(empty, "out") / OWNER_MARK).is_file()
    old = tmp_path / "old"
    old.mkdir()
    (old / "DONE.json").write_text("{}")
    claim_dir(old, "out", ours=lambda f: (f / "DONE.json").is_file())
    assert (old / OWNER_MARK).is_file()


def _hold(folder: str, ready: mp.Event, stop: mp.Event) -> None:  # type: ignore[valid-type]
    with FolderLock(Path(folder), "run folder"):
        ready.set()
        stop.wait(30)


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_frees_the_lock(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path), ready, stop))
    p.start()
    assert ready.wait(60)
    with pytest.raises(LongforgeError, match=rf"in use by pid {p.pid} on"):
        FolderLock(tmp_path, "run folder").acquire()
    p.kill()  # a crash: the OS frees the lock
    p.join()
    with FolderLock(tmp_path, "run folder"):
        pass


def test_lock_is_released_on_exit(tmp_path: Path) -> None:
    with FolderLock(tmp_path, "data folder"):
        pass
    with FolderLock(tmp_path, "data folder"):
        pass


def test_content_stamp_sees_a_rewrite_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 5_000_000)
    st = f.stat()
    before = content_stamp(f)
    with f.open("r+b") as fh:  # one byte changed inside the last sampled block
        fh.seek(5_000_000 - 10)
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_stamp(f) != before
    assert content_stamp(f) == content_stamp(f)


def test_content_stamp_of_a_folder_sees_added_and_edited_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one")
    s1 = content_stamp(tmp_path)
    time.sleep(0.01)
    (tmp_path / "b.txt").write_text("two")
    s2 = content_stamp(tmp_path)
    assert s1 != s2
    (tmp_path / ".hidden").write_text("ignored")
    assert content_stamp(tmp_path) == s2
    many = tmp_path / "many"
    many.mkdir()
    for i in range(10):
        (many / f"{i}.txt").write_text(str(i))
    stamp = content_stamp(many, max_hashed=3)
    assert sum(1 for row in stamp[1:] if row[3] is not None) <= 4
