"""How the debug tools plug into a :class:`~sandbox.Machine` from above.

The machine offers two hooks and nothing more is needed: ``on_exit_record``
(called at every #VMEXIT, before its handler) and ``resume_hooks`` (called
after a handler resumed the guest, just before the next VMRUN; STOP ends the
run). :func:`add_exit_observer` chains observers on the first, so the exit
trace, a recording and a timeline can watch the same run.

:class:`MachineTimeline` writes a run's world switches to a
:class:`~.timeline.TimelineWriter`: a guest span from each VMRUN to the next
#VMEXIT, a hypervisor span per exit (its handler's time), the events the
hypervisor injects (EVENTINJ at VMRUN), and TLB flushes -- those the hypervisor
asks for with TLB_CONTROL, and those the guest's INVLPG / MOV CR3 made while
it ran (counted by the TLB, shown at the exit that ended the guest span).
"""
from __future__ import annotations

import os
from typing import Callable

from ..hypervisor.machine import Machine, RunResult
from ..svm.cpu import ExitRecord
from ..svm.vmcb import Event, EventType
from .timeline import TimelineWriter, VcpuTimeline

ExitObserver = Callable[[ExitRecord], None]


def add_exit_observer(m: Machine, fn: ExitObserver) -> None:
    """Call ``fn(exit)`` at every #VMEXIT, after the observers already there."""
    prev = m.on_exit_record
    if prev is None:
        m.on_exit_record = fn
        return

    def both(rec: ExitRecord) -> None:
        prev(rec)
        fn(rec)
    m.on_exit_record = both


_EVENT_KIND = {EventType.INTR: "interrupt", EventType.NMI: "nmi", EventType.EXCEPTION: "exception",
               EventType.SOFT_INT: "software-interrupt"}


class MachineTimeline:
    """A Chrome trace-event timeline of ``m``'s runs, written to ``path``."""

    def __init__(self, m: Machine, path: str | os.PathLike, *, other_data: dict | None = None) -> None:
        self.m = m
        self.writer = TimelineWriter(path, other_data=other_data)
        self.tl = VcpuTimeline(self.writer)
        self._flushes = m.cpu.tlb.stats.flushes
        self._running = False
        add_exit_observer(m, self._exit)
        m.resume_hooks.append(self._resume)

    def start(self) -> None:
        """The first VMRUN of a run."""
        self._flushes = self.m.cpu.tlb.stats.flushes
        self.tl.vmrun()
        self._running = True

    def _exit(self, rec: ExitRecord) -> None:
        flushes = self.m.cpu.tlb.stats.flushes
        if flushes != self._flushes:          # INVLPG / MOV CR3 / INVLPGA while the guest ran
            self.tl.tlb_flush(f"by the guest x{flushes - self._flushes}")
            self._flushes = flushes
        self.tl.vmexit(rec, index=rec.index, nrip=f"{rec.nrip:#x}", level=rec.level)
        self._running = False

    def _resume(self, m: Machine, rec: ExitRecord) -> None:
        v = m.guest.vmcb
        inj = v.EVENTINJ
        if inj & Event.VALID:
            vector, kind = inj & 0xFF, (inj >> 8) & 7
            self.tl.inject(vector, _EVENT_KIND.get(kind, f"type {kind}"))
        if v.TLB_CONTROL:
            self.tl.tlb_flush(f"TLB_CONTROL {v.TLB_CONTROL}")
        self._flushes = m.cpu.tlb.stats.flushes
        self.tl.vmrun()
        self._running = True
        return None

    def end(self, r: RunResult | None) -> None:
        """The run is over: close the spans and the file (idempotent)."""
        if self.writer.closed:
            return
        try:
            self.tl.end(str(r.reason) if r is not None else "interrupted")
        finally:
            self.writer.close()
