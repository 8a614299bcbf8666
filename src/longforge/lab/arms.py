"""The lab's profiles and arms: what is trained, at which length, with which positions, on equal token budgets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from longforge.demo.base import BaseSettings


@dataclass(frozen=True)
class LabProfile:
    """Sizes of one lab run: the base model, the 16x extension, and the evaluation."""

    name: str
    base: BaseSettings
    factor: int
    ext_steps: int
    ext_batch: int  # sequences of the target length per step; other arms keep tokens per step equal
    ext_lr: float
    ext_warmup: int
    pool_docs: int  # task documents (RULER formats) for pretraining the base
    ext_task_docs: int  # passkey + task documents in each extension corpus
    replay_fraction: float
    passkey_lengths: int
    passkey_depths: int
    passkey_trials: int
    ruler_lengths: tuple[int, ...]
    ruler_samples: int
    ruler_tasks: tuple[str, ...] | None  # None: all synthetic tasks
    ruler_max_new_tokens: int
    ppl_docs: int
    analysis_texts: int
    task_share: float = 0.3  # share of passkey/RULER-format documents in each extension corpus (0: natural text only)
    checkpoints: int = 2  # checkpoints per trained arm (a slice cut by a time limit resumes from the newest)
    pretrained: bool = False  # a given checkpoint as the base: window read from it, retention measured at the window
    val_tokens: int = 0  # held-out tokens at the target length each trained arm's loss is validated on (0: none)

    @property
    def window(self) -> int:
        """The base model's pretraining window."""
        return self.base.window

    @property
    def target(self) -> int:
        """The extended window."""
        return self.base.window * self.factor

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step, the same in every arm."""
        return self.ext_batch * self.target

    @property
    def tokens(self) -> int:
        """Extension tokens per arm (steps x tokens per step), the same in every trained arm."""
        return self.ext_steps * self.tokens_per_step

    @property
    def pit_length(self) -> int:
        """LongRecipe's training length: 30% of the target, a multiple of 64."""
        return max(int(0.3 * self.target) // 64 * 64, 64)


# The evaluation's RULER tasks on a budget: LongRecipe's NIAH(M) (multikey, multivalue, multiquery) and the
# single-needle task; generation dominates the lab's evaluation time, so the other tasks are opt-in (ruler_tasks=None).
NIAH_TASKS = ("niah_single_1", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3", "niah_multivalue",
              "niah_multiquery")

PROFILES: dict[str, LabProfile] = {
    # CI-sized: the whole lab in about a minute on 2 CPU cores; numbers mean nothing, the code paths are all run.
    "tiny": LabProfile(
        name="tiny",
        base=BaseSettings(vocab_size=1024, hidden_size=32, layers=2, heads=2, window=128, rope_theta=10000.0,
                          steps=30, micro_batch=4, lr=3e-3, warmup_steps=5, retrieval_share=0.5,
                          curriculum_steps=0, answer_weight=5.0, task_share=0.5),
        factor=4, ext_steps=3, ext_batch=1, ext_lr=3e-4, ext_warmup=1, pool_docs=40, ext_task_docs=12,
        replay_fraction=0.1, passkey_lengths=3, passkey_depths=2, passkey_trials=1, ruler_lengths=(128, 512),
        ruler_samples=1, ruler_tasks=None, ruler_max_new_tokens=64, ppl_docs=2, analysis_texts=2,
    ),
    # A user's CPU: a 1M-parameter model, 256 -> 4096 tokens; seed 0 took 30 minutes on 2 cores.
    "cpu": LabProfile(
        name="cpu",
        base=BaseSettings(vocab_size=2048, hidden_size=128, layers=4, heads=8, window=256, rope_theta=10000.0,
                          steps=600, micro_batch=16, lr=3e-3, warmup_steps=50, retrieval_share=0.7,
                          curriculum_steps=400, answer_weight=10.0, task_share=0.5),
        factor=16, ext_steps=40, ext_batch=1, ext_lr=3e-4, ext_warmup=4, pool_docs=3000, ext_task_docs=150,
        replay_fraction=0.1, passkey_lengths=8, passkey_depths=5, passkey_trials=2, ruler_lengths=(256, 4096),
        ruler_samples=4, ruler_tasks=NIAH_TASKS, ruler_max_new_tokens=64, ppl_docs=3, analysis_texts=6,
    ),
    # One H100/H200: a ~25M-parameter model, 1K -> 16K tokens.
    "cuda": LabProfile(
        name="cuda",
        base=BaseSettings(vocab_size=8192, hidden_size=448, layers=8, heads=7, window=1024, rope_theta=10000.0,
                          steps=1500, micro_batch=32, lr=2e-3, warmup_steps=100, retrieval_share=0.7,
                          curriculum_steps=800, answer_weight=10.0, task_share=0.5),
        factor=16, ext_steps=60, ext_batch=4, ext_lr=3e-4, ext_warmup=6, pool_docs=8000, ext_task_docs=400,
        replay_fraction=0.1, passkey_lengths=8, passkey_depths=5, passkey_trials=2,
        ruler_lengths=(1024, 16384), ruler_samples=4, ruler_tasks=NIAH_TASKS, ruler_max_new_tokens=64, ppl_docs=3,
        analysis_texts=8,
    ),
}


# Profiles for a given pretrained checkpoint (`longforge lab --base`): its window and RoPE base are read from its
# config (BaseSettings' shape fields stay unused), the factor and token budget come from the command line.
BASE_PROFILES: dict[str, LabProfile] = {
    # CI-sized, for a tiny checkpoint on CPU.
    "tiny": replace(PROFILES["tiny"], name="base-tiny", ext_steps=2, ruler_lengths=(), ruler_tasks=("niah_single_1",),
                    ruler_max_new_tokens=16, passkey_depths=5, passkey_trials=1, ppl_docs=1, task_share=0.0,
                    pretrained=True, val_tokens=2048),
    # One H200 and SmolLM2-135M (8K): 8 x 32K tokens per step at 4x (~48K tokens/s), 4 x 64K at 8x.
    "cuda": LabProfile(
        name="base-cuda", base=replace(PROFILES["cuda"].base, window=8192, rope_theta=100000.0), factor=4,
        ext_steps=80, ext_batch=8, ext_lr=1e-4, ext_warmup=4, pool_docs=0, ext_task_docs=0, replay_fraction=0.1,
        passkey_lengths=0, passkey_depths=5, passkey_trials=4, ruler_lengths=(), ruler_samples=4, ruler_tasks=None,
        ruler_max_new_tokens=64, ppl_docs=4, analysis_texts=8, task_share=0.0, checkpoints=8, pretrained=True,
        val_tokens=1 << 20,
    ),
}


def for_base(profile: LabProfile, window: int, rope_theta: float, factor: int, tokens: int | None) -> LabProfile:
    """A base profile fitted to a checkpoint: its window and RoPE base, the extension factor and the token budget."""
    p = replace(profile, base=replace(profile.base, window=window, rope_theta=rope_theta), factor=factor)
    # The same tokens per step at every factor: fewer, longer sequences at 8x.
    p = replace(p, ext_batch=max(round(profile.ext_batch * profile.factor / factor), 1))
    return with_tokens(p, tokens)


def with_tokens(profile: LabProfile, tokens: int | None) -> LabProfile:
    """The profile with its steps set so every trained arm sees about `tokens` extension tokens (unchanged when None)."""
    if tokens is None:
        return profile
    return replace(profile, ext_steps=max(round(tokens / profile.tokens_per_step), 1))


@dataclass(frozen=True)
class Arm:
    """One way of extending the base model (or of not training it), and what its rows are called."""

    name: str
    label: str
    rope: dict[str, Any] | None  # PositionSpec fields; None keeps the base model's positions
    train: bool = True
    length: str = "target"  # target | window | pit: the packed training length
    transform: str = "contiguous"
    document_mask: bool = True
    sentences: str | None = None  # None | profile | random: LongRecipe's selection at 30% of each document
    after: tuple[str, ...] = ()  # replay, merge: LongRecipe's later stages, each evaluated
    claims: tuple[str, ...] = field(default=())
    data: dict[str, Any] = field(default_factory=dict)  # DataSpec fields replacing the lab's mix (plan, separator)
    schedule: str = "cosine"
    analysis: str = "ntk"  # the extended arm LongRecipe's impactful-token analysis compares with the base


def theta_for(base_theta: float, factor: int) -> float:
    """ProLong's RoPE base growth (5e5 -> 8e6 for 8x, 1.28e8 for 64x): about factor^(4/3), rounded."""
    return float(round(base_theta * factor ** (4 / 3), -3))


def arms(profile: LabProfile) -> list[Arm]:
    """Every arm, in the order they run (the NTK full-length arm comes before the analysis that LongRecipe needs)."""
    theta = theta_for(profile.base.rope_theta, profile.factor)
    return [
        Arm("base", "base model (no extension)", None, train=False),
        Arm("pi-0", "PI, no training", {"method": "pi"}, train=False),
        Arm("ntk-0", "NTK-aware, no training", {"method": "ntk"}, train=False),
        Arm("yarn-0", "YaRN, no training", {"method": "yarn"}, train=False),
        Arm("pi", "PI + full-length training", {"method": "pi"}),
        Arm("ntk", "NTK-aware + full-length training", {"method": "ntk"}),
        Arm("theta", f"theta {theta:.0f} + full-length training", {"method": "theta", "theta": theta}),
        Arm("theta-nomask", f"theta {theta:.0f}, no document masks", {"method": "theta", "theta": theta},
            document_mask=False),
        Arm("yarn", "YaRN + full-length training", {"method": "yarn"}),
        Arm("pose", "PoSE at the base window (NTK-aware)", {"method": "ntk"}, length="window", transform="pose"),
        Arm("longrecipe", "LongRecipe: PIT + impactful sentences, 30% length (NTK-aware)", {"method": "ntk"},
            length="pit", transform="pit", sentences="profile", after=("replay", "merge")),
        Arm("pit-random", "PIT + random sentences, 30% length (NTK-aware)", {"method": "ntk"}, length="pit",
            transform="pit", sentences="random"),
    ]


def base_arms(profile: LabProfile) -> list[Arm]:
    """The arms for a given pretrained checkpoint: the zero-shot methods and each paper's recipe, in run order (the
    Fu et al. arm, full-length training with the larger base, comes before LongRecipe, whose analysis needs it)."""
    theta = theta_for(profile.base.rope_theta, profile.factor)
    rope = {"method": "theta", "theta": theta}
    prolong_mix = {"plan": "long_short_mix", "long_share": 0.6}
    return [
        Arm("base", "base model (no extension)", None, train=False),
        Arm("pi-0", "PI, no training", {"method": "pi"}, train=False),
        Arm("ntk-0", "NTK-aware, no training", {"method": "ntk"}, train=False),
        Arm("yarn-0", "YaRN, no training", {"method": "yarn"}, train=False),
        Arm("dynamic-0", "dynamic NTK, no training", {"method": "dynamic"}, train=False),
        Arm("ultralong", "UltraLong: YaRN (alpha 1, beta 4), <s> separators, length thresholds, no document masks",
            {"method": "yarn", "beta_slow": 1, "beta_fast": 4}, document_mask=False,
            data={"plan": "length_thresholds", "short_threshold": max(profile.window // 2, 64),
                  "long_threshold": profile.window, "long_repeat": 2.0, "separator": "text:<s>"}),
        Arm("prolong", f"ProLong: theta {theta:.0f}, document masks, 60/40 long/short, trained at 2x the target", rope,
            length="double", data=prolong_mix),
        Arm("prolong-nomask", f"ProLong without document masks (theta {theta:.0f}, 60/40, 2x the target)", rope,
            length="double", document_mask=False, data=prolong_mix),
        Arm("fu", f"Fu et al.: theta {theta:.0f}, per-source length upsampling, full length, constant LR", rope,
            document_mask=False, schedule="constant"),
        Arm("pose", f"PoSE at the base window (theta {theta:.0f})", rope, length="window", transform="pose"),
        Arm("longrecipe", f"LongRecipe: PIT + impactful sentences at 30% length (theta {theta:.0f}), replay, merge", rope,
            length="pit", transform="pit", sentences="profile", after=("replay", "merge"), analysis="fu"),
    ]


# Arms that the second seed repeats: the ones the claims compare.
KEY_ARMS = ("ntk", "theta", "theta-nomask", "yarn", "pose", "longrecipe", "pit-random")
BASE_KEY_ARMS = ("ultralong", "prolong", "prolong-nomask", "fu", "pose", "longrecipe")


def arm_list(profile: LabProfile) -> list[Arm]:
    """The profile's arms: the self-pretrained lab's, or those for a given checkpoint."""
    return base_arms(profile) if profile.pretrained else arms(profile)


def key_arms(profile: LabProfile) -> tuple[str, ...]:
    """The arms the second seed repeats for this profile."""
    return BASE_KEY_ARMS if profile.pretrained else KEY_ARMS


def train_length(arm: Arm, profile: LabProfile) -> int:
    """The packed sequence length an arm trains on."""
    return {"target": profile.target, "window": profile.window, "pit": profile.pit_length,
            "double": 2 * profile.target}[arm.length]


def schedule(arm: Arm, profile: LabProfile) -> tuple[int, int]:
    """(steps, sequences per step) giving the arm the same tokens per step as full-length training."""
    seq = train_length(arm, profile)
    batch = max(round(profile.tokens_per_step / seq), 1)
    steps = max(round(profile.ext_steps * profile.tokens_per_step / (batch * seq)), 1)
    return steps, batch
