"""String port I/O (INS/OUTS, with or without REP) emulated for the guest.

The IOIO handler (:func:`sandbox.hypervisor.handlers.handle_ioio`) moves at
most :data:`STRING_IO_CHUNK` elements per exit, as KVM bounds one emulation
step; a REP instruction with more to do re-executes.  RCX, RSI and RDI show
the progress made even when an element faults.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..memory.hostmem import PAGE_SIZE
from ..memory.mmu import GuestPageFault
from ..memory.paging import Access
from ..svm.iopm import IoioInfo

if TYPE_CHECKING:
    from .machine import Machine

#: REP INS/OUTS elements emulated per exit; the rest re-executes (bounds one handler call)
STRING_IO_CHUNK = 1024


class _PageCache:
    """Each guest page translated once per handler call (not once per element)."""

    def __init__(self, m: "Machine", size: int) -> None:
        self.m, self.size = m, size
        self.pages: dict[tuple[int, bool], int] = {}

    def hpa(self, gva: int, write: bool) -> int | None:
        """The host address of ``size`` bytes at ``gva``; None when they straddle a page."""
        if (gva & 0xFFF) + self.size > PAGE_SIZE:
            return None                       # straddles a page: the general path
        key = (gva >> 12, write)
        base = self.pages.get(key)
        if base is None:
            try:
                # through the guest's own tables in either paging mode (the processor's
                # walker would read the shadow tables under shadow paging)
                base = self.m.virt_to_host(gva & ~0xFFF, Access.WRITE if write else Access.READ, set_ad=write)
            except GuestPageFault as f:
                raise GuestPageFault(f.error_code, gva) from None
            self.pages[key] = base
        return base | (gva & 0xFFF)


def string_io(m: "Machine", info: int, port: int, size: int, count: int, amask: int, step: int) -> None:
    """INS/OUTS of ``count`` elements, one at a time; RCX counts down as each
    completes.  Raises the guest's fault (GuestPageFault, GuestGP) or a
    NestedFault for the element that could not be moved."""
    is_in, rep = bool(info & IoioInfo.TYPE_IN), bool(info & IoioInfo.REP)
    cache = _PageCache(m, size)
    regs = m.regs
    rdi, rsi, rcx = regs.rdi, regs.rsi, regs.rcx
    try:
        for _ in range(count):
            if is_in:
                v = m.bus.io(port, size, True).to_bytes(size, "little")
                h = cache.hpa(rdi & amask, True)
                if h is None:
                    m.write_virt(rdi & amask, v)
                else:
                    m.mem.write(h, v)
                rdi = (rdi + step) & amask
            else:
                h = cache.hpa(rsi & amask, False)
                data = m.read_virt(rsi & amask, size) if h is None else m.mem.read(h, size)
                m.bus.io(port, size, False, int.from_bytes(data, "little"))
                rsi = (rsi + step) & amask
            if rep:
                rcx = (rcx - 1) & amask
    finally:
        if is_in:
            regs.rdi = rdi
        else:
            regs.rsi = rsi
        if rep:
            regs.rcx = rcx
