"""The merge stage: the model so far merged tensor by tensor with another checkpoint (LongRecipe's last step).

Entry: `MergeStage.run`; `longforge run` builds it for each `kind: merge` stage, and `longforge merge A B` with A as
the other checkpoint and B as the model so far. Writes train/<name>/final (in a run) or --out: a whole checkpoint
with longforge_merge.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from longforge.errors import LongforgeError
from longforge.files import content_stamp
from longforge.stages.base import RunPlan, StageKind
from longforge.stages.listed import ListedStage


@dataclass
class MergeStage(ListedStage):
    """weights[0] x other + weights[1] x the model so far (linear or slerp)."""

    kind: ClassVar[str] = "merge"
    # Which input's config the merge keeps: the model so far (1) in a recipe; None keeps the longer-context one, as
    # `longforge merge` does for two checkpoints given in either order.
    config_from: int | None = 1

    @property
    def title(self) -> str:  # type: ignore[override]
        return f"merge/{self.spec.name}"

    def other(self, plan: RunPlan) -> Path:
        """The checkpoint merged with the model so far: the recipe's model for 'base', else the folder named."""
        other = self.spec.merge.other
        if other == "base":
            assert plan.base_model is not None, "a plan with a merge with 'base' names the recipe's model"
            return plan.base_model
        return Path(other)

    def covers(self, plan: RunPlan) -> list[Any]:
        other = self.spec.merge.other
        return self.recipe_parts(plan, [content_stamp(other)] if other != "base" else [])

    def check(self, plan: RunPlan) -> None:
        from longforge.hf import check_checkpoint, needs_own_code, own_code_error

        # Merging runs no checkpoint code, but its output would claim code it does not carry: refuse it unasked.
        for model in (self.other(plan), self.model.path):
            if not plan.trust_remote_code and Path(model).is_dir() and needs_own_code(model):
                raise own_code_error(model)
        other = self.spec.merge.other
        if other != "base":
            if "merge.other" not in self.flags and not (Path(other) / "config.json").is_file():
                raise LongforgeError(f"{self.said('merge.other')} {other} is not a checkpoint folder; use 'base' or a "
                                     "folder with config.json.")
            check_checkpoint(Path(other), self.said("merge.other"))

    def run(self, plan: RunPlan) -> dict[str, Any]:
        from longforge.merge import merge

        m = self.spec.merge
        info = merge([self.other(plan), self.model.path], list(m.weights), self.output, m.method,
                     config_from=self.config_from)
        return {"final": str(self.output), **info}


KIND = StageKind("merge", MergeStage, "train/<name>/final", "a merge of the model so far with another checkpoint")
