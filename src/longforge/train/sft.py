"""Supervised fine-tuning data: chat conversations rendered with the model's template, loss on assistant tokens only,
packed into document-masked rows (as ProLong and UltraLong do)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longforge.data.sources import Rejects
from longforge.data.store import LoaderPlan
from longforge.errors import LongforgeError
from longforge.positions.transforms import contiguous
from longforge.train.batches import Batch

ROLES = {"system", "user", "assistant", "tool"}


def _ids(out: Any) -> list[int]:
    """Token ids from apply_chat_template, whichever shape this transformers version returns."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def render(tokenizer: Any, messages: list[dict[str, str]], template: str | None, generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation rendered with the chat template."""
    return _ids(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                              add_generation_prompt=generation_prompt, return_dict=False))


def assistant_mask(tokenizer: Any, messages: list[dict[str, str]], template: str | None) -> tuple[list[int], list[int]]:
    """(token ids, 1 on tokens the assistant wrote) by rendering growing prefixes of the conversation.

    Works with any template whose rendering of a prefix is a prefix of the whole (true of common templates);
    the assistant's end-of-turn tokens count as its own, so the model learns to stop.
    """
    full = render(tokenizer, messages, template)
    mask = [0] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render(tokenizer, messages[:i], template, generation_prompt=True) if i else []
        end = render(tokenizer, messages[: i + 1], template)
        if full[: len(start)] != start or full[: len(end)] != end:
            raise ValueError("the chat template does not render conversation prefixes as prefixes of the whole")
        for j in range(len(start), len(end)):
            mask[j] = 1
    return full, mask


def _valid(rec: Any, field_name: str) -> tuple[list[dict[str, str]] | None, str]:
    """The messages of a record, or None and why it cannot be used."""
    if not isinstance(rec, dict) or field_name not in rec:
        return None, f"missing field {field_name!r}"
    msgs = rec[field_name]
    if not isinstance(msgs, list) or not msgs:
        return None, f"field {field_name!r} is not a non-empty list of messages"
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return None, "a message lacks a known role or text content"
    if not any(m["role"] == "assistant" for m in msgs):
        return None, "no assistant message (nothing to learn)"
    return msgs, ""


@dataclass
class SFTSet:
    """Tokenized conversations ready for packing, and what was kept aside."""

    examples: list[tuple[list[int], list[int]]]
    rejects: dict[str, int] = field(default_factory=dict)


def load_conversations(path: Path, tokenizer: Any, field_name: str, max_tokens: int, template: str | None,
                       rejects_path: Path | None = None) -> SFTSet:
    """Read a JSONL of chat conversations; unusable or too long ones are counted and written to rejects."""
    path = Path(path)
    if not path.is_file():
        raise LongforgeError(f"SFT data {path} does not exist; point `sft.data` at a JSONL of chat messages.")
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise LongforgeError("the tokenizer has no chat template; give one with `sft.chat_template` (a Jinja file).")
    rejects = Rejects(rejects_path)
    out = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            loc = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                rejects.add("sft", "malformed JSON or UTF-8", loc, str(e))
                continue
            msgs, why = _valid(rec, field_name)
            if msgs is None:
                rejects.add("sft", why, loc)
                continue
            try:
                ids, mask = assistant_mask(tokenizer, msgs, template)
            except ValueError as e:
                raise LongforgeError(f"{loc}: {e}; use a template without history-dependent rendering.") from None
            if len(ids) > max_tokens:
                rejects.add("sft", f"longer than {max_tokens} tokens", loc, str(len(ids)))
                continue
            out.append((ids, mask))
    rejects.close()
    if not out:
        raise LongforgeError(f"no usable conversation in {path}; see the rejects for why.")
    return SFTSet(out, {r: n for (_, r), n in rejects.counts.items()})


def pack_conversations(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
                       seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rows of (tokens, document ids, loss weights): whole conversations in shuffled order, first fit, padded."""
    order = np.random.default_rng(seed).permutation(len(examples))
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    ids: list[int] = []
    docs: list[int] = []
    mask: list[int] = []

    def flush() -> None:
        pad = seq_len - len(ids)
        # Padding is its own document with no loss, so nothing attends to it or learns from it.
        rows.append((np.array(ids + [pad_id] * pad), np.array(docs + [len(set(docs))] * pad), np.array(mask + [0] * pad)))

    for i in order:
        tok, m = examples[int(i)]
        if len(tok) > seq_len:
            raise LongforgeError(f"a conversation of {len(tok)} tokens does not fit the SFT length {seq_len}; load with max_tokens <= seq_len.")
        if ids and len(ids) + len(tok) > seq_len:
            flush()
            ids, docs, mask = [], [], []
        k = len(set(docs))
        ids += tok
        docs += [k] * len(tok)
        mask += m
    if ids:
        flush()
    return rows


@dataclass
class SFTBatches:
    """Micro-batches of packed conversations, with assistant-only loss weights; pure in (seed, step)."""

    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    micro_batch: int
    grad_accum: int
    seed: int
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        self.plan = LoaderPlan(len(self.rows), self.micro_batch * self.grad_accum * self.world, self.seed)

    def batch(self, step: int, micro: int) -> Batch:
        """Micro-batch `micro` of step `step` for this rank."""
        mine = self.plan.rank_indices(step, self.rank, self.world)
        pick = [self.rows[int(r)] for r in mine[micro * self.micro_batch : (micro + 1) * self.micro_batch]]
        ids = torch.from_numpy(np.stack([p[0] for p in pick])).long()
        docs = torch.from_numpy(np.stack([p[1] for p in pick])).long()
        weights = torch.from_numpy(np.stack([p[2] for p in pick])).float()
        pos = torch.from_numpy(np.stack([contiguous(row, restart=True) for row in docs.numpy()]))
        return Batch(ids, docs, pos, weights)
