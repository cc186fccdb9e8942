"""A timeline of a run in the Chrome trace-event format (Perfetto, chrome://tracing).

The format is Google's "Trace Event Format" document (Duncan, Nduati et al.,
https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU/),
which ``ui.perfetto.dev`` and ``chrome://tracing`` both open. This module
writes its **JSON Object Format**::

    {"displayTimeUnit": "ns", "otherData": {...}, "traceEvents": [ event, event, ... ]}

Every event has ``name``, ``ph`` (phase), ``ts`` (microseconds, may be
fractional), ``pid`` and ``tid``; ``cat`` and ``args`` are optional. The
phases used, with the document's sections:

* ``X`` -- "Complete Events": a span with a ``dur`` (microseconds). Each
  #VMEXIT is one on the **hypervisor** track, from the exit to the next VMRUN
  (the handler's time); each stretch of guest execution is one on the
  **guest** track, from VMRUN to the next exit.
* ``i`` -- "Instant Events", scope ``"s": "t"`` (the track): an interrupt
  or exception injected, a TLB flush. It goes on the track whose world was
  running when it happened.
* ``C`` -- "Counter Events": ``exits/s`` over fixed windows of the run.
* ``M`` -- "Metadata Events": ``process_name``, ``thread_name`` and
  ``thread_sort_index`` name the process and the tracks.

``displayTimeUnit`` ("ns") only sets how the viewer shows times; ``ts`` and
``dur`` are microseconds in any case. Timestamps come from one monotonic clock
(``time.perf_counter_ns``), relative to the writer's start.

**Streaming.** :class:`TimelineWriter` writes each event as it is complete and
keeps none of them, so a long run's timeline costs no memory; used as a
context manager (or with :meth:`TimelineWriter.close` in a ``finally``), it
closes the JSON properly also when the run ends with an exception or Ctrl-C
(``KeyboardInterrupt``). Spans are written when they end, so anything that
happened inside a span on the same track is held back until the span is
written, keeping every track's events in timestamp order in the file.

:func:`validate` checks a trace against the fields each phase requires and the
ordering rules above (per track, ``ts`` non-decreasing and ``X`` spans not
overlapping).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import IO, Any

from .exits import ExitLike, exit_label

#: the phases :func:`validate` knows (the document's "Event Descriptions")
PHASES = frozenset("BEXiICMbenstfPOND") | {"(", ")"}
_TIMED = frozenset("BEXiIC")
#: tolerance when comparing µs timestamps computed from integer nanoseconds
EPS_US = 1e-3

HYPERVISOR, GUEST = "hypervisor", "guest"


class TimelineError(ValueError):
    """A trace that breaks the format's rules, or events written out of order."""


class TimelineWriter:
    """Streams trace events into a JSON object-format file.

    ``track(name)`` returns the ``tid`` of a named track (creating it, with
    its metadata, on first use); :meth:`complete`, :meth:`instant` and
    :meth:`counter` write events. Per track, events must come in
    non-decreasing ``ts`` order and spans must not overlap; a violation is a
    :class:`TimelineError` (a bug in the caller), not a silently bad file.
    """

    def __init__(self, target: str | os.PathLike | IO[str], *, process_name: str = "amdv-sandbox",
                 pid: int = 1, other_data: dict[str, Any] | None = None, flush_every: int = 256,
                 clock_ns=time.perf_counter_ns) -> None:
        if isinstance(target, (str, os.PathLike)):
            self._f: IO[str] = open(target, "w", encoding="utf-8")
            self._owns = True
        else:
            self._f, self._owns = target, False
        self.pid = pid
        self._clock = clock_ns
        self._t0 = clock_ns()
        self._tracks: dict[str, int] = {}
        self._last_ts: dict[Any, float] = {}
        self._span_end: dict[int, float] = {}
        self._flush_every = flush_every
        self.closed = False
        #: the first failed write (a full disk): later events are dropped, and close() raises it
        self.error: OSError | None = None
        header = {"displayTimeUnit": "ns",
                  "otherData": {"producer": "amdv-sandbox", **(other_data or {})}}
        head = json.dumps(header, separators=(",", ":"))
        # the first event goes out with the header, so every later one is one write of
        # ",\n" + event: no state between the separator and the event that a Ctrl-C could split
        first = {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": process_name}}
        self._f.write(head[:-1] + ',"traceEvents":[\n' + json.dumps(first, separators=(",", ":")))
        self._count = 1

    # -- time ---------------------------------------------------------------------
    def now(self) -> float:
        """Microseconds since the writer started, from the monotonic clock."""
        return (self._clock() - self._t0) / 1000.0

    # -- tracks -------------------------------------------------------------------
    def track(self, name: str, sort_index: int | None = None) -> int:
        tid = self._tracks.get(name)
        if tid is None:
            tid = len(self._tracks) + 1
            self._tracks[name] = tid
            self._emit({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid, "args": {"name": name}})
            self._emit({"name": "thread_sort_index", "ph": "M", "pid": self.pid, "tid": tid,
                        "args": {"sort_index": tid if sort_index is None else sort_index}})
        return tid

    # -- events -------------------------------------------------------------------
    def complete(self, track: str, name: str, ts: float, dur: float, *, cat: str = "",
                 args: dict[str, Any] | None = None) -> None:
        """An ``X`` span on ``track`` from ``ts`` lasting ``dur`` µs."""
        tid = self.track(track)
        if dur < 0:
            raise TimelineError(f"span {name!r} on {track!r} has a negative duration {dur}")
        self._order((self.pid, tid), ts, track)
        if ts < self._span_end.get(tid, -math.inf) - EPS_US:
            raise TimelineError(f"span {name!r} at {ts} on {track!r} overlaps the previous span "
                                f"(ending at {self._span_end[tid]})")
        self._span_end[tid] = ts + dur
        ev = {"name": name, "ph": "X", "ts": _r(ts), "dur": _r(dur), "pid": self.pid, "tid": tid}
        self._emit(_opt(ev, cat, args))

    def instant(self, track: str, name: str, ts: float, *, cat: str = "",
                args: dict[str, Any] | None = None) -> None:
        """An ``i`` event (thread scope) on ``track``."""
        tid = self.track(track)
        self._order((self.pid, tid), ts, track)
        ev = {"name": name, "ph": "i", "s": "t", "ts": _r(ts), "pid": self.pid, "tid": tid}
        self._emit(_opt(ev, cat, args))

    def counter(self, name: str, ts: float, values: dict[str, float]) -> None:
        """A ``C`` event: the series of counter ``name`` take ``values`` from ``ts`` on."""
        self._order((self.pid, "C", name), ts, f"counter {name}")
        self._emit({"name": name, "ph": "C", "ts": _r(ts), "pid": self.pid, "tid": 0, "args": dict(values)})

    def _order(self, key, ts: float, what: str) -> None:
        if self.closed:
            raise TimelineError("the timeline is closed")
        if not math.isfinite(ts) or ts < 0:
            raise TimelineError(f"bad timestamp {ts!r} on {what}")
        last = self._last_ts.get(key, 0.0)
        if ts < last - EPS_US:
            raise TimelineError(f"event at {ts} µs on {what} is earlier than the previous one ({last} µs)")
        self._last_ts[key] = max(ts, last)

    def _emit(self, ev: dict) -> None:
        if self.error is not None:
            return
        try:
            self._f.write(",\n" + json.dumps(ev, separators=(",", ":")))
            self._count += 1
            if self._count % self._flush_every == 0:
                self._f.flush()
        except OSError as e:            # not the traced program's failure: reported at close()
            self.error = e

    @property
    def events_written(self) -> int:
        return self._count

    def close(self) -> None:
        """End the JSON document (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.error is None:
                self._f.write("\n]}\n")
                self._f.flush()
        except OSError as e:
            self.error = e
        finally:
            if self._owns:
                try:
                    self._f.close()
                except OSError as e:
                    self.error = self.error or e
        if self.error is not None:
            raise self.error

    def __enter__(self) -> "TimelineWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _r(x: float) -> float:
    return round(x, 3)                        # nanosecond resolution


def _opt(ev: dict, cat: str, args: dict | None) -> dict:
    if cat:
        ev["cat"] = cat
    if args:
        ev["args"] = args
    return ev


class VcpuTimeline:
    """The world switches of one vCPU, as spans on a guest and a hypervisor track.

    The Machine calls :meth:`vmrun` when the guest starts running (the VMRUN
    that follows a handler), :meth:`vmexit` at each #VMEXIT, :meth:`inject`
    when it injects an event, :meth:`tlb_flush` when a TLB flush happens, and
    :meth:`end` when the run is over. Each call takes the current time from
    the writer's clock unless given ``ts``. ``exits/s`` is written as a counter
    every ``rate_window_us`` of the run (0: no counter).
    """

    def __init__(self, writer: TimelineWriter, *, guest_track: str = GUEST,
                 hypervisor_track: str = HYPERVISOR, rate_window_us: float = 100_000.0) -> None:
        self.w = writer
        self.guest_track = guest_track
        self.hv_track = hypervisor_track
        writer.track(hypervisor_track)
        writer.track(guest_track)
        self._open: tuple[str, str, float, str, dict] | None = None   # track, name, start, cat, args
        self._held: list[tuple] = []
        self._window = rate_window_us
        self._window_start: float | None = None
        self._window_exits = 0
        self.exits = 0

    def _ts(self, ts: float | None) -> float:
        return self.w.now() if ts is None else ts

    def _close_span(self, ts: float) -> None:
        # state first, then the writes: a KeyboardInterrupt between them loses at most
        # this span instead of writing it twice (which end() would then refuse)
        span, self._open = self._open, None
        held, self._held = self._held, []
        if span is not None:
            track, name, start, cat, args = span
            self.w.complete(track, name, start, max(0.0, ts - start), cat=cat, args=args)
        for track, name, t, cat, args in held:
            self.w.instant(track, name, t, cat=cat, args=args)

    def _open_span(self, track: str, name: str, ts: float, cat: str, args: dict) -> None:
        self._close_span(ts)
        self._open = (track, name, ts, cat, args)

    def vmrun(self, ts: float | None = None, **args: Any) -> None:
        """The guest runs from now: the handler span (if any) ends."""
        ts = self._ts(ts)
        self._open_span(self.guest_track, "guest", ts, "guest", args)
        if self._window_start is None:
            self._window_start = ts

    def vmexit(self, exit: ExitLike, ts: float | None = None, **args: Any) -> None:
        """A #VMEXIT now: the guest span ends, the handler span starts."""
        ts = self._ts(ts)
        info = {"exitcode": f"{exit.exitcode:#x}", "rip": f"{exit.rip:#x}",
                "exitinfo1": f"{exit.exitinfo1:#x}", "exitinfo2": f"{exit.exitinfo2:#x}", **args}
        self._open_span(self.hv_track, exit_label(exit.exitcode), ts, "vmexit", info)
        self.exits += 1
        self._window_exits += 1
        self._rate(ts)

    def inject(self, vector: int, kind: str = "interrupt", ts: float | None = None, **args: Any) -> None:
        """An event injected into the guest (an instant on the running world's track)."""
        self._instant(f"inject {kind} {vector:#x}", ts, "inject", {"vector": vector, "type": kind, **args})

    def tlb_flush(self, scope: str, ts: float | None = None, **args: Any) -> None:
        """A TLB flush (``scope``: e.g. "asid 1", "all", "invlpg 0x1000")."""
        self._instant(f"TLB flush {scope}", ts, "tlb", {"scope": scope, **args})

    def _instant(self, name: str, ts: float | None, cat: str, args: dict) -> None:
        ts = self._ts(ts)
        track = self._open[0] if self._open is not None else self.hv_track
        if self._open is not None:
            self._held.append((track, name, max(ts, self._open[2]), cat, args))
        else:
            self.w.instant(track, name, ts, cat=cat, args=args)

    def _rate(self, ts: float) -> None:
        if not self._window or self._window_start is None:
            return
        while ts - self._window_start >= self._window:
            self.w.counter("exits/s", self._window_start,
                           {"exits": self._window_exits * 1e6 / self._window})
            self._window_start += self._window
            self._window_exits = 0

    def end(self, reason: str = "", ts: float | None = None) -> None:
        """The run is over: close the open span and write the last rate window."""
        ts = self._ts(ts)
        self._close_span(ts)
        if self._window and self._window_start is not None and ts > self._window_start:
            self.w.counter("exits/s", self._window_start,
                           {"exits": self._window_exits * 1e6 / max(ts - self._window_start, 1e-3)})
            self._window_start = None
        if reason:
            self.w.instant(self.hv_track, f"run ended: {reason}", ts, cat="run", args={"reason": reason})


# -- validation --------------------------------------------------------------------------------
def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(trace: dict | list | str | os.PathLike) -> list[str]:
    """The problems of a trace (empty: it is valid). Accepts the parsed JSON or a path.

    Checks: the object format's ``traceEvents`` list; per event, ``name``,
    ``ph``, ``pid``, ``tid`` and (timed phases) a finite ``ts`` >= 0; ``dur``
    >= 0 for ``X``; numeric ``args`` for ``C``; a scope for ``i``; ``args.name``
    for the naming metadata. Per track (pid, tid), ``ts`` non-decreasing in
    file order and ``X`` spans not overlapping; per counter, ``ts``
    non-decreasing.
    """
    if isinstance(trace, (str, os.PathLike)):
        try:
            with open(trace, encoding="utf-8") as f:
                trace = json.load(f)
        except (OSError, ValueError) as e:
            return [f"cannot read the trace: {e}"]
    problems: list[str] = []
    if isinstance(trace, dict):
        events = trace.get("traceEvents")
        if not isinstance(events, list):
            return ["the object has no 'traceEvents' list"]
        unit = trace.get("displayTimeUnit", "ms")
        if unit not in ("ms", "ns"):
            problems.append(f"displayTimeUnit is {unit!r}, not 'ms' or 'ns'")
    elif isinstance(trace, list):
        events = trace
    else:
        return ["a trace is a JSON object or array"]
    last: dict[Any, float] = {}
    span_end: dict[Any, tuple[float, int]] = {}
    for i, ev in enumerate(events):
        where = f"event {i}"
        if not isinstance(ev, dict):
            problems.append(f"{where}: not an object")
            continue
        ph = ev.get("ph")
        if not isinstance(ph, str) or ph not in PHASES:
            problems.append(f"{where}: unknown phase {ph!r}")
            continue
        where = f"event {i} ({ph} {ev.get('name')!r})"
        for key in ("name", "pid", "tid"):
            if key not in ev:
                problems.append(f"{where}: no '{key}'")
        if "name" in ev and not isinstance(ev["name"], str):
            problems.append(f"{where}: name is not a string")
        if ph == "M":
            if ev.get("name") in ("process_name", "thread_name") and not isinstance(
                    (ev.get("args") or {}).get("name"), str):
                problems.append(f"{where}: naming metadata without args.name")
            continue
        if ph not in _TIMED:
            continue
        ts = ev.get("ts")
        if not _num(ts) or ts < 0:
            problems.append(f"{where}: ts {ts!r} is not a finite number >= 0")
            continue
        if ph == "X":
            dur = ev.get("dur")
            if not _num(dur) or dur < 0:
                problems.append(f"{where}: dur {dur!r} is not a finite number >= 0")
                continue
        if ph == "i" and ev.get("s", "t") not in ("g", "p", "t"):
            problems.append(f"{where}: instant scope {ev.get('s')!r} is not g, p or t")
        if ph == "C":
            args = ev.get("args")
            if not isinstance(args, dict) or not args or not all(_num(v) for v in args.values()):
                problems.append(f"{where}: counter args must be numbers")
            key = (ev.get("pid"), "C", ev.get("name"), ev.get("id"))
        else:
            key = (ev.get("pid"), ev.get("tid"))
        if ts < last.get(key, -math.inf) - EPS_US:
            problems.append(f"{where}: ts {ts} is earlier than the previous event on its track ({last[key]})")
        last[key] = max(ts, last.get(key, -math.inf))
        if ph == "X":
            prev = span_end.get(key)
            if prev is not None and ts < prev[0] - EPS_US:
                problems.append(f"{where}: starts at {ts}, inside the span of event {prev[1]} "
                                f"(ends at {prev[0]})")
            span_end[key] = (ts + ev["dur"], i)
    return problems


def check(trace: dict | list | str | os.PathLike) -> None:
    """:func:`validate`, raising :class:`TimelineError` with every problem."""
    problems = validate(trace)
    if problems:
        raise TimelineError(f"{len(problems)} problem(s): " + "; ".join(problems[:10]))
