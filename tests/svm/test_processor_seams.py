"""The processor's public seams and its cached walker.

The walker the processor builds at VMRUN holds the guest's CR0/CR3/CR4/EFER;
a guest MOV CR3 to tables that map the same VA elsewhere must be seen by the
very next access (APM vol. 2 §5.5.2: only global translations survive a MOV
CR3).  The seams are what tools outside the processor use: a fill observer,
resets of the translation caches, the decision function, and the original
exception of an internal error.
"""
from __future__ import annotations

import struct

import pytest

from unicorn import UC_MEM_FETCH, UC_PROT_EXEC

from sandbox.svm.exitcodes import ExitCode
from sandbox.svm.stop import StopReason

from conftest import BASE, DATA, assemble, hc_exit, install_reporting_idt, leaf_pte

DONE = 0x77
NEW_TABLES = 0x1D0000        # four free guest pages for a second paging hierarchy
OTHER = DATA + 0x1000        # where the second hierarchy maps DATA
PTE_ADDR = 0x000F_FFFF_FFFF_F000
G_BIT = 1 << 8


def _second_hierarchy(m) -> int:
    """Copy the guest's tables along DATA's path to NEW_TABLES, with DATA's leaf
    pointing at OTHER (and not global); returns the new CR3."""
    g = m.guest
    table = g.vmcb.CR3 & PTE_ADDR
    new = [NEW_TABLES + i * 0x1000 for i in range(4)]
    for level, shift in enumerate((39, 30, 21, 12)):
        page = bytearray(g.read_phys(table, 0x1000))
        idx = (DATA >> shift) & 0x1FF
        e = struct.unpack_from("<Q", page, idx * 8)[0]
        assert e & 1 and not (shift > 12 and e & 0x80), "a 4 KiB path is expected"
        if shift == 12:
            struct.pack_into("<Q", page, idx * 8, (e & ~PTE_ADDR & ~G_BIT) | OTHER)
        else:
            struct.pack_into("<Q", page, idx * 8, (e & ~PTE_ADDR) | new[level + 1])
        g.write_phys(new[level], bytes(page))
        table = e & PTE_ADDR
    return new[0]


def test_mov_cr3_switches_the_walk(guest):
    """The same VA read before and after a guest MOV CR3 comes from each hierarchy's page."""
    src = (f"mov rsi, {DATA:#x}\nmov rdx, [rsi]\nmov rbx, {NEW_TABLES:#x}\nmov cr3, rbx\n"
           f"mov rcx, [rsi]\n" + hc_exit(DONE))
    m = guest(src)
    m.guest.write_phys(DATA, struct.pack("<Q", 0x1111))
    m.guest.write_phys(OTHER, struct.pack("<Q", 0x2222))
    assert _second_hierarchy(m) == NEW_TABLES
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == DONE, (r.reason, r.detail)
    assert (r.regs["rdx"], r.regs["rcx"]) == (0x1111, 0x2222)


def test_fill_observer_sees_the_code_fetch(guest):
    m = guest(hc_exit(DONE))
    fills = []
    m.cpu.add_fill_observer(lambda gva, access, hpa, perms: fills.append((gva, access, hpa, perms)))
    r = m.run(timeout=5)
    assert r.reason == "guest-exit"
    code_hpa = m.guest.ram[BASE & ~0xFFF]
    assert (BASE & ~0xFFF, UC_MEM_FETCH, code_hpa) in [(g, a, h) for g, a, h, _ in fills]
    assert all(p & UC_PROT_EXEC for g, a, h, p in fills if a == UC_MEM_FETCH)


def test_shed_hooks_then_rescan(guest):
    """After shedding every candidate hook, the next run scans again and still intercepts."""
    m = guest("cpuid\n" + hc_exit(DONE))
    seen = []

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        seen.append(e.rip)
        m.advance(e)
    assert m.run(timeout=5).reason == "guest-exit"
    assert m.cpu.candidate_hook_count > 0
    assert m.cpu.shed_candidate_hooks() > 0 and m.cpu.candidate_hook_count == 0
    m.guest.vmcb.RIP = BASE
    assert m.run(timeout=5).reason == "guest-exit"
    assert seen == [BASE, BASE] and m.cpu.candidate_hook_count > 0


def test_decide_is_replaceable(guest):
    m = guest("cpuid\n" + hc_exit(DONE))
    m.cpu.decide = lambda insn, view, rip, code: None       # nothing exits
    m.cpu.reset_translation_caches()
    r = m.run(timeout=5, max_insns=1000)
    assert ExitCode.CPUID not in r.counts


def test_internal_error_keeps_its_exception(guest):
    m = guest("cpuid\n" + hc_exit(DONE))
    boom = RuntimeError("decision failed")

    def bad(insn, view, rip, code):
        raise boom
    m.cpu.decide = bad
    r = m.run(timeout=5)
    assert r.reason == StopReason.ERROR and "internal error" in r.detail
    assert r.error is boom


def test_wrmsr_efer_nxe_reaches_the_walk(guest):
    """A WRMSR clearing EFER.NXE that the VMCB does not intercept: the NX bit of
    DATA's PTE is then reserved, so the next walk to DATA takes #PF with RSVD
    (APM vol. 2 §5.3.3) although the walker was built while NXE was set."""
    src = (f"mov ecx, 0xC0000080\nrdmsr\nand eax, ~0x800\nwrmsr\nmov rsi, {DATA:#x}\nmov rdx, [rsi]\n"
           + hc_exit(DONE))
    m = guest(src)
    install_reporting_idt(m)
    m.intercept("msr", on=False)
    pte = leaf_pte(m, DATA)
    e = struct.unpack("<Q", m.guest.read_phys(pte, 8))[0]
    m.guest.write_phys(pte, struct.pack("<Q", e | (1 << 63)))
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 0x100 + 14, (r.reason, r.detail, r.exit_code)
    assert r.regs["rsi"] & 0x8 and r.regs["r8"] == DATA       # error code RSVD; CR2


@pytest.mark.parametrize("by_page", [True, False], ids=["by-page", "full-flush"])
def test_reset_drops_blocks_of_code_rewritten_behind_the_processor(guest, monkeypatch, by_page):
    """A tool that rewrites guest code straight into DRAM (the fuzzer's snapshot
    harness does, for every case) and resets the translation caches runs the new
    code: the reset drops the translated blocks of every page fetched since the
    last flush (QEMU's tb_invalidate_phys_range on host-physical pages), or
    flushes them all."""
    from sandbox.svm import scanner
    if not by_page:
        monkeypatch.setattr(scanner, "_TB_PAGES_MAX", -1)
    m = guest("mov ebx, 1\n" + hc_exit(DONE))
    # every run with an instruction budget, as the fuzzer's: Unicorn flushes every
    # block itself when a run without a budget follows one with a budget
    for _ in range(2):      # the first entry's blocks are built under other flags than a re-entry's
        m.guest.vmcb.RIP = BASE
        r = m.run(timeout=5, max_insns=1000)
        assert r.reason == "guest-exit" and r.regs["rbx"] == 1
    hpa = m.guest.ram[BASE & ~0xFFF] + (BASE & 0xFFF)
    new = assemble("mov ebx, 2\n")
    assert len(new) == len(assemble("mov ebx, 1\n"))
    m.mem.raw[hpa:hpa + len(new)] = new
    m.guest.vmcb.RIP = BASE
    # without a reset, the old block still runs (else this test would prove nothing)
    r = m.run(timeout=5, max_insns=1000)
    assert r.reason == "guest-exit" and r.regs["rbx"] == 1
    m.cpu.reset_translation_caches()
    m.guest.vmcb.RIP = BASE
    r = m.run(timeout=5, max_insns=1000)
    assert r.reason == "guest-exit" and r.regs["rbx"] == 2


def test_flush_soft_tlb_makes_the_next_access_fill_again():
    """engine.flush_soft_tlb empties Unicorn's soft TLB: the next fetch of a page it
    held comes back to the TLB-fill hook (and without the flush, it does not)."""
    import ctypes
    import mmap

    from unicorn import UC_ARCH_X86, UC_HOOK_TLB_FILL, UC_MODE_64, UC_PROT_ALL, UC_TLB_VIRTUAL, Uc

    from sandbox.svm import engine
    buf = mmap.mmap(-1, 0x4000)
    buf[0x1000:0x1001] = b"\xf4"                     # hlt: ends emu_start
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map_ptr(0, 0x4000, UC_PROT_ALL, ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    fills = []

    def fill(uc, vaddr, access, entry, ud):
        fills.append(vaddr)
        entry.paddr, entry.perms = vaddr, UC_PROT_ALL
        return True
    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    uc.emu_start(0x1000, 0x2000)
    n = len(fills)
    assert n >= 1
    uc.emu_start(0x1000, 0x2000)
    assert len(fills) == n                           # still in the soft TLB
    engine.flush_soft_tlb(uc)
    uc.emu_start(0x1000, 0x2000)
    assert len(fills) > n
