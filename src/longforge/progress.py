"""Console output and progress bars shared by every stage."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def progress_bar() -> Progress:
    """A rich progress bar with counts, elapsed and remaining time (quiet when LONGFORGE_QUIET=1)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=os.environ.get("LONGFORGE_QUIET") == "1",
    )


def say(message: str) -> None:
    """Print one line of status."""
    if os.environ.get("LONGFORGE_QUIET") != "1":
        console.print(message)
