"""Checkpoints every tool reads: the keys transformers 4.x needs, the tokenizer's window, and plain file modes.

transformers 4.x itself is checked by benchmarks/compat_transformers.py (it needs a venv of its own); here the written
files are checked, and transformers 5 is shown to read the same rotary embedding with and without the added keys.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from conftest import make_tiny_model
from longforge.config import PositionSpec, StageSpec
from longforge.hf import copy_tokenizer, load_model, make_portable, portable_config, save_model
from longforge.merge import merge
from longforge.positions.rope import apply_rope
from longforge.train.batches import Batch
from longforge.train.loop import train_model

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 4, "beta_slow": 1, "truncate": True}


@pytest.fixture
def plain_umask() -> Iterator[None]:
    """The usual umask (022), so a plain open() makes 0644 files whatever the machine's default."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _assert_portable(folder: Path, window: int) -> None:
    """config.json carries rope_scaling/rope_theta matching rope_parameters; the tokenizer has a 4.x class and the window."""
    cfg = _json(folder / "config.json")
    params = cfg["rope_parameters"]
    assert cfg["rope_theta"] == params["rope_theta"]
    want = None if params["rope_type"] == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    assert "rope_scaling" in cfg and cfg["rope_scaling"] == want
    tok = _json(folder / "tokenizer_config.json")
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok["model_max_length"] == window


def _assert_plain_modes(folder: Path) -> None:
    modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in folder.iterdir() if f.is_file()}
    assert set(modes.values()) == {"0o644"}, modes
    assert "model.safetensors" in modes


def _checkpoint(folder: Path, tokenizer_dir: Path, vocab: int, rope: dict[str, Any] | None = None, window: int = 64,
                seed: int = 0) -> Path:
    """A tiny Llama saved by plain transformers (a user's model), with the test tokenizer."""
    model = make_tiny_model(vocab, window=window, seed=seed)
    if rope is not None:
        model.config.rope_parameters = rope
    model.save_pretrained(folder)
    copy_tokenizer(tokenizer_dir, folder)
    return folder


class _Source:
    """Random one-document micro-batches."""

    def __init__(self, vocab: int, seq: int = 48):
        self.vocab, self.seq = vocab, seq

    def batch(self, step: int, micro: int) -> Batch:
        ids = torch.randint(1, self.vocab, (1, self.seq), generator=torch.Generator().manual_seed(step))
        return Batch(ids, torch.zeros_like(ids), torch.arange(self.seq)[None])


@pytest.mark.parametrize("method", ["yarn", "pi", "dynamic", "llama3", "ntk", "theta"])
def test_rope_output_is_portable_and_has_the_new_window(model_dir: Path, tmp_path: Path, plain_umask: None, method: str) -> None:
    spec = PositionSpec(method=method, theta=1e6 if method == "theta" else None, beta_fast=4, beta_slow=1)
    apply_rope(model_dir, tmp_path / "ext", spec, 256)
    # dynamic NTK keeps max_position_embeddings at the original 64 (transformers' convention): its window is 64 x 4.
    _assert_portable(tmp_path / "ext", 256)
    _assert_plain_modes(tmp_path / "ext")


def test_training_export_is_portable_with_readable_weights(tmp_path: Path, tokenizer_dir: Path, tokenizer: Any,
                                                           plain_umask: None, one_thread: None) -> None:
    src = _checkpoint(tmp_path / "src", tokenizer_dir, len(tokenizer), rope=YARN, window=256)
    model = load_model(src)
    final = train_model(model, _Source(len(tokenizer)), StageSpec(steps=1, lr=1e-3), tmp_path / "run",
                        torch.device("cpu"), tokenizer_from=src).final
    _assert_portable(final, 256)
    assert _json(final / "config.json")["rope_scaling"]["rope_type"] == "yarn"
    _assert_plain_modes(final)


def test_save_model_weights_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        out = save_model(make_tiny_model(40), tmp_path / "m")
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE((out / "model.safetensors").stat().st_mode)) == "0o640"
    assert oct(stat.S_IMODE((out / "config.json").stat().st_mode)) == "0o640"


def test_merge_output_is_portable(tmp_path: Path, tokenizer_dir: Path, tokenizer: Any, plain_umask: None) -> None:
    base = _checkpoint(tmp_path / "a", tokenizer_dir, len(tokenizer), seed=1)
    ext = _checkpoint(tmp_path / "b", tokenizer_dir, len(tokenizer), rope=YARN, window=256, seed=2)
    merge([base, ext], [0.5, 0.5], tmp_path / "m")
    _assert_portable(tmp_path / "m", 256)
    assert _json(tmp_path / "m" / "config.json")["rope_scaling"]["factor"] == 4.0
    _assert_plain_modes(tmp_path / "m")


def test_merge_keeps_the_config_of_a_dynamic_ntk_extension(tmp_path: Path, tokenizer_dir: Path, tokenizer: Any) -> None:
    """Dynamic NTK states the original window as max_position_embeddings; the extended model is still the longer one."""
    base = _checkpoint(tmp_path / "a", tokenizer_dir, len(tokenizer), seed=1)
    dyn = _checkpoint(tmp_path / "b", tokenizer_dir, len(tokenizer), seed=2,
                      rope={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})
    info = merge([base, dyn], [0.5, 0.5], tmp_path / "m")
    assert info["config_from"] == str(dyn)
    assert _json(tmp_path / "m" / "config.json")["rope_parameters"]["rope_type"] == "dynamic"
    assert _json(tmp_path / "m" / "tokenizer_config.json")["model_max_length"] == 256


ROPES = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "default", "rope_theta": 2.5e6},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    YARN,
    {**YARN, "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 1.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
]


def _rotary(config: Any) -> tuple[torch.Tensor, float]:
    rot = LlamaRotaryEmbedding(config)
    return rot.inv_freq, float(rot.attention_scaling)


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: f"{r['rope_type']}-{r.get('factor', r['rope_theta'])}")
def test_transformers5_reads_the_same_rope_with_and_without_the_added_keys(tmp_path: Path, rope: dict[str, Any]) -> None:
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, vocab_size=50,
                      max_position_embeddings=256, rope_parameters=dict(rope))
    cfg.save_pretrained(tmp_path / "plain")
    plain = _json(tmp_path / "plain" / "config.json")
    portable = portable_config(plain)
    assert "rope_scaling" in portable and portable["rope_theta"] == rope["rope_theta"]
    (tmp_path / "portable").mkdir()
    (tmp_path / "portable" / "config.json").write_text(json.dumps(portable))
    a, b = AutoConfig.from_pretrained(tmp_path / "plain"), AutoConfig.from_pretrained(tmp_path / "portable")
    assert b.rope_parameters == a.rope_parameters
    (inv_a, att_a), (inv_b, att_b) = _rotary(a), _rotary(b)
    assert torch.equal(inv_a, inv_b) and att_a == att_b
    # transformers 5 writes back rope_parameters only: a re-saved checkpoint stays correct in 5.x.
    b.save_pretrained(tmp_path / "resaved")
    c = AutoConfig.from_pretrained(tmp_path / "resaved")
    assert c.rope_parameters == a.rope_parameters and torch.equal(_rotary(c)[0], inv_a)


def test_portable_config_reads_rope_the_way_transformers5_does() -> None:
    # rope_scaling wins over rope_parameters in transformers 5, and a top-level rope_theta fills a missing base.
    legacy = {"model_type": "llama", "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0},
              "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    out = portable_config(legacy)
    assert out["rope_parameters"] == {"type": "linear", "factor": 2.0, "rope_theta": 5e5, "rope_type": "linear"}
    assert out["rope_scaling"] == {"type": "linear", "factor": 2.0, "rope_type": "linear"} and out["rope_theta"] == 5e5
    partial = portable_config({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}})
    assert partial["partial_rotary_factor"] == 0.5 and partial["rope_scaling"] is None
    # Per-layer-type parameters, or no stated base (a class default would apply), are left as they are.
    nested = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert portable_config(nested) == nested
    assert portable_config({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}) == {
        "rope_parameters": {"rope_type": "linear", "factor": 2.0}}
    assert portable_config({"model_type": "gpt2"}) == {"model_type": "gpt2"}


def test_make_portable_keeps_what_transformers5_loads(tmp_path: Path, tokenizer_dir: Path) -> None:
    """The same logits, token ids and special tokens in transformers 5 before and after; the tokenizer gains the window."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|a|>", "<|b|>"]})
    folder = tmp_path / "m"
    tok.save_pretrained(folder)  # transformers 5 lists them under extra_special_tokens, which 4.x cannot read
    assert isinstance(_json(folder / "tokenizer_config.json")["extra_special_tokens"], list)
    model = make_tiny_model(len(tok), window=256)
    model.config.rope_parameters = YARN
    model.save_pretrained(folder)
    x = torch.randint(0, len(tok), (1, 150), generator=torch.Generator().manual_seed(0))
    text = "<|a|> remember the pass key 12345 and the blue river <|b|>"
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(folder).eval()(x).logits
    make_portable(folder)
    _assert_portable(folder, 256)
    saved = _json(folder / "tokenizer_config.json")
    assert saved["additional_special_tokens"] == ["<|a|>", "<|b|>"] and "extra_special_tokens" not in saved
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(folder).eval()(x).logits, before)
    again = AutoTokenizer.from_pretrained(folder)
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.all_special_tokens == tok.all_special_tokens
    assert again.model_max_length == 256
