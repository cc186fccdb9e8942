"""Legacy-mode paging walks: 32-bit (two levels) and PAE (three levels).

A guest with CR0.PG set and EFER.LMA clear translates through these formats
(APM vol. 2 §5.2-5.3): 32-bit paging with 4-byte entries and, with CR4.PSE,
4 MiB pages; PAE paging with 8-byte entries below a four-entry page-directory-
pointer table at CR3[31:5].  Faults come back as the same :class:`WalkResult`
the long-mode :func:`~sandbox.memory.paging.walk` gives, with #PF error-code bits.

With nested paging the processor reads a PAE guest's PDPTEs as part of each
walk (they are not loaded at VMRUN; kvm-unit-tests' svm_pae_test: a reserved
bit in PDPTE0 is a #PF at the first fetch, one in an unused PDPTE goes unseen).
"""
from __future__ import annotations

from typing import Callable

from ..arch import MAXPHYADDR
from .paging import PFErr, PTE, WalkResult, denied

_P, _RW, _US, _A, _D, _PS, _G, _NX = (int(f) for f in (PTE.P, PTE.RW, PTE.US, PTE.A, PTE.D, PTE.PS, PTE.G, PTE.NX))
_W, _U, _RSVD, _ID = int(PFErr.W), int(PFErr.U), int(PFErr.RSVD), int(PFErr.ID)

#: PAE entries: bits 62:MAXPHYADDR are MBZ in legacy mode (APM vol. 2 Figures 5-10 to 5-13,
#: "Reserved, MBZ" where long mode leaves bits 62:52 available)
PAE_RSVD_HIGH = ((1 << 63) - 1) & ~((1 << MAXPHYADDR) - 1)
#: a legacy PAE PDPTE: bit 63, bits 62:MAXPHYADDR, 8:5 and 2:1 are MBZ (APM vol. 2 Figure 5-10;
#: KVM's __reset_rsvds_bits_mask, PT32E_ROOT_LEVEL: the same bits)
PDPTE_RSVD = (1 << 63) | PAE_RSVD_HIGH | 0x1E0 | 0x6
PAE_ADDR = ((1 << MAXPHYADDR) - 1) & ~0xFFF
#: 2 MiB PAE leaf: bits 20:13 of the address field are MBZ
PAE_2M_RSVD = 0x1F_E000
#: 4 MiB 32-bit leaf (PSE-36 on AMD gives PA bits 39:32 in bits 20:13): bit 21 is MBZ
PSE_4M_RSVD = 1 << 21


def walk_legacy(cr3: int, va: int, access: int, user: bool, read_entry: Callable[[int], int],
                write_entry: Callable[[int, int], None], *, pae: bool, wp: bool = True, nxe: bool = False,
                pse: bool = False, smep: bool = False, set_ad: bool = True) -> WalkResult:
    """Walk a legacy-mode table for the 32-bit ``va``.

    ``read_entry(addr)`` / ``write_entry(addr, value)`` read and write one
    entry of the format's width (8 bytes with ``pae``, else 4).  Accessed bits
    are set on each PDE/PTE walked and Dirty on the leaf of a write; a PAE
    PDPTE has neither (§5.4.2)."""
    va &= 0xFFFF_FFFF
    fetch_id = access == 2 and ((nxe and pae) or smep)
    err_base = (_W if access == 1 else 0) | (_U if user else 0) | (_ID if fetch_id else 0)
    if pae:
        e = read_entry((cr3 & 0xFFFF_FFE0) + ((va >> 30) & 3) * 8)
        if not e & _P:
            return WalkResult(fault=err_base, entries=1)
        if e & PDPTE_RSVD:
            return WalkResult(fault=err_base | _P | _RSVD, entries=1)
        levels: tuple[tuple[int, int], ...] = ((2, 21), (1, 12))
        table, entries, index_mask, width = e & PAE_ADDR, 1, 0x1FF, 8
    else:
        levels, table, entries, index_mask, width = ((2, 22), (1, 12)), cr3 & 0xFFFF_F000, 0, 0x3FF, 4
    rsvd_nx = _NX if pae and not nxe else 0
    writable = user_ok = executable = True
    for level, shift in levels:
        ea = table + ((va >> shift) & index_mask) * width
        e = read_entry(ea)
        entries += 1
        if not e & _P:
            return WalkResult(fault=err_base, entries=entries)
        large = level == 2 and e & _PS and (pae or pse)
        if pae:
            bad = e & (PAE_RSVD_HIGH | rsvd_nx) or (large and e & PAE_2M_RSVD)
        else:
            bad = large and e & PSE_4M_RSVD
        if bad:
            return WalkResult(fault=err_base | _P | _RSVD, entries=entries)
        writable = writable and bool(e & _RW)
        user_ok = user_ok and bool(e & _US)
        if pae and nxe and e & _NX:
            executable = False
        if level == 1 or large:
            if denied(access, user, user_ok, writable, executable, wp, smep):
                return WalkResult(fault=err_base | _P, entries=entries)
            if set_ad:
                ne = e | _A | (_D if access == 1 else 0)
                if ne != e:
                    write_entry(ea, ne)
            if not large:
                size, base = 1 << 12, e & (PAE_ADDR if pae else 0xFFFF_F000)
            elif pae:
                size, base = 1 << 21, e & PAE_ADDR & ~0x1F_FFFF
            else:
                size, base = 1 << 22, (e & 0xFFC0_0000) | (((e >> 13) & 0xFF) << 32)
            return WalkResult(base | (va & (size - 1)), writable or (not user and not wp), user_ok, executable,
                              size, bool(e & _D) or access == 1, None, entries, bool(e & _G))
        if set_ad and not e & _A:
            write_entry(ea, e | _A)
        table = e & (PAE_ADDR if pae else 0xFFFF_F000)
    raise AssertionError("unreachable")
