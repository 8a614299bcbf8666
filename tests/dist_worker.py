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

    def __init__(self, dp_rank: int, dp: int, micro: int, seed: int = 0):
        self.dp_rank, self.dp, self.micro, self.seed = dp_rank, dp, micro, seed

    def batch(self, step: int, micro: int) -> Batch:
        first = (micro * self.dp + self.dp_rank) * self.micro
        rows = [_packed([9, 6, SEQ - 15], 50, seed=self.seed + 1000 * step + r, counting=True)
                for r in range(first, first + self.micro)]
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
    spec = StageSpec(steps=3, batch_size=micro, grad_accum=2, lr=3e-3, warmup_steps=1, save_every=2, sp=sp,
                     val_every=2, val_batches=2)
    model = make_tiny_model(50, kv_heads=kv_heads)
    # Held-out rows (other seeds): a validation global batch is micro-batch 0 of a step, half the rows, on every layout.
    held = ShardedSource(layout.dp_rank, dp, micro, seed=500_000)
    train_model(model, ShardedSource(layout.dp_rank, dp, micro), spec, Path(out), layout.device, layout=layout,
                validation=held)
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


def crosses_shards(docs: torch.Tensor, sp: int) -> bool:
    """Whether some document runs across a boundary between two ranks' zigzag chunks (chunk j-1 and j, j odd or
    even: every boundary separates two ranks' chunks except the middle one, which rank sp-1 holds both sides of)."""
    c = docs.shape[1] // (2 * sp)
    cuts = [j * c for j in range(1, 2 * sp) if j != sp]
    return any(bool((docs[:, x - 1] == docs[:, x]).any()) for x in cuts)


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
    assert crosses_shards(docs, world)
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


RING_SEQ, RING_STEPS = 48, 2  # 48 tokens cut into 2 x SP chunks for SP 2, 4 and 8
# (name, query heads, KV heads, hidden size): SmolLM2-135M's and Qwen2.5-0.5B's head counts, head_dim 4.
RING_MODELS = (("h9kv3", 9, 3, 36), ("h14kv2", 14, 2, 56))


class RingSource:
    """The same 4 packed rows per step for every layout (documents crossing every shard boundary, positions
    restarting per document), as 2 micro-batches of 2 rows."""

    def __init__(self, seed: int = 0):
        self.seed = seed  # another seed: held-out rows for validation

    def batch(self, step: int, micro: int) -> Batch:
        rows = range(2 * micro, 2 * micro + 2)
        g = torch.Generator().manual_seed(self.seed + 100 * step + micro)
        ids = torch.randint(1, 50, (2, RING_SEQ), generator=g)
        docs = torch.cat([ring_docs(1, RING_SEQ, self.seed + 1000 * step + r) for r in rows])
        new = torch.ones_like(docs, dtype=torch.bool)
        new[:, 1:] = docs[:, 1:] != docs[:, :-1]
        pos = torch.arange(RING_SEQ).expand(2, -1) - torch.cummax(torch.where(new, torch.arange(RING_SEQ), 0), 1).values
        return Batch(ids, docs, pos)


def ring_train(rank: int, world: int, sp: int, out: str, port: int, kind: str) -> None:
    """Train every model of RING_MODELS with and without document masks (RING_STEPS steps each) into out/<name>-<mask>.

    world 1 is the single-process reference (no process group)."""
    from longforge.model.parallel import Layout, init_layout
    from longforge.train.loop import train_model

    if world > 1:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LONGFORGE_QUIET": "1"})
        torch.set_num_threads(1)
        layout = init_layout(sp=sp, device="cpu")
    else:
        layout = Layout.single("cpu")
    for name, heads, kv, hidden in RING_MODELS:
        for mask in (True, False):
            spec = StageSpec(steps=RING_STEPS, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=1,
                             save_every=RING_STEPS, sp=sp, document_mask=mask, sequence_parallel=kind, val_batches=2)
            model = make_tiny_model(50, kv_heads=kv, heads=heads, hidden=hidden)
            folder = Path(out) / f"{name}-{'docs' if mask else 'causal'}"
            train_model(model, RingSource(), spec, folder, layout.device, layout=layout, validation=RingSource(50_000))
    if world > 1:
        torch.distributed.destroy_process_group()
