"""The lab's profiles and arms: what is trained, at which length, with which positions, on equal token budgets."""

from __future__ import annotations

from dataclasses import dataclass, field
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


# Arms that the second seed repeats: the ones the claims compare.
KEY_ARMS = ("ntk", "theta", "theta-nomask", "yarn", "pose", "longrecipe", "pit-random")


def train_length(arm: Arm, profile: LabProfile) -> int:
    """The packed sequence length an arm trains on."""
    return {"target": profile.target, "window": profile.window, "pit": profile.pit_length}[arm.length]


def schedule(arm: Arm, profile: LabProfile) -> tuple[int, int]:
    """(steps, sequences per step) giving the arm the same tokens per step as full-length training."""
    seq = train_length(arm, profile)
    batch = max(round(profile.tokens_per_step / seq), 1)
    steps = max(round(profile.ext_steps * profile.tokens_per_step / (batch * seq)), 1)
    return steps, batch
