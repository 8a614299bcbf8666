"""The sft stage: supervised fine-tuning on chat conversations, loss on the assistant's tokens, resumable.

Entry: `SFTStage.run`; `longforge run` builds it for each `kind: sft` stage, and `longforge train` for a spec of
kind sft (`--set kind=sft --set sft.data=chat.jsonl`, or `--spec`). Writes train/<name>/: checkpoints/, log.jsonl,
rejects.jsonl (conversations set aside) and final/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from longforge.errors import LongforgeError
from longforge.files import content_stamp
from longforge.progress import say
from longforge.stages.base import RunPlan, StageKind
from longforge.stages.listed import ListedStage
from longforge.stages.training import TrainingStage


@dataclass
class SFTStage(ListedStage, TrainingStage):
    """Fine-tune `model` on the stage's conversations, packed into rows of `sft.seq_len`."""

    kind: ClassVar[str] = "sft"
    label: str = ""  # its name in progress and the log; train/<name> when empty

    def covers(self, plan: RunPlan) -> list[Any]:
        sft = self.spec.sft
        return self.recipe_parts(plan, [content_stamp(sft.data), content_stamp(sft.chat_template)])

    def check(self, plan: RunPlan) -> None:
        sft = self.spec.sft
        if not Path(sft.data).is_file():
            raise LongforgeError(f"{self.said('sft.data')} {sft.data} does not exist; point it at a JSONL of chat "
                                 "conversations.")
        if sft.chat_template is not None and not Path(sft.chat_template).is_file():
            raise LongforgeError(f"{self.said('sft.chat_template')} {sft.chat_template} does not exist; give a Jinja "
                                 "file or leave it out.")

    def model_path(self) -> Path:
        return self.model.path

    def batches(self, plan: RunPlan, layout: Any) -> Any:
        """Packed, assistant-masked conversations (bad records go to the stage's rejects.jsonl)."""
        from longforge.hf import load_tokenizer
        from longforge.train.sft import SFTBatches, load_conversations, pack_conversations

        spec, sft = self.spec, self.spec.sft
        tok = load_tokenizer(self.model.path, plan.trust_remote_code)
        template = Path(sft.chat_template).read_text() if sft.chat_template else None
        data = load_conversations(sft.data, tok, sft.field, sft.seq_len, template, self.folder / "rejects.jsonl")
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        rows = pack_conversations(data.examples, sft.seq_len, pad, plan.seed)
        if data.rejects:
            say(f"  sft: kept {len(data.examples)} conversations; set aside "
                + ", ".join(f"{n} {r}" for r, n in data.rejects.items()))
        return SFTBatches(rows, spec.batch_size, spec.grad_accum, plan.seed, rank=layout.dp_rank, world=layout.dp)


KIND = StageKind("sft", SFTStage, "train/<name>", "supervised fine-tuning on chat conversations")
