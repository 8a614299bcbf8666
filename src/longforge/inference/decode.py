"""The decoding loop: steps run on the device, the host looks every few tokens.

A step (one new token for every row) reads the current tokens from, and writes the new ones into, tensors on the
device (DecodeState), and marks each row's first end-of-sequence token there too, so steps follow one another with
no host sync. Every `every` steps the host copies the new tokens once, applies the `stop` callbacks token by token
(they need the decoded text) and trims each row where it ends: the result is what checking after every token
gives; rows that ended keep computing (ignored) until that visit. On CUDA a step can be captured once as a graph and
replayed (GraphStep).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

Stop = Callable[[int, list[int]], bool]


class DecodeState:
    """What decoding keeps on the device: every row's tokens so far, the token the next step reads, where it writes,
    and each row's first end-of-sequence column (`width` when none)."""

    def __init__(self, rows: int, width: int, device: torch.device, eos: Iterable[int]):
        self.width = width
        self.tokens = torch.zeros(rows, width, dtype=torch.long, device=device)
        self.current = torch.zeros(rows, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.ended = torch.full((rows,), width, dtype=torch.long, device=device)
        ids = sorted(set(eos))
        self.eos = torch.tensor(ids, dtype=torch.long, device=device) if ids else None

    def start(self, first: torch.Tensor) -> None:
        """Begin with the prefill's tokens (column 0); everything is written in place, for graphs captured on it."""
        self.column.zero_()
        self.ended.fill_(self.width)
        self.record(first)

    def record(self, new: torch.Tensor) -> None:
        """Append one token per row at the current column (device only) and note rows that reach an end token."""
        self.tokens.index_copy_(1, self.column, new[:, None])
        if self.eos is not None:
            hit = (new[:, None] == self.eos[None]).any(-1) & (self.ended == self.width)
            self.ended.copy_(torch.where(hit, self.column, self.ended))
        self.current.copy_(new)
        self.column.add_(1)


@dataclass
class Decoded:
    """Each row's tokens, and how many device steps and host visits it took."""

    rows: list[list[int]]
    steps: int
    visits: int


def run_decode(state: DecodeState, step: Callable[[], None], max_new_tokens: int, stop: Stop | None,
               every: int) -> Decoded:
    """Run `step` until every row ended or has max_new_tokens tokens, looking at the host every `every` steps.

    `state` already holds each row's first token (from the prefill). A row ends at its first end-of-sequence token
    (not kept) or after the token for which stop(row, tokens) is true (kept).
    """
    n = state.tokens.shape[0]
    rows: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    seen, made, steps, visits = 0, 1, 0, 0
    while True:
        block = torch.cat([state.tokens[:, seen:made], state.ended[:, None]], 1).tolist()  # the one host sync
        visits += 1
        for i, row in enumerate(block):
            if not done[i]:
                done[i] = _extend(rows[i], row[:-1], seen, row[-1], i, stop)
        seen = made
        if all(done) or made >= max_new_tokens:
            return Decoded(rows, steps, visits)
        count = min(every, max_new_tokens - made)
        for _ in range(count):
            step()
        made += count
        steps += count


def _extend(tokens: list[int], new: list[int], column: int, ended: int, row: int, stop: Stop | None) -> bool:
    """Append a row's new tokens (starting at `column`) one by one, as a per-token check would; True once it ends."""
    for j, t in enumerate(new, start=column):
        if j >= ended:
            return True
        tokens.append(t)
        if stop is not None and stop(row, tokens):
            return True
    return False


class GraphStep:
    """A decode step run eagerly once (on a side stream, which also warms up every kernel), then captured as a CUDA
    graph and replayed; if capture fails, the step stays eager and `failure` says why."""

    def __init__(self, fn: Callable[[], None], device: torch.device):
        self.fn = fn
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failure: str | None = None
        self.warm = False

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.warm:  # capture failed: eager from now on
            self.fn()
            return
        self.warm = True
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.fn()  # a real step: capture below only records, so this one advances the state
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side):
                self.fn()
        except Exception as e:  # noqa: BLE001 - any failure to capture means eager decoding, said in describe()
            torch.cuda.synchronize(self.device)
            self.failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            return
        self.graph = graph
