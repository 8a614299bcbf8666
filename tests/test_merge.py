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


def test_slerp_endpoints_and_arc() -> None:
    from longforge.merge import slerp

    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid, torch.tensor([0.5**0.5, 0.5**0.5]))  # on the arc, unlike the linear mean
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel vectors: linear


def test_streaming_writer_matches_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from longforge.merge import StreamingWriter

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.tensor(4, dtype=torch.int64)}
    w = StreamingWriter(tmp_path / "s.safetensors", [(k, {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[v.dtype], list(v.shape)) for k, v in tensors.items()])
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    got, ref = load_file(str(tmp_path / "s.safetensors")), load_file(str(tmp_path / "ref.safetensors"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_slerp_merge_loads_and_differs_from_linear(tmp_path: Path) -> None:
    from longforge.merge import merge

    make_tiny_model(40, seed=1).save_pretrained(tmp_path / "a")
    make_tiny_model(40, seed=2).save_pretrained(tmp_path / "b")
    merge([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "s", "slerp")
    merge([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "l", "linear")
    s = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    lin = AutoModelForCausalLM.from_pretrained(tmp_path / "l").state_dict()
    k = "model.layers.0.mlp.up_proj.weight"
    assert s[k].norm() > lin[k].norm()  # slerp keeps the norm that averaging two random matrices shrinks
    with pytest.raises(LongforgeError, match="slerp merges exactly two models"):
        merge([tmp_path / "a"] * 3, [0.2, 0.3, 0.5], tmp_path / "x", "slerp")
