"""Prompts longer than one GPU holds: one prompt's KV cache sharded by sequence over the processes of a job (gloo on
CPU) gives the tokens and logits of one process; where the keys go; when a prompt shards, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from kv_worker import CHUNK, NEW, PROMPTS, model, prompts, sharded
from longforge.config import InferenceSpec
from longforge.errors import LongforgeError
from longforge.inference import Engine
from longforge.inference.kernels import math_with_lse, merge_with_lse
from longforge.inference.sharded import KVGroup, decode_owner, kv_group, shard_sizes
from longforge.model.attention import causal_sdpa
from test_eval_parallel import _free_port, _longforge

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def one_process() -> dict:
    """Tokens and last-position logits of the test prompts on one process (the engine as it is, no group)."""
    engine = Engine(model(), prefill_chunk=CHUNK, stop_on_eos=False)
    rows = prompts()
    with torch.no_grad():
        logits = [engine.model(torch.tensor([r])).logits[0, -1].tolist() for r in rows]
    return {"tokens": engine.generate(rows, NEW), "logits": logits}


@pytest.mark.parametrize("processes", [2, 3])
def test_a_sharded_prompt_gives_the_tokens_and_logits_of_one_process(one_process: dict, tmp_path: Path,
                                                                     processes: int) -> None:
    mp.start_processes(sharded, args=(processes, _free_port(), str(tmp_path)), nprocs=processes, start_method="spawn")
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(processes)]
    for g in got:
        assert g["tokens"] == one_process["tokens"]  # every process returns the same greedy tokens
        assert all(len(t) == NEW for t in g["tokens"])
        for a, b in zip(g["logits"], one_process["logits"]):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
        assert g["last"]["kv_shards"] == processes
        assert g["describe"]["kv_shards"] == processes
    for i, n in enumerate(PROMPTS):
        # Chunk c on process c mod P; each decoded token on the process holding the fewest keys.
        want = shard_sizes(n, CHUNK, processes, 3)
        assert sum(want) == n + 3
        for rank, g in enumerate(got):
            assert g["held"][i]["held"] == want  # every process agrees where every key is
            assert g["held"][i]["buffer_rows"] == want[rank]  # and keeps exactly its own
    assert max(PROMPTS) // CHUNK >= 3 * processes  # several chunks on each process


def test_groups_of_two_among_four_processes_each_shard_a_prompt(one_process: dict, tmp_path: Path) -> None:
    """kv_shards 2 in a job of 4: two groups of two, each with its own process group, the same tokens everywhere."""
    mp.start_processes(sharded, args=(4, _free_port(), str(tmp_path), 2), nprocs=4, start_method="spawn")
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)]
    for g in got:
        assert g["tokens"] == one_process["tokens"] and g["last"]["kv_shards"] == 2
        assert [h["held"] for h in g["held"]] == [shard_sizes(n, CHUNK, 2, 3) for n in PROMPTS]


def test_keys_go_round_robin_by_chunk_then_to_the_process_holding_fewest() -> None:
    assert shard_sizes(100, 16, 2) == [52, 48]  # chunks 0, 2, 4, 6 (the last of 4) and 1, 3, 5
    assert shard_sizes(100, 16, 3) == [36, 32, 32]
    assert shard_sizes(100, 16, 2, new_tokens=5) == [53, 52]  # 4 to process 1 (48 -> 52), then 1 to process 0
    assert shard_sizes(10, 16, 3, new_tokens=2) == [10, 1, 1]  # one chunk: the others get the decoded keys
    assert decode_owner([5, 3, 3]) == 1


def test_attention_merged_from_parts_by_log_sum_exp_is_exact() -> None:
    """The partial results of key subsets (any order, the causal diagonal apart) merge into full causal attention."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g)
    k, v = (torch.randn(2, 2, 30, 8, generator=g) for _ in range(2))
    want = causal_sdpa(q, k, v, None)
    past, own = math_with_lse(q, k[:, :, :23], v[:, :, :23], False, None), math_with_lse(q, k[:, :, 23:], v[:, :, 23:], True, None)
    merged, _ = merge_with_lse(*past, *own)
    assert torch.allclose(merged, want, atol=1e-6)
    a = math_with_lse(q, k[:, :, 10:23], v[:, :, 10:23], False, None)  # the past in two shards
    b = math_with_lse(q, k[:, :, :10], v[:, :, :10], False, None)
    two, lse = merge_with_lse(*merge_with_lse(*a, *b), *own)
    assert torch.allclose(two, want, atol=1e-6)
    full = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5).masked_fill(
        torch.ones(7, 30, dtype=torch.bool).triu(24), float("-inf"))
    assert torch.allclose(lse[..., 0], torch.logsumexp(full, -1), atol=1e-5)
    square = math_with_lse(q, k[:, :, :7], v[:, :, :7], True, None)[0]
    assert torch.allclose(square, causal_sdpa(q, k[:, :, :7], v[:, :, :7], None), atol=1e-6)


def test_the_exact_path_works_in_key_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import longforge.inference.kernels as kernels

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 5, 8, generator=g)
    k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(2))
    whole = math_with_lse(q, k, v, True, None)
    monkeypatch.setattr(kernels, "LSE_KEY_BLOCK", 20)  # one key per block: rows with no visible key in a block
    blocks = math_with_lse(q, k, v, True, None)
    assert torch.allclose(whole[0], blocks[0], atol=1e-6) and torch.allclose(whole[1], blocks[1], atol=1e-6)
    assert torch.allclose(whole[0], F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                   is_causal=True), atol=1e-6)


def _engine(kv_shards: object, group: KVGroup | None, gib: float) -> Engine:
    """A tiny engine that sizes prompts as if on a GPU with `gib` GiB (the sizing reads no device)."""
    engine = Engine(model(), prefill_chunk=CHUNK, kv_shards=kv_shards, kv_group=group, gpu_memory_gib=gib)
    engine.device = torch.device("cuda")  # only the memory arithmetic runs
    return engine


def test_auto_shards_only_a_prompt_that_does_not_fit_one_gpu() -> None:
    probe = _engine("auto", KVGroup(0, 2), 1.0)
    per_token = probe._kv_bytes_per_token()
    weights = probe._weights_bytes()
    # Room for the weights, a chunk's work and about 10,000 positions: a 5,000-token prompt fits, 15,000 do not.
    gib = (weights + probe._work_bytes(CHUNK, 1) + 10_000 * per_token) / 2**30
    auto = _engine("auto", KVGroup(0, 2), gib)
    assert auto.kv_shards_for([5000], 10) == 1
    assert auto.kv_shards_for([15_000], 10) == 2  # half of it on each of 2 processes
    with pytest.raises(LongforgeError) as e:  # too long even over 2 processes
        auto.kv_shards_for([30_000], 10)
    msg = str(e.value)
    assert "30,000 tokens" in msg and "sharded over 2 processes" in msg and "GiB" in msg
    assert "more processes" in msg and "kv_cache: cpu" in msg and "shorter lengths" in msg
    assert _engine("auto", None, gib).kv_shards_for([15_000], 10) == 1  # one process: offloaded as before
    host = _engine("auto", KVGroup(0, 2), gib)
    host.kv_cache = "cpu"
    assert host.kv_shards_for([15_000], 10) == 1  # the cache asked for host memory
    forced = _engine(2, KVGroup(0, 2), gib)
    assert forced.kv_shards_for([50], 10) == 2  # an explicit count shards every prompt
    cpu = Engine(model(), prefill_chunk=CHUNK, kv_group=KVGroup(0, 2))
    assert cpu.kv_shards_for([10**6], 10) == 1  # auto on a CPU: no device memory to run out of


def test_kv_shards_setting_and_groups() -> None:
    assert InferenceSpec().kv_shards == "auto"
    assert InferenceSpec.model_validate({"kv_shards": "3"}).kv_shards == 3
    for bad in (0, "two", 1.5, True):
        with pytest.raises(ValueError, match="kv_shards must be 'auto' or a whole number"):
            InferenceSpec.model_validate({"kv_shards": bad})
    assert kv_group("auto", 0, 1) is None and kv_group(1, 1, 4) is None
    assert kv_group("auto", 2, 3) == KVGroup(2, 3)
    assert kv_group(3, 1, 3) == KVGroup(1, 3)
    with pytest.raises(LongforgeError, match="kv_shards 2 shards each prompt over 2 processes, but this job has 3"):
        kv_group(2, 0, 3)
    with pytest.raises(LongforgeError, match="this job has 1"):
        kv_group(2, 0, 1)


def test_an_explicit_count_needs_the_engines_attention() -> None:
    engine = Engine(model(), prefill_chunk=CHUNK, kv_shards=2, kv_group=KVGroup(0, 2), attention="hf")
    with pytest.raises(LongforgeError, match="kv_shards 2 needs the engine's own attention"):
        engine.kv_shards_for([100], 4)
    assert Engine(model(), attention="hf", kv_group=KVGroup(0, 2)).kv_shards_for([100], 4) == 1


def test_eval_under_torchrun_with_sharded_prompts_writes_what_one_process_writes(model_dir: Path, tmp_path: Path) -> None:
    args = ["eval", str(model_dir), "--device", "cpu", "--target-length", "256", "--tasks", "passkey",
            "--lengths", "150,230", "--depths", "2", "--prefill-chunk", "32"]
    _longforge(1, [*args, "--out", str(tmp_path / "one")])
    _longforge(2, [*args, "--out", str(tmp_path / "two"), "--kv-shards", "2"])
    one, two = (json.loads((tmp_path / side / "passkey.json").read_text()) for side in ("one", "two"))
    # Every sample and score is one process's; the engine record says which prompts ran sharded, and nothing else.
    shards = two["engine"].pop("sharded_prompts")
    assert (one["engine"].pop("kv_shards"), two["engine"].pop("kv_shards")) == ("auto", 2)
    assert one == two and len(one["samples"]) == 4
    assert shards["processes_per_prompt"] == 2 and shards["prompt_tokens"] == sorted(s["prompt_tokens"] for s in one["samples"])
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["engine"]["sharded_prompts"] == shards and summary["processes"] == 2
    assert "sharded_prompts" not in json.loads((tmp_path / "one" / "summary.json").read_text())["engine"]


def test_a_count_no_job_can_meet_is_refused_before_any_work(model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from longforge.cli import app

    res = CliRunner().invoke(app, ["eval", str(model_dir), "--out", str(tmp_path / "e"), "--device", "cpu",
                                   "--target-length", "256", "--kv-shards", "2"])
    assert isinstance(res.exception, LongforgeError)  # `longforge` prints it as one line and exits 2
    assert "kv_shards 2 shards each prompt over 2 processes, but this job has 1" in str(res.exception)
    assert not (tmp_path / "e").exists()


def test_the_longest_prompt_is_known_before_any_work() -> None:
    """evaluate() sizes the longest prompt of the generation tasks before the first one runs."""
    from longforge.config import EvalSpec
    from longforge.eval.run import longest_prompt

    spec = EvalSpec.model_validate({"passkey": {"lengths": [1000, 5000]}, "ruler": {"lengths": [4096, 8192]}})
    assert longest_prompt(spec, 2048, 4096) == 8192
    assert longest_prompt(EvalSpec.model_validate({"niah": {}, "passkey": None}), 2048, 65536) == 65536
    assert longest_prompt(EvalSpec.model_validate({"passkey": None}), 2048, 4096) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("queries,keys,causal", [(1024, 1024, True), (1024, 5000, False), (100, 3000, False),
                                                 (1, 7000, False)], ids=["cudnn-causal", "cudnn-past", "flash", "decode"])
def test_attention_with_log_sum_exp_on_the_gpu_matches_the_exact_path(queries: int, keys: int, causal: bool) -> None:
    """The CUDA kernels behind a shard's attention (cuDNN for chunks, FlashAttention for few queries) give the
    output and log-sum-exp of the fp32 reference, grouped heads as the 8B shape has them."""
    from longforge.inference.kernels import attention_lse

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, queries, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k, v = (torch.randn(1, keys, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2) for _ in range(2))
    out, lse = attention_lse(q, k, v, causal, None)
    want, want_lse = math_with_lse(q, k, v, causal, None)
    assert out.shape == want.shape and lse.shape == want_lse.shape
    assert (out - want).abs().max() <= 2e-2 * want.abs().max()
    assert (lse - want_lse).abs().max() <= 2e-2
