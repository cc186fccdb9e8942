"""What every experiment shares: guest images with a parameter block, runs
that keep a guest clock, and a clean stop on Ctrl-C.

**Parameter block.**  The experiment guests in ``guest_images/`` read their
parameters from guest-physical :data:`PARAMS` (one little-endian qword
each; a zero means "use the image's default", so every image also runs on
its own with ``sandbox run``) and leave their results at :data:`RESULTS`.
The hypervisor writes the block through the guest's RAM before the first
VMRUN and reads the results back after the run, both with
:meth:`~sandbox.hypervisor.guest.Guest.read_phys` / ``write_phys``.

**Guest time.**  The processor keeps a guest clock only while it counts
retired instructions (a timer is armed or an instruction budget is set;
one instruction is 10 ns at the nominal :data:`~sandbox.svm.cpu.GUEST_IPS`).
:func:`run` always sets a budget far above what the guests need, so every
run has a guest clock and rates are "per second of guest time", as the
seeds state them.  Time spent in the hypervisor is not guest time.
"""
from __future__ import annotations

import os
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..hypervisor.machine import Machine, RunResult
from ..svm.cpu import GUEST_IPS
from ..svm.exitcodes import ExitCode, exit_name
from ..svm.stop import StopReason

#: the bundled guest images
IMAGES = Path(__file__).resolve().parent.parent.parent / "guest_images"
#: guest-physical address of the experiment guests' parameter block
PARAMS = 0xF0000
#: guest-physical address of their results
RESULTS = 0xF0800
#: an instruction budget no experiment guest reaches: it only switches the guest clock on
CLOCK_BUDGET = 1 << 40

# exit codes grouped as the seeds' model groups them (lambda = lambda_cpu + lambda_io)
IO_EXITS = frozenset({ExitCode.IOIO, ExitCode.NPF})


class ExperimentError(Exception):
    """A guest run did not end the way the experiment needs (the message says how)."""


class Interrupted(Exception):
    """Ctrl-C arrived during an experiment; finished experiments keep their files."""


# ---------------------------------------------------------------- Ctrl-C
class _StopRequest:
    """SIGINT while experiments run.

    A KeyboardInterrupt raised inside a Unicorn hook would be swallowed by
    ctypes (or reported as a handler error), and a guest that runs a long
    slice without exits does not call Python at all.  So SIGINT only sets a
    flag; the signal's wakeup byte reaches a watcher thread at once, which
    stops the running guest the way the processor's own wall-clock watchdog
    does; :func:`run` then raises :class:`Interrupted` in ordinary Python.
    """

    def __init__(self) -> None:
        self.hit = False
        self.active: Machine | None = None
        self._depth = 0
        self._old_handler = None
        self._old_fd = -1
        self._r = self._w = -1

    def __enter__(self) -> "_StopRequest":
        self._depth += 1
        if self._depth > 1:
            return self
        self.hit = False
        try:
            self._old_handler = signal.signal(signal.SIGINT, self._on_signal)
        except ValueError:              # not the main thread: Ctrl-C is not ours to handle
            self._old_handler = None
            return self
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(self._r,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth or self._old_handler is None:
            return
        signal.set_wakeup_fd(self._old_fd)
        signal.signal(signal.SIGINT, self._old_handler)
        os.close(self._w)               # the watcher reads EOF and ends
        self._old_handler = None

    def _on_signal(self, signum, frame) -> None:
        self.hit = True

    def _watch(self, r: int) -> None:
        try:
            while True:
                b = os.read(r, 16)
                if not b:
                    return
                if signal.SIGINT in b:
                    self.hit = True
                    m = self.active
                    if m is not None:
                        # the processor's own timeout path: flag, then emu_stop (a
                        # bare emu_stop would be resumed by an instruction budget)
                        m.cpu.expire_timeout()
        finally:
            os.close(r)

    def check(self) -> None:
        if self.hit:
            raise Interrupted("interrupted")


#: the one stop request of this process (used by :func:`run` and the runner)
STOP = _StopRequest()


# ---------------------------------------------------------------- guests
def params_bytes(values: Iterable[int]) -> bytes:
    return b"".join(struct.pack("<Q", v & (1 << 64) - 1) for v in values)


def machine(image: str, params: Iterable[int] = (), *, ram: int = 4 << 20, dram: int | None = None,
            **kw) -> Machine:
    """A machine with ``guest_images/<image>`` loaded and its parameter block written."""
    m = Machine(dram=dram or max(16 << 20, 4 * ram), ram=ram, **kw)
    m.load(str(IMAGES / image))
    vals = list(params)
    if vals:
        m.guest.write_phys(PARAMS, params_bytes(vals))
    return m


def results(m: Machine, n: int) -> list[int]:
    """The first ``n`` result qwords the guest left at :data:`RESULTS`."""
    return list(struct.unpack(f"<{n}Q", m.guest.read_phys(RESULTS, 8 * n)))


@dataclass
class Run:
    """One guest run, as the experiments use it."""
    result: RunResult
    guest_ns: int                            # guest time of the run
    wall_s: float
    by_code: dict[str, int] = field(default_factory=dict)

    @property
    def exits(self) -> int:
        return self.result.exits

    @property
    def guest_s(self) -> float:
        return self.guest_ns / 1e9

    def rate(self, n: int | float) -> float:
        """``n`` events per second of guest time."""
        return n / self.guest_s if self.guest_ns else 0.0


def run(m: Machine, *, timeout: float = 600.0, ok: Callable[[RunResult], bool] | None = None) -> Run:
    """Run ``m``'s guest to its EXIT hypercall with the guest clock on.

    Raises :class:`ExperimentError` when the guest ends any other way (or
    with a non-zero code), :class:`Interrupted` after Ctrl-C."""
    STOP.check()
    STOP.active = m
    clock0 = m.cpu.guest_clock
    t0 = time.perf_counter()
    try:
        r = m.run(max_insns=CLOCK_BUDGET, timeout=timeout)
    finally:
        STOP.active = None
    wall = time.perf_counter() - t0
    STOP.check()
    good = ok(r) if ok is not None else (r.reason == StopReason.GUEST_EXIT and r.exit_code == 0)
    if not good:
        raise ExperimentError(f"guest run ended with {r.reason} ({r.detail}); exit code {r.exit_code}")
    guest_ns = (m.cpu.guest_clock - clock0) * 1_000_000_000 // GUEST_IPS
    return Run(r, guest_ns, wall, {exit_name(c): n for c, n in sorted(r.counts.items())})


def split_exits(counts: dict[int, int]) -> tuple[int, int]:
    """(CPU exits, I/O exits) of a run: port I/O and MMIO (NPF) are I/O."""
    io = sum(n for c, n in counts.items() if c in IO_EXITS)
    return sum(counts.values()) - io, io
