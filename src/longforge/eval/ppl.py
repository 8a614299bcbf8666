"""Perplexity against length: token-weighted mean NLL of long documents, one window per document or a sliding window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longforge.config import EvalSpec, SourceSpec
from longforge.data.sources import Rejects, iter_documents
from longforge.errors import LongforgeError
from longforge.eval.share import SINGLE, Share
from longforge.eval.task import EvalTask, Metric, Results, TaskRun
from longforge.inference import as_engine
from longforge.progress import progress_bar


@torch.no_grad()
def window_nll(model: Any, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and target count of one window (1, L), without the full logits."""
    return as_engine(model).window_nll(ids)


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new targets) of windows over n tokens: each scores only tokens no earlier window scored."""
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + window, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            return out
        begin += stride


@dataclass(frozen=True)
class Window:
    """One scored window: the length it counts toward, its document, its token span and how many targets it scores."""

    length: int
    doc: int
    begin: int
    end: int
    new: int | None  # score only the last `new` targets (None: every target of the window)


def ppl_windows(docs: list[list[int]], lengths: list[int], num_docs: int, stride: int | None) -> tuple[list[Window], dict[int, int]]:
    """Every window the perplexity curve scores, in order, and how many documents each length uses (see run_ppl)."""
    windows: list[Window] = []
    used: dict[int, int] = {}
    span = max(lengths)
    for L in lengths:
        if stride is None:
            pool = [i for i, d in enumerate(docs) if len(d) >= L][:num_docs]
            windows += [Window(L, i, 0, L, None) for i in pool]
        else:
            pool = [i for i, d in enumerate(docs[:num_docs]) if len(d) >= 2]
            for i in pool:
                windows += [Window(L, i, b, e, new) for b, e, new in sliding_windows(min(len(docs[i]), span), L, min(stride, L))]
        used[L] = len(pool)
    return windows, used


@torch.no_grad()
def run_ppl(model: Any, docs: list[list[int]], lengths: list[int], num_docs: int, label: str = "ppl",
            stride: int | None = None, share: Share = SINGLE) -> dict[str, Any]:
    """Perplexity at each length.

    Without a stride: the first `num_docs` documents at least L tokens long, truncated at L, one window each
    (YaRN/PoSE's protocol). With a stride: the same tokens at every length (the first max(lengths) tokens of
    the `num_docs` longest documents), scored by windows of at most L tokens moving by the stride, so the
    curve isolates the effect of the context length. Under torchrun (`share`) each process scores its share of
    the windows; the sums are taken in window order on every process, as one process takes them.
    """
    engine = as_engine(model)
    lengths = sorted(lengths)
    windows, used = ppl_windows(docs, lengths, num_docs, stride)
    mine = share.mine([w.end - w.begin for w in windows])

    def work() -> dict[int, tuple[float, int]]:
        out: dict[int, tuple[float, int]] = {}
        with progress_bar() as bar:
            task = bar.add_task(f"{label}: windows", total=len(mine))
            for k in mine:
                w = windows[k]
                ids = torch.tensor([docs[w.doc][w.begin:w.end]])
                out[k] = engine.window_nll(ids) if w.new is None else engine.window_nll(ids, score_last=w.new)
                bar.update(task, advance=1)
        return out

    scored = share.collect(work)
    rows = []
    for L in lengths:
        nll, n = 0.0, 0
        for k, w in enumerate(windows):
            if w.length == L:
                a, b = scored[k]
                nll, n = nll + a, n + b
        row: dict[str, Any] = {"length": L, "documents": used[L], "tokens": n,
                               "nll": nll / n if n else None, "ppl": math.exp(nll / n) if n else None}
        if stride is not None:
            row["stride"] = min(stride, L)
        rows.append(row)
    if all(r["documents"] == 0 for r in rows):
        raise LongforgeError(f"no perplexity document reaches even {min(lengths)} tokens; give longer documents or shorter lengths.")
    return {"task": "ppl", "lengths": lengths, "stride": stride, "rows": rows,
            "engine": engine.describe() if hasattr(engine, "describe") else {}}


# ---- how the eval stage runs the task and how its results are read (the registry's entry)


def ppl_lengths(lengths: list[int] | None, original_length: int, target_length: int) -> list[int]:
    """Perplexity lengths: given, or doubling from a quarter of the original window to the target."""
    if lengths:
        return sorted(lengths)
    out, n = [], max(original_length // 4, 16)
    while n < target_length:
        out.append(n)
        n *= 2
    return out + [target_length]


def load_ppl_docs(spec: EvalSpec, tokenizer: Any) -> list[list[int]]:
    """Tokenized held-out documents for perplexity, longest first."""
    assert spec.ppl is not None
    src = SourceSpec(name="ppl", path=spec.ppl.source, text_field=spec.ppl.text_field)
    rejects = Rejects()
    texts = [d.text for d in iter_documents(src, rejects)]
    if not texts:
        raise LongforgeError(f"eval.ppl.source {spec.ppl.source} has no usable documents; point it at long text.")
    enc = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return sorted((e.ids for e in enc), key=len, reverse=True)


def run_task(job: TaskRun) -> dict[str, Any]:
    """Perplexity at the eval spec's lengths on one model."""
    pp = job.spec.ppl
    assert pp is not None
    docs = load_ppl_docs(job.spec, job.tokenizer)
    lengths = ppl_lengths(pp.lengths, job.original_length, job.target_length)
    return run_ppl(job.engine, docs, lengths, pp.num_docs, label=f"{job.label} ppl", stride=pp.stride, share=job.share)


def _by_model(evals: dict[str, Results]) -> tuple[list[str], list[dict[str, float]]]:
    """Every length any model has a perplexity at (ascending), and each model's perplexities by length."""
    per = [e["summary"].get("ppl") or {} for e in evals.values()]
    return sorted({k for p in per for k in p}, key=int), per


def columns(evals: dict[str, Results], original: int) -> tuple[list[str], list[list[str]]]:
    """The report's columns: perplexity at every length any model reached."""
    lengths, per = _by_model(evals)
    return [f"ppl@{k}" for k in lengths], [[f"{p[k]:.2f}" if p.get(k) else "-" for k in lengths] for p in per]


def compare(ra: Results, rb: Results) -> list[Metric]:
    """Perplexity of A and B at every length either has (lower is better)."""
    qa, qb = ra["summary"].get("ppl") or {}, rb["summary"].get("ppl") or {}
    return [Metric(f"perplexity @{L}", qa.get(L), qb.get(L), "", better="lower") for L in sorted({*qa, *qb}, key=int)]


def _plot(results: dict[str, dict[str, Any]], original: int, path: Path) -> Path:
    from longforge.report.plots import ppl_curves

    return ppl_curves(results, original, path)


EVAL_TASK = EvalTask(
    name="ppl", title="Perplexity against length", terminal="perplexity by context length", run=run_task,
    summary=lambda res: {str(r["length"]): r["ppl"] for r in res["rows"]}, columns=columns, compare=compare, plot=_plot,
    by_length=lambda summary: {L: f"{v:.2f}" for L, v in (summary or {}).items() if v is not None})
