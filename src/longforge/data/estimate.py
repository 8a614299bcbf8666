"""Estimate what a source holds before reading it all: tokens from file sizes and a tokenized sample of its head."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from longforge.config import DataSpec, SourceSpec
from longforge.data.sampling import expected_copies, max_copies
from longforge.data.sources import Reject, _open_binary, iter_items, source_files, source_format, utf8_size

# Documents are read up to READ_BYTES of text for their lengths; TOKENIZE_BYTES of it (a prefix of each document,
# at most PREFIX_BYTES) is tokenized for the tokens-per-byte rate. A source read whole and tokenized whole is exact.
READ_BYTES = 16 << 20
TOKENIZE_BYTES = 256 << 10
PREFIX_BYTES = 32 << 10
COMPRESSED_PROBE = 4 << 20

# list of texts -> token count of each
LengthFn = Callable[[list[str]], list[int]]


@dataclass(frozen=True)
class SourceEstimate:
    """What a source is expected to hold and what the plan is expected to keep of it."""

    name: str
    exact: bool  # the sample was the whole source
    how: str  # how the text size was estimated, for messages
    text_bytes: float
    documents: float
    tokens: float
    max_tokens: float  # the most the plan can write from it, separators included
    plan_tokens: float  # what the plan is expected to write, separators included
    eligible_tokens: float  # tokens in documents short enough for the replay set

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, numbers rounded."""
        return {k: (round(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _jsonl_text_share(path: Path, field: str) -> tuple[float, float]:
    """(text bytes per decompressed byte, decompressed bytes per file byte) measured on the head of a JSONL file."""
    ratio = 1.0
    name = path.name.lower()
    if name.endswith((".gz", ".zst", ".zstd")):
        with path.open("rb") as fh:
            head = fh.read(COMPRESSED_PROBE)
        try:
            if name.endswith(".gz"):
                out = zlib.decompressobj(wbits=47).decompress(head)
            else:
                import zstandard

                out = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj().decompress(head)
            ratio = len(out) / max(len(head), 1)
        except Exception:  # noqa: BLE001 - a probe that fails leaves the ratio at 1; the build will count the file
            ratio = 1.0
    raw = text = 0
    try:
        with _open_binary(path) as fh:
            for line in fh:
                raw += len(line)
                try:
                    rec = json.loads(line)
                    t = rec.get(field) if isinstance(rec, dict) else None
                    text += len(t.encode("utf-8", "replace")) if isinstance(t, str) else 0
                except ValueError:
                    pass
                if raw >= TOKENIZE_BYTES:
                    break
    except Exception:  # noqa: BLE001 - an unreadable head is counted while building, as a reject
        return 1.0, ratio
    return (text / raw if raw else 1.0), ratio


def _text_bytes(spec: SourceSpec) -> tuple[float, str]:
    """Estimated bytes of document text in the whole source, and how it was estimated."""
    files = source_files(spec)
    sizes = sum(f.stat().st_size for f in files)
    fmt = source_format(spec)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        total = 0
        for f in files:
            try:
                md = pq.ParquetFile(f).metadata
            except Exception:  # noqa: BLE001 - unreadable files yield nothing
                continue
            col = md.schema.names.index(spec.text_field)
            total += sum(md.row_group(g).column(col).total_uncompressed_size for g in range(md.num_row_groups))
        return float(total), f"Parquet metadata ({total / 1e6:.1f} MB of uncompressed text)"
    if fmt == "jsonl":
        share, ratio = _jsonl_text_share(files[0], spec.text_field)
        how = f"{sizes / 1e6:.1f} MB of JSONL files" + (f", about {ratio:.1f}x when decompressed" if ratio != 1.0 else "")
        return sizes * ratio * share, how + f", {share:.0%} of it text"
    return float(sizes), f"{sizes / 1e6:.1f} MB of files"


def estimate_source(spec: SourceSpec, data: DataSpec, seq_len: int, lengths_of: LengthFn, separator_tokens: int,
                    replay_max_tokens: int | None = None) -> SourceEstimate:
    """Tokens a source holds and the plan keeps, from its file sizes and its first documents (a sample of them tokenized)."""
    sizes: list[int] = []
    sample: list[str] = []
    sample_bytes = read = 0
    whole = True
    for item in iter_items(spec):
        if isinstance(item, Reject):
            continue
        if read >= READ_BYTES:
            whole = False
            break
        n = utf8_size(item.text)  # no copy of an ASCII text, which can be a huge record
        sizes.append(n)
        read += n
        if sample_bytes < TOKENIZE_BYTES:
            piece = item.text[:PREFIX_BYTES]
            sample.append(piece)
            sample_bytes += utf8_size(piece)
    tokenized = np.asarray(lengths_of(sample) if sample else [], dtype=np.int64)
    rate = float(tokenized.sum()) / max(sample_bytes, 1)
    exact = whole and len(sample) == len(sizes) and all(utf8_size(t) == n for t, n in zip(sample, sizes))
    lengths = tokenized if exact else np.round(np.asarray(sizes, dtype=np.float64) * rate).astype(np.int64)
    if whole:
        text_bytes, how, scale = float(read), "the whole source" + (", tokenized" if exact else f" at {rate:.3f} tokens per byte"), 1.0
    else:
        text_bytes, how = _text_bytes(spec)
        how += f"; {rate:.3f} tokens per byte on its first {len(sample)} documents"
        scale = text_bytes / max(read, 1)
    written = lengths
    sf = data.sentence_filter
    if sf is not None:  # sentence selection keeps at most budget_fraction of each long-enough document
        written = np.where(lengths >= sf.min_document_tokens, np.floor(lengths * sf.budget_fraction), lengths)
    per_doc = written + separator_tokens
    mx = max_copies(lengths, spec.role, data, seq_len)
    ex = expected_copies(lengths, spec.role, data, seq_len)
    short = lengths <= (replay_max_tokens or 0)
    return SourceEstimate(
        name=spec.name, exact=exact, how=how, text_bytes=text_bytes, documents=len(sizes) * scale,
        tokens=float(lengths.sum()) * scale, max_tokens=float((mx * per_doc).sum()) * scale,
        plan_tokens=float((ex * per_doc).sum()) * scale, eligible_tokens=float(lengths[short].sum()) * scale,
    )
