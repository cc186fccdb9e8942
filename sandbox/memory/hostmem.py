"""Host physical memory: the machine's DRAM.

One Python-owned buffer (an anonymous ``mmap``) is the whole host-physical
address space.  Unicorn maps it with ``mem_map_ptr`` so the emulated CPU and
the Python hypervisor share the same bytes with no copies.  Everything the
hypervisor owns -- guest pages, VMCBs, the IOPM and MSRPM, nested page
tables -- is allocated here at a real host-physical address (HPA).

The hypervisor reads and writes DRAM only through :class:`HostMemory`; that
is the single view a memory-encryption layer (SEV) can later sit behind.
"""
from __future__ import annotations

import ctypes
import mmap
import struct
import sys
from typing import Iterable, Iterator

PAGE_SIZE = 4096
PAGE_SHIFT = 12
PAGE_MASK = ~(PAGE_SIZE - 1)


def page_spans(addr: int, n: int) -> Iterator[tuple[int, int, int]]:
    """``(address, offset, length)`` of each piece of the ``n`` bytes at ``addr``
    that lies within one 4 KiB page, in order (nothing for ``n <= 0``): how a
    copy through a page-by-page translation is cut."""
    at = 0
    while at < n:
        chunk = min(n - at, PAGE_SIZE - (addr & 0xFFF))
        yield addr, at, chunk
        addr, at = addr + chunk, at + chunk


_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")


if sys.byteorder != "little":          # ``qwords`` and Unicorn's CPU context use the host's order
    raise ImportError("the sandbox needs a little-endian host (x86 byte order)")


class HostMemoryError(Exception):
    """An access outside DRAM, or an allocator failure."""


class HostMemory:
    """``size`` bytes of DRAM starting at host-physical address 0.

    Page 0 is never handed out by the allocator, so an HPA of 0 can mean
    "none" in tables the hypervisor builds.

    The buffer is twice ``size``: the upper half is not DRAM but the
    processor's on-die plaintext cache for encrypted (SEV) pages, at
    ``cache_base + hpa`` (see :mod:`sandbox.sev.memctl`).  It is reachable only by
    the processor model; every method here is bounded by ``size``, and
    :meth:`dump` returns DRAM alone.
    """

    def __init__(self, size: int = 64 << 20) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise HostMemoryError(f"DRAM size must be a positive multiple of 4 KiB, got {size:#x}")
        self.size = size
        #: where the processor's plaintext cache starts (just above DRAM)
        self.cache_base = size
        #: the buffer itself (an anonymous ``mmap``: untouched cache pages cost
        #: nothing), for the processor model and whole-memory tools such as
        #: snapshots; its slices are copies, and it bypasses :attr:`sync`
        self.raw = mmap.mmap(-1, 2 * size)
        self._cbuf = (ctypes.c_char * (2 * size)).from_buffer(self.raw)
        #: raw view for the CPU model; hypervisor code uses the methods below
        self.view = memoryview(self.raw)
        #: the same memory as 64-bit words (index = hpa >> 3), for the processor
        #: model's hot paths: an item access costs no call, unlike ``struct``
        #: (x86 byte order: the host is little-endian, checked at import)
        self.qwords = self.view.cast("Q")
        self._free: list[int] = list(range(size // PAGE_SIZE - 1, 0, -1))
        self._allocated: set[int] = set()
        #: called as ``sync(hpa, n, write)`` before every hypervisor access, so
        #: the processor can write back guest state it saved lazily at #VMEXIT
        #: and notice VMCB fields the hypervisor changed (its VMCB clean bits)
        self.sync = None

    # -- mapping into Unicorn -------------------------------------------------
    @property
    def address(self) -> int:
        """Process address of the DRAM buffer, for ``Uc.mem_map_ptr``."""
        return ctypes.addressof(self._cbuf)

    # -- allocator -------------------------------------------------------------
    def alloc_page(self, zero: bool = True) -> int:
        """Allocate one 4 KiB page; returns its HPA."""
        if not self._free:
            raise HostMemoryError("out of host memory")
        pfn = self._free.pop()
        self._allocated.add(pfn)
        hpa = pfn << PAGE_SHIFT
        if zero:
            self.view[hpa:hpa + PAGE_SIZE] = bytes(PAGE_SIZE)
        return hpa

    def alloc_contiguous(self, npages: int, zero: bool = True, align: int = PAGE_SIZE) -> int:
        """Allocate ``npages`` physically contiguous pages starting at an HPA
        aligned to ``align`` (a power of two, at least 4 KiB)."""
        if npages <= 0 or align < PAGE_SIZE or align & (align - 1):
            raise HostMemoryError(f"bad contiguous allocation: {npages} pages aligned to {align:#x}")
        free = set(self._free)
        step = align >> PAGE_SHIFT
        top = self.size >> PAGE_SHIFT
        pfn = step if step > 1 else 1
        while pfn + npages <= top:
            gap = next((pfn + i for i in range(npages) if (pfn + i) not in free), None)
            if gap is None:
                run = set(range(pfn, pfn + npages))
                self._free = [p for p in self._free if p not in run]
                self._allocated |= run
                hpa = pfn << PAGE_SHIFT
                if zero:
                    self.view[hpa:hpa + npages * PAGE_SIZE] = bytes(npages * PAGE_SIZE)
                return hpa
            pfn = (gap // step + 1) * step
        raise HostMemoryError(f"no {npages} contiguous free pages aligned to {align:#x}")

    def free_page(self, hpa: int) -> None:
        pfn = hpa >> PAGE_SHIFT
        if pfn not in self._allocated:
            raise HostMemoryError(f"double free or foreign page {hpa:#x}")
        self._allocated.remove(pfn)
        self._free.append(pfn)

    def is_allocated(self, hpa: int) -> bool:
        return (hpa >> PAGE_SHIFT) in self._allocated

    @property
    def pages_free(self) -> int:
        return len(self._free)

    # -- access API --------------------------------------------------------------
    def _check(self, hpa: int, n: int, write: bool = False) -> None:
        if hpa < 0 or n < 0 or hpa + n > self.size:
            raise HostMemoryError(f"host-physical access {hpa:#x}+{n:#x} outside DRAM (size {self.size:#x})")
        if self.sync is not None:
            self.sync(hpa, n, write)

    def read(self, hpa: int, n: int) -> bytes:
        self._check(hpa, n)
        return bytes(self.view[hpa:hpa + n])

    def write(self, hpa: int, data: bytes | bytearray | memoryview) -> None:
        self._check(hpa, len(data), True)
        self.view[hpa:hpa + len(data)] = data

    def fill(self, hpa: int, n: int, byte: int = 0) -> None:
        self.write(hpa, bytes([byte]) * n)

    def read_u64(self, hpa: int) -> int:
        self._check(hpa, 8)
        return _U64.unpack_from(self.raw, hpa)[0]

    def write_u64(self, hpa: int, value: int) -> None:
        self._check(hpa, 8, True)
        _U64.pack_into(self.raw, hpa, value & 0xFFFFFFFFFFFFFFFF)

    def read_u32(self, hpa: int) -> int:
        self._check(hpa, 4)
        return _U32.unpack_from(self.raw, hpa)[0]

    def write_u32(self, hpa: int, value: int) -> None:
        self._check(hpa, 4, True)
        _U32.pack_into(self.raw, hpa, value & 0xFFFFFFFF)

    def read_u16(self, hpa: int) -> int:
        self._check(hpa, 2)
        return _U16.unpack_from(self.raw, hpa)[0]

    def read_u8(self, hpa: int) -> int:
        self._check(hpa, 1)
        return self.raw[hpa]

    def write_u8(self, hpa: int, value: int) -> None:
        self._check(hpa, 1, True)
        self.raw[hpa] = value & 0xFF

    def dump(self) -> bytes:
        """The raw DRAM image, as a physical-memory probe would see it."""
        self._check(0, self.size)
        return bytes(self.raw[:self.size])

    def pages(self) -> Iterable[int]:
        """HPAs of all allocated pages."""
        return sorted(p << PAGE_SHIFT for p in self._allocated)
