"""RULER (Hsieh et al. 2024): the synthetic tasks with RULER's templates, parameters and metrics, plus QA on user files.

Every generator is a pure function of (seed sequence, haystack size): the random choices (keys, values,
depths, words) are drawn from a generator made from the seed sequence, so a sample is reproducible and
its size can be searched (binary search over the haystack) without changing what it asks.
"""

from __future__ import annotations

import json
import math
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longforge.errors import LongforgeError
from longforge.progress import say
from longforge.inference import as_engine
from longforge.eval.grid import Prompt, generate_all
from longforge.eval.metrics import all_found, string_match_all, string_match_part
from longforge.eval.prompts import PromptFormat, PromptTooLong, TextHaystack, fit_count, insert_at_depths, noise_sentences, prompt_hash
from longforge.eval.words import key_words, plain_words, word_pool

THRESHOLD = 85.6  # Llama-2-7B's RULER average at 4K: the bar for "effective length"
DEPTHS = [round(float(x)) / 100 for x in np.linspace(0, 100, 40)]

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# "assgined" is RULER's own spelling; kept so prompts match the benchmark's.
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assgined the value {query}, they are: ")
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_PREFIX = " Answer:"


@dataclass(frozen=True)
class TaskDef:
    """One RULER task: its generator family and parameters, metric, answer budget and the data it needs."""

    family: str
    params: dict[str, Any]
    metric: str = "string_match_all"
    max_new_tokens: int = 128
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
    "fwe": TaskDef("fwe", {"alpha": 2.0, "vocab": 2000, "wordlen": 6}, max_new_tokens=50),
    "qa_1": TaskDef("qa", {"dataset": "squad"}, metric="string_match_part", max_new_tokens=32, needs="squad"),
    "qa_2": TaskDef("qa", {"dataset": "hotpotqa"}, metric="string_match_part", max_new_tokens=32, needs="hotpotqa"),
}
SYNTHETIC = [t for t, d in TASKS.items() if d.family != "qa"]


@dataclass(frozen=True)
class RulerSample:
    """A generated sample: what the user turn says, how the answer starts, and the references."""

    user: str
    answer_prefix: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class QAData:
    """Paragraphs and questions of a QA set; each question names its gold paragraphs."""

    name: str
    docs: list[str]
    questions: list[tuple[str, list[str], list[int]]]


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


def make_sample(task: str, n: int, seed: int, length: int, index: int, res: Resources) -> RulerSample:
    """Sample `index` of `task` at `length` with n haystack units, deterministic in (seed, task, length, index, n)."""
    d = TASKS[task]
    rng = np.random.default_rng([seed, list(TASKS).index(task), length, index])
    if d.family == "niah":
        return niah_sample(rng, n, d.params, res)
    if d.family == "vt":
        return vt_sample(rng, n, d.params, res)
    if d.family == "cwe":
        return cwe_sample(rng, n, d.params, res, length)
    if d.family == "fwe":
        return fwe_sample(rng, n, d.params, res)
    return qa_sample(rng, n, d.params, res, index, seed)


def score(task: str, prediction: str, answers: list[str]) -> float:
    """RULER's metric for the task, in [0, 1]."""
    if TASKS[task].metric == "string_match_part":
        return string_match_part(prediction, answers)
    return string_match_all(prediction, answers)


def answer_done(task: str, text: str, answers: list[str]) -> bool:
    """True once more tokens cannot change the score: every reference found (any one, for QA)."""
    if TASKS[task].metric == "string_match_part":
        return any(a.lower() in text.lower() for a in answers)
    return all_found(text, answers)


def load_squad(path: Path) -> QAData:
    """SQuAD (v1 or v2 JSON): every paragraph is a document; answerable questions with their paragraph as gold."""
    data = _read_json(path, "SQuAD")
    docs: list[str] = []
    questions: list[tuple[str, list[str], list[int]]] = []
    try:
        for article in data["data"]:
            for para in article["paragraphs"]:
                docs.append(para["context"])
                for qa in para["qas"]:
                    answers = [a["text"] for a in qa.get("answers", [])]
                    if answers and not qa.get("is_impossible", False):
                        questions.append((qa["question"], list(dict.fromkeys(answers)), [len(docs) - 1]))
    except (KeyError, TypeError):
        raise LongforgeError(f"{path} is not in SQuAD's format (data -> paragraphs -> context, qas); pass the official dev JSON.") from None
    return _check_qa(QAData("SQuAD", docs, questions), path)


def load_hotpotqa(path: Path) -> QAData:
    """HotpotQA (distractor dev JSON): each question's context paragraphs are its gold documents, as in RULER."""
    data = _read_json(path, "HotpotQA")
    index: dict[str, int] = {}
    docs: list[str] = []
    questions: list[tuple[str, list[str], list[int]]] = []
    try:
        for item in data:
            gold = []
            for title, sentences in item["context"]:
                text = f"{title}\n{''.join(sentences)}"
                if text not in index:
                    index[text] = len(docs)
                    docs.append(text)
                gold.append(index[text])
            questions.append((item["question"], [item["answer"]], gold))
    except (KeyError, TypeError, ValueError):
        raise LongforgeError(f"{path} is not in HotpotQA's format (a list of question, answer, context); pass the distractor dev JSON.") from None
    return _check_qa(QAData("HotpotQA", docs, questions), path)


def _read_json(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise LongforgeError(f"{what} file {path} does not exist; pass the dataset's JSON file.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LongforgeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); pass {what}'s JSON file.") from None


def _check_qa(data: QAData, path: Path) -> QAData:
    if not data.questions:
        raise LongforgeError(f"{path} has no answerable questions; pass {data.name}'s dev set.")
    return data


def ruler_lengths(target: int) -> list[int]:
    """RULER's lengths (4K, 8K, ... doubling) up to the target; below 4K targets, from an eighth of the target."""
    start = 4096 if target >= 4096 else max(64, 2 ** int(math.log2(max(target // 8, 1))))
    out, n = [], start
    while n < target:
        out.append(n)
        n *= 2
    return out + [target]


def build_task(task: str, tokenizer: Any, lengths: list[int], samples: int, seed: int, res: Resources,
               fmt: PromptFormat) -> tuple[list[Prompt], dict[str, str]]:
    """Every prompt of one task, each sample fitted to its length (haystack size searched with the tokenizer).

    Returns the prompts and, per length where even an empty haystack does not fit, why it was skipped.
    """
    prompts: list[Prompt] = []
    skipped: dict[str, str] = {}
    guess = None
    for length in sorted(lengths):

        def tokens(i: int, length: int = length) -> Callable[[int], int]:
            def count(n: int) -> int:
                s = make_sample(task, n, seed, length, i, res)
                return len(fmt.encode(tokenizer, fmt.render(tokenizer, s.user, s.answer_prefix)))
            return count

        upper = max_units(task, res)
        i = 0  # the sample being fitted; every length keeps the same samples, so one that cannot fit skips it
        try:
            n0 = fit_count(tokens(0), length, f"RULER {task} prompt", guess=guess or max(1, length // 16), upper=upper)
            at_length: list[Prompt] = []
            for i in range(samples):
                n = n0
                s = make_sample(task, n, seed, length, i, res)
                text = fmt.render(tokenizer, s.user, s.answer_prefix)
                ids = fmt.encode(tokenizer, text)
                if len(ids) > length or len(ids) < 0.99 * length:
                    # This sample's needles or words tokenize differently: search its own size.
                    n = fit_count(tokens(i), length, f"RULER {task} prompt", guess=n0, upper=upper)
                    s = make_sample(task, n, seed, length, i, res)
                    text = fmt.render(tokenizer, s.user, s.answer_prefix)
                    ids = fmt.encode(tokenizer, text)
                if upper is not None and n == upper and len(ids) < 0.9 * length:
                    raise LongforgeError(f"RULER {task}: the QA file has too few paragraphs to fill {length} tokens; give a larger file or shorter lengths.")
                at_length.append(Prompt(length, ids, text, {"task": task, "index": i, "units": n, "answers": s.answers,
                                                             "prompt_sha1": prompt_hash(text), **s.meta}))
        except PromptTooLong as e:
            skipped[str(length)] = f"needs at least {e.minimum} tokens" + (f" (sample {i})" if i else "")
            continue
        prompts += at_length
        guess = int(n0 * 2)
    return prompts, skipped


def haystack_of(task: str, res: Resources) -> str:
    """What a task's context is made of, for result files."""
    d = TASKS[task]
    if d.family == "niah":
        h = d.params["haystack"]
        if h == "essay":
            return "essays: " + (res.essays.describe() if res.essays else "none")
        return "noise" if h == "noise" else "distractor needles"
    if d.family == "qa":
        return "paragraphs of " + res.qa[d.params["dataset"]].name if d.params["dataset"] in res.qa else d.params["dataset"]
    return {"vt": "noise", "cwe": "numbered word list", "fwe": "coded words"}[d.family]


def max_units(task: str, res: Resources) -> int | None:
    """The largest haystack a task can build (QA: the distractor paragraphs there are), or None."""
    d = TASKS[task]
    if d.family != "qa":
        return None
    data = res.qa[d.params["dataset"]]
    return len(data.docs) - max(len(g) for _, _, g in data.questions)


def needed(tasks: list[str]) -> set[str]:
    """Which user resources (essays, squad, hotpotqa) the tasks need."""
    return {TASKS[t].needs for t in tasks if TASKS[t].needs}  # type: ignore[misc]


def check_tasks(tasks: list[str], essays: Path | None, squad: Path | None, hotpotqa: Path | None) -> None:
    """Fail before any work when a task is unknown or needs a file that was not given."""
    for t in tasks:
        if t not in TASKS:
            raise LongforgeError(f"unknown RULER task {t!r}; choose from {', '.join(TASKS)}.")
    given = {"essays": essays, "squad": squad, "hotpotqa": hotpotqa}
    for need in sorted(needed(tasks)):
        if given[need] is None:
            who = ", ".join(t for t in tasks if TASKS[t].needs == need)
            fix = {"essays": "set eval.ruler.essays (--essays) to long English prose (RULER uses Paul Graham's essays)",
                   "squad": "set eval.ruler.squad (--squad) to SQuAD's dev JSON",
                   "hotpotqa": "set eval.ruler.hotpotqa (--hotpotqa) to HotpotQA's distractor dev JSON"}[need]
            raise LongforgeError(f"RULER task(s) {who} need {need}; {fix}, or leave the task(s) out of eval.ruler.tasks.")


def effective_length(average: dict[int, float], threshold: float = THRESHOLD) -> int | None:
    """Longest tested length whose average, and every shorter one's, beats the threshold (None if the shortest fails)."""
    best = None
    for length in sorted(average):
        if average[length] > threshold:
            best = length
        else:
            break
    return best


def summarize(samples: list[dict[str, Any]], tasks: list[str], lengths: list[int], threshold: float,
              skipped: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Per-task scores per length (0-100), their average per length, and the effective length.

    A length where some task could not fit is averaged over the tasks that ran and marked incomplete;
    the effective length is read off the complete lengths only.
    """
    skipped = skipped or {}
    per_task: dict[str, dict[str, float]] = {}
    for t in tasks:
        per_task[t] = {}
        for L in lengths:
            vals = [s["score"] for s in samples if s["task"] == t and s["length"] == L]
            if vals:
                per_task[t][str(L)] = 100 * float(np.mean(vals))
    average: dict[str, float] = {}
    complete: dict[str, bool] = {}
    for L in lengths:
        ran = [per_task[t][str(L)] for t in tasks if str(L) in per_task[t]]
        if ran:
            average[str(L)] = float(np.mean(ran))
            complete[str(L)] = len(ran) == len(tasks)
    eff = effective_length({int(k): v for k, v in average.items() if complete[k]}, threshold)
    return {"per_task": per_task, "average": average, "complete": complete, "skipped": skipped,
            "effective_length": eff, "threshold": threshold, "tasks_averaged": tasks,
            "overall": float(np.mean(list(average.values()))) if average else float("nan")}


@torch.no_grad()
def run_ruler(model: Any, tokenizer: Any, tasks: list[str], lengths: list[int], samples: int, seed: int,
              essays: Path | None = None, squad: Path | None = None, hotpotqa: Path | None = None,
              fmt: PromptFormat = PromptFormat(), batch_size: int = 8, batch_tokens: int = 131072,
              label: str = "ruler", threshold: float = THRESHOLD, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Generate and score every task at every length; returns every sample and the summary."""
    check_tasks(tasks, essays, squad, hotpotqa)
    engine = as_engine(model)
    lengths = sorted(lengths)
    res = Resources()
    if essays is not None and "essays" in needed(tasks):
        res.essays = TextHaystack.load(essays, max_words=4 * max(lengths) + 1000)
    if "squad" in needed(tasks):
        res.qa["squad"] = load_squad(squad)  # type: ignore[arg-type]
    if "hotpotqa" in needed(tasks):
        res.qa["hotpotqa"] = load_hotpotqa(hotpotqa)  # type: ignore[arg-type]
    all_samples: list[dict[str, Any]] = []
    skipped: dict[str, dict[str, str]] = {}
    for task in tasks:
        prompts, skip = build_task(task, tokenizer, lengths, samples, seed, res, fmt)
        if skip:
            skipped[task] = skip
            say(f"  [yellow]{label} {task}: skipped at {', '.join(skip)} tokens ({next(iter(skip.values()))})[/]")
        done = generate_all(
            engine, tokenizer, prompts, min(TASKS[task].max_new_tokens, max_new_tokens or TASKS[task].max_new_tokens),
            lambda p, out, task=task: {"score": score(task, out, p.meta["answers"])},
            f"{label} {task}", batch_size, batch_tokens,
            stop=lambda p, text, task=task: answer_done(task, text, p.meta["answers"]))
        all_samples += done
    haystacks = {t: haystack_of(t, res) for t in tasks}
    return {"task": "ruler", "tasks": tasks, "lengths": lengths, "samples_per_task": samples, "seed": seed,
            "haystacks": haystacks, "format": {"chat_template": fmt.chat_template},
            "engine": engine.describe() if hasattr(engine, "describe") else {"path": type(engine).__name__},
            "samples": all_samples, "summary": summarize(all_samples, tasks, lengths, threshold, skipped)}
