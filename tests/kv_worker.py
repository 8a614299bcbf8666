"""A process of the sharded-KV tests (importable, so torch.multiprocessing can spawn it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

VOCAB = 96
CHUNK = 16
NEW = 10
# Lengths that are not multiples of the chunk, long enough for several chunks on each of 3 processes; two of one
# length (a batch of two rows), and one shorter than a chunk (only process 0 holds keys).
PROMPTS = [203, 157, 157, 11]


def prompts() -> list[list[int]]:
    """The test prompts: seeded random tokens (never token 0, the tiny model's end of sequence)."""
    g = torch.Generator().manual_seed(3)
    out = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in PROMPTS]
    out[2] = out[1][:100] + out[2][100:]  # same length, a different prompt
    return out


def model() -> torch.nn.Module:
    """The tiny Llama of the tests (2 layers, 4 query and 2 KV heads), float32, the same on every process."""
    from conftest import make_tiny_model

    return make_tiny_model(VOCAB, window=256, seed=1)


def sharded(rank: int, world: int, port: int, out: str, shards: int | None = None) -> None:
    """Generate the test prompts with the KV cache sharded over `shards` processes (default: all `world`); record
    tokens, the last position's logits of each prompt, and where the keys went."""
    shards = shards or world
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from longforge.inference import Engine
    from longforge.inference.sharded import ShardedKV, kv_group, shard_sizes

    dist.init_process_group("gloo", rank=rank, world_size=world)
    engine = Engine(model(), prefill_chunk=CHUNK, stop_on_eos=False, kv_shards=shards,
                    kv_group=kv_group(shards, rank, world))
    rows = prompts()
    tokens = engine.generate(rows, NEW)  # ragged: rows of one length run together, sharded
    last = dict(engine.last)
    held = []
    logits = []
    with torch.no_grad():
        for r in rows:
            group = engine.kv_group
            store = ShardedKV(shard_sizes(len(r), CHUNK, shards, 3)[group.rank], group)
            ids = torch.tensor([r])
            with engine._attached(store):
                for start in range(0, len(r), CHUNK):
                    h = engine._run_decoder(ids[:, start:start + CHUNK], start, store)
                logits.append(engine.model.get_output_embeddings()(h[:, -1])[0].tolist())
                store.decode()
                for step in range(3):  # three decoded tokens: each kept by the process holding the fewest keys
                    engine._run_decoder(torch.tensor([[r[step]]]), len(r) + step, store)
            held.append({"held": store.held, "buffer_rows": int(store.k[0].shape[1])})
    Path(out, f"{rank}.json").write_text(json.dumps({"tokens": tokens, "logits": logits, "held": held, "last": last,
                                                     "describe": engine.describe()}))
    dist.barrier()  # no process leaves while another still talks to it (gloo can abort at exit otherwise)
    dist.destroy_process_group()
    # gloo's threads can still abort the interpreter's teardown ("terminate called without an active exception")
    # after everything above is written and checked; leave without running it.
    os._exit(0)
