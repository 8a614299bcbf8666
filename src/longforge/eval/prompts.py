"""Prompts fitted to a token length with the model's own tokenizer: formats, haystacks, needle insertion, search."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longforge.errors import LongforgeError

# The passkey filler of Landmark/YaRN, also RULER's "noise" haystack.
NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class PromptTooLong(LongforgeError):
    """Even an empty haystack does not fit the requested length."""

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = minimum


@dataclass(frozen=True)
class PromptFormat:
    """How a task's question reaches the model: plain text, or the tokenizer's chat template (instruct models)."""

    chat_template: bool = False
    system_prompt: str | None = None

    def render(self, tokenizer: Any, user: str, answer_prefix: str) -> str:
        """The full prompt text: `user + answer_prefix`, or a chat turn whose reply starts with the answer prefix."""
        if not self.chat_template:
            return user + answer_prefix
        if not getattr(tokenizer, "chat_template", None):
            raise LongforgeError(
                "the chat template was asked for but this tokenizer has none; drop `chat_template` (base models) "
                "or use an instruct model's tokenizer."
            )
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": user.strip()})
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return head + answer_prefix.lstrip()

    def encode(self, tokenizer: Any, text: str) -> list[int]:
        """Token ids of a rendered prompt (a chat template writes its own special tokens; plain text gets the tokenizer's)."""
        return list(tokenizer(text, add_special_tokens=not self.chat_template, verbose=False)["input_ids"])

    def encode_many(self, tokenizer: Any, texts: list[str]) -> list[list[int]]:
        """Token ids of many rendered prompts in one call (a fast tokenizer encodes them on all cores)."""
        if not texts:
            return []
        return [list(x) for x in tokenizer(texts, add_special_tokens=not self.chat_template, verbose=False)["input_ids"]]


def prompt_hash(text: str) -> str:
    """Short stable id of a prompt's text."""
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def fit_count(count_tokens: Callable[[int], int], length: int, what: str, guess: int | None = None,
              upper: int | None = None) -> int:
    """Largest n in [0, upper] (haystack units) whose prompt has at most `length` tokens.

    `count_tokens(n)` must grow with n. Secant steps from `guess` (token counts are nearly linear in n, so
    this takes a handful of tokenizer calls even at 128K), then bisection. Raises LongforgeError when even
    n = 0 does not fit, naming `what`.
    """
    base = count_tokens(0)
    if base > length:
        raise PromptTooLong(
            f"a {what} needs at least {base} tokens with this tokenizer even with no haystack; "
            f"raise the shortest length above {length} or shorten the task's text.", base
        )
    if upper is not None and (upper == 0 or count_tokens(upper) <= length):
        return upper
    lo, hi = 0, upper  # invariant: count(lo) <= length; hi is None or count(hi) > length
    n = max(1, guess or 1)
    for _ in range(8):
        if hi is not None:
            n = min(n, hi - 1)
        if n <= lo:
            break
        c = count_tokens(n)
        if c <= length:
            lo = n
        else:
            hi = n
        if hi is not None and hi - lo <= 1:
            return lo
        rate = max((c - base) / n, 1e-9)
        n = max(int((length - base) / rate), lo + 1)
    if hi is None:
        # Gallop up from lo: after the secant steps the answer is usually lo itself, settled by one call at lo + 1.
        step = 1
        while count_tokens(lo + step) <= length:
            lo, step = lo + step, 2 * step
        hi = lo + step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(mid) <= length:
            lo = mid
        else:
            hi = mid
    return lo


def insert_at_depths(sentences: Sequence[str], needles: Sequence[str], depths: Sequence[float]) -> tuple[list[str], list[int]]:
    """Sentences with each needle inserted before sentence round(depth * n); returns them and the needles' indices."""
    assert len(needles) == len(depths)
    n = len(sentences)
    order = sorted(range(len(needles)), key=lambda i: depths[i])
    out = list(sentences)
    where = [0] * len(needles)
    shift = 0
    for i in order:
        at = int(round(min(max(depths[i], 0.0), 1.0) * n)) + shift
        out.insert(at, needles[i])
        where[i] = at
        shift += 1
    return out, where


def noise_sentences(n: int, offset: int = 0) -> list[str]:
    """n sentences of the repeated noise filler, starting at sentence `offset` of the cycle."""
    return [NOISE_SENTENCES[(offset + i) % len(NOISE_SENTENCES)] for i in range(n)]


@dataclass
class TextHaystack:
    """Words of a user corpus (file or folder, text or JSONL), repeated when a prompt needs more than there is."""

    path: Path
    words: list[str]
    repeated: bool = False

    @classmethod
    def load(cls, path: Path, max_words: int, text_field: str = "text") -> "TextHaystack":
        """Read documents until `max_words` words (all of them when shorter); clear error when there is no text."""
        from longforge.config import SourceSpec
        from longforge.data.sources import Rejects, iter_documents

        path = Path(path)
        if not path.exists():
            raise LongforgeError(f"haystack {path} does not exist; point it at a text file, a folder of them, or a JSONL file.")
        words: list[str] = []
        src = SourceSpec(name="haystack", path=path, text_field=text_field)
        for doc in iter_documents(src, Rejects()):
            words.extend(doc.text.split())
            if len(words) >= max_words:
                break
        if not words:
            raise LongforgeError(f"haystack {path} holds no text; point it at long plain-text documents.")
        return cls(path, words[:max_words])

    def sentences(self, n_words: int, offset: int = 0) -> list[str]:
        """n_words words from word `offset` on (cycling through the corpus if needed), split into sentences."""
        total = len(self.words)
        if n_words > total:
            self.repeated = True
        start = offset % total
        reps = -(-(start + n_words) // total) if n_words else 1
        words = (self.words * reps)[start:start + n_words]
        text = " ".join(words)
        return [s for s in _SENTENCE_END.split(text) if s] if text else []

    def describe(self) -> str:
        """Where the haystack came from, for result files."""
        return f"{self.path}" + (" (repeated: the corpus is shorter than the longest prompt)" if self.repeated else "")


def depth_of(context: str, needle: str) -> float:
    """Where `needle` starts in `context`, as the fraction of the rest of the context (the haystack) before it."""
    i = context.find(needle)
    return i / max(len(context) - len(needle), 1) if i >= 0 else float("nan")
