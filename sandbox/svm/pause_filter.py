"""PAUSE intercept filtering (APM vol. 2 §15.14.4; CPUID Fn8000_000A_EDX[10] PauseFilter,
[12] PauseFilterThreshold).

With the PAUSE intercept set, a non-zero PAUSE_FILTER_COUNT (VMCB 03Eh) lets that
many PAUSEs run before one exits: VMRUN loads an internal counter from the field,
each intercepted PAUSE with the counter at zero takes ``VMEXIT_PAUSE`` and any
other decrements it.  (The manual says both "decremented until it reaches zero"
in §15.14.4 and "the intercept only occurs if the counter goes below zero" in
§15.9; Bochs exits at a PAUSE that finds the counter at zero, which is the
reading taken here.  kvm-unit-tests' pause_filter_test -- an exit for a count
of 9 with 10 PAUSEs, none for 21 with 20 -- holds under either.)

A non-zero PAUSE_FILTER_THRESHOLD (VMCB 03Ch) reloads the counter from the
count when more than that many cycles passed since the last PAUSE: a spin loop
whose PAUSEs come close together exits, one that waits between them does not.
The sandbox's cycles are guest time: one per retired instruction (the clock of
:class:`~.run.RunLoop`, counted while a threshold is in force).
"""
from __future__ import annotations

from typing import Callable

from .controls import GuestControls


class PauseFilter:
    """The processor's PAUSE filter counter and the guest time of the last PAUSE."""

    __slots__ = ("_clock", "_keep_clock", "counter", "last")

    def __init__(self, clock: Callable[[], int], keep_clock: Callable[[], None]) -> None:
        #: guest time in cycles (retired instructions), and the call that keeps it counted
        self._clock, self._keep_clock = clock, keep_clock
        self.counter = 0
        self.last = 0

    def load(self, ctl: GuestControls) -> None:
        """Every VMRUN: the counter starts from the count VMRUN latched (zero unless
        PAUSE is intercepted: ``WorldSwitch._latch_controls``)."""
        self.counter = ctl.pause_filter_count
        if ctl.pause_filter_threshold:
            self._keep_clock()
            self.last = self._clock()

    def exits(self, ctl: GuestControls) -> bool:
        """An intercepted PAUSE is about to execute: True when it takes the #VMEXIT,
        False when the filter lets it run (one fewer left)."""
        if ctl.pause_filter_threshold:
            now = self._clock()
            if now - self.last > ctl.pause_filter_threshold:
                self.counter = ctl.pause_filter_count        # a pause in the spinning: start again
            self.last = now
        if self.counter == 0:
            return True
        self.counter -= 1
        return False
