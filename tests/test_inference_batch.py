"""Batched decoding in the inference engine: ragged batches, host visits every few tokens, shared prefixes computed once,
CUDA graphs (GPU tests). Every row of a batch must get exactly the tokens it gets alone."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_tiny_model
from longforge.inference import Engine
from longforge.inference import kernels as K
from longforge.inference.decode import DecodeState, run_decode
from longforge.inference.prefill import Fill, Share, computed_tokens, prefill_plan, shared_tokens

VOCAB = 60


def _model(seed: int = 0, **kw):  # noqa: ANN003, ANN202
    return make_tiny_model(VOCAB, window=512, seed=seed, **kw)


def _rows(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _grid(haystack: int, depths: list[int], needle: list[int], seed: int = 0) -> list[list[int]]:
    """One haystack with the needle put in at each depth (a passkey grid's prompts at one length), plus a question."""
    hay = torch.randint(1, 50, (haystack,), generator=torch.Generator().manual_seed(seed)).tolist()  # no needle token
    return [hay[:d] + needle + hay[d:] + [7, 8, 9] for d in depths]


def _hf(model, row: list[int], new: int) -> list[int]:  # noqa: ANN001
    out = model.generate(torch.tensor([row]), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(row):].tolist()


def _alone(model, rows: list[list[int]], new: int, **kw) -> list[list[int]]:  # noqa: ANN001, ANN003
    return [Engine(model, stop_on_eos=False, **kw).generate([r], new)[0] for r in rows]


def _cut(tokens: list[int], eos: set[int], stop_at: int | None) -> list[int]:
    """What token-by-token checking gives: up to the first EOS (dropped), or through the stop callback's token."""
    out = []
    for t in tokens:
        if t in eos:
            break
        out.append(t)
        if stop_at is not None and len(out) == stop_at:
            break
    return out


def test_ragged_batch_equals_each_row_alone_across_chunk_boundaries(one_thread) -> None:  # noqa: ANN001
    model = _model()
    rows = _rows([5, 37, 40, 40, 63, 1, 22])
    for chunk in (7, 16, 1000):
        eng = Engine(model, prefill_chunk=chunk, stop_on_eos=False)
        got = eng.generate(rows, 9)
        assert got == _alone(model, rows, 9, prefill_chunk=chunk), chunk
        assert eng.last["batch"] == 7 and eng.last["prompt_tokens"] == sum(map(len, rows))
    assert got == [_hf(model, r, 9) for r in rows]  # and what transformers generates, row by row
    assert model.config._attn_implementation == "sdpa"  # the engine puts the model's attention back


def test_equal_length_tensor_and_the_old_engine_give_the_same_tokens(one_thread) -> None:  # noqa: ANN001
    model = _model(seed=1)
    x = torch.randint(1, VOCAB, (3, 30), generator=torch.Generator().manual_seed(3))
    new = Engine(model, prefill_chunk=8, stop_on_eos=False)
    old = Engine(model, prefill_chunk=8, stop_on_eos=False, ragged=False, cuda_graphs="off", sync_every=1,
                 prefix_reuse=False)
    assert new.ragged and not old.ragged
    assert new.generate(x, 7) == old.generate(x, 7) == [_hf(model, r, 7) for r in x.tolist()]
    assert old.last["host_visits"] == 7 and old.last["decode_steps"] == 6  # a look after every token, as before
    rows = _rows([12, 30, 12, 19], seed=4)
    assert new.generate(rows, 5) == old.generate(rows, 5)
    assert old.last["groups"] == 3 and new.last["batch"] == 4 and "groups" not in new.last


@pytest.mark.parametrize("every", [1, 3, 8, 64])
def test_eos_and_stop_end_rows_where_token_by_token_checks_would(every: int, one_thread) -> None:  # noqa: ANN001
    model = _model(seed=2)
    rows = _rows([9, 25, 25, 31, 14], seed=5)
    full = Engine(model, stop_on_eos=False).generate(rows, 12)
    eos = {full[1][4], full[3][0]}  # row 1 ends at its 5th token, row 3 at once; others wherever these occur
    stop_at = {0: 2, 2: 7}  # the stop callback completes row 0 after 2 tokens, row 2 after 7
    eng = Engine(model, prefill_chunk=10, sync_every=every)
    eng.stop_ids = eos
    calls: list[tuple[int, int]] = []

    def stop(row: int, toks: list[int]) -> bool:
        calls.append((row, len(toks)))
        return stop_at.get(row) == len(toks)

    got = eng.generate(rows, 12, stop=stop)
    assert got == [_cut(f, eos, stop_at.get(i)) for i, f in enumerate(full)]
    # The callback saw each row's tokens one at a time and never a token after the row ended.
    for i, toks in enumerate(got):
        seen = [n for r, n in calls if r == i]
        assert seen == list(range(1, len(toks) + 1))
    steps = eng.last["decode_steps"]
    assert eng.last["host_visits"] == 1 + -(-steps // every)
    assert steps < 11 or every > 1  # with a look every token, decoding stops once every row ended


def test_host_visits_every_k_steps_with_forced_length(one_thread) -> None:  # noqa: ANN001
    model = _model()
    eng = Engine(model, stop_on_eos=False, sync_every=8)
    eng.generate(_rows([10, 20]), 33)
    assert eng.last["decode_steps"] == 32 and eng.last["host_visits"] == 5  # after prefill, then after 8, 16, 24, 32


def test_shared_prefixes_are_computed_once_and_change_nothing(one_thread) -> None:  # noqa: ANN001
    model = _model(seed=3)
    needle = [50, 51, 52, 53]
    rows = _grid(60, [10, 30, 30, 45], needle) + _grid(40, [5, 20], needle, seed=9) + _rows([33], seed=11)
    random.Random(0).shuffle(rows)
    for chunk in (6, 1000):
        plain = Engine(model, prefill_chunk=chunk, stop_on_eos=False, prefix_reuse=False, pad_to=None)
        reuse = Engine(model, prefill_chunk=chunk, stop_on_eos=False, prefix_min=4, pad_to=None)
        assert reuse.generate(rows, 8) == plain.generate(rows, 8) == _alone(model, rows, 8, prefill_chunk=chunk)
        assert plain.last["prefix_saved_tokens"] == 0
        # The 60-token haystack's four prompts (67 tokens) share its first 10 tokens (3 rows copy them), the three
        # deeper ones 20 more (2 copy), and the two at depth 30 are the same prompt: one copies 36 more, all but
        # its last token. The 40-token haystack's two share 5 tokens.
        saved = 3 * 10 + 2 * 20 + 36 + 5
        assert reuse.last["prefix_saved_tokens"] == saved
        assert reuse.last["prefill_tokens"] == reuse.last["prompt_tokens"] - saved
        assert reuse.last["padding_tokens"] == 0
        padded = Engine(model, prefill_chunk=chunk, stop_on_eos=False, prefix_min=4, pad_to=16)
        assert padded.generate(rows, 8) == reuse.generate(rows, 8)
        # Shared parts cut down to multiples of 16: the three deeper rows of the 60-token haystack share 16 tokens
        # (2 copy them), the two same prompts 48 more; nothing else reaches 16 tokens.
        assert padded.last["prefix_saved_tokens"] == 2 * 16 + 48 and padded.last["padding_tokens"] > 0


def test_rows_of_close_lengths_prefill_together_padded(one_thread) -> None:  # noqa: ANN001
    """Padding at the end is exact; a padded row's first new token comes from the chunk holding its last position."""
    model = _model(seed=4)
    rows = _rows([17, 30, 20, 90], seed=8)
    want = _alone(model, rows, 7, prefill_chunk=7)
    eng = Engine(model, prefill_chunk=7, stop_on_eos=False, pad_to=16)
    assert eng.generate(rows, 7) == want
    # 17, 20 and 30 round to 32 (within 16 of 17): one Fill of three rows; 90 rounds to 96 alone.
    assert eng.last["prefill_tokens"] == 3 * 32 + 96 and eng.last["padding_tokens"] == 3 * 32 + 96 - 157
    exact = Engine(model, prefill_chunk=7, stop_on_eos=False, pad_to=None)
    assert exact.generate(rows, 7) == want and exact.last["padding_tokens"] == 0


def test_a_short_shared_prefix_is_not_worth_its_own_pass(one_thread) -> None:  # noqa: ANN001
    model = _model()
    rows = _grid(30, [3, 20], [50, 51])
    eng = Engine(model, stop_on_eos=False, prefix_min=5, pad_to=None)
    eng.generate(rows, 3)
    assert eng.last["prefix_saved_tokens"] == 0  # 3 shared tokens < 5
    eng.prefix_min = 3
    eng.generate(rows, 3)
    assert eng.last["prefix_saved_tokens"] == 3


def test_offloaded_cache_runs_rows_of_equal_length_together(one_thread) -> None:  # noqa: ANN001
    """Ragged batches need the device store; where the cache is offloaded, equal lengths run together instead."""
    from transformers import LlamaForCausalLM

    cfg = _model().config
    cfg.num_hidden_layers = 3
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg).eval()
    rows = _rows([20, 35, 20, 51], seed=2)
    eng = Engine(model, prefill_chunk=9, stop_on_eos=False)
    eng.kv_cache = "auto"  # the engine only offloads from a GPU; force the placement to test the logic
    eng._resident_layers = lambda capacity, batch: 1  # type: ignore[method-assign]
    got = eng.generate(rows, 6, stop=lambda row, toks: row == 3 and len(toks) == 2)
    device_rows = Engine(model, prefill_chunk=9, stop_on_eos=False).generate(rows, 6)
    assert got == device_rows[:3] + [device_rows[3][:2]]
    assert eng.last["groups"] == 3 and "offloaded" in eng.last["ragged_fallback"]
    assert eng.placement == {"kv_layers_on_gpu": 1, "kv_layers_in_host_memory": 2}


def test_a_batch_just_over_the_memory_runs_in_ragged_halves(one_thread) -> None:  # noqa: ANN001
    """When the whole batch's cache does not fit but half of it does, two ragged batches run (shorter prompts, then
    longer), each row still getting its tokens alone; the stop callback sees the caller's row numbers."""
    model = _model(seed=2)
    rows = _rows([20, 35, 21, 51, 8], seed=5)
    eng = Engine(model, prefill_chunk=9, stop_on_eos=False)
    eng.kv_cache = "auto"  # the engine only sizes caches on a GPU; force the placement to test the logic
    n = model.config.num_hidden_layers
    eng._resident_layers = lambda capacity, batch: n if batch <= 3 else 1  # type: ignore[method-assign]
    seen: list[int] = []
    got = eng.generate(rows, 6, stop=lambda row, toks: seen.append(row) or (row == 3 and len(toks) == 2))
    device_rows = Engine(model, prefill_chunk=9, stop_on_eos=False).generate(rows, 6)
    assert got == device_rows[:3] + [device_rows[3][:2], device_rows[4]]
    assert eng.last["groups"] == 2 and "ragged halves" in eng.last["ragged_fallback"] and eng.last["batch"] == 5
    assert eng.last["prompt_tokens"] == sum(map(len, rows)) and set(seen) == set(range(5))
    assert eng.placement == {"kv_layers_on_gpu": n, "kv_layers_in_host_memory": 0}


def _dynamic_model():  # noqa: ANN202
    from transformers import LlamaForCausalLM

    cfg = make_tiny_model(VOCAB, window=32, seed=3).config
    cfg.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharp attention, so a row rotated for another length picks other tokens
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def _dynamic_rows() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    for n in (50, 90, 70):  # the rows the first draws make (as in the check that found the difference)
        torch.randint(1, VOCAB, (n,), generator=g)
    # Inside the 32-token window and past it (where each row's frequencies depend on its own length).
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in [20, 31, 32, 33] + list(range(40, 120, 4))]


def test_dynamic_rope_rows_decode_together_each_rotated_as_generate_rotates_it(monkeypatch: pytest.MonkeyPatch,
                                                                               one_thread) -> None:  # noqa: ANN001
    """Dynamic NTK rotates by each pass's longest position: the engine prefills each prompt in one pass and computes
    every row's frequencies for its own length, so rows of different lengths decode in one batch and each gets what
    transformers' generate gives it alone on a fresh model (chunked, or rotated for the batch's longest row, some
    differed; and generate itself keeps the frequencies grown for the longest prompt it saw)."""
    import copy

    model = _dynamic_model()
    fresh = copy.deepcopy(model)
    rows = _dynamic_rows()
    eng = Engine(model, prefill_chunk=16, stop_on_eos=False)
    assert eng.ragged and "its own length" in eng.describe()["prefill"]
    passes: list[int] = []
    run = eng._run_decoder
    eng._run_decoder = lambda ids, start, store: passes.append(ids.shape[1]) or run(ids, start, store)  # type: ignore[method-assign]
    want = [_hf(copy.deepcopy(fresh), r, 8) for r in rows]
    assert eng.generate(rows, 8) == want
    assert sorted(p for p in passes if p > 1) == sorted(map(len, rows))  # one prefill pass per prompt length
    assert eng.last["batch"] == len(rows) and "groups" not in eng.last and eng.last["prefix_saved_tokens"] == 0
    # Without each row's own frequencies (transformers' rotary module: the batch's longest row), rows differ.
    import contextlib

    import longforge.inference.engine as engine_module

    with monkeypatch.context() as m:
        m.setattr(engine_module, "rows_rotated", lambda model, fn: contextlib.nullcontext())
        assert Engine(copy.deepcopy(fresh), prefill_chunk=16, stop_on_eos=False).generate(rows, 8) != want
    assert eng.generate(rows[10:11], 8) == [_hf(copy.deepcopy(fresh), rows[10], 8)]  # after longer ones: the same
    assert "forward" not in vars(model.model.rotary_emb)  # the model's own rotary module again after generate
    # Equal lengths prefill together, at most PREFILL_BATCH_TOKENS per pass (one pass holds all its activations).
    monkeypatch.setattr(engine_module, "PREFILL_BATCH_TOKENS", 130)
    same = [rows[9], rows[9][::-1], rows[9][1:] + rows[9][:1]]  # three rows of 60 tokens: two passes, 2 + 1 rows
    passes.clear()
    assert eng.generate(same, 8) == [_hf(copy.deepcopy(fresh), r, 8) for r in same]
    assert [p for p in passes if p > 1] == [60, 60]
    # Perplexity windows too: rotated for the window's own length, whatever ran before.
    ids = torch.tensor([rows[7]])
    total, count = eng.window_nll(ids)
    with torch.no_grad():
        ref = copy.deepcopy(fresh)(input_ids=ids, labels=ids).loss.item()
    assert total / count == pytest.approx(ref, rel=1e-5)


def test_dynamic_rope_rows_of_equal_length_when_per_row_frequencies_differ(monkeypatch: pytest.MonkeyPatch,
                                                                          one_thread) -> None:  # noqa: ANN001
    """Where the per-row formula does not equal the model's own rotary module (checked bit for bit at the start),
    rows of equal length run together, each prompt in one pass, as generate runs it."""
    import copy

    import longforge.inference.rope_rows as rope_rows

    real = rope_rows.dynamic_inv_freq
    monkeypatch.setattr(rope_rows, "dynamic_inv_freq", lambda config, lengths: real(config, lengths) * (1 + 1e-6))
    model = _dynamic_model()
    fresh = copy.deepcopy(model)
    rows = _dynamic_rows()[:8]
    eng = Engine(model, prefill_chunk=16, stop_on_eos=False)
    assert eng.row_rope is None and not eng.ragged and "equal length" in eng.describe()["prefill"]
    assert eng.generate(rows, 8) == [_hf(copy.deepcopy(fresh), r, 8) for r in rows]
    assert eng.last["groups"] == len({len(r) for r in rows})


def test_hf_path_takes_ragged_batches(one_thread) -> None:  # noqa: ANN001
    model = _model()
    rows = _rows([8, 15, 8], seed=6)
    hf = Engine(model, prefill_chunk=4, attention="hf", stop_on_eos=False, sync_every=4)
    assert hf.generate(rows, 6) == [_hf(model, r, 6) for r in rows]
    assert hf.last["groups"] == 2


def test_decoding_steps_prepare_no_mask(monkeypatch: pytest.MonkeyPatch, one_thread) -> None:  # noqa: ANN001
    """transformers inspects position ids on the host (a sync) when it prepares a mask; decoding steps skip that."""
    import transformers.masking_utils as mu

    seen: list[int] = []
    real = mu.find_packed_sequence_indices
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda pos: seen.append(pos.shape[1]) or real(pos))
    eng = Engine(_model(), prefill_chunk=100, stop_on_eos=False, pad_to=None)
    eng.generate(_rows([30, 40]), 20)
    assert eng.last["decode_steps"] == 19 and seen == [30, 40]  # the two prefill passes only


def test_fused_decoding_kernels_go_in_while_decoding_and_out_after(monkeypatch: pytest.MonkeyPatch,
                                                                   one_thread) -> None:  # noqa: ANN001
    """The compiled RMSNorm, RoPE and SwiGLU (here not compiled: the identity compiler) only while steps run."""
    import transformers.models.llama.modeling_llama as llama

    import longforge.inference.engine as engine_module
    from longforge.inference.fusion import DecodeKernels

    calls = {phase: {"norm": 0, "rope": 0, "mlp": 0} for phase in ("decode", "prefill")}

    def counting(phase: str, name: str):  # noqa: ANN202
        def compiler(fn):  # noqa: ANN001, ANN202
            def run(*a, **kw):  # noqa: ANN002, ANN003, ANN202
                calls[phase][name] += 1
                return fn(*a, **kw)
            return run
        return compiler

    kernels = {phase: DecodeKernels() for phase in calls}
    for phase, k in kernels.items():
        for name in calls[phase]:
            setattr(k, name, type(getattr(k, name))(getattr(k, name).fn, counting(phase, name)))
    monkeypatch.setattr(engine_module, "decode_kernels", lambda phase="decode", gemm="cublas": kernels[phase])
    model = _model()
    rows = _rows([12, 31, 5], seed=9)
    plain = Engine(model, stop_on_eos=False).generate(rows, 6)
    rope_before = llama.apply_rotary_pos_emb
    eng = Engine(model, stop_on_eos=False)
    eng.fused = True
    assert eng.generate(rows, 6) == plain
    steps = eng.last["decode_steps"]
    # 2 layers: 2 norms each + the final, per forward pass; prefill: one pass per Fill here (each within a chunk)
    assert calls["decode"] == {"norm": steps * 5, "rope": steps * 2, "mlp": steps * 2}
    fills = sum(isinstance(s, Fill) for s in engine_module._Batch.sorted(rows, eng.prefix_min, eng.pad_to).plan)
    assert calls["prefill"] == {"norm": fills * 5, "rope": fills * 2, "mlp": fills * 2}
    assert llama.apply_rotary_pos_emb is rope_before
    assert not any("forward" in vars(m) for m in model.modules())


def test_the_benchmark_runs_on_cpu(tmp_path) -> None:  # noqa: ANN001
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "eval_engine.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "eval_engine.py"), "--smoke", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert [r["length"] for r in res["lengths"]] == [64, 128]
    for r in res["lengths"]:
        assert {"a_old_engine", "b_new_engine", "c_model_generate"} <= set(r) and r["b_calls_equal"]
        assert r["a_old_engine"]["host_visits"] == r["a_old_engine"]["decode_steps"] + r["a_old_engine"]["groups"]
        assert r["b_new_engine"]["groups"] == 1 and r["bound_ms_per_step"] > 0
    assert res["prefix_reuse"][0]["same_tokens"] and res["prefix_reuse"][0]["reuse"]["prefix_saved_tokens"] > 0


def test_the_eval_spec_turns_cuda_graphs_off() -> None:
    from longforge.config import EvalSpec
    from longforge.eval.run import make_engine

    assert make_engine(_model(), EvalSpec()).cuda_graphs == "auto"
    assert make_engine(_model(), EvalSpec(inference={"cuda_graphs": "off"})).cuda_graphs == "off"


def test_bad_prompts_are_refused_in_one_sentence() -> None:
    eng = Engine(_model(), stop_on_eos=False)
    with pytest.raises(ValueError, match="has no tokens"):
        eng.generate([[1, 2], []], 3)
    with pytest.raises(ValueError, match="batch, length"):
        eng.generate(torch.tensor([1, 2, 3]), 3)
    with pytest.raises(ValueError, match="sync_every"):
        Engine(_model(), sync_every=0)
    assert eng.generate([], 3) == [] and eng.generate([[1, 2]], 0) == [[]]


def test_describe_records_the_batching_settings() -> None:
    d = Engine(_model()).describe()
    assert d["ragged"] is True and d["sync_every"] == 8 and d["cuda_graphs"] == "off"  # CPU: no graphs
    assert Engine(_model(), prefix_reuse=False).describe()["prefix_reuse"] is None


# ---- the pieces


def _simulate(plan: list, rows: list[list[int]]) -> list[list[int | None]]:
    """Run a plan on token lists instead of keys and values, checking each Fill starts where its rows are filled."""
    have: list[list[int | None]] = [[None] * len(r) for r in rows]
    for s in plan:
        if isinstance(s, Share):
            for t in s.targets:
                assert rows[t][s.start:s.end] == rows[s.source][s.start:s.end]
                have[t][s.start:s.end] = have[s.source][s.start:s.end]
            continue
        for r in range(s.first, s.last):
            assert None not in have[r][:s.start] and all(x is None for x in have[r][s.start:s.end])
            have[r][s.start:s.end] = rows[r][s.start:s.end]  # a padded row's own positions end before s.end
    return have


@pytest.mark.parametrize("seed", range(20))
def test_prefill_plan_gives_every_row_all_its_positions(seed: int) -> None:
    rng = random.Random(seed)
    stems = [[rng.randint(1, 4) for _ in range(rng.randint(1, 30))] for _ in range(3)]
    rows = []
    for _ in range(rng.randint(1, 9)):
        stem = rng.choice(stems)
        rows.append(stem[:rng.randint(0, len(stem))] + [rng.randint(1, 4) for _ in range(rng.randint(1, 12))])
    rows.sort(key=lambda r: (len(r), r))
    for min_shared in (None, 1, 3):
        for pad_to in (None, 4):
            plan = prefill_plan(rows, min_shared, pad_to)
            assert _simulate(plan, rows) == rows
            # Every row computes its last position itself (its hidden state gives the first new token).
            assert all(any(isinstance(s, Fill) and s.first <= i < s.last and s.start < len(r) <= s.end for s in plan)
                       for i, r in enumerate(rows))
            assert computed_tokens(plan) + shared_tokens(plan) >= sum(map(len, rows))
            if pad_to is None:
                assert computed_tokens(plan) + shared_tokens(plan) == sum(map(len, rows))
            else:
                assert all(s.start % pad_to == 0 and s.end % pad_to == 0 for s in plan)
            if min_shared is None:
                assert shared_tokens(plan) == 0


def test_prefill_plan_batches_rows_of_equal_or_close_length() -> None:
    rows = sorted(_rows([8, 8, 8, 12, 12]), key=lambda r: (len(r), r))
    assert prefill_plan(rows, None) == [Fill(0, 3, 0, 8), Fill(3, 5, 0, 12)]
    assert prefill_plan(rows, 4) == [Fill(0, 3, 0, 8), Fill(3, 5, 0, 12)]  # nothing shared
    assert prefill_plan(rows, None, pad_to=2) == [Fill(0, 3, 0, 8), Fill(3, 5, 0, 12)]  # 12 - 8 > max(2, 8 // 8)
    assert prefill_plan(rows, None, pad_to=8) == [Fill(0, 5, 0, 16)]  # 16 - 8 <= 8
    long = sorted(_rows([1000, 1100, 1130, 1200]), key=len)
    # 1100 pads to 1152, 152 past 1000 (more than 1000 // 8); 1130 and 1200 pad to at most 1216, within 1100 // 8.
    assert prefill_plan(long, None, pad_to=64) == [Fill(0, 1, 0, 1024), Fill(1, 4, 0, 1216)]


def test_decode_loop_equals_token_by_token_checks() -> None:
    script = torch.tensor([[3, 4, 0, 5, 6, 7, 8, 9, 1, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5], [9, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    for every in range(1, 12):
        for stop_row in (None, 1):
            state = DecodeState(3, 10, torch.device("cpu"), {0, 99})
            state.start(script[:, 0])
            col = [1]

            def step() -> None:
                state.record(script[:, col[0]])
                col[0] += 1

            stop = None if stop_row is None else (lambda r, toks: r == stop_row and len(toks) == 4)
            got = run_decode(state, step, 10, stop, every)
            assert got.rows == [[3, 4], [5] * (4 if stop_row else 10), [9]], every
            want_steps = 9 if stop_row is None else min(9, -(-3 // every) * every)
            assert got.steps == want_steps and got.visits == 1 + -(-got.steps // every)


def test_masked_decode_equals_each_row_alone() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, hkv, d, cap = 3, 8, 2, 16, 40
    q = torch.randn(b, 1, h, d, generator=g).transpose(1, 2)
    k, v = (torch.randn(b, cap, hkv, d, generator=g) for _ in range(2))
    used = torch.tensor([1, 17, 40], dtype=torch.int32)
    got = K.decode_attention(q, k, v, used, None)
    for i, n in enumerate(used.tolist()):
        want = K.causal_attention(q[i:i + 1], k[i:i + 1, :n].transpose(1, 2), v[i:i + 1, :n].transpose(1, 2), None)
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-6)


def test_a_decode_kernel_is_used_only_after_it_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(K, "_verdicts", {})
    q = torch.zeros(1, 4, 1, 16)
    k = torch.zeros(1, 8, 2, 16)
    monkeypatch.setitem(K.DECODE_KERNELS, "flash_decode", lambda q, k, v, u, s: K.masked_decode(q, k, v, u, s) + 1)
    assert not K._decode_usable("flash_decode", q, k)
    monkeypatch.setattr(K, "_verdicts", {})
    monkeypatch.setitem(K.DECODE_KERNELS, "flash_decode", K.masked_decode)
    assert K._decode_usable("flash_decode", q, k)


# ---- on a GPU (the lead runs these on an H200)


def _cuda_model(dtype: torch.dtype, hidden: int = 256):  # noqa: ANN202
    return make_tiny_model(VOCAB, window=4096, hidden=hidden).to("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-masked", "bf16-flash"])
def test_cuda_graph_replay_equals_eager_decoding(dtype: torch.dtype) -> None:
    model = _cuda_model(dtype)
    rows = _rows([700, 1300, 64, 1300, 999], seed=1)
    eager = Engine(model, prefill_chunk=512, stop_on_eos=False, cuda_graphs="off")
    graphed = Engine(model, prefill_chunk=512, stop_on_eos=False)
    want = eager.generate(rows, 40)
    got = graphed.generate(rows, 40)
    assert graphed.last["cuda_graph"] and graphed.graph_failure is None, graphed.describe()
    assert got == want
    step = graphed._graphed.step  # type: ignore[union-attr]
    assert graphed.generate(rows[::-1], 40) == want[::-1]  # the same shape: the captured graph replays again
    assert graphed._graphed.step is step  # type: ignore[union-attr]
    if dtype == torch.bfloat16:
        q = torch.zeros(1, 4, 1, 64, device="cuda", dtype=dtype)
        assert K._decode_usable("flash_decode", q, torch.zeros(1, 8, 2, 64, device="cuda", dtype=dtype))


@pytest.mark.gpu
def test_ragged_batch_on_cuda_equals_each_row_alone() -> None:
    model = _cuda_model(torch.float32)
    needle = [50, 51, 52]
    rows = _grid(1500, [100, 900, 900], needle) + _rows([333, 2000], seed=4)
    eng = Engine(model, prefill_chunk=512, stop_on_eos=False, prefix_min=64, pad_to=None)  # prefixes not cut to 256
    eng.worth = None  # share every prefix (a tiny model's would not pay on a GPU): the copies are what is tested
    got = eng.generate(rows, 24)
    assert eng.last["prefix_saved_tokens"] == 2 * 100 + 1405  # all three share 100 tokens, the two at 900 all but one
    assert got == _alone(model, rows, 24, prefill_chunk=512, cuda_graphs="off")


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", ["auto", "off"])
def test_no_host_sync_between_visits(graphs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between host visits the decoding steps only queue work on the GPU (a sync there raises)."""
    import longforge.inference.engine as engine_module

    model = _cuda_model(torch.bfloat16)
    eng = Engine(model, prefill_chunk=512, stop_on_eos=True, cuda_graphs=graphs)  # type: ignore[arg-type]
    warm = eng.generate(_rows([300, 800], seed=2), 20)  # compiles, checks kernels and captures: syncs allowed
    real = engine_module.run_decode
    checked: list[int] = []

    def strict(state, step, *args):  # noqa: ANN001, ANN002, ANN202
        def no_sync() -> None:
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked.append(1)
        return real(state, no_sync, *args)

    monkeypatch.setattr(engine_module, "run_decode", strict)
    again = eng.generate(_rows([300, 800], seed=2), 20)
    assert again == warm and len(checked) == eng.last["decode_steps"] >= 1
    assert eng.last["cuda_graph"] == (graphs == "auto")


def test_a_prefix_is_shared_only_when_worth_it() -> None:
    """The plan asks `worth` before sharing; the GPU rule shares a 16K grid's prefixes for the 8B shape (each saves
    seconds) and none for a 135M shape (each saves less than the forward passes it adds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longforge.inference.engine import share_worth

    rows = _grid(16384, [2300, 4600, 6900, 9200], [7, 8, 9])
    assert shared_tokens(prefill_plan(rows, 512, 256)) > 0
    asked: list[tuple[int, int, int]] = []
    plan = prefill_plan(rows, 512, 256, worth=lambda s, e, n: asked.append((s, e, n)) is not None)
    assert shared_tokens(plan) == 0 and asked and asked[0] == (0, 2048, 3)

    def shape(hidden: int, inter: int, layers: int, heads: int, kv: int) -> LlamaForCausalLM:
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, vocab_size=1000)
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)

    big, small = shape(4096, 14336, 32, 32, 8), shape(576, 1536, 30, 9, 3)
    assert shared_tokens(prefill_plan(rows, 512, 256, share_worth(big))) == shared_tokens(prefill_plan(rows, 512, 256))
    assert shared_tokens(prefill_plan(rows, 512, 256, share_worth(small))) == 0


def test_the_batch_budget_depends_on_the_model_not_on_what_the_allocator_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process of a torchrun job must cut the same batches: the GPU budget comes from the weights' size and the
    memory setting, never from memory_allocated (a cache kept from the last batch differs between processes)."""
    from longforge.inference.engine import CPU_BATCH_TOKENS

    model = _model()
    eng = Engine(model, stop_on_eos=False)
    assert eng.batch_tokens_budget() == CPU_BATCH_TOKENS
    eng.device = torch.device("cuda")
    monkeypatch.setattr(eng, "_budget", lambda: 2.0 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: pytest.fail("read the allocator"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert eng.batch_tokens_budget() == int(0.5 * (2.0 * 2**30 - weights) / eng._kv_bytes_per_token())


def test_a_cache_is_placed_in_what_the_device_has_free_beside_other_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers stay on the GPU only as far as the budget and the device's free memory allow: another process on the
    same GPU (the lab runs several) holds memory that the budget, a share of the whole device, does not see."""
    model = _model()
    eng = Engine(model, stop_on_eos=False)
    eng.device = torch.device("cuda")
    n = model.config.num_hidden_layers
    per_token = eng._kv_bytes_per_token()
    capacity, rows = 1000, 4
    need = rows * capacity * per_token
    work = eng._work_bytes(capacity, rows)
    monkeypatch.setattr(eng, "_budget", lambda: 10 * (need + work))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (2 * (need + work), 80 * 2**30))
    assert eng._resident_layers(capacity, rows) == n  # the device has room: every layer
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (work + need // 2, 80 * 2**30))
    from longforge.inference.kv import resident_layers

    # Others hold the rest: only what fits in half the cache stays (for 2 layers and 2 staging slots, none).
    assert eng._resident_layers(capacity, rows) == resident_layers(n, need // n, need // 2) < n
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: need)  # our own cached blocks count as free
    assert eng._resident_layers(capacity, rows) == n


@pytest.mark.gpu
def test_dynamic_rope_rows_on_cuda_decode_in_a_graph_as_generate_does() -> None:
    """Each row's own frequencies are tensor operations (no host sync): the decoding step is captured and replayed."""
    import copy

    model = _dynamic_model().to("cuda")
    fresh = copy.deepcopy(model)
    rows = _dynamic_rows()
    eng = Engine(model, prefill_chunk=16, stop_on_eos=False)
    got = eng.generate(rows, 8)
    assert eng.last["cuda_graph"] and eng.graph_failure is None, eng.describe()
    want = []
    for r in rows:
        out = copy.deepcopy(fresh).generate(torch.tensor([r], device="cuda"), max_new_tokens=8, min_new_tokens=8,
                                            do_sample=False, pad_token_id=0, eos_token_id=None)
        want.append(out[0, len(r):].tolist())
    assert got == want
