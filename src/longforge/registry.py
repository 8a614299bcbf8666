"""Registries: the named variants of one concept (RoPE methods, position transforms, sampling plans, stages), each
one record with a `name`, kept in the order they were added. The recipe schema takes its allowed values from them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, Literal, Protocol, TypeVar

from longforge.errors import LongforgeError


class Named(Protocol):
    """What a registry holds: a record with a name."""

    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Registry(dict[str, T], Generic[T]):
    """Records of one kind by name; `pick` refuses an unknown name in one sentence that lists the known ones."""

    def __init__(self, kind: str, entries: Iterable[T] = ()) -> None:
        super().__init__()
        self.kind = kind
        for entry in entries:
            self.add(entry)

    def add(self, entry: T) -> T:
        """Register `entry` under its name (a second record of the same name is a programming error)."""
        if entry.name in self:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self[entry.name] = entry
        return entry

    def pick(self, name: str) -> T:
        """The record called `name`, or one clear error naming the choices."""
        if name not in self:
            raise LongforgeError(f"unknown {self.kind} {name!r}; use one of {', '.join(self)}.")
        return self[name]


def choice(names: Iterable[str]) -> Any:
    """A `Literal` of these names, so the schema validates (and documents) exactly what a registry holds."""
    return Literal[tuple(names)]  # type: ignore[valid-type]
