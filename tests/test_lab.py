"""The lab end to end at CI size, and its claim verdicts on hand-made numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longforge.errors import LongforgeError
from longforge.lab.arms import PROFILES, arms, schedule, theta_for, train_length
from longforge.lab.report import Claim, aggregate, verdict


def test_every_arm_trains_on_the_same_tokens_per_step() -> None:
    p = PROFILES["cuda"]
    for arm in arms(p):
        steps, batch = schedule(arm, p)
        total = steps * batch * train_length(arm, p)
        assert abs(total - p.ext_steps * p.tokens_per_step) <= 0.01 * p.ext_steps * p.tokens_per_step, arm.name
    assert p.pit_length == 4864 and p.target == 16384
    assert theta_for(5e5, 8) == pytest.approx(8e6, rel=0.01)  # ProLong's 64K base from Llama-3's 5e5


def _row(name: str, seed: int, pk: float, ppl: float) -> dict:
    ev = {"passkey": {"per_length": {"64": 1.0, "256": pk}}, "ruler": {"average": {"256": 100 * pk}, "per_task": {}},
          "ppl": {"64": ppl, "256": ppl}}
    return {"row": name, "arm": name, "label": name, "seed": seed, "tokens": 1, "train_seconds": 1.0,
            "eval_seconds": 1.0, "eval": ev}


def test_verdicts_follow_the_numbers_and_the_seed_spread() -> None:
    rows = [_row("a", 0, 0.9, 10.0), _row("a", 1, 0.8, 11.0), _row("b", 0, 0.5, 20.0), _row("b", 1, 0.6, 21.0),
            _row("c", 0, 0.82, 12.0), _row("c", 1, 0.9, 12.0)]
    agg = aggregate(rows, 64, 256)
    assert agg["a"]["metrics"]["passkey_extended"]["mean"] == pytest.approx(85.0)
    assert agg["a"]["metrics"]["passkey_extended"]["spread"] == pytest.approx(5.0)
    assert verdict(Claim("a beats b", "x", "long_score", "a", "b"), agg)["verdict"] == "holds"
    assert verdict(Claim("b beats a", "x", "long_score", "b", "a"), agg)["verdict"] == "does not hold"
    assert verdict(Claim("a beats c", "x", "long_score", "a", "c"), agg)["verdict"] == "within the seed spread"
    assert verdict(Claim("a lower ppl", "x", "ppl_window", "a", "b", lower_is_better=True), agg)["verdict"] == "holds"
    assert verdict(Claim("missing", "x", "long_score", "a", "zzz"), agg)["verdict"] == "not run"


def test_tiny_lab_runs_every_kind_of_arm_and_writes_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longforge.lab.run import run_lab

    monkeypatch.setenv("LONGFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "lab"
    run_lab(out, device="cpu", profile_name="tiny", seeds=[0], arm_names=["base", "yarn-0", "pose", "longrecipe"])
    res = json.loads((out / "results.json").read_text())
    names = [r["row"] for r in res["rows"]]
    # LongRecipe brings the NTK arm its analysis needs, and reports each of its stages.
    assert names == ["base", "yarn-0", "ntk", "pose", "longrecipe", "longrecipe+replay", "longrecipe+replay+merge"]
    trained = {r["row"]: r["tokens"] for r in res["rows"]}
    assert trained["base"] == 0 and trained["ntk"] == trained["pose"] > 0
    assert trained["longrecipe+replay"] > trained["longrecipe"]
    assert (out / "seed0" / "impactful" / "profile.json").is_file()
    md = (out / "report" / "LAB.md").read_text()
    assert "| longrecipe+replay+merge |" in md and "The papers' claims" in md and (out / "report" / "lab_curves.png").is_file()
    with pytest.raises(LongforgeError, match="unknown lab arm 'nope'"):
        run_lab(out, device="cpu", profile_name="tiny", seeds=[0], arm_names=["nope"])
