"""Ring attention (sequence parallelism for any head count) on CPU with gloo: exact against one process.

The models have SmolLM2-135M's 9 query / 3 KV heads and Qwen2.5-0.5B's 14 / 2, which Ulysses cannot split over 2
(9 heads), 4 or 8 ranks. Packed documents cross every shard boundary, so a ring that let documents see each other,
lost a block or mixed up the zigzag order would change the loss.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import make_tiny_model
from dist_worker import RING_MODELS, RING_STEPS, ring_check, ring_train
from longforge.errors import LongforgeError
from longforge.model.parallel import SequenceParallel, check_layout
from longforge.model.ring import block_flex, block_plain, zigzag_index


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("sp", "heads", "kv"), [(2, 9, 3), (4, 14, 2)], ids=["sp2-h9kv3", "sp4-h14kv2"])
def test_ring_attention_equals_full_attention_with_document_masks(sp: int, heads: int, kv: int) -> None:
    # In float64 on every rank: output and the gradients of q, k and v against one block-diagonal causal SDPA call,
    # with documents and without (and the two differ, so the document mask is not ignored).
    mp.start_processes(ring_check, args=(sp, _free_port(), heads, kv), nprocs=sp, start_method="spawn")


def test_zigzag_shards_cover_the_sequence_with_equal_causal_work() -> None:
    for p in (2, 3, 4, 8):
        shards = [zigzag_index(16 * p, p, r) for r in range(p)]
        assert sorted(torch.cat(shards).tolist()) == list(range(16 * p))
        # Causal pairs each rank's queries have: position + 1 each; the same on every rank.
        assert len({int((s + 1).sum()) for s in shards}) == 1
        assert all(bool((s[1:] > s[:-1]).all()) for s in shards)  # each rank's tokens stay in order
    sp = SequenceParallel(None, 2, "ring", 1)
    x = torch.arange(8)[None]
    assert sp.shard(x).tolist() == [[2, 3, 4, 5]]
    assert SequenceParallel(None, 2, "ulysses", 1).shard(x).tolist() == [[4, 5, 6, 7]]


def test_the_kind_follows_the_heads() -> None:
    smol = make_tiny_model(50, kv_heads=3, heads=9, hidden=36).config
    qwen = make_tiny_model(50, kv_heads=2, heads=14, hidden=56).config
    assert [check_layout(smol, 48, sp) for sp in (1, 2, 3, 4, 8)] == ["none", "ring", "ulysses", "ring", "ring"]
    assert [check_layout(qwen, 56, sp) for sp in (2, 4, 7, 14)] == ["ulysses", "ring", "ring", "ulysses"]
    assert check_layout(qwen, 56, 2, "ring") == "ring"
    with pytest.raises(LongforgeError, match="must divide the 9 attention heads.*sequence_parallel: ring"):
        check_layout(smol, 48, 2, "ulysses")
    with pytest.raises(LongforgeError, match=r"sequence length 40 is not divisible by 16: ring attention \(used because "
                                             r"sequence-parallel degree 8 must divide the 9 attention heads.*multiple of 16"):
        check_layout(smol, 40, 8)
    with pytest.raises(LongforgeError, match=r"ring attention \(asked for\).*multiple of 12"):
        check_layout(smol, 54, 6, "ring")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_blocks_equal_plain_blocks_on_cpu() -> None:
    """The CUDA kernel's block mask (built from per-block ranges) selects exactly the plain kernel's pairs (forward;
    FlexAttention has no CPU backward: the GPU test below checks gradients)."""
    g = torch.Generator().manual_seed(0)
    b, sq, sk = 2, 200, 300
    q = torch.randn(b, 4, sq, 16, generator=g)
    k, v = (torch.randn(b, 2, sk, 16, generator=g) for _ in range(2))
    q_pos, k_pos = torch.arange(100, 300), torch.arange(300)
    q_docs = torch.randint(0, 3, (b, sq), generator=g).sort(-1).values + 1
    k_docs = torch.cat([torch.zeros(b, 100, dtype=torch.long), q_docs], 1)
    q_docs[1], k_docs[1, :150], k_docs[1, 150:] = 5, 4, 5  # row 1: queries before the first key of their document
    for qd, kd in ((q_docs, k_docs), (None, None)):
        o1, l1 = block_plain(q, k, v, q_pos, k_pos, qd, kd, 0.25)
        o2, l2 = block_flex(q, k, v, q_pos, k_pos, qd, kd, 0.25, compiled=False)
        seen = l1 > -1e29  # rows with no allowed key: weight 0 in the ring's combination either way
        assert (~seen).any() == (qd is not None) and bool((l2[~seen] == -float("inf")).all())
        torch.testing.assert_close(o2[seen], o1[seen], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l2[seen], l1[seen], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_blocks_equal_plain_blocks_with_gradients_on_cuda(dtype: torch.dtype) -> None:
    """Compiled FlexAttention blocks against plain ones on CUDA, gradients through the lse included (the ring's
    combination needs them), with query rows that see no key of the block (their upstream gradients are 0 in the
    ring, as here)."""
    g = torch.Generator().manual_seed(0)
    b, sq, sk = 2, 384, 384
    q = torch.randn(b, 9, sq, 64, generator=g).to("cuda", dtype)
    k, v = (torch.randn(b, 3, sk, 64, generator=g).to("cuda", dtype) for _ in range(2))
    q_pos, k_pos = torch.arange(128, 512, device="cuda"), torch.arange(384, device="cuda")
    q_docs = (q_pos // 100).expand(b, -1).contiguous()  # documents 4 and 5 have no key here
    k_docs = (k_pos // 100).expand(b, -1).contiguous()
    seen = (q_docs < 4)[:, None, :].expand(b, 9, sq)
    go = torch.randn(b, 9, sq, 64, device="cuda") * seen[..., None]
    gl = torch.randn(b, 9, sq, device="cuda") * seen
    results = []
    for fn in (block_plain, block_flex):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        o, l = fn(*ins, q_pos, k_pos, q_docs, k_docs, 0.125)
        ((o * go).sum() + (l * gl).sum()).backward()
        results.append([o[seen], l[seen], *(t.grad.float() for t in ins)])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, want in zip(results[1], results[0]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process: every model with and without document masks."""
    from dist_worker import RingSource, crosses_shards

    for sp in (2, 4, 8):  # the packed documents run across ranks' shards at every degree
        assert all(crosses_shards(RingSource().batch(step, m).doc_ids, sp) for step in range(RING_STEPS) for m in (0, 1))
    out = tmp_path_factory.mktemp("ring-ref")
    ring_train(0, 1, 1, str(out), 0, "auto")
    for name, *_ in RING_MODELS:
        docs, causal = _log(out / f"{name}-docs"), _log(out / f"{name}-causal")
        # The document mask changes the loss by far more than the tolerance: a ring that ignored it would fail.
        assert all(abs(a["loss"] - b["loss"]) > 1e-3 for a, b in zip(docs, causal)), name
    return out


@pytest.mark.parametrize("sp", [2, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_ring_training_matches_one_process(reference: Path, tmp_path: Path, sp: int) -> None:
    # SP 2 forces ring (auto would give the 14-head model Ulysses); at 4 and 8 auto picks ring for both models.
    kind = "ring" if sp == 2 else "auto"
    mp.start_processes(ring_train, args=(sp, sp, str(tmp_path), _free_port(), kind), nprocs=sp, start_method="spawn")
    for name, *_ in RING_MODELS:
        for mask in ("docs", "causal"):
            ref, got = _log(reference / f"{name}-{mask}"), _log(tmp_path / f"{name}-{mask}")
            assert [r["step"] for r in got] == list(range(1, RING_STEPS + 1))
            assert "val_loss" in got[-1] and "val_loss" in ref[-1]  # validation after the last step, ring-sharded too
            assert got[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=1e-5, abs=1e-6), (name, mask)
            for a, b in zip(ref, got):
                assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (name, mask)
                assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (name, mask)
                assert b["tokens"] == a["tokens"]
            wa = load_file(str(reference / f"{name}-{mask}" / "final" / "model.safetensors"))
            wb = load_file(str(tmp_path / f"{name}-{mask}" / "final" / "model.safetensors"))
            # Adam's first steps move every weight by about lr (3e-3) whatever the gradient's size, so a weight
            # whose gradient is near 0 amplifies rounding (blocks combined in another order); a tenth of a step.
            for k in wa:
                torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=3e-4)


def test_what_a_batch_derives_is_never_given_to_the_next_batch() -> None:
    import gc
    import weakref

    from longforge.model.ring import per_batch

    made: list[int] = []

    def derive(t: torch.Tensor) -> int:
        made.append(int(t.sum()))
        return made[-1]

    first = torch.zeros(1, 64, dtype=torch.long)
    assert per_batch("test", first, lambda: derive(first)) == 0
    assert per_batch("test", first, lambda: derive(first)) == 0 and made == [0]  # every layer reuses it
    # The entry keeps its tensor alive, so no later tensor can take its id or its memory and pass for it.
    alive = weakref.ref(first)
    del first
    gc.collect()
    assert alive() is not None
    second = torch.ones(1, 64, dtype=torch.long)
    assert per_batch("test", second, lambda: derive(second)) == 64
    second += 1  # changed in place: made again
    assert per_batch("test", second, lambda: derive(second)) == 128 and made == [0, 64, 128]
    assert per_batch("test", None, lambda: -1, 2) == -1 and per_batch("test", None, lambda: -2, 2) == -1
    assert per_batch("test", None, lambda: -3, 4) == -3  # other extra keys: made again
