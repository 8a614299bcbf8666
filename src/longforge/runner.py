"""Run a plan of stages: in a run folder, every stage into its own folder, skipping finished stages and resuming the
rest (markers, locks, timeline); for a stage command, its one stage into its --out. The stages are longforge.stages."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from longforge.config import Recipe
from longforge.errors import LongforgeError
from longforge.files import (
    FolderLock,
    atomic_write_json,
    atomic_write_text,
    claim_dir,
    clear_dir,
    is_inside,
    read_json,
    remove_dir,
)
from longforge.model.parallel import Layout
from longforge.progress import say
from longforge.recipe import dump_recipe, input_paths
from longforge.stages.base import RunPlan

DONE = "DONE.json"
STARTED = "STARTED.json"
# The resolved recipe (every default filled in) has its own name, so a recipe.yaml of the user's is never overwritten.
RESOLVED = "resolved_recipe.yaml"
TIMELINE = "timeline.json"  # which stages the last run ran and which it found done
# What a run folder holds; recipe.yaml is the resolved recipe of runs written before RESOLVED existed.
RUN_ENTRIES = {RESOLVED, TIMELINE, "recipe.yaml", "data", "rope", "train", "eval", "report", "demo.yaml", "demo_checks.json"}
REPORT_FILE = re.compile(r"^(report\.md|report\.html|summary\.json|[A-Za-z0-9_-]+\.png)$")


def old_stage_folder(folder: Path) -> bool:
    """A stage folder written by a longforge that did not mark its folders (it holds STARTED.json or DONE.json)."""
    return (folder / STARTED).is_file() or (folder / DONE).is_file()


def old_run_folder(folder: Path) -> bool:
    """A run folder written by a longforge that did not mark its folders: only run entries, and a stage it started."""
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    stages = [folder / "data", folder / "rope", *folder.glob("train/*"), *folder.glob("eval/*")]
    return names <= RUN_ENTRIES and bool(names & {"recipe.yaml", RESOLVED}) and any(old_stage_folder(s) for s in stages)


def old_report_folder(folder: Path) -> bool:
    """A report folder written by a longforge that did not mark its folders (only the report's own files)."""
    return all(REPORT_FILE.match(p.name) for p in folder.iterdir() if not p.name.startswith("."))


def old_cache_folder(folder: Path) -> bool:
    """A cache of the demo or the lab from before folders were marked: nothing but stage folders."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return all(p.is_dir() and old_stage_folder(p) for p in entries)


def discard(folder: Path, what: str, ours: Callable[[Path], bool] | None = None) -> None:
    """Delete a folder longforge created (or recognises, by `ours`, as an older longforge's); refuse anything else."""
    folder = Path(folder)
    if folder.exists():
        remove_dir(claim_dir(folder, what, ours), what)


def stage_done(folder: Path, fp: str) -> bool:
    """True when the stage finished with these exact inputs (a missing or damaged DONE.json means not done)."""
    rec = read_json(folder / DONE)
    return isinstance(rec, dict) and rec.get("fingerprint") == fp


def stage_label(folder: Path) -> str:
    """A stage's short name from its folder: rope, data, train/extend, eval/final."""
    folder = Path(folder)
    return f"{folder.parent.name}/{folder.name}" if folder.parent.name in ("train", "eval") else folder.name


def prepare_stage(folder: Path, fp: str, keep_partial: bool) -> None:
    """Make the stage folder ready: keep partial work of the same inputs (to resume), clear anything else.

    Only a folder longforge wrote is cleared; one holding other files is refused, never deleted.
    """
    name = stage_label(folder)
    what = f"the {name} stage's folder"
    if folder.is_dir():
        started = read_json(folder / STARTED)
        same = isinstance(started, dict) and started.get("fingerprint") == fp
        changed = isinstance(started, dict) and not same
        done = read_json(folder / DONE)
        if same and keep_partial:
            claim_dir(folder, what, ours=old_stage_folder)
            say(f"  {name}: an earlier run of this stage was interrupted; resuming it")
        else:
            if changed or (started is None and isinstance(done, dict)):
                say(f"  [yellow]{name}: inputs changed since the last run; starting this stage again[/]")
            elif same or (folder / STARTED).exists() or (folder / DONE).exists():
                say(f"  [yellow]{name}: an earlier run of this stage was interrupted; starting it again[/]")
            clear_dir(folder, what, ours=old_stage_folder)
    else:
        claim_dir(folder, what)
    atomic_write_json(folder / STARTED, {"fingerprint": fp, "started": dt.datetime.now().isoformat(timespec="seconds")})


def run_stage(name: str, folder: Path, fp: str, fn: Callable[[], dict[str, Any]], resumable: bool = False,
              all_ranks: bool = False, timeline: dict[Path, str] | None = None,
              processes: Layout | None = None) -> dict[str, Any]:
    """Run one stage unless it is already done with the same inputs; record its time (and in `timeline`, whether it ran).

    Under torchrun (`processes`, the run's layout) only rank 0 runs a stage and the others wait, unless `all_ranks`
    (training) asks for every process. Without `processes`: one process.
    """
    processes = processes or Layout.single("cpu")
    main = processes.is_main
    if stage_done(folder, fp):
        say(f"[green]✓[/] {name} [dim](done earlier, skipped)[/]")
        if timeline is not None:
            timeline[folder] = "cached"
        return read_json(folder / DONE)
    if timeline is not None:
        timeline[folder] = "ran"
    say(f"[bold cyan]▶ {name}[/]")
    if main:
        prepare_stage(folder, fp, keep_partial=resumable)
    processes.barrier()
    t0 = time.time()
    info = fn() if (main or all_ranks) else {}
    if main:
        rec = {"fingerprint": fp, "seconds": round(time.time() - t0, 2),
               "finished": dt.datetime.now().isoformat(timespec="seconds"), **info}
        atomic_write_json(folder / DONE, rec)
        say(f"[green]✓[/] {name} [dim]({rec['seconds']:.1f} s)[/]")
    processes.barrier()
    rec = read_json(folder / DONE)
    if not isinstance(rec, dict):
        raise LongforgeError(f"{folder / DONE} could not be read after the stage finished; check the disk and run again.")
    return rec


def stage_folders(recipe: Recipe, run_dir: Path) -> dict[str, Path]:
    """The folders a run clears or rewrites, by their path in the run folder (data, rope, train/<name>, ...)."""
    from longforge.stages import plan_recipe

    run_dir = Path(run_dir)
    return {str(s.folder.relative_to(run_dir)): s.folder for s in plan_recipe(recipe, run_dir).stages}


def check_run_folder(recipe: Recipe, run_dir: Path) -> None:
    """Refuse a run folder whose stages would clear one of the recipe's inputs, or that lies inside an input."""
    folders = stage_folders(recipe, run_dir)
    for key, path in input_paths(recipe).items():
        for stage, folder in folders.items():
            if is_inside(path, folder):
                raise LongforgeError(f"`{key}` {path} lies inside {folder}, the folder this run's {stage} stage clears "
                                     "and rewrites; choose another run folder (--out) or move the input.")
        if is_inside(run_dir, path):
            raise LongforgeError(f"the run folder {run_dir} lies inside `{key}` {path}, so the run would read its own "
                                 "output; choose a run folder (--out) outside it.")


def plan_run(recipe: Recipe, run_dir: Path | None = None) -> RunPlan:
    """The recipe's plan, checked before any work: the run folder, the model's window, then every stage's checks."""
    from longforge.hf import load_config
    from longforge.positions.rope import rope_info
    from longforge.stages import plan_recipe

    if run_dir is not None:
        check_run_folder(recipe, run_dir)
    plan = plan_recipe(recipe, run_dir if run_dir is not None else Path("runs") / recipe.name)
    config = load_config(recipe.model.path, recipe.model.trust_remote_code)
    plan.original_length = orig = rope_info(config, recipe.model.original_length).original_length
    if recipe.target_length <= orig:
        raise LongforgeError(
            f"`target_length` {recipe.target_length} is not above the model's window {orig} "
            f"({recipe.model.path}/config.json); set target_length above {orig}."
        )
    check_plan(plan)
    return plan


def preflight(recipe: Recipe, run_dir: Path | None = None) -> int:
    """Check everything a run needs before any work starts; returns the original window."""
    orig = plan_run(recipe, run_dir).original_length
    assert orig is not None
    return orig


def check_plan(plan: RunPlan) -> None:
    """Every stage's checks, then the device: all before the first stage runs."""
    for stage in plan.stages:
        stage.check(plan)
    _ = plan.torch_device  # one sentence when CUDA is asked for and absent


def execute(plan: RunPlan, checked: bool = False) -> dict[str, dict[str, Any]]:
    """Run a plan's stages in order, after their checks; returns each stage's record by title.

    In a run folder (plan.run_dir) a stage done with the same inputs is skipped, an interrupted resumable one
    continues, and timeline.json says which ran; a stage command's plan runs its stage into its own --out.
    """
    if not checked:
        check_plan(plan)
    records: dict[str, dict[str, Any]] = {}
    timeline: dict[Path, str] = {}  # which stages this run ran and which it found done: the report says so
    for stage in plan.stages:
        if plan.run_dir is None:
            records[stage.title] = stage.run(plan)
            continue
        processes = plan.processes
        if not stage.cached:  # rebuilt on every run, on rank 0
            say(f"[bold cyan]▶ {stage.title}[/]")
            records[stage.title] = stage.run(plan) if processes.is_main else {}
            processes.barrier()
            continue
        records[stage.title] = run_stage(stage.title, stage.folder, stage.fingerprint(plan), partial(stage.run, plan),
                                         resumable=stage.resumable, all_ranks=stage.all_ranks, timeline=timeline,
                                         processes=processes)
        if processes.is_main:
            atomic_write_json(plan.run_dir / TIMELINE,
                              {"stages": {str(f.relative_to(plan.run_dir)): s for f, s in timeline.items()}})
    return records


def run_recipe(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """Run every stage of a recipe into run_dir; returns the path of the report and the final checkpoint.

    The run folder is claimed as longforge's and locked for the whole run (on rank 0 under torchrun), so a second
    `longforge run` on it is refused, naming the holder; the OS frees the lock if this process dies.
    """
    run_dir = Path(run_dir)
    plan = plan_run(recipe, run_dir)
    if not plan.processes.is_main:  # the other ranks wait for rank 0 at each stage's barrier
        return _run(recipe, plan)
    claim_dir(run_dir, "run folder", ours=old_run_folder)
    with FolderLock(run_dir, "run folder"):
        atomic_write_text(run_dir / RESOLVED, dump_recipe(recipe))
        return _run(recipe, plan)


def _run(recipe: Recipe, plan: RunPlan) -> dict[str, Any]:
    """The checked plan's stages, with the run's header line and notes."""
    from longforge.stages import DataStage, final_model

    say(f"[bold]longforge run[/] {recipe.name}: {recipe.model.path} from {plan.original_length} to "
        f"{recipe.target_length} tokens on {plan.torch_device}, into {plan.run_dir}")
    if not any(isinstance(s, DataStage) for s in plan.stages):
        say("[dim]data: every training stage names its own `data` folder; the data stage has nothing to build[/]")
    records = execute(plan, checked=True)
    final = str(final_model(plan))
    if "report" not in records:
        say("[dim]report: `eval.models` is empty, so there is nothing to report[/]")
        return {"report": None, "html": None, "final": final}
    rep = records["report"] or {}
    assert plan.run_dir is not None
    return {"report": rep.get("md", str(plan.run_dir / "report" / "report.md")),
            "html": rep.get("html", str(plan.run_dir / "report" / "report.html")), "final": final}
