"""Batches for training: the tensors one micro-batch needs, built as pure functions of (seed, step)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from longforge.data.store import LoaderPlan, PackedDataset
from longforge.errors import LongforgeError
from longforge.positions.segments import sentence_starts
from longforge.positions.transforms import TRANSFORMS, doc_ids_from_starts, position_ids

IGNORE = -100


@dataclass
class Batch:
    """One micro-batch: tokens, document ids, position ids and optional per-token loss weights."""

    input_ids: torch.Tensor
    doc_ids: torch.Tensor
    position_ids: torch.Tensor
    loss_weights: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        """The same batch on another device."""
        w = None if self.loss_weights is None else self.loss_weights.to(device)
        return Batch(self.input_ids.to(device), self.doc_ids.to(device), self.position_ids.to(device), w)

    @property
    def num_tokens(self) -> int:
        """Tokens in the batch (inputs, not targets)."""
        return int(self.input_ids.numel())


class BatchSource(Protocol):
    """Anything that yields micro-batch `micro` of global step `step`, deterministically."""

    def batch(self, step: int, micro: int) -> Batch: ...


def targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token labels and weights; the first token of every document and the last position are not targets."""
    ids, docs = batch.input_ids, batch.doc_ids
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    new_doc = docs[:, 1:] != docs[:, :-1]
    labels[:, :-1][new_doc] = IGNORE
    weights = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    if batch.loss_weights is None:
        weights[:, :-1] = 1.0
    else:
        weights[:, :-1] = batch.loss_weights[:, 1:].float()
    weights[labels == IGNORE] = 0.0
    return labels, weights


@dataclass
class PackedBatches:
    """Micro-batches from a shard store, sharded over data-parallel ranks, resumable from a saved state.

    `order` is 'shuffle' or 'ssq' (ProLong: each global batch ordered by sum of squared document lengths);
    when None, the order the data was built for (index.json `batch_order`) is used.
    """

    dataset: PackedDataset
    micro_batch: int
    grad_accum: int
    seed: int
    transform: str = "contiguous"
    target_length: int = 0
    document_mask: bool = True
    rank: int = 0
    world: int = 1
    sentence_ends: np.ndarray | None = None  # vocabulary mask of sentence-ending tokens, for 'pit'
    order: str | None = None

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise LongforgeError(f"unknown position transform {self.transform!r}; use one of {', '.join(TRANSFORMS)}.")
        if self.transform == "pit" and self.sentence_ends is None:
            raise LongforgeError("the 'pit' transform needs the tokenizer's sentence ends; pass sentence_ends=sentence_end_mask(tokenizer).")
        if self.transform != "contiguous" and self.target_length and self.target_length < self.dataset.seq_len:
            raise LongforgeError(
                f"transform {self.transform!r} spreads {self.dataset.seq_len}-token sequences over target_length "
                f"{self.target_length}, which is shorter; raise target_length or pack shorter sequences."
            )
        order = self.order or self.dataset.index.get("batch_order", "shuffle")
        if order not in ("shuffle", "ssq"):
            raise LongforgeError(f"batch order {order!r} is not 'shuffle' or 'ssq'; fix `batch_order`.")
        self.order = order
        self.plan = LoaderPlan(len(self.dataset), self.micro_batch * self.grad_accum * self.world, self.seed,
                               costs=self.dataset.costs() if order == "ssq" else None)

    def batch(self, step: int, micro: int) -> Batch:
        """Micro-batch `micro` of step `step` for this rank."""
        mine = self.plan.rank_indices(step, self.rank, self.world)
        rows = mine[micro * self.micro_batch : (micro + 1) * self.micro_batch]
        ids, docs, pos = [], [], []
        for r in rows:
            tokens, starts = self.dataset.get(int(r))
            self._check_ids(int(r), tokens)  # before the ids index anything (the 'pit' mask, the embeddings)
            d = doc_ids_from_starts(starts, len(tokens))
            rng = np.random.default_rng([self.seed, step, int(r)])
            # Sentence boundaries come from the tokens at batch time, so one data build serves every transform.
            seg = sentence_starts(tokens, self.sentence_ends, starts) if self.transform == "pit" else None
            p = position_ids(self.transform, d, self.target_length or len(tokens), rng, self.document_mask, seg)
            ids.append(tokens)
            docs.append(d)
            pos.append(p)
        return Batch(torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(docs)), torch.from_numpy(np.stack(pos)))

    def _check_ids(self, row: int, tokens: np.ndarray) -> None:
        """One sentence, not an IndexError in the embedding, for a token id the data's vocabulary does not have."""
        vocab = self.dataset.vocab_size
        if vocab is None or not len(tokens):
            return
        bad = [int(t) for t in (tokens.max(), tokens.min()) if not 0 <= t < vocab]
        if bad:
            root = self.dataset.root
            raise LongforgeError(f"sequence {row} of {root} holds token id {bad[0]}, outside its vocabulary of {vocab}: "
                                 f"the folder is damaged; run `longforge data verify {root}` and rebuild it.")

    def state_dict(self, step: int) -> dict[str, Any]:
        """What a checkpoint saved before `step` needs to resume reading exactly there (JSON-serialisable)."""
        return {"step": step, "consumed": self.plan.consumed(step), "seed": self.seed, "order": self.order,
                "num_sequences": len(self.dataset), "data": self.dataset.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Continue from a saved state (even with another batch or world size); returns the step to resume at."""
        mine = {"seed": self.seed, "order": self.order, "num_sequences": len(self.dataset), "data": self.dataset.fingerprint()}
        for key, value in mine.items():
            if state.get(key) != value:
                raise LongforgeError(
                    f"the saved loader state has {key}={state.get(key)!r} but this run has {value!r}; "
                    "resume with the data and seed the checkpoint was trained on, or start the stage afresh."
                )
        self.plan = replace(self.plan, start_step=int(state["step"]), start_consumed=int(state["consumed"]))
        return int(state["step"])
