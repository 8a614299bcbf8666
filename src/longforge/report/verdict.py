"""The report's written verdict: the run's checks and one paragraph that reads the results, computed from the numbers."""

from __future__ import annotations

from typing import Any

REFERENCE = "base"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def _bands(res: dict[str, Any], original: int) -> dict[str, float | None]:
    """Mean score inside the original window, beyond it, and over the grid."""
    per = {int(k): float(v) for k, v in res["summary"]["per_length"].items()}
    inside = [v for L, v in per.items() if L <= original]
    beyond = [v for L, v in per.items() if L > original]
    return {"inside": sum(inside) / len(inside) if inside else None,
            "beyond": sum(beyond) / len(beyond) if beyond else None, "all": res["summary"]["accuracy"]}


def _prompts(res: dict[str, Any]) -> int:
    """Prompts behind a grid task's scores."""
    if res.get("samples") is not None:
        return len(res["samples"])
    return len(res["lengths"]) * len(res["depths"]) * int(res.get("trials", 1))


def _grid_sentence(task: str, results: dict[str, dict[str, Any]], original: int) -> str | None:
    """Passkey or NIAH: beyond the window (what extension is for) and inside it (what it may cost)."""
    have = {label: e[task] for label, e in results.items() if task in e}
    if not have:
        return None
    name = {"passkey": "Passkey retrieval", "niah": "Needle-in-a-haystack (ROUGE-1 F1)"}[task]
    n = max(_prompts(r) for r in have.values())
    bands = {label: _bands(r, original) for label, r in have.items()}
    if REFERENCE in bands and len(bands) > 1:
        ref = bands[REFERENCE]
        parts = []
        for label, b in bands.items():
            if label == REFERENCE:
                continue
            parts.append(f"beyond the original window of {original} tokens it went from {_pct(ref['beyond'])} "
                         f"({REFERENCE}) to {_pct(b['beyond'])} ({label}); inside the window, from {_pct(ref['inside'])} "
                         f"to {_pct(b['inside'])}")
        return f"{name}, {n} prompts per model: " + "; ".join(parts) + "."
    return f"{name}, {n} prompts per model: " + "; ".join(
        f"{label} scores {_pct(b['inside'])} inside the original window of {original} tokens and {_pct(b['beyond'])} beyond it"
        for label, b in bands.items()) + "."


def _ppl_sentence(results: dict[str, dict[str, Any]], original: int) -> str | None:
    """Perplexity at the longest length every model reached, and at the original window."""
    have = {label: e["summary"].get("ppl") or {} for label, e in results.items()}
    have = {k: v for k, v in have.items() if v}
    if not have:
        return None
    common = set.intersection(*[{int(k) for k, v in p.items() if v} for p in have.values()])
    if not common:
        return None
    longest = max(common)
    at_window = max((L for L in common if L <= original), default=None)

    def row(L: int) -> str:
        return ", ".join(f"{have[label][str(L)]:.2f} ({label})" for label in have)

    text = f"Held-out perplexity at {longest} tokens: {row(longest)}"
    if at_window is not None and at_window != longest:
        text += f"; at {at_window} tokens (inside the original window): {row(at_window)}"
    return text + "."


def _ruler_sentence(results: dict[str, dict[str, Any]]) -> str | None:
    """RULER: the average at the longest length and the effective length of each model."""
    have = {label: e["ruler"]["summary"] for label, e in results.items() if "ruler" in e}
    if not have:
        return None
    parts = []
    for label, s in have.items():
        longest = max(s["average"], key=int) if s["average"] else None
        avg = "-" if longest is None else f"{s['average'][longest]:.1f} at {longest} tokens"
        parts.append(f"{label} averages {avg}, effective length {s.get('effective_length') or '-'}")
    return "RULER: " + "; ".join(parts) + "."


def verdict(evals: dict[str, dict[str, Any]], original: int, checks: list[dict[str, Any]] | None = None) -> list[str]:
    """Lines of the verdict: PASS/MISS per check, then one paragraph reading the results."""
    lines = []
    for c in checks or []:
        value = "-" if c.get("value") is None else _pct(c["value"])
        lines.append(f"- **{'PASS' if c['pass'] else 'MISS'}** {c['check']}: {value} (target {c['target']})")
    sentences = [s for s in (_grid_sentence("passkey", evals, original), _grid_sentence("niah", evals, original),
                             _ruler_sentence(evals), _ppl_sentence(evals, original)) if s]
    if sentences:
        n = max((_prompts(e[t]) for e in evals.values() for t in ("passkey", "niah") if t in e), default=0)
        if n:
            # The widest 95% binomial interval (p = 0.5) of a score over n prompts, for one seed.
            sentences.append(f"One seed: a score over {n} prompts is known to about ±{196 * (0.25 / n) ** 0.5:.0f} "
                             "points (95%), and a band over fewer prompts less precisely.")
        lines.append(" ".join(sentences))
    return lines
