"""Parallelism on PyTorch's own engine: a device mesh, FSDP2 sharding, and sequence parallelism (Ulysses, or ring
attention where the heads do not divide: model/ring.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from longforge.errors import LongforgeError
from longforge.model.names import SP_KINDS  # noqa: F401 - re-exported


@dataclass
class Layout:
    """Where this process sits: world size and rank, data-parallel and sequence-parallel degrees and groups."""

    world: int
    rank: int
    dp: int
    sp: int
    device: torch.device
    world_mesh: Any = None
    sp_group: Any = None

    @property
    def dp_rank(self) -> int:
        """Index of this process's data-parallel replica (processes of one replica share a batch)."""
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        """Which slice of the sequence this process holds."""
        return self.rank % self.sp

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs, exports and reports."""
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device | str) -> "Layout":
        """One process on `device`: no data or sequence parallelism."""
        return cls(1, 0, 1, 1, torch.device(device))

    def barrier(self) -> None:
        """Wait for every process of the layout (nothing to wait for in one process)."""
        if self.distributed:
            dist.barrier()

    @property
    def sequence_parallel(self) -> "SequenceParallel | None":
        """What attention needs to run Ulysses over this layout's sequence-parallel group (None without one)."""
        return SequenceParallel(self.sp_group, self.sp, rank=self.sp_rank) if self.sp > 1 else None

    def sequence_slice(self, length: int) -> slice:
        """The part of a sequence of `length` tokens this process holds (all of it without sequence parallelism)."""
        n = length // self.sp
        return slice(self.sp_rank * n, (self.sp_rank + 1) * n)


def init_layout(sp: int = 1, device: str = "auto") -> Layout:
    """Start (or join) the process group that torchrun describes and build the mesh for `sp`-way sequence parallelism."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LongforgeError("device 'cuda' was asked for but PyTorch sees no CUDA GPU; use --device cpu.")
    if world == 1:
        if sp != 1:
            raise LongforgeError(f"sequence-parallel degree {sp} needs {sp} processes; launch with `torchrun --nproc-per-node {sp} -m longforge ...`.")
        return Layout.single(device)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world % sp:
        raise LongforgeError(f"{world} processes cannot be split into sequence-parallel groups of {sp}; make the process count a multiple of sp.")
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // sp
    world_mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("world",))
    mesh = init_device_mesh(dev.type, (dp, sp), mesh_dim_names=("dp", "sp"))
    return Layout(world, rank, dp, sp, dev, world_mesh, mesh.get_group("sp") if sp > 1 else None)


def ulysses_refusal(config: Any, sp: int) -> str | None:
    """Why Ulysses cannot split the model's heads over `sp` ranks (None when it can)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % sp:
        return (f"sequence-parallel degree {sp} must divide the {heads} attention heads for Ulysses (it splits heads "
                f"across ranks); use a divisor of {heads}")
    if kv % sp and sp % kv:
        return (f"sequence-parallel degree {sp} must divide the {kv} KV heads or be a multiple of them for Ulysses; "
                f"use a divisor or multiple of {kv}")
    return None


def check_layout(config: Any, seq_len: int, sp: int, kind: str = "auto") -> str:
    """The sequence-parallel kind a layout runs ('none' with one rank per sequence), refusing what cannot run.

    auto runs Ulysses where the degree fits the heads and ring attention otherwise; Ulysses needs the sequence to
    divide by the degree, ring by twice the degree (its balanced zigzag chunks).
    """
    if sp == 1:
        return "none"
    refusal = ulysses_refusal(config, sp)
    if kind == "ulysses" and refusal:
        raise LongforgeError(f"{refusal}, or set sequence_parallel: ring (--sequence-parallel ring), which runs any head count.")
    chosen = "ulysses" if kind == "ulysses" or (kind == "auto" and refusal is None) else "ring"
    if chosen == "ulysses" and seq_len % sp:
        raise LongforgeError(f"sequence length {seq_len} is not divisible by the sequence-parallel degree {sp}; pick a seq_len that is a multiple of {sp}.")
    if chosen == "ring" and seq_len % (2 * sp):
        why = "asked for" if kind == "ring" else f"used because {refusal}"
        raise LongforgeError(f"sequence length {seq_len} is not divisible by {2 * sp}: ring attention ({why}) cuts each "
                             f"sequence into 2 x {sp} chunks so every process does equal causal work; pick a seq_len "
                             f"that is a multiple of {2 * sp}.")
    return chosen


def _a2a(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Autograd-aware all-to-all over the first dimension (chunk p goes to rank p)."""
    from torch.distributed.nn.functional import all_to_all_single

    x = x.contiguous()  # the output buffer must be contiguous too: empty_like keeps a permuted view's strides
    return all_to_all_single(torch.empty_like(x), x, group=group)


def seq_to_heads(x: torch.Tensor, group: Any, p: int) -> torch.Tensor:
    """(B, H, S/p, D) sequence-sharded -> (B, H/p, S, D) head-sharded."""
    b, h, s, d = x.shape
    x = x.reshape(b, p, h // p, s, d).permute(1, 0, 2, 3, 4)
    out = _a2a(x, group)  # (p: source rank = sequence slice, B, H/p, s, D)
    return out.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * s, d)


def heads_to_seq(x: torch.Tensor, group: Any, p: int) -> torch.Tensor:
    """(B, H/p, S, D) head-sharded -> (B, H, S/p, D) sequence-sharded."""
    b, h, n, d = x.shape
    s = n // p
    x = x.reshape(b, h, p, s, d).permute(2, 0, 1, 3, 4)
    out = _a2a(x, group)  # (p: source rank = head group, B, H/p, s, D)
    return out.permute(1, 0, 2, 3, 4).reshape(b, p * h, s, d)


def spread_kv(k: torch.Tensor, p: int) -> torch.Tensor:
    """Repeat KV heads so that every sequence-parallel rank gets at least one (when p > KV heads)."""
    kv = k.shape[1]
    if kv % p == 0:
        return k
    return k.repeat_interleave(p // kv, dim=1)


@dataclass
class SequenceParallel:
    """What the attention function needs to shard a sequence: the group, its size, this rank's place in it and the
    kind (`ulysses`: heads exchanged by all-to-all, contiguous slices; `ring`: keys and values passed around the
    group, zigzag chunks)."""

    group: Any
    size: int
    kind: str = "ulysses"
    rank: int = 0

    def index(self, length: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions of the tokens this rank holds of a `length`-token sequence, in the order it holds them."""
        if self.kind == "ring":
            from longforge.model.ring import zigzag_index

            return zigzag_index(length, self.size, self.rank, device)
        n = length // self.size
        return torch.arange(self.rank * n, (self.rank + 1) * n, device=device)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of x (B, S, ...) along the sequence (a view for Ulysses' contiguous slice)."""
        n = x.shape[1] // self.size
        if self.kind == "ring":
            return x[:, self.index(x.shape[1], x.device)]
        return x[:, self.rank * n : (self.rank + 1) * n]


def apply_fsdp(root: Any, layers: Any, layout: Layout, param_dtype: torch.dtype | None) -> Any:
    """Shard every decoder layer, then the root (embeddings, final norm, LM head), with FSDP2 over all ranks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=layout.world_mesh, mp_policy=mp)
    fully_shard(root, mesh=layout.world_mesh, mp_policy=mp)
    return root


def all_reduce_sum(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Sum a tensor over every process (identity when there is one)."""
    if layout.distributed:
        x = x.clone()
        dist.all_reduce(x)
    return x
