"""Run folders never delete user data, never mix two runs, and know when their inputs changed (issue 22)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from longforge import runner
from longforge.config import PositionSpec, load_recipe, parse_recipe
from longforge.errors import LongforgeError
from longforge.files import OWNER_MARK, FolderLock, claim_dir
from longforge.runner import run_recipe


def _quick(recipe: dict) -> dict:
    """The micro recipe with fewer steps and no base-model evaluation, to keep each run to a few seconds."""
    recipe["stages"][0].update(steps=2, save_every=2)
    recipe["eval"] = {"passkey": {"lengths": [64], "depths": 1, "trials": 1}, "models": ["final"]}
    return recipe


def _done_times(run: Path) -> dict[str, int]:
    """When each stage's DONE.json was last written (ns), by stage folder."""
    return {str(p.parent.relative_to(run)): p.stat().st_mtime_ns for p in run.glob("**/DONE.json")}


def _rewrite_same_size_and_time(path: Path, offset: int) -> None:
    """Change one byte in place, keeping the file's size and modification time (only the content differs)."""
    st = path.stat()
    with path.open("r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- names used as paths


def test_stage_or_recipe_name_that_leaves_the_run_folder_is_refused(micro_recipe: dict, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(micro_recipe))
    with pytest.raises(LongforgeError, match=r"`stages\.0\.name` stage name '\.\./\.\./victim' is used as a folder name"):
        load_recipe(tmp_path / "r.yaml", ["stages.0.name=../../victim"])
    with pytest.raises(LongforgeError, match=r"`name` recipe name '\.\./\.\./x' is used as a folder name"):
        load_recipe(tmp_path / "r.yaml", ["name=../../x"])
    assert (victim / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "victim"]


# ---------------------------------------------------------------- never clear user files


def test_out_dot_over_the_project_refuses_and_keeps_its_data(micro_recipe: dict, corpus_dir: Path, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    shutil.copy(corpus_dir / "long.jsonl", proj / "data" / "corpus.jsonl")
    micro_recipe["data"]["sources"] = [{"name": "web", "path": "data/corpus.jsonl"}]
    (proj / "recipe.yaml").write_text(yaml.safe_dump(micro_recipe))
    before = _snapshot(proj)
    res = subprocess.run([sys.executable, "-m", "longforge", "run", "recipe.yaml", "--out", "."], cwd=proj,
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in out, out
    assert "`data.sources.0.path`" in out and "lies inside" in out and "data stage clears" in out
    assert _snapshot(proj) == before  # ./data/corpus.jsonl and the user's recipe.yaml, untouched; nothing added


def test_run_folder_of_user_files_is_refused(micro_recipe: dict, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "notes.txt").write_text("keep me")
    (mine / "recipe.yaml").write_text("my own recipe\n")
    with pytest.raises(LongforgeError, match=r"run folder .*mine already holds files longforge did not write \(data, recipe\.yaml\)"):
        run_recipe(parse_recipe(micro_recipe), mine)
    assert (mine / "data" / "notes.txt").read_text() == "keep me"
    assert (mine / "recipe.yaml").read_text() == "my own recipe\n" and not (mine / OWNER_MARK).exists()


def test_stage_folder_holding_user_files_is_refused_not_cleared(micro_recipe: dict, tmp_path: Path) -> None:
    run = claim_dir(tmp_path / "run", "run folder")
    (run / "rope").mkdir()
    (run / "rope" / "mine.safetensors").write_text("not longforge's")
    with pytest.raises(LongforgeError, match=r"the rope stage's folder .*rope already holds files longforge did not write \(mine\.safetensors\)"):
        run_recipe(parse_recipe(_quick(micro_recipe)), run)
    assert (run / "rope" / "mine.safetensors").read_text() == "not longforge's"


def test_resolved_recipe_has_its_own_file(micro_recipe: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_recipe(parse_recipe(_quick(micro_recipe)), run)
    assert yaml.safe_load((run / "resolved_recipe.yaml").read_text())["name"] == "micro"
    assert not (run / "recipe.yaml").exists() and (run / OWNER_MARK).is_file()


def _never(*a, **k):  # noqa: ANN002, ANN003, ANN202
    raise AssertionError("the demo or lab went on to build its assets")


@pytest.mark.parametrize("command", ["demo", "lab"])
def test_fresh_refuses_to_delete_a_folder_longforge_did_not_create(command: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LONGFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.txt").write_text("a week of measurements")
    if command == "demo":
        from longforge.demo import run as demo

        monkeypatch.setattr(demo, "build_assets", _never)  # the refusal comes before any building
        call = lambda: demo.run_demo(out, device="cpu", fresh=True)  # noqa: E731
    else:
        from longforge.lab import run as lab

        monkeypatch.setattr(lab, "build_lab_assets", _never)
        call = lambda: lab.run_lab(out, device="cpu", profile_name="tiny", fresh=True)  # noqa: E731
    with pytest.raises(LongforgeError, match="longforge did not write \\(results.txt\\)"):
        call()
    assert (out / "results.txt").read_text() == "a week of measurements"


def test_discard_removes_marked_and_earlier_longforge_folders_only(tmp_path: Path) -> None:
    marked = claim_dir(tmp_path / "marked", "demo run folder")
    (marked / "x").write_text("1")
    runner.discard(marked, "demo run folder", ours=runner.old_run_folder)
    assert not marked.exists()
    old = tmp_path / "old-run"  # written by a longforge that did not mark folders
    (old / "data").mkdir(parents=True)
    (old / "data" / "STARTED.json").write_text("{}")
    (old / "recipe.yaml").write_text("name: x\n")
    runner.discard(old, "demo run folder", ours=runner.old_run_folder)
    assert not old.exists()
    user = tmp_path / "user"
    user.mkdir()
    (user / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(LongforgeError, match="longforge did not write"):
        runner.discard(user, "demo run folder", ours=runner.old_run_folder)
    assert (user / "recipe.yaml").is_file()


def test_model_and_merge_outputs_replace_only_longforge_folders(model_dir: Path, tmp_path: Path) -> None:
    from longforge.hf import load_model, save_model
    from longforge.merge import merge

    user = tmp_path / "user"
    user.mkdir()
    (user / "paper.tex").write_text("draft")
    with pytest.raises(LongforgeError, match=r"merge output folder .*user already holds files longforge did not write \(paper\.tex\)"):
        merge([model_dir, model_dir], [0.5, 0.5], user)
    model = load_model(model_dir)
    with pytest.raises(LongforgeError, match=r"model output folder .*user already holds files longforge did not write"):
        save_model(model, user)
    assert sorted(p.name for p in user.iterdir()) == ["paper.tex"]
    assert [p.name for p in tmp_path.iterdir()] == ["user"]  # no temp folder left behind either
    out = tmp_path / "merged"
    merge([model_dir, model_dir], [0.5, 0.5], out)
    merge([model_dir, model_dir], [0.5, 0.5], out)  # its own earlier output is replaced
    assert (out / "longforge_merge.json").is_file() and (out / OWNER_MARK).is_file()
    saved = save_model(model, tmp_path / "saved")
    assert (saved / OWNER_MARK).is_file() and save_model(model, saved) == saved
    with pytest.raises(LongforgeError, match="overlaps the input checkpoint"):
        merge([model_dir, out], [0.5, 0.5], out)


# ---------------------------------------------------------------- one writer per run folder


def _hold_run(folder: str, ready: mp.Event, stop: mp.Event) -> None:  # type: ignore[valid-type]
    """Another `longforge run`: claim and lock the run folder, then wait."""
    claim_dir(Path(folder), "run folder")
    with FolderLock(Path(folder), "run folder"):
        (Path(folder) / "resolved_recipe.yaml").write_text("name: first\n")
        ready.set()
        stop.wait(60)


def test_second_run_on_a_locked_folder_is_refused_naming_the_holder(micro_recipe: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    first = ctx.Process(target=_hold_run, args=(str(run), ready, stop))
    first.start()
    try:
        assert ready.wait(60)
        before = _snapshot(run)
        with pytest.raises(LongforgeError, match=rf"run folder .*run is in use by pid {first.pid} on "):
            run_recipe(parse_recipe(micro_recipe), run)
        assert _snapshot(run) == before  # nothing of the first run was touched
    finally:
        stop.set()
        first.join(30)
    assert first.exitcode == 0


# ---------------------------------------------------------------- staleness by content


def test_corpus_rewritten_at_the_same_path_rebuilds_the_data(micro_recipe: dict, corpus_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    for s in micro_recipe["data"]["sources"]:
        s["path"] = str(corpus / Path(s["path"]).name)
    recipe = _quick(micro_recipe)
    run = tmp_path / "run"
    run_recipe(parse_recipe(recipe), run)
    first = _done_times(run)
    _rewrite_same_size_and_time(corpus / "long.jsonl", 200)
    run_recipe(parse_recipe(recipe), run)
    again = _done_times(run)
    assert again["rope"] == first["rope"]
    assert again["data"] != first["data"] and again["train/extend"] != first["train/extend"]


def test_base_weights_rewritten_in_place_rerun_rope_and_later_stages(micro_recipe: dict, model_dir: Path,
                                                                      tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    micro_recipe["model"]["path"] = str(base)
    recipe = _quick(micro_recipe)
    recipe["eval"]["models"] = ["base", "final"]
    run = tmp_path / "run"
    run_recipe(parse_recipe(recipe), run)
    first = _done_times(run)
    weights = base / "model.safetensors"
    _rewrite_same_size_and_time(weights, weights.stat().st_size - 100)
    run_recipe(parse_recipe(recipe), run)
    again = _done_times(run)
    assert again["data"] == first["data"]  # the tokenizer files did not change
    for stage in ("rope", "train/extend", "eval/base", "eval/final"):
        assert again[stage] != first[stage], stage
    assert (run / "rope" / "model.safetensors").read_bytes() == weights.read_bytes()


def test_rope_weights_are_not_hard_links_of_the_base(model_dir: Path, tmp_path: Path) -> None:
    from longforge.positions.rope import apply_rope

    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    plan = apply_rope(base, tmp_path / "rope", PositionSpec(method="yarn"), 256)
    out = tmp_path / "rope" / "model.safetensors"
    assert out.stat().st_nlink == 1 and not os.path.samefile(out, base / "model.safetensors")
    assert any(n.startswith(("weights copied from", "weights reflinked from")) for n in plan.notes), plan.notes
    kept = out.read_bytes()
    _rewrite_same_size_and_time(base / "model.safetensors", base.joinpath("model.safetensors").stat().st_size - 100)
    assert out.read_bytes() == kept  # editing the base in place leaves the written checkpoint alone


# ---------------------------------------------------------------- markers


def test_zero_byte_done_marker_means_not_done(micro_recipe: dict, tmp_path: Path, monkeypatch) -> None:
    recipe = _quick(micro_recipe)
    run = tmp_path / "run"
    run_recipe(parse_recipe(recipe), run)
    first = _done_times(run)
    (run / "rope" / "DONE.json").write_bytes(b"")  # what a full disk left behind
    said: list[str] = []
    monkeypatch.setattr(runner, "say", said.append)
    run_recipe(parse_recipe(recipe), run)
    assert json.loads((run / "rope" / "DONE.json").read_text())["method"] == "yarn"
    assert _done_times(run)["data"] == first["data"]
    assert any("rope: an earlier run of this stage was interrupted; starting it again" in m for m in said), said


def test_interrupted_stage_says_so_not_inputs_changed(micro_recipe: dict, tmp_path: Path, monkeypatch) -> None:
    from longforge.positions import rope

    recipe = _quick(micro_recipe)
    run = tmp_path / "run"
    real = rope.apply_rope

    def interrupted(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(rope, "apply_rope", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(parse_recipe(recipe), run)
    monkeypatch.setattr(rope, "apply_rope", real)
    said: list[str] = []
    monkeypatch.setattr(runner, "say", said.append)
    run_recipe(parse_recipe(recipe), run)
    assert any("rope: an earlier run of this stage was interrupted; starting it again" in m for m in said), said
    assert not any("inputs changed" in m for m in said), said
    recipe["stages"][0]["lr"] = 5e-4  # a real change still says so
    said.clear()
    run_recipe(parse_recipe(recipe), run)
    assert any("train/extend: inputs changed since the last run" in m for m in said), said


def test_run_folder_of_an_earlier_longforge_keeps_working(micro_recipe: dict, tmp_path: Path) -> None:
    recipe = _quick(micro_recipe)
    run = tmp_path / "run"
    run_recipe(parse_recipe(recipe), run)
    for mark in run.rglob(OWNER_MARK):  # what a longforge that wrote no marks left behind
        mark.unlink()
    (run / "resolved_recipe.yaml").rename(run / "recipe.yaml")
    first = _done_times(run)
    recipe["stages"][0]["lr"] = 5e-4
    run_recipe(parse_recipe(recipe), run)
    again = _done_times(run)
    assert again["data"] == first["data"] and again["train/extend"] != first["train/extend"]
    assert (run / "train" / "extend" / OWNER_MARK).is_file() and (run / "report" / "report.md").is_file()


@pytest.mark.parametrize("key, where", [("model", "rope/base"), ("ppl", "eval/final/heldout.jsonl"),
                                        ("sft", "train/sft/chat.jsonl"), ("source", "..")])
def test_inputs_a_run_would_clear_or_read_back_are_refused(micro_recipe: dict, tmp_path: Path, key: str, where: str) -> None:
    from longforge.runner import check_run_folder

    run = tmp_path / "run"
    path = str((run / where).resolve())
    if key == "model":
        micro_recipe["model"]["path"] = path
    elif key == "ppl":
        micro_recipe["eval"]["ppl"]["source"] = path
    elif key == "sft":
        micro_recipe["stages"].append({"name": "sft", "kind": "sft", "steps": 1, "sft": {"data": path}})
    else:
        micro_recipe["data"]["sources"][0]["path"] = path
    expect = "lies inside .* the folder this run's" if key != "source" else "the run folder .* lies inside `data.sources.0.path`"
    with pytest.raises(LongforgeError, match=expect):
        check_run_folder(parse_recipe(micro_recipe), run)


# ---------------------------------------------------------------- stage commands' own output folders


def test_train_out_of_user_files_is_refused_and_a_second_trainer_waits_its_turn(tmp_path: Path) -> None:
    import torch
    from test_train import _Source, _spec, make_tiny_model

    from longforge.train.loop import train_model

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.md").write_text("mine")
    with pytest.raises(LongforgeError, match=r"training output folder .*user already holds files longforge did not write \(notes\.md\)"):
        train_model(make_tiny_model(50), _Source(50, 2), _spec(), user, torch.device("cpu"))
    assert sorted(p.name for p in user.iterdir()) == ["notes.md"]
    out = tmp_path / "out"
    claim_dir(out, "training output folder")
    with FolderLock(out, "training output folder"):  # another `longforge train` into the same --out
        with pytest.raises(LongforgeError, match=r"training output folder .*out is in use by pid"):
            train_model(make_tiny_model(50), _Source(50, 2), _spec(), out, torch.device("cpu"))
    assert not (out / "checkpoints").exists()
    res = train_model(make_tiny_model(50), _Source(50, 2), _spec(), out, torch.device("cpu"))
    assert (res.final / "config.json").is_file()


def test_rope_out_of_user_files_is_refused_and_an_interrupted_rope_leaves_nothing(model_dir: Path, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    import longforge.positions.rope as rope
    from longforge.positions.rope import apply_rope

    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    with pytest.raises(LongforgeError, match=r"rope output folder .*user already holds files longforge did not write"):
        apply_rope(model_dir, user, PositionSpec(method="yarn"), 256)
    assert (user / "config.json").read_text() == '{"mine": true}'
    with pytest.raises(LongforgeError, match="--out must differ from the model folder and lie outside it"):
        apply_rope(model_dir, model_dir / "sub", PositionSpec(method="yarn"), 256)

    def crash(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(rope, "copy_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        apply_rope(model_dir, tmp_path / "new", PositionSpec(method="yarn"), 256)
    assert not (tmp_path / "new").exists()  # only a hidden temp folder, never a checkpoint that looks whole
    monkeypatch.undo()
    apply_rope(model_dir, tmp_path / "new", PositionSpec(method="yarn"), 256)
    assert (tmp_path / "new" / "longforge_rope.json").is_file() and (tmp_path / "new" / "model.safetensors").is_file()
