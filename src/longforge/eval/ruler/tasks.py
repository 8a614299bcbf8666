"""RULER's tasks: each one's generator family, parameters, metric, answer budget and the user data it needs.

As NVIDIA/RULER's scripts/synthetic.yaml (parameters), scripts/data/synthetic/constants.py (tokens_to_generate: the
answer budget, which RULER also keeps free within the prompt length) and scripts/eval/synthetic/constants.py (metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskDef:
    """One RULER task: its generator family and parameters, metric, answer budget and the data it needs."""

    family: str
    params: dict[str, Any]
    metric: str = "string_match_all"
    max_new_tokens: int = 128  # RULER's tokens_to_generate: what is generated, and kept free within the length
    needs: str | None = None


def _niah(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> TaskDef:
    return TaskDef("niah", {"haystack": haystack, "key": key, "value": value, "k": k, "v": v, "q": q},
                   needs="essays" if haystack == "essay" else None)


TASKS: dict[str, TaskDef] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", k=4, q=4),
    "vt": TaskDef("vt", {"chains": 1, "hops": 4}, max_new_tokens=30),
    "cwe": TaskDef("cwe", {"num_cw": 10}, max_new_tokens=120),
    "fwe": TaskDef("fwe", {"alpha": 2.0, "wordlen": 6}, max_new_tokens=50),  # vocabulary: (length - 50) // 50
    "qa_1": TaskDef("qa", {"dataset": "squad"}, metric="string_match_part", max_new_tokens=32, needs="squad"),
    "qa_2": TaskDef("qa", {"dataset": "hotpotqa"}, metric="string_match_part", max_new_tokens=32, needs="hotpotqa"),
}
SYNTHETIC = [t for t, d in TASKS.items() if d.family != "qa"]
