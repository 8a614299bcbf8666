"""The data stage: sources -> tokenize -> sampling plan -> sentence filter -> pack -> shard store (and a replay set),
with a manifest of what was seen, kept, repeated and dropped, per source and length bucket."""

from __future__ import annotations

import fnmatch
import json
import resource
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from longforge.config import DataSpec, SourceSpec, fingerprint
from longforge.data import pipeline, sources
from longforge.data.estimate import SourceEstimate, estimate_source
from longforge.data.filters import SentenceSelection, vocab_tables
from longforge.data.pack import Packer, separator_tokens
from longforge.data.pipeline import SourcePipeline, TokenBatch, batch_target, encode_pool
from longforge.data.sampling import BUCKET_NAMES, DROP_REASONS, PLANS, bucket_index, plan_copies
from longforge.data.sources import Rejects, check_source, iter_items
from longforge.data.store import BUILD_STATE, FORMAT_VERSION, INDEX, ShardWriter, token_dtype
from longforge.data.verify import vocabulary_id
from longforge.errors import LongforgeError
from longforge.files import LOCK_FILE, FolderLock, atomic_write_json, atomic_write_text, claim_dir, content_stamp, read_json
from longforge.hf import load_tokenizer
from longforge.progress import progress_bar, say, spinner

# The layout of the build-state record; a record of another version is not continued.
STATE_VERSION = 1
STORE_PATTERNS = ("tokens-*.bin", "tokens-*.npy", "starts-*.npy", "offsets-*.npy", "costs-*.npy", INDEX, INDEX + ".tmp",
                  "manifest.json", "rejects.jsonl", "length_histogram.png", BUILD_STATE,
                  f".{INDEX}.tmp-*", ".manifest.json.tmp-*", f".{BUILD_STATE}.tmp-*")
# A recipe run's stage markers, which it writes into its data folder.
RUN_MARKS = ("STARTED.json", "DONE.json")
# A budget above this multiple of the estimated maximum is refused before any work (estimates err by far less).
IMPOSSIBLE_MARGIN = 2.0


@dataclass
class SourceStats:
    """What happened to one source's documents, overall and per length bucket."""

    counts: Counter[str] = field(default_factory=Counter)
    dropped_by_reason: Counter[str] = field(default_factory=Counter)
    before: dict[str, np.ndarray] = field(default_factory=lambda: {
        k: np.zeros(len(BUCKET_NAMES), dtype=np.int64)
        for k in ("documents", "tokens", "documents_kept", "documents_dropped", "documents_repeated")})
    after: dict[str, np.ndarray] = field(default_factory=lambda: {
        k: np.zeros(len(BUCKET_NAMES), dtype=np.int64) for k in ("documents", "tokens")})

    def see(self, n: int, bucket: int, records: int, piece: bool) -> None:
        """Count a document read: n tokens, in length bucket `bucket`, joined from `records` records."""
        self.counts.update(documents_seen=1, tokens_seen=n, records_joined=records if records > 1 else 0,
                           document_pieces=int(piece))
        self.before["documents"][bucket] += 1
        self.before["tokens"][bucket] += n

    def drop(self, bucket: int, reason: str) -> None:
        """Count a document the plan gave no copy."""
        self.counts["documents_dropped"] += 1
        self.before["documents_dropped"][bucket] += 1
        self.dropped_by_reason[reason] += 1

    def keep(self, bucket: int, copies: int) -> None:
        """Count a document the plan kept, repeated when copies > 1."""
        self.counts.update(documents_kept=1, documents_repeated=int(copies > 1))
        self.before["documents_kept"][bucket] += 1
        self.before["documents_repeated"][bucket] += int(copies > 1)

    def wrote(self, n: int) -> None:
        """Count one copy of n tokens written."""
        self.counts.update(copies_written=1, tokens_written=n)
        b = int(bucket_index(np.array([n]))[0])
        self.after["documents"][b] += 1
        self.after["tokens"][b] += n

    def state(self) -> dict[str, Any]:
        """Every counter, to continue after a restart."""
        return {"counts": dict(self.counts), "dropped_by_reason": dict(self.dropped_by_reason),
                "before": {k: v.tolist() for k, v in self.before.items()}, "after": {k: v.tolist() for k, v in self.after.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`."""
        self.counts = Counter({k: int(v) for k, v in state["counts"].items()})
        self.dropped_by_reason = Counter({k: int(v) for k, v in state["dropped_by_reason"].items()})
        for table, saved in ((self.before, state["before"]), (self.after, state["after"])):
            for k in table:
                table[k] = np.asarray(saved[k], dtype=np.int64)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: totals, reasons and the non-empty length buckets before (original length) and after (written)."""
        c = self.counts
        out: dict[str, Any] = {k: int(c[k]) for k in (
            "documents_seen", "tokens_seen", "documents_kept", "documents_dropped", "documents_repeated", "copies_written",
            "tokens_written", "documents_filtered_out", "tokens_removed_by_filter", "documents_cut_by_budget",
            "records_joined", "document_pieces")}
        out["dropped_by_reason"] = dict(sorted(self.dropped_by_reason.items()))
        out["before_by_length"] = _buckets(self.before)
        out["after_by_length"] = _buckets(self.after)
        return out


def _buckets(table: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    return {name: {k: int(v[b]) for k, v in table.items()} for b, name in enumerate(BUCKET_NAMES)
            if any(v[b] for v in table.values())}


@dataclass
class _Source:
    """One source during a build: its token batches, budget and statistics."""

    spec: SourceSpec
    budget: int | None
    pipeline: SourcePipeline | None = None
    emitted: int = 0
    done: bool = False
    stats: SourceStats = field(default_factory=SourceStats)
    bytes_read: int = 0  # text bytes of the batches consumed
    rate_guess: float = 0.5  # tokens written per text byte, until measured
    items: int = 0  # documents and rejects of the batches consumed: where a resumed build goes on reading
    batches: int = 0  # batches consumed (their size grows with each)
    records: int = 0  # records read (joined into documents, or rejected)
    last_location: str = ""  # where the last batch consumed ended
    budget_full_at: str | None = None  # where reading stopped because the budget was full

    def consumed(self, tb: TokenBatch) -> None:
        """Count a batch read, to resume after it and to say how far the source was read."""
        self.items += tb.items
        self.batches += 1
        self.records += tb.records
        self.bytes_read += tb.nbytes
        if tb.docs or tb.rejects:
            self.last_location = tb.docs[-1].location if tb.docs else tb.rejects[-1].location

    def state(self) -> dict[str, Any]:
        """How far the source was read and what was made of it, to continue after a restart."""
        return {"name": self.spec.name, "emitted": self.emitted, "done": self.done, "bytes_read": self.bytes_read,
                "items": self.items, "batches": self.batches, "records": self.records, "last_location": self.last_location,
                "budget_full_at": self.budget_full_at, "stats": self.stats.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`."""
        assert state["name"] == self.spec.name
        self.emitted, self.done, self.bytes_read = int(state["emitted"]), bool(state["done"]), int(state["bytes_read"])
        self.items, self.batches, self.records = int(state["items"]), int(state["batches"]), int(state["records"])
        self.last_location, self.budget_full_at = str(state["last_location"]), state["budget_full_at"]
        self.stats.restore(state["stats"])

    def wants_more(self, ahead_bytes: int) -> bool:
        """Whether to tokenize more ahead: not when the text in flight should already cover the rest of the budget."""
        if self.budget is None:
            return True
        written = self.stats.counts["tokens_written"]
        rate = written / self.bytes_read if written and self.bytes_read else self.rate_guess
        return ahead_bytes * rate < 1.5 * (self.budget - self.emitted)

    def wants(self) -> float:
        """How much this source still wants, for weighted mixing."""
        if self.budget is None:
            return self.spec.weight
        return max(self.budget - self.emitted, 0)

    def full(self) -> bool:
        """Whether the source's budget is spent."""
        return self.budget is not None and self.emitted >= self.budget

    def finish(self) -> None:
        """Stop reading this source."""
        self.done = True
        if self.pipeline is not None:
            self.pipeline.close()


@dataclass
class _Replay:
    """The replay set being built: short documents from the sources' own distribution, packed on their own."""

    spec: Any
    packer: Packer
    writer: ShardWriter
    keep_prob: float
    keep_prob_from: str
    rng: np.random.Generator
    nsep: int
    emitted: int = 0
    by_source: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def state(self) -> dict[str, Any]:
        """The replay set's writer, packer, random stream and counts, to continue after a restart."""
        return {"writer": self.writer.state(), "packer": self.packer.state(), "rng": self.rng.bit_generator.state,
                "emitted": self.emitted, "by_source": {k: dict(v) for k, v in self.by_source.items()}}

    def restore(self, state: dict[str, Any]) -> str | None:
        """Continue from `state()`; returns why that is impossible, or None."""
        why = self.writer.restore(state["writer"])
        if why is not None:
            return why
        self.packer.restore(state["packer"])
        self.rng.bit_generator.state = state["rng"]
        self.emitted = int(state["emitted"])
        self.by_source = defaultdict(Counter, {k: Counter(v) for k, v in state["by_source"].items()})
        return None

    def offer(self, source: str, ids: np.ndarray) -> None:
        """Take the document with keep_prob when it is short enough, from an eligible source, within budget."""
        sp = self.spec
        coin = self.rng.random()  # drawn for every offered document, so the draws do not depend on the budget
        if sp.sources is not None and source not in sp.sources:
            return
        if len(ids) > (sp.max_document_tokens or sp.seq_len) or coin >= self.keep_prob:
            return
        left = sp.token_budget - self.emitted - self.nsep
        if left <= 0:
            return
        take = ids[:left]
        self.emitted += len(take) + self.nsep
        self.by_source[source]["documents"] += 1
        self.by_source[source]["tokens"] += len(take)
        for seq in self.packer.add(take):
            self.writer.add(seq)


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _choose(sources: list[_Source], rng: np.random.Generator) -> _Source | None:
    """Pick a source with probability proportional to what it still wants."""
    live = [s for s in sources if not s.done and s.wants() > 0]
    if not live:
        return None
    w = np.array([s.wants() for s in live], dtype=np.float64)
    return live[int(rng.choice(len(live), p=w / w.sum()))]


def _store_file(p: Path) -> bool:
    """Whether a path is a file a data build writes."""
    return p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in STORE_PATTERNS)


def is_data_folder(folder: Path) -> bool:
    """Whether an unmarked folder holds only what a longforge data build (of any version) writes: its output."""
    for p in Path(folder).iterdir():
        if p.name == LOCK_FILE or (p.name in RUN_MARKS and p.is_file()) or _store_file(p):
            continue
        if p.name == "replay" and p.is_dir() and not p.is_symlink() and all(_store_file(q) for q in p.iterdir()):
            continue
        return False
    return True


def _clean(out: Path) -> None:
    """Remove what an earlier build wrote in this folder longforge owns (and only that), so no stale shard survives."""
    for folder in (out, out / "replay"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for pattern in STORE_PATTERNS:
            for f in folder.glob(pattern):
                if f.is_file():
                    f.unlink()
    if (out / "replay").is_dir() and not (out / "replay").is_symlink() and not any((out / "replay").iterdir()):
        (out / "replay").rmdir()


def _budgets(spec: DataSpec) -> list[int | None]:
    return PLANS[spec.plan].budgets(spec)


def _check_budgets(spec: DataSpec, seq_len: int, budgets: list[int | None], estimates: dict[str, SourceEstimate]) -> None:
    """One clear error before any work when a budget cannot be met; a warning when the plan will likely fall short."""
    if spec.token_budget is not None and spec.token_budget < seq_len:
        raise LongforgeError(f"data.token_budget {spec.token_budget} is less than one sequence of seq_len {seq_len}; "
                             "raise token_budget or lower seq_len.")
    if spec.replay is not None and spec.replay.token_budget < spec.replay.seq_len:
        raise LongforgeError(f"data.replay.token_budget {spec.replay.token_budget} is less than one sequence of "
                             f"replay.seq_len {spec.replay.seq_len}; raise it or lower replay.seq_len.")
    for s, b in zip(spec.sources, budgets):
        est = estimates.get(s.name)
        if b is None or est is None:
            continue
        limit = est.max_tokens if est.exact else IMPOSSIBLE_MARGIN * est.max_tokens
        if b > limit:
            about = "" if est.exact else "about "
            raise LongforgeError(
                f"source {s.name!r} is asked for {b:,} tokens of token_budget but can give at most {about}{est.max_tokens:,.0f} "
                f"under plan {spec.plan} (estimated from {est.how}); lower token_budget or add text to this source."
            )
        if est.plan_tokens < b:
            say(f"[yellow]source {s.name!r}: the plan is expected to keep about {est.plan_tokens:,.0f} of the {b:,} tokens "
                f"asked for (estimated from {est.how}); the build will write what there is.[/]")


def _replay_keep_prob(spec: DataSpec, estimates: dict[str, SourceEstimate]) -> tuple[float, str]:
    """The recipe's replay keep_prob, or one that spreads the replay budget over every eligible document."""
    rp = spec.replay
    assert rp is not None
    if rp.keep_prob is not None:
        return rp.keep_prob, "recipe"
    eligible = sum(e.eligible_tokens for n, e in estimates.items() if rp.sources is None or n in rp.sources)
    if eligible <= 0:
        raise LongforgeError(f"the replay set wants documents of at most {rp.max_document_tokens or rp.seq_len} tokens, but "
                             "the sources' first documents hold none; raise replay.max_document_tokens or add short text.")
    return min(1.0, rp.token_budget / eligible), "estimate"


def _estimates(spec: DataSpec, seq_len: int, backend: Any, nsep: int) -> dict[str, SourceEstimate]:
    """Estimates of every source, only when a budget or the replay set needs them."""
    need = spec.token_budget is not None or (spec.replay is not None and spec.replay.keep_prob is None)
    if not need:
        return {}

    def lengths_of(texts: list[str]) -> list[int]:
        enc = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [len(e) for e in enc(texts, add_special_tokens=False)]

    rmax = (spec.replay.max_document_tokens or spec.replay.seq_len) if spec.replay is not None else None
    with spinner("data: estimating what each source holds from its first documents"):
        return {s.name: estimate_source(s, spec, seq_len, lengths_of, nsep, rmax) for s in spec.sources}


def build_data(spec: DataSpec, tokenizer_dir: Path, seq_len: int, out: Path, seed: int = 0,
               trust_remote_code: bool = False) -> dict[str, Any]:
    """Build packed shards (and the replay set) from the recipe's sources; returns (and writes) the manifest.

    The output folder is claimed (a folder of user files is refused) and locked for the build; an interrupted
    build run again with the same settings and inputs continues after its last complete shard.
    """
    t0, c0 = time.time(), _cpu_seconds()
    for s in spec.sources:
        check_source(s)
    tok = load_tokenizer(tokenizer_dir, trust_remote_code)
    try:
        prefix, suffix = separator_tokens(spec.separator, tok)
    except ValueError as e:
        raise LongforgeError(f"data.separator {spec.separator!r}: {e}.") from None
    budgets = _budgets(spec)
    estimates = _estimates(spec, seq_len, tok.backend_tokenizer, len(prefix) + len(suffix))
    _check_budgets(spec, seq_len, budgets, estimates)
    out = claim_dir(Path(out), "data folder", ours=is_data_folder)
    with FolderLock(out, "data folder"):
        vocab_id = vocabulary_id(tok)
        fp = _fingerprint(spec, Path(tokenizer_dir), vocab_id, seq_len, seed)

        def new_build() -> _Build:
            return _Build(spec, seq_len, tok, Path(tokenizer_dir), out, seed, budgets, estimates, (prefix, suffix), vocab_id, fp)

        build = _resumed(out, fp, new_build)
        if build is None:
            _clean(out)
            build = new_build()
        build.run()
        manifest = build.finish(t0, c0)
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
        (out / BUILD_STATE).unlink(missing_ok=True)
    return manifest


def _fingerprint(spec: DataSpec, tokenizer_dir: Path, vocab_id: str, seq_len: int, seed: int) -> str:
    """What a build's output depends on: settings, the sources' and tokenizer's content, and how text is batched and cut."""
    sf = spec.sentence_filter
    return fingerprint([STATE_VERSION, FORMAT_VERSION, json.loads(spec.model_dump_json()), str(tokenizer_dir),
                        content_stamp(tokenizer_dir), vocab_id, seq_len, seed, [content_stamp(s.path) for s in spec.sources],
                        content_stamp(sf.profile) if sf is not None and sf.profile is not None else None,
                        pipeline.BATCH_BYTES, pipeline.FIRST_BATCH_BYTES, sources.MAX_DOCUMENT_BYTES,
                        pipeline.PIECE_CHARS])


def _resumed(out: Path, fp: str, new_build: Callable[[], _Build]) -> _Build | None:
    """The interrupted build recorded in `out`, restored to its last complete shard; None to start afresh."""
    state = read_json(out / BUILD_STATE)
    if state is None:
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fp or state.get("version") != STATE_VERSION:
        say(f"[yellow]data: {out} holds an interrupted build of other settings or inputs; starting afresh[/]")
        return None
    build = new_build()
    try:
        why = build.restore(state)
    except (KeyError, TypeError, ValueError, AssertionError, OSError) as e:
        why = f"its record is damaged ({type(e).__name__}: {e})"
    if why is not None:
        build.abandon()
        say(f"[yellow]data: cannot continue the interrupted build in {out} ({why}); starting afresh[/]")
        return None
    w = build.writer
    say(f"data: continuing the interrupted build in {out} after {len(w.shards)} complete shard(s) "
        f"({w.num_sequences:,} sequences written)")
    return build


class _Build:
    """One build in progress: the sources, the plan's random draws, the sentence filter, the packers and writers."""

    def __init__(self, spec: DataSpec, seq_len: int, tok: Any, tokenizer_dir: Path, out: Path, seed: int,
                 budgets: list[int | None], estimates: dict[str, SourceEstimate], separators: tuple[list[int], list[int]],
                 vocab_id: str, fp: str):
        self.spec, self.seq_len, self.estimates, self.out, self.fp = spec, seq_len, estimates, out, fp
        self.backend = tok.backend_tokenizer
        prefix, suffix = separators
        self.nsep = len(prefix) + len(suffix)
        vocab, dtype = len(tok), token_dtype(len(tok))
        meta = {"separator": spec.separator, "seed": seed, "tokenizer": str(tokenizer_dir), "tokenizer_vocab": vocab_id,
                "batch_order": spec.batch_order, "plan": spec.plan}
        self.writer = ShardWriter(out, seq_len, vocab, spec.shard_sequences, meta=meta)
        # ProLong packs long and short data apart, so a sequence is either one long document or many short ones.
        self.mix = PLANS[spec.plan].by_role
        self.packers = {r: Packer(seq_len, prefix=prefix, suffix=suffix, dtype=dtype)
                        for r in (("long", "short") if self.mix else ("all",))}
        self.role_sequences: Counter[str] = Counter()
        self.by_domain: Counter[str] = Counter()
        self.replay = None
        if spec.replay is not None:
            keep, how = _replay_keep_prob(spec, estimates)
            rwriter = ShardWriter(out / "replay", spec.replay.seq_len, vocab, spec.shard_sequences, meta={**meta, "plan": "replay"})
            self.replay = _Replay(spec.replay, Packer(spec.replay.seq_len, prefix, suffix, dtype), rwriter, keep, how,
                                  np.random.default_rng([seed, 1]), self.nsep)
        self.selection = SentenceSelection(spec.sentence_filter, vocab_tables(tok)) if spec.sentence_filter is not None else None
        sf = spec.sentence_filter
        # Sources the selection applies to (all, unless the filter names some); decided once, not per document.
        self.filtered = set() if sf is None else {s.name for s in spec.sources if sf.sources is None or s.name in sf.sources}
        # Separate streams, so turning the filter or the replay set on does not change what the plan keeps.
        self.rng = np.random.default_rng(seed)
        self.filter_rng = np.random.default_rng([seed, 2])
        self.rejects = Rejects(out / "rejects.jsonl")
        self.sources = [_Source(s, b) for s, b in zip(spec.sources, budgets)]
        for src in self.sources:
            est = estimates.get(src.spec.name)
            if est is not None and est.text_bytes > 0:
                src.rate_guess = max(est.plan_tokens / est.text_bytes, 1e-3)
        self._saved_shards = 0  # complete shards when the state was last recorded

    def _shards(self) -> int:
        """Complete shards of the training set and the replay set."""
        return len(self.writer.shards) + (len(self.replay.writer.shards) if self.replay is not None else 0)

    def state(self) -> dict[str, Any]:
        """Everything the build's output still depends on, at a batch boundary (files flushed to disk)."""
        return {"version": STATE_VERSION, "fingerprint": self.fp, "writer": self.writer.state(),
                "packers": {r: p.state() for r, p in self.packers.items()},
                "rng": self.rng.bit_generator.state, "filter_rng": self.filter_rng.bit_generator.state,
                "role_sequences": dict(self.role_sequences), "by_domain": dict(self.by_domain),
                "rejects": self.rejects.state(), "sources": [s.state() for s in self.sources],
                "replay": self.replay.state() if self.replay is not None else None}

    def _save_state(self) -> None:
        """Record (atomically) how to continue from here: called at the first batch boundary after a shard completes."""
        atomic_write_json(self.out / BUILD_STATE, self.state())
        self._saved_shards = self._shards()

    def restore(self, state: dict[str, Any]) -> str | None:
        """Continue from a recorded state: files cut back to it; returns why that is impossible, or None."""
        why = self.writer.restore(state["writer"])
        if why is None and self.replay is not None:
            why = self.replay.restore(state["replay"])
        if why is not None:
            return why
        rej = state["rejects"]
        have = self.rejects.path.stat().st_size if self.rejects.path is not None and self.rejects.path.is_file() else 0
        if have < int(rej["bytes"]):
            return "rejects.jsonl is shorter than recorded"
        self.rejects.restore(rej)
        for r, p in self.packers.items():
            p.restore(state["packers"][r])
        self.rng.bit_generator.state = state["rng"]
        self.filter_rng.bit_generator.state = state["filter_rng"]
        self.role_sequences = Counter({k: int(v) for k, v in state["role_sequences"].items()})
        self.by_domain = Counter({k: int(v) for k, v in state["by_domain"].items()})
        if len(state["sources"]) != len(self.sources):
            return "its sources differ"
        for src, st in zip(self.sources, state["sources"]):
            src.restore(st)
        for name in (INDEX, "manifest.json"):  # a folder being built is not complete
            (self.out / name).unlink(missing_ok=True)
            (self.out / "replay" / name).unlink(missing_ok=True)
        self._saved_shards = self._shards()
        return None

    def abandon(self) -> None:
        """Close the files of a build that stops here (a later run cuts them back to the recorded state)."""
        self.writer.abandon()
        if self.replay is not None:
            self.replay.writer.abandon()
        self.rejects.close()

    def run(self) -> None:
        """Read every source until it ends or its budget is spent, mixing them by what each still wants."""
        with encode_pool() as pool, progress_bar() as bar:
            for src in self.sources:
                if src.done:
                    continue
                first = batch_target(src.batches, pipeline.BATCH_BYTES, pipeline.FIRST_BATCH_BYTES)
                src.pipeline = SourcePipeline(iter_items(src.spec), self.backend, pool, batch_bytes=pipeline.BATCH_BYTES,
                                              wants_more=src.wants_more, first_bytes=first, skip_items=src.items)
            task = bar.add_task("data: tokens written", total=self.spec.token_budget)
            bar.update(task, advance=sum(s.emitted for s in self.sources))
            try:
                while (src := _choose(self.sources, self.rng)) is not None:
                    bar.update(task, advance=self._next_batch(src))
                    if self._shards() > self._saved_shards:
                        self._save_state()
            except BaseException:
                self.abandon()
                raise
            finally:
                for src in self.sources:
                    src.finish()
                self.rejects.close()

    def _next_batch(self, src: _Source) -> int:
        """Consume the source's next token batch; returns tokens written."""
        assert src.pipeline is not None
        tb = src.pipeline.next()
        if tb is None:
            src.finish()
            return 0
        for r in tb.rejects:
            self.rejects.add_reject(r)
        src.consumed(tb)
        written = self._consume(src, tb)
        if src.full():
            src.budget_full_at = src.last_location  # what comes after was never read, so never checked
            src.finish()
        return written

    def _consume(self, src: _Source, tb: TokenBatch) -> int:
        """Apply the plan to a batch of documents and write the copies it asks for; returns tokens written."""
        lengths = tb.lengths
        copies, reasons = plan_copies(lengths, src.spec.role, self.spec, self.seq_len, self.rng)
        buckets = bucket_index(lengths)
        written = 0
        for i, doc in enumerate(tb.docs):
            if src.full():
                break
            ids = tb.ids[tb.offsets[i] : tb.offsets[i + 1]]
            b, k = int(buckets[i]), int(copies[i])
            src.stats.see(len(ids), b, doc.records, doc.piece)
            if self.replay is not None:
                self.replay.offer(src.spec.name, ids)
            if k == 0:
                src.stats.drop(b, DROP_REASONS[int(reasons[i])])
                continue
            src.stats.keep(b, k)
            for _ in range(k):
                n = self._write_copy(src, ids)
                if n is None:
                    break
                written += n
        return written

    def _write_copy(self, src: _Source, ids: np.ndarray) -> int | None:
        """Filter, cut to the budget and pack one copy of a document; tokens written, or None once the budget is spent."""
        st = src.stats
        piece = self.selection.apply(ids, self.filter_rng) if src.spec.name in self.filtered else ids  # type: ignore[union-attr]
        if len(piece) == 0:
            st.counts["documents_filtered_out"] += 1
            return 0
        st.counts["tokens_removed_by_filter"] += len(ids) - len(piece)
        if src.budget is not None:
            left = src.budget - src.emitted - self.nsep
            if left <= 0:
                src.emitted = src.budget
                return None
            if len(piece) > left:
                piece = piece[:left]
                st.counts["documents_cut_by_budget"] += 1
        src.emitted += len(piece) + self.nsep
        st.wrote(len(piece))
        self.by_domain[src.spec.domain] += len(piece)
        for seq in self.packers[src.spec.role if self.mix else "all"].add(piece):
            self.writer.add(seq)
            self.role_sequences[src.spec.role] += 1
        return len(piece) + self.nsep

    def finish(self, t0: float, c0: float) -> dict[str, Any]:
        """Close the shards and the replay set; the manifest."""
        index = self.writer.close()
        if index["num_sequences"] == 0:
            raise LongforgeError(
                f"the sources gave fewer than seq_len={self.seq_len} tokens after sampling; add text, lower seq_len or raise short_keep_prob."
            )
        replay = _replay_manifest(self.replay, self.replay.writer.close()) if self.replay is not None else None
        pending = sum(p.pending_tokens for p in self.packers.values())
        return _manifest(self.spec, self.sources, self.rejects, pending, index, self.by_domain, self.role_sequences,
                         self.estimates, replay, time.time() - t0, _cpu_seconds() - c0)


def _replay_manifest(replay: _Replay, index: dict[str, Any]) -> dict[str, Any]:
    """What the replay set holds and how it was drawn."""
    return {
        "path": "replay",
        "seq_len": index["seq_len"],
        "sequences": index["num_sequences"],
        "token_budget": replay.spec.token_budget,
        "keep_prob": replay.keep_prob,
        "keep_prob_from": replay.keep_prob_from,
        "max_document_tokens": replay.spec.max_document_tokens or replay.spec.seq_len,
        "tokens_written": sum(c["tokens"] for c in replay.by_source.values()),
        "short_of_budget": max(replay.spec.token_budget - replay.emitted, 0),
        "tokens_left_over": replay.packer.pending_tokens,
        "by_source": {k: dict(v) for k, v in sorted(replay.by_source.items())},
    }


def _manifest(spec: DataSpec, sources: list[_Source], rejects: Rejects, pending: int, index: dict[str, Any],
              by_domain: Counter[str], role_sequences: Counter[str], estimates: dict[str, SourceEstimate],
              replay: dict[str, Any] | None, seconds: float, cpu_seconds: float) -> dict[str, Any]:
    """Everything a user needs to audit what the plan did, per source and length bucket."""
    per_source = {}
    for s in sources:
        st = s.stats.as_dict()
        st.update(domain=s.spec.domain, role=s.spec.role, weight=s.spec.weight, budget=s.budget,
                  short_of_budget=max(s.budget - s.emitted, 0) if s.budget is not None else 0,
                  records_read=s.records, budget_full_at=s.budget_full_at)
        if s.spec.name in estimates:
            st["estimate"] = estimates[s.spec.name].as_dict()
        per_source[s.spec.name] = st
    total_written = sum(st["tokens_written"] for st in per_source.values())
    m: dict[str, Any] = {
        "plan": spec.plan,
        "settings": json.loads(spec.model_dump_json()),
        "sources": per_source,
        "domains": {d: {"tokens": n, "share": n / max(total_written, 1)} for d, n in sorted(by_domain.items())},
        "rejects": rejects.summary(),
        "sequences": index["num_sequences"],
        "seq_len": index["seq_len"],
        "tokens_in_sequences": index["num_sequences"] * index["seq_len"],
        "tokens_left_over": pending,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),  # every thread of this process: on a shared machine, the fairer cost
        "tokens_per_second": round(sum(st["tokens_seen"] for st in per_source.values()) / max(seconds, 1e-9)),
    }
    if PLANS[spec.plan].by_role:
        n = max(index["num_sequences"], 1)
        m["mix"] = {"target_long_share": spec.long_share,
                    "long_sequences": role_sequences["long"], "short_sequences": role_sequences["short"],
                    "long_share": role_sequences["long"] / n}
    if replay is not None:
        m["replay"] = replay
    return m
