"""Nested page tables: the hypervisor's GPA -> HPA layer (APM vol. 2 §15.25).

The tables are real long-mode 4-level tables in host memory, rooted at the
VMCB's N_CR3.  Nested accesses are always user accesses (§15.25.5): the
nested U bit must be set for any guest access, and CR0.WP does not apply.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .hostmem import PAGE_SIZE
from .paging import ADDR_MASK, PTE, TableBuilder

if TYPE_CHECKING:
    from .hostmem import HostMemory


class NestedPageTable:
    """A nested page table the hypervisor builds and edits.

    ``map(gpa, hpa)`` installs a leaf (4 KiB by default, or a 2 MiB / 1 GiB
    large page with ``size``); :class:`sandbox.memory.mmu.NestedLayer` walks it for
    the 2-D walker.  The processor sets the Accessed and
    Dirty bits of these entries as it uses them (APM §15.25.4), so the
    hypervisor can learn what its guest touched from the table alone
    (:meth:`dirty_pages`, :meth:`harvest_dirty`).
    """

    def __init__(self, mem: "HostMemory", root: int | None = None, on_change=None) -> None:
        self.mem = mem
        #: called after an existing mapping is changed or removed, so the
        #: hypervisor can flush stale translations (TLB_CONTROL)
        self.on_change = on_change
        self.root = root if root is not None else mem.alloc_page()
        self._builder = TableBuilder(self.root, self._alloc_table, mem.read_u64, mem.write_u64)
        self.tables = {self.root}
        #: leaf GPAs this table maps, with their page size
        self.leaves: dict[int, int] = {}

    def _alloc_table(self) -> int:
        t = self.mem.alloc_page()
        self.tables.add(t)
        return t

    @property
    def n_cr3(self) -> int:
        return self.root

    def map(self, gpa: int, hpa: int, *, write: bool = True, execute: bool = True, user: bool = True,
            size: int = PAGE_SIZE) -> None:
        old = self._builder.leaf(gpa) if size == PAGE_SIZE else None
        self._builder.map(gpa, hpa, write=write, execute=execute, user=user, size=size)
        self.leaves[gpa] = size
        if old is not None:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def unmap(self, gpa: int) -> None:
        slot = self._builder.entry_addr(gpa)
        if slot is not None:
            self.mem.write_u64(slot, 0)
            self.leaves.pop(gpa, None)
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
        leaf = self._builder.leaf(gpa)
        if leaf is None:
            return None
        _, e, size = leaf
        return ((e & ADDR_MASK) & ~(size - 1)) | (gpa & (size - 1))

    # -- hardware-maintained Accessed / Dirty bits (APM §15.25.4) --------------
    def _leaf_bits(self, flag: int) -> list[int]:
        out = []
        for gpa in sorted(self.leaves):
            leaf = self._builder.leaf(gpa)
            if leaf is not None and leaf[1] & flag:
                out.append(gpa)
        return out

    def dirty_pages(self) -> list[int]:
        """GPAs of the leaves whose Dirty bit the processor has set."""
        return self._leaf_bits(PTE.D)

    def accessed_pages(self) -> list[int]:
        """GPAs of the leaves whose Accessed bit the processor has set."""
        return self._leaf_bits(PTE.A)

    def harvest_dirty(self, gpas: "list[int] | None" = None) -> list[int]:
        """Return the dirty leaves (of ``gpas``, or all) and clear their D bits.

        Clearing D under a cached writable translation would hide the next
        write, so this reports the change (``on_change``) and the guest's
        TLB entries are flushed at the next VMRUN -- what a hypervisor's
        dirty-log pass does (KVM clears D and flushes the ASID).
        """
        found = []
        for gpa in (sorted(self.leaves) if gpas is None else gpas):
            leaf = self._builder.leaf(gpa)
            if leaf is not None and leaf[1] & PTE.D:
                self.mem.write_u64(leaf[0], leaf[1] & ~PTE.D)
                found.append(gpa)
        if found:
            self._changed()
        return found
