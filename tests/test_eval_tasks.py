"""The eval task registry, and `longforge eval`'s flags: the tasks asked for run and no other, errors name the flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import yaml
from typer.testing import CliRunner

from longforge.config import EvalSpec
from longforge.errors import LongforgeError
from longforge.eval.command import build_spec, task_sections

pytestmark = pytest.mark.usefixtures("one_thread")


def _eval(*args: str) -> None:
    from longforge.cli import app

    res = CliRunner().invoke(app, ["eval", *args])
    assert res.exit_code == 0, (res.output, res.exception)


def test_tasks_flag_runs_those_tasks_and_no_passkey_grid(model_dir: Path, corpus_dir: Path, tmp_path: Path) -> None:
    """`--tasks ruler` (or ppl) used to run the default passkey grid too: the flags dropped `passkey: None`."""
    _eval(str(model_dir), "--out", str(tmp_path / "r"), "--tasks", "ruler", "--ruler-tasks", "niah_single_1",
          "--ruler-lengths", "200", "--samples", "1", "--target-length", "256")
    assert (tmp_path / "r" / "ruler.json").is_file() and not (tmp_path / "r" / "passkey.json").exists()
    assert "passkey" not in json.loads((tmp_path / "r" / "summary.json").read_text())
    _eval(str(model_dir), "--out", str(tmp_path / "p"), "--tasks", "ppl", "--ppl-source",
          str(corpus_dir / "heldout.jsonl"), "--ppl-lengths", "64", "--target-length", "64")
    assert sorted(p.name for p in (tmp_path / "p").glob("*.json")) == ["ppl.json", "summary.json"]


def test_a_null_section_in_a_spec_file_is_off(model_dir: Path, tmp_path: Path) -> None:
    """`passkey: null` in an --spec file used to turn back into the default passkey grid."""
    spec = tmp_path / "eval.yaml"
    spec.write_text(yaml.safe_dump({"eval": {"passkey": None, "ruler": {"tasks": ["fwe"], "lengths": [200],
                                                                        "samples": 1}}}))
    _eval(str(model_dir), "--out", str(tmp_path / "o"), "--spec", str(spec), "--target-length", "256")
    assert (tmp_path / "o" / "ruler.json").is_file() and not (tmp_path / "o" / "passkey.json").exists()


def test_flags_choose_tasks_and_set_their_sections(tmp_path: Path) -> None:
    assert build_spec({}).passkey is not None  # nothing asked: the passkey grid
    only = build_spec({}, "ruler")
    assert only.passkey is None and only.niah is None and only.ppl is None and only.ruler is not None
    # A task's own flag adds it; the shared grid flags set both grid tasks.
    spec = build_spec({"ppl_source": "held.jsonl", "lengths": "64,128", "niah_needle": "The key is 7.", "seed": 3})
    assert spec.ppl is not None and spec.ppl.source == Path("held.jsonl")
    assert spec.passkey is not None and spec.niah is not None and spec.ruler is None and spec.seed == 3
    assert spec.passkey.lengths == spec.niah.lengths == [64, 128] and spec.niah.needle == "The key is 7."
    assert build_spec({"ruler_tasks": "fwe,vt", "samples": 2}, "ruler").ruler.tasks == ["fwe", "vt"]  # type: ignore[union-attr]
    # Flags go over a spec file's values; its relative paths are the file's.
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"eval": {"passkey": {"depths": 3, "trials": 2},
                                                              "ppl": {"source": "docs.jsonl", "num_docs": 4}}}))
    spec = build_spec({"depths": 5}, spec_file=tmp_path / "s.yaml")
    assert spec.passkey is not None and (spec.passkey.depths, spec.passkey.trials) == (5, 2)
    assert spec.ppl is not None and spec.ppl.source == tmp_path / "docs.jsonl" and spec.ppl.num_docs == 4
    assert build_spec({}, "passkey", spec_file=tmp_path / "s.yaml").ppl is None


@pytest.mark.parametrize(("values", "tasks", "says"), [
    ({"passkey_min_length": -1}, None, r"^--passkey-min-length: Input should be greater than 0 \(got -1\)\.$"),
    ({"lengths": "64,x"}, None, r"^--lengths '64,x' is not a comma-separated list of integers\.$"),
    ({"ruler_tasks": "fwe,rulr"}, "ruler", r"^--ruler-tasks: Input should be 'niah_single_1', .* \(got 'rulr'\)\.$"),
    ({"kv_cache": "gpu"}, None, r"^--kv-cache: Input should be 'auto', 'device' or 'cpu' \(got 'gpu'\)\.$"),
    ({"niah_needle": "x"}, "passkey", r"^--niah-needle sets the niah task, which --tasks leaves out; add niah"),
    ({}, "ppl", r"^task ppl needs --ppl-source \(JSONL or text file/folder of long documents\)\.$"),
    ({}, "passkey,rulr", r"^--tasks: unknown task 'rulr'; choose from passkey, niah, ruler, ppl\.$"),
])
def test_an_error_from_a_flag_names_the_flag(values: dict, tasks: str | None, says: str) -> None:
    with pytest.raises(LongforgeError, match=says):
        build_spec(values, tasks)


def test_the_registry_is_the_one_list_of_tasks() -> None:
    from longforge.eval.registry import EVAL_TASKS, enabled

    # The eval spec has one optional section per registered task, of that task's name, in the same order.
    assert list(task_sections()) == list(EVAL_TASKS) and all(t.name == n for n, t in EVAL_TASKS.items())
    spec = EvalSpec.model_validate({"passkey": None, "niah": {}, "ppl": {"source": "x"}})
    assert [t.name for t in enabled(spec)] == ["niah", "ppl"]
    assert [t.name for t in enabled(EvalSpec())] == ["passkey"]


def test_the_schema_names_the_ruler_tasks_the_generators_know() -> None:
    from longforge.config import RulerSpec, RulerTask
    from longforge.eval.ruler import SYNTHETIC, TASKS

    assert list(get_args(RulerTask)) == list(TASKS)
    assert RulerSpec(essays=Path("e")).task_list() == SYNTHETIC
    assert RulerSpec(essays=Path("e"), squad=Path("s"), hotpotqa=Path("h")).task_list() == [*SYNTHETIC, "qa_1", "qa_2"]
