"""Campaigns across machines: ``sandbox fuzz --ray [ADDRESS]``.

The campaign's workers run as Ray actors (:class:`FuzzActor`, one
:class:`~sandbox.fuzz.campaign.Worker` each, seeded ``seed * 1_000_003 +
index`` as local workers are, so every worker's cases differ).  The driver is
the one place where the campaign's state meets:

* **corpus** -- each actor runs cases in chunks; a chunk returns the cases
  that reached new coverage on that actor, and the next chunk of every other
  actor starts by taking them in (AFL-style sharing, through the driver, so
  no shared filesystem is needed between machines);
* **findings** -- each actor returns its findings with their minimized cases;
  the driver keeps the first of each signature and writes it to ``--crashes``
  (on the driver's machine), so a bug two workers hit is reported once;
* **Ctrl-C** -- stops issuing chunks, collects the chunks in flight (each is
  short), keeps and saves everything found, and shuts the actors down.

Without ADDRESS a local Ray is started with ``--jobs`` CPUs; with one, the
driver joins that cluster (``ray start --head`` on one machine, ``ray start
--address=HEAD:6379`` on the others).  An unreachable address fails after a
bounded TCP probe.  Ray is an optional extra: ``pip install -e '.[cluster]'``.
"""
from __future__ import annotations

import collections
import socket
import time
from pathlib import Path
from typing import Callable

from .campaign import CampaignError, Options, SigintFlag, Stats, Worker, load_corpus, stamp_machine
from .case import Case
from .oracle import Finding
from .planted import plant

#: a chunk is at most this many cases and this many seconds: the grain of corpus sharing and of stopping
CHUNK = 256
CHUNK_S = 1.0
#: seconds the probe of a Ray address may take
CONNECT_TIMEOUT_S = 5.0


def ray_module():
    """Ray, or a CampaignError that says how to install it."""
    try:
        import ray                                   # optional: pip install -e '.[cluster]'
    except ImportError:
        raise CampaignError("--ray needs Ray: pip install -e '.[cluster]'") from None
    return ray


def probe(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in ``timeout`` seconds, with one line, if nothing listens at HOST:PORT."""
    a = address.removeprefix("ray://")
    host, _, port = a.rpartition(":")
    if not host or not port.isdigit():
        raise CampaignError(f"--ray {address}: give HOST:PORT of the cluster's head (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise CampaignError(f"--ray {address}: cannot reach a Ray head there within {timeout:g} s "
                            f"({e.strerror or e})") from None


class FuzzActor:
    """One campaign worker in a Ray actor (the class Ray wraps with ``ray.remote``)."""

    def __init__(self, opts: Options, index: int, bug: str | None = None) -> None:
        self.w = Worker(opts, index, plant(bug) if bug else None)
        self.w.keep_cases = []
        self.received = 0

    def chunk(self, incoming: list[dict], n: int, max_s: float = CHUNK_S
              ) -> tuple[Stats, list[dict], list[tuple[Finding, dict]]]:
        """Take in other workers' corpus cases, run up to ``n`` cases for up to ``max_s``
        seconds; return (stats, new corpus cases, new findings with their minimized
        cases), cases as JSON objects."""
        w = self.w
        w.corpus += [Case.from_json(d) for d in incoming]
        self.received += len(incoming)
        before = len(w.corpus)
        end = time.monotonic() + max_s
        for _ in range(n):
            w.step()
            if time.monotonic() >= end:
                break
        new = [c.to_json() for c in w.corpus[before:]]
        found = [(f, c.to_json()) for f, c in w.keep_cases]
        w.keep_cases = []
        s = w.stats
        stats = Stats(s.execs, s.audited, s.differential, collections.Counter(s.exits), collections.Counter(s.ends),
                      set(s.coverage), s.new_coverage, s.corpus, {}, s.uncounted)
        return stats, new, found

    def received_cases(self) -> int:
        return self.received


def save_finding(d: Path, f: Finding, case: dict, opts: Options, index: int) -> str:
    """The driver's copy of a worker's finding, as a local campaign would save it."""
    base = d / f"{f.kind}-{f.digest}"
    if not base.with_suffix(".case").exists():
        stamp_machine(Case.from_json(case), opts).save(base.with_suffix(".case"))
        base.with_suffix(".txt").write_text(
            f"{f.kind}: {f.message}\nseed {opts.seed} worker {index} (Ray)\n"
            f"replay: sandbox run {base.with_suffix('.case')}"
            + (" --audit" if f.kind not in ("crash", "isolation") else "")
            + (f" --hooks {opts.hooks}" if opts.hooks is not None else "") + "\n")
    return str(base.with_suffix(".case"))


def run_ray(opts: Options, address: str | None, on_status: Callable[[Stats, float], None] | None = None,
            bug: str | None = None) -> tuple[Stats, float, bool, dict]:
    """The campaign on Ray.  Returns (stats, seconds, interrupted, info) where info has
    ``received`` (corpus cases each worker took from the others) and ``workers``."""
    ray = ray_module()
    if address:
        probe(address)
    if opts.crashes is not None:
        opts.crashes.mkdir(parents=True, exist_ok=True)
    wopts = Options(**{**opts.__dict__, "crashes": None, "corpus": None, "jobs": 1})
    with SigintFlag() as intr:
        if address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:
            ray.init(num_cpus=opts.jobs, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            return _drive(ray, opts, wopts, on_status, bug, intr)
        finally:
            ray.shutdown()


def _drive(ray, opts: Options, wopts: Options, on_status, bug, intr) -> tuple[Stats, float, bool, dict]:
    Actor = ray.remote(num_cpus=1)(FuzzActor)
    actors = [Actor.remote(wopts, i, bug) for i in range(opts.jobs)]
    #: every worker's new-coverage cases, in arrival order (seeded from --corpus, written back to it)
    corpus: list[dict] = [c.to_json() for c in load_corpus(opts.corpus)] if opts.corpus is not None else []
    written = 0
    seen = [0] * len(actors)                       # how much of ``corpus`` each worker has taken in
    mine: list[set[int]] = [set() for _ in actors]
    latest: dict[int, Stats] = {}
    findings: dict[str, tuple[Finding, str]] = {}
    reported = 0                                   # findings the workers reported, before de-duplication
    quota = opts.cases
    t0 = time.monotonic()
    last = t0

    asked: dict[int, int] = {}                     # cases asked of each worker's chunk in flight

    def submit(i: int):
        """Worker ``i``'s next chunk (None: --cases is used up, counting the chunks in flight)."""
        n = CHUNK
        if quota is not None:
            n = min(n, quota - sum(s.execs for s in latest.values()) - sum(asked.values()))
            if n <= 0:
                return None
        asked[i] = n
        incoming = [c for k, c in enumerate(corpus[seen[i]:], seen[i]) if k not in mine[i]]
        seen[i] = len(corpus)
        return actors[i].chunk.remote(incoming, n)

    def done() -> bool:
        if intr.hit:
            return True
        if opts.seconds is not None and time.monotonic() - t0 >= opts.seconds:
            return True
        total = sum(s.execs for s in latest.values())
        return quota is not None and total >= quota

    pending = {}
    for i in range(len(actors)):
        ref = submit(i)
        if ref is not None:
            pending[ref] = i
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
        for ref in ready:
            i = pending.pop(ref)
            stats, new, found = ray.get(ref)
            latest[i] = stats
            asked.pop(i, None)
            for c in new:
                mine[i].add(len(corpus))
                corpus.append(c)
                if opts.corpus is not None:
                    Case.from_json(c).save(opts.corpus / f"ray-w{i}-{written:06d}.case")
                    written += 1
            reported += len(found)
            for f, case in found:
                if f.signature not in findings:                      # de-duplicated here, once
                    path = save_finding(opts.crashes, f, case, opts, i) if opts.crashes is not None else ""
                    findings[f.signature] = (f, path)
            stop_on = opts.stop_on_finding and findings
            if not done() and not stop_on:
                ref = submit(i)
                if ref is not None:
                    pending[ref] = i
        now = time.monotonic()
        if on_status is not None and now - last >= 0.5:
            last = now
            on_status(_total(latest, findings), now - t0)
    received = ray.get([a.received_cases.remote() for a in actors])
    total = _total(latest, findings)
    return total, time.monotonic() - t0, intr.hit, {"received": received, "workers": len(actors),
                                                    "corpus": len(corpus), "reported": reported}


def _total(latest: dict[int, Stats], findings: dict) -> Stats:
    tot = Stats()
    for s in latest.values():
        tot.merge(s)
    tot.findings = dict(findings)
    return tot
