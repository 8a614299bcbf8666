"""Options generated from the schema: every field a flag, defaults from the schema, errors that name the flag."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from typer.testing import CliRunner

from longforge.config import StageSpec
from longforge.errors import LongforgeError
from longforge.options import flag, option_kind, schema_parameters, spec_from_options, with_schema_options


def _app(seen: dict[str, Any]) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @with_schema_options(StageSpec, skip=("name", "kind"), panels={"sp": "Speed"})
    def train(model_dir: Annotated[Path, typer.Argument()], steps: Annotated[int, typer.Option()],
              schema_values: dict[str, Any] | None = None) -> None:
        """Train."""
        seen["spec"] = spec_from_options(StageSpec, {**(schema_values or {}), "steps": steps}, "train")

    @app.command()
    def other() -> None:
        """A second command, so typer keeps sub-command names."""

    return app


def test_every_settable_field_is_a_flag_and_unset_flags_keep_the_schema_defaults() -> None:
    seen: dict[str, Any] = {}
    res = CliRunner().invoke(_app(seen), ["train", "m", "--steps", "3", "--lr", "1e-3", "--betas", "0.8,0.9",
                                          "--no-lean-norm", "--weight-decay", "0", "--schedule", "constant"])
    assert res.exit_code == 0, res.output
    spec = seen["spec"]
    assert (spec.lr, spec.betas, spec.lean_norm, spec.weight_decay, spec.schedule) == (1e-3, (0.8, 0.9), False, 0.0, "constant")
    default = StageSpec(steps=3)
    assert (spec.min_lr_ratio, spec.fused_ops, spec.grad_accum) == (default.min_lr_ratio, default.fused_ops, default.grad_accum)
    names = {p.name for p in schema_parameters(StageSpec)}
    # Nested sections (sft, merge) are set with --set or a spec file; every other field has its flag.
    assert names == {n for n, f in StageSpec.model_fields.items() if option_kind(f.annotation) is not None}
    assert {"weight_decay", "betas", "min_lr_ratio", "lean_norm", "fused_ops"} <= names and "sft" not in names


def test_errors_name_the_flag() -> None:
    with pytest.raises(LongforgeError, match=r"^--lr: Input should be greater than 0 \(got -1\.0\)\.$"):
        spec_from_options(StageSpec, {"steps": 1, "lr": -1.0}, "train")
    with pytest.raises(LongforgeError, match=r"^--schedule: Input should be 'cosine' or 'constant' \(got 'linear'\)\.$"):
        spec_from_options(StageSpec, {"steps": 1, "schedule": "linear"}, "train")
    with pytest.raises(LongforgeError, match=r"--betas '0\.9,x' is not a comma-separated list of numbers"):
        spec_from_options(StageSpec, {"steps": 1, "betas": "0.9,x"}, "train")
    with pytest.raises(LongforgeError, match=r"^train: optimizer 'adamw_bf16' keeps bf16 weights; set precision: bf16"):
        spec_from_options(StageSpec, {"steps": 1, "optimizer": "adamw_bf16"}, "train")
    # A value from a spec file (not a flag) is named by its key.
    with pytest.raises(LongforgeError, match=r"spec\.yaml: `lr`"):
        spec_from_options(StageSpec, {"steps": 1}, "spec.yaml", base={"lr": -1})


def test_flags_and_help() -> None:
    assert flag("weight_decay") == "--weight-decay"
    res = CliRunner().invoke(_app({}), ["train", "--help"], env={"COLUMNS": "200"})
    assert "--weight-decay" in res.output and "--no-lean-norm" in res.output and "--tensorboard" in res.output
    assert "--no-tensorboard" not in res.output  # off by default: no --no- form
    assert "One of: cosine, constant (default: cosine)." in res.output and "(default: 0.1)." in res.output


def test_a_value_that_fits_no_branch_of_a_union_gives_one_sentence() -> None:
    """The eval flags are checked one by one against their plain types: `'auto' | int` failed once per branch."""
    from longforge.eval.command import build_spec

    with pytest.raises(LongforgeError) as e:
        build_spec({"kv_shards": "foo"})
    text = str(e.value)
    assert "\n" not in text and text.startswith("--kv-shards: ") and "'auto' or a valid integer" in text
    assert build_spec({"kv_shards": "2"}).inference.kv_shards == 2
