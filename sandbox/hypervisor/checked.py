"""A checked mode of the hypervisor API: host-memory accesses bounded to one guest.

Inside ``with CheckedMemory(machine):`` every access the hypervisor makes
through :class:`~sandbox.memory.hostmem.HostMemory` (``read``, ``write``,
the ``*_u64`` helpers, and everything built on them: ``guest.read_phys``,
``machine.read_virt``, the VMCB accessors, the NPT and IOPM/MSRPM objects)
must fall in the current guest's own host pages -- its RAM, its VMCB, its
nested page tables, its IOPM and MSRPM.  Anything else raises
:class:`HostAccessViolation` before the access happens.  The fuzzer runs
users' exit handlers in this mode; a hypervisor can use it to debug its own.
(Accesses through ``HostMemory.raw``, the processor's own view, are not seen.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..memory.hostmem import PAGE_SIZE
from ..svm.iopm import IOPM_PAGES
from ..svm.msrpm import MSRPM_PAGES

if TYPE_CHECKING:
    from .guest import Guest
    from .machine import Machine


class HostAccessViolation(Exception):
    """A checked-mode access outside the current guest's pages."""

    def __init__(self, hpa: int, n: int, write: bool) -> None:
        super().__init__(f"{'write to' if write else 'read of'} host memory {hpa:#x}+{n:#x}, outside the "
                         "guest's RAM, VMCB, nested tables, IOPM and MSRPM")
        self.hpa, self.n, self.write = hpa, n, write


def guest_pages(g: "Guest") -> frozenset[int]:
    """The host pages that belong to guest ``g``."""
    pages = set(g.ram.values()) | set(g.npt.tables) | {g.vmcb_hpa}
    pages |= {g.iopm.hpa + i * PAGE_SIZE for i in range(IOPM_PAGES)}
    pages |= {g.msrpm.hpa + i * PAGE_SIZE for i in range(MSRPM_PAGES)}
    return frozenset(pages)


class CheckedMemory:
    """Context manager: bound the hypervisor's host-memory accesses to the current guest."""

    def __init__(self, m: "Machine") -> None:
        self.m = m
        self._key: tuple | None = None
        self._pages: frozenset[int] = frozenset()
        self._outer: Callable[[int, int, bool], None] | None = None
        #: every violation seen, even one the caller caught and swallowed
        self.violations: list[HostAccessViolation] = []

    def allowed(self) -> frozenset[int]:
        g = self.m.guest
        key = (id(g), len(g.npt.tables), g.migrations)
        if key != self._key:
            self._key, self._pages = key, guest_pages(g)
        return self._pages

    def check(self, hpa: int, n: int, write: bool = False) -> None:
        pages = self.allowed()
        first, last = hpa & ~(PAGE_SIZE - 1), (hpa + max(n, 1) - 1) & ~(PAGE_SIZE - 1)
        for p in range(first, last + PAGE_SIZE, PAGE_SIZE):
            if p not in pages:
                v = HostAccessViolation(hpa, n, write)
                self.violations.append(v)
                raise v

    def __enter__(self) -> "CheckedMemory":
        mem = self.m.mem
        self._outer = outer = mem.sync

        def sync(hpa: int, n: int, write: bool = False) -> None:
            self.check(hpa, n, write)
            if outer is not None:
                outer(hpa, n, write)
        mem.sync = sync
        return self

    def __exit__(self, *exc) -> None:
        self.m.mem.sync = self._outer
