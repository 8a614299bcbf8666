"""Streaming read and tokenization: each source is read by its own thread in batches of a few MB, batches are
tokenized on a shared pool (the tokenizer runs on every core and releases the GIL), and the build consumes them
in order, so the output does not depend on thread timing."""

from __future__ import annotations

import array
import itertools
import os
import queue
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longforge.data.sources import Document, Item, Reject
from longforge.errors import LongforgeError

BATCH_BYTES = 2 << 20
# Batches grow from this size to BATCH_BYTES, so a source asked for a few tokens is not read and tokenized by the MB.
FIRST_BATCH_BYTES = 64 << 10
# The tokenizer needs about 120 bytes per character of a text while it encodes it (measured with tokenizers 0.23), so
# one 20 MB record took 2.5 GB at once. A document longer than PIECE_CHARS is encoded in pieces of at most this size,
# and one call to the tokenizer gets at most about CALL_CHARS of text (pieces and documents, encoded in parallel).
# Smaller pieces cost no speed (a 20 MB text encodes faster in 256K pieces than whole); benchmarks/RESULTS.md has
# the build's peak memory with such a record.
PIECE_CHARS = 1 << 18
CALL_CHARS = 1 << 20
# Where a long text is cut: before a space that follows a letter or digit. The GPT-2 and Llama 3 pre-tokenizers and
# Metaspace all start a new token there and look no further back, so the pieces' ids are the whole text's ids.
_SEAM = re.compile(r"(?<=[^\W_]) ")
# Only where a window holds no such space (code without prose, a blob): before any whitespace after a non-space
# (exact for GPT-2-style byte-level BPE), else anywhere; such a cut may change the ids next to it.
_LOOSE_SEAM = re.compile(r"(?<=\S)\s")
# Texts on which a tokenizer is asked how to cut at a seam (see seam_skips_space).
_PROBES = ("The cat sat on the mat, and 42 dogs ran home.", "def f(x):\n    return x  # two  spaces, then tabs\t\tend",
           "über café naïve résumé: 日本語 text, Ωmega 3.14 ok")
_END = object()


@dataclass
class TextBatch:
    """Consecutive documents of one source, and the rejects met while reading them."""

    docs: list[Document] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    nbytes: int = 0

    @property
    def items(self) -> int:
        """Items of the source (documents and rejects) the batch holds: how far it takes the reading."""
        return len(self.docs) + len(self.rejects)


@dataclass
class TokenBatch:
    """A tokenized TextBatch: all token ids back to back, with where each document starts and ends."""

    docs: list[Document]  # text dropped once tokenized, to free memory early
    ids: np.ndarray
    offsets: np.ndarray
    rejects: list[Reject]
    nbytes: int = 0  # text size of the batch

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every document."""
        return np.diff(self.offsets)

    @property
    def items(self) -> int:
        """Items of the source the batch was read from (a document the tokenizer refused became a reject)."""
        return len(self.docs) + len(self.rejects)

    @property
    def records(self) -> int:
        """Records read for the batch: those joined into its documents, and the rejected ones."""
        return sum(d.records for d in self.docs) + len(self.rejects)


def batch_target(k: int, max_bytes: int = BATCH_BYTES, first_bytes: int = FIRST_BATCH_BYTES) -> int:
    """The text size the k-th batch of a source (from 0) is cut at: first_bytes, doubling up to max_bytes."""
    return min(first_bytes << min(k, 62), max_bytes)


def text_batches(items: Iterator[Item], max_bytes: int = BATCH_BYTES, first_bytes: int = FIRST_BATCH_BYTES) -> Iterator[TextBatch]:
    """Group a source's items into batches of text, the first of first_bytes, each next one twice as big up to max_bytes.

    A batch ends after the document that fills it; the sizes depend on the data only, so the batches (and the
    random draws made per batch) are the same in every run.
    """
    batch, target = TextBatch(), min(first_bytes, max_bytes)
    for item in items:
        if isinstance(item, Reject):
            batch.rejects.append(item)
        else:
            batch.docs.append(item)
            batch.nbytes += len(item.text)
        del item  # the batch holds it; a huge document is freed with its batch, not kept while the next is read
        if batch.docs and batch.nbytes >= target:
            yield batch
            batch, target = TextBatch(), min(2 * target, max_bytes)
    if batch.docs or batch.rejects:
        yield batch


def seam_skips_space(enc_fn: Callable[..., list[Any]]) -> bool:
    """Whether a piece after a seam must start after the space rather than with it.

    A tokenizer that puts a space before every text itself (the Prepend normalizer of Llama 2's and Mistral's
    tokenizer.json) gives the whole text's ids when the seam's space is left out; one that takes the text as it is
    (byte-level BPE, Metaspace) when it is kept. Decided on the probe texts, every seam of them.
    """
    whole, halves = [], []
    for text in _PROBES:
        for m in _SEAM.finditer(text):
            p = m.start()
            whole.append(text)
            halves += [text[:p], text[p:], text[p + 1 :]]
    out = [e.ids for e in enc_fn(whole + halves, add_special_tokens=False)]
    ids, rest = out[: len(whole)], out[len(whole) :]
    keep = all(w == rest[3 * i] + rest[3 * i + 1] for i, w in enumerate(ids))
    skip = all(w == rest[3 * i] + rest[3 * i + 2] for i, w in enumerate(ids))
    return skip and not keep


def text_pieces(text: str, size: int, skip_space: bool = False) -> Iterator[str]:
    """Consecutive slices of `text` of at most `size` characters (at least half of it, but the last), cut before a space
    after a letter or digit (that space left out when `skip_space`); the last resorts are in _LOOSE_SEAM's comment."""
    start, n = 0, len(text)
    while n - start > size:
        lo, hi = start + max(size // 2, 1), start + size
        m = _SEAM.search(text, lo, hi)
        if m is not None:
            cut, skip = m.start(), int(skip_space)
        else:
            loose = _LOOSE_SEAM.search(text, lo, hi)
            cut, skip = (loose.start() if loose is not None else hi), 0
        yield text[start:cut]
        start = cut + skip
    yield text[start:]


def _units(docs: list[Document], enc_fn: Callable[..., list[Any]]) -> Iterator[tuple[int, str]]:
    """(document index, text) to encode, in order: a document whole, or a long one piece by piece (sliced lazily)."""
    skip: bool | None = None
    for i, d in enumerate(docs):
        if len(d.text) <= PIECE_CHARS:
            yield i, d.text
            continue
        if skip is None:
            skip = seam_skips_space(enc_fn)
        for piece in text_pieces(d.text, PIECE_CHARS, skip):
            yield i, piece


def _calls(units: Iterable[tuple[int, str]], limit: int) -> Iterator[list[tuple[int, str]]]:
    """Consecutive units grouped into calls of at most `limit` characters (or one unit)."""
    call: list[tuple[int, str]] = []
    size = 0
    for u in units:
        if call and size + len(u[1]) > limit:
            yield call
            call, size = [], 0
        call.append(u)
        size += len(u[1])
    if call:
        yield call


def _encode_call(enc_fn: Callable[..., list[Any]], call: list[tuple[int, str]], failed: dict[int, str]) -> Iterator[tuple[int, list[int]]]:
    """(document index, ids) of every unit of a call; a document the tokenizer refuses goes to `failed` with why."""
    try:
        encodings = enc_fn([t for _, t in call], add_special_tokens=False)
    except Exception:  # noqa: BLE001 - e.g. a lone surrogate from a JSON escape; find which document, keep the rest
        for i, t in call:
            if i in failed:
                continue
            try:
                yield i, enc_fn([t], add_special_tokens=False)[0].ids
            except Exception as e:  # noqa: BLE001
                failed[i] = str(e)
        return
    for (i, _), e in zip(call, encodings):
        yield i, e.ids


def encode(backend: Any, batch: TextBatch) -> TokenBatch:
    """Tokenize a batch with the tokenizer's Rust batch encoder, a long document in pieces so memory stays bounded
    (see PIECE_CHARS); a document the tokenizer cannot take becomes a reject."""
    enc_fn = getattr(backend, "encode_batch_fast", backend.encode_batch)
    docs = batch.docs
    flat = array.array("I")
    lengths = np.zeros(len(docs), dtype=np.int64)
    failed: dict[int, str] = {}
    for call in _calls(_units(docs, enc_fn), CALL_CHARS):
        for i, ids in _encode_call(enc_fn, call, failed):
            flat.extend(ids)
            lengths[i] += len(ids)
    all_ids = np.frombuffer(flat, dtype=np.uint32) if len(flat) else np.zeros(0, dtype=np.uint32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rejects = list(batch.rejects)
    kept = list(range(len(docs)))
    if failed:  # rare: drop the refused documents' ids (pieces of them encoded before the refusal included)
        kept = [i for i in kept if i not in failed]
        parts = [all_ids[offsets[i] : offsets[i + 1]] for i in kept]
        all_ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
        offsets = np.concatenate([[0], np.cumsum(lengths[kept])])
        rejects += [Reject(docs[i].source, "cannot be tokenized", docs[i].location, failed[i]) for i in sorted(failed)]
    slim = [Document("", d.source, d.domain, d.location, d.records, d.piece) for d in (docs[i] for i in kept)]
    return TokenBatch(slim, all_ids, offsets, rejects, batch.nbytes)


class SourcePipeline:
    """One source's token batches, read ahead by a thread and tokenized ahead on a shared pool, in file order."""

    def __init__(self, items: Iterator[Item], backend: Any, pool: ThreadPoolExecutor, batch_bytes: int = BATCH_BYTES,
                 lookahead: int | None = None, wants_more: Callable[[int], bool] | None = None,
                 first_bytes: int = FIRST_BATCH_BYTES, skip_items: int = 0):
        self._items = items
        # A resumed build skips the items its finished batches held (read, not tokenized) and goes on with the
        # batch size it had reached, so the batches, and the random draws made per batch, are those of one run.
        self._skip = skip_items
        self._first_bytes = first_bytes
        # Asked with the text bytes being tokenized ahead; False stops reading ahead (the budget is nearly met).
        # It only changes how much is tokenized and thrown away, never what is kept.
        self._wants_more = wants_more or (lambda ahead: True)
        self._ahead_bytes = 0
        self._backend = backend
        self._pool = pool
        self._batch_bytes = batch_bytes
        self._lookahead = lookahead or encode_workers() + 1
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self._lookahead)
        self._stop = threading.Event()
        self._futures: deque[Future[TokenBatch]] = deque()
        self._read_all = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            skipped = sum(1 for _ in itertools.islice(self._items, self._skip))
            if skipped < self._skip:
                raise LongforgeError(f"the source holds {skipped} items, fewer than the {self._skip} an interrupted build "
                                     "read from it; it changed since: build into a new folder.")
            for tb in text_batches(self._items, self._batch_bytes, min(self._first_bytes, self._batch_bytes)):
                put = self._put(tb)
                del tb  # tokenized and freed by the pool: not held here while the next batch is read
                if not put:
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(e)
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()  # closes the file a stopped source was reading

    def _put(self, obj: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _top_up(self) -> None:
        """Submit read batches for tokenizing, waiting for the reader only when nothing is in flight."""
        while not self._read_all and len(self._futures) < self._lookahead:
            if self._futures and not self._wants_more(self._ahead_bytes):
                return
            try:
                obj = self._queue.get(block=not self._futures)
            except queue.Empty:
                return
            if obj is _END:
                self._read_all = True
            elif isinstance(obj, BaseException):
                raise obj
            else:
                self._futures.append(self._pool.submit(encode, self._backend, obj))
                self._ahead_bytes += obj.nbytes

    def next(self) -> TokenBatch | None:
        """The next token batch, or None at the end of the source."""
        self._top_up()
        if not self._futures:
            return None
        out = self._futures.popleft().result()
        self._ahead_bytes -= out.nbytes
        self._top_up()
        return out

    def close(self) -> None:
        """Stop reading ahead (the source is done or the build stopped)."""
        self._stop.set()
        for f in self._futures:
            f.cancel()
        self._futures.clear()
        self._thread.join(timeout=5)


def encode_workers() -> int:
    """Batches tokenized at once: one per core (at least two, at most eight).

    The tokenizer spreads one batch over every core, but a batch lasts as long as its longest document, so with
    heavy-tailed lengths several batches in flight keep the cores busy.
    """
    return max(2, min(8, os.cpu_count() or 2))


def encode_pool() -> ThreadPoolExecutor:
    """The threads that hand batches to the tokenizer."""
    return ThreadPoolExecutor(max_workers=encode_workers(), thread_name_prefix="longforge-encode")
