#!/usr/bin/env python3
"""The seed's I/O experiment in a real guest: trap every device access, or
grant the register pages and poll their nested Dirty bits on a 1 ms timer.

    python scripts/io_experiment.py                  # port I/O and MMIO polling, full size
    python scripts/io_experiment.py --modes all      # plus trap-and-emulate MMIO (slower)
    python scripts/io_experiment.py --reads 100000 --writes 3000

Every figure is counted from the run's exits (see sandbox/experiments/io_dirty.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sandbox.cli.helpfmt import Parser  # noqa: E402
from sandbox.experiments.io_dirty import MODES, run_io_experiment  # noqa: E402
from sandbox.progress import progress  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reads", type=int, default=1_000_000, help="status-register reads (1,000,000)")
    ap.add_argument("--writes", type=int, default=30_000, help="control commands (30,000)")
    ap.add_argument("--modes", default="port,mmio-poll", help=f"comma list of {', '.join(MODES)}, or 'all'")
    a = ap.parse_args(argv)
    modes = list(MODES) if a.modes == "all" else [x.strip() for x in a.modes.split(",") if x.strip()]
    bad = [x for x in modes if x not in MODES]
    if bad:
        print(f"io_experiment: unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    t = Table(title=f"{a.reads:,} status reads + {a.writes:,} commands, about 1 s of guest time")
    for col in ("mode", "exits", "by exit code", "commands received", "status reads trapped", "guest ms",
                "wall s"):
        t.add_column(col, justify="left" if col in ("mode", "by exit code") else "right")
    failed = False
    with progress("I/O experiment", total=len(modes)) as tick:
        results = []
        for mode in modes:
            tick(0, f"I/O experiment: {mode}")
            try:
                results.append((mode, run_io_experiment(mode, a.reads, a.writes)))
            except ValueError as e:
                print(f"io_experiment: {e}", file=sys.stderr)
                return 2
            tick()
    for mode, r in results:
        failed |= r.reason != "ok"
        t.add_row(mode, f"{r.exits:,}", ", ".join(f"{k} {v:,}" for k, v in r.by_code.items()),
                  f"{r.commands:,}", f"{r.status_reads:,}", "" if r.guest_ms is None else f"{r.guest_ms:.1f}",
                  f"{r.seconds:.1f}" + ("" if r.reason == "ok" else f" ({r.reason})"))
    con = Console()
    if not con.is_terminal:
        con = Console(width=132)       # a pipe or a file: do not wrap the table at 80 columns
    con.print(t)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
