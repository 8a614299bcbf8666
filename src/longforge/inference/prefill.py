"""Which prompt positions the engine computes for a batch: each row's own tokens once, a prefix shared by several rows
once for all of them.

Rows are given sorted (by length, then tokens), so rows of equal length sit side by side and can be prefilled
together. Prompts that share a prefix (the depths of a needle grid share the haystack up to the needle; RULER's
essay tasks share their opening) form a tree of common prefixes: each prefix of at least `min_shared` tokens is
computed once, in one row, and its keys and values are copied into the other rows that have it; every row then
computes the rest of its tokens, always including its last one (whose hidden state gives its first new token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fill:
    """Compute positions start..end of rows first..last-1 together; each already holds positions 0..start."""

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


def prefill_plan(rows: Sequence[Sequence[int]], min_shared: int | None) -> list[Step]:
    """Fills and copies, in order, after which every row holds the keys and values of all its positions.

    `min_shared` None computes every row whole (rows of equal length together); otherwise a prefix of at least
    `min_shared` tokens common to several rows is computed once. Each row's last position is always its own Fill.
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
        if min_shared is not None and prefix - start >= max(min_shared, 1):
            shared.append(Fill(rep, rep + 1, start, prefix))
            shared.append(Share(rep, tuple(members[1:]), start, prefix))
            base = prefix
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
    return shared + _fills(leaves, [len(r) for r in rows])


def _fills(leaves: list[tuple[int, int]], lengths: list[int]) -> list[Step]:
    """Each row's own positions, rows with the same span and adjacent indices in one Fill."""
    out: list[Step] = []
    for row, start in sorted(leaves, key=lambda x: (x[1], lengths[x[0]], x[0])):
        last = out[-1] if out else None
        if (isinstance(last, Fill) and last.last == row and last.start == start and last.end == lengths[row]):
            out[-1] = Fill(last.first, row + 1, start, last.end)
        else:
            out.append(Fill(row, row + 1, start, lengths[row]))
    return out


def computed_tokens(plan: Sequence[Step]) -> int:
    """Prompt positions the plan computes (the rest are copied)."""
    return sum(s.tokens for s in plan if isinstance(s, Fill))
