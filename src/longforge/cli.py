"""The `longforge` command: `run` a recipe, or run one stage (`data`, `rope`, `train`, `merge`, `eval`, `report`), or `demo`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from longforge.errors import LongforgeError
from longforge.progress import console, err_console, say

app = typer.Typer(
    help="Extend the context window of a pretrained causal LM: data, RoPE scaling, long-sequence training, evaluation, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build packed training data from corpus files, or inspect a built data folder.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory for the demo's stages and report.")] = Path("longforge-demo"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda; cuda runs a larger default.")] = "auto",
    fresh: Annotated[bool, typer.Option(help="Rebuild everything: the cached corpus, tokenizer, base model and the run.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for data, initialisation and sampling.")] = 0,
) -> None:
    """Build a corpus, tokenizer and short-window base model from this machine's files, extend it 8x, evaluate, report."""
    from longforge.demo.run import run_demo

    run_demo(out, device=device, fresh=fresh, seed=seed)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default: runs/<recipe name>).")] = None,
) -> None:
    """Run every stage of a recipe into a run directory; finished stages are skipped, an interrupted one resumes."""
    from longforge.config import load_recipe
    from longforge.runner import run_recipe

    r = load_recipe(recipe)
    run_recipe(r, out or Path("runs") / r.name)


def _parse_source(text: str, i: int) -> dict[str, object]:
    """PATH[,name=N][,domain=D][,weight=W][,field=F][,format=F][,group_by=G][,role=R] -> a SourceSpec mapping."""
    path, *opts = text.split(",")
    spec: dict[str, object] = {"name": f"source{i}", "path": path}
    keys = {"name": "name", "domain": "domain", "weight": "weight", "field": "text_field", "format": "format",
            "group_by": "group_by", "role": "role"}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep or k not in keys:
            raise LongforgeError(f"--source {text!r}: option {o!r} is not one of {', '.join(k + '=' for k in keys)}.")
        spec[keys[k]] = v
    return spec


@data_app.command("build")
def data_build(
    source: Annotated[list[str], typer.Option(help="PATH[,name=N][,domain=D][,weight=W][,field=F][,format=jsonl|parquet|text|hf_disk]"
                                                   "[,group_by=FIELD][,role=long|short]; repeat for several sources.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer (or model) folder.")],
    seq_len: Annotated[int, typer.Option(help="Packed sequence length in tokens.")],
    out: Annotated[Path, typer.Option(help="Output data folder.")],
    plan: Annotated[str, typer.Option(help="none, upsample_long (Fu et al.), length_thresholds (UltraLong) or long_short_mix (ProLong).")] = "upsample_long",
    budget: Annotated[Optional[int], typer.Option(help="Tokens to write (split over sources by weight).")] = None,
    short_threshold: Annotated[int, typer.Option(help="Documents shorter than this many tokens are 'short'.")] = 4096,
    short_keep_prob: Annotated[float, typer.Option(help="Probability of keeping a short document.")] = 0.1,
    long_threshold: Annotated[int, typer.Option(help="length_thresholds: documents longer than this are repeated.")] = 8192,
    long_repeat: Annotated[float, typer.Option(help="length_thresholds: expected copies of a long document.")] = 2.0,
    long_share: Annotated[float, typer.Option(help="long_short_mix: share of long data in the budget.")] = 0.6,
    separator: Annotated[str, typer.Option(help="eos, bos, none, or text:<literal>.")] = "eos",
    sentence_filter: Annotated[Optional[str], typer.Option(help="LongRecipe sentence selection: 'digits' (keep sentences with digits, others with --filter-keep-prob).")] = None,
    filter_keep_prob: Annotated[float, typer.Option(help="Sentence filter: probability of keeping a sentence it does not require.")] = 0.5,
    filter_budget: Annotated[float, typer.Option(help="Sentence filter: keep at most this share of each document.")] = 0.3,
    replay_budget: Annotated[Optional[int], typer.Option(help="Also write a replay set of this many tokens (short documents) to OUT/replay.")] = None,
    replay_seq_len: Annotated[Optional[int], typer.Option(help="Sequence length of the replay set (the original window).")] = None,
    batch_order: Annotated[str, typer.Option(help="shuffle, or ssq: order each global batch by sum of squared document lengths (ProLong).")] = "shuffle",
    shard_sequences: Annotated[int, typer.Option(help="Sequences per shard file.")] = 4096,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Read, tokenize, sample and pack sources into memory-mapped shards with document boundaries (and a replay set)."""
    from longforge.config import DataSpec
    from longforge.data.build import build_data

    if (replay_budget is None) != (replay_seq_len is None):
        raise LongforgeError("--replay-budget and --replay-seq-len go together; give both or neither.")
    spec = _validated(DataSpec, {
        "sources": [_parse_source(s, i) for i, s in enumerate(source)], "plan": plan, "token_budget": budget,
        "short_threshold": short_threshold, "short_keep_prob": short_keep_prob, "long_threshold": long_threshold,
        "long_repeat": long_repeat, "long_share": long_share, "separator": separator, "seq_len": seq_len,
        "sentence_filter": None if sentence_filter is None else
        {"method": sentence_filter, "keep_prob": filter_keep_prob, "budget_fraction": filter_budget},
        "replay": None if replay_budget is None else {"token_budget": replay_budget, "seq_len": replay_seq_len},
        "batch_order": batch_order, "shard_sequences": shard_sequences,
    }, "data build")
    m = build_data(spec, tokenizer, seq_len, out, seed)
    _print_manifest(m)


@data_app.command("inspect")
def data_inspect(
    folder: Annotated[Path, typer.Argument(help="A folder written by `longforge data build`.")],
    plot: Annotated[Optional[Path], typer.Option(help="Where to write the length histogram (default FOLDER/length_histogram.png).")] = None,
) -> None:
    """Print what a data build kept, dropped and repeated, per source and length bucket, and plot a length histogram."""
    from longforge.data.report import plot_lengths

    path = folder / "manifest.json"
    if not path.is_file():
        raise LongforgeError(f"{folder} has no manifest.json; pass a folder written by `longforge data build`.")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LongforgeError(f"{path} is not valid JSON ({e.msg}); rebuild the folder with `longforge data build`.") from None
    _print_manifest(m, by_length=True)
    png = plot_lengths(m, plot or folder / "length_histogram.png")
    say(f"length histogram: {png}")


def _print_manifest(m: dict, by_length: bool = False) -> None:
    from longforge.data.report import length_table, source_table, summary_lines

    console.print(source_table(m))
    if by_length:
        console.print(length_table(m))
    for line in summary_lines(m):
        console.print(line)


@app.command()
def rope(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face checkpoint folder.")],
    target_length: Annotated[int, typer.Option(help="Context length to reach, in tokens.")],
    out: Annotated[Optional[Path], typer.Option(help="Output checkpoint folder (not needed with --dry-run).")] = None,
    method: Annotated[str, typer.Option(help="none, pi, ntk, theta, dynamic, yarn or llama3.")] = "yarn",
    factor: Annotated[Optional[float], typer.Option(help="Scale factor (default: target / original length).")] = None,
    alpha: Annotated[float, typer.Option(help="YaRN alpha (beta_slow).")] = 1.0,
    beta: Annotated[float, typer.Option(help="YaRN beta (beta_fast).")] = 32.0,
    theta: Annotated[Optional[float], typer.Option(help="New RoPE base for --method theta.")] = None,
    original_length: Annotated[Optional[int], typer.Option(help="The model's pretraining window, if its config does not say.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the frequency table; write nothing.")] = False,
) -> None:
    """Rewrite a checkpoint's RoPE config for a longer context (weights are hard-linked, not copied)."""
    from transformers import AutoConfig

    from longforge.config import PositionSpec
    from longforge.hf import check_checkpoint
    from longforge.positions.rope import apply_rope, freq_table, plan_rope

    spec = _validated(PositionSpec, {"method": method, "factor": factor, "beta_fast": beta, "beta_slow": alpha, "theta": theta}, "rope")
    if dry_run:
        plan = plan_rope(AutoConfig.from_pretrained(check_checkpoint(model_dir)), spec, target_length, original_length)
        t = Table(title=f"{method}: factor {plan.factor:g}, original {plan.info.original_length} -> {target_length}")
        for col in ("i", "wavelength", "inv_freq", "new inv_freq", "ratio"):
            t.add_column(col, justify="right")
        for r in freq_table(plan):
            t.add_row(str(r["index"]), f"{r['wavelength']:.1f}", f"{r['inv_freq']:.6g}", f"{r['new_inv_freq']:.6g}", f"{r['ratio']:.4f}")
        console.print(t)
        console.print(json.dumps(plan.rope_parameters))
        for n in plan.notes:
            say(n)
        return
    if out is None:
        raise LongforgeError("rope needs --out OUT_DIR (or --dry-run to only print the table).")
    plan = apply_rope(model_dir, out, spec, target_length, original_length)
    for n in plan.notes:
        say(n)
    say(f"wrote {out} with rope_parameters {json.dumps(plan.rope_parameters)}")


@app.command()
def train(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint to train (usually the output of `longforge rope`).")],
    data: Annotated[Path, typer.Option(help="Data folder from `longforge data build`.")],
    out: Annotated[Path, typer.Option(help="Stage folder: checkpoints/, log.jsonl and final/.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")],
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-5,
    warmup_steps: Annotated[int, typer.Option()] = 0,
    schedule: Annotated[str, typer.Option(help="cosine or constant.")] = "cosine",
    document_mask: Annotated[bool, typer.Option(help="Forbid attention across packed documents.")] = True,
    transform: Annotated[str, typer.Option(help="Position ids: contiguous or pose.")] = "contiguous",
    target_length: Annotated[Optional[int], typer.Option(help="Target length for --transform pose.")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Continual pretraining on packed long sequences; re-running the same command resumes from the last checkpoint."""
    from longforge.config import StageSpec
    from longforge.data.store import PackedDataset
    from longforge.hf import load_model, resolve_device
    from longforge.train.batches import PackedBatches
    from longforge.train.loop import train_model

    spec = _validated(StageSpec, {"steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                                  "warmup_steps": warmup_steps, "schedule": schedule, "document_mask": document_mask,
                                  "save_every": save_every}, "train")
    if transform not in ("contiguous", "pose"):
        raise LongforgeError(f"--transform {transform!r} is not one of contiguous, pose.")
    dev = resolve_device(device)
    ds = PackedDataset(data)
    if transform == "pose" and not target_length:
        raise LongforgeError("--transform pose needs --target-length (the length the skipped positions should reach).")
    model = load_model(model_dir, dev)
    source = PackedBatches(ds, batch_size, grad_accum, seed, transform, target_length or ds.seq_len, document_mask)
    res = train_model(model, source, spec, out, dev, tokenizer_from=model_dir)
    say(f"final loss {res.last_loss:.4f}; checkpoint {res.final}")


@app.command()
def merge(
    model_a: Annotated[Path, typer.Argument(help="First checkpoint (e.g. the original model).")],
    model_b: Annotated[Path, typer.Argument(help="Second checkpoint (e.g. the extended model).")],
    out: Annotated[Path, typer.Option(help="Output checkpoint folder.")],
    weights: Annotated[str, typer.Option(help="Comma-separated weights, one per model.")] = "0.5,0.5",
) -> None:
    """Average two checkpoints tensor by tensor (LongRecipe's merge); keeps the longer-context model's config."""
    from longforge.merge import merge_linear

    try:
        w = [float(x) for x in weights.split(",")]
    except ValueError:
        raise LongforgeError(f"--weights {weights!r} is not a comma-separated list of numbers (e.g. 0.5,0.5).") from None
    info = merge_linear([model_a, model_b], w, out)
    say(f"wrote {out} (config from {info['config_from']})")


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint to evaluate.")],
    out: Annotated[Path, typer.Option(help="Folder for passkey.json, ppl.json, summary.json.")],
    target_length: Annotated[Optional[int], typer.Option(help="Longest prompt (default: the model's max_position_embeddings).")] = None,
    original_length: Annotated[Optional[int], typer.Option(help="Window before extension (for the report's bands).")] = None,
    lengths: Annotated[Optional[str], typer.Option(help="Comma-separated passkey lengths.")] = None,
    depths: Annotated[int, typer.Option(help="Needle depths per length.")] = 5,
    trials: Annotated[int, typer.Option(help="Prompts per cell.")] = 4,
    ppl_source: Annotated[Optional[Path], typer.Option(help="JSONL/text of long documents for perplexity.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option()] = 1234,
) -> None:
    """Passkey grid and perplexity against length for one checkpoint."""
    from transformers import AutoConfig

    from longforge.config import EvalSpec
    from longforge.eval.run import evaluate
    from longforge.hf import check_checkpoint, resolve_device
    from longforge.positions.rope import rope_info

    info = rope_info(AutoConfig.from_pretrained(check_checkpoint(model_dir)), original_length)
    target = target_length or info.max_position_embeddings
    try:
        lens = [int(x) for x in lengths.split(",")] if lengths else None
    except ValueError:
        raise LongforgeError(f"--lengths {lengths!r} is not a comma-separated list of integers.") from None
    spec = _validated(EvalSpec, {"passkey": {"lengths": lens, "depths": depths, "trials": trials},
                                 "ppl": {"source": str(ppl_source)} if ppl_source else None, "seed": seed}, "eval")
    summary = evaluate(model_dir, spec, out, info.original_length, target, resolve_device(device), model_dir.name)
    t = Table(title=f"{model_dir.name}: passkey accuracy and perplexity by length")
    for col in ("length", "passkey", "ppl"):
        t.add_column(col, justify="right")
    per = summary.get("passkey", {}).get("per_length", {})
    ppl = summary.get("ppl", {})
    for length in sorted({*per, *ppl}, key=int):
        acc = per.get(length)
        p = ppl.get(length)
        t.add_row(length, "-" if acc is None else f"{acc:.0%}", "-" if p is None else f"{p:.2f}")
    console.print(t)
    say(f"results: {out}/passkey.json, {out}/summary.json" + (f", {out}/ppl.json" if ppl else ""))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory with eval results.")]) -> None:
    """Build report.md and report.html (with plots) for a run directory."""
    from longforge.report.build import build_report, collect, rich_tables

    paths = build_report(run_dir)
    for table in rich_tables(collect(run_dir)):
        console.print(table)
    say(f"report: {paths['md']}  and  {paths['html']}")


def _validated(model: type, data: dict, where: str):  # type: ignore[no-untyped-def]
    """Validate CLI values with the recipe schema, so errors read the same as recipe errors."""
    from pydantic import ValidationError

    from longforge.config import _format_error

    try:
        return model.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as e:
        raise LongforgeError("\n".join(_format_error(err, where) for err in e.errors())) from None


def _quiet_transformers() -> None:
    """longforge shows its own progress; silence transformers' bars and length warnings."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def main() -> None:
    """Entry point: user errors print one clear line (no traceback) and exit 2."""
    _quiet_transformers()
    try:
        app()
    except LongforgeError as e:
        # One unwrapped line per problem, on stderr, so scripts and people can both read it.
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted; run the same command again to resume.[/]")
        sys.exit(130)
