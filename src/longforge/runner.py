"""Run a recipe: every stage into its own folder of a run directory, skipping finished stages and resuming the rest."""

from __future__ import annotations

import datetime as dt
import json
import os
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


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_stage(name: str, folder: Path, fp: str, fn: Callable[[], dict[str, Any]], resumable: bool = False,
              all_ranks: bool = False) -> dict[str, Any]:
    """Run one stage unless it is already done with the same inputs; record its time.

    Under torchrun only rank 0 runs a stage, the others wait, unless `all_ranks` (training) asks for every process.
    """
    main = _rank() == 0
    if stage_done(folder, fp):
        say(f"[green]✓[/] {name} [dim](done earlier, skipped)[/]")
        return json.loads((folder / DONE).read_text())
    say(f"[bold cyan]▶ {name}[/]")
    if main:
        prepare_stage(folder, fp, keep_partial=resumable)
    _barrier()
    t0 = time.time()
    info = fn() if (main or all_ranks) else {}
    if main:
        rec = {"fingerprint": fp, "seconds": round(time.time() - t0, 2),
               "finished": dt.datetime.now().isoformat(timespec="seconds"), **info}
        (folder / DONE).write_text(json.dumps(rec, indent=1, default=str))
        say(f"[green]✓[/] {name} [dim]({rec['seconds']:.1f} s)[/]")
    _barrier()
    return json.loads((folder / DONE).read_text())


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
        if st.data is not None and not (Path(st.data) / "index.json").is_file():
            raise LongforgeError(f"stage {st.name!r}: `data` {st.data} is not a longforge data folder; remove the key or run `longforge data build`.")
    resolve_device(recipe.device)
    return orig


def _data_stamp(folder: Path) -> list[str]:
    """A packed data folder's identity: its path and the fingerprint of its index."""
    index = folder / "index.json"
    return [str(folder), fingerprint(index.read_text()) if index.is_file() else "missing"]


def _file_stamp(st: Any) -> list[Any]:
    """Size and modification time of a stage's own input files, so editing them re-runs the stage."""
    files = [st.sft.data] + ([st.sft.chat_template] if st.sft.chat_template else []) if st.sft is not None else []
    return [(str(f), Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in files if Path(f).is_file()]


def sft_source(st: Any, model_dir: Path, st_dir: Path, seed: int, layout: Any) -> Any:
    """Packed, assistant-masked conversations for an SFT stage (bad records go to the stage's rejects.jsonl)."""
    from longforge.hf import load_tokenizer
    from longforge.train.sft import SFTBatches, load_conversations, pack_conversations

    spec = st.sft
    tok = load_tokenizer(model_dir)
    template = Path(spec.chat_template).read_text() if spec.chat_template else None
    data = load_conversations(spec.data, tok, spec.field, spec.seq_len, template, st_dir / "rejects.jsonl")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows = pack_conversations(data.examples, spec.seq_len, pad, seed)
    if data.rejects:
        say(f"  sft: kept {len(data.examples)} conversations; set aside " + ", ".join(f"{n} {r}" for r, n in data.rejects.items()))
    return SFTBatches(rows, st.batch_size, st.grad_accum, seed, rank=layout.dp_rank, world=layout.dp)


def run_recipe(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """Run every stage of a recipe into run_dir; returns the path of the report and the final checkpoint."""
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

    orig = preflight(recipe)
    device = resolve_device(recipe.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_layout(1, recipe.device)  # joins torchrun's process group so every stage can wait for rank 0
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

    if any(st.kind == "pretrain" and st.data is None for st in recipe.stages):
        run_stage("data", data_dir, data_fp, do_data)
    else:
        say("[dim]data: every training stage names its own `data` folder; the data stage has nothing to build[/]")

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
        st_data = st.data or (data_dir / "replay" if st.dataset == "replay" else data_dir)
        # A named data folder counts by its index (rebuilt data retrains the stage), not only by its path.
        st_fp = fingerprint([st.model_dump(mode="json"), model_fp, data_fp if st.data is None else _data_stamp(Path(st.data)),
                             recipe.positions.transform, recipe.target_length, recipe.seed, _file_stamp(st)])

        def do_train(st=st, st_dir=st_dir, st_data=st_data, model_in=model_in) -> dict[str, Any]:
            layout = init_layout(st.sp, recipe.device)
            model = load_model(model_in, "cpu")
            if st.kind == "sft":
                source = sft_source(st, model_in, st_dir, recipe.seed, layout)
            else:
                check_data_for_model(st_data, model_in)
                # Replay is short text of the original distribution: plain positions, whatever the extension used.
                transform = "contiguous" if st.dataset == "replay" else recipe.positions.transform
                # PIT cuts at sentence ends, judged by the tokenizer that wrote the data's token ids.
                ends = sentence_end_mask(load_tokenizer(tok_dir)) if transform == "pit" else None
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
            run_stage(f"merge/{st.name}", st_dir, st_fp, do_merge)
            model_in, model_fp = st_dir / "final", st_fp
            continue
        run_stage(f"train/{st.name}", st_dir, st_fp, do_train, resumable=True, all_ranks=True)
        model_in, model_fp = st_dir / "final", st_fp

    models = {"base": (recipe.model.path, fingerprint(str(recipe.model.path))), "final": (model_in, model_fp)}
    for label in recipe.eval.models:
        path, mfp = models[label]
        ev_fp = fingerprint([recipe.eval.model_dump(mode="json"), mfp, orig, recipe.target_length])

        def do_eval(label=label, path=path) -> dict[str, Any]:
            return evaluate(path, recipe.eval, run_dir / "eval" / label, orig, recipe.target_length, device, label)

        run_stage(f"eval/{label}", run_dir / "eval" / label, ev_fp, do_eval)

    if not recipe.eval.models:
        say("[dim]report: `eval.models` is empty, so there is nothing to report[/]")
        return {"report": None, "html": None, "final": str(model_in)}
    # The report is cheap and shows every stage's timing, so it is rebuilt on every run.
    say("[bold cyan]▶ report[/]")
    rep = {"md": str(run_dir / "report" / "report.md"), "html": str(run_dir / "report" / "report.html")}
    if _rank() == 0:
        rep.update({k: str(v) for k, v in build_report(run_dir).items()})
        for table in rich_tables(collect(run_dir)):
            console.print(table)
        say(f"report: {rep['md']}  and  {rep['html']}")
    _barrier()
    return {"report": rep["md"], "html": rep["html"], "final": str(model_in)}
