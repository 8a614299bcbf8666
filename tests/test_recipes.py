"""Presets: every shipped recipe validates, overrides apply, and running one names what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from longforge.config import apply_overrides, load_preset, parse_recipe
from longforge.errors import LongforgeError
from longforge.recipes import preset_names, preset_summary, preset_text, resolve_recipe_arg


def test_the_presets_are_shipped() -> None:
    assert {"demo", "longrecipe", "prolong", "ultralong", "fu2024", "pose"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_a_valid_recipe(name: str) -> None:
    r = parse_recipe(yaml.safe_load(preset_text(name)), name)
    assert r.description and r.stages
    assert preset_summary(name)["target_length"] == r.target_length


def test_presets_carry_the_papers_settings() -> None:
    ul, pl, lr, fu = (load_preset(n) for n in ("ultralong", "prolong", "longrecipe", "fu2024"))
    assert (ul.positions.method, ul.positions.beta_slow, ul.positions.beta_fast) == ("yarn", 1, 4)
    assert ul.data.separator == "text:<s>" and ul.stages[0].document_mask is False and ul.stages[0].lr == 3e-5
    assert pl.positions.theta == 8e6 and pl.data.long_share == 0.6 and pl.data.batch_order == "ssq"
    assert pl.stages[0].betas == (0.9, 0.95) and pl.stages[0].lr == 1e-5
    assert lr.positions.transform == "pit" and lr.data.seq_len == int(0.3 * 128000)
    assert [s.kind for s in lr.stages] == ["pretrain", "pretrain", "merge"] and lr.stages[1].lr == 5e-6
    assert fu.data.short_keep_prob == 0.1 and fu.data.short_threshold == 4096 and fu.stages[0].schedule == "constant"


def test_overrides() -> None:
    data = {"model": {"path": "a"}, "stages": [{"name": "x", "lr": 1.0}]}
    apply_overrides(data, ["model.path=/m", "stages.0.lr=2.0e-5", "eval.seed=3"], "t")
    assert data == {"model": {"path": "/m"}, "stages": [{"name": "x", "lr": 2e-5}], "eval": {"seed": 3}}
    with pytest.raises(LongforgeError, match="not an index"):
        apply_overrides(data, ["stages.4.lr=1"], "t")
    with pytest.raises(LongforgeError, match="is not KEY=VALUE"):
        apply_overrides(data, ["nonsense"], "t")
    r = load_preset("pose", ["target_length=65536", "model.path=ckpt", "stages.0.lr=1e-5"], base=Path("/w"))
    assert r.target_length == 65536 and r.model.path == Path("/w/ckpt") and r.stages[0].lr == 1e-5


def test_running_a_preset_as_is_names_the_missing_model(tmp_path: Path) -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "longforge", "run", "ultralong"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "/models/Llama-3.1-8B-Instruct does not exist" in res.stderr
    assert resolve_recipe_arg("pose") == (None, "pose")
    with pytest.raises(LongforgeError, match="neither a recipe file nor a preset"):
        resolve_recipe_arg("nope")
