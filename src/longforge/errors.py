"""User-facing errors: one clear sentence naming the thing and the fix."""

from __future__ import annotations


class LongforgeError(Exception):
    """An error the user can fix; the CLI prints it as one line, without a traceback."""


def require(condition: bool, message: str) -> None:
    """Raise LongforgeError(message) when condition is false."""
    if not condition:
        raise LongforgeError(message)
