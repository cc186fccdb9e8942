"""The campaign: generate, run, judge, keep, save -- in one process or N workers.

Workers share the corpus and crash directories AFL-style: each writes the
cases that reached new coverage into the corpus directory and, every few
hundred cases, picks up what the others wrote there.  With ``--jobs 1`` the
case sequence is a pure function of ``--seed`` (and ``--cases``).
"""
from __future__ import annotations

import collections
import gc
import multiprocessing as mp
import os
import queue as queue_mod
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .case import Case, CaseError
from .differential import QemuSvm, differential
from .arcs import ArcTracer
from .generate import next_case
from .hooks_fuzz import HookGuard
from .oracle import Finding, coverage, findings, minimize
from .snapshot import Harness
from .uncounted import UncountedReference

SYNC_EVERY = 256          # cases between corpus syncs with the other workers
STATUS_EVERY_S = 0.5


class CampaignError(Exception):
    """Bad campaign input: one clear line for the CLI."""


@dataclass
class Options:
    seed: int = 0
    seconds: float | None = None
    cases: int | None = None
    jobs: int = 1
    corpus: Path | None = None
    crashes: Path | None = None
    audit: bool = False             # audit every case (slow)
    audit_every: int = 8            # otherwise audit one case in N (0: never)
    differential_every: int = 16    # compare one case in N with QEMU's SVM (0: never)
    uncounted_every: int = 0        # run one case in N again without counting (0: never; see .uncounted)
    n_insns: int = 64
    paging: str = "nested"          # the hypervisor's memory virtualization: nested | shadow
    sev: bool = False               # the guest launched with SEV (encrypted RAM; nested paging)
    minimize: bool = True
    stop_on_finding: bool = False
    hooks: Path | None = None       # a user's hooks file, fuzzed with the oracles of hooks_fuzz.py
    arcs: bool = True               # handler arcs as coverage feedback (arcs.py)


@dataclass
class Stats:
    execs: int = 0
    audited: int = 0
    differential: int = 0
    exits: collections.Counter = field(default_factory=collections.Counter)
    ends: collections.Counter = field(default_factory=collections.Counter)
    coverage: set = field(default_factory=set)
    new_coverage: int = 0
    corpus: int = 0
    findings: dict = field(default_factory=dict)     # signature -> (Finding, saved path or "")
    uncounted: int = 0               # cases run again without counting (.uncounted)

    def merge(self, o: "Stats") -> None:
        self.execs += o.execs
        self.audited += o.audited
        self.differential += o.differential
        self.uncounted += o.uncounted
        self.exits.update(o.exits)
        self.ends.update(o.ends)
        self.coverage |= o.coverage
        self.new_coverage += o.new_coverage
        self.corpus += o.corpus
        for k, v in o.findings.items():
            self.findings.setdefault(k, v)


def stamp_machine(case: Case, opts: Options) -> Case:
    """Record on a finding's case the machine the campaign ran it on -- paging mode,
    SEV, the --hooks file -- so its replay runs it there (or asks for the hooks)."""
    case.paging, case.sev = opts.paging, opts.sev
    case.hooks = str(opts.hooks) if opts.hooks is not None else ""
    return case


def check_dirs(opts: Options) -> None:
    """Fail early, with one line, on unusable directories or corpus files."""
    if opts.jobs < 1:
        raise CampaignError("--jobs must be at least 1")
    if opts.sev and opts.paging != "nested":
        raise CampaignError("--sev needs nested paging: the hypervisor cannot read an encrypted guest's page tables")
    cores = os.cpu_count() or 1
    if opts.jobs > cores:
        raise CampaignError(f"--jobs {opts.jobs} is more than the {cores} cores of this machine")
    for d, what in ((opts.crashes, "crash"), (opts.corpus, "corpus")):
        if d is None:
            continue
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CampaignError(f"{what} directory {d} is not writable: {e.strerror or e}") from None
    if opts.corpus is not None:
        load_corpus(opts.corpus)


def load_corpus(d: Path) -> list[Case]:
    out = []
    for p in sorted(d.glob("*.case")):
        try:
            out.append(Case.load(p))
        except CaseError as e:
            raise CampaignError(str(e)) from None
    return out


class Worker:
    """One process's share of the campaign."""

    def __init__(self, opts: Options, index: int = 0, patch: Callable[[], None] | None = None) -> None:
        if patch is not None:
            patch()
        self.opts, self.index = opts, index
        self.rng = random.Random(opts.seed * 1_000_003 + index)
        self.auditing = Harness(audit=True, paging=opts.paging, sev=opts.sev) if opts.audit or opts.audit_every else None
        # one machine runs the audited and the other cases alike (the audit switched on per
        # case): two machines taking turns, each with its own DRAM, translated code, hooks
        # and TLB, ran the campaign at about the rate of auditing every case
        self.fast = None if opts.audit else self.auditing or Harness(paging=opts.paging, sev=opts.sev)
        self.corpus: list[Case] = load_corpus(opts.corpus) if opts.corpus else []
        self._known_files = {p.name for p in opts.corpus.glob("*.case")} if opts.corpus else set()
        self.stats = Stats(corpus=0)
        self._saved = 0
        #: (finding, minimized case) pairs, kept when a caller sets a list here (the Ray driver
        #: saves findings in one place, so its workers keep them instead of writing files)
        self.keep_cases: list | None = None
        self.qemu = None
        if opts.differential_every:
            self.qemu = QemuSvm()
        #: the machine that runs cases again without counting (--uncounted-every)
        self.uncounted = UncountedReference(opts.paging, opts.sev, str(opts.hooks) if opts.hooks is not None else None) \
            if opts.uncounted_every else None
        #: the user's handlers, guarded, on each harness's machine (--hooks)
        harnesses = {id(h): h for h in (self.fast, self.auditing) if h is not None}.values()
        self.guards = {id(h): HookGuard(h.m, str(opts.hooks)) for h in harnesses} if opts.hooks is not None else {}
        extra = [str(opts.hooks)] if opts.hooks is not None else []
        self.tracers = {id(h): ArcTracer(h.m, extra) for h in harnesses} if opts.arcs else {}

        # the machines, tables and caches built above live as long as the worker:
        # out of the collector's way, so each collection walks only per-case garbage
        gc.freeze()

    def _arcs(self, h: Harness) -> frozenset:
        """The handler arcs of the case ``h`` just ran (empty without --arcs)."""
        t = self.tracers.get(id(h))
        return t.take() if t is not None else frozenset()

    def _judge(self, h: Harness, out) -> list[Finding]:
        """The fast oracles, and the user-handler oracles when --hooks is given."""
        fs = findings(out)
        g = self.guards.get(id(h))
        return fs + g.take() if g is not None else fs

    def step(self) -> list[Finding]:
        o = self.opts
        case = next_case(self.rng, self.corpus, o.n_insns)
        n = self.stats.execs
        audit_now = o.audit or (o.audit_every and n % o.audit_every == 0)
        h = self.auditing if audit_now else self.fast
        out = h.run(case, audit=bool(audit_now))
        st = self.stats
        st.execs += 1
        st.audited += bool(audit_now)
        for e in out.exits:
            st.exits[e.exitcode] += 1
        if out.result is not None:
            st.ends[out.result.reason] += 1
        cov = coverage(out) | self._arcs(h)
        new = cov - st.coverage
        if new:
            st.coverage |= new
            st.new_coverage += len(new)
            self.corpus.append(case)
            st.corpus += 1
            self._save_corpus(case)
        fs = self._judge(h, out)
        fresh = []
        for c, msgs in out.earlier:        # an earlier case's, pinned on it by the harness's replay
            fresh += self._keep(st, [Finding("isolation", m) for m in msgs], c, h)
        if self.qemu is not None and n % o.differential_every == o.differential_every - 1:
            st.differential += 1
            fs += [Finding("differential", d) for d in self._differential(case, out)]
        if self.uncounted is not None and n % o.uncounted_every == o.uncounted_every - 1:
            st.uncounted += 1
            fs += [Finding(k, m) for k, m in self.uncounted.compare(case, out)]
        fresh += self._keep(st, fs, case, h)
        if n % SYNC_EVERY == SYNC_EVERY - 1:
            self._sync()
        return fresh

    def _keep(self, st: Stats, fs: list[Finding], case: Case, h: Harness) -> list[Finding]:
        """Save the findings not seen before, with ``case`` as their reproducer."""
        fresh = [f for f in fs if f.signature not in st.findings]
        for f in fresh:
            st.findings[f.signature] = (f, self._save_finding(f, case, h))
        return fresh

    # -- corpus / crashes on disk -------------------------------------------------------
    def _save_corpus(self, case: Case) -> None:
        if self.opts.corpus is None:
            return
        case.paging, case.sev = self.opts.paging, self.opts.sev
        name = f"w{self.index}-{self._saved:06d}.case"
        self._saved += 1
        case.save(self.opts.corpus / name)
        self._known_files.add(name)

    def _sync(self) -> None:
        d = self.opts.corpus
        if d is None:
            return
        for p in d.glob("*.case"):
            if p.name not in self._known_files:
                self._known_files.add(p.name)
                try:
                    self.corpus.append(Case.load(p))
                except CaseError:
                    pass          # another worker is mid-write; it is picked up next sync

    def _differential(self, case: Case, out) -> list[str]:
        hidden = (self.fast or self.auditing).hypervisor_exits(case)
        exits = [e for e in out.exits if e.exitcode not in hidden] if hidden else out.exits
        try:
            return differential(case, exits, self.qemu)
        except Exception as e:                 # the reference failing is not the sandbox's bug
            return [] if not isinstance(e, AssertionError) else [str(e)]

    def _reproduces(self, f: Finding, h: Harness) -> Callable[[Case], bool]:
        if f.kind in ("uncounted", "history"):
            return lambda c: any(Finding(k, m).signature == f.signature
                                 for k, m in self.uncounted.compare(c, h.run(c)))
        if f.kind == "differential":
            return lambda c: any(m == f.message or Finding(f.kind, m).signature == f.signature
                                 for m in self._differential(c, h.run(c)))
        def still(c: Case) -> bool:
            out = h.run(c, full=f.kind == "isolation")     # a missed write shows only in a full comparison
            self._arcs(h)                   # a minimizing run's arcs are not the next case's
            return any(g.signature == f.signature for g in self._judge(h, out))
        return still

    def _save_finding(self, f: Finding, case: Case, h: Harness) -> str:
        small = case
        if self.opts.minimize:
            small = minimize(case, self._reproduces(f, h))
        if self.keep_cases is not None:
            self.keep_cases.append((f, small))
        if self.opts.crashes is None:
            return ""
        base = self.opts.crashes / f"{f.kind}-{f.digest}"
        if base.with_suffix(".case").exists():
            return str(base.with_suffix(".case"))
        small.origin = f"{case.origin}, minimized" if small is not case else case.origin
        stamp_machine(small, self.opts).save(base.with_suffix(".case"))
        base.with_suffix(".txt").write_text(
            f"{f.kind}: {f.message}\nseed {self.opts.seed} worker {self.index}\n"
            f"replay: sandbox run {base.with_suffix('.case')}"
            + (" --audit" if f.kind not in ("crash", "isolation", "uncounted", "history") else "")
            + (f" --hooks {self.opts.hooks}" if self.opts.hooks is not None else "") + "\n")
        return str(base.with_suffix(".case"))


def _done(opts: Options, t0: float, execs: int, quota: int | None) -> bool:
    if opts.seconds is not None and time.monotonic() - t0 >= opts.seconds:
        return True
    return quota is not None and execs >= quota


def _quota(opts: Options, index: int) -> int | None:
    if opts.cases is None:
        return None
    q, r = divmod(opts.cases, opts.jobs)
    return q + (1 if index < r else 0)


class SigintFlag:
    """SIGINT sets a flag the loop polls.  A KeyboardInterrupt raised inside a
    Unicorn hook would be caught by the processor model as an internal error of
    the case being run, so the campaign never lets one be raised."""

    def __init__(self) -> None:
        self.hit = False
        self._old = None

    def __enter__(self) -> "SigintFlag":
        try:
            self._old = signal.signal(signal.SIGINT, self._on)
        except ValueError:           # not the main thread: no handler, no Ctrl-C
            self._old = None
        return self

    def _on(self, signum, frame) -> None:
        self.hit = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def run_inline(opts: Options, on_status: Callable[[Stats, float], None] | None = None,
               patch: Callable[[], None] | None = None) -> tuple[Stats, float, bool]:
    """One worker in this process.  Returns (stats, seconds, interrupted).
    Ctrl-C is caught from the start, so one that lands while the worker is
    still being built (and writing its first corpus files) stops cleanly too."""
    with SigintFlag() as intr:
        w = Worker(opts, 0, patch)
        t0 = time.monotonic()
        last = t0
        quota = _quota(opts, 0)
        while not intr.hit and not _done(opts, t0, w.stats.execs, quota):
            fresh = w.step()
            if fresh and opts.stop_on_finding:
                break
            now = time.monotonic()
            if on_status is not None and now - last >= STATUS_EVERY_S:
                last = now
                on_status(w.stats, now - t0)
    return w.stats, time.monotonic() - t0, intr.hit


def _worker_main(opts: Options, index: int, q, stop, patch) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent stops us through ``stop``
    try:
        w = Worker(opts, index, patch)
        t0 = time.monotonic()
        last = t0
        quota = _quota(opts, index)
        while not stop.is_set() and not _done(opts, t0, w.stats.execs, quota):
            fresh = w.step()
            if fresh and opts.stop_on_finding:
                stop.set()
            now = time.monotonic()
            if now - last >= STATUS_EVERY_S:
                last = now
                q.put(("status", index, _portable(w.stats)))
        q.put(("done", index, _portable(w.stats)))
    except Exception as e:                           # report, never hang the parent
        q.put(("error", index, f"{type(e).__name__}: {e}"))


def _portable(s: Stats) -> Stats:
    return Stats(s.execs, s.audited, s.differential, collections.Counter(s.exits), collections.Counter(s.ends), set(s.coverage),
                 s.new_coverage, s.corpus, dict(s.findings), s.uncounted)


def run_parallel(opts: Options, on_status: Callable[[Stats, float], None] | None = None,
                 patch: Callable[[], None] | None = None) -> tuple[Stats, float, bool]:
    """N worker processes (fork: each builds its own Unicorn after the fork)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    stop = ctx.Event()
    procs = [ctx.Process(target=_worker_main, args=(opts, i, q, stop, patch), daemon=True) for i in range(opts.jobs)]
    latest: dict[int, Stats] = {}
    done: set[int] = set()
    errors: list[str] = []
    t0 = time.monotonic()
    last = t0
    with SigintFlag() as intr:           # before the workers start: no window for a stray KeyboardInterrupt
        for p in procs:
            p.start()
        while len(done) < len(procs):
            if intr.hit:
                stop.set()
            try:
                kind, i, payload = q.get(timeout=0.2)
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and q.empty():
                    break
                continue
            if kind == "error":
                errors.append(f"worker {i}: {payload}")
                done.add(i)
                continue
            latest[i] = payload
            if kind == "done":
                done.add(i)
            now = time.monotonic()
            if on_status is not None and now - last >= STATUS_EVERY_S:
                last = now
                on_status(_total(latest), now - t0)
    interrupted = intr.hit
    for p in procs:
        p.join(timeout=5)
    if errors:
        raise CampaignError("; ".join(errors))
    return _total(latest), time.monotonic() - t0, interrupted


def _total(latest: dict[int, Stats]) -> Stats:
    tot = Stats()
    for s in latest.values():
        tot.merge(s)
    tot.coverage = set().union(*(s.coverage for s in latest.values())) if latest else set()
    return tot


def run(opts: Options, on_status=None, patch=None) -> tuple[Stats, float, bool]:
    check_dirs(opts)
    if opts.seconds is None and opts.cases is None:
        raise CampaignError("give --seconds or --cases")
    if opts.jobs == 1:
        return run_inline(opts, on_status, patch)
    return run_parallel(opts, on_status, patch)
