"""Arc coverage of the exit handlers, as campaign feedback (``sandbox fuzz --arcs``).

:class:`ArcTracer` gives each handler in the machine's table a copy of
itself whose code records, before every statement, the arc from the
statement before: the handler file's source is parsed, instrumented
(:class:`_Instrument`) and compiled once, and the module-level functions of
the file are rebuilt from that code over a copy of the module's namespace,
so a handler's calls to its file's helpers are recorded too and the module
itself stays as it was.  Nothing traces the processor model and Unicorn glue
a handler calls into: under ``sys.settrace`` CPython 3.11 runs every frame
unspecialised with a line check per bytecode, which made a handler about
three times as slow.  Handlers this cannot rebuild (a wrapper from another
file, such as ``--hooks``' guards, or a file that rebinds a module global)
are traced with ``sys.settrace`` as before, only while they run.

Arcs follow coverage.py's convention -- ``(-first line, line)`` on entry,
``(line, -first line)`` on return, each statement at its first line, a
loop's header again at each iteration -- so :func:`html_report` can hand them
to coverage.py for an HTML report of the handlers.

Each arc is a coverage key ``("arc", file, from, to)`` beside the campaign's
(EXITCODE, EXITINFO class, handler) keys: a case that reaches a new arc joins
the corpus.
"""
from __future__ import annotations

import ast
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

from ..hypervisor import handlers as default_handlers
from ..hypervisor.machine import Machine

Arc = tuple[str, str, int, int]


#: the names the instrumented code uses: the frame's previous line, and the file's arc set's ``add``
_PREV, _ADD = "_sandbox_arc_prev", "_sandbox_arc_add"


def _first_line(st: ast.stmt) -> int:
    """Where a statement starts: its first decorator's line, if any (a function's co_firstlineno)."""
    return min([st.lineno] + [d.lineno for d in getattr(st, "decorator_list", ())])


class _Instrument(ast.NodeTransformer):
    """Puts ``add((prev, L)); prev = L`` before every statement of every function."""

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef):
        first = _first_line(node)
        body = node.body
        doc = body[:1] if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str) else []
        enter = ast.Assign(targets=[ast.Name(_PREV, ast.Store())], value=ast.Constant(-first))
        leave = self._add(-first)
        node.body = doc + [enter, ast.Try(body=self._stmts(body[len(doc):], None) or [ast.Pass()], handlers=[],
                                          orelse=[], finalbody=[leave])]
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    @staticmethod
    def _add(line: int) -> ast.stmt:
        return ast.Expr(ast.Call(ast.Name(_ADD, ast.Load()),
                                 [ast.Tuple([ast.Name(_PREV, ast.Load()), ast.Constant(line)], ast.Load())], []))

    def _record(self, line: int) -> list[ast.stmt]:
        return [self._add(line), ast.Assign(targets=[ast.Name(_PREV, ast.Store())], value=ast.Constant(line))]

    def _stmts(self, stmts: list[ast.stmt], loop: int | None) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for st in stmts:
            out += self._record(_first_line(st))
            if isinstance(st, ast.Continue) and loop is not None:
                out += self._record(loop)          # the jump back to the loop's header
            out.append(self._inner(st, loop))
        return out

    def _inner(self, st: ast.stmt, loop: int | None) -> ast.stmt:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return self.visit(st)
        if isinstance(st, (ast.For, ast.AsyncFor, ast.While)):
            st.body = self._stmts(st.body, st.lineno) + self._record(st.lineno)
            st.orelse = self._stmts(st.orelse, loop)
        elif isinstance(st, (ast.With, ast.AsyncWith)):
            st.body = self._stmts(st.body, loop) + self._record(st.lineno)       # __exit__, at the with line
        elif isinstance(st, ast.If):
            st.body, st.orelse = self._stmts(st.body, loop), self._stmts(st.orelse, loop)
        elif isinstance(st, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            st.body = self._stmts(st.body, loop)
            for h in st.handlers:
                h.body = self._record(h.lineno) + self._stmts(h.body, loop)
            st.orelse, st.finalbody = self._stmts(st.orelse, loop), self._stmts(st.finalbody, loop)
        elif isinstance(st, ast.Match):
            for c in st.cases:
                c.body = self._stmts(c.body, loop)
        return st


def _codes(code: types.CodeType):
    """``code`` and every code object nested in it."""
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _codes(c)


class _Rebuilt:
    """The module-level functions of one handler file, rebuilt from its
    instrumented source over a copy of the module's namespace, and the
    (from, to) line pairs they record."""

    def __init__(self, module_globals: dict, fname: str) -> None:
        with open(fname, encoding="utf-8") as f:
            tree = ast.parse(f.read(), fname)
        if any(isinstance(n, (ast.Global, ast.Nonlocal)) for n in ast.walk(tree)):
            raise ValueError("rebinds names outside its frames")      # a namespace copy would not see them
        tree = ast.fix_missing_locations(_Instrument().visit(tree))
        by_key = {(c.co_qualname, c.co_firstlineno): c for c in _codes(compile(tree, fname, "exec"))}
        self.pairs: set[tuple[int, int]] = set()
        ns = dict(module_globals)
        ns[_ADD] = self.pairs.add
        self.funcs: dict[types.FunctionType, types.FunctionType] = {}
        for name, fn in module_globals.items():
            if not isinstance(fn, types.FunctionType) or fn.__code__.co_filename != fname or fn.__closure__:
                continue
            code = by_key.get((fn.__code__.co_qualname, fn.__code__.co_firstlineno))
            if code is None or code.co_freevars:
                continue
            new = types.FunctionType(code, ns, fn.__name__, fn.__defaults__)
            new.__kwdefaults__, new.__qualname__, new.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
            new.__dict__.update(fn.__dict__)
            new.__module__ = fn.__module__
            ns[name] = self.funcs[fn] = new


class ArcTracer:
    """Arcs of the handler files, recorded while handlers of ``m`` run."""

    def __init__(self, m: Machine, extra_files: Iterable[str] = ()) -> None:
        self.files = {str(Path(default_handlers.__file__).resolve())}
        self.files |= {str(Path(f).resolve()) for f in extra_files}
        self._files: set[str] = set()             # co_filename spellings seen to be handler files
        self._others: set[str] = set()            # ... and seen not to be (resolving a path costs ~50 us)
        self.arcs: set[Arc] = set()               # what the settrace fallback records
        #: co_filename -> its rebuilt functions (None: the file cannot be rebuilt)
        self._rebuilt: dict[str, _Rebuilt | None] = {}
        for code, fn in list(m.handlers.items()):
            m.handlers[code] = self._instrumented(fn) or self._wrap(fn)

    def _instrumented(self, fn: Callable) -> Callable | None:
        """The rebuilt, recording copy of ``fn``, or None when it cannot be rebuilt."""
        if not isinstance(fn, types.FunctionType):
            return None
        fname = fn.__code__.co_filename
        if not self._is_handler_file(fname):
            return None
        if fname not in self._rebuilt:
            try:
                self._rebuilt[fname] = _Rebuilt(fn.__globals__, fname)
            except (OSError, SyntaxError, ValueError):
                self._rebuilt[fname] = None
        r = self._rebuilt[fname]
        return r.funcs.get(fn) if r is not None else None

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
        """``fn`` traced with ``sys.settrace`` while it runs (for what cannot be rebuilt)."""
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
        out = set(self.arcs)
        self.arcs.clear()
        for fname, r in self._rebuilt.items():
            if r is not None and r.pairs:
                out.update(("arc", fname, a, b) for a, b in r.pairs)
                r.pairs.clear()
        return frozenset(out)


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
