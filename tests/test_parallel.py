"""Parallel layouts on CPU (gloo): FSDP2 and Ulysses sequence parallelism reproduce a single-process run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import make_tiny_model
from dist_worker import run
from longforge.errors import LongforgeError
from longforge.model.parallel import check_layout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, sp: int, kv_heads: int, out: Path) -> None:
    if world == 1:
        run(0, 1, 1, kv_heads, str(out), 0)
        return
    mp.start_processes(run, args=(world, sp, kv_heads, str(out), _free_port()), nprocs=world, start_method="spawn")


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Single-process runs, one per KV-head count."""
    outs = {}
    for kv in (2, 1):
        outs[kv] = tmp_path_factory.mktemp(f"ref{kv}")
        _launch(1, 1, kv, outs[kv])
    return outs


@pytest.mark.parametrize(("world", "sp", "kv"), [(2, 1, 2), (2, 2, 2), (2, 2, 1)], ids=["fsdp-dp2", "fsdp-sp2", "sp2-kv1"])
def test_layout_matches_single_process(reference: dict[int, Path], tmp_path: Path, world: int, sp: int, kv: int) -> None:
    _launch(world, sp, kv, tmp_path)
    ref, got = _log(reference[kv]), _log(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["step"] for r in got if "val_loss" in r] == [2, 3]  # validation: every 2 steps and after the last
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"]
    wa = load_file(str(reference[kv] / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_bad_layouts_are_refused() -> None:
    cfg = make_tiny_model(50, kv_heads=2).config  # 4 heads, 2 KV heads
    check_layout(cfg, 24, 2)
    with pytest.raises(LongforgeError, match="sequence length 25 is not divisible by the sequence-parallel degree 2"):
        check_layout(cfg, 25, 2)
    with pytest.raises(LongforgeError, match="must divide the 4 attention heads"):
        check_layout(cfg, 24, 3, "ulysses")
    assert check_layout(cfg, 24, 3) == "ring"  # auto: ring attention runs the heads Ulysses cannot split
    with pytest.raises(LongforgeError, match="needs 2 processes"):
        from longforge.model.parallel import init_layout

        init_layout(sp=2)


def test_train_command_under_torchrun(model_dir: Path, corpus_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from longforge.config import DataSpec, SourceSpec
    from longforge.data.build import build_data

    build_data(DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none", token_budget=3000),
               tokenizer_dir, 64, tmp_path / "data")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "longforge", "train", str(model_dir), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "t"),
           "--steps", "2", "--sp", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    log = [json.loads(x) for x in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and log[0]["tokens"] == 2 * 64
    assert (tmp_path / "t" / "final" / "model.safetensors").is_file()


def test_kill_9_then_rerun_reproduces_the_uninterrupted_run(model_dir: Path, corpus_dir: Path, tokenizer_dir: Path,
                                                             tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from longforge.config import DataSpec, SourceSpec
    from longforge.data.build import build_data

    build_data(DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none", token_budget=4000),
               tokenizer_dir, 64, tmp_path / "data")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "longforge", "train", str(model_dir), "--data", str(tmp_path / "data"),
                "--out", str(out), "--steps", "40", "--batch-size", "2", "--lr", "1e-3", "--save-every", "5",
                "--device", "cpu"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(cmd(tmp_path / "straight"), env=env, capture_output=True, timeout=300).returncode == 0
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ck.is_dir() and any(p.name.startswith("step-0000010") for p in ck.iterdir())):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: maybe mid-step, maybe mid-checkpoint
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    assert subprocess.run(cmd(tmp_path / "killed"), env=env, capture_output=True, timeout=300).returncode == 0
    a = [json.loads(x)["loss"] for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert a == b and len(a) == 40
    wa = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
