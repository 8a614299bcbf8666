"""The one assembly of a training run, shared by every stage that trains (pretrain, sft, and the demo's and the
lab's base model): batches, then the model, then the training loop, resumable in the stage's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from longforge.stages.base import RunPlan, Stage


class TrainingStage(Stage):
    """A stage that trains: a kind says how its batches are made and its model loaded; the rest is this."""

    resumable: ClassVar[bool] = True  # train_model continues from the newest checkpoint of the same settings
    all_ranks: ClassVar[bool] = True  # every torchrun process trains its part
    spec: Any  # a TrainSpec
    label: str  # its name in progress and the log

    def batches(self, plan: RunPlan, layout: Any) -> Any:
        """The batch source (longforge.train.batches.BatchSource) for this process's part of the data."""
        raise NotImplementedError

    def validation(self, plan: RunPlan, layout: Any, train: Any) -> Any:
        """Held-out batches scored while training (a BatchSource, sized after the `train` source), or None: the kind's
        choice."""
        return None

    def load(self, plan: RunPlan) -> Any:
        """The model to train, on the CPU (the training loop places and shards it)."""
        from longforge.hf import load_model

        return load_model(self.model_path(), "cpu", trust_remote_code=plan.trust_remote_code)

    def model_path(self) -> Path:
        """The checkpoint it trains, whose tokenizer the exported model carries."""
        raise NotImplementedError

    def run(self, plan: RunPlan) -> dict[str, Any]:
        from longforge.train.loop import train_model

        layout = plan.layout(self.spec.sp)
        source = self.batches(plan, layout)  # first: its inputs are checked against the model before it is loaded
        validation = self.validation(plan, layout, source)
        model = self.load(plan)
        res = train_model(model, source, self.spec, self.folder, layout.device, tokenizer_from=self.model_path(),
                          label=self.label or self.title, layout=layout, validation=validation)
        return {"final": str(res.final), "steps": res.steps, "last_loss": res.last_loss, "tokens": res.tokens}
