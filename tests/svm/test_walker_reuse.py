"""The processor's walker kept from one VMRUN to the next.

Every VMRUN (and every fuzz case) drops the walker; the next fill keeps it
when the guest context it was built for is the current one and the nested
entries its caches rest on are unchanged, so the guest's table pages need no
nested walk through the general walker again.  A kept walker must walk
exactly as a new one: the same translations, the same faults, the same
reference counts, the same A/D bits in DRAM.  These tests run guests whose
hypervisor changes what a walk depends on between two VMRUNs, and a guest
whose runs are compared against the same runs with a new walker every time.
"""
from __future__ import annotations

import struct

from sandbox.memory.mmu import GuestLayer
from sandbox.svm.exitcodes import ExitCode
from sandbox.svm.fill import TlbFill

from conftest import BASE, DATA, capture, hc_exit, leaf_pte

DONE = 0x77
OTHER = DATA + 0x1000
PTE_ADDR = 0x000F_FFFF_FFFF_F000

#: 16 pages read, each after a CPUID round trip (a VMRUN each)
TOUCH_WITH_EXITS = """
    mov rsi, 0x150000
    mov r12d, 16
touch:
    mov rax, [rsi]
    cpuid
    add rsi, 0x1000
    dec r12d
    jnz touch
""" + hc_exit(DONE)


def _count_builds(monkeypatch) -> list:
    builds = []
    real = TlbFill.build_walker

    def counting(self, stats):
        builds.append(stats)
        return real(self, stats)
    monkeypatch.setattr(TlbFill, "build_walker", counting)
    return builds


def _run_touch(guest):
    m = guest(TOUCH_WITH_EXITS)

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        m.advance(e)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == DONE, (r.reason, r.detail)
    return m, r


def test_a_kept_walker_walks_as_a_new_one(guest, monkeypatch):
    """The same 17 VMRUNs with the walker kept, then with a new walker at each:
    the walk figures (24 references a walk, APM §15.25.5), the registers and
    every byte of DRAM (the A/D bits the walks set) are the same."""
    builds = _count_builds(monkeypatch)
    kept_m, kept = _run_touch(guest)
    assert len(builds) == 1                       # one walker for all the VMRUNs
    monkeypatch.setattr(GuestLayer, "tables_current", lambda self: False)
    builds.clear()
    new_m, new = _run_touch(guest)
    assert len(builds) == 16                      # one per VMRUN that walked (the first: code and data)
    assert kept.walk == new.walk and kept.walk["walks"] >= 17
    assert kept.walk["table_refs"] == 24 * kept.walk["walks"]
    assert kept.tlb == new.tlb and kept.regs == new.regs
    assert bytes(kept_m.mem.view) == bytes(new_m.mem.view)


def test_a_second_run_counts_into_its_own_figures(guest):
    """Each run's walk figures are its own (a new WalkStats per run): the kept
    walker counts into the new one."""
    m, first = _run_touch(guest)
    m.cpu.tlb.flush_all()
    m.guest.vmcb.RIP = BASE
    second = m.run(timeout=5)
    assert second.reason == "guest-exit"
    assert second.walk == first.walk


def _remap_then_read(guest, change, recs=None):
    """Read DATA, let the CPUID handler ``change(m)`` the guest's memory, read DATA
    again; NPF exits stop the run, recorded into ``recs``."""
    m = guest(f"mov rsi, {DATA:#x}\nmov rdx, [rsi]\ncpuid\nmov rcx, [rsi]\n" + hc_exit(DONE))
    if recs is not None:
        recs.append(capture(m, ExitCode.NPF))
    m.guest.write_phys(DATA, struct.pack("<Q", 0x1111))
    m.guest.write_phys(OTHER, struct.pack("<Q", 0x2222))

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        change(m)
        m.advance(e)
    return m.run(timeout=5)


def test_a_migrated_table_page_is_walked_where_it_went(guest):
    """The hypervisor moves the guest's leaf table page to another host page
    (the old one is scrubbed) and points DATA's leaf at OTHER in the copy: the
    read after the VMRUN walks the copy."""
    def change(m):
        pte = leaf_pte(m, DATA)
        new = m.guest.migrate_page(pte & ~0xFFF)          # TLB_CONTROL flushes the ASID at VMRUN
        e = m.mem.read_u64(new + (pte & 0xFFF))
        m.mem.write_u64(new + (pte & 0xFFF), (e & ~PTE_ADDR) | OTHER)
    r = _remap_then_read(guest, change)
    assert r.reason == "guest-exit" and r.exit_code == DONE, (r.reason, r.detail)
    assert (r.regs["rdx"], r.regs["rcx"]) == (0x1111, 0x2222)


def test_a_read_only_table_page_faults_the_next_walk(guest):
    """A guest table read is a nested user write (APM §15.25.6): once the leaf
    table page's nested entry is read-only, the next walk -- the code fetch
    after the VMRUN, whose TLB_CONTROL flushed the ASID -- takes #VMEXIT(NPF)
    with EXITINFO1 bit 33 (a guest table access) and P|W|U, EXITINFO2 the
    GPA of the table entry read (the code page's, in DATA's table page)."""
    ptes, recs = [], []

    def change(m):
        ptes.extend((leaf_pte(m, DATA), leaf_pte(m, BASE)))
        assert ptes[0] & ~0xFFF == ptes[1] & ~0xFFF
        m.guest.npt.protect(ptes[0] & ~0xFFF, write=False)   # TLB_CONTROL flushes the ASID at VMRUN
    r = _remap_then_read(guest, change, recs)
    assert r.reason == "captured", (r.reason, r.detail)
    assert [(x.code, x.info1, x.info2) for x in recs[0]] == [(ExitCode.NPF, (1 << 33) | 0b111, ptes[1])]
