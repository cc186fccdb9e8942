"""String port I/O (INS/OUTS, with or without REP) emulated for the guest.

The IOIO handler (:func:`sandbox.hypervisor.handlers.handle_ioio`) moves at
most :data:`STRING_IO_CHUNK` elements per exit, as KVM bounds one emulation
step; a REP instruction with more to do re-executes.  RCX, RSI and RDI show
the progress made even when an element faults.  The elements of one page
move at once: one translation, one slice of memory, and one call to the
port's device when it takes a run (``read_string`` / ``write_string``).
"""
from __future__ import annotations

from array import array
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
    """INS/OUTS of ``count`` elements; RCX counts down as each completes.
    Raises the guest's fault (GuestPageFault, GuestGP) or a NestedFault for the
    element that could not be moved, with RCX/RSI/RDI showing every element
    before it done.

    The elements move a page run at a time: the run's page is translated once
    (a fault there is its first element's; an element straddling two pages
    goes alone, through the general path), its bytes are one slice, and the
    port's device gets the run in one call (:class:`_Port`).  The guest cannot
    run in between, so only the device sees the per-element order, and it sees
    it unchanged: with DF=1 the run's elements reach it (OUTS) or memory (INS)
    highest address first."""
    is_in, rep = bool(info & IoioInfo.TYPE_IN), bool(info & IoioInfo.REP)
    dev = _Port(m.bus.port_owner(port), port, size)
    regs = m.regs
    cache = _PageCache(m, size)
    mem = m.mem
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
                    m.write_virt(ptr, dev.read(1))
                else:
                    dev.write(m.read_virt(ptr, size))
                n = 1
            elif is_in:
                try:
                    h = cache.hpa(ptr, True)              # the fault of the run's first element
                except Exception:
                    dev.read(1)                           # whose port read came first
                    raise
                data = dev.read(n)
                mem.write(h if step > 0 else h - (n - 1) * size, data if step > 0 else _reversed(data, size))
            else:
                h = cache.hpa(ptr, False)
                if dev.writes:
                    data = mem.read(h if step > 0 else h - (n - 1) * size, n * size)
                    dev.write(data if step > 0 else _reversed(data, size))
            ptr = (ptr + n * step) & amask
            left -= n
    finally:
        done = count - left
        if done:
            if is_in:
                regs.rdi = address_register(regs.rdi, ptr, amask)
            else:
                regs.rsi = address_register(regs.rsi, ptr, amask)
            if rep:
                regs.rcx = address_register(regs.rcx, regs.rcx - done, amask)


def address_register(old: int, new: int, amask: int) -> int:
    """rSI/rDI/rCX after a string instruction of address size ``amask`` moved it
    to ``new``: with 16-bit addressing only SI/DI/CX change (bits 16-63 stay);
    a 32-bit result is written as a 32-bit register is (zero-extended in
    64-bit mode, as QEMU does in every mode); a 64-bit one whole."""
    if amask == 0xFFFF:
        return (old & ~0xFFFF) | (new & 0xFFFF)
    return new & amask


class _Port:
    """One port's device as string I/O uses it: ``read(n)`` is ``n`` elements
    read in order (little-endian bytes, concatenated), ``write(data)`` the
    elements of ``data`` written in order.  A device with ``read_string`` /
    ``write_string`` takes a run in one call; any other gets one ``read`` /
    ``write`` per element.  With no device the port floats: reads are all
    ones, writes go nowhere (:attr:`writes` is False: there is nothing to read
    from memory for them)."""

    def __init__(self, dev, port: int, size: int) -> None:
        self.port, self.size, self.dev = port, size, dev
        self.writes = dev is not None
        # (methods chosen per call, not bound into the instance: a bound method kept
        # in its own object is a reference cycle, freed only by the garbage collector)
        self._read_string = getattr(dev, "read_string", None) if dev is not None else None
        self._write_string = getattr(dev, "write_string", None) if dev is not None else None

    def read(self, n: int) -> bytes:
        if self._read_string is not None:
            return self._read_string(self.port, self.size, n)
        if self.dev is None:
            return b"\xff" * (n * self.size)          # a floating bus reads all ones
        return self._read_each(n)

    def write(self, data: bytes) -> None:
        if self._write_string is not None:
            self._write_string(self.port, self.size, data)
        elif self.dev is not None:
            self._write_each(data)                     # (with no device, writes go nowhere)

    def _read_each(self, n: int) -> bytes:
        read, port, size = self.dev.read, self.port, self.size
        mask = (1 << (8 * size)) - 1
        if size == 1:
            return bytes([read(port, 1) & mask for _ in range(n)])
        return b"".join([(read(port, size) & mask).to_bytes(size, "little") for _ in range(n)])

    def _write_each(self, data: bytes) -> None:
        write, port, size = self.dev.write, self.port, self.size
        if size == 1:
            for v in data:
                write(port, 1, v)
        else:
            for i in range(0, len(data), size):
                write(port, size, int.from_bytes(data[i:i + size], "little"))


#: an element's array type code by size (native order: reversing elements keeps each one's bytes)
_ELEMENT = {1: "B", 2: "H", 4: "I" if array("I").itemsize == 4 else "L"}


def _reversed(data: bytes, size: int) -> bytes:
    """``data``'s ``size``-byte elements in the opposite order (each element's bytes kept)."""
    if size == 1:
        return data[::-1]
    a = array(_ELEMENT[size], data)
    a.reverse()
    return a.tobytes()
