"""The eval stage: one model's tasks (passkey, NIAH, RULER, perplexity) at lengths up to the target.

Entry: `EvalStage.run` (longforge.eval.run.evaluate); `longforge run` builds one per `eval.models` entry (base, final).
Writes eval/<model>/: <task>.json for each task and summary.json. Under torchrun every process evaluates its share of
the prompts on its own device (LOCAL_RANK's GPU); the first process writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from longforge.files import content_stamp
from longforge.stages.base import Checkpoint, RunPlan, Stage, StageKind


@dataclass
class EvalStage(Stage):
    """Evaluate `model` with the recipe's `eval` section; `label` names it in the results and the report."""

    kind: ClassVar[str] = "eval"
    all_ranks: ClassVar[bool] = True  # the prompts are spread over every process (longforge.eval.share)
    spec: Any  # EvalSpec
    model: Checkpoint
    label: str
    folder: Path

    @property
    def title(self) -> str:  # type: ignore[override]
        return f"eval/{self.label}"

    def covers(self, plan: RunPlan) -> list[Any]:
        from longforge.recipe import input_paths

        files = [content_stamp(p) for p in input_paths(self.spec).values()]
        return [self.spec.settings(), self.model.fingerprint(plan), plan.original_length,
                plan.target_length, files]

    def check(self, plan: RunPlan) -> None:
        from longforge.eval.run import check_inputs, check_prompts
        from longforge.hf import load_tokenizer

        check_inputs(self.spec)
        # Prompts are built with the evaluated models' tokenizer: the base model's, which every stage keeps.
        assert plan.base_model is not None and plan.original_length is not None and plan.target_length is not None
        check_prompts(self.spec, load_tokenizer(plan.base_model, plan.trust_remote_code), plan.original_length,
                      plan.target_length)

    def run(self, plan: RunPlan) -> dict[str, Any]:
        from longforge.eval.run import evaluate
        from longforge.eval.share import Share

        assert plan.original_length is not None and plan.target_length is not None
        processes = plan.processes  # torchrun's processes (joined once), or this one alone
        device = processes.device if processes.distributed else plan.torch_device
        return evaluate(self.model.path, self.spec, self.folder, plan.original_length, plan.target_length,
                        device, self.label, plan.trust_remote_code, Share.of(processes))


KIND = StageKind("eval", EvalStage, "eval/<model>", "one model's evaluation tasks")
