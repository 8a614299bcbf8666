"""Training documents in the evaluation's own formats (RULER's synthetic tasks, passkey), so a small model
trained from scratch learns the tasks inside its window and the lab can test whether each extension method
carries them beyond it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from longforge.demo.retrieval import RetrievalDoc, RetrievalDocs
from longforge.eval.prompts import PromptFormat, TextHaystack
from longforge.eval.ruler import SYNTHETIC, Resources, make_sample

PLAIN = PromptFormat()
# Training samples draw their random keys from seeds far from the evaluation's (eval seeds are small numbers).
TRAIN_SEED = 7_000_000


def completion(answer_prefix: str, answers: list[str]) -> str:
    """What the model should write after the answer prefix: every reference, comma-separated."""
    lead = "" if answer_prefix.endswith(" ") else " "
    return lead + ", ".join(answers) + "."


class TaskDocs:
    """Makes RULER-format documents of about a given token length for every synthetic task."""

    def __init__(self, tokenizer: Any, essays: Path, tasks: list[str] | None = None, max_length: int = 4096):
        self.tok = tokenizer
        self.tasks = list(tasks or SYNTHETIC)
        self.res = Resources(essays=TextHaystack.load(essays, max_words=4 * max_length + 1000))
        self._slope: dict[tuple[str, bool], tuple[float, float]] = {}

    def _tokens(self, task: str, n: int, seed: int, index: int, length: int) -> tuple[list[int], list[str], str]:
        s = make_sample(task, n, seed, length, index, self.res)
        ids = PLAIN.encode(self.tok, PLAIN.render(self.tok, s.user, s.answer_prefix))
        return ids, s.answers, s.answer_prefix

    def _units_per_token(self, task: str, length: int) -> tuple[float, float]:
        """Prompt tokens as a linear function of haystack units (fixed cost, tokens per unit), measured once."""
        key = (task, length >= 4096)  # cwe changes its repeat counts at 4096 tokens, as RULER does
        if key not in self._slope:
            a = len(self._tokens(task, 4, TRAIN_SEED, 0, length)[0])
            b = len(self._tokens(task, 64, TRAIN_SEED, 0, length)[0])
            self._slope[key] = (a - 4 * (b - a) / 60, max((b - a) / 60, 0.1))
        return self._slope[key]

    def make(self, task: str, length: int, seed: int, index: int) -> RetrievalDoc | None:
        """A document of at most `length` tokens (prompt + weighted answer), or None when the task cannot fit."""
        fixed, per = self._units_per_token(task, length)
        n = int((length - fixed - 24) / per)
        for _ in range(4):
            if n < 1:
                return None
            ids, answers, prefix = self._tokens(task, n, seed, index, length)
            ans = list(self.tok(completion(prefix, answers), add_special_tokens=False)["input_ids"])
            total = len(ids) + len(ans)
            if total <= length:
                return RetrievalDoc(ids + ans, (len(ids), len(ids) + len(ans)))
            n = int(n * length / total) - 1
        return None

    def pool(self, count: int, min_length: int, max_length: int, seed: int) -> list[RetrievalDoc]:
        """`count` documents over every task, lengths uniform in [min_length, max_length]; tasks that do not fit are skipped."""
        rng = np.random.default_rng([seed, 11])
        out: list[RetrievalDoc] = []
        tries = 0
        while len(out) < count and tries < 4 * count:
            task = self.tasks[tries % len(self.tasks)]
            doc = self.make(task, int(rng.integers(min_length, max_length + 1)), TRAIN_SEED + seed, tries)
            tries += 1
            if doc is not None:
                out.append(doc)
        return out


def save_pool(docs: list[RetrievalDoc], path: Path) -> None:
    """One JSON line per document: token ids and the answer span."""
    with path.open("w") as fh:
        for d in docs:
            fh.write(json.dumps({"ids": d.ids, "answer": list(d.answer)}) + "\n")


def load_pool(path: Path) -> list[RetrievalDoc]:
    """The documents save_pool wrote."""
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out.append(RetrievalDoc(r["ids"], (r["answer"][0], r["answer"][1])))
    return out


def retrieval_texts(tokenizer: Any, corpus: np.ndarray, tasks: TaskDocs, count: int, max_length: int,
                    seed: int) -> Iterator[str]:
    """Texts for an extension corpus: passkey and RULER-format documents, lengths uniform in [64, max_length]."""
    rng = np.random.default_rng([seed, 12])
    passkeys = RetrievalDocs(tokenizer, corpus)
    made = 0
    i = 0
    while made < count and i < 4 * count:
        n = int(rng.integers(64, max_length + 1))
        if i % 3 == 0:
            doc: RetrievalDoc | None = passkeys.make(n, rng, "noise" if i % 2 == 0 else "text")
        else:
            doc = tasks.make(tasks.tasks[i % len(tasks.tasks)], n, TRAIN_SEED + 1000 + seed, i)
        i += 1
        if doc is not None:
            made += 1
            yield tokenizer.decode(doc.ids, skip_special_tokens=True)
