"""Oracle generators for the evaluation tests: they read the answer out of the prompt text (test-only stubs).

An oracle proves two things at once: every answer is recoverable from its prompt, and generation, decoding
and scoring agree end to end (an oracle must score 100%).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import torch

from longforge.eval.niah import Needle


def _after_last(text: str, marker: str) -> str:
    return text[text.rindex(marker) + len(marker):]


def passkey_answer(prompt: str) -> str:
    """The key of the (only) passkey needle."""
    return " " + re.findall(r"The pass key is (\d+)\. Remember it\.", prompt)[0] + "."


def niah_answer(prompt: str, needle: Needle = Needle()) -> str:
    """The rest of the needle sentence found in the haystack."""
    context = prompt[: prompt.rindex("Question:")]
    assert context.count(needle.text) == 1
    return " " + needle.answer_part() + "\n"


def ruler_answer(prompt: str, qa: dict[str, list[str]] | None = None) -> str:
    """The references of any RULER task, worked out from the prompt alone (QA: looked up by question)."""
    m = re.search(r"special magic \w+ for (.+) mentioned in the provided text (?:is|are)$", prompt[prompt.rfind("The special magic"):])
    if m:
        keys = re.split(r", and |, ", m.group(1))
        context = _after_last(prompt, "hidden within the following text.")
        values = []
        for k in keys:
            values += re.findall(rf"One of the special magic \w+ for {re.escape(k)} is: ([\w-]+)\.", context)
        return " " + ", ".join(values) + "."
    m = re.search(r"assigned the value (\d+), they are: $", prompt)
    if m:
        context = _after_last(prompt, "Memorize and track the chain(s) of variable assignment hidden in the following text.")
        chain = re.findall(rf"VAR (\w+) = {m.group(1)}\b", context)
        while True:
            nxt = re.findall(rf"VAR (\w+) = VAR {chain[-1]}\b", context)
            if not nxt:
                break
            chain += nxt
        return " ".join(chain)
    if prompt.endswith("the list are:"):
        listing = _after_last(prompt, "Memorize the ones that appear most often.")
        listing = listing[: listing.index("Question:")]
        top = Counter(re.findall(r"\d+\. (\S+)", listing)).most_common(10)
        return " " + " ".join(w for w, _ in top)
    if prompt.endswith("the three most frequently appeared words are:"):
        coded = _after_last(prompt, "Find the three most frequently appeared coded words.")
        coded = coded[: coded.index("\nQuestion:")]
        top = Counter(w for w in coded.split() if w != "...").most_common(3)
        return " " + " ".join(w for w, _ in top)
    question = re.findall(r"Question: (.+) Answer:$", prompt.replace("\n", " "))[-1]
    assert qa is not None
    return " " + qa[question][0]


class Oracle:
    """A generator that answers every prompt correctly by reading it (and records how it was called).

    It takes an equal-length batch (a tensor) and, when `ragged`, a list of token-id lists of any lengths; `batches`
    records (rows, longest row) and `lengths` every batch's row lengths.
    """

    def __init__(self, tokenizer, answer: Callable[[str], str], ragged: bool = False):  # noqa: ANN001
        self.tok = tokenizer
        self.answer = answer
        self.ragged = ragged
        self.batches: list[tuple[int, int]] = []
        self.lengths: list[list[int]] = []

    def generate(self, prompts: torch.Tensor | list[list[int]], max_new_tokens: int, stop=None) -> list[list[int]]:  # noqa: ANN001
        if isinstance(prompts, torch.Tensor):
            rows = prompts.tolist()
        else:
            assert self.ragged, "a ragged batch was given to an engine that did not say it takes one"
            rows = [list(r) for r in prompts]
        self.batches.append((len(rows), max(len(r) for r in rows)))
        self.lengths.append([len(r) for r in rows])
        return [list(self.tok(self.answer(self.tok.decode(row)), add_special_tokens=False)["input_ids"]) for row in rows]
