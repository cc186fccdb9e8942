#!/usr/bin/env python3
"""Run the kvm-unit-tests x86 binaries under the sandbox (and QEMU TCG, when installed).

Reads ``x86/unittests.cfg`` of a kvm-unit-tests build (default
``../shared/kvm-unit-tests/`` next to the repository), runs every x86_64
entry whose ``.flat`` binary is there, with its ``test_args`` (and an
``-append`` from ``extra_params``/``qemu_params``) as the multiboot command
line, one process per test, and prints a table: PASS / FAIL / SKIP counts
parsed from the test's own report lines, how the run ended, the wall time.
Entries that need more than one CPU (``smp`` > 1), another architecture, a
host check (``check = ...``) or that are in the ``nodefault`` group are listed
as skipped, with the reason.

With ``qemu-system-x86_64`` on the PATH (Debian: ``qemu-system-x86``) each
test also runs under QEMU TCG the way the suite's BUILD.md does
(``-accel tcg -cpu max,+svm -smp 1 -m 256``, isa-debug-exit at 0xf4, plus the
entry's own QEMU parameters), and the table gets the same columns for it.

    python scripts/kvm_unit_tests.py [--dir DIR] [--only GLOB] [--timeout S] [--qemu auto|yes|no] [--json]
                                     [--smp-on-one-cpu] [--subtests] [--append ARGS]

The sandbox runs every binary with ``--nested`` (the guest sees SVM, as QEMU's
``+svm`` CPU offers it), and without the features an entry's ``-cpu max,...,-rdtscp``
takes away (``--without``, always with RDPRU, which QEMU's ``max`` CPU lacks; a feature the
sandbox does not model is named in the args column).  ``--subtests`` lists each test's report lines side
by side, with the subtest an engine was in when its run was cut off.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

from sandbox.cli.helpfmt import Parser  # noqa: E402


def default_dir() -> str:
    """$KVM_UNIT_TESTS_DIR, else ``../shared/kvm-unit-tests`` next to the repository
    (or one level further up, for a git worktree kept in a subfolder)."""
    env = os.environ.get("KVM_UNIT_TESTS_DIR")
    if env:
        return env
    for up in ("..", os.path.join("..", "..")):
        d = os.path.normpath(os.path.join(REPO, up, "shared", "kvm-unit-tests"))
        if os.path.isdir(d):
            return d
    return os.path.normpath(os.path.join(REPO, "..", "shared", "kvm-unit-tests"))


DEFAULT_DIR = default_dir()
QEMU = "qemu-system-x86_64"
QEMU_BASE = ["-nodefaults", "-no-reboot", "-accel", "tcg", "-cpu", "max,+svm", "-m", "256", "-smp", "1",
             "-display", "none", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4"]
REPORT = re.compile(r"^(PASS|FAIL|SKIP|XFAIL|XPASS):", re.M)
SUMMARY = re.compile(r"^SUMMARY: .*$", re.M)


@dataclass
class Entry:
    name: str
    file: str = ""
    smp: int = 1
    arch: str = ""
    test_args: str = ""
    extra_params: str = ""
    groups: list[str] = field(default_factory=list)
    timeout: float | None = None
    check: str = ""
    accel: str = ""


@dataclass
class Outcome:
    """One run of one test under one engine."""
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    ended: str = ""
    status: int | None = None      # QEMU-style exit status: (code << 1) | 1
    seconds: float = 0.0
    summary: str = ""
    last_line: str = ""            # the test's last output line (vmexit.flat and sieve.flat print no report lines)
    reports: list[str] = field(default_factory=list)   # the report lines, e.g. "FAIL: asid_zero"
    running: str = ""              # the subtest that had started last ("SVM test: NAME") when the run ended
    verdict: str = ""              # PASS / FAIL / SKIP / ERROR, as kvm-unit-tests' runner says it


@dataclass
class Result:
    name: str
    file: str
    args: str
    skip_reason: str = ""
    sandbox: Outcome | None = None
    qemu: Outcome | None = None


def parse_cfg(text: str) -> list[Entry]:
    """kvm-unit-tests' unittests.cfg: ``[name]`` sections of ``key = value``
    lines; a value continues on indented lines; values may be quoted."""
    entries: list[Entry] = []
    cur: dict[str, str] | None = None
    key = None
    names: list[str] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^\[(.+)\]$", line.strip())
        if m and not raw[0].isspace():
            cur = {}
            names.append(m.group(1))
            entries.append(cur)            # type: ignore[arg-type]
            key = None
            continue
        if cur is None:
            continue
        if raw[0].isspace() and key is not None:
            cur[key] += " " + line.strip()
            continue
        k, sep, v = line.partition("=")
        if not sep:
            continue
        key = k.strip()
        cur[key] = v.strip()
    out = []
    for name, d in zip(names, entries):
        def unq(s: str) -> str:
            s = s.strip()
            return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s
        e = Entry(name=name, file=unq(d.get("file", "")), arch=unq(d.get("arch", "")),
                  test_args=unq(d.get("test_args", "")),
                  extra_params=unq(d.get("extra_params", d.get("qemu_params", ""))),
                  groups=unq(d.get("groups", "")).split(), check=unq(d.get("check", "")),
                  accel=unq(d.get("accel", "")))
        try:
            e.smp = int(unq(d.get("smp", "1")).split()[0], 0)
        except ValueError:
            e.smp = 2                      # an expression such as $MAX_SMP: several CPUs
        if d.get("timeout"):
            try:
                e.timeout = float(re.sub(r"[smh]$", "", unq(d["timeout"])))
            except ValueError:
                pass
        out.append(e)
    return out


def split_params(extra: str) -> tuple[str, list[str]]:
    """(the ``-append`` value, the other QEMU parameters) of an entry's extra_params."""
    try:
        words = shlex.split(extra)
    except ValueError:
        words = extra.split()
    append, rest = "", []
    i = 0
    while i < len(words):
        if words[i] == "-append" and i + 1 < len(words):
            append = words[i + 1]
            i += 2
            continue
        rest.append(words[i])
        i += 1
    return append, rest


def cpu_without(extra: list[str]) -> tuple[list[str], list[str]]:
    """The features an entry's ``-cpu max,+svm,-rdtscp,...`` takes away: (those the
    sandbox's ``--without`` models, the others -- run with the feature present).
    RDPRU is always among the first: QEMU's ``max`` CPU has no RDPRU (unittests.cfg:
    "RDPRU feature name is not defined in Qemu"), and the sandbox's processor decodes
    it for its intercept unless taken away."""
    from sandbox.svm.features import FEATURES
    known, other = ["rdpru"], []
    for i, w in enumerate(extra[:-1]):
        if w == "-cpu":
            for part in extra[i + 1].split(",")[1:]:
                if part.startswith("-"):
                    (known if part[1:].lower() in FEATURES else other).append(part[1:])
    return known, other


def command_line(e: Entry) -> str:
    append, _ = split_params(e.extra_params)
    return " ".join(x for x in (append, e.test_args) if x)


def skip_reason(e: Entry, xdir: str) -> str:
    if e.arch and e.arch != "x86_64":
        return f"arch {e.arch}"
    if not e.file or not os.path.exists(os.path.join(xdir, e.file)):
        return "binary not built"
    if e.smp > 1:
        return f"needs {e.smp} CPUs (the sandbox has one)"
    if e.check:
        return f"host check {e.check}"
    if "nodefault" in e.groups:
        return "nodefault group"
    if e.accel and e.accel not in ("tcg",):
        return f"needs accel={e.accel}"
    return ""


def parse_output(text: str, o: Outcome) -> None:
    text = text.replace("\r", "")
    o.reports = [m.group(0) for m in re.finditer(r"^(?:PASS|FAIL|SKIP|XFAIL|XPASS): .*$", text, re.M)]
    started = re.findall(r"^SVM test: (.*)$", text, re.M)
    o.running = started[-1] if started else ""
    kinds = REPORT.findall(text)
    o.passed = kinds.count("PASS") + kinds.count("XFAIL")
    o.failed = kinds.count("FAIL") + kinds.count("XPASS")
    o.skipped = kinds.count("SKIP")
    m = SUMMARY.findall(text.replace("\r", ""))
    o.summary = m[-1] if m else ""
    lines = [ln for ln in text.replace("\r", "").splitlines() if ln.strip()]
    o.last_line = lines[-1].strip() if lines else ""


def verdict(o: Outcome) -> str:
    """kvm-unit-tests' run_tests.sh reading of the QEMU exit status: 1 pass, 77 skip
    (the test exits with 38, (38 << 1) | 1 = 77), anything else fail."""
    if o.status == 1:
        return "PASS"
    if o.status == 77:
        return "SKIP"
    if o.status is None:
        return "ERROR"
    return "FAIL"


def run_sandbox(path: str, args: str, timeout: float, without: list[str] = ()) -> Outcome:
    o = Outcome()
    # --nested: the guest sees SVM, as QEMU's -cpu max,+svm offers it (the svm*.flat tests are L1 hypervisors)
    cmd = [sys.executable, "-m", "sandbox.cli", "run", path, "--json", "--quiet", "--nested", "--timeout", str(timeout)]
    if args:
        cmd += ["--append", args]
    if without:
        cmd += ["--without", ",".join(without)]         # the entry's -cpu max,-feature,...
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 240, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    except subprocess.TimeoutExpired:
        o.seconds, o.ended, o.verdict = time.monotonic() - t0, "killed (timeout)", "ERROR"
        return o
    o.seconds = time.monotonic() - t0
    final = None
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{") and '"final"' in line:
            final = json.loads(line)
            break
    if final is None:
        err = (p.stderr.strip().splitlines() or ["no result"])[-1]
        o.ended, o.verdict = f"error: {err[:80]}", "ERROR"
        return o
    parse_output(final.get("console") or "", o)
    o.status = final.get("debug_exit_status")
    reason = final["reason"]
    o.ended = f"status {o.status}" if reason == "guest-exit" and o.status is not None else reason
    if reason not in ("guest-exit",) and final.get("detail"):
        o.ended += f": {final['detail'][:70]}"
    o.verdict = verdict(o)
    return o


def run_qemu(path: str, args: str, extra: list[str], timeout: float) -> Outcome:
    o = Outcome()
    cmd = [QEMU, *QEMU_BASE, *extra, "-kernel", path]
    if args:
        cmd += ["-append", args]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        out, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode("utf-8", "replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = None
    o.seconds = time.monotonic() - t0
    parse_output(out, o)
    if rc is None:
        o.ended, o.verdict = f"timeout ({timeout:g} s)", "ERROR"
        return o
    o.status = rc
    o.ended = f"status {rc}"
    if rc == 0 and not o.summary:
        o.ended = "status 0 (no debug-exit: triple fault or reset)"
    o.verdict = verdict(o)
    return o


def table(results: list[Result], with_qemu: bool):
    from rich.markup import escape
    from rich.table import Table
    t = Table(title="kvm-unit-tests x86_64 under the sandbox" + (" and QEMU TCG" if with_qemu else ""))
    t.add_column("test")
    t.add_column("args", max_width=28, overflow="ellipsis", no_wrap=True)
    for who in ("sandbox",) + (("qemu",) if with_qemu else ()):
        t.add_column(f"{who}\nP/F/S", justify="right")
        t.add_column(f"{who}\nended")
        t.add_column(f"{who}\ns", justify="right")
    for r in results:
        if r.skip_reason == "binary not built":
            continue                       # summarized below the table
        row = [r.name, escape(r.args)]
        for o in (r.sandbox,) + ((r.qemu,) if with_qemu else ()):
            if o is None:
                row += ["-", f"[dim]skipped: {r.skip_reason}[/dim]", ""]
            else:
                style = {"PASS": "green", "FAIL": "red", "SKIP": "yellow"}.get(o.verdict, "magenta")
                tail = "" if o.summary or not o.last_line else f" · {escape(o.last_line[:40])}"
                row += [f"{o.passed}/{o.failed}/{o.skipped}",
                        f"[{style}]{o.verdict}[/{style}] {escape(o.ended)}{tail}", f"{o.seconds:.1f}"]
        t.add_row(*row)
    return t


def subtest_rows(r: Result) -> list[tuple[str, str, str]]:
    """(report text, sandbox verdict, QEMU verdict) per report line, in the order the
    test printed them; a subtest an engine never reached is "-", the one it was in when
    it stopped "stalled"."""
    names: list[str] = []
    got: dict[str, dict[str, str]] = {}
    for who, o in (("sandbox", r.sandbox), ("qemu", r.qemu)):
        if o is None:
            continue
        for line in o.reports:
            kind, _, text = line.partition(": ")
            if text not in got:
                names.append(text)
                got[text] = {}
            got[text].setdefault(who, kind)
        if o.running and o.running not in got and o.verdict == "ERROR":
            names.append(o.running)
            got[o.running] = {}
        if o.running and o.verdict == "ERROR":
            got[o.running].setdefault(who, "stalled")
    return [(n, got[n].get("sandbox", "-"), got[n].get("qemu", "-")) for n in names]


def print_subtests(results: list[Result], with_qemu: bool) -> None:
    for r in results:
        if r.sandbox is None or not (r.sandbox.reports or (r.qemu and r.qemu.reports)):
            continue
        print(f"\n{r.name} ({r.file} {r.args})")
        for text, sb, q in subtest_rows(r):
            print(f"  {sb:8} {q if with_qemu else '':8} {text}")


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=DEFAULT_DIR, help="kvm-unit-tests build (with x86/unittests.cfg)")
    ap.add_argument("--only", metavar="GLOB", action="append", help="run only entries matching (repeatable)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="per-test wall-clock limit in seconds (default: the entry's, at least 120)")
    ap.add_argument("--qemu", choices=("auto", "yes", "no"), default="auto",
                    help="also run QEMU TCG (auto: when qemu-system-x86_64 is installed)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ap.add_argument("--smp-on-one-cpu", action="store_true",
                    help="run entries that ask for several CPUs on one anyway (as BUILD.md's reference run of svm.flat)")
    ap.add_argument("--subtests", action="store_true",
                    help="after the table, each test's report lines side by side (sandbox | QEMU)")
    ap.add_argument("--append", metavar="ARGS", default=None,
                    help="replace every entry's command line (e.g. svm.flat's subtest filters)")
    a = ap.parse_args(argv)
    xdir = os.path.join(a.dir, "x86")
    cfg = os.path.join(xdir, "unittests.cfg")
    if not os.path.exists(cfg):
        print(f"kvm_unit_tests: no {cfg}: build kvm-unit-tests (see its BUILD.md) or pass --dir", file=sys.stderr)
        return 2
    have_qemu = shutil.which(QEMU) is not None
    if a.qemu == "yes" and not have_qemu:
        print(f"kvm_unit_tests: {QEMU} is not installed (Debian: apt-get install qemu-system-x86)", file=sys.stderr)
        return 2
    with_qemu = have_qemu and a.qemu != "no"
    entries = [e for e in parse_cfg(open(cfg).read()) if e.arch in ("", "x86_64")]
    if a.only:
        entries = [e for e in entries if any(fnmatch.fnmatch(e.name, g) or fnmatch.fnmatch(e.file, g) for g in a.only)]
    results: list[Result] = []
    from rich.console import Console
    err = Console(stderr=True)
    progress = None
    if err.is_terminal and not a.json:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err, transient=True)
        progress.start()
        task = progress.add_task("kvm-unit-tests", total=len(entries))
    try:
        for e in entries:
            args = command_line(e) if a.append is None else a.append
            if a.smp_on_one_cpu:
                e.smp = 1
            r = Result(e.name, e.file, args, skip_reason(e, xdir))
            if progress is not None:
                progress.update(task, description=f"{e.name}")
            if not r.skip_reason:
                path = os.path.join(xdir, e.file)
                limit = a.timeout if a.timeout is not None else max(120.0, e.timeout or 0)
                _, extra = split_params(e.extra_params)
                without, unmodelled = cpu_without(extra)
                if unmodelled:
                    r.args += f" (sandbox keeps {', '.join(unmodelled)})"
                r.sandbox = run_sandbox(path, args, limit, without)
                if with_qemu:
                    r.qemu = run_qemu(path, args, extra, limit)
            results.append(r)
            if progress is not None:
                progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    if a.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        out = Console(width=None if sys.stdout.isatty() else 200)
        out.print(table(results, with_qemu))
        ran = [r for r in results if r.sandbox is not None]
        ok = sum(1 for r in ran if r.sandbox.verdict == "PASS")
        why: dict[str, int] = {}
        for r in results:
            if r.skip_reason:
                k = r.skip_reason.split(" (")[0]
                why[k] = why.get(k, 0) + 1
        out.print(f"{len(ran)} run, {ok} passed under the sandbox; {len(results) - len(ran)} skipped: "
                  + ", ".join(f"{n} {k}" for k, n in sorted(why.items())))
        if a.subtests:
            print_subtests(results, with_qemu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
