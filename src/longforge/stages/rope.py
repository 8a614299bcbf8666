"""The rope stage: the base checkpoint with its RoPE scaling rewritten for the target length.

Entry: `RopeStage.run` (longforge.positions.rope.apply_rope); `longforge run` builds it for the recipe's `positions`,
`longforge rope` for its --out. Writes rope/: config.json with the new rope_parameters, the weights (reflinked or
copied), the tokenizer and longforge_rope.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from longforge.files import content_stamp
from longforge.progress import say
from longforge.stages.base import Checkpoint, RunPlan, Stage, StageKind


@dataclass
class RopeStage(Stage):
    """Write `model` with the scaling of the `positions` spec, from the original window to the target."""

    kind: ClassVar[str] = "rope"
    spec: Any  # PositionSpec
    model: Checkpoint
    folder: Path
    title: str = "rope"

    @property
    def output(self) -> Path:
        """The rewritten checkpoint: the stage's folder itself."""
        return self.folder

    def covers(self, plan: RunPlan) -> list[Any]:
        # The base model's content counts: weights edited in place re-run rope and every stage after it.
        return [self.spec.model_dump(mode="json"), str(self.model.path), plan.target_length, plan.original_length,
                content_stamp(self.model.path)]

    def run(self, plan: RunPlan) -> dict[str, Any]:
        from longforge.positions.rope import apply_rope

        assert plan.target_length is not None, "a plan with a rope stage names the target length"
        rope = apply_rope(self.model.path, self.output, self.spec, plan.target_length, plan.original_length,
                          plan.trust_remote_code)
        for note in rope.notes:
            say(f"  {note}")
        return {"method": rope.method, "factor": rope.factor, "rope_parameters": rope.rope_parameters}

    def checkpoint(self) -> Checkpoint:
        """What the first stage of the list reads."""
        return Checkpoint(self.output, self)


KIND = StageKind("rope", RopeStage, "rope", "the base checkpoint with RoPE scaled to the target length")
