"""x86-64 4-level page-table entries and the walk both translation layers share.

The guest's page tables (GVA -> GPA) and the hypervisor's nested page tables
(GPA -> HPA) use the same long-mode entry format (APM vol. 2 §5.3-5.4).
:func:`walk` walks one such table given a function that reads an entry; the
two layers in :mod:`sandbox.mmu` plug in how their table memory is reached.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag
from typing import Callable


class PTE(IntFlag):
    P = 1 << 0
    RW = 1 << 1
    US = 1 << 2
    PWT = 1 << 3
    PCD = 1 << 4
    A = 1 << 5
    D = 1 << 6
    PS = 1 << 7
    G = 1 << 8
    NX = 1 << 63


ADDR_MASK = 0x000F_FFFF_FFFF_F000      # bits 51:12
MAXPHYADDR = 48
#: bits that must be zero in every level above MAXPHYADDR (51:MAXPHYADDR)
RSVD_HIGH = ((1 << 52) - 1) & ~((1 << MAXPHYADDR) - 1)
LEVEL_SHIFT = {4: 39, 3: 30, 2: 21, 1: 12}
PAGE_SIZE_AT = {3: 1 << 30, 2: 1 << 21, 1: 1 << 12}


class PFErr(IntFlag):
    """Page-fault error code bits (#PF and the low bits of NPF EXITINFO1)."""
    P = 1 << 0
    W = 1 << 1
    U = 1 << 2
    RSVD = 1 << 3
    ID = 1 << 4
    # NPF-only bits (APM §15.25.6)
    FINAL = 1 << 32        # fault on the final GPA translation
    PT_WALK = 1 << 33      # fault while translating a guest page-table access


class Access:
    READ = 0
    WRITE = 1
    FETCH = 2


@dataclass(slots=True)
class WalkResult:
    """Outcome of a walk: either ``phys`` + effective permissions, or a fault."""
    phys: int = 0
    writable: bool = False
    user: bool = False
    executable: bool = False
    page_size: int = 4096
    dirty: bool = False
    fault: int | None = None        # PFErr bits when the walk faulted
    entries: int = 0                # table entries read


# plain-int copies for the walk: ``int & IntFlag`` dispatches to the enum's
# reflected operator, which made enum arithmetic the bulk of a 2-D walk's cost
_P, _RW, _US, _A, _D, _PS, _NX = (int(f) for f in (PTE.P, PTE.RW, PTE.US, PTE.A, PTE.D, PTE.PS, PTE.NX))
_E_P, _E_W, _E_U, _E_RSVD, _E_ID = (int(f) for f in (PFErr.P, PFErr.W, PFErr.U, PFErr.RSVD, PFErr.ID))


def canonical(va: int) -> bool:
    top = va >> 47
    return top == 0 or top == 0x1FFFF


def walk(root: int, va: int, access: int, user: bool, read_entry: Callable[[int], int],
         write_entry: Callable[[int, int], None], *, wp: bool = True, nxe: bool = True,
         set_ad: bool = True, smep: bool = False) -> WalkResult:
    """Walk a 4-level table rooted at ``root`` for ``va``.

    ``read_entry(addr)`` returns the 8-byte entry at table address ``addr``
    (a GPA for guest tables, an HPA for nested ones); raising ``LookupError``
    from it aborts the walk (the caller's layer records why).  Accessed bits
    are set on every level walked and Dirty on the final entry of a write,
    as the hardware does (APM §5.4.2).
    """
    res = WalkResult()
    table = root & ADDR_MASK
    writable = user_ok = executable = True
    err_base = (_E_W if access == Access.WRITE else 0) | (_E_U if user else 0) | \
        (_E_ID if access == Access.FETCH and (nxe or smep) else 0)
    level = 4
    while True:
        idx = (va >> LEVEL_SHIFT[level]) & 0x1FF
        ea = table + idx * 8
        e = read_entry(ea)
        res.entries += 1
        if not e & _P:
            res.fault = int(err_base)
            return res
        rsvd = e & RSVD_HIGH
        if not nxe and e & _NX:
            rsvd = True
        if level == 4 and e & _PS:
            rsvd = True
        if level in (3, 2) and e & _PS:
            # large page: bits 20:13 (2 MiB) / 29:13 (1 GiB) of the address field must be 0
            low = (e & ADDR_MASK) & (PAGE_SIZE_AT[level] - 1) & ~0x1000
            if low:
                rsvd = True
        if rsvd:
            res.fault = int(err_base | _E_P | _E_RSVD)
            return res
        writable &= bool(e & _RW)
        user_ok &= bool(e & _US)
        executable &= not (nxe and e & _NX)
        leaf = level == 1 or (level in (3, 2) and e & _PS)
        if leaf:
            size = PAGE_SIZE_AT[level]
            # permission check
            ok = True
            if user and not user_ok:
                ok = False
            if access == Access.WRITE and not writable and (user or wp):
                ok = False
            if access == Access.FETCH and not executable:
                ok = False
            if access == Access.FETCH and smep and not user and user_ok:
                ok = False
            if not ok:
                res.fault = int(err_base | _E_P)
                return res
            if set_ad:
                ne = e | _A
                if access == Access.WRITE:
                    ne |= _D
                if ne != e:
                    write_entry(ea, ne)
            frame = (e & ADDR_MASK) & ~(size - 1)
            res.phys = frame | (va & (size - 1))
            res.writable = writable or (not user and not wp)
            res.user = user_ok
            res.executable = executable
            res.page_size = size
            res.dirty = bool(e & _D) or access == Access.WRITE
            return res
        if set_ad and not e & _A:
            write_entry(ea, e | _A)
        table = e & ADDR_MASK
        level -= 1


class TableBuilder:
    """Builds 4-level tables with 4 KiB leaves in some physical space.

    ``alloc()`` returns the address of a fresh zeroed table page; ``read``
    and ``write`` access 8-byte entries.  Intermediate entries are P|RW|US so
    that permissions are decided by the leaf.
    """

    def __init__(self, root: int, alloc: Callable[[], int], read: Callable[[int], int],
                 write: Callable[[int, int], None]) -> None:
        self.root, self._alloc, self._read, self._write = root, alloc, read, write

    def _leaf_slot(self, va: int, create: bool) -> int | None:
        table = self.root
        for level in (4, 3, 2):
            ea = table + ((va >> LEVEL_SHIFT[level]) & 0x1FF) * 8
            e = self._read(ea)
            if not e & PTE.P:
                if not create:
                    return None
                nt = self._alloc()
                e = nt | PTE.P | PTE.RW | PTE.US
                self._write(ea, e)
            elif e & PTE.PS:
                raise ValueError(f"{va:#x} is inside a large page")
            table = e & ADDR_MASK
        return table + ((va >> 12) & 0x1FF) * 8

    def map(self, va: int, pa: int, *, write: bool = True, user: bool = True, execute: bool = True,
            extra: int = 0) -> None:
        slot = self._leaf_slot(va, True)
        e = (pa & ADDR_MASK) | PTE.P | extra
        if write:
            e |= PTE.RW
        if user:
            e |= PTE.US
        if not execute:
            e |= PTE.NX
        self._write(slot, int(e))

    def entry(self, va: int) -> int | None:
        slot = self._leaf_slot(va, False)
        return None if slot is None else self._read(slot)

    def set_entry(self, va: int, value: int) -> None:
        slot = self._leaf_slot(va, True)
        self._write(slot, value)

    def entry_addr(self, va: int) -> int | None:
        return self._leaf_slot(va, False)
