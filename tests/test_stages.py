"""Stages: one assembly per stage for `longforge run` and the stage commands, every spec field settable from its
command (errors naming the flag), stage kinds in the schema, registries behind its choices, paths found by walking it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest
from typer.testing import CliRunner

from longforge.cli import app
from longforge.config import AnyStageSpec, DataSpec, PositionSpec, SourceSpec, TrainSpec
from longforge.errors import LongforgeError
from longforge.recipe import input_paths, parse_recipe, resolve_paths, validate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, tokenizer_dir: Path) -> Path:
    """A small packed data folder (64-token sequences) for `longforge train`."""
    from longforge.data.build import build_data

    out = tmp_path_factory.mktemp("stages") / "data"
    build_data(DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none",
                        token_budget=2000), tokenizer_dir, 64, out)
    return out


class _Stop(Exception):
    """Raised by the stand-in training loop once it has seen the stage's settings."""


def _capture_training(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace the training loop by one that records the spec it is given, then stops."""
    from longforge.train import loop

    seen: list[Any] = []

    def train_model(model: Any, source: Any, spec: Any, out: Path, *a: Any, **k: Any) -> Any:
        seen.append((spec, source, Path(out)))
        raise _Stop

    monkeypatch.setattr(loop, "train_model", train_model)
    return seen


# ---------------------------------------------------------------- the bugs the issue names


def test_train_sets_weight_decay_betas_min_lr_ratio_lean_norm_and_fused_ops(model_dir: Path, data_dir: Path,
                                                                            tmp_path: Path, monkeypatch) -> None:
    """`longforge train` had no flag for these five settings (only a recipe could set them)."""
    seen = _capture_training(monkeypatch)
    res = CliRunner().invoke(app, ["train", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path / "t"),
                                   "--steps", "3", "--device", "cpu", "--weight-decay", "0.05", "--betas", "0.8,0.9",
                                   "--min-lr-ratio", "0.2", "--no-lean-norm", "--fused-ops", "off"])
    assert isinstance(res.exception, _Stop), res.output
    spec = seen[0][0]
    assert (spec.weight_decay, spec.betas, spec.min_lr_ratio, spec.lean_norm, spec.fused_ops) == (0.05, (0.8, 0.9), 0.2,
                                                                                                  False, "off")
    assert (spec.steps, spec.lr, spec.schedule) == (3, TrainSpec.model_fields["lr"].default, "cosine")


def test_data_build_filters_sentences_by_an_impactful_token_profile(corpus_dir: Path, tokenizer_dir: Path,
                                                                   tmp_path: Path) -> None:
    """`--sentence-filter profile` always failed validation: no flag could give the profile."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"selected": ["NUM"], "types": []}))
    args = ["data", "build", "--source", f"{corpus_dir / 'long.jsonl'},name=books", "--tokenizer", str(tokenizer_dir),
            "--seq-len", "64", "--plan", "none"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "d"), "--sentence-filter", "profile",
                                   "--filter-profile", str(profile), "--filter-budget", "0.5"])
    assert res.exit_code == 0, (res.output, res.exception)
    counts = json.loads((tmp_path / "d" / "manifest.json").read_text())["sources"]["books"]
    assert counts["tokens_removed_by_filter"] > 0
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "e"), "--sentence-filter", "profile"])
    assert isinstance(res.exception, LongforgeError)
    assert "method 'profile' needs `profile:`" in str(res.exception)
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "f"), "--filter-keep-prob", "0.2"])
    assert str(res.exception) == ("--filter-keep-prob sets the sentence filter; switch it on with --sentence-filter "
                                  "METHOD (digits, profile or random).")
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def test_rope_takes_the_mscale_options(model_dir: Path) -> None:
    """`longforge rope` had no --mscale, --mscale-all-dim (YaRN's DeepSeek-style temperature)."""
    res = CliRunner().invoke(app, ["rope", str(model_dir), "--target-length", "512", "--dry-run", "--method", "yarn",
                                   "--mscale", "1", "--mscale-all-dim", "0.5"])
    assert res.exit_code == 0, (res.output, res.exception)
    params = json.loads(next(line for line in res.output.splitlines() if line.startswith("{")))
    assert (params["mscale"], params["mscale_all_dim"]) == (1.0, 0.5)


# ---------------------------------------------------------------- options from the schema


def test_errors_from_flags_name_the_flag(model_dir: Path, data_dir: Path, corpus_dir: Path, tokenizer_dir: Path,
                                         tmp_path: Path) -> None:
    def error(*args: str) -> str:
        res = CliRunner().invoke(app, list(args))
        assert isinstance(res.exception, LongforgeError), res.output
        return str(res.exception)

    train = ["train", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path / "t"), "--device", "cpu"]
    assert error(*train, "--steps", "2", "--lr", "-1") == "--lr: Input should be greater than 0 (got -1.0)."
    assert error(*train) == "train needs --steps (optimizer steps)."
    assert error(*train, "--steps", "2", "--transform", "skip").startswith("--transform: Input should be 'contiguous'")
    build = ["data", "build", "--source", str(corpus_dir / "long.jsonl"), "--tokenizer", str(tokenizer_dir),
             "--seq-len", "64", "--out", str(tmp_path / "d")]
    assert error(*build, "--budget", "0") == "--budget: Input should be greater than 0 (got 0)."
    assert error(*build, "--replay-budget", "100") == "data build needs --replay-seq-len."
    assert error("merge", str(model_dir), str(model_dir), "--out", str(tmp_path / "m"), "--weights", "0.5,0.6") == \
        "merge: merge weights [0.5, 0.6] must sum to 1."
    assert not any(tmp_path.iterdir())


def test_train_runs_an_sft_stage_given_by_set_or_spec(model_dir: Path, tmp_path: Path, monkeypatch, one_thread) -> None:
    from test_sft import TEMPLATE, _conv

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "chat.jsonl").write_text("".join(json.dumps({"messages": _conv(f"q {i}", f"a {i}")}) + "\n"
                                                        for i in range(8)))
    (tmp_path / "in" / "chat.jinja").write_text(TEMPLATE)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", str(model_dir), "--out", "sft", "--steps", "1", "--batch-size", "2",
                                   "--lr", "1e-4", "--device", "cpu", "--set", "kind=sft", "--set", "sft.data=in/chat.jsonl",
                                   "--set", "sft.seq_len=64", "--set", "sft.chat_template=in/chat.jinja"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert len((tmp_path / "sft" / "log.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "sft" / "final" / "config.json").is_file()
    # A --spec file's paths are taken from its folder; flags override it.
    (tmp_path / "in" / "stage.yaml").write_text("kind: sft\nsteps: 5\nsft: {data: chat.jsonl, seq_len: 64, "
                                                "chat_template: chat.jinja}\n")
    seen = _capture_training(monkeypatch)
    res = CliRunner().invoke(app, ["train", str(model_dir), "--out", "sft2", "--spec", "in/stage.yaml", "--steps", "2",
                                   "--device", "cpu"])
    assert isinstance(res.exception, _Stop), (res.output, res.exception)
    spec = seen[0][0]
    assert spec.kind == "sft" and spec.steps == 2 and spec.sft.data == (tmp_path / "in" / "chat.jsonl").resolve()
    res = CliRunner().invoke(app, ["train", str(model_dir), "--out", "sft3", "--steps", "1", "--set", "kind=sft"])
    assert "an sft stage needs an `sft:` section" in str(res.exception)
    res = CliRunner().invoke(app, ["train", str(model_dir), "--out", "m", "--steps", "1", "--set", "kind=merge"])
    assert str(res.exception) == "train runs stages of kind pretrain or sft, not 'merge'; a merge is `longforge merge`."


def test_run_and_the_stage_commands_share_one_assembly(micro_recipe: dict, model_dir: Path, data_dir: Path,
                                                       tmp_path: Path, monkeypatch) -> None:
    """`longforge run` and `longforge train` build the same stage object and run its one assembly."""
    from longforge.runner import run_recipe
    from longforge.train.batches import PackedBatches

    seen = _capture_training(monkeypatch)
    res = CliRunner().invoke(app, ["train", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path / "t"),
                                   "--steps", "2", "--device", "cpu"])
    assert isinstance(res.exception, _Stop), res.output
    micro_recipe["eval"]["models"] = []
    with pytest.raises(_Stop):
        run_recipe(parse_recipe(micro_recipe), tmp_path / "run")
    (cmd_spec, cmd_source, cmd_out), (run_spec, run_source, run_out) = seen
    assert type(cmd_spec) is type(run_spec) and isinstance(cmd_source, PackedBatches) and isinstance(run_source, PackedBatches)
    assert cmd_out == tmp_path / "t" and run_out == tmp_path / "run" / "train" / "extend"


# ---------------------------------------------------------------- the schema


def test_stage_kinds_are_a_union_of_their_own_settings(micro_recipe: dict) -> None:
    r = parse_recipe(micro_recipe)
    assert r.stages[0].kind == "pretrain"  # a stage without `kind` means pretrain, as it always has
    micro_recipe["stages"].append({"name": "m", "kind": "merge", "merge": {"other": "base"}})
    assert not hasattr(parse_recipe(micro_recipe).stages[1], "lr")  # a merge stage carries no training settings
    cases = [
        ({"name": "m", "kind": "merge", "lr": 1e-5},
         "`stages.1.lr` is a setting of pretrain and sft stages, not of merge ones; remove it, or change the stage's `kind`."),
        ({"name": "s", "steps": 2, "sft": {"data": "x.jsonl"}},
         "`stages.1.sft` is a setting of sft stages, not of pretrain ones"),
        ({"name": "x", "kind": "dpo"}, "`stages.1.kind` must be one of 'pretrain', 'sft', 'merge' (got 'dpo')"),
        ({"name": "e", "steps": 2, "lrr": 1}, "unknown key `stages.1.lrr`; did you mean `lr`?"),
        ({"name": "s", "kind": "sft", "steps": 0, "sft": {"data": "x.jsonl"}}, "`stages.1.steps` input should be greater than 0"),
    ]
    for stage, message in cases:
        micro_recipe["stages"][1:] = [stage]
        with pytest.raises(LongforgeError) as e:
            parse_recipe(micro_recipe, "r.yaml")
        assert message in str(e.value), str(e.value)


def test_stage_fingerprints_are_those_of_earlier_runs() -> None:
    """A stage finished by the longforge before stages had kinds stays finished: its settings hash the same."""
    from longforge.stages import fingerprint
    from longforge.stages.listed import flat_settings

    expected = {  # computed with the flat StageSpec of the previous release
        "84fbd59855854f16": {"name": "extend", "steps": 4, "batch_size": 2, "lr": 1e-3, "save_every": 2},
        "c56b9b24224b1312": {"name": "replay", "dataset": "replay", "steps": 2, "lr": 5e-6},
        "e0b9da0294c3bab9": {"name": "own", "steps": 2, "data": "/x/data"},
        "077676ce36cf9f3a": {"name": "sft", "kind": "sft", "steps": 2, "sft": {"data": "/x/sft.jsonl", "seq_len": 64}},
        "38ede1cd8124d0ce": {"name": "merge", "kind": "merge"},
        "89e5a3fb387aaefe": {"name": "merge2", "kind": "merge",
                             "merge": {"other": "/x/other", "weights": [0.25, 0.75], "method": "slerp"}},
    }
    for fp, stage in expected.items():
        assert fingerprint(flat_settings(validate(AnyStageSpec, stage, "t"))) == fp, stage
    # Validation changes no weight: a finished stage given val_data later stays finished.
    with_val = {**expected["84fbd59855854f16"], "val_data": "/x/held", "val_every": 2, "val_batches": 8}
    assert fingerprint(flat_settings(validate(AnyStageSpec, with_val, "t"))) == "84fbd59855854f16"


def test_train_logs_the_loss_on_held_out_data(model_dir: Path, data_dir: Path, tmp_path: Path, one_thread) -> None:  # noqa: ANN001
    """`longforge train --val-data`: every --val-every steps and after the last, the log's step record has val_loss;
    a val_data that is not a data folder is refused in one sentence before any step."""
    import json

    res = CliRunner().invoke(app, ["train", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path / "t"),
                                   "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu",
                                   "--val-data", str(data_dir), "--val-every", "2", "--val-batches", "2"])
    assert res.exit_code == 0, res.output
    log = [json.loads(x) for x in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_loss" in r] == [2, 3] and all(r["val_loss"] > 0 for r in log[1:])
    res = CliRunner().invoke(app, ["train", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path / "u"),
                                   "--steps", "1", "--device", "cpu", "--val-data", str(tmp_path)])
    assert isinstance(res.exception, LongforgeError)
    assert str(res.exception).startswith(f"--val-data {tmp_path} is not a longforge data folder")
    assert not (tmp_path / "u" / "log.jsonl").exists()


def test_schema_choices_come_from_the_registries() -> None:
    from longforge.config import PretrainStageSpec
    from longforge.data.sampling import PLANS
    from longforge.model.attention import BACKENDS
    from longforge.positions.methods import ROPE_METHODS
    from longforge.positions.transforms import TRANSFORMS
    from longforge.stages import STAGES

    def choices(model: type, name: str) -> tuple[str, ...]:
        return get_args(model.model_fields[name].annotation)

    assert choices(PositionSpec, "method") == tuple(ROPE_METHODS)
    assert choices(PositionSpec, "transform") == tuple(TRANSFORMS)
    assert choices(DataSpec, "plan") == tuple(PLANS)
    assert choices(PretrainStageSpec, "attention") == tuple(BACKENDS)
    assert list(STAGES) == ["data", "rope", "pretrain", "sft", "merge", "eval", "report"]
    with pytest.raises(LongforgeError, match=r"^unknown sampling plan 'x'; use one of none, upsample_long, "):
        PLANS.pick("x")


def test_paths_are_found_by_walking_the_schema(micro_recipe: dict, tmp_path: Path) -> None:
    micro_recipe["model"]["path"] = "ckpt"
    micro_recipe["data"].update(tokenizer="tok", sentence_filter={"method": "profile", "profile": "p.json"})
    micro_recipe["stages"] += [{"name": "s", "kind": "sft", "steps": 1, "sft": {"data": "c.jsonl", "chat_template": "t.jinja"}},
                               {"name": "m", "kind": "merge", "merge": {"other": "other"}},
                               {"name": "b", "kind": "merge"},
                               {"name": "o", "steps": 1, "data": "packed"}]
    micro_recipe["eval"].update(niah={"haystack": "h.txt"}, ruler={"essays": "e.jsonl", "squad": "s.json",
                                                                 "hotpotqa": "q.json"})
    micro_recipe["eval"]["passkey"]["haystack"] = "pk.txt"
    r = resolve_paths(parse_recipe(micro_recipe), tmp_path)
    found = input_paths(r)
    assert set(found) == {
        "model.path", "data.sources.0.path", "data.sources.1.path", "data.tokenizer", "data.sentence_filter.profile",
        "stages.1.sft.data", "stages.1.sft.chat_template", "stages.2.merge.other", "stages.4.data",
        "eval.passkey.haystack", "eval.niah.haystack", "eval.ruler.essays", "eval.ruler.squad", "eval.ruler.hotpotqa",
        "eval.ppl.source"}
    assert found["model.path"] == tmp_path / "ckpt" and found["stages.2.merge.other"] == tmp_path / "other"
    assert r.stages[2].merge.other == str(tmp_path / "other") and r.stages[3].merge.other == "base"
    assert r.eval.input_paths()["eval.ruler.squad"] == tmp_path / "s.json"  # the eval section's own view


def test_run_plan_resolves_the_recipe_once(micro_recipe: dict, tmp_path: Path) -> None:
    from longforge.runner import plan_run
    from longforge.stages import DataStage, EvalStage, PretrainStage, ReportStage, RopeStage

    plan = plan_run(parse_recipe(micro_recipe), tmp_path / "run")
    assert (plan.original_length, plan.target_length, plan.seq_len) == (64, 256, 256)
    assert plan.tokenizer == Path(micro_recipe["model"]["path"]) and str(plan.torch_device) == "cpu"
    assert [type(s) for s in plan.stages] == [DataStage, RopeStage, PretrainStage, EvalStage, EvalStage, ReportStage]
    assert [s.title for s in plan.stages] == ["data", "rope", "train/extend", "eval/base", "eval/final", "report"]
    assert plan.stages[2].model.made_by is plan.stages[1] and plan.stages[4].model.made_by is plan.stages[2]
    assert not (tmp_path / "run").exists()  # planning and checking write nothing


def test_train_on_a_replay_set_keeps_contiguous_positions(model_dir: Path, data_dir: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    """`--dataset replay` trains the named folder as a replay set: plain positions whatever --transform says."""
    seen = _capture_training(monkeypatch)
    args = ["train", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path / "t"), "--steps", "1", "--device",
            "cpu", "--transform", "pose", "--target-length", "256"]
    for extra, transform in (([], "pose"), (["--dataset", "replay"], "contiguous")):
        res = CliRunner().invoke(app, [*args, *extra])
        assert isinstance(res.exception, _Stop), (res.output, res.exception)
        assert seen[-1][1].transform == transform
