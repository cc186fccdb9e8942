"""Record and replay a :class:`~sandbox.Machine` run (the file format is :mod:`.recording`).

What makes a sandbox run differ from one run to the next, and how each is kept:

* **The time-stamp counter.** RDTSC/RDTSCP are intercepted while recording or
  replaying (so none runs natively), and every host TSC value the hypervisor
  reads -- for those exits, RDMSR of IA32_TSC, the PC platform's clocks -- goes
  through ``cpu.host_tsc``, which the recorder wraps (``tsc`` records, placed by
  exit index) and the replayer feeds back.
* **Timer interrupts** are in guest time (retired instructions), so a replay
  takes them at the same points; each #VMEXIT(INTR) is recorded with the guest
  clock (``timer`` records) and checked on replay.
* **User handlers** (``--hooks``) may do anything: the registers they changed
  and whether they resumed are recorded (``hv`` records); a replay does not
  call them, it applies what they did. (Their writes to guest memory are not
  recorded: the final DRAM hash shows such a difference.)
* **Random numbers**: the SEV firmware's memory-encryption keys come from a
  generator seeded with the recording's ``rng_seed``, so the guest's ciphertext
  -- and the DRAM hash -- is the same in the replay.

The devices (COM1, the PC platform) answer the guest from guest state and
guest time only, so their input needs no record. A replay checks every exit
(code, RIP, EXITINFO1/2) as it happens and, at the end, the console, the final
registers and the DRAM hash; the first difference is a
:class:`~.recording.ReplayDivergence` naming the exit.
"""
from __future__ import annotations

import random
from typing import Any, Callable

from ..hypervisor.handlers import RESUME, STOP, Action
from ..hypervisor.machine import Machine, RunResult
from ..svm.cpu import ExitRecord
from ..svm.exitcodes import ExitCode
from ..svm.stop import StopReason
from .observe import add_exit_observer
from .recording import Recording, RecordingWriter, Replayer, ReplayDivergence

#: how a run ended when it was cut short from outside: the recording is incomplete
INCOMPLETE = frozenset({StopReason.STOPPED, StopReason.TIMEOUT})


def seeded_bytes(seed: int) -> Callable[[int], bytes]:
    """``n -> n bytes`` from a generator seeded with ``seed`` (keys for a replayable run)."""
    rng = random.Random(seed)
    return rng.randbytes


def final_regs(m: Machine, r: RunResult) -> dict[str, int]:
    """The registers a recording keeps: the GPRs, RIP and RFLAGS (none for SEV-ES)."""
    if not r.regs:
        return {}
    return {**r.regs, "rip": r.rip, "rflags": r.rflags}


class _Base:
    def __init__(self, m: Machine, user_exits: set[int]) -> None:
        self.m = m
        self.index = -1                 # index of the exit being handled
        self.tsc_reads = 0
        m.intercept("rdtsc,rdtscp")
        self._host_tsc = m.cpu.host_tsc
        m.cpu.host_tsc = self._tsc      # every TSC value the hypervisor hands the guest
        sealed = m.sev is not None and m.sev.es is not None
        for code in sorted(user_exits):
            if not sealed and code in m.handlers:
                m.handlers[code] = self._wrap(m.handlers[code])
        add_exit_observer(m, self._exit)

    def _tsc(self) -> int:
        raise NotImplementedError

    def _exit(self, rec: ExitRecord) -> None:
        raise NotImplementedError

    def _wrap(self, h: Callable) -> Callable:
        raise NotImplementedError

    def _regs(self) -> dict[str, int]:
        d = self.m.regs.as_dict()
        d["rip"], d["rflags"] = self.m.regs.rip, self.m.regs.rflags
        return d


class MachineRecorder(_Base):
    """Records ``m``'s runs into ``writer`` (attach before the first run)."""

    def __init__(self, m: Machine, writer: RecordingWriter, user_exits: set[int] = frozenset()) -> None:
        self.w = writer
        super().__init__(m, user_exits)

    def _tsc(self) -> int:
        v = self._host_tsc()
        self.w.tsc(v, exit=max(self.index, 0))
        return v

    def _exit(self, rec: ExitRecord) -> None:
        self.index = self.w.exit(rec)
        if rec.exitcode == ExitCode.INTR:
            self.w.timer(self.m.cpu.guest_clock)

    def _wrap(self, h: Callable) -> Callable:
        def recorded(m: Machine, e: ExitRecord) -> Action | None:
            before = self._regs()
            act = h(m, e)
            after = self._regs()
            changed = {n: v for n, v in after.items() if before.get(n) != v}
            self.w.handler("stop" if act == STOP else "resume" if act is None or act == RESUME else repr(act),
                           exit=self.index, regs=changed)
            return act
        return recorded

    def finish(self, r: RunResult) -> None:
        self.w.console(r.console)
        self.w.finish(r.reason, exit_code=r.exit_code, regs=final_regs(self.m, r), dram=self.m.mem.dump(),
                      complete=r.reason not in INCOMPLETE)


class MachineReplayer(_Base):
    """Feeds ``m`` the inputs of ``recording`` and checks each exit against it.

    A divergence stops the run; :attr:`divergence` keeps it and :meth:`finish`
    raises it (or the first difference in how the run ended).
    """

    def __init__(self, m: Machine, recording: Recording, user_exits: set[int] = frozenset()) -> None:
        self.rp = Replayer(recording)
        self.divergence: ReplayDivergence | None = None
        super().__init__(m, user_exits)
        m.resume_hooks.append(self._stop_if_diverged)

    def _diverged(self, e: ReplayDivergence) -> None:
        if self.divergence is None:
            self.divergence = e
            self.m.request_stop()

    def _stop_if_diverged(self, m: Machine, rec: ExitRecord) -> Action | None:
        return STOP if self.divergence is not None else None

    def _tsc(self) -> int:
        try:
            return self.rp.next_tsc(exit=max(self.index, 0))
        except ReplayDivergence as e:
            self._diverged(e)
            return 0

    def _exit(self, rec: ExitRecord) -> None:
        if self.divergence is not None:
            return
        try:
            self.index = self.rp.check_exit(rec)
            if rec.exitcode == ExitCode.INTR:
                want = self.rp.next_timer_point()
                if want != self.m.cpu.guest_clock:
                    raise ReplayDivergence(
                        f"replay of {self.rp.recording.path} diverged at exit #{self.index}: the timer "
                        f"interrupt came at guest instruction {self.m.cpu.guest_clock}, recorded at {want}")
        except ReplayDivergence as e:
            self._diverged(e)

    def _wrap(self, h: Callable) -> Callable:
        def replayed(m: Machine, e: ExitRecord) -> Action | None:
            eff = self.rp.next_handler_effect()
            if eff is None or eff.exit != self.index:
                self._diverged(ReplayDivergence(
                    f"replay of {self.rp.recording.path} diverged at exit #{self.index}: a user handler ran "
                    f"here, the recording has {'none' if eff is None else f'one at exit #{eff.exit}'}"))
                return STOP
            for name, value in eff.regs.items():
                setattr(m.regs, name, value)
            return STOP if eff.action == "stop" else RESUME
        return replayed

    def finish(self, r: RunResult, *, check_end: bool = True) -> None:
        """Raise the divergence, if any; with ``check_end``, compare how the run ended."""
        if self.divergence is not None:
            raise self.divergence
        if check_end:
            self.rp.check_console(r.console)
            self.rp.finish(r.reason, exit_code=r.exit_code, regs=final_regs(self.m, r), dram=self.m.mem.dump())


def run_config(a: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """The run configuration a recording keeps: the named fields of the CLI's arguments."""
    return {f: getattr(a, f) for f in fields}
