"""Engine pieces: tiled MLP, activation checkpointing, bf16 AdamW with stochastic rounding, FLOP counting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from longforge.config import StageSpec
from longforge.model.attention import cu_seqlens, use_longforge_attention
from longforge.model.memory import apply_checkpointing, apply_tiled_mlp
from longforge.train.flops import attention_context, flops_per_token, matmul_params
from longforge.train.optim import BF16AdamW, stochastic_round_bf16
from test_train import _packed


def _loss_and_grads(model, ids, docs, pos):  # noqa: ANN001, ANN202
    out = model(input_ids=ids, position_ids=pos, lf_doc_ids=docs, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("saver", ["tiled_mlp", "checkpointing"])
def test_memory_savers_change_nothing_numerically(saver: str) -> None:
    ids, docs, pos = _packed([30, 50], 50, seed=1)
    ref_model = make_tiny_model(50, window=128)
    use_longforge_attention(ref_model)
    ref_model.train()
    ref_loss, ref_grads = _loss_and_grads(ref_model, ids, docs, pos)
    model = make_tiny_model(50, window=128)
    use_longforge_attention(model)
    model.train()
    if saver == "tiled_mlp":
        apply_tiled_mlp(model, tile=16)
        assert sorted(model.state_dict()) == sorted(ref_model.state_dict())  # parameter names unchanged
    else:
        apply_checkpointing(model)
    loss, grads = _loss_and_grads(model, ids, docs, pos)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6)


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours() -> None:
    x = torch.full((200_000,), 1.0 + 2**-10)  # between the bf16 neighbours 1.0 and 1.0078125
    r = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    assert r.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    exact = torch.tensor([1.0, -2.5, 0.15625])
    assert torch.equal(stochastic_round_bf16(exact).float(), exact)  # representable values stay put


def test_bf16_adamw_tracks_fp32_adamw() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    ref = torch.nn.Parameter(w.clone())
    low = torch.nn.Parameter(w.clone().to(torch.bfloat16))
    opt_ref = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    opt_low = BF16AdamW([low], lr=1e-2, weight_decay=0.1)
    target = torch.randn(64, 32)
    losses = {}
    for _ in range(100):
        for name, p, o in (("fp32", ref, opt_ref), ("bf16", low, opt_low)):
            o.zero_grad()
            loss = ((p.float() - target) ** 2).mean()
            loss.backward()
            o.step()
            losses[name] = loss.item()
    assert low.dtype == torch.bfloat16 and opt_low.state[low]["exp_avg"].dtype == torch.bfloat16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)  # same optimisation path
    assert (low.float() - ref).abs().mean().item() < 0.01  # no drift beyond bf16 rounding noise


def test_flops_match_the_reference_numbers() -> None:
    from transformers import LlamaConfig

    llama8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256)
    assert matmul_params(llama8b) / 1e9 == pytest.approx(7.5, abs=0.01)
    for seq, gflop in ((65536, 96.6), (131072, 148), (1 << 20, 870)):
        assert flops_per_token(llama8b, seq) / 1e9 == pytest.approx(gflop, rel=0.01)
    assert attention_context([100]) == 100 and attention_context([50, 50]) == 50


def test_cu_seqlens_over_a_packed_batch() -> None:
    docs = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    cu, longest = cu_seqlens(docs)
    assert cu.tolist() == [0, 2, 5, 6, 8, 10] and longest == 3


def test_bf16_training_with_the_bf16_optimizer(tmp_path: Path) -> None:
    from longforge.train.loop import train_model
    from test_train import _Source

    spec = StageSpec(steps=6, batch_size=2, grad_accum=2, lr=3e-3, precision="bf16", optimizer="adamw_bf16", save_every=3)
    from longforge.model.parallel import Layout
    from longforge.train.parallelize import parallelize

    engine = parallelize(make_tiny_model(50), spec, Layout(1, 0, 1, 1, torch.device("cpu")), 24)
    assert {p.dtype for p in engine.net.parameters()} == {torch.bfloat16}
    model = make_tiny_model(50)
    res = train_model(model, _Source(50, 2), spec, tmp_path / "bf16", torch.device("cpu"))
    assert res.last_loss < 3.9  # learning (ln 50 = 3.91 is chance)
    # Exported in the dtype the model came in.
    assert next(model.parameters()).dtype == torch.float32


def test_bf16_optimizer_needs_bf16_weights() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set precision: bf16"):
        StageSpec(steps=1, optimizer="adamw_bf16")


def test_selective_checkpointing_changes_nothing_numerically() -> None:
    ids, docs, pos = _packed([30, 50], 50, seed=2)
    results = []
    for policy in (None, "save_attention"):
        model = make_tiny_model(50, window=128)
        use_longforge_attention(model)
        model.train()
        if policy:
            apply_checkpointing(model, policy)
        results.append(_loss_and_grads(model, ids, docs, pos))
    torch.testing.assert_close(results[1][0], results[0][0])
    for k, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], g, rtol=1e-5, atol=1e-6)


def test_head_split_keeps_each_call_within_the_budget() -> None:
    from longforge.model.attention import head_split

    per_head = 128
    # 8B attention (32 query heads, 8 KV heads) on one GPU: whole at 64K tokens, 4 query heads per call at 512K.
    assert head_split(32, 8, 65536 * per_head, 2**28) == (32, 8)
    assert head_split(32, 8, 131072 * per_head, 2**28) == (16, 4)
    assert head_split(32, 8, 524288 * per_head, 2**28) == (4, 1)
    # 8-way sequence parallelism at 4M tokens: 4 query heads share 1 KV head; one query head per call.
    assert head_split(4, 1, 4194304 * per_head, 2**28) == (1, 1)
    assert head_split(4, 1, 4194304 * per_head, 2**30) == (2, 1)
    assert head_split(4, 1, 4194304 * per_head, 2**31 - 1) == (2, 1)  # 4 heads = 2^31 elements: too many for int32
    assert head_split(8, 8, 2**40, 2**28) == (1, 1)  # nothing smaller than one head exists


@pytest.mark.parametrize("budget", [2 * 40 * 16 * 4, 2 * 40 * 16 * 2, 2 * 40 * 16])  # 2 KV groups, 1, half of one
def test_split_causal_attention_equals_one_call(budget: int) -> None:
    from longforge.model.attention import _sdpa_causal, split_heads

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 40, 16), torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16)
    for t in (q, k, v):
        t.requires_grad_(True)
    whole = _sdpa_causal(q, k, v, None)
    calls: list[tuple[int, int]] = []

    def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append((a.shape[1], b.shape[1]))
        return _sdpa_causal(a, b, c, None)

    split = split_heads(fn, q, k, v, budget)
    assert len(calls) == 8 * 2 * 40 * 16 // budget and all(a * 2 * 40 * 16 <= budget for a, _ in calls)
    torch.testing.assert_close(split, whole)
    g = torch.randn_like(whole)
    for a, b in zip(torch.autograd.grad(whole, (q, k, v), g), torch.autograd.grad(split, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_offload_keeps_parameters_and_small_tensors_in_place() -> None:
    from longforge.model.memory import should_offload

    weight = torch.nn.Parameter(torch.zeros(1024, 1024))
    act = torch.zeros(1024, 1024).requires_grad_(True) * 2  # a non-leaf activation
    assert not should_offload(weight, min_bytes=0)  # parameters are never copied (CPU or not)
    assert not should_offload(act, min_bytes=0)  # tensors already in CPU memory stay
    if torch.cuda.is_available():
        big = (torch.zeros(1024, 1024, device="cuda").requires_grad_(True) * 2)
        assert should_offload(big) and not should_offload(big[:2])
        assert not should_offload(torch.nn.Parameter(torch.zeros(1024, 1024, device="cuda")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rms_norm_matches_the_transformers_module(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from longforge.model.memory import apply_lean_norms

    torch.manual_seed(0)
    ref = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.normal_()
    lean = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    lean.load_state_dict(ref.state_dict())
    assert apply_lean_norms(lean) == 1 and apply_lean_norms(lean) == 0  # idempotent
    x = (torch.randn(3, 17, 64) * 3).to(dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ref(xa), lean(xb)
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)  # the forward is the same sequence of operations
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(xb.grad, xa.grad, **tol)
    torch.testing.assert_close(lean.weight.grad, ref.weight.grad, **tol)


def test_lean_rms_norm_saves_less() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from longforge.model.memory import apply_lean_norms

    def saved_bytes(norm: torch.nn.Module) -> int:
        total = []
        x = torch.randn(4, 256, 64, dtype=torch.bfloat16, requires_grad=True) * 1  # a non-leaf activation

        def pack(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t, torch.nn.Parameter):
                total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            norm(x)
        return sum(total)

    plain = LlamaRMSNorm(64).to(torch.bfloat16)
    lean = LlamaRMSNorm(64).to(torch.bfloat16)
    apply_lean_norms(lean)
    tokens = 4 * 256
    # bf16 input (2 bytes per feature) and one fp32 scalar per token, against fp32 copies in the plain module.
    assert saved_bytes(lean) == tokens * 64 * 2 + tokens * 4
    assert saved_bytes(plain) >= 4 * saved_bytes(lean)


def test_training_with_lean_norms_matches_plain_norms() -> None:
    ids, docs, pos = _packed([30, 50], 50, seed=2)
    results = []
    for lean in (False, True):
        from longforge.model.memory import apply_lean_norms

        model = make_tiny_model(50, window=128)
        use_longforge_attention(model)
        model.train()
        if lean:
            assert apply_lean_norms(model) == 5  # two per layer and the final norm
        results.append(_loss_and_grads(model, ids, docs, pos))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(lb, la, rtol=0, atol=0)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-5, atol=1e-6)


def test_resident_layers_keep_their_inputs_and_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import longforge.model.memory as memory
    from longforge.model.memory import ActivationOffload

    monkeypatch.setattr(memory, "HOST_PIECE", 1000)  # several host buffers per layer input
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    ids, docs, pos = _packed([30, 50], 50, seed=3)
    layer_input = ids.numel() * 32 * 4  # one layer's fp32 input

    class Recording(ActivationOffload):
        def pack(self, t):  # noqa: ANN001, ANN202
            out = super().pack(t)
            if isinstance(out, tuple):
                self.moved.append(self.cursor)
            return out

    results = []
    for resident in (None, 0, 2, 4):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        use_longforge_attention(model)
        apply_checkpointing(model)
        model.train()
        offload = None
        if resident is not None:
            # On CPU "offloading" is a copy to other CPU memory: the bookkeeping is what is tested.
            offload = Recording(model.model.layers, resident, offloadable=lambda t: t.numel() * t.element_size() >= layer_input
                                and not isinstance(t, torch.nn.Parameter))
            offload.moved = []
        with offload() if offload else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = model(input_ids=ids, position_ids=pos, lf_doc_ids=docs, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        if offload is not None:
            assert offload.kept_bytes == resident * layer_input
            # Layers 0..3 - resident each moved exactly their input; after the last layer (cursor 4) is not a layer.
            assert [c for c in offload.moved if c < 4] == list(range(4 - resident))
            assert offload.host_bytes >= (4 - resident) * layer_input
    ref_loss, ref_grads = results[0]
    for loss, grads in results[1:]:
        assert torch.equal(loss, ref_loss)
        for a, b in zip(grads, ref_grads):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="between 0 and the model's 4 layers"):
        ActivationOffload(model.model.layers, 5)


def test_bf16_adamw_in_slices_equals_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    import longforge.train.optim as optim

    torch.manual_seed(0)
    start = torch.randn(1000, 7)
    grads = [torch.randn(1000, 7) for _ in range(3)]
    out = []
    for piece in (1 << 26, 1000):  # whole, then 7 slices of 1000 entries
        monkeypatch.setattr(optim, "UPDATE_SLICE", piece)
        p = torch.nn.Parameter(start.clone())  # fp32 weights: no rounding noise, so the results must be identical
        opt = optim.BF16AdamW([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_host_copies_in_pieces_round_trip_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    import longforge.model.memory as memory

    monkeypatch.setattr(memory, "HOST_PIECE", 4 * 100)  # 100 fp32 entries per buffer
    t = torch.randn(37, 29).t()  # strided, 1073 entries: 11 buffers, the last partly used
    device, shape, pieces = memory.to_host(t)
    assert [p.numel() for p in pieces] == [100] * 10 + [73]
    back = memory.from_host(device, shape, pieces)
    assert back.shape == t.shape and torch.equal(back, t)
