"""The language-model loss: token-weighted cross-entropy with the LM head computed in chunks (no full logits)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from longforge.model.attention import DOC_IDS

LOSS_CHUNK = 4096


def _ce_chunk(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    return (F.cross_entropy(logits, labels, reduction="none") * w).sum()


def chunked_lm_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, weights: torch.Tensor,
                    chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Weighted sum of token losses, computing the LM head in chunks so the full logits never exist."""
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    w = weights.reshape(-1)
    # The positions that count, found once: each boolean index is a device sync, so one index serves all three.
    keep = (w > 0).nonzero(as_tuple=True)[0]
    h, lab, w = h.index_select(0, keep), lab.index_select(0, keep), w.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    assert getattr(lm_head, "bias", None) is None, "LM heads with a bias are not supported"
    weight = lm_head.weight
    for i in range(0, h.shape[0], chunk):
        part = slice(i, i + chunk)
        if torch.is_grad_enabled():
            # Recompute each chunk's logits in backward instead of keeping them.
            total = total + checkpoint(_ce_chunk, h[part], weight, lab[part], w[part], use_reentrant=False)
        else:
            total = total + _ce_chunk(h[part], weight, lab[part], w[part])
    return total


def decoder_hidden(lm: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                   doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden states (no LM head), attention kept within documents when doc_ids is given."""
    per_call = {DOC_IDS: doc_ids} if doc_ids is not None else {}
    return lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **per_call).last_hidden_state


class LossModel(torch.nn.Module):
    """A causal LM whose forward returns the summed weighted loss (so FSDP gathers the LM head once per step)."""

    def __init__(self, lm: Any):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Summed weighted next-token loss of the given tokens (within documents when doc_ids is given)."""
        hidden = decoder_hidden(self.lm, input_ids, position_ids, doc_ids)
        return chunked_lm_loss(hidden, self.lm.get_output_embeddings(), labels, weights)
