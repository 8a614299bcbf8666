"""The lab's report: one table (arms x metrics, mean and spread over seeds), plots, and the papers' claims
checked against the measured numbers."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NIAH_M = ("niah_multikey_1", "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery")


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not np.isnan(x)]
    return float(np.mean(xs)) if xs else None


def row_metrics(ev: dict[str, Any], window: int, target: int) -> dict[str, float | None]:
    """The numbers the table compares, from one evaluation summary (percentages 0-100, perplexities as is)."""
    pk = {int(k): 100 * v for k, v in ev["passkey"]["per_length"].items()}
    ru = ev.get("ruler", {})
    avg = {int(k): v for k, v in ru.get("average", {}).items()}
    per_task = ru.get("per_task", {})
    ppl = {int(k): v for k, v in ev.get("ppl", {}).items()}
    prose = {int(k): v for k, v in ev.get("ppl_prose", {}).items()}
    ext = [v for k, v in pk.items() if window < k <= target]
    ruler_ext = [v for k, v in avg.items() if window < k <= target]
    niahm = [v for t in NIAH_M for k, v in per_task.get(t, {}).items() if window < int(k) <= target]
    out: dict[str, float | None] = {
        "passkey_inside": _mean([v for k, v in pk.items() if k <= window]),
        "passkey_extended": _mean(ext),
        "passkey_beyond": _mean([v for k, v in pk.items() if k > target]),
        "ruler_extended": _mean(ruler_ext),
        "niah_m_extended": _mean(niahm),
        "long_score": _mean([x for x in (_mean(ext), _mean(ruler_ext)) if x is not None]),
        "ppl_window": ppl.get(window),
        "ppl_target": ppl.get(target),
        "ppl_2x": ppl.get(2 * target),
        # Retention at the original window (a given base): RULER at half the window, perplexity at a quarter of it.
        "ruler_half": avg.get(window // 2),
        "ppl_quarter": ppl.get(window // 4),
        "ppl_prose_quarter": prose.get(window // 4),
        "ppl_prose_target": prose.get(target),
        "ppl_prose_2x": prose.get(2 * target),
    }
    for k, v in avg.items():
        out[f"ruler@{k}"] = v
    return out


def prompt_counts(ev: dict[str, Any], window: int, target: int, trials: int, samples: int) -> dict[str, int]:
    """How many scored prompts stand behind each accuracy metric of row_metrics (passkey: depths x trials per length;
    RULER: tasks scored x samples per length)."""
    pk = ev["passkey"]
    per_pk = len(pk["grid"][0]) * trials if pk.get("grid") else 0
    pk_lengths = [int(k) for k in pk["per_length"]]
    per_task = ev.get("ruler", {}).get("per_task", {})

    def ruler(keep: Any, tasks: Any = None) -> int:
        return samples * sum(1 for t, by in per_task.items() if tasks is None or t in tasks for k in by if keep(int(k)))

    ext = lambda k: window < k <= target  # noqa: E731
    return {"passkey_inside": per_pk * sum(k <= window for k in pk_lengths),
            "passkey_extended": per_pk * sum(ext(k) for k in pk_lengths),
            "passkey_beyond": per_pk * sum(k > target for k in pk_lengths),
            "ruler_extended": ruler(ext), "niah_m_extended": ruler(ext, NIAH_M),
            "ruler_half": ruler(lambda k: k == window // 2)}


def sampling_error(pct: float, n: int) -> float:
    """Standard error, in points, of an accuracy of `pct`% measured on `n` prompts (binomial, with the Agresti-Coull
    adjustment so 0% and 100% on few prompts are not taken as exact)."""
    q = (pct / 100 * n + 2) / (n + 4)
    return 100 * float(np.sqrt(q * (1 - q) / (n + 4)))


def _errors(means: dict[str, float | None], counts: dict[str, int]) -> dict[str, float]:
    """Sampling errors of the accuracy metrics (long_score: half the root sum of squares of its two parts)."""
    out = {k: sampling_error(means[k], n) for k, n in counts.items() if n and means.get(k) is not None}  # type: ignore[arg-type]
    if "passkey_extended" in out and "ruler_extended" in out:
        out["long_score"] = 0.5 * float(np.hypot(out["passkey_extended"], out["ruler_extended"]))
    return out


@dataclass(frozen=True)
class Claim:
    """A paper's claim as a comparison of two lab rows on one metric."""

    text: str
    source: str
    metric: str
    a: str
    b: str
    lower_is_better: bool = False


# The zero-shot claims both labs test.
ZERO_SHOT_CLAIMS = [
    Claim("Without training, NTK-aware scaling extends further than PI", "NTK-aware / YaRN papers", "ppl_target",
          "ntk-0", "pi-0", lower_is_better=True),
    Claim("Without training, YaRN extends further than NTK-aware scaling", "YaRN (Peng et al. 2023)", "ppl_target",
          "yarn-0", "ntk-0", lower_is_better=True),
]

CLAIMS = [
    *ZERO_SHOT_CLAIMS,
    Claim("Continued pretraining is needed: trained YaRN retrieves far better than zero-shot YaRN", "all four recipes",
          "long_score", "yarn", "yarn-0"),
    Claim("YaRN beats NTK for continued pretraining (RULER<1M 80.17 vs 76.62)", "UltraLong", "long_score", "yarn", "ntk"),
    Claim("A larger RoPE base helps (theta 0.5M: 29.1, 8M: 54.6)", "ProLong", "long_score", "theta", "ntk"),
    Claim("Document masks help (54.6 vs 53.6 long-context average)", "ProLong", "long_score", "theta", "theta-nomask"),
    Claim("Training at 30% length with PIT matches full-length training (NIAH(M) 82.6 vs 73.2)", "LongRecipe",
          "long_score", "longrecipe", "ntk"),
    Claim("Impactful-sentence selection beats random selection at 30% (78.9 vs 70.1)", "LongRecipe",
          "long_score", "longrecipe", "pit-random"),
    Claim("PoSE (training at the original window) extends the window like full-length training (80.1 vs 73.2)",
          "LongRecipe's PoSE baseline", "long_score", "pose", "ntk"),
    Claim("Replay then merging with the original brings the short window back", "LongRecipe", "ppl_window",
          "longrecipe+replay+merge", "longrecipe", lower_is_better=True),
]


# The claims for a given pretrained base (`longforge lab --base`): its arms are each paper's recipe.
BASE_CLAIMS = [
    *ZERO_SHOT_CLAIMS,
    Claim("Dynamic NTK needs no training to keep the original window", "dynamic NTK (Reddit/emozilla, 2023)",
          "ppl_quarter", "dynamic-0", "ntk-0", lower_is_better=True),
    Claim("Continued pretraining is needed: trained YaRN (UltraLong) retrieves far better than zero-shot YaRN",
          "all four recipes", "long_score", "ultralong", "yarn-0"),
    Claim("Document masks help (54.6 vs 53.6 long-context average)", "ProLong", "long_score", "prolong",
          "prolong-nomask"),
    Claim("UltraLong's YaRN recipe beats a larger RoPE base with the same full-length training", "UltraLong",
          "long_score", "ultralong", "fu"),
    # On the paper's own metric (its multi-key, multi-value and multi-query NIAH tasks), not on long_score, which
    # passkey alone can carry.
    Claim("Training at 30% length with PIT matches full-length training (NIAH(M) 82.6 vs 73.2)", "LongRecipe",
          "niah_m_extended", "longrecipe", "fu"),
    Claim("PoSE (training at the original window) extends the window like full-length training", "PoSE (Zhu et al. 2024)",
          "long_score", "pose", "fu"),
    Claim("Replay then merging with the original brings the short window back", "LongRecipe", "ppl_quarter",
          "longrecipe+replay+merge", "longrecipe", lower_is_better=True),
    Claim("Extension keeps the original window: ProLong's RULER at half the window is the base's", "ProLong",
          "ruler_half", "prolong", "base"),
    Claim("Extension keeps the original window: UltraLong's RULER at half the window is the base's", "UltraLong",
          "ruler_half", "ultralong", "base"),
]


def aggregate(rows: list[dict[str, Any]], window: int, target: int, trials: int = 0,
              samples: int = 0) -> dict[str, dict[str, Any]]:
    """Per row name: label, seeds, mean and half-range of every metric, the sampling error of the accuracy metrics
    (given passkey trials per cell and RULER samples per task; over every seed's prompts), tokens and seconds."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["row"]].append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in by.items():
        ms = [row_metrics(r["eval"], window, target) for r in rs]
        keys = sorted({k for m in ms for k in m})
        stats = {}
        for k in keys:
            vals = [m[k] for m in ms if m.get(k) is not None]
            stats[k] = {"mean": float(np.mean(vals)) if vals else None,
                        "spread": float((max(vals) - min(vals)) / 2) if len(vals) > 1 else None, "values": vals}
        if trials and samples:
            counts = [prompt_counts(r["eval"], window, target, trials, samples) for r in rs]
            total = {k: sum(c[k] for c in counts) for k in counts[0]}
            for k, e in _errors({k: v["mean"] for k, v in stats.items()}, total).items():
                stats[k]["sampling_error"] = e
        out[name] = {"label": rs[0]["label"], "arm": rs[0]["arm"], "seeds": [r["seed"] for r in rs],
                     "tokens": rs[0]["tokens"], "train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
                     "eval_seconds": float(np.mean([r["eval_seconds"] for r in rs])), "metrics": stats}
    return out


def verdict(claim: Claim, agg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether the measured numbers agree with a claim, given the spread between seeds."""
    if claim.a not in agg or claim.b not in agg:
        return {"verdict": "not run", "a": None, "b": None}
    a, b = agg[claim.a]["metrics"].get(claim.metric), agg[claim.b]["metrics"].get(claim.metric)
    if a is None or b is None or a["mean"] is None or b["mean"] is None:
        return {"verdict": "not measured", "a": None, "b": None}
    diff = (b["mean"] - a["mean"]) if claim.lower_is_better else (a["mean"] - b["mean"])
    spreads = [s for s in (a["spread"], b["spread"]) if s is not None]
    noise = max(spreads) if spreads else None
    # Two standard errors of the difference: the prompts are a sample too (a few dozen per arm and length).
    errors = [x.get("sampling_error") for x in (a, b)]
    margin = 2 * float(np.hypot(*errors)) if None not in errors else None
    if abs(diff) < 1e-9:
        word = "no difference"
    elif noise is not None and abs(diff) <= noise:
        word = "within the seed spread"
    elif margin is not None and abs(diff) <= margin:
        word = f"within the sampling error (±{margin:.1f})"
    else:
        word = "holds" if diff > 0 else "does not hold"
    if noise is None:
        word += " (one seed)"
    return {"verdict": word, "a": a["mean"], "b": b["mean"], "difference": diff, "seed_spread": noise,
            "sampling_margin": margin}


def _fmt(stat: dict[str, Any] | None, pct: bool = False) -> str:
    if not stat or stat["mean"] is None:
        return "-"
    m = f"{stat['mean']:.0f}" if pct else f"{stat['mean']:.1f}"
    return m + (f" ±{stat['spread']:.0f}" if pct else f" ±{stat['spread']:.1f}") if stat["spread"] is not None else m


def table(agg: dict[str, dict[str, Any]], window: int, target: int, ruler_lengths: list[int],
          prose: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the arms x metrics table (with `prose`, perplexity on held-out prose too)."""
    code = "code " if prose else ""
    head = ["row", "what", "seeds", "train tokens", "train s", f"passkey <= {window}", f"passkey {window}-{target}",
            f"passkey {target}-{2 * target}"] + [f"RULER@{L}" for L in ruler_lengths] + [
            f"NIAH(M) {window}-{target}", f"{code}ppl@{window}", f"{code}ppl@{target}", f"{code}ppl@{2 * target}"]
    if prose:
        head += [f"prose ppl@{target}", f"prose ppl@{2 * target}"]
    rows = []
    for name, a in agg.items():
        m = a["metrics"]
        rows.append([name, a["label"], ",".join(map(str, a["seeds"])), f"{a['tokens']:,}", f"{a['train_seconds']:.0f}",
                     _fmt(m.get("passkey_inside"), True), _fmt(m.get("passkey_extended"), True),
                     _fmt(m.get("passkey_beyond"), True)] + [_fmt(m.get(f"ruler@{L}"), True) for L in ruler_lengths]
                    + [_fmt(m.get("niah_m_extended"), True), _fmt(m.get("ppl_window")), _fmt(m.get("ppl_target")),
                       _fmt(m.get("ppl_2x"))]
                    + ([_fmt(m.get("ppl_prose_target")), _fmt(m.get("ppl_prose_2x"))] if prose else []))
    return head, rows


def _md(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows])


def curves(rows: list[dict[str, Any]], window: int, target: int, path: Path) -> Path:
    """Passkey accuracy, RULER average and perplexity against length, one line per row (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("passkey accuracy (%)", lambda ev: {int(k): 100 * v for k, v in ev["passkey"]["per_length"].items()}),
              ("RULER average (%)", lambda ev: {int(k): v for k, v in ev.get("ruler", {}).get("average", {}).items()}),
              ("perplexity", lambda ev: {int(k): v for k, v in ev.get("ppl", {}).items()})]
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["row"]].append(r)
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(by), 2)))
    for ax, (title, get) in zip(axes, panels):
        for color, (name, rs) in zip(colors, by.items()):
            series = [get(r["eval"]) for r in rs]
            xs = sorted(set().union(*series))
            ys = [np.mean([s[x] for s in series if x in s]) for x in xs]
            ax.plot(xs, ys, marker="o", markersize=3, color=color, label=name,
                    linestyle="--" if name.endswith("-0") or name == "base" else "-")
        ax.set_xscale("log", base=2)
        for x in (window, target):
            ax.axvline(x, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(title)
        ax.set_xlabel("length (tokens)")
        if title == "perplexity":
            ax.set_yscale("log")
    if by:
        axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"lab: window {window} -> {target} (dotted lines); dashed = no training")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def budget_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The held-out loss at each validation of every trained arm (mean over seeds), columns by training tokens."""
    by: dict[str, list[list[list[float]]]] = defaultdict(list)
    for r in rows:
        if r.get("val_curve"):
            by[r["row"]].append(r["val_curve"])
    if not by:
        return [], []
    points = max((c for cs in by.values() for c in cs), key=len)
    head = ["row"] + [f"{t / 1e6:.1f}M tokens" for t, _ in points]
    out = []
    for name, curves in by.items():
        cells = [f"{np.mean([c[i][1] for c in curves if i < len(c)]):.4f}" if any(i < len(c) for c in curves) else "-"
                 for i in range(len(points))]
        out.append([name, *cells])
    return head, out


def last_quarter(curve: list[list[float]]) -> float | None:
    """Relative change of the held-out loss over the last quarter of the budget (from the validation nearest 3/4 of
    the tokens to the last); None for a curve too short to say."""
    if len(curve) < 2:
        return None
    end_tokens, end_loss = curve[-1]
    start = min(curve[:-1], key=lambda p: abs(p[0] - 0.75 * end_tokens))
    return (end_loss - start[1]) / start[1]


def budget_reading(rows: list[dict[str, Any]]) -> str:
    """One sentence on where more tokens stop paying: the arm with the lowest final held-out loss, and how much that
    loss still moved over the last quarter of its budget."""
    curves = [(r["row"], r["val_curve"]) for r in rows if len(r.get("val_curve") or []) >= 2]
    if not curves:
        return ""
    name, best = min(curves, key=lambda c: c[1][-1][1])
    change = last_quarter(best)
    assert change is not None
    return (f"The lowest held-out loss at the end is {name}'s ({best[-1][1]:.4f} after {best[-1][0] / 1e6:.1f}M tokens); "
            f"over the last quarter of its budget it changed by {100 * change:+.1f}%.")


def budget_plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Held-out loss against training tokens, one line per trained row (None when no row has a curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r["row"], r["val_curve"]) for r in rows if r.get("val_curve")]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves:
        ax.plot([t / 1e6 for t, _ in c], [v for _, v in c], marker="o", markersize=3, label=name)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("held-out loss at the target length")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _train_seconds(rows: list[dict[str, Any]]) -> float:
    """Training time over all arms and seeds (a row's seconds include its earlier stages, so take each arm's last)."""
    last: dict[tuple[str, int], float] = {}
    for r in rows:
        key = (r["arm"], r["seed"])
        last[key] = max(last.get(key, 0.0), float(r["train_seconds"]))
    return sum(last.values())


def retention_table(agg: dict[str, dict[str, Any]], window: int) -> tuple[list[str], list[list[str]]]:
    """What each row keeps at the original window, against the base: RULER at w/2, perplexity at w/4 (code and
    prose), passkey up to w; differences from the base in brackets."""
    keys = [("ruler_half", f"RULER@{window // 2}", True), ("ppl_quarter", f"code ppl@{window // 4}", False),
            ("ppl_prose_quarter", f"prose ppl@{window // 4}", False), ("passkey_inside", f"passkey <= {window}", True)]
    base = agg.get("base", {}).get("metrics", {})
    rows = []
    for name, a in agg.items():
        cells = [name]
        for key, _, pct in keys:
            stat, ref = a["metrics"].get(key), base.get(key)
            cell = _fmt(stat, pct)
            if name != "base" and stat and ref and stat["mean"] is not None and ref["mean"] is not None:
                cell += f" ({stat['mean'] - ref['mean']:+.{0 if pct else 2}f})"
            cells.append(cell)
        rows.append(cells)
    return ["row"] + [h for _, h, _ in keys], rows


def write_lab_report(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """LAB.md, lab.json (aggregates and verdicts) and lab_curves.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    w, t = results["window"], results["target"]
    rows = results["rows"]
    pretrained = bool(results.get("pretrained"))
    claims = BASE_CLAIMS if pretrained else CLAIMS
    p = results["profile"]
    agg = aggregate(rows, w, t, p.get("passkey_trials", 0), p.get("ruler_samples", 0))
    verdicts = [{"claim": c.text, "source": c.source, "metric": c.metric, "a": c.a, "b": c.b, **verdict(c, agg)}
                for c in claims]
    ruler_lengths = sorted({int(k) for r in rows for k in r["eval"].get("ruler", {}).get("average", {})})
    head, trows = table(agg, w, t, ruler_lengths, prose=pretrained)
    png = curves(rows, w, t, out / "lab_curves.png")
    b = results["base"]
    if pretrained:
        about = (f"Base model: {b.get('path')} ({b.get('params') or 0:,} parameters, window {w}, as given: not trained by "
                 f"the lab). Corpus: {b.get('corpus')} ({b.get('corpus_tokens') or 'sizes not recorded'}); "
                 f"essay haystack: {b.get('essays')}. Every trained arm extends it to {t} tokens ({t // w}x) with "
                 f"{p['ext_steps']} steps x {p['ext_batch'] * t:,} tokens. Compute time: "
                 f"training {_train_seconds(rows):.0f} s, evaluation {sum(r['eval_seconds'] for r in rows):.0f} s.")
    else:
        about = (f"Base model: {b.get('params') or 0:,} parameters, window {w}, pretrained on {b.get('tokens') or 0:,} tokens "
                 f"in {b.get('seconds') or 0:.0f} s. Every trained arm extends it to {t} tokens ({t // w}x) with "
                 f"{p['ext_steps']} steps x {p['ext_batch'] * t:,} tokens. Compute time: base {b.get('seconds') or 0:.0f} s, "
                 f"training {_train_seconds(rows):.0f} s, "
                 f"evaluation {sum(r['eval_seconds'] for r in rows):.0f} s.")
    extra: list[str] = []
    if pretrained:
        rhead, rrows = retention_table(agg, w)
        extra += ["## Retention at the original window (against the base)", "", _md(rhead, rrows), ""]
    bhead, brows = budget_table(rows)
    if brows:
        budget_plot(rows, out / "lab_budget.png")
        extra += ["## The budget: held-out loss while training", "",
                  "Loss on held-out code and prose packed at the target length (contiguous positions, each arm's own "
                  "document masks), every eighth of the budget; where it flattens, more tokens stop paying.", "",
                  _md(bhead, brows), "", budget_reading(rows), "", "![budget](lab_budget.png)", ""]
    missing = results.get("not_run") or []
    if missing:
        extra += ["## Arms not run", "", _md(["arm", "seed", "what", "reason"],
                                             [[m["arm"], str(m["seed"]), m["label"], m["reason"]] for m in missing]), ""]
    lines = [f"# longforge lab ({p['name']} profile)", "", about,
             "long_score = mean of passkey accuracy and RULER average over lengths in (window, target]; NIAH(M) = "
             "LongRecipe's metric (multikey, multivalue, multiquery).",
             "Numbers are mean ± half the range over the seeds listed; passkey and RULER in %. A claim's difference "
             "within two standard errors of the prompts' sampling (binomial over the prompts behind each number) is "
             "reported as within the sampling error, not as holding.", "",
             _md(head, trows), "", *extra, "## The papers' claims at this scale", "",
             _md(["claim", "source", "metric", "rows", "measured", "verdict"],
                 [[v["claim"], v["source"], v["metric"], f"{c.a} vs {c.b}",
                   "-" if v.get("difference") is None else f"{v['a']:.1f} vs {v['b']:.1f}", v["verdict"]]
                  for v, c in zip(verdicts, claims)]), "",
             f"![curves]({png.name})", ""]
    md = out / "LAB.md"
    md.write_text("\n".join(lines))
    (out / "lab.json").write_text(json.dumps({"rows": agg, "claims": verdicts, "not_run": missing}, indent=1))
    return {"md": md, "json": out / "lab.json", "png": png}
