"""x86-64 4-level page-table entries and the walk both translation layers share.

The guest's page tables (GVA -> GPA) and the hypervisor's nested page tables
(GPA -> HPA) use the same long-mode entry format (APM vol. 2 §5.3-5.4).
:func:`walk` walks one such table given a function that reads an entry; the
two layers in :mod:`sandbox.memory.mmu` plug in how their table memory is reached.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag
from typing import Callable

from ..arch import MAXPHYADDR


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
    ENC = 1 << 34          # the faulting access was encrypted (SEV, APM §15.36.10)


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
    global_: bool = False           # the leaf has G set (meaningful with CR4.PGE)


_P, _RW, _US, _A, _D, _PS, _G, _NX = (int(f) for f in (PTE.P, PTE.RW, PTE.US, PTE.A, PTE.D, PTE.PS, PTE.G, PTE.NX))
_W, _U, _RSVD, _ID = int(PFErr.W), int(PFErr.U), int(PFErr.RSVD), int(PFErr.ID)
_PML4_MBZ = _PS | _G
_SHIFT = LEVEL_SHIFT
_SIZE = {3: 1 << 30, 2: 1 << 21, 1: 1 << 12}
_Q = struct.Struct("<Q")
_LEVELS = tuple((level, LEVEL_SHIFT[level]) for level in (4, 3, 2, 1))
assert Access.WRITE == 1 and Access.FETCH == 2


def canonical(va: int) -> bool:
    top = va >> 47
    return top == 0 or top == 0x1FFFF


def denied(access: int, user: bool, user_ok: bool, writable: bool, executable: bool, wp: bool,
           smep: bool) -> bool:
    """The leaf's protection check, on the rights of every level walked (APM vol. 2
    §5.6): a user access to a supervisor page, a write to a read-only page by a
    user or with CR0.WP, a fetch from a no-execute page or (SMEP) a supervisor
    fetch from a user page.  A denied access is a #PF with P = 1."""
    return (user and not user_ok) or (access == 1 and not writable and (user or wp)) or \
        (access == 2 and (not executable or (smep and not user and user_ok)))


def walk(root: int, va: int, access: int, user: bool, read_entry: Callable[[int], int] | None,
         write_entry: Callable[[int, int], None] | None, *, wp: bool = True, nxe: bool = True,
         set_ad: bool = True, smep: bool = False, table_mem: memoryview | None = None,
         table_limit: int = 0, table_pages: dict[int, tuple[int, int]] | None = None,
         stats=None) -> WalkResult:
    """Walk a 4-level table rooted at ``root`` for ``va``.

    ``read_entry(addr)`` returns the 8-byte entry at table address ``addr``
    (a GPA for guest tables, an HPA for nested ones); raising ``LookupError``
    from it aborts the walk (the caller's layer records why).  Tables that sit
    directly in a buffer (the nested ones, in host DRAM) are read from
    ``table_mem`` instead, with no call per entry: an entry at or beyond
    ``table_limit`` aborts the walk as a ``LookupError`` would.  A walk through
    ``read_entry`` may also be given ``table_pages`` (table page address ->
    (its host address in ``table_mem``, the nested references one read of it
    counts), which ``read_entry`` keeps) and ``stats``: an entry in a page found
    there is read and written in ``table_mem`` directly, its references counted
    in ``stats`` (``guest_entries``, ``nested_entries``) as ``read_entry`` would
    count them, with no call.  Accessed bits
    are set on every level walked and Dirty on the final entry of a write,
    as the hardware does (APM §5.4.2).
    """
    table = root & ADDR_MASK
    writable = user_ok = executable = True
    # plain ints on this path: IntFlag arithmetic costs microseconds per walk
    err_base = (_W if access == 1 else 0) | (_U if user else 0) | \
        (_ID if access == 2 and (nxe or smep) else 0)
    rsvd_nx = 0 if nxe else _NX
    entries = 0
    for level, shift in _LEVELS:
        ea = table + ((va >> shift) & 0x1FF) * 8
        hp = -1                          # the entry's host address when it is read in place
        if table_pages is not None:
            hit = table_pages.get(ea & ~0xFFF)
            if hit is None:
                e = read_entry(ea)
            else:
                hp = hit[0] | (ea & 0xFFF)
                e = _Q.unpack_from(table_mem, hp)[0]
                stats.guest_entries += 1
                stats.nested_entries += hit[1]
        elif table_mem is None:
            e = read_entry(ea)
        elif ea + 8 > table_limit:
            raise LookupError(ea)
        else:
            e = _Q.unpack_from(table_mem, ea)[0]
        entries += 1
        if not e & 1:
            return WalkResult(fault=err_base, entries=entries)
        ps = e & _PS and level != 1
        # a PML4E's bits 8:7 are MBZ on AMD (APM vol. 2 §5.4.1, Figure 5-18 "PML4E--Long
        # Mode"; KVM's __reset_rsvds_bits_mask reserves non-leaf bit 8 "on AMD CPUs only")
        if e & RSVD_HIGH or e & rsvd_nx or (level == 4 and e & _PML4_MBZ) or \
                (ps and (e & ADDR_MASK) & (_SIZE[level] - 1) & ~0x1000):
            # large page: bits 20:13 (2 MiB) / 29:13 (1 GiB) of the address field must be 0
            return WalkResult(fault=err_base | _P | _RSVD, entries=entries)
        if not e & _RW:
            writable = False
        if not e & _US:
            user_ok = False
        if nxe and e & _NX:
            executable = False
        if level == 1 or ps:
            size = _SIZE[level]
            if denied(access, user, user_ok, writable, executable, wp, smep):
                return WalkResult(fault=err_base | _P, entries=entries)
            if set_ad:
                ne = e | _A | (_D if access == 1 else 0)
                if ne != e:
                    if table_mem is None or (table_pages is not None and hp < 0):
                        write_entry(ea, ne)
                    else:
                        _Q.pack_into(table_mem, ea if hp < 0 else hp, ne)
            return WalkResult(((e & ADDR_MASK) & ~(size - 1)) | (va & (size - 1)), writable or (not user and not wp),
                              user_ok, executable, size, bool(e & _D) or access == 1, None, entries, bool(e & _G))
        if set_ad and not e & _A:
            if table_mem is None or (table_pages is not None and hp < 0):
                write_entry(ea, e | _A)
            else:
                _Q.pack_into(table_mem, ea if hp < 0 else hp, e | _A)
        table = e & ADDR_MASK
    raise AssertionError("unreachable")


class TableBuilder:
    """Builds 4-level tables in some physical space, with 4 KiB, 2 MiB or 1 GiB leaves.

    ``alloc()`` returns the address of a fresh zeroed table page; ``read``
    and ``write`` access 8-byte entries.  Intermediate entries are P|RW|US so
    that permissions are decided by the leaf.
    """

    #: leaf size -> the level its entry lives at
    LEVEL_OF = {1 << 12: 1, 1 << 21: 2, 1 << 30: 3}

    def __init__(self, root: int, alloc: Callable[[], int], read: Callable[[int], int],
                 write: Callable[[int, int], None]) -> None:
        self.root, self._alloc, self._read, self._write = root, alloc, read, write

    def _slot(self, va: int, create: bool, leaf_level: int = 1) -> int | None:
        table = self.root
        for level in range(4, leaf_level, -1):
            ea = table + ((va >> LEVEL_SHIFT[level]) & 0x1FF) * 8
            e = self._read(ea)
            if not e & _P:
                if not create:
                    return None
                nt = self._alloc()
                e = nt | _P | _RW | _US
                self._write(ea, e)
            elif e & _PS:
                if not create:
                    return ea             # the large leaf that maps ``va``
                raise ValueError(f"{va:#x} is inside a large page")
            table = e & ADDR_MASK
        return table + ((va >> LEVEL_SHIFT[leaf_level]) & 0x1FF) * 8

    def map(self, va: int, pa: int, *, write: bool = True, user: bool = True, execute: bool = True,
            extra: int = 0, size: int = 1 << 12) -> None:
        """Map ``va`` -> ``pa`` with a leaf of ``size`` bytes (4 KiB, 2 MiB or 1 GiB)."""
        level = self.LEVEL_OF.get(size)
        if level is None:
            raise ValueError(f"page size {size:#x} is not 4 KiB, 2 MiB or 1 GiB")
        if va % size or pa % size:
            raise ValueError(f"{va:#x} -> {pa:#x} is not aligned to the page size {size:#x}")
        slot = self._slot(va, True, level)
        if level > 1:
            old = self._read(slot)
            if old & _P and not old & _PS:
                raise ValueError(f"{va:#x} already has a page table below it")
        e = (pa & ADDR_MASK) | _P | int(extra) | (_PS if level > 1 else 0)
        if write:
            e |= _RW
        if user:
            e |= _US
        if not execute:
            e |= _NX
        self._write(slot, e)

    def entry(self, va: int) -> int | None:
        slot = self._slot(va, False)
        return None if slot is None else self._read(slot)

    def set_entry(self, va: int, value: int) -> None:
        slot = self._slot(va, True)
        self._write(slot, value)

    def entry_addr(self, va: int) -> int | None:
        """Address of the leaf entry (4 KiB or large) that maps ``va``, if any."""
        return self._slot(va, False)

    def leaf(self, va: int) -> tuple[int, int, int] | None:
        """(entry address, entry, page size) of the present leaf mapping ``va``."""
        table = self.root
        for level in (4, 3, 2, 1):
            ea = table + ((va >> LEVEL_SHIFT[level]) & 0x1FF) * 8
            e = self._read(ea)
            if not e & _P:
                return None
            if level == 1 or (level in (2, 3) and e & _PS):
                return ea, e, PAGE_SIZE_AT[level]
            table = e & ADDR_MASK
        return None
