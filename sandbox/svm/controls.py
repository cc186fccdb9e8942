"""The VMCB controls the processor latched at the last full VMRUN.

The hardware reads the control area when VMRUN loads a guest and then works
from its own copy (APM §15.5.1, §15.15: the VMCB clean bits say which copies
it may keep).  :class:`GuestControls` is that copy, shared by the parts of
the processor; only the world switch writes it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class GuestControls:
    """What the running guest's VMCB says, as of its last full VMRUN."""
    #: host-physical address of the current (or last) VMCB: rAX of VMRUN
    vmcb_hpa: int = 0
    #: the six intercept words at 000h-017h; a flat bit index is an exit code
    ivec: tuple[int, ...] = (0,) * 6
    iopm_hpa: int = 0
    msrpm_hpa: int = 0
    asid: int = 0
    #: NP_ENABLE, and the nested page table's root
    np: bool = False
    n_cr3: int = 0
    #: added to the TSC for RDTSC/RDTSCP, intercepted or not (APM §15.30.4)
    tsc_offset: int = 0
    #: PAUSE_FILTER_COUNT and PAUSE_FILTER_THRESHOLD, zero unless PAUSE is intercepted (:mod:`.pause_filter`)
    pause_filter_count: int = 0
    pause_filter_threshold: int = 0

    def intercepted(self, code: int) -> bool:
        """The intercept bit of exit code ``code`` is set."""
        return bool(self.ivec[code >> 5] >> (code & 31) & 1)
