"""Bad inputs end in one sentence, checked where they enter: damaged checkpoints, YAML tags, a full disk."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from longforge import cli
from longforge.errors import LongforgeError

pytestmark = pytest.mark.usefixtures("one_thread")

TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Run `longforge ARGS` in this process through cli.main; returns the exit code and everything printed."""
    monkeypatch.setattr(sys, "argv", ["longforge", *args])
    with pytest.raises(SystemExit) as ex:
        cli.main()
    cap = capsys.readouterr()
    return int(ex.value.code or 0), cap.out + cap.err


def _refused(code: int, out: str, *phrases: str) -> None:
    """Exit code 2, one `error:` line holding every phrase, no traceback."""
    assert code == 2, out
    assert "Traceback" not in out
    line = next(ln for ln in out.splitlines() if ln.startswith("error:"))
    for p in phrases:
        assert p in line, out


def _copy(model_dir: Path, dst: Path) -> Path:
    shutil.copytree(model_dir, dst)
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated weights": lambda m: _truncate(m / "model.safetensors"),
    "invalid config": lambda m: (m / "config.json").write_text('{"model_type": "llama", "hidden_size": 32,'),
    "config without model_type": lambda m: (m / "config.json").write_text('{"hidden_size": 32}'),
    "corrupt tokenizer": lambda m: _truncate(m / "tokenizer.json"),
}
SAYS = {
    "truncated weights": ("model.safetensors is truncated", "re-download or re-export it"),
    "invalid config": ("config.json is not valid JSON",),
    "config without model_type": ("config.json has no `model_type`",),
    "corrupt tokenizer": ("tokenizer.json is damaged",),
}


@pytest.fixture
def damaged(model_dir: Path, tmp_path: Path) -> Callable[[str], Path]:
    """A copy of the tiny checkpoint with one kind of damage."""

    def make(kind: str) -> Path:
        m = _copy(model_dir, tmp_path / kind.replace(" ", "-"))
        DAMAGE[kind](m)
        return m

    return make


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, tokenizer_dir: Path) -> Path:
    """A small packed data folder (64-token sequences) for `longforge train`."""
    from longforge.config import DataSpec, SourceSpec
    from longforge.data.build import build_data

    out = tmp_path_factory.mktemp("bad-inputs") / "data"
    build_data(DataSpec(sources=[SourceSpec(name="long", path=corpus_dir / "long.jsonl")], plan="none",
                        token_budget=2000), tokenizer_dir, 64, out)
    return out


def _stage_args(stage: str, model: Path, model_dir: Path, data: Path, out: Path) -> list[str]:
    """The command line of one stage reading `model`, writing `out`."""
    return {
        "eval": ["eval", str(model), "--out", str(out), "--lengths", "64", "--depths", "1", "--device", "cpu"],
        "rope": ["rope", str(model), "--target-length", "256", "--out", str(out)],
        "rope --dry-run": ["rope", str(model), "--target-length", "256", "--dry-run"],
        "train": ["train", str(model), "--data", str(data), "--out", str(out), "--steps", "1", "--lr", "1e-3",
                  "--device", "cpu"],
        "merge": ["merge", str(model), str(model_dir), "--out", str(out)],
    }[stage]


CASES = [(kind, stage) for kind, stages in (
    ("truncated weights", ("eval", "rope", "train", "merge")),
    ("invalid config", ("eval", "rope", "rope --dry-run")),
    ("config without model_type", ("eval", "rope")),
    ("corrupt tokenizer", ("rope", "train", "merge")),
) for stage in stages]


@pytest.mark.parametrize(("kind", "stage"), CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_stage_refuses_a_damaged_checkpoint(kind: str, stage: str, damaged: Callable[[str], Path], model_dir: Path,
                                            data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    m = damaged(kind)
    out = tmp_path / "out"
    code, text = _cli(monkeypatch, capsys, *_stage_args(stage, m, model_dir, data_dir, out))
    _refused(code, text, *SAYS[kind])
    # Nothing of the damaged checkpoint was passed on: no output folder (train: no final checkpoint).
    assert not (out / "final").exists() and not (out / "config.json").exists() and not (out / "tokenizer.json").exists()


def test_rope_dry_run_needs_only_the_config(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    m = tmp_path / "config-only"
    m.mkdir()
    shutil.copy2(model_dir / "config.json", m / "config.json")
    code, text = _cli(monkeypatch, capsys, "rope", str(m), "--target-length", "256", "--dry-run")
    assert code == 0 and "factor 4, original 64 -> 256" in text, text
    code, text = _cli(monkeypatch, capsys, "rope", str(m), "--target-length", "256", "--out", str(tmp_path / "o"))
    _refused(code, text, "has no weight files")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["truncated weights", "invalid config", "corrupt tokenizer"])
def test_run_refuses_a_damaged_base_model_before_any_stage(kind: str, damaged: Callable[[str], Path], micro_recipe: dict,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    micro_recipe["model"]["path"] = str(damaged(kind))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(micro_recipe))
    run_dir = tmp_path / "run"
    code, text = _cli(monkeypatch, capsys, "run", str(tmp_path / "r.yaml"), "--out", str(run_dir))
    _refused(code, text, *SAYS[kind])
    assert not (run_dir / "data").exists() and not (run_dir / "rope").exists()


def test_run_refuses_a_damaged_merge_partner_before_any_stage(damaged: Callable[[str], Path], micro_recipe: dict,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    micro_recipe["stages"].append({"name": "blend", "kind": "merge", "merge": {"other": str(damaged("truncated weights"))}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(micro_recipe))
    run_dir = tmp_path / "run"
    code, text = _cli(monkeypatch, capsys, "run", str(tmp_path / "r.yaml"), "--out", str(run_dir))
    _refused(code, text, *SAYS["truncated weights"])
    assert not (run_dir / "data").exists()


def test_eval_spec_with_a_python_tag_is_one_sentence(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("passkey: !!python/object/apply:os.system ['touch pwned']\n")
    code, text = _cli(monkeypatch, capsys, "eval", str(model_dir), "--out", str(tmp_path / "o"), "--spec", str(spec),
                      "--device", "cpu")
    _refused(code, text, str(spec), "not valid YAML at line 1")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_eval_spec_that_is_not_utf8_is_one_sentence(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"passkey:\n  lengths: [64]\n# \xff\xfe\n")
    code, text = _cli(monkeypatch, capsys, "eval", str(model_dir), "--out", str(tmp_path / "o"), "--spec", str(spec),
                      "--device", "cpu")
    _refused(code, text, str(spec), "UTF-8")


# ---------------------------------------------------------------- verify_checkpoint on its own


def test_verify_checkpoint_accepts_a_whole_checkpoint(model_dir: Path) -> None:
    from longforge.integrity import verify_checkpoint

    assert verify_checkpoint(model_dir) == model_dir


def test_verify_checkpoint_names_a_missing_shard_and_trailing_bytes(model_dir: Path, tmp_path: Path) -> None:
    from longforge.integrity import verify_checkpoint

    m = _copy(model_dir, tmp_path / "m")
    (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(LongforgeError, match="lists model-00002-of-00002.safetensors, which is missing"):
        verify_checkpoint(m)
    (m / "model.safetensors.index.json").unlink()
    with (m / "model-00001-of-00002.safetensors").open("ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(LongforgeError, match="16 bytes after its last tensor"):
        verify_checkpoint(m)


def test_verify_checkpoint_refuses_a_folder_without_weights_and_a_damaged_header(model_dir: Path, tmp_path: Path) -> None:
    from longforge.hf import check_checkpoint, read_config
    from longforge.integrity import verify_checkpoint

    m = _copy(model_dir, tmp_path / "m")
    (m / "model.safetensors").write_bytes((100).to_bytes(8, "little") + b"{not json" + b" " * 91)
    with pytest.raises(LongforgeError, match="header is damaged"):
        verify_checkpoint(m)
    (m / "model.safetensors").unlink()
    with pytest.raises(LongforgeError, match="has no weight files"):
        check_checkpoint(m)
    # A caller that needs only the config (read_config) does not ask for weights.
    assert read_config(m)["model_type"] == "llama"


def test_verify_checkpoint_refuses_a_truncated_pytorch_bin(model_dir: Path, tmp_path: Path) -> None:
    import torch

    from longforge.integrity import verify_checkpoint

    m = _copy(model_dir, tmp_path / "m")
    (m / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(64)}, m / "pytorch_model.bin")
    assert verify_checkpoint(m) == m
    _truncate(m / "pytorch_model.bin")
    with pytest.raises(LongforgeError, match="pytorch_model.bin is truncated"):
        verify_checkpoint(m)


# ---------------------------------------------------------------- a full disk


def test_writing_translates_torch_and_safetensors_disk_errors(tmp_path: Path) -> None:
    from longforge.files import writing

    target = tmp_path / "x.safetensors"
    with pytest.raises(LongforgeError, match=r"the disk is full while writing .*x.safetensors; free space"):
        with writing(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(LongforgeError, match=r"the disk is full while writing .*x.safetensors"):
        with writing(target):
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    # PyTorch's zip writer says only 'unexpected pos'; tmp_path has room, so the sentence says what it usually means.
    with pytest.raises(LongforgeError, match=r"could not write .*x.safetensors: PyTorch's file writer failed .*usually "
                                             r"means the disk is full"):
        with writing(target):
            raise RuntimeError(TORCH_FULL)
    with pytest.raises(RuntimeError, match="something else"):
        with writing(target):
            raise RuntimeError("something else")


def test_writing_confirms_a_full_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longforge import files

    monkeypatch.setattr(files, "free_space", lambda path: 0)
    with pytest.raises(LongforgeError, match=r"the disk is full while writing .*ck; free space"):
        with files.writing(tmp_path / "ck"):
            raise RuntimeError(f"PytorchStreamWriter failed writing file data/0: file write failed; {TORCH_FULL}")


def test_disk_full_while_eval_writes_is_one_sentence(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    code, text = _cli(monkeypatch, capsys, "eval", str(model_dir), "--out", str(out), "--lengths", "64", "--depths", "1",
                      "--device", "cpu")
    _refused(code, text, f"the disk is full while writing {out / 'passkey.json'}", "run the same command again")
    assert not (out / "passkey.json").exists()


def test_disk_full_during_a_checkpoint_save_is_one_sentence(model_dir: Path, data_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    def full(*args: object, **kwargs: object) -> None:
        # What torch.distributed.checkpoint raises when the disk fills (a BaseException wrapping torch's RuntimeError).
        raise CheckpointException("write", {0: (RuntimeError(TORCH_FULL), [])})

    monkeypatch.setattr(dcp, "save", full)
    out = tmp_path / "t"
    code, text = _cli(monkeypatch, capsys, "train", str(model_dir), "--data", str(data_dir), "--out", str(out),
                      "--steps", "1", "--lr", "1e-3", "--device", "cpu")
    _refused(code, text, f"could not write {out}", "usually means the disk is full", "run the same command again")


def test_cli_main_turns_a_stray_disk_full_oserror_into_the_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    def full() -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(cli, "app", full)
    monkeypatch.chdir(tmp_path)
    code, text = _cli(monkeypatch, capsys, "data", "build", "--out", "built")
    _refused(code, text, "the disk is full while writing built;")
    # Other errors still show their traceback (they are bugs to report, not user errors).
    monkeypatch.setattr(cli, "app", lambda: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    monkeypatch.setattr(sys, "argv", ["longforge"])
    with pytest.raises(OSError, match="I/O error"):
        cli.main()


@contextlib.contextmanager
def _small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder` (skips the test where this process may not mount)."""
    folder.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder: Path) -> None:
    """Fill a filesystem to the last byte."""
    with (folder / "ballast").open("wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)


def test_a_really_full_disk_during_eval_and_training(model_dir: Path, data_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    with _small_disk(tmp_path / "disk", "256k") as disk:
        _fill(disk)
        out = disk / "eval"
        code, text = _cli(monkeypatch, capsys, "eval", str(model_dir), "--out", str(out), "--lengths", "64",
                          "--depths", "1", "--device", "cpu")
        _refused(code, text, f"the disk is full while writing {out / 'passkey.json'}")
        (disk / "ballast").unlink()
        # 256 KiB holds the training log but not a checkpoint of model and optimizer (about 450 KiB).
        out = disk / "train"
        code, text = _cli(monkeypatch, capsys, "train", str(model_dir), "--data", str(data_dir), "--out", str(out),
                          "--steps", "1", "--lr", "1e-3", "--device", "cpu")
        _refused(code, text, f"the disk is full while writing {out}")
