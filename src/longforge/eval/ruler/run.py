"""Running RULER: prompts fitted to each length with the model's tokenizer, generation, scoring, the result."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from longforge.config import EvalSpec
from longforge.errors import LongforgeError
from longforge.eval.grid import Prompt, generate_all
from longforge.eval.prompts import PromptFormat, PromptTooLong, TextHaystack, fit_count, prompt_hash
from longforge.eval.ruler import tables
from longforge.eval.ruler.generators import Resources, make_sample
from longforge.eval.ruler.qa import load_hotpotqa, load_squad
from longforge.eval.ruler.scoring import THRESHOLD, answer_done, score, summarize
from longforge.eval.ruler.tasks import TASKS
from longforge.eval.share import SINGLE, Share
from longforge.eval.task import RETRIEVAL_TABLE, EvalTask, TaskRun
from longforge.inference import as_engine
from longforge.progress import say


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

    As in RULER, the prompt and the task's answer budget (its tokens to generate) fit the length together, so a
    model answers within the length it is tested at. Returns the prompts and, per length where even an empty
    haystack does not fit, why it was skipped.
    """
    prompts: list[Prompt] = []
    skipped: dict[str, str] = {}
    guess = None
    budget = TASKS[task].max_new_tokens
    for length in sorted(lengths):
        room = length - budget  # the prompt's tokens at most

        def tokens(i: int, length: int = length) -> Callable[[int], int]:
            def count(n: int) -> int:
                s = make_sample(task, n, seed, length, i, res)
                return len(fmt.encode(tokenizer, fmt.render(tokenizer, s.user, s.answer_prefix)))
            return count

        upper = max_units(task, res)
        i = 0  # the sample being fitted; every length keeps the same samples, so one that cannot fit skips it
        try:
            n0 = fit_count(tokens(0), room, f"RULER {task} prompt", guess=guess or max(1, room // 16), upper=upper)
            at_length: list[Prompt] = []
            units = [n0] * samples
            made = [make_sample(task, n0, seed, length, i, res) for i in range(samples)]
            texts = [fmt.render(tokenizer, s.user, s.answer_prefix) for s in made]
            encoded = fmt.encode_many(tokenizer, texts)  # every sample at once: on all cores
            for _ in range(2):
                # Samples whose needles or words tokenize differently: scale each one's size by its own token rate
                # (one tokenizer call each, usually enough; all of them in one batch), then search each one that did
                # not land within 1%.
                redo = [i for i in range(samples) if not room >= len(encoded[i]) >= 0.99 * room]
                for i in redo:
                    units[i] = max(1, round(units[i] * (room - 0.005 * room) / max(1, len(encoded[i]))))
                    if upper is not None:
                        units[i] = min(units[i], upper)
                    made[i] = make_sample(task, units[i], seed, length, i, res)
                    texts[i] = fmt.render(tokenizer, made[i].user, made[i].answer_prefix)
                for i, ids in zip(redo, fmt.encode_many(tokenizer, [texts[i] for i in redo])):
                    encoded[i] = ids
            for i in range(samples):
                n, s, text, ids = units[i], made[i], texts[i], encoded[i]
                if len(ids) > room or len(ids) < 0.99 * room:
                    n = fit_count(tokens(i), room, f"RULER {task} prompt", guess=n, upper=upper)
                    s = make_sample(task, n, seed, length, i, res)
                    text = fmt.render(tokenizer, s.user, s.answer_prefix)
                    ids = fmt.encode(tokenizer, text)
                if upper is not None and n == upper and len(ids) < 0.9 * room:
                    raise LongforgeError(f"RULER {task}: the QA file has too few paragraphs to fill {length} tokens; give a larger file or shorter lengths.")
                at_length.append(Prompt(length, ids, text, {"task": task, "index": i, "units": n, "answers": s.answers,
                                                             "prompt_sha1": prompt_hash(text), **s.meta}))
        except PromptTooLong as e:
            skipped[str(length)] = (f"needs at least {e.minimum + budget} tokens ({e.minimum} of prompt, {budget} of answer)"
                                    + (f" (sample {i})" if i else ""))
            continue
        prompts += at_length
        guess = int(n0 * 2)
    return prompts, skipped


Built = tuple[str, tuple[list[Prompt], dict[str, str]], float, float]


def task_prompts(tasks: list[str], tokenizer: Any, lengths: list[int], samples: int, seed: int, res: Resources,
                 fmt: PromptFormat, ahead: bool) -> Iterator[Built]:
    """Each task's prompts in order, with the seconds building took and the seconds the caller waited for them.

    With `ahead`, task i+1 is built on one thread while the caller answers task i (tokenizing releases the
    interpreter); that thread has its own copy of the tokenizer, since a fast tokenizer's settings are changed by
    every call and two threads in one would collide. The prompts are the same either way: each depends on its seed.
    """
    def build(task: str, tok: Any) -> tuple[tuple[list[Prompt], dict[str, str]], float]:
        t0 = time.perf_counter()
        out = build_task(task, tok, lengths, samples, seed, res, fmt)
        return out, time.perf_counter() - t0

    if not ahead or not tasks:
        for task in tasks:
            out, took = build(task, tokenizer)
            yield task, out, took, took
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ruler-prompts")
    own = copy.deepcopy(tokenizer)
    try:
        queued = pool.submit(build, tasks[0], own)
        for i, task in enumerate(tasks):
            t0 = time.perf_counter()
            out, took = queued.result()  # raises here what building raised
            waited = time.perf_counter() - t0
            if i + 1 < len(tasks):
                queued = pool.submit(build, tasks[i + 1], own)
            yield task, out, took, waited
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


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


@torch.no_grad()
def run_ruler(model: Any, tokenizer: Any, tasks: list[str], lengths: list[int], samples: int, seed: int,
              essays: Path | None = None, squad: Path | None = None, hotpotqa: Path | None = None,
              fmt: PromptFormat = PromptFormat(), batch_size: int = 8, batch_tokens: int = 131072,
              label: str = "ruler", threshold: float = THRESHOLD, max_new_tokens: int | None = None,
              share: Share = SINGLE, ahead: bool | None = None) -> dict[str, Any]:
    """Generate and score every task at every length (this process's share, under torchrun); returns every sample and the summary.

    `ahead` builds the next task's prompts on a thread while the current task is answered (default: on a GPU).
    """
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
    if ahead is None:  # on a GPU the CPU is idle while answering; on the CPU the two would share its cores
        ahead = getattr(getattr(engine, "device", None), "type", "cpu") == "cuda"
    for task, (prompts, skip), built_s, waited_s in task_prompts(tasks, tokenizer, lengths, samples, seed, res, fmt,
                                                                   ahead):
        t1 = time.perf_counter()
        if skip:
            skipped[task] = skip
            say(f"  [yellow]{label} {task}: skipped at {', '.join(skip)} tokens ({next(iter(skip.values()))})[/]")
        done = generate_all(
            engine, tokenizer, prompts, min(TASKS[task].max_new_tokens, max_new_tokens or TASKS[task].max_new_tokens),
            lambda p, out, task=task: {"score": score(task, out, p.meta["answers"])},
            f"{label} {task}", batch_size, batch_tokens,
            stop=lambda p, text, task=task: answer_done(task, text, p.meta["answers"]), share=share)
        all_samples += done
        # Where a task's time goes (prompts built on the CPU with the tokenizer, answers generated on the device);
        # said, not written: result files stay the same bytes from run to run.
        waited = f" on a thread (waited {waited_s:.1f} s)" if ahead else ""
        say(f"  {label} {task}: {len(prompts)} prompts built in {built_s:.1f} s{waited}, answered in "
            f"{time.perf_counter() - t1:.1f} s")
    haystacks = {t: haystack_of(t, res) for t in tasks}
    return {"task": "ruler", "tasks": tasks, "lengths": lengths, "samples_per_task": samples, "seed": seed,
            "haystacks": haystacks, "format": {"chat_template": fmt.chat_template},
            "engine": engine.describe() if hasattr(engine, "describe") else {"path": type(engine).__name__},
            "samples": all_samples, "summary": summarize(all_samples, tasks, lengths, threshold, skipped)}


# ---- how the eval stage runs the task and how its results are read (the registry's entry)


# The user files RULER tasks read: what each is, and the recipe key and flag that give it.
FILES = {"essays": ("essays", "eval.ruler.essays", "--essays"), "squad": ("SQuAD", "eval.ruler.squad", "--squad"),
         "hotpotqa": ("HotpotQA", "eval.ruler.hotpotqa", "--hotpotqa")}


def left_out_line(left_out: dict[str, str]) -> str:
    """One line naming the tasks the default list left out and the files they need."""
    needs = " / ".join(f"{FILES[n][0]} (`{FILES[n][1]}`, {FILES[n][2]})" for n in dict.fromkeys(left_out.values()))
    return f"RULER: left out {', '.join(left_out)}: {'it needs' if len(left_out) == 1 else 'they need'} {needs}"


def run_task(job: TaskRun) -> dict[str, Any]:
    """The eval spec's RULER tasks at its lengths (4K doubling to the target when none are given) on one model.

    Without a task list, the tasks whose files were not given are left out, and the output says so in one line.
    """
    r = job.spec.ruler
    assert r is not None
    lengths = sorted(r.lengths) if r.lengths else ruler_lengths(job.target_length)
    left_out = r.left_out()
    if left_out:
        say(f"  [yellow]{job.label} {left_out_line(left_out)}[/]")
    res = run_ruler(job.engine, job.tokenizer, r.task_list(), lengths, r.samples, job.spec.seed, essays=r.essays,
                    squad=r.squad, hotpotqa=r.hotpotqa, fmt=job.fmt, batch_size=job.batch_size(r.batch_size),
                    batch_tokens=job.batch_tokens, label=f"{job.label} ruler", threshold=r.threshold,
                    max_new_tokens=r.max_new_tokens, share=job.share)
    res["left_out"] = res["summary"]["left_out"] = left_out
    return res


def check_inputs(spec: EvalSpec) -> None:
    """Refuse, before any work, an unknown task or a task whose data file was not given."""
    r = spec.ruler
    assert r is not None
    check_tasks(r.task_list(), r.essays, r.squad, r.hotpotqa)


def _plot(results: dict[str, dict[str, Any]], original: int, path: Path) -> Path:
    from longforge.report.plots import ruler_curves

    return ruler_curves(results, original, path)


EVAL_TASK = EvalTask(
    name="ruler", title="RULER", terminal=RETRIEVAL_TABLE, run=run_task, summary=lambda res: res["summary"],
    columns=tables.columns, compare=tables.compare, plot=_plot, check_inputs=check_inputs, table=tables.table,
    details=tables.details)
