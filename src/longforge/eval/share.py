"""Evaluation over every process of a torchrun job: each process runs a deterministic share of the work items
(generation batches, perplexity windows) and every process receives all the results.

The prompts are built the same way on every process (same seed), the items are cut the same way, and an item runs
the same computation whichever process runs it, so results match one process exactly (on the same kind of device).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from longforge.errors import LongforgeError


@dataclass(frozen=True)
class Share:
    """This process's place among the processes that evaluate together (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, layout: Any) -> Share:
        """The share of a process layout (longforge.model.parallel.Layout): every process of the job."""
        return cls(layout.rank, layout.world)

    @property
    def main(self) -> bool:
        """True on the process that writes the results."""
        return self.rank == 0

    def mine(self, costs: Sequence[float]) -> list[int]:
        """The items (by index, ascending) this process runs: costliest first, each to the least loaded process.

        Deterministic: ties go to the lower item index and the lower rank, so every process computes the same split.
        """
        if self.world == 1:
            return list(range(len(costs)))
        loads = [(0.0, r) for r in range(self.world)]
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            load, r = heapq.heappop(loads)
            owner[i] = r
            heapq.heappush(loads, (load + costs[i], r))
        return [i for i, r in enumerate(owner) if r == self.rank]

    def collect(self, work: Callable[[], dict[int, Any]]) -> dict[int, Any]:
        """Run this process's `work` (results by item index) and return every process's results merged.

        A failure on any process fails every process: the one that failed raises its own error, the others a
        sentence naming it (instead of waiting for results that never come).
        """
        if self.world == 1:
            return work()
        import torch.distributed as dist

        error: BaseException | None = None
        try:
            done = work()
        except Exception as e:  # shared with the other processes below, then raised here
            done, error = {}, e
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (done, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        merged: dict[int, Any] = {}
        for rank, (results, failed) in enumerate(parts):
            if failed is not None:
                raise LongforgeError(f"evaluation failed on process {rank} of {self.world}: {failed}")
            merged.update(results)
        return merged


SINGLE = Share()
