"""Recipe validation: every mistake is one clear message naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from longforge.config import dump_recipe, load_recipe, parse_recipe
from longforge.errors import LongforgeError
from longforge.runner import preflight


def test_valid_recipe_gets_defaults(micro_recipe: dict) -> None:
    r = parse_recipe(micro_recipe)
    assert r.positions.method == "yarn"
    assert r.positions.beta_fast == 4
    assert r.stages[0].schedule == "cosine"
    assert r.eval.models == ["base", "final"]
    assert r.data.separator == "eos"
    # A dumped recipe parses back to the same recipe.
    assert parse_recipe(yaml.safe_load(dump_recipe(r))) == r


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (lambda r: r["positions"].update(metod="yarn"), "unknown key `positions.metod`; did you mean `method`?"),
        (lambda r: r["positions"].update(method="yarnn"), "`positions.method`"),
        (lambda r: r["stages"][0].update(steps="many"), "`stages.0.steps`"),
        (lambda r: r["stages"][0].update(steps=0), "`stages.0.steps` input should be greater than 0"),
        (lambda r: r.pop("target_length"), "`target_length` is required"),
        (lambda r: r["positions"].update(method="theta"), "method 'theta' needs `theta`"),
        (lambda r: r["positions"].update(beta_fast=1, beta_slow=4), "beta_fast (1.0) must be larger than beta_slow (4.0)"),
        (lambda r: r["data"].update(separator="<s>"), "`data.separator` must be 'eos', 'bos', 'none' or 'text:<literal>'"),
        (lambda r: r["data"]["sources"][0].update(weight=-1), "`data.sources.0.weight`"),
        (lambda r: r["stages"].append(dict(r["stages"][0])), "stage names must be unique"),
    ],
)
def test_bad_values_name_the_key(micro_recipe: dict, patch, expected: str) -> None:
    patch(micro_recipe)
    with pytest.raises(LongforgeError) as e:
        parse_recipe(micro_recipe, "r.yaml")
    assert expected in str(e.value)
    assert str(e.value).startswith("r.yaml:")


def test_unknown_method_lists_the_choices(micro_recipe: dict) -> None:
    micro_recipe["positions"]["method"] = "rope9"
    with pytest.raises(LongforgeError) as e:
        parse_recipe(micro_recipe)
    for name in ("pi", "ntk", "theta", "dynamic", "yarn", "llama3"):
        assert name in str(e.value)


def test_target_below_window_is_refused_before_work(micro_recipe: dict) -> None:
    micro_recipe["target_length"] = 32  # the tiny model's window is 64
    with pytest.raises(LongforgeError, match=r"`target_length` 32 is not above the model's window 64"):
        preflight(parse_recipe(micro_recipe))


def test_missing_source_is_refused_before_work(micro_recipe: dict, tmp_path: Path) -> None:
    micro_recipe["data"]["sources"][0]["path"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(LongforgeError, match=r"source 'long': .*nope.jsonl does not exist"):
        preflight(parse_recipe(micro_recipe))


def test_load_recipe_resolves_relative_paths(tmp_path: Path, micro_recipe: dict) -> None:
    micro_recipe["model"]["path"] = "ckpt"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(micro_recipe))
    r = load_recipe(tmp_path / "r.yaml")
    assert r.model.path == (tmp_path / "ckpt").resolve()


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("name: x\nstages: [\n  steps: 3\n")
    with pytest.raises(LongforgeError, match=r"not valid YAML at line \d+"):
        load_recipe(tmp_path / "r.yaml")


def test_recipe_must_be_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("- a\n- b\n")
    with pytest.raises(LongforgeError, match="must be a YAML mapping"):
        load_recipe(tmp_path / "r.yaml")


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(LongforgeError, match="does not exist"):
        load_recipe(tmp_path / "absent.yaml")
