"""The TLB a harness keeps from one case to the next (snapshot.Harness._tlb_good).

The harness keeps the ASID-tagged TLB across cases only while it holds nothing
but the snapshot's own translations -- a state a processor may be in whenever
those tables are current (APM vol. 2 §5.5.3, "Speculative Caching of Address
Translations": a TLB entry for any linear address the tables map validly).

* A case that edits a PTE, uses it and puts it back leaves equal bytes but a
  TLB entry made from the edit, which no invalidation dropped (§5.5.3).  The
  next case must not see it: it reads what the snapshot's tables map.
* A case that edits its paging structures without an invalidation gets the old
  or the new translation unpredictably (§5.5.3, "Invalidation of Table Entry
  Upgrades"): its end may depend on what the TLB held when it began, on a real
  processor too.  The counting oracle compares such a case from an empty TLB on
  both sides and reports nothing for that dependence alone (seed 2's case 9,667:
  PML4[0].P cleared, then a data page one machine's TLB held).
"""
import struct

from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from sandbox.fuzz.case import CODE_BASE, Case, VmcbConfig
from sandbox.fuzz.generate import TERMINATOR
from sandbox.fuzz.snapshot import Harness
from sandbox.fuzz.uncounted import UncountedReference
from sandbox.hypervisor.image import PT_BASE

PF_BIT = 14                         # exception word: #PF intercept (exit code 0x4E)
SHUTDOWN_BIT = 31                   # misc1 word: SHUTDOWN intercept
X, Y = 0x1C1000, 0x1C2000           # two scratch data pages (identity mapped, zero in the snapshot)
_KS = Ks(KS_ARCH_X86, KS_MODE_64)


def _asm(text: str, at: int = CODE_BASE) -> bytes:
    return bytes(_KS.asm(text, at)[0])


def _cfg(*misc1_bits: int) -> VmcbConfig:
    misc1 = 1 << SHUTDOWN_BIT
    for b in misc1_bits:
        misc1 |= 1 << b
    return VmcbConfig(intercepts=[0, 0, 1 << PF_BIT, misc1, 0b11, 0])   # + VMRUN, VMMCALL


def _pte(h: Harness, va: int) -> int:
    """The guest-physical address of ``va``'s PTE in the snapshot's tables."""
    rd = lambda a: struct.unpack("<Q", h.m.guest.read_phys(a, 8))[0]     # noqa: E731
    t = PT_BASE
    for shift in (39, 30, 21):
        t = rd(t + 8 * (va >> shift & 511)) & 0x000F_FFFF_FFFF_F000
    return t + 8 * (va >> 12 & 511)


def _ends(out) -> list:
    return [(int(e.exitcode), e.rip, e.exitinfo1, e.exitinfo2) for e in out.exits]


def test_a_pte_edited_and_put_back_does_not_reach_the_next_case():
    h = Harness()
    pte = _pte(h, X)
    # A: map X to Y's frame, read through it (a TLB entry X -> Y), put the PTE back; no INVLPG
    a = Case(_asm(f"mov rsi, {pte:#x}; mov rdi, {X:#x}; mov rax, [rsi]; lea rbx, [rax + 0x1000]; "
                  "mov [rsi], rbx; mov rcx, [rdi]; mov [rsi], rax") + TERMINATOR, 0, _cfg(), {}, "hand")
    # B: a marker into Y, then read X: the snapshot's PTE maps X to X, whose bytes are zero (§5.3)
    b = Case(_asm(f"mov rsi, {Y:#x}; mov rdi, {X:#x}; mov qword ptr [rsi], 0x5a5a; mov rcx, [rdi]")
             + TERMINATOR, 0, _cfg(), {}, "hand")
    fresh = Harness().run(b, audit=False)
    assert fresh.result.regs["rcx"] == 0
    out_a = h.run(a, audit=False)
    assert out_a.result.reason == "guest-exit" and out_a.wrote_tables
    out_b = h.run(b, audit=False)
    assert out_b.result.regs["rcx"] == 0, "the next case read through the previous case's stale entry"
    assert _ends(out_b) == _ends(fresh)


def _clears_pml4_present() -> Case:
    """PML4[0].P cleared with no invalidation, then a read of X (APM §5.5.3: old or new entry)."""
    code = _asm(f"mov rdx, {PT_BASE:#x}; xor byte ptr [rdx], 1; mov rdi, {X:#x}; mov rcx, [rdi]") + TERMINATOR
    return Case(code, 0, _cfg(), {}, "hand")


def _reads_x() -> Case:
    return Case(_asm(f"mov rdi, {X:#x}; mov rcx, [rdi]") + TERMINATOR, 0, _cfg(), {}, "hand")


def test_a_case_editing_its_tables_may_end_either_way():
    case = _clears_pml4_present()
    fresh = Harness().run(case, audit=False)
    # an empty TLB: the read walks the edited tables -- #PF, error code 0 (not present,
    # read, supervisor), CR2 = X (§8.4.2)
    pf = [e for e in fresh.exits if int(e.exitcode) == 0x4E]
    assert pf and (pf[0].exitinfo1, pf[0].exitinfo2) == (0, X)
    warm = Harness()
    warm.run(_reads_x(), audit=False)          # leaves the snapshot's translation of X in the TLB
    out = warm.run(case, audit=False)
    # the old entry is used: the read succeeds and the case reaches its VMMCALL
    assert out.result.reason == "guest-exit" and out.wrote_tables
    # both are allowed: the counting oracle reports nothing (before: a "history" finding)
    assert UncountedReference().compare(case, out) == []

