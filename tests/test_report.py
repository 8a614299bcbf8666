"""The report: verdict, pipeline-ordered timings with cached stages, smoothed loss, eval folders (synthetic results)."""

from __future__ import annotations

import json
from pathlib import Path

from longforge.report.build import build_report, collect
from longforge.report.plots import smooth
from longforge.report.verdict import verdict

ORIGINAL = 128


def _eval(folder: Path, label: str, per_length: dict[int, float], ppl: dict[int, float]) -> None:
    """Write summary.json, passkey.json and ppl.json as the eval stage does."""
    folder.mkdir(parents=True)
    lengths, depths = sorted(per_length), [0.0, 0.5]
    grid = [[per_length[L]] * len(depths) for L in lengths]
    acc = sum(per_length.values()) / len(per_length)
    pk_summary = {"grid": grid, "per_length": {str(L): v for L, v in per_length.items()}, "accuracy": acc}
    samples = [{"length": L, "depth": d, "score": per_length[L]} for L in lengths for d in depths for _ in range(2)]
    (folder / "passkey.json").write_text(json.dumps({"task": "passkey", "lengths": lengths, "depths": depths, "trials": 2,
                                                     "samples": samples, "summary": pk_summary}))
    (folder / "ppl.json").write_text(json.dumps({"task": "ppl", "lengths": sorted(ppl),
                                                 "rows": [{"length": L, "ppl": v} for L, v in sorted(ppl.items())]}))
    (folder / "summary.json").write_text(json.dumps({"label": label, "original_length": ORIGINAL, "passkey": pk_summary,
                                                     "ppl": {str(L): v for L, v in ppl.items()}}))


def _done(folder: Path, seconds: float, finished: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "DONE.json").write_text(json.dumps({"fingerprint": "x", "seconds": seconds, "finished": finished}))


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    _eval(run / "eval" / "base", "base", {64: 1.0, 128: 1.0, 512: 0.0, 1024: 0.25}, {128: 20.0, 1024: 80.0})
    _eval(run / "eval" / "final", "final", {64: 1.0, 128: 0.75, 512: 1.0, 1024: 0.75}, {128: 21.0, 1024: 15.0})
    _done(run / "data", 3.0, "2026-01-01T00:00:01")
    _done(run / "rope", 0.1, "2026-01-01T00:00:02")
    _done(run / "train" / "extend", 100.0, "2026-01-01T00:01:00")
    _done(run / "train" / "merge", 2.0, "2026-01-01T00:01:05")
    _done(run / "eval" / "base", 9.0, "2026-01-01T00:01:10")
    _done(run / "eval" / "final", 8.0, "2026-01-01T00:01:20")
    (run / "train" / "sft").mkdir(parents=True)
    (run / "train" / "sft" / "DONE.json").write_text("")  # a damaged marker: not a finished stage
    (run / "timeline.json").write_text(json.dumps({"stages": {"data": "cached", "rope": "cached", "train/extend": "ran"}}))
    logs = [{"step": i + 1, "loss": 5.0 - 0.01 * i + (0.5 if i % 2 else -0.5)} for i in range(100)]
    (run / "train" / "extend" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logs))
    return run


def test_timings_follow_the_pipeline_and_say_which_stages_were_cached(tmp_path: Path) -> None:
    run = _run(tmp_path)
    info = collect(run)
    assert list(info["stages"]) == ["data", "rope", "train/extend", "train/merge", "eval/base", "eval/final"]
    md = build_report(run)["md"].read_text()
    assert "| data | 3.0 | 2026-01-01T00:00:01 | cached (done earlier) |" in md
    assert "| train/extend | 100.0 | 2026-01-01T00:01:00 | ran |" in md
    assert md.index("| rope |") < md.index("| train/extend |") < md.index("| eval/base |")


def test_verdict_reads_the_numbers_and_lists_the_checks(tmp_path: Path) -> None:
    run = _run(tmp_path)
    (run / "demo_checks.json").write_text(json.dumps({"checks": [
        {"check": "extended model, passkey over the whole grid", "value": 0.875, "target": ">= 90%", "pass": False},
        {"check": "base model, passkey inside its window", "value": 1.0, "target": ">= 90%", "pass": True}]}))
    paths = build_report(run)
    md = paths["md"].read_text()
    assert "## Verdict" in md
    assert "- **MISS** extended model, passkey over the whole grid: 88% (target >= 90%)" in md
    assert "- **PASS** base model, passkey inside its window: 100% (target >= 90%)" in md
    # base beyond the window: mean(0, 0.25) = 12%; final: mean(1, 0.75) = 88%; inside: 100% -> 88%.
    assert "beyond the original window of 128 tokens it went from 12% (base) to 88% (final)" in md
    assert "inside the window, from 100% to 88%" in md
    assert "Passkey retrieval, 16 prompts per model" in md
    assert "at 1024 tokens: 80.00 (base), 15.00 (final); at 128 tokens (inside the original window): 20.00 (base), 21.00 (final)" in md
    assert "±24 points" in md  # 1.96 * sqrt(0.25 / 16)
    html = paths["html"].read_text()
    assert "<b>MISS</b> extended model" in html and "<h2>Verdict</h2>" in html


def test_verdict_of_one_model() -> None:
    res = {"summary": {"per_length": {"64": 1.0, "256": 0.5}, "accuracy": 0.75}, "lengths": [64, 256], "depths": [0.5],
           "trials": 1}
    lines = verdict({"mine": {"passkey": res, "summary": {}}}, 128)
    assert lines[0].startswith("Passkey retrieval, 2 prompts per model: mine scores 100% inside the original window of "
                               "128 tokens and 50% beyond it.")


def test_report_of_a_folder_written_by_eval(tmp_path: Path) -> None:
    _eval(tmp_path / "ev", "my-model", {64: 1.0, 512: 0.5}, {128: 10.0})
    md = build_report(tmp_path / "ev")["md"].read_text()
    assert "| my-model | 100% | 50% |" in md
    assert (tmp_path / "ev" / "report" / "passkey.png").is_file()


def test_smooth_is_a_trailing_mean() -> None:
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([2.0, 4.0], 1) == [2.0, 4.0]
