"""The peers benchmark's suite logic (benchmarks/train_peers_gpu.py) with its case processes faked: a kind that does not
fit or times out is not run at longer lengths, save_attention falls back to full recomputation and keeps it, the
deadline stops new cases, results are written after every case, and the table reads them. No training here: the
--smoke mode runs the real cases on CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIT = {"tokens_per_s": 1000.0, "step_s": 1.0, "mfu": 0.3, "peak_mem_gib": 10.0, "losses": [10.8]}


@pytest.fixture
def peers(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The benchmark module, loaded from its file (benchmarks/ is not a package)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("train_peers_gpu", ROOT / "benchmarks" / "train_peers_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def outcome(case: dict[str, Any]) -> dict[str, Any]:
    """transformers never fits, Liger times out from 64K on, longforge fits only with full recomputation without
    documents and always with them."""
    if case["impl"] == "hf":
        return {"oom": True, "detail": "CUDA out of memory"}
    if case["impl"] == "liger":
        if case["seq"] > 32768:
            return {"timeout": True, "error": "timed out after 400 s"}
        return {**FIT, "tokens_per_s": 800.0}
    if not case.get("docs") and case["policy"] == "save_attention":
        return {"oom": True, "detail": "CUDA out of memory"}
    return dict(FIT)


def run(peers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        deadline: float | None = None) -> tuple[list, list]:
    """The 135M suite under the fake launch: (results, the cases launched)."""
    calls: list[dict[str, Any]] = []

    def launch(case: dict[str, Any], tmp: Path, devices: Any, timeout: float, script: str = "") -> dict[str, Any]:
        calls.append(case)
        return {**case, **outcome(case)}

    monkeypatch.setattr(peers.train_gpu, "launch", launch)
    results = peers.run_suite(peers.SUITES["peers135m"], tmp_path / "r.json", None, 400.0, deadline)
    return results, calls


def test_kinds_that_failed_are_not_run_longer(peers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results, calls = run(peers, tmp_path, monkeypatch)
    assert [c["seq"] for c in calls if c["impl"] == "hf"] == [32768]
    assert [c["seq"] for c in calls if c["impl"] == "liger"] == [32768, 65536]
    hf = [r for r in results if r["impl"] == "hf"]
    assert [r.get("oom") for r in hf] == [True, True, True]
    assert [r.get("not_run") for r in hf] == [None, "oom at 32768 tokens", "oom at 32768 tokens"]
    liger = [r for r in results if r["impl"] == "liger"]
    assert liger[2]["timeout"] and liger[2]["not_run"] == "timeout at 65536 tokens"
    assert json.loads((tmp_path / "r.json").read_text()) == results


def test_fallback_is_kept_for_longer_lengths(peers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results, calls = run(peers, tmp_path, monkeypatch)
    plain = [(c["seq"], c["policy"]) for c in calls if c["impl"] == "longforge" and not c.get("docs")]
    assert plain == [(32768, "save_attention"), (32768, "full"), (65536, "full"), (131072, "full")]
    docs = [(c["seq"], c["policy"]) for c in calls if c.get("docs")]
    assert docs == [(s, "save_attention") for s in (32768, 65536, 131072)]
    assert sum(bool(r.get("superseded")) for r in results) == 1


def test_table_compares_with_the_faster_peer(peers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results, _ = run(peers, tmp_path, monkeypatch)
    lines = peers.table(results).splitlines()
    assert len(lines) == 2 + 12  # header, rule, 4 kinds x 3 lengths (the superseded attempt left out)
    row = next(line for line in lines if "| 32768 | longforge (full recomputation) |" in line)
    assert "1.25x" in row and "30.0%" in row  # 1000 tok/s against Liger's 800
    assert "| 65536 | transformers | does not fit (not run: oom at 32768 tokens) |" in peers.table(results)
    assert "| 65536 | transformers + Liger | timeout |" in peers.table(results)


def test_deadline_stops_new_cases(peers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results, calls = run(peers, tmp_path, monkeypatch, deadline=0.0)
    assert calls == []
    assert len(results) == 12 and all(r["not_run"].startswith("deadline") for r in results)


def test_suites_order_and_settings(peers: Any) -> None:
    for name, cases in peers.SUITES.items():
        assert cases, name
        assert all(c["opt"] == peers.PEER_OPT for c in cases)
    cases = peers.SUITES["peers8b-64k"]
    kinds = [(c["impl"], c.get("docs", 0)) for c in cases]
    assert kinds == [("hf", 0), ("liger", 0), ("longforge", 0), ("longforge", 8)]
    assert [c["seq"] for c in peers.SUITES["peers05b"]] == sorted(c["seq"] for c in peers.SUITES["peers05b"])
    assert len(peers.SUITES["peers"]) == 5 * 3 * 4


def test_a_case_cut_by_the_deadline_stops_nothing(peers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timeouts: list[float] = []

    def launch(case: dict[str, Any], tmp: Path, devices: Any, timeout: float, script: str = "") -> dict[str, Any]:
        timeouts.append(timeout)
        return {**case, "timeout": True, "error": f"timed out after {timeout:.0f} s"}

    monkeypatch.setattr(peers.train_gpu, "launch", launch)
    results = peers.run_suite(peers.SUITES["peers135m"], tmp_path / "r.json", None, 400.0, 100.0)
    assert len(timeouts) == 12 and all(t <= 100 for t in timeouts)  # every case tried, each within the deadline
    assert all(r["cut_by_deadline"] and not r.get("not_run") for r in results)
    assert "not finished: stopped by the deadline" in peers.table(results)
