"""Handler arc coverage as campaign feedback, and the HTML report.

The arcs recorded by the campaign's instrumented handlers are checked
against coverage.py's tracer and parser (an independent implementation) on
the same cases.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import coverage
import pytest
from coverage.parser import PythonParser

from sandbox.fuzz import campaign as C
from sandbox.fuzz.arcs import ArcTracer, arc_count
from sandbox.fuzz.generate import next_case
from sandbox.fuzz.snapshot import Harness
from sandbox.hypervisor import handlers

ROOT = Path(__file__).resolve().parents[2]
HANDLERS_PY = str(Path(handlers.__file__).resolve())


def test_arcs_match_coverage_py():
    cases = [next_case(random.Random(i), [], 64) for i in range(300)]
    ours_h = Harness()
    tracer = ArcTracer(ours_h.m)
    ours: set = set()
    for c in cases:
        ours_h.run(c)
        ours |= {(a, b) for _, f, a, b in tracer.take() if str(Path(f).resolve()) == HANDLERS_PY}
    ref_h = Harness()
    cov = coverage.Coverage(branch=True, data_file=None, include=[HANDLERS_PY])
    cov.start()
    try:
        for c in cases:
            ref_h.run(c)
    finally:
        cov.stop()
    data = cov.get_data()
    f = next(x for x in data.measured_files() if str(Path(x).resolve()) == HANDLERS_PY)
    # coverage.py's tracer sees a line event wherever a multi-line statement's
    # bytecode moves to another line; its reports put each statement at its
    # first line (the parser's translate_arcs), as ours records them
    parser = PythonParser(filename=f)
    parser.parse_source()
    ref = {(a, b) for a, b in parser.translate_arcs(data.arcs(f)) if a != b}
    # coverage.py also sees the module-level code and handlers that run outside a dispatch
    # (none here); every arc of ours is one coverage.py recorded, and most of its arcs are ours
    assert ours and ours <= ref
    assert len(ours) >= 0.9 * len({a for a in ref if a[0] != -1})


def test_campaign_keeps_cases_that_reach_new_arcs():
    w = C.Worker(C.Options(seed=5, audit_every=0, differential_every=0))
    for _ in range(60):
        w.step()
    assert arc_count(w.stats.coverage) > 20
    off = C.Worker(C.Options(seed=5, audit_every=0, differential_every=0, arcs=False))
    for _ in range(60):
        off.step()
    assert arc_count(off.stats.coverage) == 0 and off.stats.corpus <= w.stats.corpus


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_cli_coverage_report(tmp_path):
    r = cli("fuzz", "--cases", "40", "--seed", "2", "--json", "--differential-every", "0",
            "--coverage-report", str(tmp_path / "rep"))
    d = json.loads(r.stdout)
    assert d["arcs"] > 0 and (tmp_path / "rep" / "index.html").exists()
    assert any("handlers_py" in p.name for p in (tmp_path / "rep").iterdir())


@pytest.mark.parametrize("extra,msg", [(["--no-arcs"], "drop --no-arcs"), ([], "a file, not a directory")])
def test_cli_coverage_report_bad_input(tmp_path, extra, msg):
    f = tmp_path / "file"
    f.write_text("")
    r = cli("fuzz", "--cases", "5", "--coverage-report", str(f), *extra)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_handlers_are_rebuilt_copies_and_the_module_is_untouched():
    """No settrace: each handler is a recording copy over a copy of the
    module's namespace; the module's own functions (other machines') are as they were."""
    import types
    before = {n: f.__code__ for n, f in vars(handlers).items() if isinstance(f, types.FunctionType)}
    h = Harness()
    ArcTracer(h.m)
    for fn in h.m.handlers.values():
        assert isinstance(fn, types.FunctionType) and fn.__globals__ is not vars(handlers)
        assert str(Path(fn.__code__.co_filename).resolve()) == HANDLERS_PY
        assert fn.__code__ is not getattr(handlers, fn.__name__).__code__
    assert {n: f.__code__ for n, f in vars(handlers).items() if isinstance(f, types.FunctionType)} == before
    seen = []                                                   # a handler runs without a global tracer
    orig = h.m.handlers
    for code, fn in list(orig.items()):
        orig[code] = (lambda f: lambda m, e: (seen.append(sys.gettrace()), f(m, e))[1])(fn)
    for i in range(20):
        h.run(next_case(random.Random(i), [], 64))
    assert len(seen) > 10 and all(t is None for t in seen)
