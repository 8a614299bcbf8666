"""Run a recipe: every stage into its own folder of a run directory, skipping finished stages and resuming the rest."""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from longforge.config import Recipe, dump_recipe, fingerprint
from longforge.errors import LongforgeError
from longforge.files import (
    FolderLock,
    atomic_write_json,
    atomic_write_text,
    claim_dir,
    clear_dir,
    content_stamp,
    is_inside,
    read_json,
    remove_dir,
)
from longforge.hf import TOKENIZER_FILES, check_checkpoint, resolve_device
from longforge.progress import console, say

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


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_stage(name: str, folder: Path, fp: str, fn: Callable[[], dict[str, Any]], resumable: bool = False,
              all_ranks: bool = False, timeline: dict[Path, str] | None = None) -> dict[str, Any]:
    """Run one stage unless it is already done with the same inputs; record its time (and in `timeline`, whether it ran).

    Under torchrun only rank 0 runs a stage, the others wait, unless `all_ranks` (training) asks for every process.
    """
    main = _rank() == 0
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
    _barrier()
    t0 = time.time()
    info = fn() if (main or all_ranks) else {}
    if main:
        rec = {"fingerprint": fp, "seconds": round(time.time() - t0, 2),
               "finished": dt.datetime.now().isoformat(timespec="seconds"), **info}
        atomic_write_json(folder / DONE, rec)
        say(f"[green]✓[/] {name} [dim]({rec['seconds']:.1f} s)[/]")
    _barrier()
    rec = read_json(folder / DONE)
    if not isinstance(rec, dict):
        raise LongforgeError(f"{folder / DONE} could not be read after the stage finished; check the disk and run again.")
    return rec


def original_length(recipe: Recipe) -> int:
    """The base model's pretraining window: the recipe's, or the checkpoint config's."""
    from longforge.hf import load_config
    from longforge.positions.rope import rope_info

    config = load_config(recipe.model.path, recipe.model.trust_remote_code)
    return rope_info(config, recipe.model.original_length).original_length


def recipe_inputs(recipe: Recipe) -> dict[str, Path]:
    """Every file or folder a recipe reads, by recipe key."""
    out: dict[str, Path | None] = {"model.path": recipe.model.path, "data.tokenizer": recipe.data.tokenizer}
    if recipe.data.sentence_filter is not None:
        out["data.sentence_filter.profile"] = recipe.data.sentence_filter.profile
    for i, s in enumerate(recipe.data.sources):
        out[f"data.sources.{i}.path"] = s.path
    for i, st in enumerate(recipe.stages):
        out[f"stages.{i}.data"] = st.data
        if st.sft is not None:
            out[f"stages.{i}.sft.data"] = st.sft.data
            out[f"stages.{i}.sft.chat_template"] = st.sft.chat_template
        if st.merge is not None and st.merge.other != "base":
            out[f"stages.{i}.merge.other"] = Path(st.merge.other)
    out.update(recipe.eval.input_paths())
    return {k: Path(v) for k, v in out.items() if v is not None}


def builds_data(recipe: Recipe) -> bool:
    """Whether the run has a data stage (some pretrain stage trains on the run's own data)."""
    return any(st.kind == "pretrain" and st.data is None for st in recipe.stages)


def stage_folders(recipe: Recipe, run_dir: Path) -> dict[str, Path]:
    """The folders a run clears or rewrites, by stage."""
    run_dir = Path(run_dir)
    folders = {"data": run_dir / "data"} if builds_data(recipe) else {}
    folders["rope"] = run_dir / "rope"
    folders.update({f"train/{st.name}": run_dir / "train" / st.name for st in recipe.stages})
    folders.update({f"eval/{label}": run_dir / "eval" / label for label in recipe.eval.models})
    if recipe.eval.models:
        folders["report"] = run_dir / "report"
    return folders


def check_run_folder(recipe: Recipe, run_dir: Path) -> None:
    """Refuse a run folder whose stages would clear one of the recipe's inputs, or that lies inside an input."""
    folders = stage_folders(recipe, run_dir)
    for key, path in recipe_inputs(recipe).items():
        for stage, folder in folders.items():
            if is_inside(path, folder):
                raise LongforgeError(f"`{key}` {path} lies inside {folder}, the folder this run's {stage} stage clears "
                                     "and rewrites; choose another run folder (--out) or move the input.")
        if is_inside(run_dir, path):
            raise LongforgeError(f"the run folder {run_dir} lies inside `{key}` {path}, so the run would read its own "
                                 "output; choose a run folder (--out) outside it.")


def preflight(recipe: Recipe, run_dir: Path | None = None) -> int:
    """Check everything a run needs before any work starts; returns the original window."""
    from longforge.data.sources import check_source

    if run_dir is not None:
        check_run_folder(recipe, run_dir)
    orig = original_length(recipe)
    if recipe.target_length <= orig:
        raise LongforgeError(
            f"`target_length` {recipe.target_length} is not above the model's window {orig} "
            f"({recipe.model.path}/config.json); set target_length above {orig}."
        )
    for s in recipe.data.sources:
        check_source(s)
    if recipe.eval.models:
        from longforge.eval.run import check_inputs, check_prompts
        from longforge.hf import load_tokenizer

        check_inputs(recipe.eval)
        # Prompts are built with the evaluated models' tokenizer: the base model's, which every stage keeps.
        check_prompts(recipe.eval, load_tokenizer(recipe.model.path, recipe.model.trust_remote_code), orig,
                      recipe.target_length)
    seq_len = recipe.data.seq_len or recipe.target_length
    if recipe.positions.transform != "contiguous" and seq_len > recipe.target_length:
        raise LongforgeError(
            f"`data.seq_len` {seq_len} is longer than `target_length` {recipe.target_length}, so transform "
            f"{recipe.positions.transform!r} has nothing to skip; pack shorter sequences (e.g. 30% of the target)."
        )
    for st in recipe.stages:
        if st.dataset == "replay" and st.data is None and recipe.data.replay is None:
            raise LongforgeError(f"stage {st.name!r} trains on the replay set, but `data.replay` is not set; add it (e.g. token_budget and seq_len).")
        if st.sft is not None and not Path(st.sft.data).is_file():
            raise LongforgeError(f"stage {st.name!r}: `sft.data` {st.sft.data} does not exist; point it at a JSONL of chat conversations.")
        if st.sft is not None and st.sft.chat_template is not None and not Path(st.sft.chat_template).is_file():
            raise LongforgeError(f"stage {st.name!r}: `sft.chat_template` {st.sft.chat_template} does not exist; give a Jinja file or remove the key.")
        if st.merge is not None and st.merge.other != "base" and not (Path(st.merge.other) / "config.json").is_file():
            raise LongforgeError(f"stage {st.name!r}: `merge.other` {st.merge.other} is not a checkpoint folder; use 'base' or a folder with config.json.")
        if st.merge is not None and st.merge.other != "base":
            check_checkpoint(Path(st.merge.other), f"stage {st.name!r}: `merge.other`")
        if st.data is not None and not (Path(st.data) / "index.json").is_file():
            raise LongforgeError(f"stage {st.name!r}: `data` {st.data} is not a longforge data folder; remove the key or run `longforge data build`.")
    resolve_device(recipe.device)
    return orig


def tokenizer_stamp(folder: Path) -> list[Any]:
    """The identity of a tokenizer: its folder and the content of its tokenizer files (not the model's weights)."""
    names = (*TOKENIZER_FILES, "added_tokens.json")
    return [str(folder), *(content_stamp(Path(folder) / n) for n in names if (Path(folder) / n).is_file())]


def stage_inputs(st: Any) -> list[Any]:
    """The content of a stage's own input files and folders, so rewriting one at the same path re-runs the stage."""
    out: list[Any] = []
    if st.data is not None:
        out.append(content_stamp(st.data))
    if st.sft is not None:
        out += [content_stamp(st.sft.data), content_stamp(st.sft.chat_template)]
    if st.merge is not None and st.merge.other != "base":
        out.append(content_stamp(st.merge.other))
    return out


def sft_source(st: Any, model_dir: Path, st_dir: Path, seed: int, layout: Any, trust_remote_code: bool = False) -> Any:
    """Packed, assistant-masked conversations for an SFT stage (bad records go to the stage's rejects.jsonl)."""
    from longforge.hf import load_tokenizer
    from longforge.train.sft import SFTBatches, load_conversations, pack_conversations

    spec = st.sft
    tok = load_tokenizer(model_dir, trust_remote_code)
    template = Path(spec.chat_template).read_text() if spec.chat_template else None
    data = load_conversations(spec.data, tok, spec.field, spec.seq_len, template, st_dir / "rejects.jsonl")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows = pack_conversations(data.examples, spec.seq_len, pad, seed)
    if data.rejects:
        say(f"  sft: kept {len(data.examples)} conversations; set aside " + ", ".join(f"{n} {r}" for r, n in data.rejects.items()))
    return SFTBatches(rows, st.batch_size, st.grad_accum, seed, rank=layout.dp_rank, world=layout.dp)


def run_recipe(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """Run every stage of a recipe into run_dir; returns the path of the report and the final checkpoint.

    The run folder is claimed as longforge's and locked for the whole run (on rank 0 under torchrun), so a second
    `longforge run` on it is refused, naming the holder; the OS frees the lock if this process dies.
    """
    from longforge.model.parallel import init_layout

    run_dir = Path(run_dir)
    orig = preflight(recipe, run_dir)
    device = resolve_device(recipe.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_layout(1, recipe.device)  # joins torchrun's process group so every stage can wait for rank 0
    if _rank() != 0:  # the other ranks wait for rank 0 at each stage's barrier
        return _run_stages(recipe, run_dir, orig, device)
    claim_dir(run_dir, "run folder", ours=old_run_folder)
    with FolderLock(run_dir, "run folder"):
        atomic_write_text(run_dir / RESOLVED, dump_recipe(recipe))
        return _run_stages(recipe, run_dir, orig, device)


def _in_run(run_dir: Path, *parts: str) -> Path:
    """A folder of the run: names from the recipe were validated, and this keeps every write inside the run folder."""
    folder = run_dir.joinpath(*parts)
    if not is_inside(folder, run_dir):
        raise LongforgeError(f"{'/'.join(parts)} would lie outside the run folder {run_dir}; rename it.")
    return folder


def _run_stages(recipe: Recipe, run_dir: Path, orig: int, device: Any) -> dict[str, Any]:
    """Every stage of the recipe, skipping those done with the same inputs (settings, paths and contents)."""
    from longforge.data.build import build_data
    from longforge.data.store import PackedDataset
    from longforge.data.verify import check_data_for_model
    from longforge.eval.run import evaluate
    from longforge.hf import load_model, load_tokenizer
    from longforge.merge import merge
    from longforge.model.parallel import init_layout
    from longforge.positions.rope import apply_rope
    from longforge.positions.segments import sentence_end_mask
    from longforge.report.build import build_report, collect, rich_tables
    from longforge.train.batches import PackedBatches
    from longforge.train.loop import train_model

    say(f"[bold]longforge run[/] {recipe.name}: {recipe.model.path} from {orig} to {recipe.target_length} tokens on {device}, into {run_dir}")
    timeline: dict[Path, str] = {}  # which stages this run ran and which it found done: the report says so

    seq_len = recipe.data.seq_len or recipe.target_length
    tok_dir = recipe.data.tokenizer or recipe.model.path
    tok_stamp = tokenizer_stamp(tok_dir)
    base_stamp = content_stamp(recipe.model.path)
    sf = recipe.data.sentence_filter
    # Contents, not only paths: a corpus or tokenizer rewritten at the same path rebuilds the data.
    data_fp = fingerprint([recipe.data.model_dump(mode="json"), str(tok_dir), seq_len, recipe.seed, tok_stamp,
                           [content_stamp(s.path) for s in recipe.data.sources],
                           content_stamp(sf.profile if sf is not None else None)])
    data_dir = _in_run(run_dir, "data")

    def do_data() -> dict[str, Any]:
        m = build_data(recipe.data, tok_dir, seq_len, data_dir, recipe.seed, recipe.model.trust_remote_code)
        return {"sequences": m["sequences"], "tokens": m["tokens_in_sequences"]}

    if builds_data(recipe):
        run_stage("data", data_dir, data_fp, do_data, resumable=True, timeline=timeline)  # build_data resumes after its last whole shard
    else:
        say("[dim]data: every training stage names its own `data` folder; the data stage has nothing to build[/]")

    # The base model's content counts: weights edited in place re-run rope and every stage after it.
    rope_fp = fingerprint([recipe.positions.model_dump(mode="json"), str(recipe.model.path), recipe.target_length, orig,
                           base_stamp])
    rope_dir = _in_run(run_dir, "rope")

    def do_rope() -> dict[str, Any]:
        plan = apply_rope(recipe.model.path, rope_dir, recipe.positions, recipe.target_length, orig, recipe.model.trust_remote_code)
        for note in plan.notes:
            say(f"  {note}")
        return {"method": plan.method, "factor": plan.factor, "rope_parameters": plan.rope_parameters}

    run_stage("rope", rope_dir, rope_fp, do_rope, timeline=timeline)

    model_in, model_fp = rope_dir, rope_fp
    for st in recipe.stages:
        st_dir = _in_run(run_dir, "train", st.name)
        st_data = st.data or (data_dir / "replay" if st.dataset == "replay" else data_dir)
        # A named data folder, SFT files and a merged checkpoint count by content, not only by path.
        st_fp = fingerprint([st.model_dump(mode="json"), model_fp, data_fp if st.data is None else None,
                             recipe.positions.transform, recipe.target_length, recipe.seed, stage_inputs(st),
                             tok_stamp if recipe.positions.transform == "pit" else None])

        def do_train(st=st, st_dir=st_dir, st_data=st_data, model_in=model_in) -> dict[str, Any]:
            layout = init_layout(st.sp, recipe.device)
            model = load_model(model_in, "cpu", trust_remote_code=recipe.model.trust_remote_code)
            if st.kind == "sft":
                source = sft_source(st, model_in, st_dir, recipe.seed, layout, recipe.model.trust_remote_code)
            else:
                check_data_for_model(st_data, model_in)
                # Replay is short text of the original distribution: plain positions, whatever the extension used.
                transform = "contiguous" if st.dataset == "replay" else recipe.positions.transform
                # PIT cuts at sentence ends, judged by the tokenizer that wrote the data's token ids.
                ends = sentence_end_mask(load_tokenizer(tok_dir, recipe.model.trust_remote_code)) if transform == "pit" else None
                source = PackedBatches(PackedDataset(st_data), st.batch_size, st.grad_accum, recipe.seed,
                                       transform, recipe.target_length, st.document_mask,
                                       rank=layout.dp_rank, world=layout.dp, sentence_ends=ends)
            res = train_model(model, source, st, st_dir, layout.device, tokenizer_from=model_in,
                              label=f"train/{st.name}", layout=layout)
            return {"final": str(res.final), "steps": res.steps, "last_loss": res.last_loss, "tokens": res.tokens}

        def do_merge(st=st, st_dir=st_dir, model_in=model_in) -> dict[str, Any]:
            assert st.merge is not None
            other = recipe.model.path if st.merge.other == "base" else Path(st.merge.other)
            info = merge([other, model_in], list(st.merge.weights), st_dir / "final", st.merge.method,
                         config_from=1)
            return {"final": str(st_dir / "final"), **info}

        if st.kind == "merge":
            run_stage(f"merge/{st.name}", st_dir, st_fp, do_merge, timeline=timeline)
            model_in, model_fp = st_dir / "final", st_fp
            continue
        run_stage(f"train/{st.name}", st_dir, st_fp, do_train, resumable=True, all_ranks=True, timeline=timeline)
        model_in, model_fp = st_dir / "final", st_fp

    models = {"base": (recipe.model.path, fingerprint([str(recipe.model.path), base_stamp])), "final": (model_in, model_fp)}
    eval_inputs = [content_stamp(p) for p in recipe.eval.input_paths().values()]
    for label in recipe.eval.models:
        path, mfp = models[label]
        ev_fp = fingerprint([recipe.eval.model_dump(mode="json"), mfp, orig, recipe.target_length, eval_inputs])
        ev_dir = _in_run(run_dir, "eval", label)

        def do_eval(label=label, path=path, ev_dir=ev_dir) -> dict[str, Any]:
            return evaluate(path, recipe.eval, ev_dir, orig, recipe.target_length, device, label,
                            recipe.model.trust_remote_code)

        run_stage(f"eval/{label}", ev_dir, ev_fp, do_eval, timeline=timeline)

    if _rank() == 0:
        atomic_write_json(run_dir / TIMELINE, {"stages": {str(f.relative_to(run_dir)): s for f, s in timeline.items()}})
    if not recipe.eval.models:
        say("[dim]report: `eval.models` is empty, so there is nothing to report[/]")
        return {"report": None, "html": None, "final": str(model_in)}
    # The report is cheap and shows every stage's timing, so it is rebuilt on every run.
    say("[bold cyan]▶ report[/]")
    rep = {"md": str(run_dir / "report" / "report.md"), "html": str(run_dir / "report" / "report.html")}
    if _rank() == 0:
        claim_dir(_in_run(run_dir, "report"), "report folder", ours=old_report_folder)
        rep.update({k: str(v) for k, v in build_report(run_dir).items()})
        for table in rich_tables(collect(run_dir)):
            console.print(table)
        say(f"report: {rep['md']}  and  {rep['html']}")
    _barrier()
    return {"report": rep["md"], "html": rep["html"], "final": str(model_in)}
