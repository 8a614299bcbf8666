"""The data stage: sources -> tokenize -> sampling plan -> pack -> shard store, with a manifest."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from longforge.config import DataSpec
from longforge.data.pack import Packer, separator_tokens
from longforge.data.sampling import bucket_name, copies, source_budgets
from longforge.data.sources import Document, Rejects, check_source, iter_documents
from longforge.data.store import ShardWriter
from longforge.errors import LongforgeError
from longforge.hf import load_tokenizer
from longforge.progress import progress_bar

ENCODE_BATCH = 32


class _SourceStream:
    """A source's documents, tokenized a batch at a time, with its statistics."""

    def __init__(self, name: str, docs: Iterator[Document], tokenizer: Any, budget: int | None, weight: float):
        self.name = name
        self.docs = docs
        self.tok = tokenizer
        self.budget = budget
        self.weight = weight
        self.emitted = 0
        self.done = False
        self.queue: list[tuple[Document, list[int]]] = []
        self.stats: dict[str, Any] = {
            "documents_seen": 0, "tokens_seen": 0, "documents_kept": 0, "documents_dropped": 0,
            "documents_repeated": 0, "tokens_written": 0,
            "seen_by_length": Counter(), "written_by_length": Counter(),
        }

    def next(self) -> tuple[Document, list[int]] | None:
        """The next tokenized document, or None when the source is exhausted."""
        if not self.queue:
            batch = [d for _, d in zip(range(ENCODE_BATCH), self.docs)]
            if not batch:
                self.done = True
                return None
            enc = self.tok.backend_tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False)
            self.queue = [(d, e.ids) for d, e in zip(batch, enc)][::-1]
        return self.queue.pop()

    def remaining(self) -> float:
        """How much this source still wants, for weighted mixing."""
        if self.budget is None:
            return self.weight
        return max(self.budget - self.emitted, 0)


def _choose(streams: list[_SourceStream], rng: np.random.Generator) -> _SourceStream | None:
    """Pick a source with probability proportional to what it still wants."""
    live = [s for s in streams if not s.done and s.remaining() > 0]
    if not live:
        return None
    w = np.array([s.remaining() for s in live], dtype=np.float64)
    return live[int(rng.choice(len(live), p=w / w.sum()))]


def build_data(spec: DataSpec, tokenizer_dir: Path, seq_len: int, out: Path, seed: int = 0) -> dict[str, Any]:
    """Build packed shards from the recipe's sources; returns (and writes) the manifest."""
    t0 = time.time()
    for s in spec.sources:
        check_source(s)
    names = [s.name for s in spec.sources]
    if len(set(names)) != len(names):
        raise LongforgeError("data sources need distinct `name`s; rename the repeated source.")
    tok = load_tokenizer(tokenizer_dir)
    try:
        prefix, suffix = separator_tokens(spec.separator, tok)
    except ValueError as e:
        raise LongforgeError(f"data.separator {spec.separator!r}: {e}.") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rejects = Rejects(out / "rejects.jsonl")
    budget = spec.token_budget
    budgets = source_budgets([s.weight for s in spec.sources], budget)
    rng = np.random.default_rng(seed)
    streams = [
        _SourceStream(s.name, iter_documents(s, rejects), tok, b, s.weight) for s, b in zip(spec.sources, budgets)
    ]
    writer = ShardWriter(out, seq_len, len(tok), spec.shard_sequences,
                         meta={"separator": spec.separator, "seed": seed, "tokenizer": str(tokenizer_dir)})
    packer = Packer(seq_len, prefix=prefix, suffix=suffix)
    by_domain: dict[str, int] = defaultdict(int)
    domain_of = {s.name: s.domain for s in spec.sources}
    with progress_bar() as bar:
        task = bar.add_task("data: tokenize, sample, pack", total=budget)
        while (src := _choose(streams, rng)) is not None:
            item = src.next()
            if item is None:
                continue
            doc, ids = item
            n = len(ids)
            st = src.stats
            st["documents_seen"] += 1
            st["tokens_seen"] += n
            st["seen_by_length"][bucket_name(n)] += 1
            k = copies(n, spec, rng)
            if k == 0:
                st["documents_dropped"] += 1
                continue
            st["documents_kept"] += 1
            st["documents_repeated"] += int(k > 1)
            st["written_by_length"][bucket_name(n)] += k
            for _ in range(k):
                take = ids if src.budget is None else ids[: max(src.budget - src.emitted, 0)]
                if not take:
                    break
                src.emitted += len(take) + len(prefix) + len(suffix)
                st["tokens_written"] += len(take)
                by_domain[domain_of[src.name]] += len(take)
                for seq in packer.add(take):
                    writer.add(seq)
                bar.update(task, advance=len(take) + len(prefix) + len(suffix))
    rejects.close()
    index = writer.close()
    if index["num_sequences"] == 0:
        raise LongforgeError(
            f"the sources gave fewer than seq_len={seq_len} tokens after sampling; add text, lower seq_len or raise short_keep_prob."
        )
    manifest = _manifest(spec, streams, budgets, rejects, packer.pending_tokens, index, by_domain, time.time() - t0)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _manifest(spec: DataSpec, streams: list[_SourceStream], budgets: list[int | None], rejects: Rejects,
              pending: int, index: dict[str, Any], by_domain: dict[str, int], seconds: float) -> dict[str, Any]:
    """Everything a user needs to audit what the plan did, per source and length bucket."""
    sources = {}
    for s, b in zip(streams, budgets):
        st = dict(s.stats)
        st["seen_by_length"] = dict(sorted(st["seen_by_length"].items()))
        st["written_by_length"] = dict(sorted(st["written_by_length"].items()))
        st["budget"] = b
        st["short_of_budget"] = max((b or 0) - s.emitted, 0) if b is not None else 0
        sources[s.name] = st
    total_written = sum(st["tokens_written"] for st in sources.values())
    return {
        "plan": spec.plan,
        "settings": json.loads(spec.model_dump_json()),
        "sources": sources,
        "domains": {d: {"tokens": n, "share": n / max(total_written, 1)} for d, n in sorted(by_domain.items())},
        "rejects": rejects.summary(),
        "sequences": index["num_sequences"],
        "seq_len": index["seq_len"],
        "tokens_in_sequences": index["num_sequences"] * index["seq_len"],
        "tokens_left_over": pending,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(sum(st["tokens_seen"] for st in sources.values()) / max(seconds, 1e-9)),
    }
