"""A processor built without a feature (``Machine(without=...)``, ``sandbox run
--without``), as QEMU's ``-cpu max,-rdtscp``: the feature's CPUID bit reads 0,
its instructions raise #UD even with their intercept armed (a processor that
does not know an instruction has nothing to intercept), and the CR4 bit it owns
is reserved.  The CPUID bit positions are the APM's (vol. 3 Appendix E:
Fn8000_0001_EDX[27] RDTSCP, Fn0000_0001_ECX[26] XSAVE, Fn0000_0007_EBX[10]
INVPCID, Fn8000_0008_EBX[4] RDPRU, Fn8000_0001_ECX[12] SKINIT)."""
from __future__ import annotations

import pytest

from conftest import capture, db, hc_exit
from sandbox import Machine

CPUID, RDTSCP, INVPCID, RDPRU, EXCP_UD, EXCP_GP = 0x72, 0x87, 0xA2, 0x8E, 0x46, 0x4D
DONE = 0x55


def cpuid_then(leaf: int, insn: str) -> str:
    """CPUID ``leaf`` (subleaf 0) into R12..R15 (EAX, EBX, ECX, EDX), then ``insn``."""
    return f"""
    mov eax, {leaf:#x}
    xor ecx, ecx
    cpuid
    mov r12d, eax
    mov r13d, ebx
    mov r14d, ecx
    mov r15d, edx
    {insn}
""" + hc_exit(DONE)


@pytest.fixture
def built(tmp_path):
    """``built(src, without, arm)`` -> (machine, first captured exit, run result)."""
    n = [0]

    def make(src: str, without=(), arm=(), stop_at=(RDTSCP, INVPCID, RDPRU, EXCP_UD, EXCP_GP), disarm=()):
        n[0] += 1
        p = tmp_path / f"f{n[0]}.S"
        p.write_text(src)
        m = Machine(dram=32 << 20, ram=8 << 20, without=without)
        m.load(str(p))
        m.intercept(list(arm))
        m.intercept(list(disarm), on=False)
        exits = capture(m, *stop_at)
        r = m.run(timeout=30)
        return m, (exits[0] if exits else None), r
    return make


@pytest.mark.parametrize("name,leaf,reg,bit,insn,code,arm", [
    ("rdtscp", 0x8000_0001, "r15", 27, "rdtscp", RDTSCP, "rdtscp"),
    ("invpcid", 7, "r13", 10, "xor eax, eax\n    invpcid rax, [rsp]", INVPCID, "invpcid"),
    ("rdpru", 0x8000_0008, "r13", 4, "xor ecx, ecx\n    " + db(b"\x0f\x01\xfd"), RDPRU, "rdpru"),
])
def test_without_a_feature_its_instruction_is_ud_before_its_intercept(built, name, leaf, reg, bit, insn, code, arm):
    src = cpuid_then(leaf, insn)
    m, e, _ = built(src, arm=[arm, "excp6"])
    assert e is not None and e.code == code               # the processor has it: the intercept fires
    m, e, _ = built(src, without=[name], arm=[arm, "excp6"])
    assert e is not None and e.code == EXCP_UD            # it does not: #UD, and the #UD intercept takes it
    assert getattr(m.regs, reg) >> bit & 1 == 0           # and CPUID says so (as it always did for
                                                          # INVPCID and RDPRU: the #UD is what changed)


def test_rdtscp_bit_reads_one_on_the_full_processor(built):
    m, e, r = built(cpuid_then(0x8000_0001, "nop"))
    assert e is None and r.exit_code == DONE
    assert m.regs.r15 >> 27 & 1 == 1


def test_without_xsave_cpuid_clears_it_and_cr4_osxsave_is_reserved(built):
    set_osxsave = "mov rax, cr4\n    bts rax, 18\n    mov cr4, rax\n    mov rbx, cr4"
    m, e, r = built(cpuid_then(1, set_osxsave), arm=["excp13"])
    assert e is None and r.exit_code == DONE and m.regs.rbx >> 18 & 1     # the full processor takes it
    assert m.regs.r14 >> 26 & 1 == 1
    m, e, r = built(cpuid_then(1, set_osxsave), without=["xsave"], arm=["excp13"])
    assert e is not None and e.code == EXCP_GP and e.info1 == 0          # a reserved CR4 bit: #GP(0)
    assert m.regs.r14 >> 26 & 1 == 0


def test_without_xsave_xsetbv_is_ud_with_its_intercept_armed(built):
    # CR4.OSXSAVE cannot be set, so XSETBV is #UD; the armed XSETBV intercept must not fire
    _, e, _ = built(cpuid_then(1, "xor ecx, ecx\n    mov eax, 1\n    xor edx, edx\n    xsetbv"),
                    without=["xsave"], arm=["xsetbv", "excp6"], stop_at=(0x8D, EXCP_UD))
    assert e is not None and e.code == EXCP_UD


@pytest.mark.parametrize("name,leaf,reg,bit", [("rdtscp", 0x8000_0001, "r15", 27), ("xsave", 1, "r14", 26)])
def test_without_a_feature_the_processors_own_cpuid_drops_it(built, name, leaf, reg, bit):
    """CPUID not intercepted is answered by the processor itself (Unicorn's CPU model
    reports RDTSCP and XSAVE): taking the feature away clears it there too."""
    src = cpuid_then(leaf, "nop")
    m, _, r = built(src, disarm=["cpuid"])
    assert r.exit_code == DONE and CPUID not in r.counts
    assert getattr(m.regs, reg) >> bit & 1 == 1
    m, _, r = built(src, without=[name], disarm=["cpuid"])
    assert r.exit_code == DONE and CPUID not in r.counts
    assert getattr(m.regs, reg) >> bit & 1 == 0


def test_skinit_is_accepted_and_stays_an_svm_instruction(built):
    """``skinit`` is accepted for QEMU's -cpu syntax; it changes nothing this processor shows
    (its CPUID never reports SKINIT), and with EFER.SVME = 1 SKINIT stays an SVM instruction
    whatever the bit says (APM vol. 3 SKINIT): its intercept fires."""
    m, e, _ = built(cpuid_then(0x8000_0001, "mov eax, 0x100000\n    " + db(b"\x0f\x01\xde")), without=["skinit"],
                    arm=["skinit", "excp6"], stop_at=(0x86, EXCP_UD))
    assert e is not None and e.code == 0x86
    assert m.regs.r14 >> 12 & 1 == 0


def test_unknown_feature_is_refused():
    with pytest.raises(ValueError, match="unknown CPU feature 'avx9'"):
        Machine(dram=32 << 20, ram=8 << 20, without=["avx9"])


@pytest.mark.parametrize("without,invalid", [((), False), (("xsave",), True)])
def test_vmrun_refuses_cr4_osxsave_on_a_processor_without_xsave(tmp_path, without, invalid):
    """CR4.OSXSAVE is MBZ on a processor without XSAVE: a VMCB with it set is
    VMEXIT_INVALID (APM §15.5.1, "any MBZ bit of CR4 is set")."""
    p = tmp_path / "g.S"
    p.write_text(hc_exit(DONE))
    m = Machine(dram=32 << 20, ram=8 << 20, without=without)
    m.load(str(p))
    m.guest.vmcb.CR4 |= 1 << 18
    r = m.run(timeout=10)
    assert (r.reason == "invalid-vmcb") is invalid, (r.reason, r.detail)
    if invalid:
        assert m.guest.vmcb.EXITCODE == (1 << 64) - 1 and "CR4" in r.detail


def test_features_given_as_one_string():
    assert Machine(dram=32 << 20, ram=8 << 20, without="rdtscp,xsave").cpu.features_removed == {"rdtscp", "xsave"}


@pytest.mark.parametrize("insn", ["rdmsr", "wrmsr"])
@pytest.mark.parametrize("intercepted", [False, True])
def test_without_rdtscp_tsc_aux_is_gone(built, insn, intercepted):
    """TSC_AUX (C000_0103h) exists with RDTSCP or RDPID (APM vol. 2 §13.2.4; this processor
    has no RDPID): without RDTSCP, RDMSR and WRMSR of it are #GP(0) -- on the processor when
    the MSR is not intercepted, and from the hypervisor's MSR handler when it is (as KVM)."""
    src = f"mov ecx, 0xc0000103\n    mov eax, 0x1234\n    xor edx, edx\n    {insn}\n" + hc_exit(DONE)
    arm = ["excp13"] + (["msr"] if intercepted else [])
    m, e, r = built(src, arm=arm, stop_at=(EXCP_GP,))
    assert e is None and r.exit_code == DONE, (r.reason, r.detail)     # the full processor has it
    m, e, r = built(src, without=["rdtscp"], arm=arm, stop_at=(EXCP_GP,))
    assert e is not None and e.code == EXCP_GP and e.info1 == 0 and e.rip == 0x10000C
    # intercepted: the MSR exit first, then the #GP(0) the hypervisor injected, taken by the
    # #GP intercept; not intercepted: the processor's own #GP(0) at the instruction
    assert r.counts.get(0x7C, 0) == (1 if intercepted else 0)
