"""Files longforge writes: atomic writes, markers that survive damage, folders it owns, locks and content stamps."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from longforge.errors import LongforgeError

# A folder longforge created holds this file; only such folders are ever cleared or removed.
OWNER_MARK = ".longforge"
LOCK_FILE = ".longforge.lock"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Content stamps read at most this much of one file: the whole file when smaller, else evenly spaced blocks.
STAMP_BLOCK = 64 << 10
STAMP_BLOCKS = 16
# Folders with more files than this hash the content of an evenly spaced subset (every file is still stat-ed).
STAMP_MAX_HASHED_FILES = 1024
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def safe_name(name: str, what: str) -> str:
    """Refuse a name that would be used as a path but could leave its folder ('..', '/', hidden or empty)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is used as a folder name: use letters, digits, '.', '_' and '-' "
                         "(at most 100, starting with a letter or digit, no '..')")
    return name


def is_inside(path: Path, root: Path) -> bool:
    """Whether `path` is `root` or lies under it, after resolving links and '..'."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def disk_error(e: OSError, path: Path | str) -> LongforgeError:
    """One sentence for an OSError met while writing `path` (disk full, no permission, other)."""
    if e.errno in _FULL_DISK:
        return LongforgeError(f"the disk is full while writing {path}; free space there (or choose another folder) "
                              "and run the same command again to resume.")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LongforgeError(f"no permission to write {path}; choose a folder you can write to.")
    return LongforgeError(f"could not write {path}: {e.strerror or e}; check the folder and run again.")


# How writers that do not raise OSError report a full disk: safetensors (Rust) names the OS error in its text;
# PyTorch's zip writer (torch.save, torch.distributed.checkpoint) says only that a write came up short.
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
_TORCH_WRITER_TEXT = ("unexpected pos", "pytorchstreamwriter failed", "file write failed")
# Below this much free space, a short write is taken for a full disk.
FULL_MARGIN = 16 << 20


def free_space(path: Path | str) -> int | None:
    """Bytes an ordinary user may still write on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    for q in (p, *p.parents):
        try:
            st = os.statvfs(q)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def full_disk_error(e: BaseException, path: Path | str) -> LongforgeError | None:
    """The disk-full sentence when `e` is a write that failed for lack of space (whichever library wrote), else None."""
    if isinstance(e, OSError) and e.errno in _FULL_DISK:
        return disk_error(e, path)
    if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, LongforgeError)):
        return None
    text = str(e).lower()
    if any(t in text for t in _NO_SPACE_TEXT):
        return disk_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)
    if any(t in text for t in _TORCH_WRITER_TEXT):
        free = free_space(path)
        if free is not None and free < FULL_MARGIN:
            return disk_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)
        said = next(ln.strip() for ln in str(e).splitlines() if any(t in ln.lower() for t in _TORCH_WRITER_TEXT))
        return LongforgeError(f"could not write {path}: PyTorch's file writer failed ({said[:200]}), which usually means the "
                              "disk is full; free space there (or choose another folder) and run the same command again.")
    return None


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn a failed write of `path` into one clear sentence: an OSError (disk full, permissions), or the disk-full
    errors of writers that raise something else (PyTorch's RuntimeError, torch.distributed.checkpoint, safetensors)."""
    try:
        yield
    except OSError as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) or e.errno is None:
            raise
        raise disk_error(e, path) from None
    except BaseException as e:
        err = full_disk_error(e, path)
        if err is None:
            raise
        raise err from None


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the platform allows."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write a file whole or not at all: a temp file beside it, fsynced, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """atomic_write_bytes for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    """atomic_write_bytes for an indented JSON document."""
    return atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing, empty or damaged (a marker that is not whole means 'not done')."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- folders longforge owns


def owns(folder: Path) -> bool:
    """Whether longforge created `folder` (it holds the ownership mark)."""
    return (Path(folder) / OWNER_MARK).is_file()


def _mark(folder: Path) -> None:
    with writing(folder / OWNER_MARK):
        (folder / OWNER_MARK).write_text("This folder was written by longforge, which may clear it on a later run.\n")


def _foreign(folder: Path, ours: Callable[[Path], bool] | None) -> list[str]:
    """Names in `folder` that longforge did not write (empty when the folder is marked, empty, or recognised)."""
    if owns(folder):
        return []
    names = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
    if not names or (ours is not None and ours(folder)):
        return []
    return names


def claim_dir(folder: Path, what: str, ours: Callable[[Path], bool] | None = None) -> Path:
    """Create `folder` as longforge's own, or adopt it when it is empty or already ours; refuse a folder of user files.

    `ours` recognises output of earlier longforge versions, which wrote no mark.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LongforgeError(f"{what} {folder} is a file, not a folder; choose a folder path.")
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        foreign = _foreign(folder, ours)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise LongforgeError(f"{what} {folder} already holds files longforge did not write ({shown}); "
                                 "longforge never clears such a folder: choose a new or empty folder, or move them.")
        if not owns(folder):
            _mark(folder)
    return folder


def clear_dir(folder: Path, what: str, ours: Callable[[Path], bool] | None = None) -> Path:
    """Empty a folder longforge owns (keeping its mark and lock) and return it; a folder of user files is refused."""
    folder = claim_dir(folder, what, ours)
    for p in folder.iterdir():
        if p.name in (OWNER_MARK, LOCK_FILE):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return folder


def remove_dir(folder: Path, what: str) -> None:
    """Delete a folder longforge created; a folder without the mark is refused, never deleted."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir() or not owns(folder):
        raise LongforgeError(f"{what} {folder} was not created by longforge (no {OWNER_MARK} mark), so it is not "
                             "deleted; remove it yourself or choose another folder.")
    shutil.rmtree(folder)


# ---------------------------------------------------------------- locks


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["longforge", *sys.argv[1:]])[:300],
            "since": dt.datetime.now().isoformat(timespec="seconds")}


class FolderLock:
    """An exclusive lock on a folder (a second writer is refused, naming the holder); the OS frees it if we die."""

    def __init__(self, folder: Path, what: str):
        self.folder, self.what = Path(folder), what
        self._fh: IO[str] | None = None

    def acquire(self) -> FolderLock:
        """Take the lock or raise one sentence naming the process that holds it."""
        path = self.folder / LOCK_FILE
        with writing(path):
            self.folder.mkdir(parents=True, exist_ok=True)
            fh = path.open("a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            fh.seek(0)
            held = read_holder(fh.read())
            fh.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LongforgeError(f"could not lock {path} ({e.strerror}); use a folder on a local disk.") from None
            by = (f"pid {held['pid']} on {held['host']} (`{held['command']}`, since {held['since']})" if held
                  else "another process")
            raise LongforgeError(f"{self.what} {self.folder} is in use by {by}; wait for it to finish, stop it, "
                                 "or use another folder.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(_holder()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        """Free the lock (the file stays: deleting it could let two writers lock two different files)."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.seek(0)
                self._fh.truncate()
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(text: str) -> dict[str, Any] | None:
    """The holder record of a lock file, or None when it is empty or damaged."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) and {"pid", "host", "command", "since"} <= rec.keys() else None


# ---------------------------------------------------------------- content stamps


def file_digest(path: Path, size: int) -> str:
    """A hash of a file's content: all of it when small, else evenly spaced blocks including the first and last."""
    h = hashlib.blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    with Path(path).open("rb") as fh:
        if size <= STAMP_BLOCK * STAMP_BLOCKS:
            h.update(fh.read())
        else:
            last = size - STAMP_BLOCK
            for i in range(STAMP_BLOCKS):
                fh.seek(last * i // (STAMP_BLOCKS - 1))
                h.update(fh.read(STAMP_BLOCK))
    return h.hexdigest()


def _files_under(root: Path) -> list[Path]:
    """Every file under a folder, sorted, skipping hidden names and longforge's own marks."""
    return sorted(f for f in root.rglob("*") if f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(root).parts))


def content_stamp(path: Path | str | None, max_hashed: int = STAMP_MAX_HASHED_FILES) -> list[Any]:
    """The identity of a file or folder for staleness checks: name, size, mtime and a cheap content hash per file."""
    if path is None:
        return [None]
    p = Path(path)
    if not p.exists():
        return [str(p), "missing"]
    files = [p] if p.is_file() else _files_under(p)
    every = max(1, -(-len(files) // max_hashed))  # hash every k-th file so at most max_hashed are read
    out: list[Any] = [str(p)]
    for i, f in enumerate(files):
        st = f.stat()
        rel = "." if f == p else str(f.relative_to(p))
        out.append([rel, st.st_size, st.st_mtime_ns, file_digest(f, st.st_size) if i % every == 0 else None])
    return out
