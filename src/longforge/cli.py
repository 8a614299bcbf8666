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

from longforge.config import (
    MergeSpec,
    PositionSpec,
    PretrainStageSpec,
    ReplaySpec,
    SentenceFilterSpec,
    SourceSpec,
    DataSpec,
)
from longforge.errors import LongforgeError
from longforge.eval import command as eval_command
from longforge.options import spec_from_options, with_schema_options
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
    model: Annotated[Optional[Path], typer.Option(help="Extend this Hugging Face checkpoint 4x instead of a base the "
                                                       "demo pretrains (e.g. SmolLM2-135M-Instruct; needs --data).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="With --model: the corpus to train on, a folder written by "
                                                      "benchmarks/real_corpus.py or a JSONL file/folder of documents.")] = None,
) -> None:
    """Build a corpus, tokenizer and short-window base model from this machine's files, extend it 8x, evaluate, report
    (or, with --model and --data, extend that checkpoint 4x on that corpus)."""
    from longforge.demo.run import run_demo

    run_demo(out, device=device, fresh=fresh, seed=seed, model=model, data=data)


@app.command()
def lab(
    out: Annotated[Path, typer.Option(help="Run directory for every arm, results.json and the report.")] = Path("longforge-lab"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    profile: Annotated[str, typer.Option(help="auto (cuda on a GPU, else cpu), tiny (CI-sized), cpu or cuda.")] = "auto",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; the first runs every arm.")] = "0,1",
    arms: Annotated[Optional[str], typer.Option(help="Comma-separated arms (default: all); see docs/lab.md.")] = None,
    second_seed_arms: Annotated[str, typer.Option(help="'key' (the arms the claims compare) or 'all'.")] = "key",
    fresh: Annotated[bool, typer.Option("--fresh", help="Rebuild the cached base model and rerun every arm.")] = False,
    base: Annotated[Optional[Path], typer.Option(help="Start every arm from this Hugging Face checkpoint (its window "
                                                      "read from its config) instead of a base the lab pretrains.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="With --base: the corpus folder benchmarks/real_corpus.py wrote "
                                                      "(code and prose, held-out packages).")] = None,
    essays: Annotated[Optional[Path], typer.Option(help="With --base: RULER's essay haystack (text file/folder or JSONL "
                                                        "of prose); the corpus's held-out prose when absent.")] = None,
    factor: Annotated[Optional[int], typer.Option(help="With --base: extend the window this many times (4: 8K -> 32K, "
                                                       "8: 8K -> 64K; default 4).")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="Extension tokens per trained arm (equal for every arm; default: "
                                                       "the profile's).")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Build the table from the arms already recorded in "
                                                                    "--out (listing the others and why); train nothing.")] = False,
) -> None:
    """Pretrain a small base model (or take --base), extend it by every method on equal token budgets, evaluate,
    compare with the papers; run a few --arms per call and it resumes."""
    from longforge.lab.arms import BASE_PROFILES, PROFILES
    from longforge.lab.run import run_lab

    names = BASE_PROFILES if base is not None else PROFILES
    if profile != "auto" and profile not in names:
        raise LongforgeError(f"--profile {profile!r} is not one of auto, {', '.join(names)}"
                             + (" (with --base)." if base is not None else "."))
    if tokens is not None and tokens <= 0:
        raise LongforgeError(f"--tokens {tokens} must be a positive number of extension tokens per arm (e.g. 20000000).")
    if second_seed_arms not in ("key", "all"):
        raise LongforgeError(f"--second-seed-arms {second_seed_arms!r} must be 'key' or 'all'.")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise LongforgeError(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1.") from None
    run_lab(out, device=device, profile_name=profile, seeds=seed_list or [0],
            arm_names=[a.strip() for a in arms.split(",") if a.strip()] if arms else None,
            second_seed_arms=second_seed_arms, fresh=fresh, base=base, data=data, essays=essays, factor=factor,
            tokens=tokens, report_only=report_only)


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or a preset name (see `longforge recipes`).")],
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default: runs/<recipe name>): a new or empty folder, or an earlier run's.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: KEY=VALUE, e.g. model.path=/models/x or stages.0.lr=1e-5.")] = None,
) -> None:
    """Run every stage of a recipe into a run directory; finished stages are skipped, an interrupted one resumes.

    The run directory is locked while the run lasts, and longforge clears only folders it wrote there.
    """
    from longforge.recipe import load_preset, load_recipe
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


# --source PATH,key=value,...: every field of a source but its path, `field` standing for text_field.
SOURCE_KEYS = {"field" if k == "text_field" else k: k for k in SourceSpec.model_fields if k != "path"}


def _parse_source(text: str, i: int) -> dict[str, object]:
    """PATH[,name=N][,domain=D][,weight=W][,field=F][,format=F][,group_by=G][,role=R]... -> a SourceSpec mapping."""
    path, *opts = text.split(",")
    spec: dict[str, object] = {"name": f"source{i}", "path": path}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep or k not in SOURCE_KEYS:
            raise LongforgeError(f"--source {text!r}: option {o!r} is not one of {', '.join(k + '=' for k in SOURCE_KEYS)}.")
        # A joiner is text between records: \n and \t stand for a newline and a tab, as a shell cannot type them.
        spec[SOURCE_KEYS[k]] = v.replace("\\n", "\n").replace("\\t", "\t") if k == "group_joiner" else v
    return spec


# data build's sections: a flag per field, the sentence filter's and the replay set's named as before
# (--sentence-filter METHOD, --filter-*, --replay-*), each section set only when one of its flags is given.
FILTER = "Sentence filter (LongRecipe)"
REPLAY = "Replay set"
FILTER_FLAGS = {"method": "sentence_filter", "profile": "filter_profile", "keep_prob": "filter_keep_prob",
                "budget_fraction": "filter_budget", "min_document_tokens": "filter_min_document_tokens",
                "sources": "filter_sources"}
REPLAY_FLAGS = {k: f"replay_{k}" for k in ReplaySpec.model_fields} | {"token_budget": "replay_budget"}


def _section(model: type, values: dict[str, Any], names: dict[str, str], needs: str | None) -> Any:
    """A nested section from its flags, or None when none was given; `needs` is the flag that switches it on."""
    if not values:
        return None
    if needs is not None and needs not in values:
        given = "--" + names[next(iter(values))].replace("_", "-")
        raise LongforgeError(f"{given} sets the sentence filter; switch it on with --sentence-filter METHOD "
                             "(digits, profile or random).")
    return spec_from_options(model, values, "data build", rename=names)


@data_app.command("build")
@with_schema_options(DataSpec, skip=("sources", "tokenizer", "seq_len", "sentence_filter", "replay"),
                     rename={"token_budget": "budget"}, into="data_values")
@with_schema_options(SentenceFilterSpec, rename=FILTER_FLAGS, into="filter_values", hide_defaults=("method",),
                     panels=dict.fromkeys(SentenceFilterSpec.model_fields, FILTER))
@with_schema_options(ReplaySpec, rename=REPLAY_FLAGS, into="replay_values",
                     panels=dict.fromkeys(ReplaySpec.model_fields, REPLAY))
def data_build(
    source: Annotated[list[str], typer.Option(help="A corpus file or folder, PATH[,key=value...] with keys "
                                                   f"{', '.join(SOURCE_KEYS)} (field: the JSON text field); repeat "
                                                   "for several sources.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer (or model) folder.")],
    seq_len: Annotated[int, typer.Option(help="Packed sequence length in tokens.")],
    out: Annotated[Path, typer.Option(help="Output data folder.")],
    seed: Annotated[int, typer.Option(help="Seed for sampling, repeating and shuffling documents.")] = 0,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_HELP)] = False,
    data_values: dict[str, Any] | None = None,
    filter_values: dict[str, Any] | None = None,
    replay_values: dict[str, Any] | None = None,
) -> None:
    """Read, tokenize, sample and pack sources into memory-mapped shards with document boundaries (and a replay set)."""
    from longforge.files import read_json
    from longforge.recipe import resolve_paths
    from longforge.runner import execute
    from longforge.stages import DataStage, RunPlan

    filt = _section(SentenceFilterSpec, filter_values or {}, FILTER_FLAGS, needs="method")
    replay = _section(ReplaySpec, replay_values or {}, REPLAY_FLAGS, needs=None)
    sources = [_parse_source(s, i) for i, s in enumerate(source)]
    spec = spec_from_options(DataSpec, {**(data_values or {}), "seq_len": seq_len}, "data build",
                             base={"sources": sources, "sentence_filter": filt, "replay": replay},
                             rename={"token_budget": "budget"})
    spec = resolve_paths(spec, Path.cwd())
    plan = RunPlan(tokenizer=tokenizer, seq_len=seq_len, seed=seed, trust_remote_code=trust_remote_code,
                   stages=[DataStage(spec, out)])
    execute(plan)
    _print_manifest(read_json(out / "manifest.json") or {})


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
@with_schema_options(PositionSpec, skip=("transform",), rename={"beta_fast": "beta", "beta_slow": "alpha"},
                     panels={**dict.fromkeys(("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim",
                                              "truncate"), "YaRN"),
                             **dict.fromkeys(("low_freq_factor", "high_freq_factor"), "llama3")})
def rope(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face checkpoint folder.")],
    target_length: Annotated[int, typer.Option(help="Context length to reach, in tokens.")],
    out: Annotated[Optional[Path], typer.Option(help="Output checkpoint folder (not needed with --dry-run).")] = None,
    original_length: Annotated[Optional[int], typer.Option(help="The model's pretraining window, if its config does not say.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the frequency table; write nothing.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_HELP)] = False,
    schema_values: dict[str, Any] | None = None,
) -> None:
    """Rewrite a checkpoint's RoPE config for a longer context (weights reflinked where the disk allows, else copied).

    --alpha and --beta are YaRN's beta_slow and beta_fast; the position transform is a training setting (train).
    """
    from longforge.hf import load_config
    from longforge.positions.rope import freq_table, plan_rope
    from longforge.runner import execute
    from longforge.stages import Checkpoint, RopeStage, RunPlan

    spec = spec_from_options(PositionSpec, schema_values or {}, "rope", rename={"beta_fast": "beta", "beta_slow": "alpha"})
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
    stage = RopeStage(spec, Checkpoint(model_dir), out)
    rec = execute(RunPlan(base_model=model_dir, target_length=target_length, original_length=original_length,
                          trust_remote_code=trust_remote_code, stages=[stage]))[stage.title]
    say(f"wrote {out} with rope_parameters {json.dumps(rec['rope_parameters'])}")


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


# train's options in panels: each panel sizes its own columns, so long option names fit in 80 columns.
POSITIONS = "Positions and masking"
SPEED = "Memory and speed"
KERNELS = "Kernels"
TRAIN_PANELS = {"document_mask": POSITIONS, "transform": POSITIONS,
                **dict.fromkeys(("sp", "precision", "activation_checkpointing", "checkpoint_policy", "offload_activations",
                                 "resident_layers", "optimizer_in_backward"), SPEED),
                **dict.fromkeys(("attention", "fused_ops", "lean_norm", "mlp_tile"), KERNELS)}


def _spec_data(spec: Path | None, overrides: list[str], model: Any, what: str) -> dict[str, Any]:
    """A section's settings from a --spec YAML file (its paths relative to the file) and --set KEY=VALUE overrides."""
    from longforge.recipe import apply_overrides, read_yaml_file, resolve_data_paths

    data: Any = {}
    if spec is not None:
        data = read_yaml_file(spec, f"a YAML file holding {what}") or {}
        if not isinstance(data, dict):
            raise LongforgeError(f"--spec {spec} holds a YAML {type(data).__name__}, not a mapping of {what}'s keys.")
        data = resolve_data_paths(model, data, spec.parent)
    return apply_overrides(data, overrides, "--set")


def _data_tokenizer(data: Path, model_dir: Path) -> Path:
    """The tokenizer that wrote a data folder's token ids (its index records it), else the model's."""
    from longforge.files import read_json

    index = read_json(Path(data) / "index.json")
    return Path(index["tokenizer"]) if isinstance(index, dict) and index.get("tokenizer") else model_dir


@app.command()
@with_schema_options(PretrainStageSpec, skip=("name", "kind", "data"), panels=TRAIN_PANELS)
@with_schema_options(PositionSpec, skip=[f for f in PositionSpec.model_fields if f != "transform"],
                     panels=TRAIN_PANELS, into="position_values")
def train(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint to train (usually the output of `longforge rope`).")],
    out: Annotated[Path, typer.Option(help="Stage folder: checkpoints/, log.jsonl and final/.")],
    data: Annotated[Optional[Path], typer.Option(help="Data folder from `longforge data build` (pretrain).")] = None,
    target_length: Annotated[Optional[int], typer.Option(rich_help_panel=POSITIONS, help="Target length for "
                                                          "--transform pose/pit.")] = None,
    spec: Annotated[Optional[Path], typer.Option(help="YAML file with a stage of a recipe's `stages:` (e.g. kind: sft "
                                                      "with its sft: section); flags override it.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="A stage setting KEY=VALUE, e.g. kind=sft or "
                                                                    "sft.data=chat.jsonl.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for the data order and position transforms.")] = 0,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_HELP)] = False,
    schema_values: dict[str, Any] | None = None,
    position_values: dict[str, Any] | None = None,
) -> None:
    """Continual pretraining on packed long sequences (or SFT with a stage of kind sft); one or many GPUs via
    torchrun; re-running resumes."""
    from longforge.config import STAGE_SPECS, AnyStageSpec
    from longforge.positions.transforms import TRANSFORMS
    from longforge.recipe import resolve_paths
    from longforge.runner import execute
    from longforge.stages import Checkpoint, PretrainStage, RunPlan, SFTStage

    base = _spec_data(spec, set_ or [], AnyStageSpec, "a training stage")
    kind = base.get("kind", "pretrain")
    if kind not in ("pretrain", "sft"):
        raise LongforgeError(f"train runs stages of kind pretrain or sft, not {kind!r}; a merge is `longforge merge`.")
    values = dict(schema_values or {})
    if "steps" not in values and "steps" not in base:
        raise LongforgeError("train needs --steps (optimizer steps).")
    where = f"--spec {spec}" if spec is not None else "--set"
    stage_spec = resolve_paths(spec_from_options(STAGE_SPECS[kind], values, where, base=base), Path.cwd())
    transform = spec_from_options(PositionSpec, position_values or {}, "train").transform
    if TRANSFORMS[transform].skips and not target_length:
        raise LongforgeError(f"--transform {transform} needs --target-length (the length the skipped positions should reach).")
    model = Checkpoint(model_dir)
    flags = {"data": "--data", "sft.data": f"{where}: `sft.data`", "sft.chat_template": f"{where}: `sft.chat_template`",
             "val_data": "--val-data" if "val_data" in values else f"{where}: `val_data`"}
    if kind == "sft":
        if data is not None:
            raise LongforgeError("--data is for pretrain stages; an sft stage reads its conversations from `sft.data`.")
        stage: Any = SFTStage(stage_spec, model, out, out / "final", label="train", flags=flags)
    else:
        if data is None and stage_spec.data is None:
            raise LongforgeError("train needs --data (a folder from `longforge data build`).")
        folder = data or stage_spec.data
        stage = PretrainStage(stage_spec, model, out, out / "final", data=folder, label="train", flags=flags)
    tokenizer = _data_tokenizer(stage.data, model_dir) if kind == "pretrain" and TRANSFORMS[transform].sentences else None
    plan = RunPlan(base_model=model_dir, target_length=target_length, tokenizer=tokenizer, device=device, seed=seed,
                   transform=transform, trust_remote_code=trust_remote_code, stages=[stage])
    rec = execute(plan)[stage.title]
    say(f"final loss {rec['last_loss']:.4f}; checkpoint {rec['final']}")


@app.command()
@with_schema_options(MergeSpec, skip=("other",))
def merge(
    model_a: Annotated[Path, typer.Argument(help="First checkpoint (e.g. the original model).")],
    model_b: Annotated[Path, typer.Argument(help="Second checkpoint (e.g. the extended model).")],
    out: Annotated[Path, typer.Option(help="Output checkpoint folder.")],
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_HELP)] = False,
    schema_values: dict[str, Any] | None = None,
) -> None:
    """Merge two checkpoints tensor by tensor (LongRecipe's merge); keeps the longer-context model's config.

    --weights gives MODEL_A's weight, then MODEL_B's.
    """
    from longforge.config import MergeStageSpec
    from longforge.runner import execute
    from longforge.stages import Checkpoint, MergeStage, RunPlan

    spec = spec_from_options(MergeSpec, {**(schema_values or {}), "other": str(model_a)}, "merge")
    # The model so far is MODEL_B; the merged config is the longer-context one's, whichever order they come in.
    stage = MergeStage(MergeStageSpec(name="merge", merge=spec), Checkpoint(model_b), out, out, config_from=None,
                       flags={"merge.other": "model"})
    info = execute(RunPlan(trust_remote_code=trust_remote_code, stages=[stage]))[stage.title]
    say(f"wrote {out} ({info['method']}; config from {info['config_from']})")


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
    from longforge.eval.run import model_label
    from longforge.hf import load_config
    from longforge.positions.rope import rope_info
    from longforge.runner import execute
    from longforge.stages import Checkpoint, EvalStage, RunPlan

    if label is not None and not label.strip():
        raise LongforgeError("--label is empty; give the model a name (e.g. --label base), or leave it out.")
    name = label.strip() if label is not None else model_label(model_dir)
    ev = eval_command.build_spec(schema_values or {}, tasks, spec)
    info = rope_info(load_config(model_dir, trust_remote_code), original_length)
    target = target_length or info.max_position_embeddings
    # The eval stage of `longforge run`, as a one-stage plan: the same checks (inputs, prompt lengths) and run.
    # Under torchrun every process runs it, each on its share of the prompts; the first one writes and prints.
    stage = EvalStage(ev, Checkpoint(model_dir), name, out)
    plan = RunPlan(base_model=model_dir, target_length=target, original_length=info.original_length, device=device,
                   trust_remote_code=trust_remote_code, stages=[stage])
    summary = execute(plan)[stage.title]
    if not plan.processes.is_main:
        return
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
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory, or a folder written by `longforge eval`.")]) -> None:
    """Build report.md and report.html (with plots) for a run directory or a `longforge eval` folder."""
    from longforge.runner import execute
    from longforge.stages import ReportStage, RunPlan

    execute(RunPlan(stages=[ReportStage(run_dir)]))


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
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group before the interpreter exits: a gloo group still alive at exit can
    abort a process (`terminate called without an active exception`) after its work is done."""
    dist = sys.modules.get("torch.distributed")  # never imported for a command that did not use it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _out_arg(args: list[str]) -> str:
    """The output folder named on the command line (--out), else the current folder (where `run` writes runs/)."""
    for i, a in enumerate(args):
        if a == "--out" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return str(Path.cwd())
