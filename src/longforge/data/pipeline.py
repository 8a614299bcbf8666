"""Streaming read and tokenization: each source is read by its own thread in batches of a few MB, batches are
tokenized on a shared pool (the tokenizer runs on every core and releases the GIL), and the build consumes them
in order, so the output does not depend on thread timing."""

from __future__ import annotations

import array
import itertools
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longforge.data.sources import Document, Item, Reject
from longforge.errors import LongforgeError

BATCH_BYTES = 2 << 20
# Batches grow from this size to BATCH_BYTES, so a source asked for a few tokens is not read and tokenized by the MB.
FIRST_BATCH_BYTES = 64 << 10
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
            continue
        batch.docs.append(item)
        batch.nbytes += len(item.text)
        if batch.nbytes >= target:
            yield batch
            batch, target = TextBatch(), min(2 * target, max_bytes)
    if batch.docs or batch.rejects:
        yield batch


def _ids(encodings: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Flat uint32 ids and offsets of a list of tokenizers Encodings."""
    flat = array.array("I")
    lengths = np.zeros(len(encodings) + 1, dtype=np.int64)
    for i, e in enumerate(encodings):
        ids = e.ids
        flat.extend(ids)
        lengths[i + 1] = len(ids)
    return np.frombuffer(flat, dtype=np.uint32) if len(flat) else np.zeros(0, dtype=np.uint32), np.cumsum(lengths)


def encode(backend: Any, batch: TextBatch) -> TokenBatch:
    """Tokenize a batch with the tokenizer's Rust batch encoder; a document it cannot take becomes a reject."""
    texts = [d.text for d in batch.docs]
    enc_fn = getattr(backend, "encode_batch_fast", backend.encode_batch)
    docs, rejects = batch.docs, list(batch.rejects)
    try:
        encodings = enc_fn(texts, add_special_tokens=False)
    except Exception:  # noqa: BLE001 - e.g. a lone surrogate from a JSON escape; find which document, keep the rest
        encodings, docs = [], []
        for d, t in zip(batch.docs, texts):
            try:
                encodings.append(enc_fn([t], add_special_tokens=False)[0])
                docs.append(d)
            except Exception as e:  # noqa: BLE001
                rejects.append(Reject(d.source, "cannot be tokenized", d.location, str(e)))
    ids, offsets = _ids(encodings)
    slim = [Document("", d.source, d.domain, d.location, d.records, d.piece) for d in docs]
    return TokenBatch(slim, ids, offsets, rejects, batch.nbytes)


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
                if not self._put(tb):
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
