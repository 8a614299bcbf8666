"""Every layout of 4 and 8 processes (FSDP2 x Ulysses) reproduces a single-process run, on CPU with gloo.

The multi-GPU runs of issue 9 need 8 GPUs; this shows, on any machine, that the same code splits a model
and its sequences over 8 processes in every way the mesh allows (data-parallel 8, 4x2, 2x4, sequence-parallel 8
with KV heads replicated) and gives the same losses, gradient norms and weights as one process.

  python benchmarks/layouts_cpu.py --out /tmp/layouts        # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ROWS, SEQ, VOCAB, STEPS = 8, 64, 96, 3
LAYOUTS = [(4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (8, 8)]  # (processes, sequence-parallel degree)


def make_model() -> torch.nn.Module:
    """A 2-layer Llama with 8 query heads and 2 KV heads (so degree 8 must replicate KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=SEQ,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


class Rows:
    """The same ROWS packed rows per step for every layout, split over data-parallel ranks."""

    def __init__(self, dp_rank: int, dp: int):
        self.dp_rank, self.micro = dp_rank, ROWS // dp

    def batch(self, step: int, micro: int) -> object:
        """Rows dp_rank*micro .. of this step: three documents each, document ids and restarted positions."""
        from longforge.train.batches import Batch

        rows = []
        for r in range(self.dp_rank * self.micro, (self.dp_rank + 1) * self.micro):
            g = torch.Generator().manual_seed(1000 * step + r)
            ids = torch.randint(1, VOCAB, (1, SEQ), generator=g)
            cuts = sorted(torch.randint(8, SEQ - 8, (2,), generator=g).tolist())
            docs = torch.zeros(1, SEQ, dtype=torch.long)
            docs[:, cuts[0]:] = 1
            docs[:, cuts[1]:] = 2
            pos = torch.cat([torch.arange(n) for n in (cuts[0], cuts[1] - cuts[0], SEQ - cuts[1])])[None]
            rows.append((ids, docs, pos))
        return Batch(*(torch.cat(c) for c in zip(*rows)))


def worker(rank: int, world: int, sp: int, out: str, port: int) -> None:
    """One process of a layout: train STEPS steps and export."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LONGFORGE_QUIET": "1"})
    torch.set_num_threads(1)
    from longforge.config import StageSpec
    from longforge.model.parallel import Layout, init_layout
    from longforge.train.loop import train_model

    layout = init_layout(sp=sp, device="cpu") if world > 1 else Layout.single("cpu")
    spec = StageSpec(steps=STEPS, batch_size=ROWS // layout.dp, grad_accum=1, lr=3e-3, warmup_steps=1,
                     save_every=STEPS, sp=sp)
    train_model(make_model(), Rows(layout.dp_rank, layout.dp), spec, Path(out), layout.device, layout=layout)
    if world > 1:
        torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, sp: int, out: Path) -> float:
    """Run one layout to completion; wall seconds."""
    t0 = time.perf_counter()
    if world == 1:
        worker(0, 1, 1, str(out), 0)
    else:
        mp.start_processes(worker, args=(world, sp, str(out), _port()), nprocs=world, start_method="spawn")
    return time.perf_counter() - t0


def compare(ref: Path, got: Path) -> dict[str, float]:
    """Largest relative loss and grad-norm differences per step (as logged: 6 significant digits), largest weight difference."""
    from safetensors.torch import load_file

    a = [json.loads(x) for x in (ref / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (got / "log.jsonl").read_text().splitlines()]
    if [r["step"] for r in b] != [r["step"] for r in a]:
        raise SystemExit(f"{got}: steps {[r['step'] for r in b]} differ from the reference's")
    wa, wb = load_file(str(ref / "final" / "model.safetensors")), load_file(str(got / "final" / "model.safetensors"))
    return {"loss_rel": max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b)),
            "grad_norm_rel": max(abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"] for x, y in zip(a, b)),
            "weight_abs": max(float((wa[k] - wb[k]).abs().max()) for k in wa),
            "tokens_equal": all(x["tokens"] == y["tokens"] for x, y in zip(a, b))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layouts", default=",".join(f"{w}x{s}" for w, s in LAYOUTS),
                    help="processes x sequence-parallel degree, comma-separated")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ref = args.out / "single"
    launch(1, 1, ref)
    results = []
    for item in args.layouts.split(","):
        world, sp = (int(x) for x in item.split("x"))
        folder = args.out / f"w{world}-sp{sp}"
        seconds = launch(world, sp, folder)
        diff = compare(ref, folder)
        res = {"processes": world, "dp": world // sp, "sp": sp, "fsdp": world, "seconds": round(seconds, 1), **diff}
        results.append(res)
        print(f"{world} processes, dp {world // sp} x sp {sp}: loss rel {diff['loss_rel']:.1e}, grad norm rel "
              f"{diff['grad_norm_rel']:.1e}, weights abs {diff['weight_abs']:.1e}, tokens equal {diff['tokens_equal']} "
              f"({seconds:.0f} s)", flush=True)
    (args.out / "layouts.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
