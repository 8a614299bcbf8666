"""What a tool is judged by: --version, help that reads at 80 columns, model labels, tokenizer errors, and the
KV-cache keyword of the transformers version at hand."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import typer.main
from typer.testing import CliRunner

from conftest import make_tiny_model
from longforge.errors import LongforgeError

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --version

def test_version_prints_the_package_version_and_exits_0(tmp_path: Path) -> None:
    import longforge

    res = subprocess.run([sys.executable, "-m", "longforge", "--version"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"longforge {longforge.__version__} (Python ")
    assert "torch " in res.stdout and "transformers " in res.stdout and len(res.stdout.splitlines()) == 1
    # One version: the package's and the one pip installs from pyproject.toml.
    assert longforge.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# --help at 80 columns

def _command_paths(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every command and group of the app (typer's own click classes), with the words that reach it."""
    out = [(path, cmd)]
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        out += _command_paths(sub, (*path, name))
    return out


def test_every_help_reads_at_80_columns_with_whole_option_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer.rich_utils

    from longforge.cli import app

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 80)  # whatever TERMINAL_WIDTH the test runs under
    runner = CliRunner()
    commands = _command_paths(typer.main.get_command(app))
    assert len(commands) > 15
    for path, cmd in commands:
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        text = ANSI.sub("", res.output)
        where = " ".join(path) or "longforge"
        assert res.exit_code == 0 and "Usage" in text, (where, text)
        assert "…" not in text, f"`{where} --help` truncates:\n{text}"
        wide = [line for line in text.splitlines() if len(line) > 80]
        assert not wide, f"`{where} --help` has lines over 80 columns: {wide}"
        for param in cmd.params:
            if getattr(param, "hidden", False):
                continue
            for name in [*param.opts, *getattr(param, "secondary_opts", [])]:
                if name.startswith("-"):
                    assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"`{where} --help` lacks {name}:\n{text}"


def test_default_false_flags_take_no_negative_form() -> None:
    """A `--no-X` exists only for a flag that is on by default (it is how to turn it off): for one that is off anyway
    it only widens the help table. --no-truncate, --no-document-mask and --no-lean-norm are such flags."""
    from longforge.cli import app

    params = [p for _, cmd in _command_paths(typer.main.get_command(app)) for p in cmd.params
              if getattr(p, "secondary_opts", [])]
    negatives = {o for p in params for o in p.secondary_opts}
    assert {"--no-truncate", "--no-document-mask", "--no-lean-norm"} <= negatives
    for p in params:  # on by default: typer's default, or the schema's (a generated flag is None until given)
        assert p.default is True or "(default: True)" in (p.help or ""), (p.opts, p.secondary_opts)


# Labels

def test_model_label_names_generic_folders_by_their_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longforge.eval.run import model_label

    assert model_label(tmp_path / "demo-cache" / "base" / "final") == "base/final"
    assert model_label(tmp_path / "runs" / "x" / "train" / "extend" / "final") == "extend/final"
    assert model_label(tmp_path / "runs" / "x" / "rope") == "x/rope"
    assert model_label(tmp_path / "t" / "extend" / "checkpoints" / "step-0000100") == "extend/checkpoints/step-0000100"
    assert model_label(tmp_path / "models" / "llama-3-8b") == "llama-3-8b"
    (tmp_path / "base" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "base" / "final")
    assert model_label(Path(".")) == "base/final"
    assert model_label(Path("..") / "final") == "base/final"
    # The name the user gave, not a link's target.
    (tmp_path / "mine").symlink_to(tmp_path / "base" / "final")
    assert model_label(tmp_path / "mine") == "mine"


def _eval(model: Path, out: Path, *extra: str) -> dict:
    from longforge.cli import app

    res = CliRunner().invoke(app, ["eval", str(model), "--out", str(out), "--lengths", "64", "--depths", "1",
                                   "--target-length", "64", *extra], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    summary["_output"] = " ".join(res.output.split())  # a table's title wraps to the table's width
    return summary


def test_eval_labels_a_final_folder_by_its_parent_or_by_label(model_dir: Path, tmp_path: Path, one_thread) -> None:
    """The demo's cached base model lives in .../base/final: it is "base/final" in summary.json, the tables,
    `eval compare` and the report, not "final" like the extended model."""
    from longforge.cli import app
    from longforge.report.build import build_report

    base, ext = tmp_path / "cache" / "base" / "final", tmp_path / "run" / "train" / "extend" / "final"
    shutil.copytree(model_dir, base)
    shutil.copytree(model_dir, ext)
    sa = _eval(base, tmp_path / "eval-a")
    sb = _eval(ext, tmp_path / "eval-b")
    assert sa["label"] == "base/final" and sb["label"] == "extend/final"
    assert "base/final: by prompt length" in sa["_output"] and "extend/final: by prompt length" in sb["_output"]
    res = CliRunner().invoke(app, ["eval", "compare", str(tmp_path / "eval-a"), str(tmp_path / "eval-b"),
                                   "--out", str(tmp_path / "cmp")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert (cmp["a"]["label"], cmp["b"]["label"]) == ("base/final", "extend/final")
    assert "base/final -> extend/final" in res.output
    assert "| metric | base/final | extend/final | change |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert "base/final" in build_report(tmp_path / "eval-a")["md"].read_text()

    named = _eval(base, tmp_path / "eval-named", "--label", "my [base]")
    assert named["label"] == "my [base]" and "my [base]: by prompt length" in named["_output"]
    res = CliRunner().invoke(app, ["eval", str(base), "--out", str(tmp_path / "x"), "--label", " "])
    assert res.exit_code != 0 and "--label is empty" in str(res.exception)


def test_compare_falls_back_to_folder_names_when_labels_match(tmp_path: Path) -> None:
    from longforge.eval.compare import labels_for

    a, b = tmp_path / "r1" / "eval" / "final", tmp_path / "r2" / "eval" / "final"
    assert labels_for(a, b, ("final", "final")) == ("r1/final", "r2/final")
    assert labels_for(tmp_path / "x", tmp_path / "y", ("base/final", "base/final")) == ("x", "y")
    assert labels_for(tmp_path / "x", tmp_path / "y", ("base/final", None)) == ("x", "y")
    assert labels_for(tmp_path / "x", tmp_path / "y", ("base", "extended")) == ("base", "extended")


# Tokenizer errors

def _tokenizer_copy(tokenizer_dir: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(tokenizer_dir, out)
    return out


def _one_sentence(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".") and "Traceback" not in msg, msg
    return msg


def test_model_folder_without_tokenizer_says_what_is_missing_and_the_fix(model_dir: Path, tmp_path: Path) -> None:
    from longforge.cli import app

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model_dir.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, bare / f.name)
    res = CliRunner().invoke(app, ["eval", str(bare), "--out", str(tmp_path / "o"), "--lengths", "64"])
    assert res.exit_code != 0 and isinstance(res.exception, LongforgeError)
    assert str(res.exception) == (
        f"{bare} has no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt); copy the "
        "tokenizer files of the model it came from into it, or pass a folder that has them.")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda d: (d / "tokenizer.json").write_text("{}"),
     "tokenizer.json is not a whole tokenizer (it has no `model` or `added_tokens`); re-download or re-export it."),
    (lambda d: (d / "tokenizer.json").write_text("[]"),
     "tokenizer.json holds a JSON list, not a tokenizer; re-download or re-export it."),
    (lambda d: (d / "tokenizer.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "tokenizer.json").read_text()).items() if k != "model"})),
     "tokenizer.json is not a whole tokenizer (it has no `model`); re-download or re-export it."),
    (lambda d: (d / "tokenizer.json").write_text(json.dumps(
        {**json.loads((d / "tokenizer.json").read_text()), "model": {"type": "BPE"}})),
     "(Missing vocab/merges at line 1 column"),
    (lambda d: (d / "tokenizer_config.json").write_text("[]"),
     "tokenizer_config.json holds a JSON list, not an object of settings; re-download or re-export it."),
    (lambda d: (d / "special_tokens_map.json").write_text('"<s>"'),
     "special_tokens_map.json holds a JSON string, not an object of settings; re-download or re-export it."),
    (lambda d: ((d / "tokenizer.json").unlink(), (d / "vocab.json").write_text('{"a": 0}')),
     "has vocab.json but no merges.txt (and no tokenizer.json or tokenizer.model), so it holds no whole tokenizer; "
     "copy the tokenizer files of the model it came from into it, or pass a folder that has them."),
], ids=["empty-object", "list", "no-model", "model-without-vocab", "config-list", "special-tokens-string",
        "vocab-without-merges"])
def test_tokenizer_failures_read_as_one_sentence(tokenizer_dir: Path, tmp_path: Path, damage, expected: str) -> None:
    from longforge.hf import load_tokenizer

    d = _tokenizer_copy(tokenizer_dir, tmp_path, "tok")
    damage(d)
    with pytest.raises(LongforgeError) as e:
        load_tokenizer(d)
    msg = _one_sentence(e)
    assert expected in msg and str(d) in msg


def test_tokenizer_without_special_tokens_map_or_settings_loads(tokenizer_dir: Path, tmp_path: Path) -> None:
    from longforge.hf import load_tokenizer

    d = _tokenizer_copy(tokenizer_dir, tmp_path, "tok")
    (d / "special_tokens_map.json").unlink(missing_ok=True)
    (d / "tokenizer_config.json").write_text("{}")
    assert len(load_tokenizer(d)) == len(load_tokenizer(tokenizer_dir))


def test_slow_tokenizer_without_its_package_names_the_package(tokenizer_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from longforge import hf

    d = tmp_path / "spm"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(b"\x0a\x05hello")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    assert hf._tokenizer_problem(d) == (
        f"{d} has only a slow tokenizer (tokenizer.model, no tokenizer.json), and reading it needs the sentencepiece "
        "package; pip install sentencepiece, or copy the model's tokenizer.json into it.")


# The KV-cache keyword

class _Forward:
    """A model whose forward has a given signature (only the signature is read)."""

    def __init__(self, forward) -> None:  # noqa: ANN001
        self.forward = forward


def test_cache_keyword_follows_the_forward_signature() -> None:
    from longforge.inference.engine import cache_keyword

    def new(input_ids=None, cache=None, use_cache=None, **kwargs): ...  # noqa: ANN001, ANN202, ANN003
    def old(input_ids=None, past_key_values=None, use_cache=None, **kwargs): ...  # noqa: ANN001, ANN202, ANN003
    def remote(*args, **kwargs): ...  # noqa: ANN002, ANN003, ANN202

    assert cache_keyword(_Forward(new)) == "cache"
    assert cache_keyword(_Forward(old)) == "past_key_values"
    assert cache_keyword(_Forward(remote)) == "past_key_values"


class _OldStyle(torch.nn.Module):
    """A causal LM with transformers 5.17's forward (the cache arrives as past_key_values), around a real one."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.generation_config = inner.generation_config
        self.seen: list[str] = []

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0):  # noqa: ANN001, ANN201
        from longforge.inference.engine import cache_keyword

        self.seen.append(type(past_key_values).__name__)
        return self.inner(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep,
                          **{cache_keyword(self.inner): past_key_values})


def test_hf_path_passes_the_cache_by_the_name_the_model_takes(tokenizer, one_thread) -> None:
    """No deprecation warning from this transformers, the same tokens as model.generate, and a 5.17-style forward
    (past_key_values) still gets its cache."""
    from longforge.inference.engine import Engine

    model = make_tiny_model(len(tokenizer), window=256)
    x = torch.randint(1, len(tokenizer), (2, 30))
    ref = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, 30:].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert Engine(model, prefill_chunk=7, attention="hf", stop_on_eos=False).generate(x, 5) == ref
        old = _OldStyle(model)
        assert Engine(old, prefill_chunk=7, attention="hf", stop_on_eos=False).generate(x, 5) == ref
    assert set(old.seen) == {"DynamicCache"} and len(old.seen) == 5 + 4  # 5 prefill chunks, 4 decoding steps


def test_the_command_line_starts_without_importing_torch() -> None:
    """`longforge --help` and the schema load without torch (1.89 s -> 0.71 s): the schema's names live in model/names.py,
    and the back-ends there are the ones model/attention.py implements."""
    import subprocess
    import sys

    code = "import sys, longforge.cli, longforge.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
    from longforge.model.attention import ATTENTION_BACKENDS
    from longforge.model.names import ATTENTION_NAMES, BACKENDS

    assert tuple(ATTENTION_BACKENDS) == ATTENTION_NAMES and BACKENDS == ("auto", *ATTENTION_NAMES)
