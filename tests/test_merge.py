"""Merging checkpoints: the tensor-wise average, the config kept, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from longforge.errors import LongforgeError
from longforge.merge import merge_linear


def test_linear_merge_is_the_weighted_mean_and_keeps_the_long_config(tmp_path: Path) -> None:
    a, b = make_tiny_model(40, window=64, seed=1), make_tiny_model(40, window=512, seed=2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    info = merge_linear([tmp_path / "a", tmp_path / "b"], [0.25, 0.75], tmp_path / "m")
    assert info["config_from"] == str(tmp_path / "b")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert m.config.max_position_embeddings == 512
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, 0.25 * sa[k] + 0.75 * sb[k], rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "m" / "longforge_merge.json").read_text())["weights"] == [0.25, 0.75]


def test_merge_refuses_different_architectures(tmp_path: Path) -> None:
    make_tiny_model(40).save_pretrained(tmp_path / "a")
    make_tiny_model(48).save_pretrained(tmp_path / "b")
    with pytest.raises(LongforgeError, match="`vocab_size` differs"):
        merge_linear([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "m")


def test_merge_weights_must_sum_to_one(tmp_path: Path) -> None:
    with pytest.raises(LongforgeError, match="sum to 1"):
        merge_linear([tmp_path / "a", tmp_path / "b"], [0.5, 0.6], tmp_path / "m")
