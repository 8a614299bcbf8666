"""The pretrain stage: continual pretraining on packed long sequences (or on the replay set), resumable.

Entry: `PretrainStage.run`; `longforge run` (one per pretrain stage of the recipe) and `longforge train` build it.
Writes train/<name>/: checkpoints/, log.jsonl and final/ (the checkpoint the next stage reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from longforge.errors import LongforgeError
from longforge.files import content_stamp
from longforge.positions.transforms import TRANSFORMS
from longforge.stages.base import Checkpoint, RunPlan, StageKind
from longforge.stages.listed import ListedStage
from longforge.stages.training import TrainingStage


@dataclass
class PretrainStage(ListedStage, TrainingStage):
    """Train `model` on a packed data folder with the plan's position transform (contiguous on the replay set)."""

    kind: ClassVar[str] = "pretrain"
    data: Path = Path()  # the packed folder it reads
    label: str = ""  # its name in progress and the log; train/<name> when empty

    @classmethod
    def in_recipe(cls, spec: Any, model: Checkpoint, folder: Path, data_stage: Any) -> PretrainStage:
        """In a run, the stage reads its own `data` folder, else the data stage's output (or its replay set)."""
        data = spec.data or (data_stage.folder / "replay" if spec.dataset == "replay" else data_stage.folder)
        return cls(spec=spec, model=model, folder=folder, output=folder / "final", data_stage=data_stage, data=data)

    def transform(self, plan: RunPlan) -> str:
        """Replay is short text of the original distribution: plain positions, whatever the extension used."""
        return "contiguous" if self.spec.dataset == "replay" else plan.transform

    def covers(self, plan: RunPlan) -> list[Any]:
        return self.recipe_parts(plan, [content_stamp(self.spec.data)] if self.spec.data is not None else [])

    def check(self, plan: RunPlan) -> None:
        spec = self.spec
        own = spec.data is None and self.data_stage is not None  # the run's data stage writes it
        if own and spec.dataset == "replay" and (self.data_stage is None or self.data_stage.spec.replay is None):
            raise LongforgeError(f"stage {spec.name!r} trains on the replay set, but `data.replay` is not set; add it "
                                 "(e.g. token_budget and seq_len).")
        if not own and not (Path(self.data) / "index.json").is_file():
            raise LongforgeError(f"{self.said('data')} {self.data} is not a longforge data folder; point it at the "
                                 "output of `longforge data build`, or build one.")
        if spec.val_data is not None and not (Path(spec.val_data) / "index.json").is_file():
            raise LongforgeError(f"{self.said('val_data')} {spec.val_data} is not a longforge data folder; point it at "
                                 "held-out text built by `longforge data build`, or leave val_data out.")
        transform = TRANSFORMS.pick(self.transform(plan))
        # A named folder's length is checked when its batches are made (before any step), against its index.
        if own and transform.skips and plan.seq_len and plan.target_length and plan.seq_len > plan.target_length:
            raise LongforgeError(
                f"`data.seq_len` {plan.seq_len} is longer than `target_length` {plan.target_length}, so transform "
                f"{transform.name!r} has nothing to skip; pack shorter sequences (e.g. 30% of the target).")

    def model_path(self) -> Path:
        return self.model.path

    def batches(self, plan: RunPlan, layout: Any) -> Any:
        """Packed sequences with the stage's position ids, this process's share of each global batch."""
        from longforge.data.verify import check_data_for_model
        from longforge.hf import load_tokenizer
        from longforge.positions.segments import sentence_end_mask
        from longforge.train.batches import PackedBatches

        spec = self.spec
        ds = check_data_for_model(self.data, self.model.path)
        transform = TRANSFORMS.pick(self.transform(plan))
        # PIT cuts at sentence ends, judged by the tokenizer that wrote the data's token ids.
        ends = None
        if transform.sentences:
            assert plan.tokenizer is not None, "a plan with a sentence transform names the data's tokenizer"
            ends = sentence_end_mask(load_tokenizer(plan.tokenizer, plan.trust_remote_code))
        return PackedBatches(ds, spec.batch_size, spec.grad_accum, plan.seed, transform.name,
                             plan.target_length or ds.seq_len, spec.document_mask, rank=layout.dp_rank,
                             world=layout.dp, sentence_ends=ends)

    def validation(self, plan: RunPlan, layout: Any, train: Any) -> Any:
        """val_data's sequences with contiguous positions and the stage's document masks, this process's share of
        each global batch (micro-batches of as many tokens as the training's), or None without val_data."""
        from longforge.data.verify import check_data_for_model
        from longforge.train.batches import PackedBatches

        spec = self.spec
        if spec.val_data is None:
            return None
        ds = check_data_for_model(spec.val_data, self.model.path)
        if layout.sp > 1 and ds.seq_len % (2 * layout.sp):
            raise LongforgeError(f"{self.said('val_data')} {spec.val_data} holds sequences of {ds.seq_len} tokens, which "
                                 f"sequence-parallel degree {layout.sp} cannot split; pack it at a multiple of {2 * layout.sp}.")
        rows = max(1, spec.batch_size * train.dataset.seq_len // ds.seq_len)
        return PackedBatches(ds, rows, 1, plan.seed, "contiguous", ds.seq_len, spec.document_mask,
                             rank=layout.dp_rank, world=layout.dp, order="shuffle")


KIND = StageKind("pretrain", PretrainStage, "train/<name>", "continual pretraining on packed long sequences")
