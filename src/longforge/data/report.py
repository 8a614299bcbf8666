"""Show a data build's manifest: tables of what was seen, kept, repeated and dropped, and a length histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from longforge.data.sampling import BUCKET_NAMES
from longforge.errors import LongforgeError
from longforge.progress import compact


def _table(title: str, text_columns: tuple[str, ...], number_columns: tuple[str, ...], caption: str | None = None) -> Table:
    """A table that fits 80 columns: numbers right-aligned and never wrapped, text columns wrapped when they must."""
    t = Table(title=title, caption=caption)
    for col in text_columns:
        t.add_column(col, overflow="fold")
    for col in number_columns:
        t.add_column(col, justify="right", no_wrap=True)
    return t


def source_table(m: dict[str, Any]) -> Table:
    """One row per source: documents and tokens seen, kept, dropped, repeated, written."""
    t = _table(f"data: {m['sequences']:,} sequences of {m['seq_len']:,} tokens (plan {m['plan']})", ("source", "domain"),
               ("docs\nseen", "docs\nkept", "docs\ndropped", "docs\nrepeated", "tokens\nseen", "tokens\nwritten"),
               caption="K, M, B: thousands, millions, billions; exact counts in manifest.json")
    for name, st in m["sources"].items():
        t.add_row(name, str(st.get("domain", "")), *(compact(st.get(k, 0)) for k in (
            "documents_seen", "documents_kept", "documents_dropped", "documents_repeated", "tokens_seen", "tokens_written")))
    return t


def length_tables(m: dict[str, Any]) -> list[Table]:
    """Per source, per length bucket: documents and tokens before the plan (original length) and after (as written)."""
    tables = []
    for name, st in m["sources"].items():
        t = _table(f"{name} by document length (seen: original length; written: as written)", ("length",),
                   ("docs\nseen", "tokens\nseen", "docs\nkept", "docs\ndropped", "docs\nrepeated", "docs\nwritten",
                    "tokens\nwritten"))
        before, after = st.get("before_by_length", {}), st.get("after_by_length", {})
        for b in BUCKET_NAMES:
            if b not in before and b not in after:
                continue
            x, y = before.get(b, {}), after.get(b, {})
            t.add_row(b, *(compact(x.get(k, 0)) for k in ("documents", "tokens", "documents_kept", "documents_dropped",
                                                          "documents_repeated")),
                      compact(y.get("documents", 0)), compact(y.get("tokens", 0)))
        tables.append(t)
    return tables


def summary_lines(m: dict[str, Any]) -> list[str]:
    """Rejects, mix, replay and speed, one line each."""
    lines = []
    for src, reasons in m.get("rejects", {}).items():
        lines.append(f"[yellow]rejected in {src}:[/] " + ", ".join(f"{n:,} {r}" for r, n in reasons.items()) + " (see rejects.jsonl)")
    for name, st in m["sources"].items():
        if st.get("dropped_by_reason"):
            lines.append(f"dropped in {name}: " + ", ".join(f"{n:,} {r}" for r, n in st["dropped_by_reason"].items()))
        if st.get("tokens_removed_by_filter") or st.get("documents_filtered_out"):
            lines.append(f"sentence filter in {name}: {st['tokens_removed_by_filter']:,} tokens removed, "
                         f"{st['documents_filtered_out']:,} documents left empty")
        if st.get("documents_cut_by_budget"):
            lines.append(f"{name}: {st['documents_cut_by_budget']:,} document(s) cut where the budget ran out")
        if st.get("records_joined") or st.get("document_pieces"):
            lines.append(f"{name}: {st['records_joined']:,} records joined into groups; {st['document_pieces']:,} documents "
                         "are pieces (a group that came back, or a file or group above 64 MiB)")
        if st.get("budget_full_at"):
            lines.append(f"{name}: reading stopped at {st['budget_full_at']} after {st.get('records_read', 0):,} records, "
                         "as its budget was full; records after it were not read, so not checked")
        if st.get("short_of_budget"):
            lines.append(f"[yellow]{name} fell {st['short_of_budget']:,} tokens short of its budget of {st['budget']:,}[/]")
    if "mix" in m:
        mx = m["mix"]
        lines.append(f"mix: {mx['long_sequences']:,} long and {mx['short_sequences']:,} short sequences "
                     f"(long share {mx['long_share']:.1%}, target {mx['target_long_share']:.0%})")
    if "replay" in m:
        r = m["replay"]
        lines.append(f"replay set ({r['path']}/): {r['sequences']:,} sequences of {r['seq_len']:,} tokens, "
                     f"{r['tokens_written']:,} tokens, documents taken with p={r['keep_prob']:.4g} ({r['keep_prob_from']})")
    lines.append(f"{m['tokens_per_second']:,} tokens/s read; {m['tokens_left_over']:,} tokens left over (less than one sequence)")
    return lines


def plot_lengths(m: dict[str, Any], path: Path) -> Path:
    """A PNG with one panel per source: tokens per length bucket before and after the plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(m["sources"])
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.6 * len(names) + 0.6), squeeze=False)
    x = np.arange(len(BUCKET_NAMES))
    for ax, name in zip(axes[:, 0], names):
        st = m["sources"][name]
        before = [st.get("before_by_length", {}).get(b, {}).get("tokens", 0) for b in BUCKET_NAMES]
        after = [st.get("after_by_length", {}).get(b, {}).get("tokens", 0) for b in BUCKET_NAMES]
        ax.bar(x - 0.2, before, width=0.4, label="seen (original length)")
        ax.bar(x + 0.2, after, width=0.4, label="written (as written)")
        ax.set_xticks(x, BUCKET_NAMES)
        ax.set_ylabel("tokens")
        ax.set_title(f"{name} ({st.get('domain', '')})", fontsize=10)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("document length (tokens)")
    fig.suptitle(f"tokens by document length, plan {m['plan']}")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise LongforgeError(f"cannot write the histogram to {path} ({e.strerror}); pass --plot with a writable path.") from None
    finally:
        plt.close(fig)
    return path
