"""SFT: assistant-only loss masks from the chat template, packing whole conversations, batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from longforge.errors import LongforgeError
from longforge.train.batches import targets
from longforge.train.sft import SFTBatches, assistant_mask, load_conversations, pack_conversations

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _conv(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_mask_covers_exactly_the_assistant_turns(tokenizer) -> None:
    msgs = [{"role": "system", "content": "be brief"}, *_conv("what is the key", "alpha beta"),
            *_conv("and then", "gamma delta")]
    ids, mask = assistant_mask(tokenizer, msgs, TEMPLATE)
    assert len(ids) == len(mask)
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned == "alpha beta<|endoftext|>\ngamma delta<|endoftext|>\n"
    hidden = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert "what is the key" in hidden and "alpha" not in hidden


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_bad_records_are_kept_aside(tokenizer, tmp_path: Path) -> None:
    data = _write(tmp_path / "sft.jsonl", [
        {"messages": _conv("q one", "a one")},
        "{broken",
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"text": "not chat"},
        {"messages": _conv("long " * 200, "answer")},
    ])
    got = load_conversations(data, tokenizer, "messages", 64, TEMPLATE, tmp_path / "rejects.jsonl")
    assert len(got.examples) == 1
    assert got.rejects == {"malformed JSON or UTF-8": 1, "no assistant message (nothing to learn)": 1,
                           "a message lacks a known role or text content": 1, "missing field 'messages'": 1,
                           "longer than 64 tokens": 1}
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 5


def test_missing_template_is_a_clear_error(tokenizer, tmp_path: Path) -> None:
    data = _write(tmp_path / "sft.jsonl", [{"messages": _conv("q", "a")}])
    with pytest.raises(LongforgeError, match="has no chat template"):
        load_conversations(data, tokenizer, "messages", 64, None)


def test_packing_keeps_conversations_whole_and_batches_restart_positions(tokenizer) -> None:
    examples = [assistant_mask(tokenizer, _conv(f"question {i}", f"answer {i} " * (i % 4 + 1)), TEMPLATE) for i in range(12)]
    with pytest.raises(LongforgeError, match="does not fit the SFT length 16"):
        pack_conversations(examples, 16, pad_id=0, seed=0)
    rows = pack_conversations(examples, 96, pad_id=0, seed=0)
    assert sum(int(r[2].sum()) for r in rows) == sum(sum(m) for _, m in examples)  # every assistant token, once
    for ids, docs, w in rows:
        assert len(ids) == 96
        for d in np.unique(docs):
            span = np.nonzero(docs == d)[0]
            assert np.all(np.diff(span) == 1)  # contiguous: no conversation is split
    src = SFTBatches(rows, micro_batch=2, grad_accum=1, seed=0)
    b = src.batch(0, 0)
    labels, weights = targets(b)
    assert b.position_ids[0, 0] == 0 and bool((b.position_ids[b.doc_ids != b.doc_ids.roll(1, 1)] == 0).all())
    assert torch.all(weights[labels == -100] == 0)
    assert 0 < weights.sum() < (labels != -100).sum()  # only assistant tokens count
