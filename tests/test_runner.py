"""`longforge run` end to end on a micro recipe: stages, skipping, resuming, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from longforge.config import parse_recipe
from longforge.runner import run_recipe


def _done(run: Path) -> dict[str, int]:
    """When each stage's DONE.json was written (ns: `finished` has whole seconds, and a tiny stage re-runs within one)."""
    return {str(p.parent.relative_to(run)): p.stat().st_mtime_ns for p in run.glob("**/DONE.json")}


def test_run_end_to_end_then_skip_then_rerun_changed_stage(micro_recipe: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = run_recipe(parse_recipe(micro_recipe), run)
    for f in ("resolved_recipe.yaml", "data/index.json", "data/manifest.json", "rope/config.json", "rope/longforge_rope.json",
              "train/extend/final/model.safetensors", "train/extend/log.jsonl", "eval/base/passkey.json",
              "eval/final/ppl.json", "report/report.md", "report/report.html", "report/passkey.png", "report/ppl.png"):
        assert (run / f).is_file(), f
    assert Path(out["final"]) == run / "train" / "extend" / "final"
    final_cfg = json.loads((run / "train/extend/final/config.json").read_text())
    assert final_cfg["rope_parameters"]["rope_type"] == "yarn" and final_cfg["max_position_embeddings"] == 256
    md = (run / "report" / "report.md").read_text()
    assert "| base |" in md and "| final |" in md and "![Passkey retrieval](passkey.png)" in md
    assert "<img" in (run / "report" / "report.html").read_text()
    first = _done(run)
    assert set(first) == {"data", "rope", "train/extend", "eval/base", "eval/final"}

    run_recipe(parse_recipe(micro_recipe), run)
    assert _done(run) == first  # nothing re-ran
    assert json.loads((run / "timeline.json").read_text())["stages"] == {s: "cached" for s in first}
    assert "| rope | " in (md := (run / "report" / "report.md").read_text()) and "cached (done earlier)" in md
    assert md.index("| data |") < md.index("| rope |") < md.index("| train/extend |") < md.index("| eval/base |")

    micro_recipe["stages"][0]["lr"] = 5e-4
    run_recipe(parse_recipe(micro_recipe), run)
    again = _done(run)
    assert json.loads((run / "timeline.json").read_text())["stages"] == {
        "data": "cached", "rope": "cached", "train/extend": "ran", "eval/base": "cached", "eval/final": "ran"}
    assert again["data"] == first["data"] and again["rope"] == first["rope"] and again["eval/base"] == first["eval/base"]
    assert again["train/extend"] != first["train/extend"] and again["eval/final"] != first["eval/final"]


def test_interrupted_run_resumes_the_training_stage(micro_recipe: dict, tmp_path: Path, monkeypatch) -> None:
    from longforge.train import batches

    real = batches.PackedBatches.batch

    def interrupt(self, step, micro):  # noqa: ANN001
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step, micro)

    run = tmp_path / "run"
    monkeypatch.setattr(batches.PackedBatches, "batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(parse_recipe(micro_recipe), run)
    assert not (run / "train/extend/DONE.json").exists()
    assert [p.name for p in (run / "train/extend/checkpoints").iterdir()] == ["step-0000002"]
    meta = json.loads((run / "train/extend/checkpoints/step-0000002/meta.json").read_text())
    assert meta["loader"]["step"] == 2 and meta["loader"]["consumed"] == 2 * 2  # two steps of two sequences
    monkeypatch.setattr(batches.PackedBatches, "batch", real)
    run_recipe(parse_recipe(micro_recipe), run)
    log = [json.loads(x)["step"] for x in (run / "train/extend/log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_recipe_file_through_the_cli(micro_recipe: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from longforge.cli import app

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(micro_recipe))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "report" / "report.html").is_file()


def test_multi_stage_recipe_extend_merge_sft(micro_recipe: dict, tmp_path: Path) -> None:
    from test_sft import TEMPLATE, _conv

    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"messages": _conv(f"question {i}", f"answer {i}")}) + "\n"
                                                for i in range(20)) + "{oops\n")
    micro_recipe["stages"] = [
        {"name": "extend", "steps": 2, "batch_size": 2, "lr": 1e-3},
        {"name": "merge", "kind": "merge", "merge": {"other": "base", "weights": [0.5, 0.5]}},
        {"name": "sft", "kind": "sft", "steps": 2, "batch_size": 2, "lr": 1e-4,
         "sft": {"data": str(tmp_path / "sft.jsonl"), "seq_len": 64, "chat_template": str(tmp_path / "chat.jinja")}},
    ]
    micro_recipe["eval"] = {"passkey": {"lengths": [64], "depths": 1, "trials": 1}, "models": ["final"]}
    run = tmp_path / "run"
    out = run_recipe(parse_recipe(micro_recipe), run)
    assert Path(out["final"]) == run / "train" / "sft" / "final"
    merged = json.loads((run / "train" / "merge" / "final" / "longforge_merge.json").read_text())
    assert merged["weights"] == [0.5, 0.5] and merged["models"][1].endswith("extend/final")
    cfg = json.loads((run / "train" / "merge" / "final" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 256  # the extended model's RoPE config survives the merge
    assert len((run / "train" / "sft" / "rejects.jsonl").read_text().splitlines()) == 1
    assert len((run / "train" / "sft" / "log.jsonl").read_text().splitlines()) == 2


def test_stage_kinds_validate(micro_recipe: dict) -> None:
    from longforge.errors import LongforgeError

    micro_recipe["stages"] = [{"name": "s", "kind": "sft", "steps": 2}]
    with pytest.raises(LongforgeError, match="an sft stage needs an `sft:` section"):
        parse_recipe(micro_recipe)
    micro_recipe["stages"] = [{"name": "e", "lr": 1e-3}]
    with pytest.raises(LongforgeError, match="a pretrain stage needs `steps`"):
        parse_recipe(micro_recipe)


def test_extend_replay_merge_like_longrecipe(micro_recipe: dict, tmp_path: Path) -> None:
    micro_recipe["data"]["seq_len"] = 128  # train short, reach the 256 target with PIT
    micro_recipe["data"]["replay"] = {"token_budget": 1500, "seq_len": 64}
    micro_recipe["positions"].update(method="theta", theta=500000.0, transform="pit")
    micro_recipe["stages"] = [
        {"name": "extend", "steps": 2, "batch_size": 2, "lr": 1e-3},
        {"name": "replay", "dataset": "replay", "steps": 2, "batch_size": 2, "lr": 5e-6},
        {"name": "merge", "kind": "merge"},
    ]
    micro_recipe["eval"] = {"passkey": {"lengths": [64, 256], "depths": 1, "trials": 1}, "models": ["final"]}
    run = tmp_path / "run"
    out = run_recipe(parse_recipe(micro_recipe), run)
    assert Path(out["final"]) == run / "train" / "merge" / "final"
    assert (run / "data" / "replay" / "index.json").is_file()
    rep = json.loads((run / "data" / "replay" / "index.json").read_text())
    assert rep["seq_len"] == 64
    assert len((run / "train" / "replay" / "log.jsonl").read_text().splitlines()) == 2


def test_replay_stage_needs_a_replay_set(micro_recipe: dict) -> None:
    from longforge.errors import LongforgeError
    from longforge.runner import preflight

    micro_recipe["stages"].append({"name": "replay", "dataset": "replay", "steps": 1})
    with pytest.raises(LongforgeError, match="`data.replay` is not set"):
        preflight(parse_recipe(micro_recipe))


def test_eval_lengths_are_checked_before_any_stage(micro_recipe: dict, tmp_path: Path) -> None:
    import pytest

    from longforge.errors import LongforgeError

    micro_recipe["eval"]["passkey"]["lengths"] = [8, 256]
    with pytest.raises(LongforgeError, match=r"`eval\.passkey\.lengths`: a passkey prompt needs at least \d+ tokens with "
                                             r"this tokenizer even with no haystack; raise the shortest length above 8"):
        run_recipe(parse_recipe(micro_recipe), tmp_path / "run")
    micro_recipe["eval"]["passkey"] = None
    micro_recipe["eval"]["niah"] = {"lengths": [16, 256], "depths": 1}
    with pytest.raises(LongforgeError, match=r"`eval\.niah\.lengths`: a needle-in-a-haystack prompt needs at least"):
        run_recipe(parse_recipe(micro_recipe), tmp_path / "run")
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "rope").exists()
    micro_recipe["eval"]["niah"]["lengths"] = [128, -512]
    with pytest.raises(LongforgeError, match=r"`eval\.niah\.lengths\.1` input should be greater than 0 \(got -512\)"):
        parse_recipe(micro_recipe)
