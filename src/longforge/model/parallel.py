"""Parallelism on PyTorch's own engine: a device mesh, FSDP2 sharding, and Ulysses sequence parallelism."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from longforge.errors import LongforgeError


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
        return SequenceParallel(self.sp_group, self.sp) if self.sp > 1 else None

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


def check_layout(config: Any, seq_len: int, sp: int) -> None:
    """Refuse layouts Ulysses cannot run: sequence not divisible, degree above or not dividing the heads."""
    if sp == 1:
        return
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if seq_len % sp:
        raise LongforgeError(f"sequence length {seq_len} is not divisible by the sequence-parallel degree {sp}; pick a seq_len that is a multiple of {sp}.")
    if heads % sp:
        raise LongforgeError(f"sequence-parallel degree {sp} must divide the {heads} attention heads (Ulysses splits heads across ranks); use a divisor of {heads}.")
    if kv % sp and sp % kv:
        raise LongforgeError(f"sequence-parallel degree {sp} must divide the {kv} KV heads or be a multiple of them; use a divisor or multiple of {kv}.")


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
    """What the attention function needs to run Ulysses: the group and its size."""

    group: Any
    size: int


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
