"""Evaluation over several processes (torchrun, gloo on CPU) gives the samples and scores of one process; prompts of
similar length are batched together for an engine that takes ragged batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
import yaml

from eval_worker import failing, passkey_share
from longforge.eval.grid import batch_plan, length_slack
from longforge.eval.niah import run_niah
from longforge.eval.passkey import run_passkey
from longforge.eval.share import Share
from oracles import Oracle, niah_answer, passkey_answer

pytestmark = pytest.mark.usefixtures("one_thread")

RESULTS = ("passkey.json", "niah.json", "ruler.json", "ppl.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _longforge(processes: int, args: list[str]) -> None:
    """`longforge ARGS` in one process, or under torchrun with `processes` processes, on one CPU thread each."""
    head = [sys.executable, "-m", "longforge"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
        str(_free_port()), "-m", "longforge"]
    res = subprocess.run(head + args, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "LONGFORGE_QUIET": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def _eval_args(model_dir: Path, corpus_dir: Path, out: Path) -> list[str]:
    return ["eval", str(model_dir), "--out", str(out), "--device", "cpu", "--target-length", "256",
            "--tasks", "passkey,niah,ruler,ppl", "--lengths", "160,200,256", "--depths", "3", "--trials", "2",
            "--ruler-tasks", "niah_single_1,niah_multikey_2,fwe", "--ruler-lengths", "520,600", "--samples", "3",
            "--ppl-source", str(corpus_dir / "heldout.jsonl"), "--ppl-lengths", "64,256", "--ppl-stride", "48"]


@pytest.fixture(scope="module")
def one_process(model_dir: Path, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "eval"
    _longforge(1, _eval_args(model_dir, corpus_dir, out))
    return out


@pytest.mark.parametrize("processes", [2, 3])
def test_eval_under_torchrun_writes_what_one_process_writes(one_process: Path, model_dir: Path, corpus_dir: Path,
                                                            tmp_path: Path, processes: int) -> None:
    """Each process generated its share; the files are those of one process, byte for byte (timings aside)."""
    out = tmp_path / "eval"
    _longforge(processes, _eval_args(model_dir, corpus_dir, out))
    for name in RESULTS:
        assert (out / name).read_bytes() == (one_process / name).read_bytes(), name
    ruler = json.loads((out / "ruler.json").read_text())
    assert len(ruler["samples"]) == 3 * 2 * 3 and {s["task"] for s in ruler["samples"]} == {"niah_single_1", "niah_multikey_2", "fwe"}
    a, b = json.loads((one_process / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    assert b.pop("processes") == processes and "processes" not in a
    for s in (a, b):
        del s["seconds"], s["task_seconds"]
    assert a == b
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_process.iterdir())  # rank 0 alone wrote


def test_the_eval_stage_of_a_run_uses_every_process(micro_recipe: dict, model_dir: Path, tmp_path: Path) -> None:
    """`longforge run` under torchrun: the eval stages run on every process (their share each) and match one process."""
    micro_recipe["stages"] = [{"name": "half", "kind": "merge"}]  # no training: the models are exactly the same
    micro_recipe["eval"]["niah"] = {"lengths": [160, 256], "depths": 2, "trials": 2}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(micro_recipe))
    _longforge(1, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "one")])
    _longforge(2, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "two")])
    for model in ("base", "final"):
        for name in ("passkey.json", "niah.json", "ppl.json"):
            one, two = tmp_path / "one" / "eval" / model / name, tmp_path / "two" / "eval" / model / name
            assert two.read_bytes() == one.read_bytes(), (model, name)
        assert json.loads((tmp_path / "two" / "eval" / model / "summary.json").read_text())["processes"] == 2
    assert (tmp_path / "two" / "report" / "report.md").is_file()


def test_each_process_generates_its_share_and_gets_every_sample(tokenizer, tokenizer_dir: Path, tmp_path: Path) -> None:
    """Two processes split the prompts (about half the tokens each) and both return all samples of one process."""
    one = run_passkey(Oracle(tokenizer, passkey_answer), tokenizer, [100, 200, 400], 4, 3, seed=0, batch_size=4)
    mp.start_processes(passkey_share, args=(2, _free_port(), str(tokenizer_dir), str(tmp_path)), nprocs=2, start_method="spawn")
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert got[0]["samples"] == got[1]["samples"] == json.loads(json.dumps(one["samples"]))
    assert got[0]["rows"] + got[1]["rows"] == len(one["samples"]) == 36 and min(g["rows"] for g in got) > 0
    tokens = [g["tokens"] for g in got]
    assert abs(tokens[0] - tokens[1]) <= 4 * 400  # balanced to within one batch


def test_shares_cover_every_item_once_and_balance_the_cost() -> None:
    costs = [float(c) for c in (900, 10, 10, 400, 400, 300, 50, 50, 50, 5, 700, 120)]
    for world in (1, 2, 3, 5):
        shares = [Share(r, world).mine(costs) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(len(costs)))  # every item, once
        assert shares == [Share(r, world).mine(costs) for r in range(world)]  # the same split on every process
        loads = [sum(costs[i] for i in s) for s in shares]
        assert max(loads) - min(loads) <= max(costs)  # greedy by cost: within one item of even
    assert Share(0, 2).mine([]) == [] and Share().mine([3.0, 1.0]) == [0, 1]


def test_a_failure_on_one_process_fails_every_process(tmp_path: Path) -> None:
    """Instead of the others waiting for results that never come, they stop with a sentence naming the process."""
    mp.start_processes(failing, args=(3, _free_port(), str(tmp_path)), nprocs=3, start_method="spawn")
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(3)]
    assert got[1] == "ValueError: out of memory, say"
    assert got[0] == got[2] == "LongforgeError: evaluation failed on process 1 of 3: ValueError: out of memory, say"


def test_batches_hold_prompts_of_similar_length_for_a_ragged_engine() -> None:
    lengths = [100, 101, 100, 99, 200, 203, 211, 100, 64, 64, 65, 1000]
    exact = batch_plan(lengths, 8, 131072, ragged=False)
    assert all(len({lengths[i] for i in b}) == 1 for b in exact)
    ragged = batch_plan(lengths, 8, 131072, ragged=True)
    assert [[lengths[i] for i in b] for b in ragged] == [[64, 64, 65], [99, 100, 100, 100, 101], [200, 203], [211], [1000]]
    assert sorted(i for b in ragged for i in b) == list(range(len(lengths)))
    for b in ragged:
        spread = [lengths[i] for i in b]
        assert max(spread) - min(spread) <= length_slack(min(spread))
    capped = batch_plan([100] * 5 + [102] * 5, 4, 250, ragged=True)  # batch_tokens 250: two prompts of ~100 tokens
    assert [len(b) for b in capped] == [2, 2, 2, 2, 2]


def test_a_grid_runs_in_ragged_batches_with_the_same_results(tokenizer) -> None:
    """A grid's prompts differ by a token or a few within a length: an engine that takes ragged batches gets them
    together instead of in batches of one length each, and every sample is the same."""
    plain, ragged = Oracle(tokenizer, niah_answer), Oracle(tokenizer, niah_answer, ragged=True)
    a = run_niah(plain, tokenizer, [300, 400], 5, 4, seed=0, batch_size=8)
    b = run_niah(ragged, tokenizer, [300, 400], 5, 4, seed=0, batch_size=8)
    assert len({s["prompt_tokens"] for s in a["samples"]}) >= 6  # the trials' offsets move the seams: lengths differ
    assert a["samples"] == b["samples"] and b["summary"]["accuracy"] == 1.0
    assert len(ragged.batches) < len(plain.batches)
    assert any(len(set(rows)) > 1 for rows in ragged.lengths)  # rows of different lengths in one batch
    assert max(n for n, _ in ragged.batches) <= 8 and sum(n for n, _ in ragged.batches) == 40
