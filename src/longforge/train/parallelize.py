"""Model preparation for training (torchtitan's "parallelize"): small steps applied in order to a loaded model.

    parallelize(model, spec, layout, seq_len) -> TrainingModel
      check_model          the layout fits the model and the sequence (Ulysses or ring); resident_layers fits
      apply_attention      longforge attention, its back-end and sequence-parallel group (and kind) bound to the layers
      apply_precision      bf16 weights (precision: bf16)
      apply_checkpointing  recompute each decoder layer in backward
      apply_fusion         fused SwiGLU, RoPE and RMSNorm kernels (before tiling: the tiles call the fused MLP)
      apply_tiling         the MLP in tiles along the sequence
      apply_lean_norms     RMSNorms that keep no fp32 copy (when not fused)
      apply_sharding       the loss-computing wrapper, sharded with FSDP2 over every process
      activation_offload   saved activations of the non-resident layers in host memory

The layout is the one source of the process's rank, device and sequence-parallel degree.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any

import torch

from longforge.config import StageSpec
from longforge.errors import LongforgeError
from longforge.model.attention import AttentionContext, resolve_backend, use_longforge_attention
from longforge.model.fused import apply_fused_ops, fused_available
from longforge.model.loss import LossModel, chunked_lm_loss, decoder_hidden
from longforge.model.memory import ActivationOffload, apply_lean_norms, apply_tiled_mlp
from longforge.model.memory import apply_checkpointing as checkpoint_layers
from longforge.model.parallel import Layout, apply_fsdp, check_layout
from longforge.train.batches import Batch, targets


@dataclass
class TrainingModel:
    """A model made ready for one training layout: its loss wrapper (maybe sharded), autocast and activation offload."""

    net: LossModel
    layout: Layout
    spec: StageSpec
    attention: AttentionContext
    seq_len: int
    autocast: bool = False
    offload: ActivationOffload | None = None

    @property
    def backend(self) -> str:
        """The attention back-end the layers run."""
        return self.attention.backend

    def micro_loss(self, batch: Batch, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Summed loss of this process's slice of one micro-batch."""
        ids, pos = batch.input_ids, batch.position_ids
        sp = self.attention.sp
        if sp is not None:
            # Every rank of a sequence-parallel group holds the same rows; each keeps its part of the sequence (a
            # slice for Ulysses, two zigzag chunks for ring attention). Labels and weights were made on whole rows
            # and follow the same permutation; the loss is a sum over tokens, so nothing is put back in order.
            ids, pos, labels, weights = (sp.shard(t) for t in (ids, pos, labels, weights))
        # Attention sees the whole sequence (Ulysses gathers it; ring attention masks each block from the rows'
        # document ids), so it takes the full-sequence document ids.
        docs = batch.doc_ids if self.spec.document_mask else None
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)
        offload = self.offload() if self.offload is not None else contextlib.nullcontext()
        with offload, amp:
            return self.net(ids, pos, labels, weights, docs)


def resolve_precision(spec: StageSpec, device: torch.device) -> str:
    """fp32 on CPU, bf16 with fp32 master weights on CUDA, unless the spec says otherwise."""
    if spec.precision != "auto":
        return spec.precision
    return "bf16-mixed" if device.type == "cuda" else "fp32"


def check_model(model: Any, spec: StageSpec, layout: Layout, seq_len: int) -> str:
    """The sequence-parallel kind the layout runs (Ulysses where the heads allow it, else ring attention), refusing
    what cannot run: a sequence its kind cannot cut evenly, or more resident layers than the model has."""
    kind = check_layout(model.config, seq_len, layout.sp, spec.sequence_parallel)
    n_layers = len(model.model.layers)
    if spec.resident_layers > n_layers:
        raise LongforgeError(f"resident_layers {spec.resident_layers} is more than the model's {n_layers} layers; "
                             f"use at most {n_layers} (all of them means nothing is offloaded).")
    return kind


def apply_attention(model: Any, backend: str, layout: Layout, kind: str = "ulysses") -> AttentionContext:
    """Switch to longforge attention with the back-end and the layout's sequence-parallel group (of `kind`, Ulysses
    or ring) bound to every layer."""
    sp = layout.sequence_parallel
    context = AttentionContext(backend=backend, sp=replace(sp, kind=kind) if sp is not None else None)
    if use_longforge_attention(model, context) == 0 and layout.sp > 1:
        raise LongforgeError(f"{type(model).__name__} has no attention layers longforge can reach, so it cannot run "
                             "sequence parallelism; train it with sp: 1.")
    return context


def apply_precision(model: Any, precision: str) -> None:
    """bf16 weights for precision bf16 (bf16-mixed keeps fp32 weights under autocast or FSDP's policy)."""
    if precision == "bf16":
        model.to(torch.bfloat16)


def apply_checkpointing(model: Any, spec: StageSpec, device: torch.device) -> None:
    """Activation checkpointing when on, or when auto on CUDA (where memory, not compute, bounds the length)."""
    if spec.activation_checkpointing == "on" or (spec.activation_checkpointing == "auto" and device.type == "cuda"):
        checkpoint_layers(model, spec.checkpoint_policy)


def apply_fusion(model: Any, spec: StageSpec, device: torch.device) -> bool:
    """Fused kernels when on, or when auto where Triton can build them; whether they were applied."""
    fused = spec.fused_ops == "on" or (spec.fused_ops == "auto" and fused_available(device))
    if fused:
        apply_fused_ops(model, norms=spec.lean_norm)
    return fused


def apply_tiling(model: Any, spec: StageSpec) -> None:
    """The MLP computed in tiles of spec.mlp_tile tokens (0: whole)."""
    if spec.mlp_tile:
        apply_tiled_mlp(model, spec.mlp_tile)


def apply_sharding(model: Any, layout: Layout, precision: str) -> LossModel:
    """The loss-computing wrapper on the layout's device, each decoder layer and then the root sharded by FSDP2
    when there are several processes."""
    model.to(layout.device)
    net = LossModel(model)
    if layout.distributed:
        apply_fsdp(net, model.model.layers, layout, torch.bfloat16 if precision == "bf16-mixed" else None)
    net.train()
    return net


def activation_offload(model: Any, spec: StageSpec, layout: Layout) -> ActivationOffload | None:
    """Saved activations of all but spec.resident_layers layers in host memory (CUDA only)."""
    if spec.offload_activations and layout.device.type == "cuda":
        return ActivationOffload(model.model.layers, spec.resident_layers)
    return None


def parallelize(model: Any, spec: StageSpec, layout: Layout, seq_len: int) -> TrainingModel:
    """Every preparation step, in order (see the module's docstring)."""
    kind = check_model(model, spec, layout, seq_len)
    precision = resolve_precision(spec, layout.device)
    attention = apply_attention(model, resolve_backend(spec.attention, layout.device, spec.document_mask,
                                                       precision == "bf16"), layout, kind)
    apply_precision(model, precision)
    apply_checkpointing(model, spec, layout.device)
    fused = apply_fusion(model, spec, layout.device)
    apply_tiling(model, spec)
    if spec.lean_norm and not fused:
        apply_lean_norms(model)
    net = apply_sharding(model, layout, precision)
    offload = activation_offload(model, spec, layout)
    # Without FSDP's mixed-precision policy, bf16-mixed means fp32 weights under bf16 autocast.
    autocast = precision == "bf16-mixed" and not layout.distributed and layout.device.type == "cuda"
    return TrainingModel(net, layout, spec, attention, seq_len, autocast, offload)


def forward_loss(model: Any, batch: Batch, document_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss sum, weight sum) of one micro-batch on a single process: the reference micro_loss must equal."""
    labels, weights = targets(batch)
    hidden = decoder_hidden(model, batch.input_ids, batch.position_ids, batch.doc_ids if document_mask else None)
    return chunked_lm_loss(hidden, model.get_output_embeddings(), labels, weights), weights.sum()
