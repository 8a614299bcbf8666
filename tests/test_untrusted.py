"""Files longforge receives run no code (checkpoints, model folders), and a resume continues only the same run."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from longforge.config import StageSpec
from longforge.errors import LongforgeError
from longforge.train.loop import train_model
from longforge.train.schedule import lr_at
from test_train import _Source, _spec

CPU = torch.device("cpu")
OWN_CODE = "ships its own model code (auto_map in config.json) and longforge does not run code from checkpoints; " \
           "pass --trust-remote-code (or model.trust_remote_code: true) only if you trust it"


class Planted:
    """Unpickling this touches a marker file: a harmless stand-in for code planted in a received file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def _said(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Collect the status lines training prints."""
    lines: list[str] = []
    import longforge.train.checkpoint as checkpoint
    import longforge.train.loop as loop

    monkeypatch.setattr(loop, "say", lines.append)
    monkeypatch.setattr(checkpoint, "say", lines.append)
    return lines


def _interrupted(out: Path, spec: StageSpec | None = None, model=None, **kw) -> Path:  # noqa: ANN001
    """Train until step 3 fails, leaving the checkpoint of step 2; returns that checkpoint folder."""
    with pytest.raises(KeyboardInterrupt):
        train_model(model or make_tiny_model(50), _Source(50, 2, fail_at=3), spec or _spec(), out, CPU, **kw)
    return out / "checkpoints" / "step-0000002"


def _weights(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- planted pickles


def test_planted_pickle_in_an_rng_file_does_not_run_on_resume(tmp_path: Path) -> None:
    ck = _interrupted(tmp_path / "run")
    marker = tmp_path / "ran"
    for f in ck.glob("rng-*"):
        f.unlink()
    torch.save({"torch": torch.get_rng_state(), "numpy": Planted(marker)}, ck / "rng-0.pt")
    # torch.save pickles Path.touch as getattr(Path, "touch"): the first name the weights-only reader refuses.
    with pytest.raises(LongforgeError, match=r"holds a pickled object of type builtins.getattr that longforge does "
                                             r"not load; it may not come from longforge"):
        train_model(make_tiny_model(50), _Source(50, 2), _spec(), tmp_path / "run", CPU)
    assert not marker.exists()


def test_planted_pickle_in_dcp_metadata_does_not_run(tmp_path: Path) -> None:
    ck = _interrupted(tmp_path / "run")
    marker = tmp_path / "ran"
    with (ck / ".metadata").open("rb") as fh:
        metadata = pickle.load(fh)  # our own file, just written by the test
    metadata.planner_data["planted"] = Planted(marker)
    with (ck / ".metadata").open("wb") as fh:
        pickle.dump(metadata, fh)
    with pytest.raises(LongforgeError, match=re.escape(f"checkpoint {ck} holds a pickled object of type pathlib.Path.touch "
                                                       "that longforge does not load; it may not come from longforge")):
        train_model(make_tiny_model(50), _Source(50, 2), _spec(), tmp_path / "run", CPU)
    assert not marker.exists()


def test_planted_pickle_in_a_dcp_bytes_item_does_not_run(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from longforge.model.loss import LossModel
    from longforge.train.optim import make_optimizer

    ck = _interrupted(tmp_path / "run")
    marker = tmp_path / "ran"
    net = LossModel(make_tiny_model(50))
    model_sd, optim_sd = get_state_dict(net, make_optimizer(net, "adamw", 3e-3, (0.9, 0.95), 0.1))
    optim_sd["param_groups"][0]["lr"] = Planted(marker)  # non-tensor items are pickled one by one
    for f in [ck / ".metadata", *ck.glob("*.distcp")]:
        f.unlink()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ck))
    with pytest.raises(LongforgeError, match="holds a pickled object of type builtins.getattr that longforge does not load"):
        train_model(make_tiny_model(50), _Source(50, 2), _spec(), tmp_path / "run", CPU)
    assert not marker.exists()


def test_metadata_unpickler_allows_what_dcp_writes_and_nothing_else(tmp_path: Path) -> None:
    import io

    from torch.distributed.checkpoint.metadata import Metadata

    from longforge.train.checkpoint import read_dcp_metadata

    ck = _interrupted(tmp_path / "run", StageSpec(steps=6, batch_size=2, lr=1e-3, save_every=2, optimizer="adamw_bf16",
                                                  precision="bf16"))
    with (ck / ".metadata").open("rb") as fh:
        assert isinstance(read_dcp_metadata(ck, fh), Metadata)
    for planted in (pickle.dumps(Planted(tmp_path / "x")), pickle.dumps(print), pickle.dumps(torch.load)):
        with pytest.raises(LongforgeError, match="holds a pickled object of type"):
            read_dcp_metadata(ck, io.BytesIO(planted))
    with pytest.raises(LongforgeError, match="holds a pickled object of type builtins.dict"):
        read_dcp_metadata(ck, io.BytesIO(pickle.dumps({"not": "metadata"})))
    with pytest.raises(LongforgeError, match="damaged .metadata"):
        read_dcp_metadata(ck, io.BytesIO((ck / ".metadata").read_bytes()[:50]))
    assert not (tmp_path / "x").exists()


def test_rng_state_is_safetensors_and_older_rng_pt_files_still_resume_bitwise(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open

    # bf16 stochastic rounding draws from torch's global generator: a lost RNG state would change the weights.
    spec = StageSpec(steps=5, batch_size=2, grad_accum=2, lr=3e-3, save_every=2, optimizer="adamw_bf16", precision="bf16")
    straight = make_tiny_model(50)
    train_model(straight, _Source(50, 2), spec, tmp_path / "a", CPU)
    ck = _interrupted(tmp_path / "b", spec)
    assert sorted(p.name for p in ck.glob("rng-*")) == ["rng-0.safetensors"]
    # Rewrite the RNG state the way an older longforge saved it (a torch.save'd dict with numpy's array).
    with safe_open(str(ck / "rng-0.safetensors"), "pt") as fh:
        t = {k: fh.get_tensor(k) for k in fh.keys()}
        scalars = json.loads(fh.metadata()["longforge_rng"])
    name, pos, has_gauss, cached = scalars["numpy"]
    version, gauss_next = scalars["python"]
    legacy = {"torch": t["torch"], "numpy": (name, t["numpy"].numpy().astype("uint32"), pos, has_gauss, cached),
              "python": (version, tuple(t["python"].tolist()), gauss_next)}
    torch.save(legacy, ck / "rng-0.pt")
    (ck / "rng-0.safetensors").unlink()
    said = _said(monkeypatch)
    torch.manual_seed(1234)  # scramble the streams: they must come back from the file
    fresh = make_tiny_model(50, seed=99)
    train_model(fresh, _Source(50, 2), spec, tmp_path / "b", CPU)
    assert "step-0000002: RNG state read from the older rng-0.pt format as plain tensors (nothing in it is run)" in said
    for (k, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------- checkpoint code shipped in a model folder


@pytest.fixture
def evil_model(tmp_path: Path, tokenizer_dir: Path, tokenizer) -> tuple[Path, Path]:  # noqa: ANN001
    """A checkpoint of an unknown model type whose auto_map points at evil.py, which touches a marker when imported."""
    from longforge.hf import copy_tokenizer

    folder, marker = tmp_path / "evil-model", tmp_path / "EVIL_RAN"
    make_tiny_model(len(tokenizer)).save_pretrained(folder)
    copy_tokenizer(tokenizer_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evilnet", architectures=["EvilModel"],
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evilnet'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return folder, marker


def test_train_never_imports_checkpoint_code_even_answering_yes(evil_model: tuple[Path, Path], tmp_path: Path,
                                                                 tokenizer_dir: Path, corpus_dir: Path) -> None:
    from longforge.config import DataSpec, SourceSpec
    from longforge.data.build import build_data

    folder, marker = evil_model
    build_data(DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none", token_budget=1500),
               tokenizer_dir, 64, tmp_path / "data")
    cmd = [sys.executable, "-m", "longforge", "train", str(folder), "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "out"), "--steps", "1", "--device", "cpu"]
    res = subprocess.run(cmd, input="y\n" * 10, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().endswith(f"{folder} {OWN_CODE}"), res.stderr
    assert not marker.exists()
    assert not (tmp_path / "out" / "final").exists()


def test_every_loader_refuses_checkpoint_code_without_the_opt_in(evil_model: tuple[Path, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from longforge.hf import load_config, load_model, load_tokenizer

    folder, marker = evil_model
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # whatever a prompt would read says yes
    for load in (load_config, load_model):
        with pytest.raises(LongforgeError) as e:
            load(folder)
        assert str(e.value) == f"{folder} {OWN_CODE}"
    assert load_tokenizer(folder) is not None  # a tokenizer of a class transformers knows needs no code from the folder
    # A tokenizer whose own class is in the folder: transformers would import it too.
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("tokenizer_class", None)
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(LongforgeError, match=r"ships its own tokenizer code \(auto_map in tokenizer_config.json\)"):
        load_tokenizer(folder)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["rope", "eval", "merge", "analyze"])
def test_stage_commands_refuse_checkpoint_code(evil_model: tuple[Path, Path], tmp_path: Path, corpus_dir: Path,
                                               command: str) -> None:
    from typer.testing import CliRunner

    from longforge.cli import app

    folder, marker = evil_model
    args = {"rope": ["rope", str(folder), "--target-length", "256", "--dry-run"],
            "eval": ["eval", str(folder), "--out", str(tmp_path / "ev"), "--device", "cpu"],
            "merge": ["merge", str(folder), str(folder), "--out", str(tmp_path / "m")],
            "analyze": ["analyze", "impactful", "--base", str(folder), "--extended", str(folder),
                        "--data", str(corpus_dir / "long.jsonl"), "--out", str(tmp_path / "a"), "--device", "cpu"]}[command]
    res = CliRunner().invoke(app, args, input="y\n" * 10)
    assert isinstance(res.exception, LongforgeError), res.output
    assert str(res.exception) == f"{folder} {OWN_CODE}"
    assert not marker.exists()
    assert not any((tmp_path / d).exists() for d in ("ev", "m", "a"))


def test_recipe_with_checkpoint_code_is_refused_before_any_stage(evil_model: tuple[Path, Path], tmp_path: Path,
                                                                 micro_recipe: dict) -> None:
    from longforge.config import Recipe
    from longforge.runner import run_recipe

    folder, marker = evil_model
    recipe = Recipe.model_validate({**micro_recipe, "model": {"path": str(folder)}})
    with pytest.raises(LongforgeError, match=re.escape(OWN_CODE)):
        run_recipe(recipe, tmp_path / "run")
    assert not marker.exists()


def test_the_opt_in_reaches_transformers(evil_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import transformers
    from longforge.cli import app

    folder, _ = evil_model
    seen: list[object] = []

    def record(path, **kw):  # noqa: ANN001, ANN202
        seen.append(kw.get("trust_remote_code"))
        raise ValueError("recorded")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record)
    for flag in ([], ["--trust-remote-code"]):
        CliRunner().invoke(app, ["rope", str(folder), "--target-length", "256", "--dry-run", *flag])
    assert seen == [True]  # without the flag nothing reached transformers; with it, an explicit True did
    from longforge.config import ModelSpec

    assert ModelSpec(path=folder).trust_remote_code is False


# ---------------------------------------------------------------- resume continues the same run only


def test_resume_with_another_lr_is_refused(tmp_path: Path) -> None:
    ck = _interrupted(tmp_path / "run")
    other = StageSpec(**{**_spec().model_dump(), "lr": 2e-3})
    with pytest.raises(LongforgeError, match=re.escape(f"checkpoint {ck} was trained with lr 0.003, but this run asks "
                                                       "for lr 0.002; resume with the same setting, or train into a new --out")):
        train_model(make_tiny_model(50), _Source(50, 2), other, tmp_path / "run", CPU)
    both = StageSpec(**{**_spec().model_dump(), "warmup_steps": 0, "schedule": "constant"})
    with pytest.raises(LongforgeError, match=r"with schedule 'cosine' and warmup_steps 2, but this run asks for "
                                             r"schedule 'constant' and warmup_steps 0; resume with the same settings"):
        train_model(make_tiny_model(50), _Source(50, 2), both, tmp_path / "run", CPU)


def test_resume_with_another_model_folder_is_refused(tmp_path: Path, tokenizer_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from longforge.hf import load_model

    a, b = tmp_path / "model-a", tmp_path / "model-b"
    make_tiny_model(50).save_pretrained(a)
    make_tiny_model(50, seed=1).save_pretrained(b)
    ck = _interrupted(tmp_path / "run", model=load_model(a), tokenizer_from=tokenizer_dir)
    a, b = a.resolve(), b.resolve()
    with pytest.raises(LongforgeError, match=re.escape(f"checkpoint {ck} continues the model in {a}, but this run loads "
                                                       f"{b}, whose config or weights differ; resume with {a}, or train "
                                                       "into a new --out")):
        train_model(load_model(b), _Source(50, 2), _spec(), tmp_path / "run", CPU, tokenizer_from=tokenizer_dir)
    # The tokenizer the stage exports with is part of the run too.
    other_tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, other_tok)
    cfg = json.loads((other_tok / "tokenizer_config.json").read_text())
    (other_tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 99}))
    with pytest.raises(LongforgeError, match=re.escape(f"continues the tokenizer in {tokenizer_dir.resolve()}, but this "
                                                       f"run loads {other_tok.resolve()}, whose tokenizer files differ")):
        train_model(load_model(a), _Source(50, 2), _spec(), tmp_path / "run", CPU, tokenizer_from=other_tok)
    # The same model moved elsewhere is the same model: noted, and the resume goes on.
    moved = tmp_path / "moved-a"
    shutil.copytree(a, moved)
    said = _said(monkeypatch)
    train_model(load_model(moved), _Source(50, 2), _spec(), tmp_path / "run", CPU, tokenizer_from=tokenizer_dir)
    assert f"train: the model folder is now {moved.resolve()} (was {a}); its config or weights are the same" in said
    # Changed in place: refused as well.
    make_tiny_model(50, seed=2).save_pretrained(moved)
    with pytest.raises(LongforgeError, match=re.escape(f"continues the model in {moved.resolve()}, whose config or "
                                                       "weights have changed since")):
        train_model(load_model(moved), _Source(50, 2), _spec(8), tmp_path / "run", CPU, tokenizer_from=tokenizer_dir)


def test_raising_steps_says_how_the_schedule_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    six, nine = _spec(6), _spec(9)
    train_model(make_tiny_model(50), _Source(50, 2), six, tmp_path / "run", CPU)
    said = _said(monkeypatch)
    res = train_model(make_tiny_model(50), _Source(50, 2), nine, tmp_path / "run", CPU)
    assert said[0] == (f"train: steps raised from 6 to 9: the schedule is recomputed for 9 steps; lr at step 7 is "
                       f"{lr_at(6, nine):.2e} instead of continuing from {lr_at(5, six):.2e}")
    assert said[1] == f"train: resuming from step 6 of 9 (checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-0000006'})"
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 10))
    assert log[6]["lr"] == lr_at(6, nine) and log[5]["lr"] == lr_at(5, six)
    assert res.steps == 9 and not res.done_before
    with pytest.raises(LongforgeError, match=r"is at step 9, past the 6 steps asked for; pass --steps 9 or more"):
        train_model(make_tiny_model(50), _Source(50, 2), six, tmp_path / "run", CPU)


def test_a_finished_stage_rerun_says_it_is_done_and_exports_nothing(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first = train_model(make_tiny_model(50), _Source(50, 2), _spec(4), tmp_path / "run", CPU)
    weights = tmp_path / "run" / "final" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    said = _said(monkeypatch)
    again = train_model(make_tiny_model(50), _Source(50, 2), _spec(4), tmp_path / "run", CPU)
    ck = tmp_path / "run" / "checkpoints" / "step-0000004"
    assert said == [f"train: already done at step 4 (checkpoint {ck}); final model {tmp_path / 'run' / 'final'}"]
    assert again.done_before and again.last_loss == first.last_loss and again.tokens == 0
    assert weights.stat().st_mtime_ns == stamp
    # Killed after the last checkpoint but before the export: the re-run exports and says from where.
    shutil.rmtree(tmp_path / "run" / "final")
    said.clear()
    third = train_model(make_tiny_model(50), _Source(50, 2), _spec(4), tmp_path / "run", CPU)
    assert said == [f"train: resuming from step 4 of 4 (checkpoint {ck})"]
    assert weights.is_file() and third.last_loss == first.last_loss


def test_a_damaged_meta_json_means_an_incomplete_checkpoint(tmp_path: Path) -> None:
    straight = make_tiny_model(50)
    train_model(straight, _Source(50, 2), _spec(), tmp_path / "a", CPU)
    train_model(make_tiny_model(50), _Source(50, 2), _spec(), tmp_path / "b", CPU)
    ck = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-0000004", "step-0000006"]
    (ck / "step-0000006" / "meta.json").write_text('{"step": 6, "lo')  # cut short, as a crash in old versions left it
    shutil.rmtree(tmp_path / "b" / "final")
    (ck / "step-0000001").mkdir()
    (ck / "step-0000001" / "notes.txt").write_text("mine")  # not a checkpoint longforge wrote: never removed
    fresh = make_tiny_model(50, seed=99)
    train_model(fresh, _Source(50, 2), _spec(), tmp_path / "b", CPU)
    for (k, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert json.loads((ck / "step-0000006" / "meta.json").read_text())["step"] == 6
    assert (ck / "step-0000001" / "notes.txt").read_text() == "mine"
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert la == lb


def test_resume_with_other_data_or_seed_is_still_refused(tmp_path: Path, tokenizer_dir: Path, tokenizer,  # noqa: ANN001
                                                          corpus_dir: Path) -> None:
    from longforge.config import DataSpec, SourceSpec
    from longforge.data.build import build_data
    from longforge.data.store import PackedDataset
    from longforge.train.batches import PackedBatches

    build_data(DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none", token_budget=1500),
               tokenizer_dir, 64, tmp_path / "data")
    ds = PackedDataset(tmp_path / "data")
    two = StageSpec(steps=2, batch_size=1, lr=1e-3, save_every=1)
    train_model(make_tiny_model(len(tokenizer)), PackedBatches(ds, 1, 1, seed=0), two, tmp_path / "run", CPU)
    refused = r"the saved loader state has seed=0 but this run has 1; resume with the data and seed"
    for spec in (two, StageSpec(steps=3, batch_size=1, lr=1e-3, save_every=1)):  # finished, and resumed further
        with pytest.raises(LongforgeError, match=refused):
            train_model(make_tiny_model(len(tokenizer)), PackedBatches(ds, 1, 1, seed=1), spec, tmp_path / "run", CPU)
