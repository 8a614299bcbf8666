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


def _join(rank: int, world: int, port: int) -> None:
    """Join a gloo group of `world` processes on this machine."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LONGFORGE_QUIET": "1"})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")


def ring_docs(rows: int, seq: int, seed: int) -> torch.Tensor:
    """Document ids of packed rows whose documents cross the zigzag chunks' boundaries (several per row)."""
    g = torch.Generator().manual_seed(seed)
    docs = torch.zeros(rows, seq, dtype=torch.long)
    for r in range(rows):
        for cut in sorted(torch.randint(1, seq, (3,), generator=g).tolist()):
            docs[r, cut:] += 1
    return docs


def ring_check(rank: int, world: int, port: int, heads: int, kv_heads: int) -> None:
    """Ring attention on this rank's zigzag shard equals full attention with a block-diagonal causal mask: the
    output and the gradients of q, k and v, with and without document ids."""
    import torch.nn.functional as F

    from longforge.model.parallel import SequenceParallel
    from longforge.model.ring import ring_attention

    _join(rank, world, port)
    g = torch.Generator().manual_seed(7)
    b, s, d = 2, 8 * world, 8
    q, grad = (torch.randn(b, heads, s, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, kv_heads, s, d, generator=g, dtype=torch.float64) for _ in range(2))
    docs = ring_docs(b, s, 3)
    sp = SequenceParallel(torch.distributed.group.WORLD, world, "ring", rank)
    idx = sp.index(s)
    outs = {}
    for name, doc_ids in (("docs", docs), ("causal", None)):
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        allowed = torch.ones(s, s, dtype=torch.bool).tril()[None]
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
        ref = F.scaled_dot_product_attention(*full, attn_mask=allowed[:, None], scale=0.3, enable_gqa=heads != kv_heads)
        ref.backward(grad)
        mine = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
        out = ring_attention(*mine, doc_ids, sp, 0.3, "plain")
        out.backward(grad[:, :, idx])
        torch.testing.assert_close(out, ref[:, :, idx].detach(), rtol=1e-9, atol=1e-9, msg=f"{name}: output")
        for what, a, r in zip("qkv", mine, full):
            torch.testing.assert_close(a.grad, r.grad[:, :, idx], rtol=1e-9, atol=1e-9, msg=f"{name}: d{what}")
        outs[name] = out.detach()
    # The documents matter here: a ring that ignored them would have matched the causal reference instead.
    assert (outs["docs"] - outs["causal"]).abs().max() > 1e-2
    torch.distributed.destroy_process_group()
