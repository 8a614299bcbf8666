"""Corpus sources: stream documents from JSONL and text files, keeping bad records aside with the reason."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from longforge.config import SourceSpec
from longforge.errors import LongforgeError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".tex", ".html", ".c", ".h", ".js", ".java", ".go", ".rs"}


@dataclass(frozen=True)
class Document:
    """One document of a source, with where it came from."""

    text: str
    source: str
    domain: str
    location: str


@dataclass
class Rejects:
    """Counts and a log of records that could not be used, with the reason and location."""

    path: Path | None = None
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    _fh: IO[str] | None = None

    def add(self, source: str, reason: str, location: str, detail: str = "") -> None:
        """Count one rejected record and append it to the rejects file."""
        self.counts[(source, reason)] += 1
        if self.path is not None:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self.path.open("w")
            rec = {"source": source, "reason": reason, "location": location, "detail": detail[:200]}
            self._fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        """Flush the rejects file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def summary(self) -> dict[str, dict[str, int]]:
        """Rejected record counts per source and reason."""
        out: dict[str, dict[str, int]] = {}
        for (src, reason), n in sorted(self.counts.items()):
            out.setdefault(src, {})[reason] = n
        return out


def source_format(spec: SourceSpec) -> str:
    """The source's format: given, or guessed from its path."""
    if spec.format != "auto":
        return spec.format
    p = Path(spec.path)
    if p.is_dir():
        return "text"
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    return "text"


def check_source(spec: SourceSpec) -> None:
    """Fail before any work when a source path is missing or empty."""
    p = Path(spec.path)
    if not p.exists():
        raise LongforgeError(f"source {spec.name!r}: {p} does not exist; fix `path` for this source.")
    if p.is_dir() and not any(f.is_file() for f in p.rglob("*")):
        raise LongforgeError(f"source {spec.name!r}: folder {p} has no files; point `path` at the corpus.")
    if source_format(spec) == "jsonl" and p.is_dir():
        raise LongforgeError(f"source {spec.name!r}: format jsonl needs a file, but {p} is a folder; use format 'text' or a .jsonl file.")


def _open_text(path: Path) -> IO[bytes]:
    """Open a possibly gzip-compressed file for reading bytes."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return path.open("rb")


def _jsonl_documents(spec: SourceSpec, rejects: Rejects) -> Iterator[Document]:
    path = Path(spec.path)
    try:
        fh = _open_text(path)
    except OSError as e:
        rejects.add(spec.name, "unreadable file", str(path), str(e))
        return
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            loc = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rejects.add(spec.name, "invalid UTF-8", loc, str(e))
                continue
            try:
                rec: Any = json.loads(line)
            except json.JSONDecodeError as e:
                rejects.add(spec.name, "malformed JSON", loc, e.msg)
                continue
            if not isinstance(rec, dict) or spec.text_field not in rec:
                rejects.add(spec.name, f"missing field {spec.text_field!r}", loc)
                continue
            text = rec[spec.text_field]
            if not isinstance(text, str):
                rejects.add(spec.name, f"field {spec.text_field!r} is not text", loc, type(text).__name__)
                continue
            if not text.strip():
                rejects.add(spec.name, "empty document", loc)
                continue
            yield Document(text, spec.name, spec.domain, loc)


def _text_documents(spec: SourceSpec, rejects: Rejects) -> Iterator[Document]:
    root = Path(spec.path)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            rejects.add(spec.name, "unreadable file", str(f), str(e))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            rejects.add(spec.name, "invalid UTF-8", str(f), str(e))
            continue
        if not text.strip():
            rejects.add(spec.name, "empty document", str(f))
            continue
        yield Document(text, spec.name, spec.domain, str(f))


def iter_documents(spec: SourceSpec, rejects: Rejects) -> Iterator[Document]:
    """Stream the usable documents of a source; the others go to `rejects`."""
    check_source(spec)
    fmt = source_format(spec)
    if fmt == "jsonl":
        yield from _jsonl_documents(spec, rejects)
    else:
        yield from _text_documents(spec, rejects)
