"""Experiment at the demo's scale (CPU): does merging recover the short window, and does impactful-sentence
selection beat random selection at 30% training length (LongRecipe's two claims)?

Usage: python benchmarks/recipe_parts_cpu.py [--record] [--work DIR]
Needs the demo's assets (built on the way if missing: about 4 minutes). Everything runs through longforge's
own stages: merge, analyze impactful, run (data with a sentence filter, PIT, training, eval).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def bands(summary: dict[str, Any], window: int) -> dict[str, float | None]:
    """Passkey inside the window, at 4x-8x, overall; perplexity at the window and at the longest length."""
    per = {int(k): v for k, v in summary["passkey"]["per_length"].items()}
    ppl = {int(k): v for k, v in summary["ppl"].items()}

    def mean(vals: list[float]) -> float | None:
        return sum(vals) / len(vals) if vals else None

    return {"inside": mean([v for k, v in per.items() if k <= window]),
            "4x-8x": mean([v for k, v in per.items() if 4 * window <= k <= 8 * window]),
            "all": summary["passkey"]["accuracy"], "ppl_short": ppl.get(window // 4), "ppl_window": ppl.get(window),
            "ppl_long": ppl.get(max(ppl))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lf-recipe-parts"))
    args = ap.parse_args()
    os.environ.setdefault("LONGFORGE_QUIET", "1")
    import torch

    from longforge.analyze.impactful import analyze, write_profile
    from longforge.config import parse_recipe
    from longforge.demo.run import PROFILES, build_assets, cache_root, demo_recipe
    from longforge.config import fingerprint
    from dataclasses import asdict
    from longforge.eval.run import evaluate
    from longforge.hf import load_model, load_tokenizer
    from longforge.merge import merge
    from longforge.runner import run_recipe

    t0 = time.time()
    profile = PROFILES["cpu"]
    window = profile.base.window
    cache = cache_root() / f"demo-{profile.name}-{fingerprint(asdict(profile))}"
    assets = build_assets(profile, cache, torch.device("cpu"), 0)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    recipe = demo_recipe(profile, assets, "cpu", 0)
    # 1. The demo's own extension (YaRN, full 2048-token training), as the reference "extended" model.
    full = run_recipe(parse_recipe(recipe, "demo"), work / "full")
    extended = Path(full["final"])
    ev = parse_recipe(recipe, "demo").eval
    results: dict[str, dict[str, Any]] = {}
    for label in ("base", "final"):
        results["base" if label == "base" else "extended (full-length YaRN)"] = json.loads(
            (work / "full" / "eval" / label / "summary.json").read_text())
    # 2. LongRecipe's merge: 0.5 original + 0.5 extended.
    merge([assets["base"], extended], [0.5, 0.5], work / "merged")
    results["merged 0.5/0.5"] = evaluate(work / "merged", ev, work / "eval-merged", window, profile.target_length,
                                         torch.device("cpu"), "merged")
    # 3. Impactful-token profile of base vs extended on held-out code.
    tok = load_tokenizer(extended)
    texts = [json.loads(x)["text"] for x in (assets["corpus"] / "heldout.jsonl").read_text().splitlines()]
    prof = analyze(load_model(assets["base"]), load_model(extended), tok, texts, profile.target_length, top=0.2)
    paths = write_profile(prof, work / "profile")
    # 4. 30%-length training with PIT, sentences chosen by the profile vs at random, equal token budgets.
    seq = int(0.3 * profile.target_length) // 8 * 8
    tokens = profile.ext_steps * profile.ext_batch * profile.target_length
    batch = 6
    steps = tokens // (seq * batch)
    for method in ("profile", "random"):
        r = json.loads(json.dumps(recipe))
        r["name"] = f"pit-30pct-{method}"
        r["data"]["seq_len"] = seq
        r["data"]["token_budget"] = steps * batch * seq + 8 * seq
        r["data"]["sentence_filter"] = {"method": method, "budget_fraction": 0.3, "min_document_tokens": 64,
                                        **({"profile": str(paths["json"])} if method == "profile" else {})}
        r["positions"]["transform"] = "pit"
        r["stages"][0].update(steps=steps, batch_size=batch)
        r["eval"]["models"] = ["final"]
        run_recipe(parse_recipe(r, r["name"]), work / r["name"])
        results[f"30% length + PIT, {method} sentences"] = json.loads(
            (work / r["name"] / "eval" / "final" / "summary.json").read_text())
    rows = {k: bands(v, window) for k, v in results.items()}
    lines = [f"\n## LongRecipe's parts at the demo's scale ({dt.date.today().isoformat()})",
             "- command: `python benchmarks/recipe_parts_cpu.py --record`",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores; the demo's base (window {window}) and extension to "
             f"{profile.target_length}; equal training tokens ({tokens}) for every trained row",
             f"- impactful types (top 20% of tokens by extended-minus-base true-token logit, {prof.meta['texts']} held-out "
             f"files of {profile.target_length} tokens): " + ", ".join(
                 f"{r['type']} {r['impactful_share']:.2f} (lift {r['lift']:.2f})" for r in prof.rows[:5])
             + f"; selected: {', '.join(prof.selected) or 'none'}",
             f"- 30%-length runs: sequences of {seq} tokens, {steps} steps of {batch}, PIT positions to {profile.target_length}",
             "",
             f"| model | passkey <= {window} | passkey 4x-8x | passkey all | ppl@{window // 4} | ppl@{window} | ppl@{profile.target_length} |",
             "|---|---|---|---|---|---|---|"]
    for name, b in rows.items():
        def f(x: float | None, pct: bool) -> str:
            return "-" if x is None else (f"{x * 100:.0f}%" if pct else f"{x:.2f}")
        lines.append(f"| {name} | {f(b['inside'], True)} | {f(b['4x-8x'], True)} | {f(b['all'], True)} | "
                     f"{f(b['ppl_short'], False)} | {f(b['ppl_window'], False)} | {f(b['ppl_long'], False)} |")
    lines.append(f"- wall time {time.time() - t0:.0f} s")
    print("\n".join(lines))
    (work / "results.json").write_text(json.dumps({"rows": rows, "profile": prof.to_json()}, indent=1))
    if args.record:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
