"""Arc coverage of the exit handlers, as campaign feedback (``sandbox fuzz --arcs``).

A cheap arc set of our own rather than coverage.py's tracer over the whole
process: :class:`ArcTracer` wraps every handler in the machine's table and
turns ``sys.settrace`` on only while a handler runs.  The global trace
function is then called for each Python function the handler calls; it
returns a line tracer only for code in the handler files (the sandbox's
``hypervisor/handlers.py`` and the user's hooks file), so the processor model
and Unicorn glue a handler calls into are not line-traced.  Arcs follow
coverage.py's convention -- ``(-first line, line)`` on entry, ``(line,
-first line)`` on return -- so :func:`html_report` can hand them to
coverage.py for an HTML report of the handlers.

Each arc is a coverage key ``("arc", file, from, to)`` beside the campaign's
(EXITCODE, EXITINFO class, handler) keys: a case that reaches a new arc joins
the corpus.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

from ..hypervisor import handlers as default_handlers
from ..hypervisor.machine import Machine

Arc = tuple[str, str, int, int]


class ArcTracer:
    """Arcs of the handler files, recorded while handlers of ``m`` run."""

    def __init__(self, m: Machine, extra_files: Iterable[str] = ()) -> None:
        self.files = {str(Path(default_handlers.__file__).resolve())}
        self.files |= {str(Path(f).resolve()) for f in extra_files}
        self._files: set[str] = set()             # co_filename spellings seen to be handler files
        self._others: set[str] = set()            # ... and seen not to be (resolving a path costs ~50 us)
        self.arcs: set[Arc] = set()
        for code, fn in list(m.handlers.items()):
            m.handlers[code] = self._wrap(fn)

    def _is_handler_file(self, fname: str) -> bool:
        if fname in self._files:
            return True
        if fname in self._others:
            return False
        if str(Path(fname).resolve()) in self.files:
            self._files.add(fname)
            return True
        self._others.add(fname)
        return False

    def _trace(self, frame, event, arg):
        code = frame.f_code
        fname = code.co_filename
        if fname in self._others or (fname not in self._files and not self._is_handler_file(fname)):
            return None
        arcs, first = self.arcs, -code.co_firstlineno
        prev = [first]

        def local(frame, event, arg):
            if event == "line":
                ln = frame.f_lineno
                arcs.add(("arc", fname, prev[0], ln))
                prev[0] = ln
            elif event == "return":
                arcs.add(("arc", fname, prev[0], first))
            return local
        return local

    def _wrap(self, fn: Callable) -> Callable:
        trace = self._trace

        def handler(m, e):
            old = sys.gettrace()
            sys.settrace(trace)
            try:
                return fn(m, e)
            finally:
                sys.settrace(old)
        handler.__name__ = getattr(fn, "__name__", "handler")
        return handler

    def take(self) -> frozenset[Arc]:
        """The arcs of the case just run."""
        out, self.arcs = frozenset(self.arcs), set()
        return out


def arc_count(keys: Iterable) -> int:
    return sum(1 for k in keys if isinstance(k, tuple) and k and k[0] == "arc")


class ReportError(Exception):
    """The HTML report cannot be written (one line for the CLI)."""


def html_report(keys: Iterable, directory: Path) -> int:
    """Write coverage.py's HTML report of the arcs among ``keys`` into ``directory``.
    Returns the number of files reported."""
    try:
        import coverage                          # optional: pip install -e '.[coverage]'
    except ImportError:
        raise ReportError("--coverage-report needs coverage.py: pip install -e '.[coverage]'") from None
    by_file: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for k in keys:
        if isinstance(k, tuple) and k and k[0] == "arc":
            by_file[k[1]].append((k[2], k[3]))
    cov = coverage.Coverage(branch=True, data_file=None)
    data = cov.get_data()
    data.add_arcs(dict(by_file))
    try:
        cov.html_report(directory=str(directory), include=list(by_file) or None, title="sandbox fuzz: handler arcs")
    except coverage.exceptions.NoDataError:
        raise ReportError("--coverage-report: no handler ran, nothing to report") from None
    except OSError as e:
        raise ReportError(f"--coverage-report {directory}: {e.strerror or e}") from None
    return len(by_file)
