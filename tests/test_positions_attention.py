"""A forward with PoSE/PIT position ids and document masks equals a Llama forward written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from longforge.model.attention import use_longforge_attention
from longforge.positions.rope import inv_freq
from longforge.positions.transforms import doc_ids_from_starts, position_ids
from longforge.train.batches import Batch, targets
from longforge.train.parallelize import forward_loss

VOCAB, SEQ, TARGET = 61, 96, 1024


def _model() -> LlamaForCausalLM:
    """2 layers, 4 query heads sharing 2 KV heads, YaRN x16 (so the attention factor matters), O(1) activations."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=TARGET, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
                                       "original_max_position_embeddings": 64, "beta_fast": 4.0, "beta_slow": 1.0})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Default init (std 0.02) leaves near-uniform attention; larger weights make positions visible.
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model


def _reference_logits(model: LlamaForCausalLM, ids: torch.Tensor, pos: torch.Tensor, docs: torch.Tensor | None) -> torch.Tensor:
    """Llama by hand in float64 from the model's weights: RMSNorm, rotary at `pos`, causal+document attention, SwiGLU."""
    cfg = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    inv, att = inv_freq(cfg.rope_parameters, d, cfg.max_position_embeddings)
    angles = pos.double()[..., None] * torch.from_numpy(inv)  # (B, S, d/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None] * att  # (B, 1, S, d)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None] * att

    def rotary(x: torch.Tensor) -> torch.Tensor:
        return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    b, s = ids.shape
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None]
    if docs is not None:
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])
    h = w["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(b, s, heads, d).transpose(1, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(b, s, kv_heads, d).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(b, s, kv_heads, d).transpose(1, 2)
        group = heads // kv_heads  # query head j reads KV head j // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = rotary(q) @ rotary(k).transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, heads * d)
        h = h + o @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


def _batch() -> Batch:
    """Row 0: three documents with PoSE ids; row 1: two documents with PIT ids over sentence segments."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    docs = np.stack([doc_ids_from_starts(np.array([0, 30, 70]), SEQ), doc_ids_from_starts(np.array([0, 50]), SEQ)])
    rng = np.random.default_rng(5)
    segs = np.array([0, 9, 21, 33, 50, 58, 77, 90])  # sentence starts, the document start at 50 included
    pos = np.stack([position_ids("pose", docs[0], TARGET, rng, True),
                    position_ids("pit", docs[1], TARGET, rng, True, segment_starts=segs)])
    assert pos[1, -1] == TARGET - 1 and pos[0, -1] > 200  # both really reach far beyond the 64-token window
    return Batch(ids, torch.from_numpy(docs), torch.from_numpy(pos))


def test_forward_with_transformed_ids_and_document_masks_equals_the_hand_written_llama() -> None:
    model = _model()
    use_longforge_attention(model)
    b = _batch()
    with torch.no_grad():
        got = model(input_ids=b.input_ids, position_ids=b.position_ids, lf_doc_ids=b.doc_ids).logits.double()
    want = _reference_logits(model, b.input_ids, b.position_ids, b.doc_ids)
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 2e-5, f"relative error {err:.1e}"  # fp32 against fp64: 1.9e-6 measured
    # The comparison can tell positions and masks apart: wrong ids or no masks are far outside that tolerance.
    plain = torch.arange(SEQ).expand(2, SEQ)
    assert float((got - _reference_logits(model, b.input_ids, plain, b.doc_ids)).abs().max() / want.abs().max()) > 100 * err
    assert float((got - _reference_logits(model, b.input_ids, b.position_ids, None)).abs().max() / want.abs().max()) > 100 * err
    # Position ids shifted per document give the same logits: masked attention sees only differences.
    shifted = b.position_ids.clone()
    shifted[0, 30:70] += 123
    with torch.no_grad():
        moved = model(input_ids=b.input_ids, position_ids=shifted, lf_doc_ids=b.doc_ids).logits.double()
    assert float((moved - got).abs().max() / want.abs().max()) < 2e-5


def test_training_loss_uses_the_transformed_ids_and_masks() -> None:
    model = _model()
    use_longforge_attention(model)
    b = _batch()
    with torch.no_grad():
        loss_sum, weight = forward_loss(model, b, document_mask=True)
    labels, w = targets(b)
    logits = _reference_logits(model, b.input_ids, b.position_ids, b.doc_ids)
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1).clamp(min=0), reduction="none")
    want = (ce * w.reshape(-1).double()).sum()
    assert float(weight) == float(w.sum()) == 2 * (SEQ - 1) - 3  # no target across the 3 document joins
    assert float(loss_sum) == pytest.approx(float(want), rel=2e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_document_attention_equals_each_document_alone_without_a_dense_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flex back-end's block mask comes from per-block document ranges: never the dense B x S x S mask (at 4 rows
    of 64K tokens its construction needed 128 GiB), and each document's output is that document attended alone."""
    import torch.nn.attention.flex_attention as fa

    import longforge.model.attention as attention
    from longforge.model.attention import attend

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dense mask was built")

    monkeypatch.setattr(fa, "create_mask", refuse)
    monkeypatch.setattr(attention, "_flex_compiled", fa.flex_attention)  # no compiler on CPU; the same kernel
    g = torch.Generator().manual_seed(0)
    b, s, d = 2, 300, 16  # 300: the last block of 128 is partial
    q = torch.randn(b, 4, s, d, generator=g)
    k, v = (torch.randn(b, 2, s, d, generator=g) for _ in range(2))
    docs = torch.zeros(b, s, dtype=torch.long)
    docs[0, 100:], docs[0, 130:] = 1, 2  # a document inside one block, one across three
    docs[1, 256:] = 1  # a boundary on a block edge
    out = attend(q, k, v, docs, "flex", None)
    for row in range(b):
        for doc in docs[row].unique():
            span = (docs[row] == doc).nonzero()[:, 0]
            lo, hi = int(span[0]), int(span[-1]) + 1
            alone = F.scaled_dot_product_attention(q[row:row + 1, :, lo:hi], k[row:row + 1, :, lo:hi],
                                                   v[row:row + 1, :, lo:hi], is_causal=True, enable_gqa=True)
            torch.testing.assert_close(out[row:row + 1, :, lo:hi], alone, rtol=1e-5, atol=1e-5)
