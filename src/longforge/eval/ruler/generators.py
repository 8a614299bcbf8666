"""RULER's sample generators: a pure function of (seed sequence, haystack size) per task family.

The random choices (keys, values, depths, words) are drawn from a generator made from the seed sequence, so a
sample is reproducible and its size can be searched (binary search over the haystack) without changing what it asks.
"""

from __future__ import annotations

import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longforge.errors import LongforgeError
from longforge.eval.prompts import TextHaystack
from longforge.eval.ruler.qa import QAData
from longforge.eval.ruler.tasks import TASKS
from longforge.eval.ruler.templates import (CWE_PREFIX, CWE_TEMPLATE, FWE_PREFIX, FWE_TEMPLATE, NIAH_NEEDLE, NIAH_PREFIX,
                                            NIAH_TEMPLATE, NOISE_BLOCK, QA_PREFIX, QA_TEMPLATE, VT_PREFIX, VT_TEMPLATE)
from longforge.eval.words import key_words, plain_words, word_pool

DEPTHS = [round(float(x)) / 100 for x in np.linspace(0, 100, 40)]
# Noise paragraphs in vt's worked example. RULER fills the example to 500 tokens with its tokenizer (about 15
# paragraphs with Llama's); a fixed count keeps the example's text the same for every tokenizer.
VT_EXAMPLE_UNITS = 15


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


def insert_among(rng: np.random.Generator, units: list[str], items: list[str]) -> tuple[list[str], list[int]]:
    """RULER's insertion into a noise or needle haystack: item j goes before unit slots[j], the slots distinct random
    units in ascending order (items keep their order); returns the list and the items' indices in it.

    With fewer units than items (a prompt-size search tries tiny haystacks) slots may repeat.
    """
    n, k = len(units), len(items)
    if n >= k:
        slots = sorted(int(x) for x in rng.choice(n, size=k, replace=False))
    else:
        slots = sorted(int(x) for x in rng.integers(0, n + 1, size=k))
    return _insert(units, items, slots)


def insert_at_sentences(sentences: list[str], items: list[str], depths: list[float]) -> tuple[list[str], list[int]]:
    """RULER's insertion into essays: the items, in order, at sentences int(n x depth) of the depths in ascending order."""
    n = len(sentences)
    slots = sorted(int(n * d) for d in depths)
    return _insert(sentences, items, slots)


def _insert(units: list[str], items: list[str], slots: list[int]) -> tuple[list[str], list[int]]:
    """Item j before unit slots[j] (slots ascending, items in order); the new list and the items' indices in it."""
    out = list(units)
    where = []
    for j, (slot, item) in enumerate(zip(slots, items)):
        out.insert(slot + j, item)
        where.append(slot + j)
    return out, where


def niah_sample(rng: np.random.Generator, n: int, p: dict[str, Any], res: Resources) -> RulerSample:
    """A RULER needle-in-a-haystack sample with n haystack units (noise paragraphs, essay words, or distractor needles)."""
    keys_pool = key_words()
    draw_key = (lambda: keys_pool[int(rng.integers(len(keys_pool)))]) if p["key"] == "words" else (lambda: _uuid(rng))
    draw_value = (lambda: str(int(rng.integers(1_000_000, 10_000_000)))) if p["value"] == "numbers" else (lambda: _uuid(rng))
    keys = _distinct(rng, draw_key, p["k"])
    values = [[draw_value() for _ in range(p["v"])] for _ in keys]
    type_v = p["value"]
    needles = [NIAH_NEEDLE.format(type_needle_v=type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    needles = [needles[int(i)] for i in rng.permutation(len(needles))]  # RULER shuffles the needles' order
    asked = [int(i) for i in rng.choice(len(keys), size=p["q"], replace=False)]  # in RULER's random order
    query_keys = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    if p["haystack"] == "essay":
        assert res.essays is not None
        depths = [float(d) for d in rng.choice(DEPTHS, size=len(needles), replace=False)]
        parts, where = insert_at_sentences(res.essays.sentences(n), needles, depths)
        context = " ".join(parts)
    else:
        if p["haystack"] == "noise":
            units = [NOISE_BLOCK] * n
        else:
            # The haystack is made of needles: other keys with their own values.
            others = _distinct(rng, draw_key, n, avoid=set(keys))
            units = [NIAH_NEEDLE.format(type_needle_v=type_v, key=k, value=draw_value()) for k in others]
        parts, where = insert_among(rng, units, needles)
        context = "\n".join(parts)
        depths = [round(w / max(len(parts) - 1, 1), 4) for w in where]
    template, prefix = NIAH_TEMPLATE, NIAH_PREFIX
    if p["q"] * p["v"] == 1:
        # RULER's singular wording when one value is asked for (needles keep the plural).
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        prefix = prefix.replace("are", "is")
        type_v = type_v[:-1]
    query = _query_text(query_keys)
    user = template.format(type_needle_v=type_v, context=context, query=query)
    return RulerSample(user, prefix.format(type_needle_v=type_v, query=query), answers,
                       {"keys": query_keys, "needle_depths": depths, "needle_units": where})


def _var_names(rng: np.random.Generator, n: int, letters: int) -> list[str]:
    """n distinct variable names of `letters` capital letters."""
    return _distinct(rng, lambda: "".join(rng.choice(list(string.ascii_uppercase), size=letters)), n)


def _vt_value(rng: np.random.Generator) -> str:
    return str(int(rng.integers(10000, 99999)))  # RULER's np.random.randint(10000, 99999)


def _vt_parts(rng: np.random.Generator, n: int, chains: int, hops: int, letters: int) -> tuple[str, str, list[str]]:
    """Variable-tracking context (n noise paragraphs with the chains' statements, one per line), the value queried
    and the first chain's variables."""
    names = _var_names(rng, chains * (hops + 1), letters)
    # Only the first chain's value is asked for; further chains are distractors with their own values. Drawn before
    # the haystack, whose size the prompt fitting changes, so the question stays the same.
    values = [_vt_value(rng) for _ in range(chains)]
    units = [NOISE_BLOCK] * n
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        # RULER's statements: no full stop, and a space after each hop's right-hand side.
        statements = [f"VAR {chain[0]} = {values[c]}"] + [f"VAR {chain[i + 1]} = VAR {chain[i]} " for i in range(hops)]
        units, _ = insert_among(rng, units, statements)
    return "\n".join(units), values[0], names[:hops + 1]


def vt_sample(rng: np.random.Generator, n: int, p: dict[str, Any], res: Resources) -> RulerSample:
    """Variable tracking: a chain VAR A = v, VAR B = VAR A, ... hidden in noise; name every variable holding v.

    One worked example comes first, as in RULER: its own chain (3-letter names, at most 10 hops) in VT_EXAMPLE_UNITS
    noise paragraphs, with its answer, then a blank line.
    """
    ex_rng = np.random.default_rng(rng.integers(2**32) + 1)
    ex_hops = min(10, p["hops"])
    ex_ctx, ex_value, ex_answers = _vt_parts(ex_rng, VT_EXAMPLE_UNITS, p["chains"], ex_hops, 3)
    example = (VT_TEMPLATE.format(context=ex_ctx, query=ex_value)
               + VT_PREFIX.format(num_v=ex_hops + 1, query=ex_value) + " " + " ".join(ex_answers) + "\n\n")
    ctx, value, answers = _vt_parts(rng, n, p["chains"], p["hops"], 5)
    user = example + VT_TEMPLATE.format(context=ctx, query=value)
    return RulerSample(user, VT_PREFIX.format(num_v=p["hops"] + 1, query=value), answers, {"value": value})


def _cwe_list(rng: np.random.Generator, num_words: int, common_repeats: int, uncommon_repeats: int,
              num_cw: int) -> tuple[str, list[str]]:
    """A numbered, shuffled word list: num_cw common words repeated, the other words fewer times."""
    singles = plain_words()
    common = [singles[int(i)] for i in rng.choice(len(singles), size=num_cw, replace=False)]
    # No uncommon word may contain a common one, or substring scoring would credit it (one regular expression of
    # the common words scans the pool at C speed; a Python test per pair took most of a cwe task's building time).
    contains = re.compile("|".join(map(re.escape, common))).search
    pool = [w for w in word_pool(num_words + 4 * len(singles)) if not contains(w)]
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
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans)) + "\n")
    return RulerSample(example + CWE_TEMPLATE.format(context=ctx), CWE_PREFIX, answers, {})


def zeta(alpha: float, terms: int = 10000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (partial sum plus the Euler-Maclaurin tail)."""
    k = np.arange(1, terms + 1, dtype=np.float64)
    return float(np.sum(k ** -alpha) + terms ** (1 - alpha) / (alpha - 1) - 0.5 * terms ** -alpha)


def fwe_vocab(length: int, budget: int) -> int:
    """RULER's coded vocabulary size for a prompt length: the prompt's token budget over 50 (at least the 4 ranks read)."""
    return max(4, (length - budget) // 50)


def fwe_sample(rng: np.random.Generator, n: int, p: dict[str, Any], res: Resources, length: int) -> RulerSample:
    """Frequent word extraction: n coded words with Zipf(alpha) counts; the top word is noise ('...'), answers ranks 2-4."""
    size = fwe_vocab(length, TASKS["fwe"].max_new_tokens)
    letters = np.array(list(string.ascii_lowercase))[rng.integers(0, 26, size=(2 * size + 8, p["wordlen"]))]
    vocab = sorted(list(dict.fromkeys("".join(row) for row in letters))[:size])
    vocab = [vocab[int(i)] for i in rng.permutation(len(vocab))]
    vocab[0] = "..."
    ranks = np.arange(1, len(vocab) + 1, dtype=np.float64)
    counts = (n * ranks ** -p["alpha"] / zeta(p["alpha"])).astype(int)
    words = [w for w, c in zip(vocab, counts) for _ in range(int(c))]
    order = rng.permutation(len(words))
    ctx = " ".join(words[int(i)] for i in order)
    return RulerSample(FWE_TEMPLATE.format(context=ctx), FWE_PREFIX, vocab[1:4], {"counts": [int(c) for c in counts[:5]]})


def qa_sample(rng: np.random.Generator, n: int, p: dict[str, Any], res: Resources, index: int) -> RulerSample:
    """QA: question `index` of the file (as RULER: the first questions, the same at every length) with its gold
    paragraphs among n distractors (SQuAD: its article's other paragraphs first, as RULER), shuffled, numbered."""
    data = res.qa[p["dataset"]]
    q = index % len(data.questions)
    question, answers, gold = data.questions[q]
    related = [i for i in data.related[q] if i not in set(gold)] if data.related else []
    others = [i for i in range(len(data.docs)) if i not in set(gold) and i not in set(related)]
    if n > len(related) + len(others):
        raise LongforgeError(f"{data.name} has {len(related) + len(others)} distractor paragraphs but the prompt needs {n}; give a larger file or shorter lengths.")
    if n <= len(related):
        chosen = list(gold) + [related[int(i)] for i in rng.choice(len(related), size=n, replace=False)]
    else:
        chosen = list(gold) + related + [others[int(i)] for i in rng.choice(len(others), size=n - len(related), replace=False)]
    chosen = [chosen[int(i)] for i in rng.permutation(len(chosen))]
    ctx = "\n\n".join(f"Document {i + 1}:\n{data.docs[d]}" for i, d in enumerate(chosen))
    return RulerSample(QA_TEMPLATE.format(context=ctx, query=question), QA_PREFIX, answers, {"question": question})


# Each family's generator, called as (rng, haystack units, task parameters, resources, length, sample index).
FAMILIES: dict[str, Callable[..., RulerSample]] = {
    "niah": lambda rng, n, p, res, length, index: niah_sample(rng, n, p, res),
    "vt": lambda rng, n, p, res, length, index: vt_sample(rng, n, p, res),
    "cwe": lambda rng, n, p, res, length, index: cwe_sample(rng, n, p, res, length),
    "fwe": lambda rng, n, p, res, length, index: fwe_sample(rng, n, p, res, length),
    "qa": lambda rng, n, p, res, length, index: qa_sample(rng, n, p, res, index),
}


def make_sample(task: str, n: int, seed: int, length: int, index: int, res: Resources) -> RulerSample:
    """Sample `index` of `task` at `length` with n haystack units, deterministic in (seed, task, length, index, n)."""
    d = TASKS[task]
    rng = np.random.default_rng([seed, list(TASKS).index(task), length, index])
    return FAMILIES[d.family](rng, n, d.params, res, length, index)
