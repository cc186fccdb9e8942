"""The experiments by name, and how one is run and its files written.

:func:`execute` runs one experiment, draws its plot and writes
``NAME.json`` and ``NAME.png`` into a directory -- only once the
experiment has finished, so an interrupted run leaves no half-written
files.  The command line (``sandbox experiment``) is a thin layer above.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from . import (asid_flush, avic_irq, exit_model, io_notice, msr_bitmap, nested_tsc, popek_goldberg, shadow_nested, virtio_io,
               walk_refs)
from .base import Context, Experiment, Outcome
from .common import STOP

#: every experiment, in the order ``sandbox experiment all`` runs them
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    msr_bitmap.EXPERIMENT,
    virtio_io.EXPERIMENT,
    io_notice.EXPERIMENT,
    walk_refs.EXPERIMENT,
    asid_flush.EXPERIMENT,
    shadow_nested.EXPERIMENT,
    avic_irq.EXPERIMENT,
    exit_model.EXPERIMENT,
    popek_goldberg.EXPERIMENT,
    nested_tsc.EXPERIMENT,
)}


@dataclass
class Report:
    """An experiment that ran: its outcome and where its files are."""
    experiment: Experiment
    outcome: Outcome
    quick: bool
    seconds: float
    json_path: Path
    png_path: Path

    def as_json(self) -> dict[str, Any]:
        e, o = self.experiment, self.outcome
        return {"experiment": e.name, "title": e.title, "source": e.source, "claim": e.claim,
                "quick": self.quick, "seconds": round(self.seconds, 3), "ok": o.ok,
                "comparisons": [asdict(c) for c in o.comparisons], "checks": o.checks, "notes": o.notes,
                "table": {"columns": o.columns, "rows": o.rows}, "data": o.data,
                "files": {"json": self.json_path.name, "png": self.png_path.name}}


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def execute(exp: Experiment, quick: bool, out: Path, on_step: Callable[[str], None] | None = None) -> Report:
    """Run ``exp``; write ``out/NAME.png`` and ``out/NAME.json``.

    Raises :class:`~sandbox.experiments.common.Interrupted` after Ctrl-C
    (nothing of this experiment is written) and
    :class:`~sandbox.experiments.common.ExperimentError` when a guest run
    went wrong."""
    with STOP:
        t0 = time.perf_counter()
        outcome = exp.run(Context(quick, on_step))
        seconds = time.perf_counter() - t0
        STOP.check()
        out.mkdir(parents=True, exist_ok=True)
        rep = Report(exp, outcome, quick, seconds, out / f"{exp.name}.json", out / f"{exp.name}.png")
        _atomic_write(rep.png_path, lambda p: exp.plot({**outcome.data, "quick": quick}, p))
        _atomic_write(rep.json_path, lambda p: p.write_text(json.dumps(rep.as_json(), indent=2) + "\n"))
    return rep
