"""Which prompt positions the engine computes for a batch: each row's own tokens once, a prefix shared by several rows
once for all of them.

Rows are given sorted (by length, then tokens), so rows of similar length sit side by side and can be prefilled
together: padded at the end to one length (a multiple of `pad_to`), which is exact, since no real position attends
to a later one, and the decoding steps overwrite the padding's keys and values or never read them; fewer distinct
shapes also let cuDNN reuse its execution plans (it builds one for each new length). Prompts that share a prefix
(the depths of a needle grid share the haystack up to the needle; RULER's essay tasks share their opening) form a
tree of common prefixes: each prefix of at least `min_shared` tokens is computed once, in one row, and its keys and
values are copied into the other rows that have it; every row then computes the rest of its tokens, always
including its last one (whose hidden state gives its first new token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fill:
    """Compute positions start..end of rows first..last-1 together; each already holds positions 0..start.

    A row shorter than `end` is padded: its own positions end earlier (the engine reads its last one where it is).
    """

    first: int
    last: int
    start: int
    end: int

    @property
    def tokens(self) -> int:
        """Positions computed."""
        return (self.last - self.first) * (self.end - self.start)


@dataclass(frozen=True)
class Share:
    """Copy the keys and values of positions start..end of row `source` into rows `targets`."""

    source: int
    targets: tuple[int, ...]
    start: int
    end: int


Step = Fill | Share


Worth = Callable[[int, int, int], bool]  # (start, end, rows that copy it): is computing the prefix once worth it?


def prefill_plan(rows: Sequence[Sequence[int]], min_shared: int | None, pad_to: int | None = None,
                 worth: Worth | None = None) -> list[Step]:
    """Fills and copies, in order, after which every row holds the keys and values of all its positions.

    `min_shared` None computes every row whole; otherwise a prefix of at least `min_shared` tokens common to several
    rows is computed once. Each row's last position is always in a Fill of its own rows. `pad_to` None fills rows
    of equal length together; else adjacent rows that start at the same position and whose lengths, rounded up to
    a multiple of pad_to, differ by at most max(pad_to, an eighth of the shortest) are one padded Fill, and a shared
    prefix is cut down to a multiple of pad_to (every Fill then starts and ends on one). `worth`, when given, must
    also accept a shared prefix (the engine weighs the work it saves against the extra forward passes).
    """
    arrays = [np.asarray(r, dtype=np.int64) for r in rows]
    shared: list[Step] = []
    leaves: list[tuple[int, int]] = []  # (row, first position it computes itself)

    def common(a: np.ndarray, b: np.ndarray, start: int, stop: int) -> int:
        differ = np.flatnonzero(a[start:stop] != b[start:stop])
        return start + int(differ[0]) if differ.size else stop

    def node(members: list[int], start: int) -> None:
        """Members hold positions 0..start (computed or copied); give each the rest."""
        if len(members) == 1:
            leaves.append((members[0], start))
            return
        limit = min(len(arrays[i]) for i in members) - 1  # the shortest row computes its last position itself
        rep = members[0]
        prefix = limit
        for i in members[1:]:
            prefix = common(arrays[rep], arrays[i], start, prefix)
        base = start
        # With padding every Fill starts and ends on a multiple of pad_to, so its shapes recur across batches.
        cut = prefix if pad_to is None else prefix // pad_to * pad_to
        if (min_shared is not None and cut - start >= max(min_shared, 1)
                and (worth is None or worth(start, cut, len(members) - 1))):
            shared.append(Fill(rep, rep + 1, start, cut))
            shared.append(Share(rep, tuple(members[1:]), start, cut))
            base = cut
        if prefix == limit:  # the shortest members end right after the common part; the others may share more
            ending = [i for i in members if len(arrays[i]) - 1 == limit]
            leaves.extend((i, base) for i in ending)
            rest = [i for i in members if len(arrays[i]) - 1 != limit]
            if rest:
                node(rest, base)
            return
        # Members part ways at `prefix`: those with the same next token may still share a longer prefix.
        branches: dict[int, list[int]] = {}
        for i in members:
            branches.setdefault(int(arrays[i][prefix]), []).append(i)
        for branch in branches.values():
            node(branch, base)

    if min_shared is None:
        leaves = [(i, 0) for i in range(len(rows))]
    elif rows:
        node(list(range(len(rows))), 0)
    return shared + _fills(leaves, [len(r) for r in rows], pad_to)


def _fills(leaves: list[tuple[int, int]], lengths: list[int], pad_to: int | None) -> list[Step]:
    """Each row's own positions; adjacent rows with the same start and an equal (or, padded, close) end in one Fill."""
    def end(n: int) -> int:
        return n if pad_to is None else -(-n // pad_to) * pad_to

    out: list[Step] = []
    shortest = 0
    for row, start in sorted(leaves, key=lambda x: (x[1], lengths[x[0]], x[0])):
        last = out[-1] if out else None
        if isinstance(last, Fill) and last.last == row and last.start == start:
            slack = 0 if pad_to is None else max(pad_to, shortest // 8)
            if end(lengths[row]) - shortest <= slack:
                out[-1] = Fill(last.first, row + 1, start, max(last.end, end(lengths[row])))
                continue
        out.append(Fill(row, row + 1, start, end(lengths[row])))
        shortest = lengths[row]
    return out


def computed_tokens(plan: Sequence[Step]) -> int:
    """Positions the plan computes, padding included (the rest are copied)."""
    return sum(s.tokens for s in plan if isinstance(s, Fill))


def shared_tokens(plan: Sequence[Step]) -> int:
    """Prompt positions copied from a row that computed them instead of being computed again."""
    return sum((s.end - s.start) * len(s.targets) for s in plan if isinstance(s, Share))
