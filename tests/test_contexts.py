"""Typed contexts and registries: attention settings bound to the layers, the layout as the one source of rank and
slicing, the back-end and optimizer registries the schema names, and evaluation apart from training."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import get_args

import torch

from conftest import make_tiny_model
from longforge.config import StageSpec
from longforge.model.attention import (ATTENTION_BACKENDS, BACKENDS, AttentionContext, attention_layers, context_of,
                                       use_longforge_attention)
from longforge.model.parallel import Layout

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def test_nothing_under_evaluation_or_inference_imports_training() -> None:
    for pkg in ("eval", "inference"):
        for f in sorted((ROOT / "src" / "longforge" / pkg).rglob("*.py")):
            bad = {n for n in _imports(f) if n == "longforge.train" or n.startswith("longforge.train.")}
            assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
    # Nor through what they import.
    code = ("import pkgutil, importlib, sys, longforge.eval, longforge.inference\n"
            "for pkg in (longforge.eval, longforge.inference):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(m.name)\n"
            "print(sorted(n for n in sys.modules if n.startswith('longforge.train')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_attention_settings_are_bound_once_and_the_engine_leaves_them_as_they_were() -> None:
    from longforge.inference import Engine
    from longforge.train.parallelize import parallelize

    model = make_tiny_model(50)
    training = parallelize(model, StageSpec(steps=1), Layout.single("cpu"), 24)
    assert training.attention == AttentionContext(backend="dense") and training.backend == "dense"
    layers = attention_layers(model)
    assert len(layers) == 2 and all(context_of(m) is training.attention for m in layers)

    bound = AttentionContext(backend="sdpa")
    model = make_tiny_model(50)
    assert use_longforge_attention(model, bound) == 2
    x = torch.randint(1, 50, (1, 20))
    engine = Engine(model, prefill_chunk=8, stop_on_eos=False)
    assert engine.path == "longforge"
    engine.generate(x, 3)
    assert engine.window_nll(x)[1] == 19
    # The KV store reached the attention through the layers' context only while the engine ran.
    assert all(context_of(m) is bound for m in attention_layers(model))
    assert model.config._attn_implementation == "longforge"


def test_the_layout_slices_the_sequence_and_waits() -> None:
    one = Layout.single("cpu")
    assert (one.world, one.sp, one.sequence_parallel, one.sequence_slice(10)) == (1, 1, None, slice(0, 10))
    one.barrier()  # nothing to wait for in one process
    rank3 = Layout(4, 3, 2, 2, torch.device("cpu"), sp_group="group")
    assert rank3.sequence_slice(8) == slice(4, 8) and rank3.sequence_parallel.size == 2  # type: ignore[union-attr]


def test_backends_and_optimizers_are_the_registries_the_schema_names() -> None:
    from longforge.train.optim import OPTIMIZERS, BF16AdamW, make_optimizer

    assert set(BACKENDS) == set(get_args(StageSpec.model_fields["attention"].annotation))
    assert BACKENDS[0] == "auto" and set(BACKENDS[1:]) == set(ATTENTION_BACKENDS)
    assert set(OPTIMIZERS) == set(get_args(StageSpec.model_fields["optimizer"].annotation))
    net = make_tiny_model(50)
    assert type(make_optimizer(net, "adamw", 1e-3, (0.9, 0.95), 0.1)) is torch.optim.AdamW
    assert type(make_optimizer(net, "adamw_bf16", 1e-3, (0.9, 0.95), 0.1)) is BF16AdamW
