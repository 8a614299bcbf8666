"""What every stage shares: the run plan it receives, the shape of a stage, and the checkpoints stages hand on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from longforge.files import content_stamp

if TYPE_CHECKING:
    import torch

    from longforge.model.parallel import Layout


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (used to detect changed stage inputs)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_stamp(folder: Path) -> list[Any]:
    """The identity of a tokenizer: its folder and the content of its tokenizer files (not the model's weights)."""
    from longforge.hf import TOKENIZER_FILES

    names = (*TOKENIZER_FILES, "added_tokens.json")
    return [str(folder), *(content_stamp(Path(folder) / n) for n in names if (Path(folder) / n).is_file())]


@dataclass
class RunPlan:
    """The values derived from a recipe once, which every stage of one run receives, and its stages in run order.

    `longforge run` fills it from the recipe; a stage command fills what its one stage reads (the rest stays None).
    With a `run_dir`, finished stages are skipped and interrupted ones resumed (markers in each stage's folder); a
    stage command writes only its product into its --out.
    """

    base_model: Path | None = None  # the recipe's model: the rope stage's input, merge's 'base', eval's 'base'
    target_length: int | None = None
    original_length: int | None = None  # None: read from the checkpoint by the stage (a command not told it)
    seq_len: int | None = None  # packed training length (data.seq_len, else target_length)
    tokenizer: Path | None = None  # the tokenizer that writes the data's token ids (data.tokenizer, else the model's)
    device: str = "auto"  # as asked: auto, cpu or cuda
    seed: int = 0
    transform: str = "contiguous"  # the position transform of training on the long data
    trust_remote_code: bool = False
    run_dir: Path | None = None
    stages: list[Stage] = field(default_factory=list)

    @cached_property
    def torch_device(self) -> torch.device:
        """The device `device` means on this machine (one sentence when CUDA is asked for and absent)."""
        from longforge.hf import resolve_device

        return resolve_device(self.device)

    @cached_property
    def tokenizer_stamp(self) -> list[Any]:
        """The tokenizer's identity (folder and file contents), computed once for every stage that depends on it."""
        assert self.tokenizer is not None, "a plan whose stages read the tokenizer names it"
        return tokenizer_stamp(self.tokenizer)

    @cached_property
    def processes(self) -> Layout:
        """The run's processes (torchrun's, joined once; one process otherwise): rank, barrier and device for stages."""
        return self.layout(1)

    def layout(self, sp: int) -> Layout:
        """Where this process sits for `sp`-way sequence parallelism (joins torchrun's process group)."""
        from longforge.model.parallel import init_layout

        return init_layout(sp, self.device)


class Stage:
    """One stage of a plan. Each kind (one module of longforge.stages) says what its fingerprint covers, what it
    checks before any stage of the plan runs, and how it runs; the runner adds skipping, resuming and markers."""

    kind: ClassVar[str]
    resumable: ClassVar[bool] = False  # an interrupted run with the same inputs keeps its partial work and continues
    all_ranks: ClassVar[bool] = False  # under torchrun every process runs it (training); else rank 0, the others wait
    cached: ClassVar[bool] = True  # skipped when done with the same inputs (the report is rebuilt on every run)
    title: str  # how progress names it: data, rope, train/extend, merge/merge, eval/base, report
    folder: Path  # where it writes (and, in a run folder, its markers)

    def covers(self, plan: RunPlan) -> list[Any]:
        """What the fingerprint covers: settings, inputs by content, and the fingerprints of the stages it reads."""
        raise NotImplementedError

    def check(self, plan: RunPlan) -> None:
        """Refuse, in one sentence, what would fail later (missing inputs, impossible settings); before any work."""

    def run(self, plan: RunPlan) -> dict[str, Any]:
        """Do the stage's work into its folder; returns what its DONE.json records."""
        raise NotImplementedError

    def fingerprint(self, plan: RunPlan) -> str:
        """The hash of what the stage covers, computed once (content stamps read files)."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            fp = self.__dict__["_fingerprint"] = fingerprint(self.covers(plan))
        return fp


@dataclass
class Checkpoint:
    """A model a stage reads: its folder, and the stage of the plan that writes it (None: a folder the user gave)."""

    path: Path
    made_by: Stage | None = None

    def fingerprint(self, plan: RunPlan) -> str:
        """The writing stage's fingerprint, or the folder's path and content."""
        if self.made_by is not None:
            return self.made_by.fingerprint(plan)
        return fingerprint([str(self.path), content_stamp(self.path)])


@dataclass(frozen=True)
class StageKind:
    """A registry record: a stage kind, its class, and where it writes inside a run folder."""

    name: str
    stage: type[Stage]
    output: str
    description: str
