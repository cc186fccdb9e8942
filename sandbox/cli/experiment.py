"""``sandbox experiment``: run the seeds' experiments in real guests.

    sandbox experiment --list
    sandbox experiment NAME [--quick] [--out DIR] [--json]
    sandbox experiment all  [--quick] [--out DIR] [--json]

Each experiment prints the seed's figures beside the measured ones and a
detail table, and writes ``NAME.png`` (plot) and ``NAME.json`` (raw data)
into ``--out`` (default ``results/NAME/``; with ``all``, ``DIR/NAME/``).
A progress bar is shown on a terminal only.  Exit status: 0 when every
experiment's checks hold, 1 when one does not (or a guest run failed), 2 on
bad input, 130 after Ctrl-C (finished experiments keep their files).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..experiments.common import STOP, ExperimentError, Interrupted
from ..experiments.registry import EXPERIMENTS, Report, execute
from .console import Console
from .errors import CliError

EPILOG = """\
examples:
  sandbox experiment --list
  sandbox experiment msr-bitmap --quick
  sandbox experiment all --out results/
  sandbox experiment virtio --json > virtio.jsonl
"""
DEFAULT_OUT = Path("results")


def add_parser(sub) -> None:
    e = sub.add_parser("experiment", help="run the seeds' experiments: seed vs measured tables, plots, raw data",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("name", nargs="?", help="an experiment (see --list), or 'all'")
    e.add_argument("--list", action="store_true", help="list the experiments, one per line (with --json, one JSON object per line)")
    e.add_argument("--quick", action="store_true", help="a scaled-down run that finishes in seconds (for CI)")
    e.add_argument("--out", type=Path, metavar="DIR",
                   help="where NAME.png and NAME.json go (default results/NAME/; with 'all', DIR/NAME/)")
    e.add_argument("--json", action="store_true", help="print one JSON object per experiment instead of tables")
    e.set_defaults(fn=cmd_experiment)


def _out_dirs(names: list[str], out: Path | None, all_: bool) -> dict[str, Path]:
    if all_ or out is None:
        base = out or DEFAULT_OUT
        return {n: base / n for n in names}
    return {names[0]: out}


def _check_writable(d: Path) -> None:
    """Fail before any guest runs if the files could not be written."""
    probe = d / ".sandbox-write-probe"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CliError(f"cannot write to --out directory {d}: {e.strerror or e}") from None


def _render(rep: Report, con: Console) -> None:
    e, o = rep.experiment, rep.outcome
    con.rule(f"[bold]{e.name}[/]: {e.title}")
    con.print(f"[dim]{e.source}[/]  claim: [italic]{e.claim}[/]")
    t = Table(title="the seed's figure beside the sandbox's" + (" (--quick run)" if rep.quick else ""))
    for col in ("measure", "seed", "sandbox", "note"):
        t.add_column(col, overflow="fold")
    for c in o.comparisons:
        t.add_row(c.measure, c.seed, f"[bold]{c.sandbox}[/]", c.note)
    con.print(t)
    d = Table(title="measured")
    for i, col in enumerate(o.columns):
        d.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for row in o.rows:
        d.add_row(*row)
    con.print(d)
    for n in o.notes:
        con.print(f"[dim]note: {n}[/]")
    for what, ok in o.checks.items():
        con.print(f"  {'[green]ok[/]' if ok else '[red]FAILED[/]'}  {what}")
    con.print(f"files: {rep.png_path}, {rep.json_path}  ({rep.seconds:.1f} s)")


def cmd_experiment(a: argparse.Namespace) -> int:
    if a.list:
        extra = [f for f, given in (("an experiment name", a.name), ("--quick", a.quick), ("--out", a.out)) if given]
        if extra:
            raise CliError(f"--list lists the experiments and runs none: drop {' and '.join(extra)}")
        for n, e in EXPERIMENTS.items():
            print(json.dumps({"name": n, "title": e.title, "source": e.source}) if a.json else f"{n:<18} {e.title}")
        return 0
    if not a.name:
        raise CliError("give an experiment name, 'all', or --list")
    all_ = a.name == "all"
    if not all_ and a.name not in EXPERIMENTS:
        raise CliError(f"unknown experiment {a.name!r}; choose from {', '.join(EXPERIMENTS)}, or all")
    names = list(EXPERIMENTS) if all_ else [a.name]
    dirs = _out_dirs(names, a.out, all_)
    for d in dirs.values():
        _check_writable(d)
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(width=140, highlight=False)      # a pipe or a file: no wrapping at 80 columns
    err = Console(stderr=True, highlight=False)
    done: list[Report] = []
    failed = False
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("[dim]{task.fields[step]}"), console=err, transient=True,
                        disable=a.json or not err.is_terminal)
    try:
        with STOP, progress:
            for n in names:
                exp = EXPERIMENTS[n]
                task = progress.add_task(n, total=exp.steps(a.quick), step="")
                try:
                    rep = execute(exp, a.quick, dirs[n],
                                  lambda label, t=task: progress.update(t, advance=1, step=label))
                except ExperimentError as e:
                    progress.remove_task(task)
                    err.print(f"[red]{n}: {e}[/]")
                    failed = True
                    continue
                progress.remove_task(task)
                done.append(rep)
                failed |= not rep.outcome.ok
                if a.json:
                    print(json.dumps(rep.as_json()), flush=True)
                else:
                    _render(rep, out)
                STOP.check()
    except (Interrupted, KeyboardInterrupt):
        kept = ", ".join(str(r.json_path.parent) for r in done) or "none"
        print(f"sandbox: interrupted; finished experiments' files kept: {kept}", file=sys.stderr)
        return 130
    return 1 if failed else 0
