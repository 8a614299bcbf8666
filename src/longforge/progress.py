"""Console output and progress bars shared by every stage."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def _quiet() -> bool:
    """No output when LONGFORGE_QUIET=1, and none from processes other than rank 0 under torchrun."""
    return os.environ.get("LONGFORGE_QUIET") == "1" or os.environ.get("RANK", "0") != "0"


def progress_bar() -> Progress:
    """A rich progress bar with counts, elapsed and remaining time (quiet when LONGFORGE_QUIET=1 or not rank 0)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=_quiet(),
    )


def say(message: str) -> None:
    """Print one line of status."""
    if not _quiet():
        console.print(message)
