"""Progress for long work: a rich progress bar when the output is a terminal,
nothing at all otherwise (a pipe, a file, CI logs)."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

Tick = Callable[..., None]


def _quiet(advance: float = 1, description: str | None = None) -> None:
    pass


@contextlib.contextmanager
def progress(description: str, total: float | None = None, file: TextIO | None = None) -> Iterator[Tick]:
    """``with progress("runs", total=3) as tick: ... tick()`` -- ``tick(advance=1,
    description=None)`` moves the bar (and may rename the step). On ``file``
    (default stderr) only when it is a terminal."""
    out = sys.stderr if file is None else file
    if not out.isatty():
        yield _quiet
        return
    console = Console(file=out, force_terminal=True)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
    if total is not None:
        columns.append(MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as p:
        task = p.add_task(description, total=total)

        def tick(advance: float = 1, description: str | None = None) -> None:
            p.update(task, advance=advance, **({"description": description} if description else {}))
        yield tick
