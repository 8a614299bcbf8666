"""A training process for the multi-process tests (importable, so torch.multiprocessing can spawn it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_tiny_model  # noqa: E402
from longforge.config import StageSpec  # noqa: E402
from longforge.train.batches import Batch  # noqa: E402
from test_train import _packed  # noqa: E402

ROWS, SEQ = 4, 24


class ShardedSource:
    """The same 4 rows per step for every layout, split over data-parallel ranks and micro-batches."""

    def __init__(self, dp_rank: int, dp: int, micro: int):
        self.dp_rank, self.dp, self.micro = dp_rank, dp, micro

    def batch(self, step: int, micro: int) -> Batch:
        first = (micro * self.dp + self.dp_rank) * self.micro
        rows = [_packed([9, 6, SEQ - 15], 50, seed=1000 * step + r, counting=True) for r in range(first, first + self.micro)]
        return Batch(*(torch.cat(c) for c in zip(*rows)))


def run(rank: int, world: int, sp: int, kv_heads: int, out: str, port: int) -> None:
    """One process of a layout: train 3 steps and export."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from longforge.model.parallel import init_layout
    from longforge.train.loop import train_model

    layout = init_layout(sp=sp, device="cpu")
    dp = world // sp
    micro = ROWS // (2 * dp)
    spec = StageSpec(steps=3, batch_size=micro, grad_accum=2, lr=3e-3, warmup_steps=1, save_every=2, sp=sp)
    model = make_tiny_model(50, kv_heads=kv_heads)
    train_model(model, ShardedSource(layout.dp_rank, dp, micro), spec, Path(out), layout.device, layout=layout)
    if world > 1:
        torch.distributed.destroy_process_group()
