"""IRET to an outer privilege level nulls the data segments the new CPL may not use
(APM vol. 3 "IRET": a data or non-conforming code segment whose DPL is below the new
CPL gets a null selector).  The family-17h AMD processor modelled keeps the hidden
base of a segment nulled so (what Zen 3 reports as NullSelectorClearsBase = 0; Linux's
X86_BUG_NULL_SEG), which matters for FS and GS; QEMU's TCG clears it.

The guest (conftest.user_guest) IRETQs from CPL 0 to CPL 3 with GS (and FS) holding
the loader's DPL-0 data selector and a base the test sets; the VMCB at the exit that
ends the run shows what the IRET left."""
from __future__ import annotations

import pytest

from conftest import USER_SS, assemble, hc_exit, install_reporting_idt, user_guest

from sandbox import Segment
from sandbox.svm.cpustate import R_FS, R_GS

DATA = 0x1C0000                          # conftest.DATA: a user-accessible page
GS_BASE, FS_BASE = DATA, DATA + 0x100
DS_SEL = 0x10                            # the loader's data segment: DPL 0


def load_fs_gs(sel: int) -> str:
    """CPL-0 code: FS and GS get selector ``sel``, then their bases by WRMSR."""
    return (f"mov ax, {sel:#x}\nmov fs, ax\nmov gs, ax\n"
            f"mov ecx, 0xC0000101\nmov eax, {GS_BASE:#x}\nxor edx, edx\nwrmsr\n"
            f"mov ecx, 0xC0000100\nmov eax, {FS_BASE:#x}\nxor edx, edx\nwrmsr\n")


#: CPL-3 code: R12 = GS's selector, R13 = FS's, R14 = the qword at GS:8, R15 = the qword at FS:8
READ_BACK = ("mov ax, gs\nmovzx r12d, ax\nmov ax, fs\nmovzx r13d, ax\n"
             "mov rax, qword ptr gs:[8]\nmov r14, rax\nmov rax, qword ptr fs:[8]\nmov r15, rax")


def run_user(guest, sel: int):
    m = user_guest(guest, READ_BACK, prelude=load_fs_gs(sel))
    m.guest.write_phys(GS_BASE + 8, (0x1111).to_bytes(8, "little"))
    m.guest.write_phys(FS_BASE + 8, (0x2222).to_bytes(8, "little"))
    r = m.run(timeout=20)
    assert r.exit_code == 0x55, (r.reason, r.detail, r.exit_code)
    return m.regs


def test_iret_to_cpl3_nulls_fs_and_gs_and_keeps_their_bases(guest):
    g = run_user(guest, DS_SEL)
    assert (g.r12, g.r13) == (0, 0)                   # nulled: DPL 0 data at CPL 3
    assert (g.r14, g.r15) == (0x1111, 0x2222)         # through the bases they kept


def test_a_segment_the_new_cpl_may_use_is_not_nulled(guest):
    g = run_user(guest, USER_SS)                      # DPL 3 data: usable at CPL 3
    assert (g.r12, g.r13) == (USER_SS, USER_SS)
    assert (g.r14, g.r15) == (0x1111, 0x2222)


@pytest.mark.parametrize("bad_cs,nt", [(0x0, False), (0x38 | 3, False), (0x10 | 3, False), (0x18 | 3, True)],
                         ids=["null", "beyond-gdt", "data-segment", "nt-set"])
def test_an_iret_that_faults_leaves_fs_and_gs_alone(guest, bad_cs, nt):
    # the frame's CS is not a usable code segment, or RFLAGS.NT asks for a task return
    # (#GP(0) in long mode): #GP at the IRETQ, no segment changes
    set_nt = "pushfq\nor qword ptr [rsp], 0x4000\npopfq\n" if nt else ""
    pre = load_fs_gs(DS_SEL) + set_nt + (f"push {USER_SS:#x}\npush 0x70000\npush 0x2\npush {bad_cs:#x}\n"
                                         "mov rax, 0x100000\npush rax\n")
    src = pre + "iretq\n" + hc_exit(0x55)
    m = guest(src)
    install_reporting_idt(m)
    m.guest.write_phys(0x1000, bytes.fromhex("0000000000000000" "ffff0000009baf00" "ffff00000093cf00"
                                             "ffff000000fbaf00" "ffff000000f3cf00"))
    m.guest.vmcb.set_seg("GDTR", Segment(0, 0, 5 * 8 - 1, 0x1000))
    r = m.run(timeout=20)
    assert r.exit_code == 0x100 + 13, (r.reason, r.detail, r.exit_code)
    assert m.regs.rdx == 0x100000 + len(assemble(pre))          # the IRETQ faulted
    st = m.cpu.st                                               # FS and GS are VMSAVE's, not #VMEXIT's
    assert st.seg(R_GS)[:2] == (DS_SEL, GS_BASE)
    assert st.seg(R_FS)[:2] == (DS_SEL, FS_BASE)
