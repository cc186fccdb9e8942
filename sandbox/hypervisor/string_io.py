"""String port I/O (INS/OUTS, with or without REP) emulated for the guest.

The IOIO handler (:func:`sandbox.hypervisor.handlers.handle_ioio`) moves at
most :data:`STRING_IO_CHUNK` elements per exit, as KVM bounds one emulation
step; a REP instruction with more to do re-executes.  RCX, RSI and RDI show
the progress made even when an element faults.  With a port no device
serves, the elements of a page move at once (:func:`_string_io_unowned`).
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
    NestedFault for the element that could not be moved.

    Memory is touched once per run of elements within one page: an INS's
    elements are stored together before the run's page changes (or a fault is
    raised, so every element before the faulting one is in memory), an OUTS
    reads its run's page once.  The guest cannot run in between, so only the
    device sees the per-element order, and it sees it unchanged."""
    is_in, rep = bool(info & IoioInfo.TYPE_IN), bool(info & IoioInfo.REP)
    dev = m.bus.port_owner(port)
    if dev is None:
        _string_io_unowned(m, is_in, rep, size, count, amask, step)
        return
    cache = _PageCache(m, size)
    regs = m.regs
    rdi, rsi, rcx = regs.rdi, regs.rsi, regs.rcx
    mem = m.mem
    # the port's device, resolved once (as DeviceBus.io would for every element)
    read, write, mask = dev.read, dev.write, (1 << (8 * size)) - 1
    run_at, run = -1, bytearray()          # INS: host address of the stored run, and its bytes
    page_at, page = -1, b""                # OUTS: host page of the run being read, and its bytes

    def store() -> None:
        nonlocal run_at
        if run:
            mem.write(run_at, bytes(run) if step > 0 else bytes(run[::-1]))
            run.clear()
        run_at = -1

    try:
        for _ in range(count):
            if is_in:
                v = (read(port, size) & mask).to_bytes(size, "little")
                try:
                    h = cache.hpa(rdi & amask, True)
                except Exception:
                    store()
                    raise
                if h is None:
                    store()
                    m.write_virt(rdi & amask, v)
                elif step > 0 and run and h == run_at + len(run):
                    run += v
                elif step < 0 and run and h == run_at - size:
                    run += v[::-1]
                    run_at = h
                else:
                    store()
                    run_at, run[:] = h, (v if step > 0 else v[::-1])
                rdi = (rdi + step) & amask
            else:
                h = cache.hpa(rsi & amask, False)
                if h is None:
                    data = m.read_virt(rsi & amask, size)
                else:
                    if h & ~0xFFF != page_at:
                        page_at = h & ~0xFFF
                        page = mem.read(page_at, PAGE_SIZE)
                    o = h & 0xFFF
                    data = page[o:o + size]
                write(port, size, int.from_bytes(data, "little"))
                rsi = (rsi + step) & amask
            if rep:
                rcx = (rcx - 1) & amask
        store()
    finally:
        if is_in:
            regs.rdi = rdi
        else:
            regs.rsi = rsi
        if rep:
            regs.rcx = rcx


def _string_io_unowned(m: "Machine", is_in: bool, rep: bool, size: int, count: int, amask: int, step: int) -> None:
    """INS/OUTS with a port no device serves: every INS element reads all ones and
    an OUTS element goes nowhere, so the elements of one page move together --
    one translation and one store per page.  The architectural result is that of
    :func:`string_io`'s element loop: the same bytes, the same fault at the same
    element (the first of the page that cannot be translated), the same RCX/RSI/RDI."""
    regs = m.regs
    cache = _PageCache(m, size)
    ptr = (regs.rdi if is_in else regs.rsi) & amask
    left = count
    try:
        while left:
            off = ptr & 0xFFF
            if off + size > PAGE_SIZE:
                n = 0                                     # this element straddles two pages
            elif step > 0:
                n = min(left, (PAGE_SIZE - off) // size)
            else:
                n = min(left, off // size + 1)
            if n == 0:
                if is_in:
                    m.write_virt(ptr, b"\xff" * size)
                else:
                    m.read_virt(ptr, size)
                n = 1
            else:
                h = cache.hpa(ptr, is_in)                 # raises the fault of the page's first element
                if is_in:
                    m.mem.write(h if step > 0 else h - (n - 1) * size, b"\xff" * (n * size))
            ptr = (ptr + n * step) & amask
            left -= n
    finally:
        done = count - left
        if done:
            if is_in:
                regs.rdi = ptr
            else:
                regs.rsi = ptr
            if rep:
                regs.rcx = (regs.rcx - done) & amask
