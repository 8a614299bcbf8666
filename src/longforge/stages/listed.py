"""What the stages of a recipe's `stages:` list share (pretrain, sft, merge): a spec with a name, the checkpoint of
the stage before, a folder train/<name> with the new checkpoint in final/, and the parts of their fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from longforge.positions.transforms import TRANSFORMS
from longforge.stages.base import Checkpoint, RunPlan, Stage


# Settings added after that release, left out of the fingerprint while at these defaults.
LATER_DEFAULTS: dict[str, Any] = {"sequence_parallel": "auto"}
# Settings that change no weight (validation only reads): a finished stage stays finished when they change.
READ_ONLY = ("val_data", "val_every", "val_batches")


@cache
def _flat_defaults() -> dict[str, Any]:
    """Every key a stage had when all kinds shared one flat schema, at its default."""
    from longforge.config import PretrainStageSpec

    return {**PretrainStageSpec(steps=1).model_dump(mode="json"), "sft": None, "merge": None}


def flat_settings(spec: Any) -> dict[str, Any]:
    """A stage's settings in the flat shape every stage had before stages had kinds of their own.

    Fingerprints cover this shape, so a stage finished by an earlier longforge stays finished (a merge stage's
    unused training defaults included); a setting added later must be left out here while at its default.
    """
    from longforge.config import without_later_defaults

    settings = {**_flat_defaults(), **spec.model_dump(mode="json")}
    return {k: v for k, v in without_later_defaults(settings, LATER_DEFAULTS).items() if k not in READ_ONLY}


@dataclass
class ListedStage(Stage):
    """A stage of the recipe's list; its model is the previous stage's checkpoint (or the one a command is given)."""

    spec: Any
    model: Checkpoint
    folder: Path
    output: Path  # the checkpoint it writes: folder/final in a run, --out for `longforge merge`
    data_stage: Any = None  # the run's data stage, whose fingerprint the list's stages have always covered
    flags: dict[str, str] = field(default_factory=dict)  # key -> the flag a stage command read it from

    @property
    def title(self) -> str:  # type: ignore[override]
        return f"train/{self.spec.name}"

    def said(self, key: str) -> str:
        """How the user wrote a setting: the command's flag, or the recipe key in its stage."""
        return self.flags.get(key) or f"stage {self.spec.name!r}: `{key}`"

    def recipe_parts(self, plan: RunPlan, inputs: list[Any]) -> list[Any]:
        """The fingerprint's parts: settings, the model's fingerprint, the data stage's, positions, seed, and
        the content of the stage's own input files (the tokenizer's too when the transform cuts at sentences)."""
        data_fp = self.data_stage.fingerprint(plan) if self.data_stage is not None and getattr(self.spec, "data", None) is None else None
        sentences = TRANSFORMS.pick(plan.transform).sentences
        return [flat_settings(self.spec), self.model.fingerprint(plan), data_fp, plan.transform, plan.target_length,
                plan.seed, inputs, plan.tokenizer_stamp if sentences else None]

    @classmethod
    def in_recipe(cls, spec: Any, model: Checkpoint, folder: Path, data_stage: Any) -> ListedStage:
        """The stage for `spec` in a run: it reads `model` and writes folder/final."""
        return cls(spec=spec, model=model, folder=folder, output=folder / "final", data_stage=data_stage)

    def checkpoint(self) -> Checkpoint:
        """What the next stage reads: this stage's output."""
        return Checkpoint(self.output, self)
