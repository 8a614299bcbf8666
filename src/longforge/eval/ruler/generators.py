"""RULER's sample generators: a pure function of (seed sequence, haystack size) per task family.

The random choices (keys, values, depths, words) are drawn from a generator made from the seed sequence, so a
sample is reproducible and its size can be searched (binary search over the haystack) without changing what it asks.
"""

from __future__ import annotations

import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longforge.errors import LongforgeError
from longforge.eval.prompts import TextHaystack, insert_at_depths, noise_sentences
from longforge.eval.ruler.qa import QAData
from longforge.eval.ruler.tasks import TASKS
from longforge.eval.ruler.templates import (CWE_PREFIX, CWE_TEMPLATE, FWE_PREFIX, FWE_TEMPLATE, NIAH_NEEDLE, NIAH_PREFIX,
                                            NIAH_TEMPLATE, QA_PREFIX, QA_TEMPLATE, VT_PREFIX, VT_TEMPLATE)
from longforge.eval.words import key_words, plain_words, word_pool

DEPTHS = [round(float(x)) / 100 for x in np.linspace(0, 100, 40)]


@dataclass(frozen=True)
class RulerSample:
    """A generated sample: what the user turn says, how the answer starts, and the references."""

    user: str
    answer_prefix: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Resources:
    """What some tasks need from the user: an essay haystack, SQuAD, HotpotQA."""

    essays: TextHaystack | None = None
    qa: dict[str, QAData] = field(default_factory=dict)


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _distinct(rng: np.random.Generator, draw: Callable[[], str], n: int, avoid: set[str] | None = None) -> list[str]:
    """n distinct values from `draw` that are not in `avoid`."""
    out: list[str] = []
    seen = set(avoid or ())
    while len(out) < n:
        x = draw()
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _query_text(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def niah_sample(rng: np.random.Generator, n: int, p: dict[str, Any], res: Resources) -> RulerSample:
    """A RULER needle-in-a-haystack sample with n haystack units (sentences, essay words, or distractor needles)."""
    keys_pool = key_words()
    draw_key = (lambda: keys_pool[int(rng.integers(len(keys_pool)))]) if p["key"] == "words" else (lambda: _uuid(rng))
    draw_value = (lambda: str(int(rng.integers(1_000_000, 10_000_000)))) if p["value"] == "numbers" else (lambda: _uuid(rng))
    keys = _distinct(rng, draw_key, p["k"])
    values = [[draw_value() for _ in range(p["v"])] for _ in keys]
    type_v = p["value"]
    needles = [NIAH_NEEDLE.format(type_needle_v=type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    depths = [float(d) for d in rng.choice(DEPTHS, size=len(needles), replace=False)]
    asked = sorted(int(i) for i in rng.choice(len(keys), size=p["q"], replace=False))
    query_keys = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    if p["haystack"] == "noise":
        sentences, sep = noise_sentences(n), " "
    elif p["haystack"] == "essay":
        assert res.essays is not None
        sentences, sep = res.essays.sentences(n), " "
    else:
        # The haystack is made of needles: other keys with their own values.
        others = _distinct(rng, draw_key, n, avoid=set(keys))
        sentences = [NIAH_NEEDLE.format(type_needle_v=type_v, key=k, value=draw_value()) for k in others]
        sep = "\n"
    parts, where = insert_at_depths(sentences, needles, depths)
    template, prefix = NIAH_TEMPLATE, NIAH_PREFIX
    if p["q"] * p["v"] == 1:
        # RULER's singular wording when one value is asked for (needles keep the plural).
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        prefix = prefix.replace("are", "is")
        type_v = type_v[:-1]
    query = _query_text(query_keys)
    user = template.format(type_needle_v=type_v, context=sep.join(parts), query=query)
    return RulerSample(user, prefix.format(type_needle_v=type_v, query=query), answers,
                       {"keys": query_keys, "needle_depths": depths, "needle_units": where})


def _var_name(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(string.ascii_uppercase), size=5))


def _vt_parts(rng: np.random.Generator, n: int, chains: int, hops: int) -> tuple[str, str, list[str]]:
    """Variable-tracking context, value queried and the chain's variables."""
    value = str(int(rng.integers(10000, 100000)))
    names = _distinct(rng, lambda: _var_name(rng), chains * (hops + 1))
    statements: list[str] = []
    answers: list[str] = []
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        # Only the first chain carries the queried value; further chains are distractors with their own values.
        start = value if c == 0 else str(int(rng.integers(10000, 100000)))
        statements.append(f"VAR {chain[0]} = {start}.")
        statements += [f"VAR {chain[i + 1]} = VAR {chain[i]}." for i in range(hops)]
        if c == 0:
            answers = chain
    depths = sorted(float(x) for x in rng.random(len(statements)))
    parts, _ = insert_at_depths(noise_sentences(n), statements, depths)
    return " ".join(parts), value, answers


def vt_sample(rng: np.random.Generator, n: int, p: dict[str, Any], res: Resources) -> RulerSample:
    """Variable tracking: a chain VAR A = v, VAR B = VAR A, ... hidden in noise; name every variable holding v."""
    ex_ctx, ex_value, ex_answers = _vt_parts(np.random.default_rng(rng.integers(2**32) + 1), 5, p["chains"], p["hops"])
    example = (VT_TEMPLATE.format(context=ex_ctx, query=ex_value)
               + VT_PREFIX.format(num_v=len(ex_answers), query=ex_value) + " ".join(ex_answers) + "\n\n")
    ctx, value, answers = _vt_parts(rng, n, p["chains"], p["hops"])
    user = example + VT_TEMPLATE.format(context=ctx, query=value)
    return RulerSample(user, VT_PREFIX.format(num_v=len(answers), query=value), answers, {"value": value})


def _cwe_list(rng: np.random.Generator, num_words: int, common_repeats: int, uncommon_repeats: int,
              num_cw: int) -> tuple[str, list[str]]:
    """A numbered, shuffled word list: num_cw common words repeated, the other words fewer times."""
    singles = plain_words()
    common = [singles[int(i)] for i in rng.choice(len(singles), size=num_cw, replace=False)]
    # No uncommon word may contain a common one, or substring scoring would credit it.
    pool = [w for w in word_pool(num_words + 4 * len(singles)) if not any(c in w for c in common)]
    if num_words - num_cw > len(pool):
        raise LongforgeError(f"cwe needs {num_words - num_cw} distinct words, more than the {len(pool)} built in; use shorter lengths.")
    uncommon = [pool[int(i)] for i in rng.choice(len(pool), size=num_words - num_cw, replace=False)]
    words = common * common_repeats + uncommon * uncommon_repeats
    order = rng.permutation(len(words))
    return " ".join(f"{i + 1}. {words[j]}" for i, j in enumerate(order)), common


def cwe_sample(rng: np.random.Generator, n: int, p: dict[str, Any], res: Resources, length: int) -> RulerSample:
    """Common word extraction: 10 words x30 among words x3 (RULER's settings; x6 and x1 below 4096 tokens)."""
    num_cw = p["num_cw"]
    ex_rng = np.random.default_rng(rng.integers(2**32) + 1)
    if length < 4096:
        ex_ctx, ex_ans = _cwe_list(ex_rng, 20, 3, 1, num_cw)
        ctx, answers = _cwe_list(rng, num_cw + n, 6, 1, num_cw)
    else:
        ex_ctx, ex_ans = _cwe_list(ex_rng, 40, 10, 3, num_cw)
        ctx, answers = _cwe_list(rng, num_cw + n, 30, 3, num_cw)
    example = (CWE_TEMPLATE.format(context=ex_ctx) + CWE_PREFIX + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans)) + "\n\n")
    return RulerSample(example + CWE_TEMPLATE.format(context=ctx), CWE_PREFIX, answers, {})


def zeta(alpha: float, terms: int = 10000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (partial sum plus the Euler-Maclaurin tail)."""
    k = np.arange(1, terms + 1, dtype=np.float64)
    return float(np.sum(k ** -alpha) + terms ** (1 - alpha) / (alpha - 1) - 0.5 * terms ** -alpha)


def fwe_sample(rng: np.random.Generator, n: int, p: dict[str, Any], res: Resources) -> RulerSample:
    """Frequent word extraction: n coded words with Zipf(alpha) counts; the top word is noise ('...'), answers ranks 2-4."""
    letters = np.array(list(string.ascii_lowercase))[rng.integers(0, 26, size=(2 * p["vocab"], p["wordlen"]))]
    vocab = sorted(list(dict.fromkeys("".join(row) for row in letters))[: p["vocab"]])
    vocab = [vocab[int(i)] for i in rng.permutation(len(vocab))]
    vocab[0] = "..."
    ranks = np.arange(1, len(vocab) + 1, dtype=np.float64)
    counts = (n * ranks ** -p["alpha"] / zeta(p["alpha"])).astype(int)
    words = [w for w, c in zip(vocab, counts) for _ in range(int(c))]
    order = rng.permutation(len(words))
    ctx = " ".join(words[int(i)] for i in order)
    return RulerSample(FWE_TEMPLATE.format(context=ctx), FWE_PREFIX, vocab[1:4], {"counts": [int(c) for c in counts[:5]]})


def qa_sample(rng: np.random.Generator, n: int, p: dict[str, Any], res: Resources, index: int, seed: int) -> RulerSample:
    """QA: the question's gold paragraphs among n distractor paragraphs, shuffled, as numbered documents."""
    data = res.qa[p["dataset"]]
    # Sample i asks question order[i] at every length, so lengths compare the same questions.
    order = np.random.default_rng(seed).permutation(len(data.questions))
    question, answers, gold = data.questions[int(order[index % len(order)])]
    others = [i for i in range(len(data.docs)) if i not in set(gold)]
    if n > len(others):
        raise LongforgeError(f"{data.name} has {len(others)} distractor paragraphs but the prompt needs {n}; give a larger file or shorter lengths.")
    chosen = list(gold) + [others[int(i)] for i in rng.choice(len(others), size=n, replace=False)]
    chosen = [chosen[int(i)] for i in rng.permutation(len(chosen))]
    ctx = "\n\n".join(f"Document {i + 1}:\n{data.docs[d]}" for i, d in enumerate(chosen))
    return RulerSample(QA_TEMPLATE.format(context=ctx, query=question), QA_PREFIX, answers, {"question": question})


# Each family's generator, called as (rng, haystack units, task parameters, resources, length, sample index, seed).
FAMILIES: dict[str, Callable[..., RulerSample]] = {
    "niah": lambda rng, n, p, res, length, index, seed: niah_sample(rng, n, p, res),
    "vt": lambda rng, n, p, res, length, index, seed: vt_sample(rng, n, p, res),
    "cwe": lambda rng, n, p, res, length, index, seed: cwe_sample(rng, n, p, res, length),
    "fwe": lambda rng, n, p, res, length, index, seed: fwe_sample(rng, n, p, res),
    "qa": lambda rng, n, p, res, length, index, seed: qa_sample(rng, n, p, res, index, seed),
}


def make_sample(task: str, n: int, seed: int, length: int, index: int, res: Resources) -> RulerSample:
    """Sample `index` of `task` at `length` with n haystack units, deterministic in (seed, task, length, index, n)."""
    d = TASKS[task]
    rng = np.random.default_rng([seed, list(TASKS).index(task), length, index])
    return FAMILIES[d.family](rng, n, d.params, res, length, index, seed)
