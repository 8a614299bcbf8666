"""The `longforge` command: `run` a recipe, or run one stage (`data`, `rope`, `train`, `merge`, `eval`, `report`), or `demo`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import click
import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from longforge.errors import LongforgeError
from longforge.eval import command as eval_command
from longforge.options import with_schema_options
from longforge.progress import console, err_console, say

if TYPE_CHECKING:
    from longforge.positions.rope import RopePlan

app = typer.Typer(  # its help is the docstring of the callback below
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version_line() -> str:
    """longforge's version, with the versions of Python, torch and transformers it runs on (for bug reports)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from longforge import __version__

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return (f"longforge {__version__} (Python {platform.python_version()}, torch {of('torch')}, "
            f"transformers {of('transformers')})")


def _print_version(value: bool) -> None:
    """--version: print the version line and stop before any command runs."""
    if value:
        sys.stdout.write(_version_line() + "\n")
        raise typer.Exit()


@app.callback()
def _top(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    """Extend the context window of a pretrained causal LM: data, RoPE scaling, long-sequence training, evaluation, report."""


data_app = typer.Typer(help="Build packed training data from corpus files, or inspect or verify a built data folder.", no_args_is_help=True)
app.add_typer(data_app, name="data")
analyze_app = typer.Typer(help="Analyses that inform data selection.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
TRUST_HELP = ("Let transformers import Python files shipped in the checkpoint (auto_map in config.json); "
              "that code runs with your rights, so pass it only for checkpoints you trust.")


@analyze_app.command("impactful")
def analyze_impactful(
    base: Annotated[Path, typer.Option(help="The model before extension.")],
    extended: Annotated[Path, typer.Option(help="The same model after long-context training.")],
    data: Annotated[Path, typer.Option(help="JSONL or text of long documents.")],
    out: Annotated[Path, typer.Option(help="Folder for profile.json and profile.png.")],
    num_texts: Annotated[int, typer.Option(help="Texts to analyse.")] = 16,
    length: Annotated[Optional[int], typer.Option(help="Tokens per text (default: the extended model's window).")] = None,
    top: Annotated[float, typer.Option(help="Fraction of tokens per text kept as impactful.")] = 0.2,
    tagger: Annotated[str, typer.Option(help="builtin (no download) or spacy (a locally installed model).")] = "builtin",
    spacy_model: Annotated[str, typer.Option(help="spaCy model name for --tagger spacy.")] = "en_core_web_sm",
    text_field: Annotated[str, typer.Option(help="JSON field holding the text.")] = "text",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_HELP)] = False,
) -> None:
    """LongRecipe's impactful-token analysis: which token types the extended model predicts better than the base."""
    import torch

    from longforge.analyze.impactful import analyze, spacy_type_fn, write_profile
    from longforge.config import SourceSpec
    from longforge.data.sources import Rejects, iter_documents
    from longforge.hf import load_model, load_tokenizer, read_config, resolve_device

    if not 0 < top < 1:
        raise LongforgeError(f"--top {top} must be between 0 and 1 (LongRecipe keeps 0.2).")
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tok = load_tokenizer(extended, trust_remote_code)
    n = length or int(read_config(extended).get("max_position_embeddings", 4096))
    texts = []
    for doc in iter_documents(SourceSpec(name="analysis", path=data, text_field=text_field), Rejects()):
        texts.append(doc.text)
        if len(texts) >= num_texts:
            break
    type_fn = spacy_type_fn(tok, spacy_model) if tagger == "spacy" else None
    if tagger not in ("builtin", "spacy"):
        raise LongforgeError(f"--tagger {tagger!r} is not one of builtin, spacy.")
    profile = analyze(load_model(base, dev, dtype, trust_remote_code), load_model(extended, dev, dtype, trust_remote_code),
                      tok, texts, n, top, type_fn)
    paths = write_profile(profile, out)
    t = Table(title=f"impactful token types ({profile.meta['texts']} texts of {n} tokens, top {top:.0%})")
    for col in ("type", "impactful share", "overall share", "lift"):
        t.add_column(col, justify="left" if col == "type" else "right")
    for r in profile.rows:
        t.add_row(r["type"] + (" *" if r["type"] in profile.selected else ""), f"{r['impactful_share']:.3f}",
                  f"{r['overall_share']:.3f}", f"{r['lift']:.2f}")
    console.print(t)
    say(f"selected for sentence filtering: {', '.join(profile.selected) or '(none)'}; wrote {paths['json']} and {paths['png']}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory for the demo's stages and report.")] = Path("longforge-demo"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda; cuda runs a larger default.")] = "auto",
    fresh: Annotated[bool, typer.Option("--fresh", help="Rebuild everything: the cached corpus, tokenizer, base model and the run.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for data, initialisation and sampling.")] = 0,
) -> None:
    """Build a corpus, tokenizer and short-window base model from this machine's files, extend it 8x, evaluate, report."""
    from longforge.demo.run import run_demo

    run_demo(out, device=device, fresh=fresh, seed=seed)


@app.command()
def lab(
    out: Annotated[Path, typer.Option(help="Run directory for every arm, results.json and the report.")] = Path("longforge-lab"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    profile: Annotated[str, typer.Option(help="auto (cuda on a GPU, else cpu), tiny (CI-sized), cpu or cuda.")] = "auto",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; the first runs every arm.")] = "0,1",
    arms: Annotated[Optional[str], typer.Option(help="Comma-separated arms (default: all); see docs/lab.md.")] = None,
    second_seed_arms: Annotated[str, typer.Option(help="'key' (the arms the claims compare) or 'all'.")] = "key",
    fresh: Annotated[bool, typer.Option("--fresh", help="Rebuild the cached base model and rerun every arm.")] = False,
) -> None:
    """Pretrain a small base model, extend it 16x by every method on equal token budgets, evaluate, compare with the papers."""
    from longforge.lab.arms import PROFILES
    from longforge.lab.run import run_lab

    if profile != "auto" and profile not in PROFILES:
        raise LongforgeError(f"--profile {profile!r} is not one of auto, {', '.join(PROFILES)}.")
    if second_seed_arms not in ("key", "all"):
        raise LongforgeError(f"--second-seed-arms {second_seed_arms!r} must be 'key' or 'all'.")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise LongforgeError(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1.") from None
    run_lab(out, device=device, profile_name=profile, seeds=seed_list or [0],
            arm_names=[a.strip() for a in arms.split(",") if a.strip()] if arms else None,
            second_seed_arms=second_seed_arms, fresh=fresh)


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or a preset name (see `longforge recipes`).")],
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default: runs/<recipe name>): a new or empty folder, or an earlier run's.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: KEY=VALUE, e.g. model.path=/models/x or stages.0.lr=1e-5.")] = None,
) -> None:
    """Run every stage of a recipe into a run directory; finished stages are skipped, an interrupted one resumes.

    The run directory is locked while the run lasts, and longforge clears only folders it wrote there.
    """
    from longforge.config import load_preset, load_recipe
    from longforge.recipes import resolve_recipe_arg
    from longforge.runner import run_recipe

    path, preset = resolve_recipe_arg(recipe)
    r = load_recipe(path, set_ or []) if path else load_preset(str(preset), set_ or [])
    run_recipe(r, out or Path("runs") / r.name)


recipes_app = typer.Typer(help="The shipped presets: the four papers' recipes, PoSE and the demo.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes_list(ctx: typer.Context) -> None:
    """List the presets (`longforge recipes show NAME` prints one to copy)."""
    if ctx.invoked_subcommand is not None:
        return
    from longforge.recipes import preset_names, preset_summary, preset_table

    console.print(preset_table())
    for name in preset_names():
        say(f"[bold]{name}[/]: {preset_summary(name)['description']}")


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Preset name.")]) -> None:
    """Print a preset's YAML (with its comments) to copy and edit."""
    from longforge.recipes import preset_text

    sys.stdout.write(preset_text(name))


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
    source: Annotated[list[str], typer.Option(help="A corpus file or folder, PATH[,key=value...] with keys name, domain, weight, "
                                                   "field (the JSON text field), format (jsonl, parquet, text or hf_disk), "
                                                   "group_by and role (long or short); repeat for several sources.")],
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
    seed: Annotated[int, typer.Option(help="Seed for sampling, repeating and shuffling documents.")] = 0,
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


@data_app.command("verify")
def data_verify(
    folder: Annotated[Path, typer.Argument(help="A folder written by `longforge data build` (its replay/ set is checked too).")],
) -> None:
    """Check a data folder in full: every shard's checksum, token ids, document starts and counts; exit 2 on damage."""
    from longforge.data.store import INDEX
    from longforge.data.verify import verify_folder

    roots = [folder] + ([folder / "replay"] if (folder / "replay" / INDEX).is_file() else [])
    damaged = []
    for root in roots:
        rep = verify_folder(root)
        t = Table(title=f"{root}: format {rep.format}, {len(rep.shards)} shards")
        for col in ("shard", "sequences", "result"):
            t.add_column(col, justify="right" if col == "sequences" else "left", overflow="fold")
        for s in rep.shards:
            t.add_row(s.name, f"{s.sequences:,}", "ok" if s.ok else "[red]damaged:[/] " + "; ".join(s.problems))
        console.print(t)
        for problem in rep.problems:
            console.print(f"[red]{root}:[/] {problem}")
        for note in rep.notes:
            console.print(f"[yellow]{root}: {note}[/]")
        if not rep.checksums:
            console.print(f"[yellow]{root} has no checksums (written by an older longforge, format {rep.format}): sizes, counts, "
                "token ids and document starts were checked, but changed bytes cannot be found; rebuild it to add them.[/]")
        if not rep.ok:
            damaged.append(f"{root} ({sum(not s.ok for s in rep.shards)} of {len(rep.shards)} shards damaged"
                           + (f", {len(rep.problems)} folder problem(s)" if rep.problems else "") + ")")
        else:
            console.print(f"[green]{root}: every shard is whole[/]")
    if damaged:
        raise LongforgeError(f"damaged data: {'; '.join(damaged)}; rebuild it with `longforge data build`.")


def _print_manifest(m: dict, by_length: bool = False) -> None:
    from longforge.data.report import length_tables, source_table, summary_lines

    console.print(source_table(m))
    if by_length:
        for t in length_tables(m):
            console.print(t)
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
    attention_factor: Annotated[Optional[float], typer.Option(help="YaRN attention temperature (default 0.1 ln(factor) + 1).")] = None,
    truncate: Annotated[bool, typer.Option(help="YaRN: round the ramp ends to whole frequency indices.")] = True,
    low_freq_factor: Annotated[float, typer.Option(help="llama3 low_freq_factor.")] = 1.0,
    high_freq_factor: Annotated[float, typer.Option(help="llama3 high_freq_factor.")] = 4.0,
    theta: Annotated[Optional[float], typer.Option(help="New RoPE base for --method theta.")] = None,
    original_length: Annotated[Optional[int], typer.Option(help="The model's pretraining window, if its config does not say.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the frequency table; write nothing.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_HELP)] = False,
) -> None:
    """Rewrite a checkpoint's RoPE config for a longer context (weights reflinked where the disk allows, else copied)."""
    from longforge.config import PositionSpec
    from longforge.hf import load_config
    from longforge.positions.rope import apply_rope, freq_table, plan_rope

    spec = _validated(PositionSpec, {
        "method": method, "factor": factor, "beta_fast": beta, "beta_slow": alpha, "theta": theta,
        "attention_factor": attention_factor, "truncate": truncate,
        "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
    }, "rope")
    if original_length is not None and original_length <= 0:
        raise LongforgeError(f"--original-length {original_length} must be a positive number of tokens.")
    if dry_run:
        # A dry run reads only config.json (it may be all a user fetched to plan); writing needs the whole checkpoint.
        plan = plan_rope(load_config(model_dir, trust_remote_code, weights=False), spec, target_length, original_length)
        _print_freq_table(plan, freq_table(plan))
        console.print(json.dumps(plan.rope_parameters), soft_wrap=True)
        for n in plan.notes:
            say(n)
        return
    if out is None:
        raise LongforgeError("rope needs --out OUT_DIR (or --dry-run to only print the table).")
    plan = apply_rope(model_dir, out, spec, target_length, original_length, trust_remote_code)
    for n in plan.notes:
        say(n)
    say(f"wrote {out} with rope_parameters {json.dumps(plan.rope_parameters)}")


def _print_freq_table(plan: RopePlan, rows: list[dict[str, Any]]) -> None:
    """The dry-run table: per frequency index, wavelength and original (unscaled), current and new inverse frequency."""
    t = Table(title=f"{plan.method}: factor {plan.factor:g}, original {plan.info.original_length} -> {plan.target_length}")
    cols = ["i", "wavelength", "inv_freq", "new inv_freq", "new/original"]
    if plan.info.scaled:
        cols.insert(3, f"current ({plan.info.current['rope_type']})")
    for col in cols:
        t.add_column(col, justify="right")
    for r in rows:
        cells = [str(r["index"]), f"{r['wavelength']:.1f}", f"{r['inv_freq']:.6g}", f"{r['new_inv_freq']:.6g}", f"{r['ratio']:.4f}"]
        if plan.info.scaled:
            cells.insert(3, f"{r['current_inv_freq']:.6g}")
        t.add_row(*cells)
    console.print(t)


# train's options in three panels: each panel sizes its own columns, so long option names fit in 80 columns.
POSITIONS = "Positions and masking"
SPEED = "Memory and speed"


@app.command()
def train(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint to train (usually the output of `longforge rope`).")],
    data: Annotated[Path, typer.Option(help="Data folder from `longforge data build`.")],
    out: Annotated[Path, typer.Option(help="Stage folder: checkpoints/, log.jsonl and final/.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")],
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch and data-parallel replica.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-5,
    warmup_steps: Annotated[int, typer.Option(help="Steps of linear warmup to the peak learning rate.")] = 0,
    schedule: Annotated[str, typer.Option(help="cosine or constant.")] = "cosine",
    document_mask: Annotated[bool, typer.Option(rich_help_panel=POSITIONS, help="Forbid attention across packed documents.")] = True,
    transform: Annotated[str, typer.Option(rich_help_panel=POSITIONS, help="Position ids: contiguous, pose or pit.")] = "contiguous",
    target_length: Annotated[Optional[int], typer.Option(rich_help_panel=POSITIONS, help="Target length for --transform pose/pit.")] = None,
    sp: Annotated[int, typer.Option(rich_help_panel=SPEED, help="Sequence-parallel degree (launch with torchrun; processes / sp = data-parallel replicas).")] = 1,
    attention: Annotated[str, typer.Option(rich_help_panel=SPEED, help="auto, dense, sdpa, varlen or flex.")] = "auto",
    precision: Annotated[str, typer.Option(rich_help_panel=SPEED, help="auto, fp32, bf16-mixed or bf16.")] = "auto",
    optimizer: Annotated[str, typer.Option(help="adamw or adamw_bf16 (with --precision bf16).")] = "adamw",
    activation_checkpointing: Annotated[str, typer.Option(rich_help_panel=SPEED, help="auto, on or off.")] = "auto",
    checkpoint_policy: Annotated[str, typer.Option(rich_help_panel=SPEED, help="full, or save_attention (faster backward, more memory).")] = "full",
    offload_activations: Annotated[bool, typer.Option("--offload-activations", rich_help_panel=SPEED, help="Keep checkpointed activations in CPU memory.")] = False,
    resident_layers: Annotated[int, typer.Option(rich_help_panel=SPEED, help="With --offload-activations: the last N layers keep their inputs on the GPU.")] = 0,
    optimizer_in_backward: Annotated[bool, typer.Option("--optimizer-in-backward", rich_help_panel=SPEED, help="Update each parameter during backward (no full set of gradients; needs --clip-grad 0, one process).")] = False,
    clip_grad: Annotated[float, typer.Option(help="Clip the global gradient norm to this (0 = off).")] = 1.0,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard scalars under OUT/tb.")] = False,
    mlp_tile: Annotated[int, typer.Option(rich_help_panel=SPEED, help="Run MLPs in tiles of this many tokens (0 = off).")] = 0,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for the data order and position transforms.")] = 0,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_HELP)] = False,
) -> None:
    """Continual pretraining on packed long sequences; one or many GPUs via torchrun; re-running resumes."""
    from longforge.config import StageSpec
    from longforge.data.store import PackedDataset
    from longforge.data.verify import check_data_for_model
    from longforge.hf import load_model
    from longforge.model.parallel import init_layout
    from longforge.train.batches import PackedBatches
    from longforge.train.loop import train_model

    spec = _validated(StageSpec, {"steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                                  "warmup_steps": warmup_steps, "schedule": schedule, "document_mask": document_mask,
                                  "save_every": save_every, "sp": sp, "attention": attention, "precision": precision,
                                  "optimizer": optimizer, "activation_checkpointing": activation_checkpointing,
                                  "checkpoint_policy": checkpoint_policy, "offload_activations": offload_activations,
                                  "resident_layers": resident_layers, "optimizer_in_backward": optimizer_in_backward,
                                  "clip_grad": clip_grad, "mlp_tile": mlp_tile, "tensorboard": tensorboard}, "train")
    if transform not in ("contiguous", "pose", "pit"):
        raise LongforgeError(f"--transform {transform!r} is not one of contiguous, pose, pit.")
    ds = PackedDataset(data)
    check_data_for_model(ds, model_dir)
    if transform in ("pose", "pit") and not target_length:
        raise LongforgeError(f"--transform {transform} needs --target-length (the length the skipped positions should reach).")
    layout = init_layout(sp, device)
    model = load_model(model_dir, "cpu", trust_remote_code=trust_remote_code)
    ends = None
    if transform == "pit":
        from longforge.hf import load_tokenizer
        from longforge.positions.segments import sentence_end_mask

        ends = sentence_end_mask(load_tokenizer(Path(ds.index.get("tokenizer") or model_dir), trust_remote_code))
    source = PackedBatches(ds, batch_size, grad_accum, seed, transform, target_length or ds.seq_len, document_mask,
                           rank=layout.dp_rank, world=layout.dp, sentence_ends=ends)
    res = train_model(model, source, spec, out, layout.device, tokenizer_from=model_dir, layout=layout)
    say(f"final loss {res.last_loss:.4f}; checkpoint {res.final}")


@app.command()
def merge(
    model_a: Annotated[Path, typer.Argument(help="First checkpoint (e.g. the original model).")],
    model_b: Annotated[Path, typer.Argument(help="Second checkpoint (e.g. the extended model).")],
    out: Annotated[Path, typer.Option(help="Output checkpoint folder.")],
    weights: Annotated[str, typer.Option(help="Comma-separated weights, one per model.")] = "0.5,0.5",
    method: Annotated[str, typer.Option(help="linear (weighted mean) or slerp.")] = "linear",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_HELP)] = False,
) -> None:
    """Merge two checkpoints tensor by tensor (LongRecipe's merge); keeps the longer-context model's config."""
    from longforge.hf import needs_own_code, own_code_error
    from longforge.merge import merge as merge_models

    # Merging runs no checkpoint code, but its output would claim code it does not carry: refuse it unasked.
    for m in (model_a, model_b):
        if not trust_remote_code and needs_own_code(m):
            raise own_code_error(m)

    try:
        w = [float(x) for x in weights.split(",")]
    except ValueError:
        raise LongforgeError(f"--weights {weights!r} is not a comma-separated list of numbers (e.g. 0.5,0.5).") from None
    info = merge_models([model_a, model_b], w, out, method)
    say(f"wrote {out} ({method}; config from {info['config_from']})")


class _EvalGroup(TyperGroup):
    """`longforge eval MODEL ...` is `longforge eval run MODEL ...`; `compare` is the other sub-command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(cls=_EvalGroup, no_args_is_help=True,
                       help="Evaluate a checkpoint (passkey, NIAH, RULER, perplexity): `longforge eval MODEL --out DIR`; "
                            "or compare two results: `longforge eval compare A B`.")
app.add_typer(eval_app, name="eval")


@eval_app.command("run")
@with_schema_options(eval_command.options_model(), panels=eval_command.panels())
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint to evaluate.")],
    out: Annotated[Path, typer.Option(help="Folder for <task>.json and summary.json.")],
    label: Annotated[Optional[str], typer.Option(help="The model's name in tables, summary.json, `eval compare` and the "
                                                      "report (default: its folder's name, with the folder above for "
                                                      "final, rope or step-N).")] = None,
    target_length: Annotated[Optional[int], typer.Option(help="Longest prompt (default: the model's max_position_embeddings).")] = None,
    original_length: Annotated[Optional[int], typer.Option(help="Window before extension (for the report's bands).")] = None,
    tasks: Annotated[Optional[str], typer.Option(help=f"Comma-separated: {', '.join(eval_command.task_sections())} (default: "
                                                      "passkey, or the --spec file's tasks; plus every task whose own "
                                                      "flag is given). Tasks left out do not run.")] = None,
    spec: Annotated[Optional[Path], typer.Option(help="YAML file with the recipe's `eval` section; the flags given "
                                                      "override its values.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_HELP)] = False,
    schema_values: dict[str, Any] | None = None,
) -> None:
    """Evaluate one checkpoint: passkey/NIAH grids, RULER, perplexity against length."""
    from longforge.eval.registry import EVAL_TASKS
    from longforge.eval.run import evaluate, model_label
    from longforge.hf import load_config, resolve_device
    from longforge.positions.rope import rope_info

    if label is not None and not label.strip():
        raise LongforgeError("--label is empty; give the model a name (e.g. --label base), or leave it out.")
    name = label.strip() if label is not None else model_label(model_dir)
    ev = eval_command.build_spec(schema_values or {}, tasks, spec)
    info = rope_info(load_config(model_dir, trust_remote_code), original_length)
    target = target_length or info.max_position_embeddings
    summary = evaluate(model_dir, ev, out, info.original_length, target, resolve_device(device), name,
                       trust_remote_code)
    for table in _eval_tables(name, summary):
        console.print(table)
    written = [f"{out}/{t}.json" for t in EVAL_TASKS if t in summary] + [f"{out}/summary.json"]
    say("results: " + ", ".join(written))


def _eval_tables(name: str, summary: dict) -> list[Table]:
    """Each task's score by prompt length in one table (those that have one), and the tasks' own tables."""
    from longforge.eval.registry import EVAL_TASKS

    name = escape(name)  # a label is the user's text, not rich markup
    tables = []
    ran = [t for t in EVAL_TASKS.values() if t.name in summary]
    cols = {t.name: t.by_length(summary[t.name]) for t in ran if t.by_length is not None}
    cols = {k: v for k, v in cols.items() if v}
    if cols:
        notes = "".join(f" ({t.name}: {t.metric_note})" for t in ran if t.name in cols and t.metric_note)
        t = Table(title=f"{name}: by prompt length{notes}")
        t.add_column("length", justify="right")
        for c in cols:
            t.add_column(c, justify="right")
        for length in sorted({L for cells in cols.values() for L in cells}, key=int):
            t.add_row(length, *(cells.get(length, "-") for cells in cols.values()))
        tables.append(t)
    tables += [t.table(name, summary[t.name]) for t in ran if t.table is not None and summary[t.name]]
    return tables


@eval_app.command("compare")
def eval_compare(
    a: Annotated[Path, typer.Argument(help="Before: an eval output folder, or a run directory (its eval/final).")],
    b: Annotated[Path, typer.Argument(help="After: an eval output folder, or a run directory (its eval/final).")],
    out: Annotated[Path, typer.Option(help="Folder for compare.md, compare.json and the plots.")] = Path("eval-compare"),
) -> None:
    """Before/after table of every metric the two results share, and side-by-side plots."""
    from longforge.eval.compare import _delta, compare, fmt

    res = compare(a, b, out)
    la, lb = res["a"]["label"], res["b"]["label"]
    t = Table(title=f"longforge eval compare: {escape(la)} -> {escape(lb)}")
    for col in ("metric", la, lb, "change"):
        t.add_column(Text(col), justify="left" if col == "metric" else "right")
    for r in res["rows"]:
        t.add_row(r["metric"], fmt(r["a"], r["unit"]), fmt(r["b"], r["unit"]), _delta(r))
    console.print(t)
    say(f"comparison: {out}/compare.md, {out}/compare.json" + "".join(f", {p}" for p in res["plots"].values()))


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
    except SystemExit:
        raise
    except BaseException as e:
        # Last resort for writers not wrapped in files.writing (e.g. training checkpoints): a full disk is a user
        # error, said in one sentence; anything else is a bug and keeps its traceback.
        from longforge.files import full_disk_error

        err = full_disk_error(e, getattr(e, "filename", None) or _out_arg(sys.argv[1:]))
        if err is None:
            raise
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)


def _out_arg(args: list[str]) -> str:
    """The output folder named on the command line (--out), else the current folder (where `run` writes runs/)."""
    for i, a in enumerate(args):
        if a == "--out" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return str(Path.cwd())
