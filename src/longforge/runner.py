"""Run a recipe: every stage into its own folder of a run directory, skipping finished stages and resuming the rest."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from longforge.config import Recipe, dump_recipe, fingerprint
from longforge.errors import LongforgeError
from longforge.hf import check_checkpoint, resolve_device
from longforge.progress import console, say

DONE = "DONE.json"
STARTED = "STARTED.json"


def stage_done(folder: Path, fp: str) -> bool:
    """True when the stage finished with these exact inputs."""
    f = folder / DONE
    return f.is_file() and json.loads(f.read_text()).get("fingerprint") == fp


def prepare_stage(folder: Path, fp: str, keep_partial: bool) -> None:
    """Make the stage folder ready: keep partial work of the same inputs (to resume), wipe anything else."""
    started = folder / STARTED
    if folder.exists():
        same = started.is_file() and json.loads(started.read_text()).get("fingerprint") == fp
        if not (same and keep_partial):
            if (folder / DONE).exists() or started.exists():
                say(f"  [yellow]{folder.name}: inputs changed since the last run; starting this stage again[/]")
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps({"fingerprint": fp, "started": dt.datetime.now().isoformat(timespec="seconds")}))


def run_stage(name: str, folder: Path, fp: str, fn: Callable[[], dict[str, Any]], resumable: bool = False) -> dict[str, Any]:
    """Run one stage unless it is already done with the same inputs; record its time."""
    if stage_done(folder, fp):
        say(f"[green]✓[/] {name} [dim](done earlier, skipped)[/]")
        return json.loads((folder / DONE).read_text())
    say(f"[bold cyan]▶ {name}[/]")
    prepare_stage(folder, fp, keep_partial=resumable)
    t0 = time.time()
    info = fn()
    rec = {"fingerprint": fp, "seconds": round(time.time() - t0, 2),
           "finished": dt.datetime.now().isoformat(timespec="seconds"), **info}
    (folder / DONE).write_text(json.dumps(rec, indent=1, default=str))
    say(f"[green]✓[/] {name} [dim]({rec['seconds']:.1f} s)[/]")
    return rec


def original_length(recipe: Recipe) -> int:
    """The base model's pretraining window: the recipe's, or the checkpoint config's."""
    from transformers import AutoConfig

    from longforge.positions.rope import rope_info

    config = AutoConfig.from_pretrained(check_checkpoint(recipe.model.path))
    return rope_info(config, recipe.model.original_length).original_length


def preflight(recipe: Recipe) -> int:
    """Check everything a run needs before any work starts; returns the original window."""
    from longforge.data.sources import check_source

    orig = original_length(recipe)
    if recipe.target_length <= orig:
        raise LongforgeError(
            f"`target_length` {recipe.target_length} is not above the model's window {orig} "
            f"({recipe.model.path}/config.json); set target_length above {orig}."
        )
    for s in recipe.data.sources:
        check_source(s)
    if recipe.eval.models:
        from longforge.eval.run import check_inputs

        check_inputs(recipe.eval)
    for st in recipe.stages:
        if st.data is not None and not (Path(st.data) / "index.json").is_file():
            raise LongforgeError(f"stage {st.name!r}: `data` {st.data} is not a longforge data folder; remove the key or run `longforge data build`.")
    resolve_device(recipe.device)
    return orig


def run_recipe(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """Run every stage of a recipe into run_dir; returns the path of the report and the final checkpoint."""
    from longforge.data.build import build_data
    from longforge.data.store import PackedDataset
    from longforge.eval.run import evaluate
    from longforge.hf import load_model
    from longforge.positions.rope import apply_rope
    from longforge.report.build import build_report, collect, rich_tables
    from longforge.train.batches import PackedBatches
    from longforge.train.loop import train_model

    orig = preflight(recipe)
    device = resolve_device(recipe.device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    say(f"[bold]longforge run[/] {recipe.name}: {recipe.model.path} from {orig} to {recipe.target_length} tokens on {device}, into {run_dir}")

    seq_len = recipe.data.seq_len or recipe.target_length
    tok_dir = recipe.data.tokenizer or recipe.model.path
    data_fp = fingerprint([recipe.data.model_dump(mode="json"), str(tok_dir), seq_len, recipe.seed])
    data_dir = run_dir / "data"

    def do_data() -> dict[str, Any]:
        m = build_data(recipe.data, tok_dir, seq_len, data_dir, recipe.seed)
        return {"sequences": m["sequences"], "tokens": m["tokens_in_sequences"]}

    run_stage("data", data_dir, data_fp, do_data)

    rope_fp = fingerprint([recipe.positions.model_dump(mode="json"), str(recipe.model.path), recipe.target_length, orig])
    rope_dir = run_dir / "rope"

    def do_rope() -> dict[str, Any]:
        plan = apply_rope(recipe.model.path, rope_dir, recipe.positions, recipe.target_length, orig)
        for note in plan.notes:
            say(f"  {note}")
        return {"method": plan.method, "factor": plan.factor, "rope_parameters": plan.rope_parameters}

    run_stage("rope", rope_dir, rope_fp, do_rope)

    model_in, model_fp = rope_dir, rope_fp
    for st in recipe.stages:
        st_dir = run_dir / "train" / st.name
        st_data = st.data or data_dir
        st_fp = fingerprint([st.model_dump(mode="json"), model_fp, data_fp if st.data is None else str(st.data),
                             recipe.positions.transform, recipe.target_length, recipe.seed])

        def do_train(st=st, st_dir=st_dir, st_data=st_data, model_in=model_in) -> dict[str, Any]:
            model = load_model(model_in, device)
            source = PackedBatches(PackedDataset(st_data), st.batch_size, st.grad_accum, recipe.seed,
                                   recipe.positions.transform, recipe.target_length, st.document_mask)
            res = train_model(model, source, st, st_dir, device, tokenizer_from=model_in, label=f"train/{st.name}")
            return {"final": str(res.final), "steps": res.steps, "last_loss": res.last_loss, "tokens": res.tokens}

        run_stage(f"train/{st.name}", st_dir, st_fp, do_train, resumable=True)
        model_in, model_fp = st_dir / "final", st_fp

    models = {"base": (recipe.model.path, fingerprint(str(recipe.model.path))), "final": (model_in, model_fp)}
    for label in recipe.eval.models:
        path, mfp = models[label]
        ev_fp = fingerprint([recipe.eval.model_dump(mode="json"), mfp, orig, recipe.target_length])

        def do_eval(label=label, path=path) -> dict[str, Any]:
            return evaluate(path, recipe.eval, run_dir / "eval" / label, orig, recipe.target_length, device, label)

        run_stage(f"eval/{label}", run_dir / "eval" / label, ev_fp, do_eval)

    # The report is cheap and shows every stage's timing, so it is rebuilt on every run.
    say("[bold cyan]▶ report[/]")
    paths = build_report(run_dir)
    rep = {k: str(v) for k, v in paths.items()}
    for table in rich_tables(collect(run_dir)):
        console.print(table)
    say(f"report: {rep['md']}  and  {rep['html']}")
    return {"report": rep["md"], "html": rep["html"], "final": str(model_in)}
