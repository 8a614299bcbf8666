"""RoPE scaling: frequencies match transformers exactly, configs of every shape are read, written checkpoints load with them."""

from __future__ import annotations

import importlib
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import transformers.modeling_rope_utils as hf_rope
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama import modeling_llama

from longforge.config import PositionSpec
from longforge.errors import LongforgeError
from longforge.positions.rope import (
    ROPE_METHODS,
    apply_rope,
    dynamic_ntk_theta,
    freq_table,
    inv_freq,
    plan_rope,
    rope_info,
    target_factor,
)


def _config(head_dim: int, base: float, window: int, scaling: dict | None = None) -> LlamaConfig:
    params = {"rope_type": "default", "rope_theta": base, **(scaling or {})}
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1,
                       intermediate_size=8, vocab_size=16, max_position_embeddings=window, rope_parameters=params)


class _Float64Torch:
    """`torch` as transformers' RoPE code sees it, with float32 replaced by float64, to compare formulas exactly."""

    float = torch.float64
    float32 = torch.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _hf_inv_freq(config: Any, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """What transformers computes for a config: ROPE_INIT_FUNCTIONS, or the Llama rotary embedding for 'default'."""
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        inv, att = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv, att = hf_rope.ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
    return inv.double().numpy(), float(att)


@contextmanager
def _hf_in_float64() -> Iterator[None]:
    """Run transformers' RoPE init functions in float64 (they hard-code float32), to compare formulas exactly."""
    saved = hf_rope.torch, modeling_llama.torch
    hf_rope.torch = modeling_llama.torch = _Float64Torch()  # type: ignore[assignment]
    try:
        yield
    finally:
        hf_rope.torch, modeling_llama.torch = saved


# head_dim 80 and 96 are not powers of two; bases from Llama-2 (1e4) to ProLong's 1.28e8; factors up to UltraLong's 128.
GRID = list(itertools.product([64, 96, 128, 256], [1e4, 5e5, 8e6, 1.28e8], [2.0, 32.0, 128.0], [2048, 8192, 32768]))


@pytest.mark.parametrize("method", list(ROPE_METHODS))
def test_inv_freq_and_attention_factor_match_transformers(method: str) -> None:
    worst32 = 0.0
    for head_dim, base, factor, orig in GRID:
        spec = PositionSpec(method=method, factor=factor, theta=base * 16 if method == "theta" else None)
        target = int(orig * factor)
        plan = plan_rope(_config(head_dim, base, orig), spec, target)
        cfg = _config(head_dim, base, plan.max_position_embeddings)
        cfg.rope_parameters = plan.rope_parameters
        seq = target if method == "dynamic" else None
        ours, att = inv_freq(plan.rope_parameters, head_dim, plan.max_position_embeddings, seq_len=seq)
        where = f"{method} head_dim={head_dim} base={base:g} factor={factor:g} original={orig}"
        # The same formulas evaluated in float64 on both sides: any difference is a formula difference.
        with _hf_in_float64():
            ref64, att64 = _hf_inv_freq(cfg, seq)
        np.testing.assert_allclose(ours, ref64, rtol=1e-12, atol=0, err_msg=where)
        assert att == pytest.approx(att64, rel=1e-12), where
        # What a loaded model really uses (float32 buffers).
        ref32, att32 = _hf_inv_freq(cfg, seq)
        worst32 = max(worst32, float(np.max(np.abs(ours - ref32) / ref32)))
        assert att == pytest.approx(att32, rel=1e-6), where
    # Within 1e-6 of the float32 buffers, except llama3's blend band, where transformers' float32
    # `orig / wavelength - low_freq_factor` cancels (7.3e-6 measured at a wavelength 0.3% below the window).
    assert worst32 <= (1e-5 if method == "llama3" else 1e-6)


YARN_OPTIONS = [
    {"beta_fast": 32, "beta_slow": 1},
    {"beta_fast": 4, "beta_slow": 1},  # UltraLong
    {"beta_fast": 16, "beta_slow": 2, "truncate": False},
    {"beta_fast": 32, "beta_slow": 1, "attention_factor": 0.9},
    {"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    {"beta_fast": 8, "beta_slow": 1, "truncate": False, "attention_factor": 1.2},
]


@pytest.mark.parametrize("options", YARN_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_yarn_options_match_transformers(options: dict) -> None:
    for head_dim, base, factor, orig in itertools.product([64, 96, 128], [1e4, 5e5], [4.0, 128.0], [4096, 8192]):
        spec = PositionSpec(method="yarn", factor=factor, **options)
        plan = plan_rope(_config(head_dim, base, orig), spec, int(orig * factor))
        for key, value in options.items():
            assert plan.rope_parameters[key] == value
        cfg = _config(head_dim, base, plan.max_position_embeddings)
        cfg.rope_parameters = plan.rope_parameters
        ours, att = inv_freq(plan.rope_parameters, head_dim, plan.max_position_embeddings)
        with _hf_in_float64():
            ref, ref_att = _hf_inv_freq(cfg)
        np.testing.assert_allclose(ours, ref, rtol=1e-12, err_msg=str((head_dim, base, factor, orig)))
        assert att == pytest.approx(ref_att, rel=1e-12)
    if "attention_factor" in options:
        assert att == options["attention_factor"]


def test_theta_method_sets_the_base() -> None:
    plan = plan_rope(_config(128, 500000.0, 8192), PositionSpec(method="theta", theta=8e6), 65536)
    assert plan.rope_parameters == {"rope_type": "default", "rope_theta": 8e6}
    ours, _ = inv_freq(plan.rope_parameters, 128, 65536)
    cfg = _config(128, 8e6, 65536)
    np.testing.assert_allclose(ours, _hf_inv_freq(cfg)[0], rtol=1e-6)


def test_ntk_base_formula() -> None:
    plan = plan_rope(_config(128, 10000.0, 4096), PositionSpec(method="ntk"), 4096 * 8)
    assert plan.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 8 ** (128 / 126))


def test_longrecipe_theta_is_the_dynamic_ntk_base_at_the_target() -> None:
    # LongRecipe's published Llama-3 values: 48.9M for factor 10, 131.5M for factor 16.
    assert dynamic_ntk_theta(500000.0, 10, 128) == pytest.approx(48.9e6, rel=1e-3)
    assert dynamic_ntk_theta(500000.0, 16, 128) == pytest.approx(131.5e6, rel=1e-3)
    # ... which is what transformers' dynamic NTK computes at factor x the original window.
    plan = plan_rope(_config(128, 500000.0, 8192), PositionSpec(method="dynamic"), 8192 * 16)
    ours, _ = inv_freq(plan.rope_parameters, 128, plan.max_position_embeddings, seq_len=8192 * 16)
    np.testing.assert_allclose(ours, inv_freq({"rope_theta": dynamic_ntk_theta(500000.0, 16, 128)}, 128, 8192)[0], rtol=1e-12)


LLAMA31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def test_factor_uses_the_original_length_of_an_already_scaled_model() -> None:
    # Llama-3.1: max_position_embeddings 131072, but llama3 scaling from an original 8192.
    llama31 = _config(128, 500000.0, 131072, LLAMA31)
    info = rope_info(llama31)
    assert info.original_length == 8192 and info.scaled
    for target, s in ((1 << 20, 128), (1 << 21, 256), (1 << 22, 512)):
        plan = plan_rope(llama31, PositionSpec(method="yarn", beta_fast=4, beta_slow=1), target)
        assert plan.factor == s
        assert plan.rope_parameters["original_max_position_embeddings"] == 8192
        assert any("replaced the checkpoint's existing llama3 scaling" in n for n in plan.notes)
    kept = plan_rope(llama31, PositionSpec(method="none"), 1 << 20)
    assert kept.rope_parameters["rope_type"] == "llama3" and kept.rope_parameters["factor"] == 8.0
    assert any("kept the checkpoint's existing llama3 scaling" in n for n in kept.notes)


def test_scaled_model_without_a_stated_window_says_what_it_assumed() -> None:
    linear = _config(64, 10000.0, 16384, {"rope_type": "linear", "factor": 4.0})
    plan = plan_rope(linear, PositionSpec(method="yarn"), 65536)
    assert plan.factor == 4.0
    assert any("assumed max_position_embeddings 16384" in n for n in plan.notes)
    plan = plan_rope(linear, PositionSpec(method="yarn"), 65536, original_length=4096)
    assert plan.factor == 16.0 and not any("assumed" in n for n in plan.notes)


def test_target_must_exceed_original() -> None:
    with pytest.raises(LongforgeError, match="not above the model's original window 4096"):
        target_factor(4096, 4096)


@pytest.mark.parametrize(
    ("config", "spec", "message"),
    [
        (_config(64, 1e4, 4096), PositionSpec(method="pi", factor=0.5), "factor 0.5 is below 1"),
        (SimpleNamespace(hidden_size=64, num_attention_heads=4, max_position_embeddings=512), PositionSpec(), "has no rope_theta"),
        (SimpleNamespace(hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
                         rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}}),
         PositionSpec(), "per-layer-type RoPE parameters"),
        (_config(64, 1e4, 4096), PositionSpec.model_construct(method="alibi"), "unknown RoPE method 'alibi'"),
    ],
)
def test_bad_input_is_one_clear_error(config: Any, spec: PositionSpec, message: str) -> None:
    with pytest.raises(LongforgeError, match=message):
        plan_rope(config, spec, 16384)


def test_freq_table_rows() -> None:
    plan = plan_rope(_config(64, 10000.0, 256), PositionSpec(method="pi"), 2048)
    rows = freq_table(plan)
    assert len(rows) == 32
    assert all(r["ratio"] == pytest.approx(1 / 8) for r in rows)
    assert rows[0]["wavelength"] == pytest.approx(2 * np.pi)
    # An already-scaled model: "original" is the unscaled base, "current" the checkpoint's scaling.
    plan = plan_rope(_config(128, 500000.0, 131072, LLAMA31), PositionSpec(method="pi"), 1 << 20)
    rows = freq_table(plan)
    assert all(r["ratio"] == pytest.approx(1 / 128) for r in rows)
    assert rows[0]["current_inv_freq"] == rows[0]["inv_freq"] and rows[-1]["current_inv_freq"] == pytest.approx(rows[-1]["inv_freq"] / 8)


# Published config.json values (4.x shape: rope_scaling + top-level rope_theta), written by hand.
LEGACY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA31)},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 32000,
                   "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": 4096},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "num_hidden_layers": 28, "intermediate_size": 18944, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                   "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}},
    "qwen3-0.6b": {"model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "head_dim": 128, "num_hidden_layers": 28, "intermediate_size": 3072, "vocab_size": 151936,
                   "max_position_embeddings": 40960, "rope_theta": 1000000, "rope_scaling": None},
    "phi-2": {"model_type": "phi", "hidden_size": 2560, "num_attention_heads": 32, "num_hidden_layers": 32,
              "intermediate_size": 10240, "vocab_size": 51200, "max_position_embeddings": 2048, "rope_theta": 10000.0,
              "partial_rotary_factor": 0.4},
}
# head_dim, rotary_dim, theta, original window, already scaled
EXPECTED_INFO = {
    "llama-3.1-8b": (128, 128, 500000.0, 8192, True),
    "mistral-7b": (128, 128, 10000.0, 32768, False),
    "qwen2.5-7b": (128, 128, 1000000.0, 32768, True),
    "qwen3-0.6b": (128, 128, 1000000.0, 40960, False),  # head_dim 128, not hidden / heads = 64
    "phi-2": (80, 32, 10000.0, 2048, False),  # partial rotary: 40% of 80
}


def _v5(legacy: dict[str, Any]) -> dict[str, Any]:
    """The same config in transformers-5 shape: everything RoPE inside `rope_parameters`."""
    cfg = {k: v for k, v in legacy.items() if k not in ("rope_scaling", "rope_theta", "partial_rotary_factor")}
    params = dict(legacy.get("rope_scaling") or {"rope_type": "default"})
    params["rope_type"] = params.pop("type", params.get("rope_type"))
    params["rope_theta"] = legacy["rope_theta"]
    if "partial_rotary_factor" in legacy:
        params["partial_rotary_factor"] = legacy["partial_rotary_factor"]
    return {**cfg, "rope_parameters": params}


def _rotary_class(model_type: str) -> type:
    """The model family's own rotary embedding class (it may handle partial rotary or head_dim its own way)."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding") and not n.startswith("_"))


@pytest.mark.parametrize("shape", ["legacy", "v5"])
@pytest.mark.parametrize("name", list(LEGACY_CONFIGS))
def test_reads_published_configs_in_both_shapes(name: str, shape: str, tmp_path: Path) -> None:
    raw = LEGACY_CONFIGS[name] if shape == "legacy" else _v5(LEGACY_CONFIGS[name])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = AutoConfig.from_pretrained(tmp_path)
    info = rope_info(config)
    assert (info.head_dim, info.rotary_dim, info.theta, info.original_length, info.scaled) == EXPECTED_INFO[name]
    # The new config, given to the family's own rotary embedding, gives our frequencies.
    target = info.original_length * 32
    for spec in (PositionSpec(method="yarn", beta_fast=4, beta_slow=1), PositionSpec(method="pi"), PositionSpec(method="ntk")):
        plan = plan_rope(config, spec, target)
        new = AutoConfig.from_pretrained(tmp_path)
        new.rope_parameters = plan.rope_parameters
        new.max_position_embeddings = plan.max_position_embeddings
        rot = _rotary_class(config.model_type)(new)
        ours, att = inv_freq(plan.rope_parameters, info.rotary_dim, plan.max_position_embeddings)
        np.testing.assert_allclose(rot.inv_freq.double().numpy(), ours, rtol=1e-6, err_msg=f"{name} {spec.method}")
        assert float(rot.attention_scaling) == pytest.approx(att, rel=1e-6)


def test_reads_a_transformers_4_config_object() -> None:
    # transformers 4.x configs carry `rope_scaling` (with "type" in old files) and a top-level `rope_theta`.
    old = SimpleNamespace(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_theta=500000.0,
                          rope_scaling={"type": "llama3", **{k: v for k, v in LLAMA31.items() if k != "rope_type"}})
    info = rope_info(old)
    assert info.current["rope_type"] == "llama3" and info.original_length == 8192 and info.theta == 500000.0
    phi3 = SimpleNamespace(hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072, rope_theta=10000.0,
                           original_max_position_embeddings=4096, rope_scaling=None)
    assert rope_info(phi3).original_length == 4096 and rope_info(phi3).original_from == "config"


def _logits_match_after_reload(model_dir: Path, out: Path, spec: PositionSpec, target: int, length: int) -> None:
    """apply_rope, reload, and compare frequencies and logits with the in-memory model given the same config."""
    plan = apply_rope(model_dir, out, spec, target)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    rot = reloaded.model.rotary_emb
    x = torch.randint(0, reloaded.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.rope_parameters = plan.rope_parameters
    cfg.max_position_embeddings = plan.max_position_embeddings
    in_memory = type(base)(cfg).eval()
    in_memory.load_state_dict(base.state_dict())
    with torch.no_grad():
        got = reloaded(x).logits
        assert torch.equal(in_memory(x).logits, got), spec.method
        changed = not torch.allclose(base(x).logits, got)
    # Dynamic NTK only changes the frequencies inside the forward (from the longest position).
    seq = length if plan.rope_parameters["rope_type"] == "dynamic" else None
    ours, att = inv_freq(plan.rope_parameters, plan.info.rotary_dim, plan.max_position_embeddings, seq_len=seq)
    np.testing.assert_allclose(rot.inv_freq.double().numpy(), ours, rtol=1e-6, err_msg=spec.method)
    assert float(rot.attention_scaling) == pytest.approx(att, rel=1e-6)
    assert changed == (spec.method != "none"), f"{spec.method}: the new RoPE config had no effect on the logits"


@pytest.mark.parametrize("method", list(ROPE_METHODS))
def test_written_checkpoint_reloads_with_the_same_logits_beyond_the_window(model_dir: Path, tmp_path: Path, method: str) -> None:
    spec = PositionSpec(method=method, theta=1e6 if method == "theta" else None, beta_fast=4, beta_slow=1)
    _logits_match_after_reload(model_dir, tmp_path / "ext", spec, 512, 200)  # window 64, length 200
    saved = json.loads((tmp_path / "ext" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == {"none": "default", "pi": "linear", "ntk": "default", "theta": "default",
                                                     "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3"}[method]
    assert saved["max_position_embeddings"] == (64 if method == "dynamic" else 512)
    assert (tmp_path / "ext" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "ext" / "longforge_rope.json").read_text())["method"] == method


def _tiny(model_type: str, out: Path, **extra: Any) -> Path:
    """A tiny random checkpoint of a model family, saved with a hand-written 4.x-shape config.json."""
    legacy_scaling = extra.pop("legacy_scaling", None)
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    raw = json.loads((out / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = legacy_scaling
    (out / "config.json").write_text(json.dumps(raw))
    return out


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("qwen3", {"head_dim": 16}),  # explicit head_dim, twice hidden / heads
        ("phi", {"partial_rotary_factor": 0.5}),  # rotary on half of each head
        ("mistral", {"sliding_window": None}),
        ("qwen2", {}),
        ("llama", {"legacy_scaling": {"type": "linear", "factor": 2.0}}),  # already scaled, old "type" key
    ],
)
def test_model_families_reload_with_the_same_logits(model_type: str, extra: dict, tmp_path: Path) -> None:
    src = _tiny(model_type, tmp_path / "base", **dict(extra))
    cfg = AutoConfig.from_pretrained(src)
    info = rope_info(cfg)
    assert info.rotary_dim == int((extra.get("head_dim") or 8) * extra.get("partial_rotary_factor", 1.0))
    assert info.scaled == ("legacy_scaling" in extra)
    for i, spec in enumerate([PositionSpec(method="yarn", beta_fast=4, beta_slow=1), PositionSpec(method="llama3")]):
        _logits_match_after_reload(src, tmp_path / f"ext{i}", spec, 512, 160)


def test_rope_refuses_to_overwrite_its_input(model_dir: Path) -> None:
    with pytest.raises(LongforgeError, match="--out must differ"):
        apply_rope(model_dir, model_dir, PositionSpec(), 512)


def _cli(*args: str) -> Any:
    """Run `longforge rope ...` in-process; returns typer's result (output, exit code, exception)."""
    from typer.testing import CliRunner

    from longforge.cli import app

    return CliRunner().invoke(app, ["rope", *args])


def test_cli_dry_run_options_reach_the_plan(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGFORGE_QUIET", "0")
    cases = [
        (["--method", "yarn", "--alpha", "2", "--beta", "16", "--attention-factor", "1.5", "--no-truncate"],
         {"rope_type": "yarn", "factor": 8.0, "beta_slow": 2.0, "beta_fast": 16.0, "attention_factor": 1.5, "truncate": False}),
        (["--method", "pi", "--factor", "12"], {"rope_type": "linear", "factor": 12.0}),
        (["--method", "theta", "--theta", "8e6"], {"rope_type": "default", "rope_theta": 8e6}),
        (["--method", "llama3", "--original-length", "32", "--low-freq-factor", "2", "--high-freq-factor", "8"],
         {"rope_type": "llama3", "factor": 16.0, "original_max_position_embeddings": 32, "low_freq_factor": 2.0, "high_freq_factor": 8.0}),
        (["--method", "ntk", "--original-length", "128"], {"rope_type": "default", "rope_theta": 10000.0 * 4 ** (8 / 6)}),
    ]
    for args, expected in cases:
        res = _cli(str(model_dir), "--target-length", "512", "--dry-run", *args)
        assert res.exit_code == 0, (args, res.output, res.exception)
        params = json.loads(next(line for line in res.output.splitlines() if line.startswith("{")))
        for key, value in expected.items():
            assert params[key] == pytest.approx(value), (args, key)
        assert "wavelength" in res.output and "new/original" in res.output
    assert not any(tmp_path.iterdir())


def test_cli_writes_the_checkpoint_and_says_it_replaced_a_scaling(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGFORGE_QUIET", "0")
    res = _cli(str(model_dir), "--target-length", "256", "--method", "llama3", "--out", str(tmp_path / "a"))
    assert res.exit_code == 0, res.output
    res = _cli(str(tmp_path / "a"), "--target-length", "1024", "--method", "yarn", "--alpha", "1", "--beta", "4",
               "--out", str(tmp_path / "b"))
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # rich wraps long lines
    assert "replaced the checkpoint's existing llama3 scaling (factor 4.0) with yarn, relative to the original window 64" in said
    saved = json.loads((tmp_path / "b" / "config.json").read_text())["rope_parameters"]
    assert saved["rope_type"] == "yarn" and saved["factor"] == 16.0 and saved["beta_fast"] == 4.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # The flag, not a recipe key: "rope: `method` input ...; fix that value in the recipe" was the old message.
        (["--method", "alibi", "--dry-run"], "--method: Input should be 'none', 'pi'"),
        (["--method", "theta", "--dry-run"], "method 'theta' needs `theta`"),
        (["--alpha", "4", "--beta", "2", "--dry-run"], "beta_fast (2.0) must be larger than beta_slow (4.0)"),
        (["--factor", "0.5", "--dry-run"], "factor 0.5 is below 1"),
        (["--original-length", "1024", "--dry-run"], "target length 512 is not above the model's original window 1024"),
        (["--original-length", "0", "--dry-run"], "--original-length 0 must be a positive number"),
        ([], "rope needs --out OUT_DIR"),
    ],
)
def test_cli_bad_options_are_one_clear_error(model_dir: Path, args: list[str], message: str) -> None:
    res = _cli(str(model_dir), "--target-length", "512", *args)
    assert isinstance(res.exception, LongforgeError), res.output
    assert message in str(res.exception)
