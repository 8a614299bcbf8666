"""The command line: user errors are one clear line with exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longforge", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_bad_recipe_is_one_line_without_traceback(micro_recipe: dict, tmp_path: Path) -> None:
    micro_recipe["positions"]["metod"] = "yarn"
    micro_recipe["target_length"] = "long"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(micro_recipe))
    res = _run("run", "r.yaml", cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 2
    assert "Traceback" not in out
    assert "unknown key `positions.metod`; did you mean `method`?" in out
    assert "`target_length` input should be a valid integer" in out


def test_missing_model_folder(tmp_path: Path) -> None:
    res = _run("rope", str(tmp_path / "nope"), "--target-length", "1024", "--dry-run", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr
    assert "does not exist; pass a Hugging Face checkpoint folder" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_rope_dry_run_prints_the_table(model_dir: Path, tmp_path: Path) -> None:
    res = _run("rope", str(model_dir), "--method", "yarn", "--target-length", "512", "--alpha", "1", "--beta", "4",
               "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "factor 8, original 64 -> 512" in res.stdout
    assert '"rope_type": "yarn"' in res.stdout and not any(tmp_path.iterdir())


def test_every_command_has_help(tmp_path: Path) -> None:
    for cmd in (["run"], ["demo"], ["data", "build"], ["data", "inspect"], ["rope"], ["train"], ["merge"], ["eval"], ["report"]):
        res = _run(*cmd, "--help", cwd=tmp_path)
        assert res.returncode == 0 and "Usage" in res.stdout, cmd
