"""Pretrain the demo's small Llama base model at a short window, so it retrieves inside it and fails beyond."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bisect

import numpy as np
import torch

from longforge.config import StageSpec
from longforge.demo.retrieval import RetrievalDoc, RetrievalDocs
from longforge.positions.transforms import contiguous
from longforge.stages.base import RunPlan
from longforge.stages.training import TrainingStage
from longforge.train.batches import Batch

MIN_RETRIEVAL_TOKENS = 24
MIN_TEXT_TOKENS = 64


@dataclass(frozen=True)
class BaseSettings:
    """Shape and pretraining schedule of the demo base model."""

    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    window: int
    rope_theta: float
    steps: int
    micro_batch: int
    lr: float
    warmup_steps: int
    retrieval_share: float
    curriculum_steps: int
    answer_weight: float
    task_share: float = 0.0  # share of retrieval slots filled from a pool of other task documents (the lab's RULER formats)


def curriculum_max(step: int, s: BaseSettings) -> int:
    """Longest retrieval document at `step`: grows linearly from 48 tokens to the window (short first is what makes retrieval emerge quickly)."""
    top = s.window - 8
    if s.curriculum_steps <= 0:
        return top
    return int(min(top, 48 + (top - 48) * step / s.curriculum_steps))


@dataclass
class PretrainBatches:
    """Packed rows of code chunks and retrieval documents, document-masked; a pure function of (seed, step, micro)."""

    corpus: np.ndarray
    docs: RetrievalDocs
    settings: BaseSettings
    seed: int
    pool: list[RetrievalDoc] | None = None  # sorted by length, so the curriculum can cap it with a bisect

    def __post_init__(self) -> None:
        self._pool_lengths = [len(d.ids) for d in self.pool or []]

    def _retrieval(self, rng: np.random.Generator, step: int) -> RetrievalDoc:
        """A passkey document, or a pool document no longer than the curriculum allows."""
        s = self.settings
        hi = curriculum_max(step, s)
        if self.pool and rng.random() < s.task_share:
            # Pool documents cannot be shorter than their task's minimum, so the cap never drops below the shortest.
            n = max(bisect.bisect_right(self._pool_lengths, hi), 1)
            return self.pool[int(rng.integers(0, n))]
        return self.docs.make(int(rng.integers(MIN_RETRIEVAL_TOKENS, hi + 1)), rng, "noise" if rng.random() < 0.5 else "text")

    def _row(self, rng: np.random.Generator, step: int) -> tuple[list[int], list[int], np.ndarray, list[float]]:
        s = self.settings
        ids: list[int] = []
        docs: list[int] = []
        w: list[float] = []
        k = 0
        while len(ids) < s.window:
            if rng.random() < s.retrieval_share:
                d = self._retrieval(rng, step)
                weights = [1.0] * len(d.ids)
                for j in range(*d.answer):
                    weights[j] = s.answer_weight
                toks = d.ids
            else:
                n = int(rng.integers(MIN_TEXT_TOKENS, s.window + 1))
                start = int(rng.integers(0, len(self.corpus) - n))
                toks = self.corpus[start : start + n].tolist()
                weights = [1.0] * n
            ids += toks
            docs += [k] * len(toks)
            w += weights
            k += 1
        n = s.window
        return ids[:n], docs[:n], contiguous(np.asarray(docs[:n]), restart=True), w[:n]

    def batch(self, step: int, micro: int) -> Batch:
        """Micro-batch `micro` of `step`."""
        rng = np.random.default_rng([self.seed, step, micro])
        rows = [self._row(rng, step) for _ in range(self.settings.micro_batch)]
        cols = list(zip(*rows))
        return Batch(torch.tensor(cols[0]), torch.tensor(cols[1]), torch.from_numpy(np.stack(cols[2])), torch.tensor(cols[3]))


def make_base_model(s: BaseSettings, vocab_size: int, seed: int) -> Any:
    """A fresh Llama-architecture model with the demo's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=int(s.hidden_size * 8 / 3) // 32 * 32,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=s.window,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


@dataclass
class BaseModelStage(TrainingStage):
    """The demo's (and the lab's) base model: a fresh small Llama pretrained at its window on generated batches, by
    the same training assembly as every training stage; the checkpoint lands in folder/final."""

    spec: StageSpec
    folder: Path
    settings: BaseSettings
    tokenizer: Any
    tokenizer_dir: Path
    corpus: np.ndarray
    pool: list[RetrievalDoc] | None = None
    title: str = "base model"
    label: str = "base model"

    def model_path(self) -> Path:
        return self.tokenizer_dir  # a fresh model: the exported checkpoint takes this tokenizer

    def load(self, plan: RunPlan) -> Any:
        return make_base_model(self.settings, len(self.tokenizer), plan.seed)

    def batches(self, plan: RunPlan, layout: Any) -> PretrainBatches:
        pool = sorted(self.pool, key=lambda d: len(d.ids)) if self.pool else None
        return PretrainBatches(self.corpus, RetrievalDocs(self.tokenizer, self.corpus), self.settings, plan.seed, pool)


def pretrain_base(s: BaseSettings, tokenizer: Any, tokenizer_dir: Path, corpus: np.ndarray, out: Path,
                  device: torch.device, seed: int, pool: list[RetrievalDoc] | None = None) -> dict[str, Any]:
    """Pretrain the base model at its window; resumable; returns the stage's record (the checkpoint in out/final)."""
    spec = StageSpec(name="base", steps=s.steps, batch_size=s.micro_batch, lr=s.lr, warmup_steps=s.warmup_steps,
                     schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, clip_grad=1.0, document_mask=True,
                     save_every=max(s.steps // 4, 1))
    stage = BaseModelStage(spec, out, s, tokenizer, tokenizer_dir, corpus, pool)
    return stage.run(RunPlan(device=device.type, seed=seed))
