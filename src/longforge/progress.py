"""Console output and progress bars shared by every stage."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def _quiet() -> bool:
    """No output when LONGFORGE_QUIET=1, and none from processes other than rank 0 under torchrun."""
    return os.environ.get("LONGFORGE_QUIET") == "1" or os.environ.get("RANK", "0") != "0"


def compact(x: float) -> str:
    """A count in at most 5 characters: exact below 10,000 (9,999), else 3 significant digits and K, M, B or T (12.3K)."""
    n = int(x)
    if abs(n) < 10_000:
        return f"{n:,}"
    for unit, scale in (("K", 1e3), ("M", 1e6), ("B", 1e9)):
        if abs(n) / scale < 999.5:
            return f"{n / scale:.3g}{unit}"
    return f"{n / 1e12:.3g}T"


class CountColumn(ProgressColumn):
    """Done and total as compact counts (2.71M/20M), so a bar with a count of tokens fits 80 columns."""

    def render(self, task: Task) -> Text:
        """The counts of one task."""
        total = "?" if task.total is None else compact(task.total)
        return Text(f"{compact(task.completed)}/{total}", style="progress.download")


def progress_bar() -> Progress:
    """A rich progress bar with counts, elapsed and remaining time (quiet when LONGFORGE_QUIET=1 or not rank 0).

    At 80 columns a long description wraps; counts and times are never cut.
    """
    whole = Column(no_wrap=True)
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}", table_column=Column(overflow="fold")),
        BarColumn(bar_width=24),
        CountColumn(table_column=whole),
        TimeElapsedColumn(table_column=whole),
        TimeRemainingColumn(table_column=whole),
        console=console,
        transient=False,
        disable=_quiet(),
    )


@contextmanager
def spinner(description: str) -> Iterator[None]:
    """A spinner and the elapsed time while a step that cannot count its progress runs (quiet like progress_bar).

    The line stays when the step ends, with the time it took.
    """
    with Progress(SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("[bold]{task.description}", table_column=Column(overflow="fold")),
                  TimeElapsedColumn(table_column=Column(no_wrap=True)), console=console, transient=False, disable=_quiet()) as bar:
        task = bar.add_task(description, total=None)
        yield
        bar.update(task, total=1, completed=1)


def say(message: str) -> None:
    """Print one line of status."""
    if not _quiet():
        console.print(message)
