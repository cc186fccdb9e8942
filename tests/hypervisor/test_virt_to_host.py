"""Guest-virtual accesses the hypervisor makes on the guest's behalf.

``Machine.virt_to_host`` (string I/O, ``read_virt``/``write_virt``, handlers)
translates through the guest's tables and the nested tables as a supervisor
access.  It is no memory reference of the processor's, so the processor's walk
counters do not move, and it sets Accessed/Dirty bits only when asked
(``set_ad``: a write the hypervisor emulates for the guest).

The reference is the general 2-D walker built fresh for each access (its
counts going to a throw-away ``WalkStats``); the leaf entries are read back
from guest memory and decoded by hand (APM vol. 2 §5.3: bit 5 Accessed, bit 6
Dirty).
"""
from __future__ import annotations

import struct

import pytest

from conftest import BASE, DATA, hc_exit, leaf_pte
from sandbox.memory.mmu import GuestGP, GuestPageFault, NestedFault, WalkStats
from sandbox.memory.paging import Access
from sandbox.svm.exitcodes import ExitCode

A_BIT, D_BIT = 1 << 5, 1 << 6
ADDR = 0x000F_FFFF_FFFF_F000

SRC = f"""
    mov rax, 0x1234
    mov [{DATA:#x}], rax
    mov rax, [{DATA + 0x1000:#x}]
{hc_exit(0)}
"""


def _outcome(fn):
    try:
        return fn()
    except (GuestPageFault, NestedFault, GuestGP) as f:
        return type(f).__name__


def _at_exit(guest, body):
    """Run SRC and call ``body(m)`` in the handler of its VMMCALL."""
    m = guest(SRC)
    seen = []

    def h(m, e):
        seen.append(body(m))
        return m.stop("done")
    m.on(ExitCode.VMMCALL)(h)
    m.run(timeout=10)
    assert seen, "the guest never reached its VMMCALL"
    return seen[0]


def test_each_access_is_the_general_walk_and_counts_nothing(guest):
    gvas = [BASE, BASE + 0x123, DATA, DATA + 0x1008, DATA + 0x2FFF, 0x90000 - 8, 0x1000,
            16 << 20, (16 << 20) + 0x2000, 1 << 40, 0x8000_0000_0000, 0xFFFF_8000_0000_0000]

    def body(m):
        rows = []
        for gva in gvas:
            for access in (Access.READ, Access.WRITE):
                before = vars(m.cpu.stats).copy()
                got = _outcome(lambda: m.virt_to_host(gva, access))
                after = vars(m.cpu.stats).copy()
                ref = _outcome(lambda: m.cpu.walker(WalkStats()).translate(gva, access, False, set_ad=False).hpa)
                rows.append((gva, access, got, ref, before == after))
        return rows
    rows = _at_exit(guest, body)
    for gva, access, got, ref, uncounted in rows:
        assert got == ref, (hex(gva), access, got, ref)
        assert uncounted, f"virt_to_host({gva:#x}) moved the processor's walk counters"
    assert sum(isinstance(r[2], int) for r in rows) >= 12      # mapped addresses were among them
    assert sum(isinstance(r[2], str) for r in rows) >= 6       # and faulting ones


def test_accessed_and_dirty_are_set_only_when_asked(guest):
    page_r, page_w = DATA + 0x3000, DATA + 0x4000          # pages the guest never touches

    def body(m):
        slots = {p: leaf_pte(m, p) for p in (page_r, page_w)}
        for slot in slots.values():
            e = struct.unpack("<Q", m.guest.read_phys(slot, 8))[0]
            m.guest.write_phys(slot, struct.pack("<Q", e & ~(A_BIT | D_BIT)))
        m.virt_to_host(page_r + 8, Access.READ)
        m.virt_to_host(page_r + 8, Access.WRITE)
        m.write_virt(page_w + 16, b"\xAA")
        return {p: struct.unpack("<Q", m.guest.read_phys(s, 8))[0] for p, s in slots.items()}
    e = _at_exit(guest, body)
    assert e[page_r] & (A_BIT | D_BIT) == 0, "a read with set_ad=False set an Accessed/Dirty bit"
    assert e[page_w] & (A_BIT | D_BIT) == A_BIT | D_BIT, "an emulated write left Accessed/Dirty clear"


@pytest.mark.parametrize("warm", [False, True])
def test_a_guest_table_page_remapped_in_the_nested_tables_is_followed(guest, warm):
    """A handler moves the guest's leaf table page for DATA to another host page
    by writing the nested entry directly (no notification): the next access
    reads the table where it now is."""
    other = DATA + 0x6000

    def body(m):
        if warm:
            m.virt_to_host(DATA, Access.READ)     # the walker's caches know the table page
        slot = leaf_pte(m, DATA)
        table_gpa = slot & ~0xFFF
        copy = bytearray(m.guest.read_phys(table_gpa, 0x1000))
        i = slot & 0xFFF
        e = struct.unpack_from("<Q", copy, i)[0]
        struct.pack_into("<Q", copy, i, (e & ~ADDR) | other)     # DATA's entry now names `other`
        spare = m.mem.alloc_page()
        m.mem.write(spare, bytes(copy))
        n_slot = m.guest.npt.entry_addr(table_gpa)
        ne = m.mem.read_u64(n_slot)
        m.mem.write_u64(n_slot, (ne & ~ADDR) | spare)
        return m.virt_to_host(DATA + 0x10, Access.READ), m.guest.gpa_to_hpa(other) + 0x10
    got, want = _at_exit(guest, body)
    assert got == want
