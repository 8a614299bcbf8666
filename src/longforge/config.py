"""The recipe schema: one YAML file validated into typed config, with defaults."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from longforge.errors import LongforgeError

RopeMethod = Literal["none", "pi", "ntk", "theta", "dynamic", "yarn", "llama3"]
PositionTransform = Literal["contiguous", "pose"]
SamplingPlan = Literal["none", "upsample_long", "length_thresholds", "long_short_mix"]
SourceFormat = Literal["auto", "jsonl", "parquet", "text", "hf_disk"]


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Strict):
    """The checkpoint to extend."""

    path: Path = Field(description="Hugging Face checkpoint folder (config.json + safetensors + tokenizer).")
    original_length: int | None = Field(
        default=None, gt=0, description="Pretraining window; read from the checkpoint's config when absent."
    )


class SourceSpec(Strict):
    """One corpus source with its domain label and weight."""

    name: str
    path: Path = Field(description="A file, or a folder of files of the same format.")
    format: SourceFormat = Field(
        default="auto",
        description="jsonl (.jsonl, .gz, .zst), parquet, text (one document per file) or hf_disk "
        "(a Hugging Face dataset saved with save_to_disk); guessed from the path when 'auto'.",
    )
    text_field: str = "text"
    group_by: str | None = Field(
        default=None,
        description="Join consecutive records with the same value of this field into one document "
        "(ProLong's code repositories: the files of one repository become one document).",
    )
    group_joiner: str = Field(default="\n\n", description="Text placed between the records of one group.")
    domain: str = "default"
    weight: float = Field(default=1.0, gt=0)
    role: Literal["long", "short"] = Field(
        default="long", description="For plan long_short_mix: long data (filtered to >= seq_len) or short data (packed separately)."
    )


class SentenceFilterSpec(Strict):
    """LongRecipe's sentence selection: keep the sentences a filter values, up to a share of each document."""

    method: Literal["digits"] = Field(
        default="digits", description="digits: LongRecipe's released heuristic (sentences with a digit always kept)."
    )
    keep_prob: float = Field(default=0.5, ge=0, le=1, description="Probability of keeping a sentence the filter does not require.")
    budget_fraction: float = Field(default=0.3, gt=0, le=1, description="Keep at most this share of each document's tokens.")
    min_document_tokens: int = Field(default=0, ge=0, description="Documents shorter than this are left whole.")


class ReplaySpec(Strict):
    """A short-document set from the sources' own distribution, packed on its own for a replay stage."""

    token_budget: int = Field(gt=0, description="Tokens to write into the replay set.")
    seq_len: int = Field(gt=1, description="Packed sequence length of the replay set (usually the original window).")
    max_document_tokens: int | None = Field(default=None, gt=0, description="Longest document taken; seq_len when absent.")
    keep_prob: float | None = Field(
        default=None, gt=0, le=1,
        description="Probability of taking an eligible document; estimated from the sources' sizes when absent, "
        "so the set spreads over the whole corpus.",
    )
    sources: list[str] | None = Field(default=None, description="Source names to draw from; all when absent.")


class DataSpec(Strict):
    """How corpus sources become packed training sequences."""

    sources: list[SourceSpec] = Field(min_length=1)
    tokenizer: Path | None = Field(default=None, description="Tokenizer folder; defaults to the model's.")
    seq_len: int | None = Field(default=None, gt=1, description="Packed sequence length; defaults to target_length.")
    plan: SamplingPlan = "upsample_long"
    short_threshold: int = Field(default=4096, gt=0, description="Documents shorter than this are 'short' (tokens).")
    short_keep_prob: float = Field(default=0.1, ge=0, le=1)
    long_threshold: int = Field(default=8192, gt=0, description="Documents longer than this are upsampled (length_thresholds).")
    long_repeat: float = Field(default=2.0, ge=1, description="Expected copies of a long document (length_thresholds); fractions are drawn.")
    long_share: float = Field(default=0.6, gt=0, lt=1, description="Share of long data in the token budget (long_short_mix).")
    token_budget: int | None = Field(default=None, gt=0, description="Tokens to write; all that the plan keeps when absent.")
    separator: str = Field(default="eos", description="'eos', 'bos', 'none', or 'text:<s>' for a literal text separator.")
    sentence_filter: SentenceFilterSpec | None = None
    replay: ReplaySpec | None = None
    batch_order: Literal["shuffle", "ssq"] = Field(
        default="shuffle",
        description="ssq: inside each global batch, order sequences by the sum of squared document lengths "
        "(ProLong's throughput trick), so data-parallel ranks get similar attention cost at each micro-step.",
    )
    shard_sequences: int = Field(default=4096, gt=0, description="Sequences per shard file.")

    @field_validator("separator")
    @classmethod
    def _separator(cls, v: str) -> str:
        if v in ("eos", "bos", "none") or (v.startswith("text:") and len(v) > 5):
            return v
        raise ValueError("must be 'eos', 'bos', 'none' or 'text:<literal>' (e.g. 'text:<s>')")

    @model_validator(mode="after")
    def _sources(self) -> "DataSpec":
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; rename the repeated source {dup[0]!r}")
        if self.plan == "long_short_mix" and len({s.role for s in self.sources}) < 2:
            raise ValueError("plan long_short_mix needs at least one source with role 'long' and one with role 'short'")
        if self.replay is not None and self.replay.sources is not None:
            unknown = sorted(set(self.replay.sources) - set(names))
            if unknown:
                raise ValueError(f"replay.sources names {unknown[0]!r}, which is not a source; use one of {', '.join(names)}")
        return self


class PositionSpec(Strict):
    """The RoPE scaling method and the training position-id transform."""

    method: RopeMethod = "yarn"
    factor: float | None = Field(default=None, gt=0, description="Scale factor; target_length / original_length when absent.")
    theta: float | None = Field(default=None, gt=0, description="RoPE base for method 'theta'.")
    beta_fast: float = Field(default=32.0, gt=0, description="YaRN beta_fast (the paper's beta).")
    beta_slow: float = Field(default=1.0, gt=0, description="YaRN beta_slow (the paper's alpha).")
    attention_factor: float | None = Field(default=None, gt=0, description="YaRN attention temperature; 0.1 ln(s) + 1 when absent.")
    truncate: bool = True
    low_freq_factor: float = Field(default=1.0, gt=0)
    high_freq_factor: float = Field(default=4.0, gt=0)
    transform: PositionTransform = "contiguous"

    @model_validator(mode="after")
    def _theta_needs_value(self) -> "PositionSpec":
        if self.method == "theta" and self.theta is None:
            raise ValueError("method 'theta' needs `theta` (the new RoPE base, e.g. 8000000)")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"beta_fast ({self.beta_fast}) must be larger than beta_slow ({self.beta_slow})")
        return self


class StageSpec(Strict):
    """One training stage (continual pretraining at long length)."""

    name: str = "extend"
    kind: Literal["pretrain"] = "pretrain"
    steps: int = Field(gt=0)
    batch_size: int = Field(default=1, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=2e-5, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = Field(default=1.0, gt=0)
    document_mask: bool = True
    save_every: int = Field(default=50, gt=0)
    data: Path | None = Field(default=None, description="Packed data folder; the data stage's output when absent.")


class PasskeySpec(Strict):
    """The passkey retrieval grid."""

    lengths: list[int] | None = Field(default=None, description="Prompt lengths in tokens; spread over [min_length, max_length] when absent.")
    num_lengths: int = Field(default=8, gt=0)
    min_length: int | None = Field(default=None, gt=0, description="Shortest prompt; a quarter of the original window when absent.")
    max_length: int | None = Field(default=None, gt=0, description="Longest prompt; target_length when absent.")
    depths: int = Field(default=5, gt=0)
    trials: int = Field(default=4, gt=0)
    batch_size: int = Field(default=8, gt=0)


class PplSpec(Strict):
    """Perplexity against length on held-out long documents."""

    source: Path = Field(description="JSONL or text file/folder of long documents.")
    text_field: str = "text"
    lengths: list[int] | None = None
    num_docs: int = Field(default=8, gt=0)


class EvalSpec(Strict):
    """What to evaluate, on which models."""

    passkey: PasskeySpec | None = Field(default_factory=PasskeySpec)
    ppl: PplSpec | None = None
    models: list[Literal["base", "final"]] = ["base", "final"]
    seed: int = 1234


class Recipe(Strict):
    """A whole context-extension recipe."""

    name: str = "recipe"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSpec
    target_length: int = Field(gt=0)
    data: DataSpec
    positions: PositionSpec = Field(default_factory=PositionSpec)
    stages: list[StageSpec] = Field(min_length=1)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "Recipe":
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique; rename the repeated stage {dup[0]!r}")
        return self


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (used to detect changed stage inputs)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at the parent of `loc`, to suggest a fix for an unknown key."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for sub in list(candidates):
            candidates.extend(getattr(sub, "__args__", ()))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _format_error(err: dict[str, Any], source: str) -> str:
    """One sentence for one pydantic error, naming the key and the fix."""
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"allowed keys here: {', '.join(allowed)}."
        return f"{source}: unknown key `{key}`; {hint}"
    if kind == "missing":
        return f"{source}: `{key}` is required; add it to the recipe."
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: `{key}` {msg[0].lower() + msg[1:]}{got_s}; fix that value in the recipe."


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping, turning every problem into one clear LongforgeError."""
    if not isinstance(data, dict):
        raise LongforgeError(f"{source}: a recipe must be a YAML mapping of keys to values, not {type(data).__name__}.")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = [_format_error(err, source) for err in e.errors()]
        raise LongforgeError("\n".join(lines)) from None


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe YAML file; relative paths inside it are taken from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise LongforgeError(f"recipe file {path} does not exist; pass the path of a recipe YAML file.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LongforgeError(f"{path}: not valid YAML{where}; fix the syntax there.") from None
    recipe = parse_recipe(data, source=str(path))
    return resolve_paths(recipe, path.parent)


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make every relative path in the recipe relative to `base`."""

    def fix(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = Path(p).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    recipe.model.path = fix(recipe.model.path)
    recipe.data.tokenizer = fix(recipe.data.tokenizer)
    for s in recipe.data.sources:
        s.path = fix(s.path)
    for st in recipe.stages:
        st.data = fix(st.data)
    if recipe.eval.ppl is not None:
        recipe.eval.ppl.source = fix(recipe.eval.ppl.source)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, with every default filled in."""
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False)
