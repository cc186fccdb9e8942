"""Oracles for users' exit handlers (``sandbox fuzz --hooks FILE``).

:class:`HookGuard` loads a hooks file into a harness's machine and wraps each
handler it installs.  Per call it enforces and observes:

* ``hook-raised``  -- the handler raised (the exception is kept from the
  machine, which would otherwise end the run with a generic handler error);
* ``hook-hung``    -- the handler ran past its per-exit time budget (an
  interval timer interrupts it; main thread only);
* ``hook-livelock`` -- it returned RESUME :data:`LIVELOCK_N` times in a row
  leaving RIP at the exiting instruction and RAX-RBX unchanged;
* ``hook-invalid-state`` -- the VMRUN after it resumed failed with
  VMEXIT_INVALID: the handler left the guest state architecturally invalid
  (APM §15.5.1), attributed to the last handler that resumed;
* ``hook-host-access`` -- it read or wrote host memory outside the current
  guest's RAM, VMCB, nested tables, IOPM and MSRPM, seen through the checked
  mode of the hypervisor API (:class:`~sandbox.hypervisor.checked.CheckedMemory`),
  even when the handler swallowed the violation.

Every finding names the handler (its function name) and the exit.
"""
from __future__ import annotations

import signal
from typing import Callable

from ..hypervisor.checked import CheckedMemory, HostAccessViolation
from ..hypervisor.handlers import RESUME, STOP
from ..hypervisor.hooks_loader import load_hooks
from ..hypervisor.machine import Machine
from ..svm.exitcodes import ExitCode, exit_name
from .oracle import Finding

#: wall-clock budget of one handler call: a handler emulating a 1024-element REP INS/OUTS
#: takes a few tenths of a second on a loaded machine; a hung one never returns
HOOK_BUDGET_S = 2.0
#: RESUMEs in a row without progress that make a livelock
LIVELOCK_N = 8


class HookTimeout(BaseException):
    """Raised into a handler that ran past its budget (a BaseException, so a
    handler's own ``except Exception`` does not swallow it)."""


def _alarm(signum, frame) -> None:
    raise HookTimeout()


class HookGuard:
    """A hooks file installed on ``m`` with every oracle around its handlers."""

    def __init__(self, m: Machine, path: str, budget_s: float = HOOK_BUDGET_S, livelock_n: int = LIVELOCK_N) -> None:
        self.m, self.path, self.budget_s, self.livelock_n = m, path, budget_s, livelock_n
        before = dict(m.handlers)
        load_hooks(m, path)                              # HooksError: the caller's one-line error
        self.user = {c: fn for c, fn in m.handlers.items() if before.get(c) is not fn}
        self.found: list[Finding] = []
        self.calls = 0
        self.checked = CheckedMemory(m)
        self._last: tuple[str, str] | None = None        # the last user handler that resumed
        self._fp: tuple | None = None
        self._same = 0
        for code, fn in list(m.handlers.items()):
            if code == ExitCode.INVALID:
                continue
            m.handlers[code] = self._wrap(code, fn) if code in self.user else self._plain(fn)
        m.handlers[ExitCode.INVALID] = self._invalid(m.handlers.get(ExitCode.INVALID))

    def take(self) -> list[Finding]:
        """The findings of the case just run; resets the per-case state."""
        out, self.found = self.found, []
        self._last, self._fp, self._same = None, None, 0
        self.checked.violations.clear()
        return out

    def _record(self, kind: str, msg: str) -> None:
        if not any(f.kind == kind and f.message == msg for f in self.found):
            self.found.append(Finding(kind, msg))

    def _plain(self, fn: Callable) -> Callable:
        def handler(m, e):
            self._last = None                            # a default handler ran since
            return fn(m, e)
        handler.__name__ = getattr(fn, "__name__", "handler")
        return handler

    def _call(self, fn: Callable, m, e):
        try:
            old = signal.signal(signal.SIGALRM, _alarm)
        except ValueError:                               # not the main thread: no budget
            old = None
        if old is not None:
            signal.setitimer(signal.ITIMER_REAL, self.budget_s)
        try:
            with self.checked:
                return fn(m, e)
        finally:
            if old is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)

    def _wrap(self, code: int, fn: Callable) -> Callable:
        name = getattr(fn, "__name__", repr(fn))

        def handler(m, e):
            self.calls += 1
            where = f"{name} (the {exit_name(e.exitcode)} handler of {self.path})"
            n_viol = len(self.checked.violations)
            try:
                act = self._call(fn, m, e)
            except HookTimeout:
                self._record("hook-hung", f"{where} ran past its {self.budget_s:g} s budget at {e.rip:#x}")
                return STOP
            except HostAccessViolation as v:
                self._record("hook-host-access", f"{where}: {v}")
                return STOP
            except Exception as x:
                self._record("hook-raised", f"{where} raised {type(x).__name__}: {x}")
                return STOP
            if len(self.checked.violations) > n_viol:   # caught and swallowed by the handler
                self._record("hook-host-access", f"{where}: {self.checked.violations[n_viol]}")
                return STOP
            if act is None or act == RESUME:
                v = m.guest.vmcb
                cpu = m.cpu
                fp = (e.exitcode, e.rip, e.exitinfo1, v.RIP, v.RAX, cpu.guest_gpr(1), cpu.guest_gpr(2),
                      cpu.guest_gpr(3))
                if v.RIP == e.rip and fp == self._fp:
                    self._same += 1
                else:
                    self._fp, self._same = fp, 1
                if self._same >= self.livelock_n:
                    self._record("hook-livelock", f"{where} resumed the guest at {e.rip:#x} {self._same} times "
                                                  "with RIP and registers unchanged")
                    return STOP
                self._last = (name, where)
            else:
                self._last = None
            return act
        handler.__name__ = name
        return handler

    def _invalid(self, fn: Callable | None) -> Callable:
        def handler(m, e):
            if self._last is not None:
                self._record("hook-invalid-state", f"{self._last[1]} left the guest state invalid: the next VMRUN "
                                                   f"failed with VMEXIT_INVALID ({m.cpu.invalid_reason})")
            self._last = None
            return fn(m, e) if fn is not None else STOP
        handler.__name__ = getattr(fn, "__name__", "handle_invalid")
        return handler


def check_hooks(path: str) -> None:
    """Load ``path`` into a throwaway machine: HooksError (one line) if it cannot be."""
    HookGuard(Machine(dram=4 << 20, ram=2 << 20), path)
