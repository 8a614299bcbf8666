"""The data stage: corpus sources -> tokenized, sampled, filtered and packed shards (and a replay set), resumable.

Entry: `DataStage.run` (longforge.data.build.build_data); `longforge run` builds it when a pretrain stage trains on
the run's own data, `longforge data build` for its --out. Writes data/: shards, index.json, manifest.json, replay/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from longforge.files import content_stamp
from longforge.stages.base import RunPlan, Stage, StageKind


@dataclass
class DataStage(Stage):
    """Build the recipe's `data` section with the plan's tokenizer, sequence length and seed."""

    kind: ClassVar[str] = "data"
    resumable: ClassVar[bool] = True  # build_data continues after its last whole shard
    spec: Any  # DataSpec
    folder: Path
    title: str = "data"

    def covers(self, plan: RunPlan) -> list[Any]:
        # Contents, not only paths: a corpus or tokenizer rewritten at the same path rebuilds the data.
        sf = self.spec.sentence_filter
        return [self.spec.model_dump(mode="json"), str(plan.tokenizer), plan.seq_len, plan.seed, plan.tokenizer_stamp,
                [content_stamp(s.path) for s in self.spec.sources], content_stamp(sf.profile if sf is not None else None)]

    def check(self, plan: RunPlan) -> None:
        from longforge.data.sources import check_source

        for source in self.spec.sources:
            check_source(source)

    def run(self, plan: RunPlan) -> dict[str, Any]:
        from longforge.data.build import build_data

        assert plan.tokenizer is not None and plan.seq_len is not None, "a plan with a data stage names both"
        m = build_data(self.spec, plan.tokenizer, plan.seq_len, self.folder, plan.seed, plan.trust_remote_code)
        return {"sequences": m["sequences"], "tokens": m["tokens_in_sequences"]}


KIND = StageKind("data", DataStage, "data", "sources -> packed shards with document boundaries (and a replay set)")
