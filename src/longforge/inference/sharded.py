"""One prompt's keys and values sharded by sequence over the processes of a group (prompts longer than one GPU holds).

Every process of the group holds the whole model and runs every layer on the same hidden states, but keeps only its
shard of the keys and values. Prefill goes chunk by chunk (the engine's `prefill_chunk`): chunk c's keys and values
are kept by process c mod P, which spreads both the memory and the causal work evenly. For a chunk's queries each
process attends its own keys (the earlier chunks it holds without a mask, the chunk itself causally when it holds
it) and returns the output with its log-sum-exp; the partial results are merged exactly across the group (an
all-reduce of the maximum log-sum-exp, then one of the weighted outputs and weights), the merge the split prefill
kernel does inside one process. A decoded token's key and value go to the process holding the fewest (the lowest
rank on a tie), and every process attends its shard the same way. RoPE is applied before keys are stored, so the
order of a shard's keys does not matter except on the causal diagonal, which only the chunk's holder computes.

The holdings are a function of the prompt length, the chunk and the group size (`shard_sizes`), so every process
computes the same plan without talking; the new tokens are broadcast from the group's first process, so every
process takes the same decisions (stop checks, host visits) and the collectives stay in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longforge.errors import LongforgeError
from longforge.inference.kernels import attention_lse, merge_with_lse

KVShards = Any  # "auto" or a number of processes per prompt (config.InferenceSpec.kv_shards)


@dataclass(frozen=True)
class KVGroup:
    """The processes that share one prompt's keys and values: this process's place among them, and the job's groups."""

    rank: int  # this process's index in its group
    size: int  # processes per group
    index: int = 0  # which group this process belongs to
    count: int = 1  # groups in the job
    first: int = 0  # the global rank of the group's first process (new tokens are broadcast from it)
    handle: Any = None  # the torch.distributed group (None: the default group, every process of the job)


def kv_group(setting: KVShards, rank: int, world: int) -> KVGroup | None:
    """The group this process shards long prompts with, or None when prompts never shard.

    'auto': every process of the job (used only for prompts that do not fit one device); N: groups of N consecutive
    ranks (every process creates every group, as torch.distributed requires); 1, or one process: none.
    """
    if setting == "auto":
        return KVGroup(rank, world) if world > 1 else None
    n = int(setting)
    if n == 1:
        return None
    if world % n:
        raise LongforgeError(f"inference.kv_shards {n} shards each prompt over {n} processes, but this job has {world} "
                             f"(not a multiple of {n}); run under `torchrun --nproc-per-node {n}` (or a multiple), or "
                             f"set kv_shards to auto.")
    if n == world:
        return KVGroup(rank, world)
    import torch.distributed as dist

    handles = [dist.new_group(list(range(g * n, g * n + n))) for g in range(world // n)]
    g = rank // n
    return KVGroup(rank % n, n, g, world // n, g * n, handles[g])


def shard_sizes(length: int, chunk: int, size: int, new_tokens: int = 0) -> list[int]:
    """Keys each process of a group holds for a prompt of `length` tokens prefilled in chunks of `chunk`, after
    `new_tokens` decoded tokens (chunk c on process c mod size; a decoded token on the one holding the fewest)."""
    held = [0] * size
    for c, start in enumerate(range(0, length, chunk)):
        held[c % size] += min(chunk, length - start)
    for _ in range(new_tokens):
        held[decode_owner(held)] += 1
    return held


def decode_owner(held: list[int]) -> int:
    """The process that keeps the next decoded token: the one holding the fewest keys (the lowest on a tie)."""
    return min(range(len(held)), key=lambda r: (held[r], r))


def merge_across(out: torch.Tensor, lse: torch.Tensor, group: KVGroup) -> torch.Tensor:
    """Attention over the union of every process's keys from each one's output and log-sum-exp (fp32), exactly.

    A process without keys for these queries gives a zero output with log-sum-exp -inf: weight 0.
    """
    if group.size == 1:
        return out
    import torch.distributed as dist

    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group.handle)
    weight = torch.exp(lse - top)
    packed = torch.cat([out * weight, weight], dim=-1)  # one all-reduce carries outputs and weights
    dist.all_reduce(packed, group=group.handle)
    return packed[..., :-1] / packed[..., -1:]


class ShardedKV:
    """This process's shard of a batch's keys and values (rows x capacity per layer), attention merged over the group.

    Prefill: the engine's chunks in order, chunk c kept here when c mod size is this process's rank. After
    `decode()`, one token per forward, kept by decode_owner. `held` (keys per process) is the same on every process.
    """

    def __init__(self, capacity: int, group: KVGroup):
        self.capacity = capacity  # keys this process holds at most (shard_sizes)
        self.group = group
        self.held = [0] * group.size
        self.length = 0  # positions of the whole sequence so far
        self.chunks = 0
        self.decoding = False
        self.calls = 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    @property
    def owner(self) -> int:
        """The process that keeps the positions of the forward in progress."""
        return decode_owner(self.held) if self.decoding else self.chunks % self.group.size

    def decode(self) -> None:
        """From here on every forward is one decoded token per row."""
        self.decoding = True

    def _buffers(self, layer: int, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            b, hkv, _, d = k.shape
            # Empty memory: only the first held[rank] positions are ever read.
            self.k[layer] = k.new_empty(b, self.capacity, hkv, d)
            self.v[layer] = k.new_empty(b, self.capacity, hkv, d)
        return self.k[layer], self.v[layer]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Keep this forward's k/v for `layer` if this process owns them; attend the shard; merge over the group."""
        self.calls += 1
        kb, vb = self._buffers(layer, k)
        here, m = self.held[self.group.rank], k.shape[2]
        mine = self.owner == self.group.rank
        if mine:
            if here + m > self.capacity:
                raise RuntimeError(f"the KV shard holds {self.capacity} positions; {here + m} were needed")
            kb[:, here:here + m].copy_(k.transpose(1, 2))
            vb[:, here:here + m].copy_(v.transpose(1, 2))
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.decoding:  # every key held here is at or before the new position: no mask
            count = here + (m if mine else 0)
            if count:
                parts.append(attention_lse(q, kb[:, :count].transpose(1, 2), vb[:, :count].transpose(1, 2), False, scale))
        else:
            if here:
                parts.append(attention_lse(q, kb[:, :here].transpose(1, 2), vb[:, :here].transpose(1, 2), False, scale))
            if mine:
                parts.append(attention_lse(q, k, v, True, scale))
        if parts:
            out, lse = parts[0]
            for o, s in parts[1:]:
                out, lse = merge_with_lse(out, lse, o, s)
        else:
            b, h, lq, d = q.shape
            out = q.new_zeros(b, h, lq, d, dtype=torch.float32)
            lse = q.new_full((b, h, lq, 1), float("-inf"), dtype=torch.float32)
        return merge_across(out, lse, self.group).to(q.dtype)

    def commit(self, n: int) -> None:
        """Advance past a forward's positions once every layer has seen them."""
        self.held[self.owner] += n
        self.length += n
        if not self.decoding:
            self.chunks += 1

    def finish(self) -> None:
        """Nothing is in flight: every transfer is a collective that has returned."""
