"""The read/tokenize pipeline: deterministic batches, bounded read-ahead, order kept, errors surfaced."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from longforge.data.pipeline import SourcePipeline, encode, text_batches
from longforge.data.sources import Document, Reject


def _docs(n: int, size: int = 10) -> list[Document]:
    return [Document("w" * size + str(i), "s", "d", f"f:{i}") for i in range(n)]


def test_text_batches_grow_and_carry_their_rejects() -> None:
    items: list = _docs(3, 10) + [Reject("s", "malformed JSON", "f:x")] + _docs(20, 10)
    batches = list(text_batches(iter(items), max_bytes=48, first_bytes=12))
    # Targets 12 -> 24 -> 48 -> 48 ... characters; a batch ends with the document that reaches its target
    # (documents are 11 characters, then 12 from the tenth of the second run).
    assert [b.nbytes for b in batches] == [22, 33, 55, 57, 48, 48]
    assert [len(b.docs) for b in batches] == [2, 3, 5, 5, 4, 4]
    assert [len(b.rejects) for b in batches] == [0, 1, 0, 0, 0, 0]


def test_pipeline_keeps_order_and_respects_the_read_ahead_limit(tokenizer) -> None:
    submitted: list[int] = []

    class CountingPool(ThreadPoolExecutor):
        def submit(self, fn, *args, **kw):  # type: ignore[override]
            submitted.append(1)
            return super().submit(fn, *args, **kw)

    docs = [Document(f"the sky is blue {i}.", "s", "d", f"f:{i}") for i in range(200)]
    with CountingPool(2) as pool:
        p = SourcePipeline(iter(docs), tokenizer.backend_tokenizer, pool, batch_bytes=64, wants_more=lambda ahead: False)
        first = p.next()
        # One batch in flight at most while wants_more says no (the one consumed and the next); otherwise lookahead 3.
        assert first is not None and len(submitted) == 2
        got = [first]
        while (tb := p.next()) is not None:
            got.append(tb)
        p.close()
    ids = np.concatenate([tb.ids for tb in got])
    expect = [t for d in docs for t in tokenizer(d.text, add_special_tokens=False)["input_ids"]]
    assert ids.tolist() == expect
    assert [d.location for tb in got for d in tb.docs] == [d.location for d in docs]


def test_a_reader_failure_reaches_the_consumer(tokenizer) -> None:
    def items() -> Iterator[Document]:
        yield Document("fine", "s", "d", "f:1")
        raise RuntimeError("disk on fire")

    with ThreadPoolExecutor(2) as pool:
        p = SourcePipeline(items(), tokenizer.backend_tokenizer, pool)
        with pytest.raises(RuntimeError, match="disk on fire"):
            while p.next() is not None:
                pass
        p.close()


def test_text_the_tokenizer_refuses_becomes_a_reject(tokenizer) -> None:
    batch = next(text_batches(iter([Document("ok", "s", "d", "f:1"), Document("bad \ud800", "s", "d", "f:2")])))
    tb = encode(tokenizer.backend_tokenizer, batch)
    assert [d.location for d in tb.docs] == ["f:1"] and len(tb.lengths) == 1
    assert [(r.reason, r.location) for r in tb.rejects] == [("cannot be tokenized", "f:2")]
