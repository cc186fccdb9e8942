"""Nested page tables: the hypervisor's GPA -> HPA layer (APM vol. 2 §15.25).

The tables are real long-mode 4-level tables in host memory, rooted at the
VMCB's N_CR3.  Nested accesses are always user accesses (§15.25.5): the
nested U bit must be set for any guest access, and CR0.WP does not apply.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .paging import ADDR_MASK, PTE, Access, TableBuilder, WalkResult, walk

if TYPE_CHECKING:
    from .hostmem import HostMemory


class NestedPageTable:
    """A nested page table the hypervisor builds and edits.

    ``map(gpa, hpa)`` installs a 4 KiB leaf; :meth:`translate` is the nested
    walk the 2-D walker (:mod:`sandbox.mmu`) runs.
    """

    def __init__(self, mem: "HostMemory", root: int | None = None, on_change=None) -> None:
        self.mem = mem
        #: called after an existing mapping is changed or removed, so the
        #: hypervisor can flush stale translations (TLB_CONTROL)
        self.on_change = on_change
        self.root = root if root is not None else mem.alloc_page()
        self._builder = TableBuilder(self.root, mem.alloc_page, mem.read_u64, mem.write_u64)
        self.tables = {self.root}

    @property
    def n_cr3(self) -> int:
        return self.root

    def map(self, gpa: int, hpa: int, *, write: bool = True, execute: bool = True, user: bool = True) -> None:
        old = self._builder.entry(gpa)
        self._builder.map(gpa, hpa, write=write, execute=execute, user=user)
        if old is not None and old & PTE.P:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def unmap(self, gpa: int) -> None:
        slot = self._builder.entry_addr(gpa)
        if slot is not None:
            self.mem.write_u64(slot, 0)
            self._changed()

    def protect(self, gpa: int, *, write: bool | None = None, execute: bool | None = None,
                present: bool | None = None, user: bool | None = None) -> None:
        slot = self._builder.entry_addr(gpa)
        if slot is None:
            raise KeyError(f"GPA {gpa:#x} is not mapped")
        e = self.mem.read_u64(slot)
        for flag, on in ((PTE.RW, write), (PTE.P, present), (PTE.US, user)):
            if on is not None:
                e = (e | flag) if on else (e & ~flag)
        if execute is not None:
            e = (e & ~PTE.NX) if execute else (e | PTE.NX)
        self.mem.write_u64(slot, int(e))
        self._changed()

    def entry(self, gpa: int) -> int | None:
        return self._builder.entry(gpa)

    def entry_addr(self, gpa: int) -> int | None:
        return self._builder.entry_addr(gpa)

    def lookup(self, gpa: int) -> int | None:
        """HPA of ``gpa`` without side effects, or None."""
        e = self.entry(gpa)
        if e is None or not e & PTE.P:
            return None
        return (e & ADDR_MASK) | (gpa & 0xFFF)

    def translate(self, gpa: int, access: int) -> WalkResult:
        return nested_walk(self.mem, self.root, gpa, access)


def nested_walk(mem: "HostMemory", n_cr3: int, gpa: int, access: int) -> WalkResult:
    """One nested walk: a user access of type ``access`` (APM §15.25.5)."""
    size = mem.size

    def read(a: int) -> int:
        if a + 8 > size:
            raise LookupError(a)
        return int.from_bytes(mem.view[a:a + 8], "little")

    def write(a: int, v: int) -> None:
        mem.view[a:a + 8] = v.to_bytes(8, "little")

    try:
        return walk(n_cr3, gpa, access, True, read, write, wp=True, nxe=True)
    except LookupError:
        # a table pointer outside DRAM: treat as a reserved-bit fault
        r = WalkResult()
        r.fault = 0x8 | 0x1 | 0x4 | (0x2 if access == Access.WRITE else 0) | (0x10 if access == Access.FETCH else 0)
        return r
