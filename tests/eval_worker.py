"""A process of the multi-process evaluation tests (importable, so torch.multiprocessing can spawn it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def _leave() -> None:
    """Leave the group together, then skip the interpreter's teardown: gloo's threads can abort it after the results
    are written (seen as SIGABRT, "terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def failing(rank: int, world: int, port: int, out: str) -> None:
    """Process 1 fails in its share of the work; every process writes what it raised."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from longforge.eval.share import Share

    dist.init_process_group("gloo", rank=rank, world_size=world)

    def work() -> dict[int, int]:
        if rank == 1:
            raise ValueError("out of memory, say")
        return {rank: rank}

    try:
        Share(rank, world).collect(work)
        got = "no error"
    except Exception as e:  # what each process raised is the test's subject
        got = f"{type(e).__name__}: {e}"
    Path(out, f"{rank}.json").write_text(json.dumps(got))
    _leave()


def passkey_share(rank: int, world: int, port: int, tokenizer_dir: str, out: str) -> None:
    """Run a passkey grid with an oracle on this process's share; write the samples and the prompts it was given."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from longforge.eval.passkey import run_passkey
    from longforge.eval.share import Share
    from longforge.hf import load_tokenizer
    from oracles import Oracle, passkey_answer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = load_tokenizer(Path(tokenizer_dir))
    oracle = Oracle(tok, passkey_answer)
    res = run_passkey(oracle, tok, [100, 200, 400], 4, 3, seed=0, batch_size=4, share=Share(rank, world))
    Path(out, f"{rank}.json").write_text(json.dumps({"samples": res["samples"], "rows": sum(n for n, _ in oracle.batches),
                                                     "tokens": sum(sum(r) for r in oracle.lengths)}))
    _leave()
