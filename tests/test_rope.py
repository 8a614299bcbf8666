"""RoPE scaling: frequencies match transformers exactly, and written checkpoints load with them."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from longforge.config import PositionSpec
from longforge.errors import LongforgeError
from longforge.positions.rope import ROPE_METHODS, apply_rope, freq_table, inv_freq, plan_rope, rope_info, target_factor


def _config(head_dim: int, base: float, window: int, scaling: dict | None = None) -> LlamaConfig:
    params = {"rope_type": "default", "rope_theta": base, **(scaling or {})}
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1,
                       intermediate_size=8, vocab_size=16, max_position_embeddings=window, rope_parameters=params)


def _hf_inv_freq(config: LlamaConfig, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """What transformers itself computes for a config (the model's rotary embedding, or its init function)."""
    kind = config.rope_parameters["rope_type"]
    if kind == "dynamic" and seq_len is not None:
        inv, att = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=seq_len)
        return inv.double().numpy(), float(att)
    emb = LlamaRotaryEmbedding(config)
    return emb.inv_freq.double().numpy(), float(emb.attention_scaling)


GRID = list(itertools.product([64, 128], [10000.0, 500000.0], [4.0, 16.0], [2048, 8192]))


@pytest.mark.parametrize("method", [m for m in ROPE_METHODS if m not in ("theta",)])
@pytest.mark.parametrize(("head_dim", "base", "factor", "orig"), GRID)
def test_inv_freq_matches_transformers(method: str, head_dim: int, base: float, factor: float, orig: int) -> None:
    spec = PositionSpec(method=method, factor=factor, beta_fast=32, beta_slow=1)
    target = int(orig * factor)
    plan = plan_rope(_config(head_dim, base, orig), spec, target)
    cfg = _config(head_dim, base, plan.max_position_embeddings)
    cfg.rope_parameters = plan.rope_parameters
    seq = target if method == "dynamic" else None
    ours, att = inv_freq(plan.rope_parameters, head_dim, plan.max_position_embeddings, seq_len=seq)
    ref, ref_att = _hf_inv_freq(cfg, seq)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    assert att == pytest.approx(ref_att, rel=1e-6)


def test_theta_method_sets_the_base() -> None:
    plan = plan_rope(_config(128, 500000.0, 8192), PositionSpec(method="theta", theta=8e6), 65536)
    assert plan.rope_parameters == {"rope_type": "default", "rope_theta": 8e6}
    ours, _ = inv_freq(plan.rope_parameters, 128, 65536)
    cfg = _config(128, 8e6, 65536)
    np.testing.assert_allclose(ours, _hf_inv_freq(cfg)[0], rtol=1e-6)


def test_ntk_base_formula() -> None:
    plan = plan_rope(_config(128, 10000.0, 4096), PositionSpec(method="ntk"), 4096 * 8)
    assert plan.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 8 ** (128 / 126))


def test_factor_uses_the_original_length_of_an_already_scaled_model() -> None:
    # Llama-3.1: max_position_embeddings 131072, but llama3 scaling from an original 8192.
    llama31 = _config(128, 500000.0, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    info = rope_info(llama31)
    assert info.original_length == 8192 and info.scaled
    for target, s in ((1 << 20, 128), (1 << 21, 256), (1 << 22, 512)):
        plan = plan_rope(llama31, PositionSpec(method="yarn", beta_fast=4, beta_slow=1), target)
        assert plan.factor == s
        assert plan.rope_parameters["original_max_position_embeddings"] == 8192
        assert any("replaced the checkpoint's existing llama3 scaling" in n for n in plan.notes)


def test_target_must_exceed_original() -> None:
    with pytest.raises(LongforgeError, match="not above the model's original window 4096"):
        target_factor(4096, 4096)


def test_freq_table_rows() -> None:
    plan = plan_rope(_config(64, 10000.0, 256), PositionSpec(method="pi"), 2048)
    rows = freq_table(plan)
    assert len(rows) == 32
    assert all(r["ratio"] == pytest.approx(1 / 8) for r in rows)
    assert rows[0]["wavelength"] == pytest.approx(2 * np.pi)


def test_written_checkpoint_loads_with_the_same_frequencies_and_logits(model_dir: Path, tmp_path: Path) -> None:
    spec = PositionSpec(method="yarn", beta_fast=4, beta_slow=1)
    plan = apply_rope(model_dir, tmp_path / "ext", spec, 512)
    saved = json.loads((tmp_path / "ext" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "yarn"
    assert saved["max_position_embeddings"] == 512
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ext").eval()
    ours, att = inv_freq(plan.rope_parameters, plan.info.rotary_dim, 512)
    rot = reloaded.model.rotary_emb
    np.testing.assert_allclose(rot.inv_freq.double().numpy(), ours, rtol=1e-6)
    assert float(rot.attention_scaling) == pytest.approx(att)
    # The in-memory model with the same config change gives identical logits beyond the original window.
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cfg = base.config
    cfg.rope_parameters = plan.rope_parameters
    cfg.max_position_embeddings = 512
    in_memory = type(base)(cfg).eval()
    in_memory.load_state_dict(base.state_dict())
    x = torch.randint(0, cfg.vocab_size, (1, 200))
    with torch.no_grad():
        assert torch.equal(in_memory(x).logits, reloaded(x).logits)
    # Weights are linked, not copied, and the tokenizer travels along.
    assert (tmp_path / "ext" / "tokenizer.json").is_file()
    assert (tmp_path / "ext" / "longforge_rope.json").is_file()


def test_rope_refuses_to_overwrite_its_input(model_dir: Path) -> None:
    with pytest.raises(LongforgeError, match="--out must differ"):
        apply_rope(model_dir, model_dir, PositionSpec(), 512)
