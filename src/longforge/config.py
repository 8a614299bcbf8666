"""The recipe schema: typed sections with their defaults and checks. Loading a recipe file, `--set` overrides, presets
and path handling live in longforge.recipe; the allowed names of variants come from their registries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from longforge.data.sampling import PLANS
from longforge.files import safe_name
from longforge.model.names import BACKENDS, SP_KINDS
from longforge.positions.methods import ROPE_METHODS
from longforge.positions.transforms import TRANSFORMS
from longforge.registry import choice

RopeMethod = choice(ROPE_METHODS)
PositionTransform = choice(TRANSFORMS)
SamplingPlan = choice(PLANS)
AttentionBackend = choice(BACKENDS)
SequenceParallelKind = choice(SP_KINDS)
# Left as written until the optimizers have their registry (longforge.train.optim.OPTIMIZERS).
Optimizer = Literal["adamw", "adamw_bf16"]
SourceFormat = Literal["auto", "jsonl", "parquet", "text", "hf_disk"]
# Prompt or window lengths in tokens: at least one, each positive.
Lengths = Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1)]


class Input:
    """Marks a path field as a file or folder the recipe reads: resolved against the recipe's folder, checked before
    any stage, stamped by content in fingerprints, and never inside a folder a run clears (longforge.recipe finds
    them by walking the schema). `keep` lists values that are words, not paths (merge.other: base)."""

    def __init__(self, keep: tuple[str, ...] = ()) -> None:
        self.keep = keep

    def __repr__(self) -> str:
        return f"Input(keep={self.keep!r})"


InputPath = Annotated[Path, Input()]


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Strict):
    """The checkpoint to extend."""

    path: InputPath = Field(description="Hugging Face checkpoint folder (config.json + safetensors + tokenizer).")
    original_length: int | None = Field(
        default=None, gt=0, description="Pretraining window; read from the checkpoint's config when absent."
    )
    trust_remote_code: bool = Field(
        default=False, description="Let transformers import Python files shipped in the checkpoint (auto_map in "
        "config.json), for models it does not know; such code runs with your rights, so set it only for checkpoints you trust."
    )


class SourceSpec(Strict):
    """One corpus source with its domain label and weight."""

    name: str = Field(description="The source's name in tables and in `sources:` lists of the filter and replay.")
    path: InputPath = Field(description="A file, or a folder of files of the same format.")
    format: SourceFormat = Field(
        default="auto",
        description="jsonl (.jsonl, .gz, .zst), parquet, text (one document per file) or hf_disk "
        "(a Hugging Face dataset saved with save_to_disk); guessed from the path when 'auto'.",
    )
    text_field: str = Field(default="text", description="JSON field (or column) holding the text.")
    group_by: str | None = Field(
        default=None,
        description="Join consecutive records with the same value of this field into one document "
        "(ProLong's code repositories: the files of one repository become one document).",
    )
    group_joiner: str = Field(default="\n\n", description="Text placed between the records of one group.")
    domain: str = Field(default="default", description="Domain label in the data tables (e.g. code, books).")
    weight: float = Field(default=1.0, gt=0, description="Share of the token budget, relative to the other sources' weights.")
    role: Literal["long", "short"] = Field(
        default="long", description="For plan long_short_mix: long data (filtered to >= seq_len) or short data (packed separately)."
    )


class SentenceFilterSpec(Strict):
    """LongRecipe's sentence selection: keep the sentences a filter values, up to a share of each document."""

    method: Literal["digits", "profile", "random"] = Field(
        default="digits", description="digits: LongRecipe's released heuristic (sentences with a digit always kept); "
        "profile: sentences with the impactful token types of `profile`; random: the ablation baseline."
    )
    profile: InputPath | None = Field(default=None, description="profile.json from `longforge analyze impactful` (method profile).")
    keep_prob: float = Field(default=0.5, ge=0, le=1, description="Probability of keeping a sentence the filter does not require.")
    budget_fraction: float = Field(default=0.3, gt=0, le=1, description="Keep at most this share of each document's tokens.")
    min_document_tokens: int = Field(default=0, ge=0, description="Documents shorter than this are left whole.")
    sources: list[str] | None = Field(default=None, description="Source names to filter; all when absent (e.g. leave synthetic task data whole).")

    @model_validator(mode="after")
    def _profile_given(self) -> "SentenceFilterSpec":
        if self.method == "profile" and self.profile is None:
            raise ValueError("method 'profile' needs `profile:` (the profile.json of `longforge analyze impactful`)")
        return self


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

    sources: list[SourceSpec] = Field(min_length=1, description="The corpus files, each with its name, domain and weight.")
    tokenizer: InputPath | None = Field(default=None, description="Tokenizer folder; defaults to the model's.")
    seq_len: int | None = Field(default=None, gt=1, description="Packed sequence length; defaults to target_length.")
    plan: SamplingPlan = Field(
        default="upsample_long", description="How documents are sampled by length: upsample_long is Fu et al.'s, "
        "length_thresholds UltraLong's, long_short_mix ProLong's.")
    short_threshold: int = Field(default=4096, gt=0, description="Documents shorter than this are 'short' (tokens).")
    short_keep_prob: float = Field(default=0.1, ge=0, le=1, description="Probability of keeping a short document.")
    long_threshold: int = Field(default=8192, gt=0, description="Documents longer than this are upsampled (length_thresholds).")
    long_repeat: float = Field(default=2.0, ge=1, description="Expected copies of a long document (length_thresholds); fractions are drawn.")
    long_share: float = Field(default=0.6, gt=0, lt=1, description="Share of long data in the token budget (long_short_mix).")
    token_budget: int | None = Field(default=None, gt=0, description="Tokens to write; all that the plan keeps when absent.")
    separator: str = Field(default="eos", description="'eos', 'bos', 'none', or 'text:<s>' for a literal text separator.")
    sentence_filter: SentenceFilterSpec | None = Field(default=None, description="LongRecipe's sentence selection; off when absent.")
    replay: ReplaySpec | None = Field(default=None, description="Also write a replay set of short documents to replay/.")
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
        if PLANS[self.plan].by_role and len({s.role for s in self.sources}) < 2:
            raise ValueError(f"plan {self.plan} needs at least one source with role 'long' and one with role 'short'")
        for key, part in (("sentence_filter", self.sentence_filter), ("replay", self.replay)):
            unknown = sorted(set(part.sources or []) - set(names)) if part is not None else []
            if unknown:
                raise ValueError(f"{key}.sources names {unknown[0]!r}, which is not a source; use one of {', '.join(names)}")
        return self


class PositionSpec(Strict):
    """The RoPE scaling method and the training position-id transform."""

    method: RopeMethod = Field(default="yarn", description="The RoPE scaling method (longforge.positions.methods).")
    factor: float | None = Field(default=None, gt=0, description="Scale factor; target_length / original_length when absent.")
    theta: float | None = Field(default=None, gt=0, description="RoPE base for method 'theta'.")
    beta_fast: float = Field(default=32.0, gt=0, description="YaRN beta_fast (the paper's beta).")
    beta_slow: float = Field(default=1.0, gt=0, description="YaRN beta_slow (the paper's alpha).")
    attention_factor: float | None = Field(default=None, gt=0, description="YaRN attention temperature; 0.1 ln(s) + 1 when absent.")
    mscale: float | None = Field(default=None, gt=0, description="YaRN mscale (DeepSeek style); used with mscale_all_dim when attention_factor is absent.")
    mscale_all_dim: float | None = Field(default=None, gt=0, description="YaRN mscale_all_dim; attention factor = m(s, mscale) / m(s, mscale_all_dim).")
    truncate: bool = Field(default=True, description="YaRN: round the ramp's ends to whole frequency indices (transformers' default).")
    low_freq_factor: float = Field(default=1.0, gt=0, description="llama3: wavelengths above original / low_freq_factor are divided by the factor.")
    high_freq_factor: float = Field(default=4.0, gt=0, description="llama3: wavelengths below original / high_freq_factor are kept.")
    transform: PositionTransform = Field(
        default="contiguous",
        description="Training position ids: contiguous, pose (Zhu et al.: one skip) or pit (LongRecipe: a skip at sentence starts).",
    )

    @model_validator(mode="after")
    def _theta_needs_value(self) -> "PositionSpec":
        if self.method == "theta" and self.theta is None:
            raise ValueError("method 'theta' needs `theta` (the new RoPE base, e.g. 8000000)")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"beta_fast ({self.beta_fast}) must be larger than beta_slow ({self.beta_slow})")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor ({self.high_freq_factor}) must be larger than low_freq_factor ({self.low_freq_factor})")
        return self


class SFTSpec(Strict):
    """Short-instruction SFT data: chat conversations, loss on the assistant's tokens only."""

    data: InputPath = Field(description="JSONL file, one conversation per line.")
    field: str = Field(default="messages", description="Key holding the list of {role, content} messages.")
    seq_len: int = Field(default=8192, gt=1, description="Packed row length; longer conversations are kept aside.")
    chat_template: InputPath | None = Field(default=None, description="Jinja template file; the tokenizer's own when absent.")


class MergeSpec(Strict):
    """Merge the model so far with another checkpoint (LongRecipe: 0.5 original + 0.5 extended)."""

    other: Annotated[str, Input(keep=("base",))] = Field(
        default="base", description="'base' (the recipe's model) or a checkpoint folder.")
    weights: tuple[float, float] = Field(default=(0.5, 0.5), description="(other, current) weights; they sum to 1.")
    method: Literal["linear", "slerp"] = Field(
        default="linear", description="linear: the weighted mean of each tensor; slerp: spherical interpolation.")

    @model_validator(mode="after")
    def _weights_sum_to_one(self) -> "MergeSpec":
        if abs(sum(self.weights) - 1) > 1e-6:
            raise ValueError(f"merge weights {list(self.weights)} must sum to 1")
        return self


class TrainSpec(Strict):
    """The settings of a training stage (pretrain or sft): optimisation, schedule, precision, memory and speed."""

    steps: int = Field(default=1, gt=0, description="Optimizer steps.")
    batch_size: int = Field(default=1, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(default=2e-5, gt=0, description="Peak learning rate.")
    schedule: Literal["cosine", "constant"] = Field(default="cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(default=0, ge=0, description="Steps of linear warmup to the peak learning rate.")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine: the last step's lr as a share of the peak.")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas (beta1, beta2).")
    clip_grad: float = Field(default=1.0, ge=0, description="Clip the global gradient norm to this; 0 = no clipping.")
    document_mask: bool = Field(default=True, description="Forbid attention across packed documents.")
    save_every: int = Field(default=50, gt=0, description="Save a resumable checkpoint every this many steps.")
    sp: int = Field(default=1, gt=0, description="Sequence-parallel degree; processes come from torchrun.")
    sequence_parallel: SequenceParallelKind = Field(
        default="auto", description="How sp shards attention: ulysses (heads exchanged; the degree must divide the "
        "heads), ring (keys and values passed around; any head count, seq_len a multiple of 2*sp); auto = ulysses "
        "where it fits, else ring.")
    attention: AttentionBackend = Field(
        default="auto", description="Attention kernel: auto = varlen (document masks; flex in fp32) or sdpa on CUDA, dense on CPU.")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = Field(
        default="auto", description="auto = fp32 on CPU, bf16-mixed (fp32 master weights) on CUDA; bf16 = bf16 weights.")
    optimizer: Optimizer = Field(
        default="adamw", description="adamw_bf16: bf16 moments and stochastic rounding (needs precision bf16).")
    activation_checkpointing: Literal["auto", "on", "off"] = Field(
        default="auto", description="Recompute each layer in backward; auto = on for CUDA.")
    checkpoint_policy: Literal["full", "save_attention"] = Field(
        default="full", description="save_attention keeps attention outputs (faster backward, more memory).")
    offload_activations: bool = Field(default=False, description="Keep checkpointed activations in CPU memory (CUDA).")
    resident_layers: int = Field(
        default=0, ge=0, description="With offload_activations: the last N layers keep their checkpointed inputs on "
        "the GPU (tokens x hidden x 2 bytes each), for steps whose offloaded inputs would overflow host memory.")
    optimizer_in_backward: bool = Field(
        default=False, description="Update each parameter as soon as its gradient is complete, so the gradients never "
        "exist all at once (2 bytes per parameter less in bf16); needs one process, grad_accum 1 and clip_grad 0.")
    mlp_tile: int = Field(default=0, ge=0, description="Run MLPs in tiles of this many tokens (0 = off).")
    lean_norm: bool = Field(default=True, description="RMSNorms save their input and 1/rms only, not fp32 copies (same numbers, less memory).")
    fused_ops: Literal["auto", "on", "off"] = Field(
        default="auto", description="Fuse SwiGLU, RoPE and RMSNorm into single kernels with torch.compile; auto = on CUDA with Triton.")
    tensorboard: bool = Field(default=False, description="Also write the step log as TensorBoard scalars (tb/).")

    @model_validator(mode="after")
    def _steps_given(self) -> "TrainSpec":
        if "steps" not in self.model_fields_set:
            raise ValueError(f"a {getattr(self, 'kind', 'training')} stage needs `steps` (optimizer steps)")
        return self

    @model_validator(mode="after")
    def _bf16_optimizer(self) -> "TrainSpec":
        if self.optimizer == "adamw_bf16" and self.precision != "bf16":
            raise ValueError("optimizer 'adamw_bf16' keeps bf16 weights; set precision: bf16 with it")
        return self

    @model_validator(mode="after")
    def _memory_options(self) -> "TrainSpec":
        if self.resident_layers and not self.offload_activations:
            raise ValueError("resident_layers chooses which layers stay on the GPU when offloading; "
                             "set offload_activations: true with it (or drop resident_layers)")
        if self.optimizer_in_backward and self.grad_accum != 1:
            raise ValueError("optimizer_in_backward updates the weights during backward, so micro-batches cannot "
                             f"accumulate; set grad_accum: 1 (not {self.grad_accum}) or turn it off")
        if self.optimizer_in_backward and self.clip_grad:
            raise ValueError("optimizer_in_backward updates each parameter before the others' gradients exist, so the "
                             "global norm cannot be clipped; set clip_grad: 0 with it")
        return self


class StageName(Strict):
    """What every stage of the recipe's list has: its name (the folder train/<name> of the run) and its kind."""

    name: str = Field(default="extend", description="The stage's name, and its folder train/<name> in the run folder.")
    kind: str = Field(default="pretrain", description="pretrain (the default), sft or merge.")  # each kind narrows it

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, v: str) -> str:
        return safe_name(v, "stage name")  # the stage's folder is train/<name> inside the run folder


class PretrainStageSpec(TrainSpec, StageName):
    """Continual pretraining on packed long sequences (the extension), or on the replay set."""

    kind: Literal["pretrain"] = Field(default="pretrain", description="pretrain (the default), sft or merge.")
    data: InputPath | None = Field(default=None, description="Packed data folder; the data stage's output when absent.")
    dataset: Literal["main", "replay"] = Field(
        default="main", description="Which set of the data stage to train on: the long data, or its replay set (short, contiguous positions).")
    val_data: InputPath | None = Field(
        default=None, description="A packed data folder of held-out sequences (`longforge data build`); its mean "
        "next-token loss (contiguous positions, the stage's document masks) is logged as val_loss.")
    val_every: int = Field(default=0, ge=0, description="With val_data: validate every this many steps and after the last (0: after the last only).")
    val_batches: int = Field(default=4, gt=0, description="With val_data: global batches read per validation, the same "
                             "ones every time (micro-batches of as many tokens as the training's).")


class SFTStageSpec(TrainSpec, StageName):
    """Supervised fine-tuning on chat conversations, loss on the assistant's tokens."""

    kind: Literal["sft"] = Field(default="sft", description="sft.")
    sft: SFTSpec = Field(description="The conversations and how they are packed.")

    @model_validator(mode="before")
    @classmethod
    def _sft_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sft") is None:
            raise ValueError("an sft stage needs an `sft:` section with at least `data:`")
        return data


class MergeStageSpec(StageName):
    """A merge of the model so far with another checkpoint; it trains nothing, so it has no training settings."""

    kind: Literal["merge"] = Field(default="merge", description="merge.")
    merge: MergeSpec = Field(default_factory=MergeSpec, description="What to merge with, and how.")


# A stage written without `kind` is a pretrain stage, as recipes have always meant; StageSpec keeps naming it, since
# every caller of the training loop builds one (the recipe's list takes any kind: AnyStageSpec).
StageSpec = PretrainStageSpec
STAGE_SPECS: dict[str, type[StageName]] = {"pretrain": PretrainStageSpec, "sft": SFTStageSpec, "merge": MergeStageSpec}


def stage_kind(value: Any) -> str:
    """The kind of a stage mapping (pretrain when it names none) or of a stage object."""
    kind = value.get("kind", "pretrain") if isinstance(value, dict) else getattr(value, "kind", "pretrain")
    return kind if isinstance(kind, str) else repr(kind)


AnyStageSpec = Annotated[Union[tuple(Annotated[spec, Tag(kind)] for kind, spec in STAGE_SPECS.items())],  # noqa: UP007
                         Discriminator(stage_kind)]


LengthSpacing = Literal["log", "linear"]
RulerTask = Literal["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                    "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]
# The RULER tasks that read one of the user's files, by the RulerSpec field naming it (eval/ruler/tasks.py says the
# same in each task's `needs`; a test keeps the two equal).
RULER_NEEDS: dict[str, tuple[str, ...]] = {
    "essays": ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"),
    "squad": ("qa_1",), "hotpotqa": ("qa_2",)}


class PasskeySpec(Strict):
    """The passkey retrieval grid (lengths x depths x trials), exact match of the first integer."""

    lengths: Lengths | None = Field(default=None, description="Prompt lengths in tokens; spread over [min_length, max_length] when absent.")
    num_lengths: int = Field(default=40, gt=0, description="Lengths in the grid (Fu et al./UltraLong: 40).")
    min_length: int | None = Field(default=None, gt=0, description="Shortest prompt; a quarter of the original window when absent.")
    max_length: int | None = Field(default=None, gt=0, description="Longest prompt; target_length when absent.")
    spacing: LengthSpacing = Field(default="log", description="How the lengths are spread between min and max.")
    depths: int = Field(default=10, gt=0, description="Needle depths from 0% to 100% (Fu et al./UltraLong: 10).")
    trials: int = Field(default=1, gt=0, description="Prompts per cell (each with its own key).")
    haystack: InputPath | None = Field(default=None, description="Text file/folder or JSONL to hide the key in; the Landmark/YaRN filler when absent.")
    text_field: str = "text"
    batch_size: int | None = Field(default=None, gt=0, description="Prompts per batch; default 8 on a CPU, on a GPU as many as inference.batch_tokens allows (at most 256).")


class NiahSpec(Strict):
    """Needle in a haystack (Fu et al./UltraLong): a sentence needle, lengths x depths, ROUGE-1 F1."""

    lengths: Lengths | None = Field(default=None, description="Prompt lengths; spread over [min_length, max_length] when absent.")
    num_lengths: int = Field(default=40, gt=0)
    min_length: int | None = Field(default=None, gt=0, description="Shortest prompt; a quarter of the original window when absent.")
    max_length: int | None = Field(default=None, gt=0, description="Longest prompt; target_length when absent.")
    spacing: LengthSpacing = Field(default="linear", description="Fu et al. spread lengths linearly.")
    depths: int = Field(default=10, gt=0)
    trials: int = Field(default=1, gt=0, description="Prompts per cell; trials after the first start the haystack at seeded offsets.")
    haystack: InputPath | None = Field(default=None, description="Text file/folder or JSONL of long prose (e.g. essays); the built-in noise filler when absent.")
    text_field: str = "text"
    needle: str = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    question: str = "What is the best thing to do in San Francisco?"
    answer_prefix: str = "The best thing to do in San Francisco is"
    max_new_tokens: int = Field(default=50, gt=0)
    batch_size: int | None = Field(default=None, gt=0, description="Prompts per batch; default 8 on a CPU, on a GPU as many as inference.batch_tokens allows (at most 256).")


class RulerSpec(Strict):
    """RULER's tasks at several lengths, with per-task scores, their average and the effective length."""

    tasks: list[RulerTask] | None = Field(default=None, description="Tasks to run; when absent, every task the given files allow: niah_single_1, niah_multikey_2/3, vt, cwe and fwe need none, the other niah tasks need essays, qa_1 SQuAD and qa_2 HotpotQA (the tasks left out are named).")
    lengths: Lengths | None = Field(default=None, description="Prompt lengths; 4K, 8K, ... up to target_length when absent.")
    samples: int = Field(default=25, gt=0, description="Samples per task and length (RULER uses 500).")
    essays: InputPath | None = Field(default=None, description="Essay haystack (text file/folder or JSONL) for niah_single_2/3, multikey_1, multivalue, multiquery.")
    squad: InputPath | None = Field(default=None, description="SQuAD dev JSON for qa_1.")
    hotpotqa: InputPath | None = Field(default=None, description="HotpotQA distractor dev JSON for qa_2.")
    threshold: float = Field(default=85.6, gt=0, le=100, description="Average score a length must beat to count as effective.")
    max_new_tokens: int | None = Field(default=None, gt=0, description="Cap on tokens generated per answer (speed); each task's RULER budget when absent.")
    batch_size: int | None = Field(default=None, gt=0, description="Prompts per batch; default 8 on a CPU, on a GPU as many as inference.batch_tokens allows (at most 256).")

    def task_list(self) -> list[str]:
        """The tasks to run: the given ones, or every task whose files are given (`left_out` names the others)."""
        if self.tasks:
            return list(dict.fromkeys(self.tasks))
        missing = self.left_out()
        return [t for t in get_args(RulerTask) if t not in missing]

    def left_out(self) -> dict[str, str]:
        """The tasks the default list leaves out, each with the field of the file it needs (none when tasks are given)."""
        if self.tasks:
            return {}
        needs = {t: field for field, tasks in RULER_NEEDS.items() if getattr(self, field) is None for t in tasks}
        return {t: needs[t] for t in get_args(RulerTask) if t in needs}


class PplSpec(Strict):
    """Perplexity against length on held-out long documents."""

    source: InputPath = Field(description="JSONL or text file/folder of long documents.")
    text_field: str = "text"
    lengths: Lengths | None = None
    num_docs: int = Field(default=8, gt=0)
    stride: int | None = Field(default=None, gt=0, description="Sliding-window stride; one window per document when absent.")


class InferenceSpec(Strict):
    """How evaluation prompts reach the model, and the generation engine's memory/speed settings."""

    chat_template: bool = Field(default=False, description="Wrap prompts in the tokenizer's chat template (instruct models).")
    system_prompt: str | None = None
    prefill_chunk: int = Field(default=8192, gt=0, description="Prompt tokens per forward pass while filling the KV cache.")
    kv_cache: Literal["auto", "device", "cpu"] = Field(
        default="auto", description="'auto' keeps on the GPU as many layers' KV cache as fit under gpu_memory_gib and the "
        "rest in pinned host memory; 'device' all on the GPU; 'cpu' all in host memory (the GPU stages two layers): "
        "less GPU memory, slower decoding.")
    gpu_memory_gib: float | None = Field(default=None, gt=0, description="GPU memory the engine may use with kv_cache "
                                         "'auto' (default: 90% of the GPU).")
    attention: Literal["auto", "longforge", "hf"] = Field(default="auto", description="'hf' uses transformers' cache and attention (any model).")
    cuda_graphs: Literal["auto", "off"] = Field(
        default="auto", description="'auto' captures the decoding step as a CUDA graph per batch shape and replays it "
        "(eager if capture fails); 'off' decodes eagerly.")
    decode_gemm: Literal["cublas", "triton"] = Field(
        default="cublas", description="A decoding step's linear layers on a GPU: 'cublas' (torch's) or 'triton' (a kernel "
        "that streams each weight once, for at most 32 rows; a row's numbers do not depend on its batch).")
    batch_tokens: int | None = Field(default=None, gt=0, description="At most this many prompt tokens in one batch; default "
                                     "131072 on a CPU, on a GPU as many as half the memory free after the weights holds "
                                     "as KV cache.")
    kv_shards: Literal["auto"] | int = Field(
        default="auto", description="Under torchrun, how many processes share one prompt's KV cache (sharded by "
        "sequence): 'auto' shards only a prompt whose cache does not fit one GPU, over every process; N shards every "
        "prompt over N processes; 1 never shards.")

    @field_validator("kv_shards", mode="before")
    @classmethod
    def _shards_auto_or_count(cls, v: Any) -> Any:
        """'auto' or a whole number of processes (a flag's text too), with one message for anything else."""
        if v == "auto":
            return v
        n = int(v) if isinstance(v, str) and v.strip().isdigit() else v
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError("kv_shards must be 'auto' or a whole number of processes per prompt, at least 1")
        return n


# Inference settings added after evaluations were recorded (fingerprinted), at the defaults that reproduce them.
INFERENCE_LATER_DEFAULTS: dict[str, Any] = {"decode_gemm": "cublas"}


def without_later_defaults(settings: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """`settings` less the keys of `later` that hold the default given there: settings added after results were
    fingerprinted, left out of fingerprints while at their defaults so those results stay valid."""
    return {k: v for k, v in settings.items() if k not in later or later[k] != v}


class EvalSpec(Strict):
    """What to evaluate, on which models."""

    passkey: PasskeySpec | None = Field(default_factory=PasskeySpec)
    niah: NiahSpec | None = None
    ruler: RulerSpec | None = None
    ppl: PplSpec | None = None
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    models: list[Literal["base", "final"]] = ["base", "final"]
    seed: int = 1234

    def settings(self) -> dict[str, Any]:
        """The evaluation's settings for fingerprints: inference settings added later are left out while at their
        defaults, so evaluations recorded before they existed stay valid."""
        out = self.model_dump(mode="json")
        out["inference"] = without_later_defaults(out["inference"], INFERENCE_LATER_DEFAULTS)
        return out

    def resolve_paths(self, fix: Any) -> None:
        """Apply `fix` (relative -> absolute) to every path of the evaluation (longforge.recipe.map_paths)."""
        from longforge.recipe import map_paths

        map_paths(self, fix)

    def input_paths(self) -> dict[str, Path]:
        """Every file the evaluation reads, by recipe key (longforge.recipe.input_paths)."""
        from longforge.recipe import input_paths

        return input_paths(self, "eval")


class Recipe(Strict):
    """A whole context-extension recipe."""

    name: str = "recipe"
    description: str = ""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSpec
    target_length: int = Field(gt=0)
    data: DataSpec
    positions: PositionSpec = Field(default_factory=PositionSpec)
    stages: list[AnyStageSpec] = Field(min_length=1)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, v: str) -> str:
        return safe_name(v, "recipe name")  # the default run folder is runs/<name>

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "Recipe":
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique; rename the repeated stage {dup[0]!r}")
        return self


# Recipe loading, overrides, presets, paths and error messages moved to longforge.recipe (and fingerprint to
# longforge.stages.base); these names still import from here.
_MOVED = {"fingerprint": "longforge.stages.base", "parse_recipe": "longforge.recipe", "parse_yaml": "longforge.recipe",
          "apply_overrides": "longforge.recipe", "load_recipe": "longforge.recipe", "load_preset": "longforge.recipe",
          "resolve_paths": "longforge.recipe", "dump_recipe": "longforge.recipe", "_format_error": "longforge.recipe"}


def __getattr__(name: str) -> Any:
    """The names that moved out of the schema, imported from their new module on first use."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
