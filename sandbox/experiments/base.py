"""What an experiment is: a name, the seed's claim, a run that measures it
in real guests, and a plot of the raw data.

An :class:`Experiment`'s ``run(ctx)`` returns an :class:`Outcome`: the
seed's figures beside the measured ones (:class:`Comparison`), a detail
table, the raw data, and the checks of its key relations.
:mod:`sandbox.experiments.registry` lists them and writes their files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .common import STOP


@dataclass
class Comparison:
    """One of the seed's figures beside the sandbox's."""
    measure: str
    seed: str                 # what the seed says ("" when it gives no number)
    sandbox: str              # what this run measured
    note: str = ""            # why they differ, when they do


@dataclass
class Outcome:
    comparisons: list[Comparison]
    columns: list[str]        # the detail table
    rows: list[list[str]]
    data: dict[str, Any]      # raw figures (the JSON file's "data"; the plot's input)
    checks: dict[str, bool]   # the key relations the experiment asserts about its own runs
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


class Context:
    """What an experiment's ``run`` gets: the size, and a progress callback."""

    def __init__(self, quick: bool, on_step: Callable[[str], None] | None = None) -> None:
        self.quick = quick
        self._on_step = on_step

    def step(self, label: str = "") -> None:
        """One unit of the experiment's work is done (usually a guest run)."""
        STOP.check()
        if self._on_step is not None:
            self._on_step(label)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    source: str                                   # which seed, which paragraph
    claim: str                                    # the seed's claim, one line
    steps: Callable[[bool], int]                  # progress units of a (quick) run
    run: Callable[[Context], Outcome]
    plot: Callable[[dict[str, Any], Path], None]  # raw data -> PNG file


def fmt(n: float, digits: int = 0) -> str:
    """A figure for a table: thousands separators, ``digits`` decimals."""
    return f"{n:,.{digits}f}"
