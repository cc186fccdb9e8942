"""The trace-event timeline: fields and ordering per the Chrome "Trace Event
Format" document (Complete "X", Instant "i", Counter "C", Metadata "M"
events; JSON Object Format with displayTimeUnit), streaming, and closing the
JSON on Ctrl-C."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from sandbox.debug.timeline import TimelineError, TimelineWriter, VcpuTimeline, check, validate


@dataclass
class Exit:
    exitcode: int
    exitinfo1: int = 0
    exitinfo2: int = 0
    rip: int = 0x100000


class FakeClock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns

    def tick(self, ns: int) -> None:
        self.ns += ns


def synthetic_run(writer: TimelineWriter, clock: FakeClock, exits: int = 50) -> VcpuTimeline:
    """A run: guest 3 µs, #VMEXIT (CPUID; every 10th an INTR with an injection and a flush), handler 1.5 µs."""
    tl = VcpuTimeline(writer, rate_window_us=20.0)
    for i in range(exits):
        tl.vmrun()
        clock.tick(3000)
        if i % 10 == 9:
            tl.tlb_flush("invlpg 0x1000")           # inside the guest span
            clock.tick(200)
            tl.vmexit(Exit(0x60))                   # INTR
            clock.tick(500)
            tl.inject(0x20)
            tl.tlb_flush("asid 1")
        else:
            tl.vmexit(Exit(0x72, rip=0x100000 + i))  # CPUID
        clock.tick(1500)
    tl.end("guest-exit")
    return tl


def test_synthetic_run_is_valid_and_loads(tmp_path):
    clock = FakeClock()
    path = tmp_path / "t.json"
    with TimelineWriter(path, clock_ns=clock, other_data={"image": "hello.S"}) as w:
        tl = synthetic_run(w, clock)
    assert tl.exits == 50
    doc = json.loads(path.read_text())
    assert doc["displayTimeUnit"] == "ns"
    assert doc["otherData"]["image"] == "hello.S"
    assert validate(doc) == [] and validate(path) == []
    check(doc)
    ev = doc["traceEvents"]
    meta = {(e["name"], e["tid"]): e["args"] for e in ev if e["ph"] == "M"}
    assert meta[("process_name", 0)] == {"name": "amdv-sandbox"}
    tracks = {a["name"]: tid for (n, tid), a in meta.items() if n == "thread_name"}
    assert set(tracks) == {"hypervisor", "guest"}
    hv = [e for e in ev if e["ph"] == "X" and e["tid"] == tracks["hypervisor"]]
    guest = [e for e in ev if e["ph"] == "X" and e["tid"] == tracks["guest"]]
    assert len(hv) == 50 and len(guest) == 50
    assert hv[0] == {"name": "CPUID", "ph": "X", "ts": 3.0, "dur": 1.5, "pid": 1, "tid": tracks["hypervisor"],
                     "cat": "vmexit", "args": {"exitcode": "0x72", "rip": "0x100000", "exitinfo1": "0x0",
                                               "exitinfo2": "0x0"}}
    assert guest[0]["ts"] == 0.0 and guest[0]["dur"] == 3.0 and guest[1]["ts"] == 4.5
    intr = hv[9]
    assert intr["name"] == "INTR" and intr["dur"] == 2.0
    inst = [e for e in ev if e["ph"] == "i"]
    names = [(e["name"], e["tid"]) for e in inst]
    assert ("TLB flush invlpg 0x1000", tracks["guest"]) in names           # during the guest span
    assert ("inject interrupt 0x20", tracks["hypervisor"]) in names        # during the handler
    assert ("TLB flush asid 1", tracks["hypervisor"]) in names
    assert all(e["s"] == "t" for e in inst)
    # an instant held during a span is written after it, inside its time
    first_inject = next(e for e in inst if e["name"].startswith("inject"))
    assert intr["ts"] <= first_inject["ts"] <= intr["ts"] + intr["dur"]
    counters = [e for e in ev if e["ph"] == "C"]
    assert counters and all(e["name"] == "exits/s" for e in counters)
    # windows of 20 µs hold 4 or 5 exits of 4.5-4.7 µs: 200,000-250,000 exits/s
    assert all(150_000 <= e["args"]["exits"] <= 260_000 for e in counters[:-1])
    assert ev[-1]["name"] == "run ended: guest-exit"


def test_streaming_writes_as_it_goes(tmp_path):
    clock = FakeClock()
    path = tmp_path / "t.json"
    w = TimelineWriter(path, clock_ns=clock, flush_every=16)
    synthetic_run(w, clock, exits=200)
    size = path.stat().st_size
    assert size > 20_000                          # on disk before close
    assert not hasattr(w, "events") and w.events_written > 400
    w.close()
    w.close()                                     # idempotent
    check(path)


def test_closed_properly_on_an_exception(tmp_path):
    clock = FakeClock()
    path = tmp_path / "t.json"
    with pytest.raises(KeyboardInterrupt):
        with TimelineWriter(path, clock_ns=clock) as w:
            tl = VcpuTimeline(w)
            tl.vmrun()
            clock.tick(100)
            tl.vmexit(Exit(0x72))
            raise KeyboardInterrupt
    check(path)


CTRL_C_CHILD = r"""
import sys, time
from sandbox.debug.timeline import TimelineWriter, VcpuTimeline
class E: exitcode, exitinfo1, exitinfo2, rip = 0x72, 0, 0, 0x100000
with TimelineWriter(sys.argv[1]) as w:
    tl = VcpuTimeline(w, rate_window_us=1000)
    try:
        n = 0
        while True:
            tl.vmrun(); time.sleep(0.0002); tl.vmexit(E()); n += 1
            if n == 20:
                print("ready", flush=True)      # enough spans written: the parent may interrupt now
    finally:
        tl.end("interrupted")
"""


def test_ctrl_c_in_a_real_process_leaves_valid_json(tmp_path):
    path = tmp_path / "t.json"
    p = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD, str(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"       # a readiness signal, not a guess at timing
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert "KeyboardInterrupt" in err
    doc = json.loads(path.read_text())
    check(doc)
    assert doc["traceEvents"][-1]["name"] == "run ended: interrupted"
    assert sum(e["ph"] == "X" for e in doc["traceEvents"]) > 10


def test_wall_clock_timestamps_are_monotonic(tmp_path):
    buf = io.StringIO()
    with TimelineWriter(buf) as w:
        tl = VcpuTimeline(w)
        for _ in range(200):
            tl.vmrun()
            tl.vmexit(Exit(0x7B))
        tl.end()
    check(json.loads(buf.getvalue()))


def test_writer_refuses_out_of_order_and_overlap():
    w = TimelineWriter(io.StringIO())
    w.complete("hypervisor", "A", 10.0, 5.0)
    with pytest.raises(TimelineError, match="overlaps"):
        w.complete("hypervisor", "B", 12.0, 1.0)
    with pytest.raises(TimelineError, match="earlier"):
        w.instant("hypervisor", "x", 9.0)
    with pytest.raises(TimelineError, match="negative"):
        w.complete("guest", "g", 1.0, -1.0)
    with pytest.raises(TimelineError, match="bad timestamp"):
        w.instant("guest", "x", float("nan"))
    w.complete("guest", "g", 1.0, 2.0)                  # another track has its own order
    w.counter("exits/s", 0.0, {"exits": 1})
    w.close()
    with pytest.raises(TimelineError, match="closed"):
        w.instant("guest", "late", 100.0)


def ev(**kw):
    base = {"name": "n", "ph": "X", "ts": 0.0, "dur": 1.0, "pid": 1, "tid": 1}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("events, message", [
    ([ev(dur=None)], "dur None"),
    ([ev(dur=-1)], "dur -1"),
    ([ev(ts=None)], "ts None"),
    ([ev(ts="1")], "ts '1'"),
    ([ev(pid=None)], "no 'pid'"),
    ([ev(tid=None)], "no 'tid'"),
    ([ev(name=None)], "no 'name'"),
    ([ev(ph="Q")], "unknown phase 'Q'"),
    ([ev(ts=0, dur=5), ev(ts=3, dur=1)], "inside the span of event 0"),
    ([ev(ts=5, dur=1), ev(ts=3, dur=1)], "earlier than the previous event"),
    ([ev(ph="i", dur=None, s="x")], "instant scope 'x'"),
    ([ev(ph="C", dur=None, args={"v": "high"})], "counter args must be numbers"),
    ([ev(ph="C", dur=None, ts=5, args={"v": 1}), ev(ph="C", dur=None, ts=4, args={"v": 2})], "earlier"),
    ([ev(ph="M", name="thread_name", args={})], "naming metadata without args.name"),
    (["x"], "not an object"),
])
def test_validator_finds_each_problem(events, message):
    problems = validate({"traceEvents": events, "displayTimeUnit": "ns"})
    assert any(message in p for p in problems), problems
    with pytest.raises(TimelineError):
        check({"traceEvents": events})


def test_validator_accepts_separate_tracks_and_touching_spans():
    events = [ev(ts=0, dur=2), ev(ts=2, dur=1), ev(ts=1, dur=5, tid=2), ev(ph="i", dur=None, ts=3, s="t")]
    assert validate({"traceEvents": events}) == []
    assert validate(events) == []                          # the array format too


def test_validator_on_broken_documents(tmp_path):
    assert validate({"events": []}) == ["the object has no 'traceEvents' list"]
    assert "displayTimeUnit" in validate({"traceEvents": [], "displayTimeUnit": "s"})[0]
    bad = tmp_path / "bad.json"
    bad.write_text('{"traceEvents": [')
    assert validate(bad)[0].startswith("cannot read the trace")
