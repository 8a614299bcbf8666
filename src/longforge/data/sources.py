"""Corpus sources: stream documents from JSONL (.gz, .zst), Parquet, text folders and Hugging Face datasets saved
to disk, keeping bad records aside with the reason and location."""

from __future__ import annotations

import gzip
import io
import json
import os
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from longforge.config import SourceSpec
from longforge.errors import LongforgeError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
HF_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
# A document is held in memory whole until it is tokenized (in pieces: pipeline.PIECE_CHARS); bigger files and
# groups are cut into documents of at most this many bytes of UTF-8 text.
MAX_DOCUMENT_BYTES = 64 << 20
ARROW_BATCH_ROWS = 256


@dataclass(frozen=True)
class Document:
    """One document of a source, with where it came from."""

    text: str
    source: str
    domain: str
    location: str
    records: int = 1  # records joined into it (group_by)
    piece: bool = False  # a piece of a file or group larger than MAX_DOCUMENT_BYTES, or a group that came back


@dataclass(frozen=True)
class Reject:
    """A record that could not be used: which source, why, and where."""

    source: str
    reason: str
    location: str
    detail: str = ""


@dataclass
class Rejects:
    """Counts and a log of records that could not be used, with the reason and location."""

    path: Path | None = None
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    _fh: IO[str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, source: str, reason: str, location: str, detail: str = "") -> None:
        """Count one rejected record and append it to the rejects file."""
        self.add_reject(Reject(source, reason, location, detail))

    def add_reject(self, r: Reject) -> None:
        """Count one Reject and append it to the rejects file."""
        with self._lock:
            self.counts[(r.source, r.reason)] += 1
            if self.path is not None:
                if self._fh is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._fh = self.path.open("w")
                rec = {"source": r.source, "reason": r.reason, "location": r.location, "detail": r.detail[:200]}
                self._fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        """Flush the rejects file."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def state(self) -> dict[str, Any]:
        """The counts and the size of the rejects file, flushed to disk, to continue after a restart."""
        with self._lock:
            size = 0
            if self._fh is not None:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                size = self._fh.buffer.tell()
            return {"bytes": size, "counts": [[src, reason, n] for (src, reason), n in sorted(self.counts.items())]}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`: the file cut back to its recorded size (records after it are read again)."""
        with self._lock:
            self.counts = Counter({(src, reason): int(n) for src, reason, n in state["counts"]})
            size = int(state["bytes"])
            if self.path is None:
                return
            if size == 0:
                self.path.unlink(missing_ok=True)  # created again by the first reject, as in a build never stopped
                return
            os.truncate(self.path, size)
            self._fh = self.path.open("a")

    def summary(self) -> dict[str, dict[str, int]]:
        """Rejected record counts per source and reason."""
        out: dict[str, dict[str, int]] = {}
        for (src, reason), n in sorted(self.counts.items()):
            out.setdefault(src, {})[reason] = n
        return out


# ---------------------------------------------------------------- formats and files


def _is_jsonl(name: str) -> bool:
    name = name.lower()
    for c in COMPRESSED_SUFFIXES:
        if name.endswith(c):
            name = name[: -len(c)]
    return name.endswith(JSONL_SUFFIXES)


def _visible_files(root: Path) -> list[Path]:
    """Files under a folder, sorted, skipping hidden ones (.git, .DS_Store)."""
    return sorted(f for f in root.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts))


def source_format(spec: SourceSpec) -> str:
    """The source's format: given, or guessed from its path."""
    if spec.format != "auto":
        return spec.format
    p = Path(spec.path)
    if p.is_dir():
        if any((p / m).is_file() for m in HF_MARKERS):
            return "hf_disk"
        files = _visible_files(p)
        if files and all(f.suffix.lower() == ".parquet" for f in files):
            return "parquet"
        if files and all(_is_jsonl(f.name) for f in files):
            return "jsonl"
        return "text"
    name = p.name.lower()
    if _is_jsonl(name):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "hf_disk"
    return "text"


def _hf_files(root: Path) -> list[Path]:
    """The Arrow files of a dataset saved with `save_to_disk`, in order (every split of a DatasetDict)."""
    if root.is_file():
        return [root]
    dd = root / "dataset_dict.json"
    if dd.is_file():
        try:
            splits = json.loads(dd.read_text())["splits"]
        except (json.JSONDecodeError, KeyError, TypeError):
            splits = sorted(d.name for d in root.iterdir() if d.is_dir())
        return [f for s in splits for f in _hf_files(root / s)]
    state = root / "state.json"
    if state.is_file():
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
            return [root / n for n in names]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return sorted(root.glob("*.arrow"))


def source_files(spec: SourceSpec) -> list[Path]:
    """The files a source reads, in reading order."""
    p = Path(spec.path)
    fmt = source_format(spec)
    if fmt == "hf_disk":
        return _hf_files(p)
    if p.is_file():
        return [p]
    files = _visible_files(p)
    if fmt == "jsonl":
        return [f for f in files if _is_jsonl(f.name)]
    if fmt == "parquet":
        return [f for f in files if f.suffix.lower() == ".parquet"]
    return files


def check_source(spec: SourceSpec) -> None:
    """Fail before any work when a source is missing, empty, or lacks the fields it is read by."""
    p = Path(spec.path)
    where = f"source {spec.name!r}"
    if not p.exists():
        raise LongforgeError(f"{where}: {p} does not exist; fix `path` for this source.")
    fmt = source_format(spec)
    files = source_files(spec)
    if not files:
        kind = {"jsonl": "JSONL files", "parquet": ".parquet files", "hf_disk": ".arrow files"}.get(fmt, "files")
        raise LongforgeError(f"{where}: folder {p} has no {kind}; point `path` at the corpus or set `format`.")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise LongforgeError(f"{where}: {missing[0]} is listed by the dataset but does not exist; re-save the dataset.")
    if fmt == "jsonl" and any(f.name.lower().endswith((".zst", ".zstd")) for f in files):
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise LongforgeError(f"{where}: reading .zst files needs the zstandard package; run `pip install zstandard`.") from None
    if fmt in ("parquet", "hf_disk"):
        for f in files:
            _check_columns(spec, f, fmt)
    if spec.group_by is not None and fmt == "text":
        raise LongforgeError(f"{where}: `group_by` needs records with fields (jsonl, parquet, hf_disk), not a text folder; remove it.")


def _arrow_schema(path: Path, fmt: str) -> Any:
    """The Arrow schema of a Parquet or Arrow IPC file (reads only the metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        return pq.read_schema(path)
    with pa.OSFile(str(path)) as fh:
        try:
            return pa.ipc.open_stream(fh).schema
        except pa.ArrowInvalid:
            pass
    with pa.OSFile(str(path)) as fh:
        return pa.ipc.open_file(fh).schema


def _check_columns(spec: SourceSpec, path: Path, fmt: str) -> None:
    """The text (and group) field must be a column of text or bytes in every file."""
    import pyarrow as pa

    try:
        schema = _arrow_schema(path, fmt)
    except (OSError, pa.ArrowException):
        return  # an unreadable file is counted as a reject while building, like a bad record
    names = schema.names
    for key, what in ((spec.text_field, "text_field"), (spec.group_by, "group_by")):
        if key is None:
            continue
        if key not in names:
            raise LongforgeError(
                f"source {spec.name!r}: {path} has no column {key!r} (columns: {', '.join(names)}); set `{what}` to one of them."
            )
    t = schema.field(spec.text_field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        raise LongforgeError(f"source {spec.name!r}: column {spec.text_field!r} of {path} holds {t}, not text; set `text_field` to a text column.")


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One usable record before grouping: its text, location and group key."""

    text: str
    location: str
    group: Any = None
    piece: bool = False


Item = Document | Reject


def _open_binary(path: Path) -> IO[bytes]:
    """Open a file for reading bytes, decompressing .gz and .zst."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        import zstandard

        raw = path.open("rb")
        # Large windows appear in corpora compressed with --long; the limit only bounds memory, not speed.
        return io.BufferedReader(zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(raw, closefd=True))
    return path.open("rb")


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a file cannot be read (further)."""
    errs: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)


def _empty(text: str) -> bool:
    # isspace() stops at the first visible character and copies nothing, unlike strip().
    return not text or text.isspace()


def _jsonl_records(spec: SourceSpec, path: Path) -> Iterator[Record | Reject]:
    name, tf, gb = spec.name, spec.text_field, spec.group_by
    errors = _read_errors()
    lineno = 0
    try:
        fh = _open_binary(path)
    except errors as e:
        yield Reject(name, "unreadable file", str(path), str(e))
        return
    try:
        with fh:
            for lineno, raw in enumerate(fh, start=1):
                if raw.isspace():
                    continue
                loc = f"{path}:{lineno}"
                try:
                    rec: Any = json.loads(raw)
                except UnicodeDecodeError as e:
                    yield Reject(name, "invalid UTF-8", loc, str(e))
                    continue
                except ValueError as e:
                    yield Reject(name, "malformed JSON", loc, getattr(e, "msg", str(e)))
                    continue
                if not isinstance(rec, dict) or tf not in rec or rec[tf] is None:
                    yield Reject(name, f"missing field {tf!r}", loc)
                    continue
                text = rec[tf]
                if not isinstance(text, str):
                    yield Reject(name, f"field {tf!r} is not text", loc, type(text).__name__)
                    continue
                if _empty(text):
                    yield Reject(name, "empty document", loc)
                    continue
                group = _group_key(rec.get(gb)) if gb is not None else None
                # Only the text goes on: the line's bytes and the record are not held while it waits to be tokenized.
                del raw, rec
                yield Record(text, loc, group)
    except errors as e:
        yield Reject(name, "unreadable file", f"{path}:{lineno + 1}", f"reading stopped: {e}")


def _group_key(v: Any) -> Any:
    """A hashable group key (lists and dicts become their JSON text)."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return json.dumps(v, sort_keys=True)


def _arrow_batches(path: Path, fmt: str, columns: list[str]) -> Iterator[Any]:
    """Record batches of a Parquet or Arrow IPC file, streamed, only the needed columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        pf = pq.ParquetFile(path)
        yield from pf.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=columns)
        return
    with pa.OSFile(str(path)) as fh:
        try:
            reader = pa.ipc.open_stream(fh)
        except pa.ArrowInvalid:
            reader = None
        if reader is not None:
            for rb in reader:
                yield rb.select(columns)
            return
    with pa.OSFile(str(path)) as fh:
        reader = pa.ipc.open_file(fh)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i).select(columns)


def _arrow_records(spec: SourceSpec, path: Path, fmt: str) -> Iterator[Record | Reject]:
    import pyarrow as pa

    name, tf, gb = spec.name, spec.text_field, spec.group_by
    columns = [tf] if gb is None or gb == tf else [tf, gb]
    row = 0
    try:
        for rb in _arrow_batches(path, fmt, columns):
            texts = rb.column(tf).to_pylist()
            groups = rb.column(gb).to_pylist() if gb is not None else [None] * len(texts)
            for text, g in zip(texts, groups):
                loc = f"{path}:row {row}"
                row += 1
                if text is None:
                    yield Reject(name, f"missing field {tf!r}", loc, "null")
                    continue
                text, bad = _decoded(text, name, loc)
                if bad is not None:
                    yield bad
                    continue
                yield Record(text, loc, _group_key(g))
    except (OSError, pa.ArrowException) as e:
        yield Reject(name, "unreadable file", f"{path}:row {row}", f"reading stopped: {e}")


def _decoded(raw: str | bytes, name: str, loc: str) -> tuple[str, Reject | None]:
    """The text of a record (decoding bytes as UTF-8), or why it cannot be used."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return "", Reject(name, "invalid UTF-8", loc, str(e))
    if _empty(raw):
        return raw, Reject(name, "empty document", loc)
    return raw, None


def _text_records(spec: SourceSpec, path: Path) -> Iterator[Record | Reject]:
    """One file is one document; a file above MAX_DOCUMENT_BYTES is read in pieces cut at line ends."""
    name = spec.name
    try:
        size = path.stat().st_size
        if size <= MAX_DOCUMENT_BYTES:
            pieces: Iterator[tuple[int, bytes]] = iter([(0, path.read_bytes())])
        else:
            pieces = _file_pieces(path)
        for offset, data in pieces:
            loc = str(path) if size <= MAX_DOCUMENT_BYTES else f"{path}@{offset}"
            text, bad = _decoded(data, name, loc)
            if bad is not None:
                yield bad
                continue
            yield Record(text, loc, piece=size > MAX_DOCUMENT_BYTES)
    except OSError as e:
        yield Reject(name, "unreadable file", str(path), str(e))


def _file_pieces(path: Path) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) pieces of at most MAX_DOCUMENT_BYTES, cut after a newline when there is one, else
    between two UTF-8 characters (so valid text stays valid)."""
    with path.open("rb") as fh:
        offset, carry = 0, b""
        while True:
            chunk = fh.read(MAX_DOCUMENT_BYTES - len(carry))
            data = carry + chunk
            if not chunk:
                if data:
                    yield offset, data
                return
            cut = data.rfind(b"\n") + 1 or _char_boundary(data)
            yield offset, data[:cut]
            offset += cut
            carry = data[cut:]


def _char_boundary(data: bytes) -> int:
    """Where to cut `data` so no UTF-8 character is split: before a character the bytes end inside of, else the end."""
    end = len(data)
    i = end - 1
    while i >= 0 and end - i <= 3 and data[i] & 0xC0 == 0x80:  # step back over continuation bytes (10xxxxxx)
        i -= 1
    if i <= 0:
        return end
    lead = data[i]
    need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    return i if i + need > end else end


def iter_records(spec: SourceSpec) -> Iterator[Record | Reject]:
    """Every record of a source, file by file, and every bad one as a Reject."""
    fmt = source_format(spec)
    for f in source_files(spec):
        if fmt == "jsonl":
            yield from _jsonl_records(spec, f)
        elif fmt in ("parquet", "hf_disk"):
            yield from _arrow_records(spec, f, fmt)
        else:
            yield from _text_records(spec, f)


def utf8_size(text: str) -> int:
    """The text's size in UTF-8 bytes (a lone surrogate, which a JSON escape can hold, counts 3), without a copy for ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


@dataclass
class _Group:
    """The records of one group being joined: its key, where it starts, the texts and their size in UTF-8 bytes."""

    key: Any
    location: str
    parts: list[str]
    size: int
    piece: bool

    def document(self, spec: SourceSpec) -> Document:
        """The group's records joined into one document."""
        return Document(spec.group_joiner.join(self.parts), spec.name, spec.domain,
                        f"{self.location} (group {self.key!r}, {len(self.parts)} records)", records=len(self.parts), piece=self.piece)


def _grouped(spec: SourceSpec, records: Iterator[Record | Reject]) -> Iterator[Item]:
    """Join consecutive records with the same group key into one document (ProLong's repositories).

    Records without a key stay single documents. A group whose records are not contiguous, or that would grow past
    MAX_DOCUMENT_BYTES of UTF-8 text (joiners included), becomes several documents, flagged as pieces; grouping
    never holds more than one group.
    """
    joiner = utf8_size(spec.group_joiner)
    finished: set[int] = set()  # hashes of closed group keys, to flag a group that comes back
    group: _Group | None = None
    for r in records:
        if isinstance(r, Reject):
            yield r
            continue
        size = utf8_size(r.text)
        if group is not None and r.group == group.key and group.size + joiner + size <= MAX_DOCUMENT_BYTES:
            group.parts.append(r.text)
            group.size += joiner + size
            continue
        next_piece = hash(r.group) in finished
        if group is not None:
            if r.group == group.key:
                next_piece = True  # the group outgrew MAX_DOCUMENT_BYTES
            else:
                finished.add(hash(group.key))
            doc, group = group.document(spec), None  # its parts freed before the joined text goes on
            yield doc
            del doc  # not held here once the build is done with it
        if r.group is None:
            yield Document(r.text, spec.name, spec.domain, r.location)
            continue
        group = _Group(r.group, r.location, [r.text], size, next_piece)
    if group is not None:
        yield group.document(spec)


def iter_items(spec: SourceSpec) -> Iterator[Item]:
    """The source's documents and rejects, in file order (checked first)."""
    check_source(spec)
    records = iter_records(spec)
    if spec.group_by is not None:
        yield from _grouped(spec, records)
        return
    for r in records:
        yield r if isinstance(r, Reject) else Document(r.text, spec.name, spec.domain, r.location, piece=r.piece)


def iter_documents(spec: SourceSpec, rejects: Rejects) -> Iterator[Document]:
    """Stream the usable documents of a source; the others go to `rejects`."""
    for item in iter_items(spec):
        if isinstance(item, Reject):
            rejects.add_reject(item)
        else:
            yield item
