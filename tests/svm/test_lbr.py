"""Control-transfer recording (APM vol. 2 §13.1.1.9) and LBR virtualization (§15.23).

While DebugCtl (MSR 1D9h) bit 0 is set the processor keeps the source and target of
the last taken branch in LastBranchFromIP/ToIP (1DBh/1DCh); an exception or
interrupt moves that record to LastExceptionFromIP/ToIP (1DDh/1DEh) and records
itself; a #DB clears DebugCtl.LBR and is not recorded.  With VMCB 0B8h bit 0 the
guest's five registers come from and go back to the VMCB (DBGCTL 670h ...
LASTEXCPTO 690h) and the host's are kept apart.  QEMU's TCG records nothing.

Every expected address is a label of the guest's own code, located by assembling
the same source (keystone), so the expectations follow from the rule above."""
from __future__ import annotations

import struct

import pytest

from conftest import BASE, STUB_SIZE, STUBS, VMMCALL, assemble, hc_exit, install_reporting_idt, user_guest, wrmsr

from unicorn.x86_const import UC_X86_REG_DR6

from sandbox import Segment

DEBUGCTL, FROM, TO, EX_FROM, EX_TO = 0x1D9, 0x1DB, 0x1DC, 0x1DD, 0x1DE
DONE = 0x55


def read_records() -> str:
    """LBR off, then R8..R12 = DebugCtl, LastBranchFrom/To, LastExceptionFrom/To."""
    return (wrmsr(DEBUGCTL, 0) + "".join(f"mov ecx, {m:#x}\nrdmsr\nshl rdx, 32\nor rax, rdx\nmov {r}, rax\n"
                                         for m, r in ((DEBUGCTL, "r8"), (FROM, "r9"), (TO, "r10"),
                                                      (EX_FROM, "r11"), (EX_TO, "r12"))))


def label(src: str, name: str) -> int:
    """The address of ``name:`` in ``src`` assembled at BASE (the assembler's own
    value of the symbol, emitted after the code)."""
    return int.from_bytes(assemble(f"{src}\n.quad {name}\n")[-8:], "little")


def run(guest, body: str, intercept_msrs: bool):
    src = body + read_records() + hc_exit(DONE)
    m = guest(src)
    if intercept_msrs:
        m.intercept("msr")          # the hypervisor's handler passes these MSRs to the processor
    r = m.run(timeout=20)
    assert r.reason == "guest-exit" and r.exit_code == DONE, (r.reason, r.detail, r.exit_code)
    g = m.regs
    return src, (g.r8, g.r9, g.r10, g.r11, g.r12), m


BOTH = pytest.mark.parametrize("intercept_msrs", [False, True], ids=["native", "intercepted"])


@BOTH
def test_a_jump_is_recorded(guest, intercept_msrs):
    body = wrmsr(DEBUGCTL, 1) + "\nsrc:\njmp dst\nnop\nnop\ndst:\nnop\n"
    src, (dbg, frm, to, _, _), _ = run(guest, body, intercept_msrs)
    assert dbg == 0                               # read after clearing it
    assert (frm, to) == (label(src, "src"), label(src, "dst"))


@BOTH
def test_nothing_recorded_without_lbr(guest, intercept_msrs):
    _, regs, m = run(guest, "jmp skip\nnop\nskip:\nnop\n", intercept_msrs)
    assert regs == (0, 0, 0, 0, 0)
    assert m.cpu.branch_records.clear


def test_a_jcc_not_taken_leaves_the_last_taken_branch(guest):
    body = wrmsr(DEBUGCTL, 1) + "\nsrc:\njmp dst\nnop\ndst:\nxor eax, eax\njnz away\nnop\naway:\nnop\n"
    src, (_, frm, to, _, _), _ = run(guest, body, False)
    assert (frm, to) == (label(src, "src"), label(src, "dst"))


@pytest.mark.parametrize("zf,taken", [(1, True), (0, False)])
def test_a_jcc_to_the_next_instruction_is_recorded_when_taken(guest, zf, taken):
    # target == fall-through: only the condition tells a taken branch from one not taken
    setz = "xor eax, eax" if zf else "mov eax, 1\ntest eax, eax"
    body = wrmsr(DEBUGCTL, 1) + f"\nsrc:\njmp dst\ndst:\n{setz}\njcc:\nje next\nnext:\nnop\n"
    src, (_, frm, to, _, _), _ = run(guest, body, False)
    if taken:
        assert (frm, to) == (label(src, "jcc"), label(src, "next"))
    else:
        assert (frm, to) == (label(src, "src"), label(src, "dst"))


def test_loop_records_its_last_taken_iteration(guest):
    # RCX = 3: LOOP is taken twice (RCX 2, 1) and falls through at 0
    body = "mov ecx, 3\nmov r15, rcx\n" + wrmsr(DEBUGCTL, 1) + "mov rcx, r15\ntop:\nnop\nlp:\nloop top\nnop\n"
    src, (_, frm, to, _, _), _ = run(guest, body, False)
    assert (frm, to) == (label(src, "lp"), label(src, "top"))


def test_call_then_ret_records_the_return(guest):
    # CALL f, f RETs, the JMP skips over f: the JMP is the last branch, the RET the one before
    body = wrmsr(DEBUGCTL, 1) + "call f\nback:\nnop\nj:\njmp over\nf:\nnop\nr:\nret\nover:\nnop\n"
    src, (_, frm, to, _, _), _ = run(guest, body, False)
    assert (frm, to) == (label(src, "j"), label(src, "over"))
    body = wrmsr(DEBUGCTL, 1) + "call f\nback:\n" + wrmsr(DEBUGCTL, 0) + "jmp over\nf:\nnop\nr:\nret\nover:\nnop\n"
    src, (_, frm, to, _, _), _ = run(guest, body, False)
    # the RET is the last branch: from the RET to the instruction after the CALL
    assert (frm, to) == (label(src, "r"), label(src, "back"))


def test_exception_moves_the_branch_record_and_records_itself(guest):
    body = wrmsr(DEBUGCTL, 1) + "src:\njmp dst\nnop\ndst:\nbp:\nint3\n"
    m = guest(body + hc_exit(DONE))
    install_reporting_idt(m)
    r = m.run(timeout=20)
    assert r.exit_code == 0x100 + 3, (r.reason, r.detail, r.exit_code)
    lbr = m.cpu.branch_records
    src = body
    assert (lbr.ex_from, lbr.ex_to) == (label(src, "src"), label(src, "dst"))   # the branch before it
    assert (lbr.br_from, lbr.br_to) == (label(src, "bp"), STUBS + 3 * STUB_SIZE)  # INT3 to its handler
    assert lbr.dbgctl == 1


def test_an_interrupt_taken_at_a_branch_does_not_record_it(guest):
    # STI's shadow ends at the NOP; the pending virtual interrupt is taken at the JMP
    # after it, which has not run: LastException* keeps the branch before, and the
    # interrupt is recorded from the JMP to its handler
    body = wrmsr(DEBUGCTL, 1) + "src:\njmp dst\nnop\ndst:\nsti\nnop\njx:\njmp after\nnop\nafter:\nnop\n"
    m = guest(body + hc_exit(DONE))
    install_reporting_idt(m)
    v = m.guest.vmcb
    v.V_INTR = (1 << 8) | (1 << 24) | (0xF << 16)          # V_IRQ, V_INTR_MASKING, priority 15
    v.V_INTR_VECTOR = 0x40
    r = m.run(timeout=20)
    assert r.exit_code == 0x140, (r.reason, r.detail, r.exit_code)
    lbr = m.cpu.branch_records
    assert (lbr.ex_from, lbr.ex_to) == (label(body, "src"), label(body, "dst"))
    assert (lbr.br_from, lbr.br_to) == (label(body, "jx"), STUBS + 0x40 * STUB_SIZE)


def test_sysretq_is_recorded(guest):
    # SYSRETQ (REX.W 0F 07) from CPL 0 to the CPL-3 code after it (STAR[63:48] = 0x08:
    # CS = 0x18 | 3, SS = 0x10 | 3 in user_guest's GDT)
    prelude = ("mov ecx, 0xC0000081\nxor eax, eax\nmov edx, 0x00080008\nwrmsr\n" + wrmsr(DEBUGCTL, 1) +
               "lea rcx, [rip + user]\nmov r11, 2\nsr:\n.byte 0x48,0x0f,0x07\nuser:\nnop\n"
               "mov edi, 0x77\nxor eax, eax\n" + VMMCALL + "\n")
    m = user_guest(guest, "nop", prelude=prelude)
    m.guest.vmcb.EFER |= 1                                  # EFER.SCE
    r = m.run(timeout=20)
    assert r.exit_code == 0x77, (r.reason, r.detail, r.exit_code)
    lbr = m.cpu.branch_records
    assert (lbr.br_from, lbr.br_to) == (label(prelude, "sr"), label(prelude, "user"))


GDT_COMPAT = struct.pack("<4Q", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CF9B000000FFFF)


def compat_run(guest, compat_code: str, before: str = ""):
    """Far-return to a 32-bit code segment (0x18) that runs ``compat_code`` (encodings that
    read the same in 32-bit mode), then far-jumps back to 64-bit code and exits."""
    head = (wrmsr(DEBUGCTL, 1) + before + "push 0x18\nmov rax, compat\npush rax\nrf:\nretfq\ncompat:\n"
            f"{compat_code}\nfj:\n.byte 0xea\n.long back\n.word 0x08\nback:\n")
    src = head + wrmsr(DEBUGCTL, 0) + hc_exit(DONE)
    m = guest(src)
    m.guest.write_phys(0x1000, GDT_COMPAT)
    m.guest.vmcb.set_seg("GDTR", Segment(0, 0, len(GDT_COMPAT) - 1, 0x1000))
    install_reporting_idt(m)
    r = m.run(timeout=20)
    assert r.exit_code == DONE, (r.reason, r.detail, r.exit_code)
    return src, m.cpu.branch_records


def test_a_direct_far_jump_in_compatibility_mode_is_recorded(guest):
    src, lbr = compat_run(guest, "nop")
    assert (lbr.br_from, lbr.br_to) == (label(src, "fj"), label(src, "back"))
    assert (lbr.ex_from, lbr.ex_to) == (0, 0)


@pytest.mark.parametrize("rcx,loop", [(0x1_0000_0001, ".byte 0xe2, 0x00"),        # LOOP: ECX 1 -> 0
                                      (0x1_0001, ".byte 0x67, 0xe2, 0x00")],       # 67h: CX 1 -> 0
                         ids=["ecx", "cx"])
def test_loop_counts_with_the_address_size_outside_64_bit_mode(guest, rcx, loop):
    # a LOOP to the next instruction in 32-bit code: recorded only if taken, and it is not
    # (the count reaches 0 in ECX or CX; RCX would not); the RETFQ stays the last branch
    head = (f"mov rcx, {rcx:#x}\n" + wrmsr(DEBUGCTL, 1) + f"mov rcx, {rcx:#x}\n"
            "push 0x18\nmov rax, compat\npush rax\nrf:\nretfq\ncompat:\n")
    src = head + f"{loop}\n" + hc_exit(DONE)           # VMMCALL's encodings read the same in 32-bit code
    m = guest(src)
    m.guest.write_phys(0x1000, GDT_COMPAT)
    m.guest.vmcb.set_seg("GDTR", Segment(0, 0, len(GDT_COMPAT) - 1, 0x1000))
    r = m.run(timeout=20)
    assert r.exit_code == DONE, (r.reason, r.detail, r.exit_code)
    lbr = m.cpu.branch_records
    assert (lbr.br_from, lbr.br_to) == (label(src, "rf"), label(src, "compat"))


def test_debug_exception_clears_lbr_and_is_not_recorded(guest):
    # POPF sets TF: the #DB after the next instruction clears DebugCtl.LBR (and BTF)
    body = (wrmsr(DEBUGCTL, 3) + "src:\njmp dst\nnop\ndst:\npushfq\nor qword ptr [rsp], 0x100\npopfq\nnop\n")
    m = guest(body + hc_exit(DONE))
    install_reporting_idt(m)
    r = m.run(timeout=20)
    assert r.exit_code == 0x100 + 1, (r.reason, r.detail, r.exit_code)
    lbr = m.cpu.branch_records
    assert lbr.dbgctl == 0
    assert (lbr.br_from, lbr.br_to) == (label(body, "src"), label(body, "dst"))
    assert (lbr.ex_from, lbr.ex_to) == (0, 0)


@pytest.mark.parametrize("msr,value", [(DEBUGCTL, 1 << 6), (DEBUGCTL, 1 << 63), (FROM, 0), (EX_TO, 5)])
def test_reserved_debugctl_bits_and_record_writes_are_gp(guest, msr, value):
    body = wrmsr(msr, value)
    m = guest(body + hc_exit(DONE))
    install_reporting_idt(m)
    r = m.run(timeout=20)
    assert r.exit_code == 0x100 + 13, (r.reason, r.detail, r.exit_code)
    assert m.regs.rdx == BASE + len(assemble(body)) - 2              # #GP at the WRMSR
    assert m.cpu.branch_records.dbgctl == 0


def test_debugctl_keeps_its_other_defined_bits(guest):
    body = wrmsr(DEBUGCTL, 0x3C) + f"mov ecx, {DEBUGCTL:#x}\nrdmsr\nmov r13, rax\n"
    src, _, m = run(guest, body, True)
    assert m.regs.r13 == 0x3C


def test_rdmsr_of_the_records_at_cpl3_is_gp(guest):
    m = user_guest(guest, f"mov ecx, {FROM:#x}\nrdmsr")
    assert m.run(timeout=20).exit_code == 0x100 + 13


# -- LBR virtualization -------------------------------------------------------------
def test_lbr_virtualization_loads_and_saves_the_guests_records(guest):
    body = (f"mov ecx, {DEBUGCTL:#x}\nrdmsr\nmov r13, rax\nmov ecx, {FROM:#x}\nrdmsr\nmov r14, rax\n"
            "src:\njmp dst\nnop\ndst:\nnop\n")
    m = guest(body + hc_exit(DONE))
    v = m.guest.vmcb
    v.VIRT_EXT = 1
    v.DBGCTL, v.BR_FROM, v.BR_TO, v.LASTEXCPFROM, v.LASTEXCPTO = 1, 0x1234, 0x5678, 0x9A, 0xBC
    r = m.run(timeout=20)
    assert r.exit_code == DONE
    assert (m.regs.r13, m.regs.r14) == (1, 0x1234)           # VMRUN loaded them from the VMCB
    v = m.guest.vmcb
    assert (v.DBGCTL, v.BR_FROM, v.BR_TO) == (1, label(body, "src"), label(body, "dst"))
    assert (v.LASTEXCPFROM, v.LASTEXCPTO) == (0x9A, 0xBC)
    lbr = m.cpu.branch_records                                # #VMEXIT put the host's back
    assert (lbr.dbgctl, lbr.br_from, lbr.br_to, lbr.ex_from, lbr.ex_to) == (0, 0, 0, 0, 0)


def test_lbr_virtualization_survives_exits_the_hypervisor_handles(guest):
    # CPUID exits between the branch and the read: each #VMEXIT saves the guest's
    # records, each VMRUN loads them again
    body = (wrmsr(DEBUGCTL, 1) + "src:\njmp dst\nnop\ndst:\nxor eax, eax\ncpuid\nxor eax, eax\ncpuid\n")
    src = body + read_records() + hc_exit(DONE)
    m = guest(src)
    m.intercept("cpuid")
    m.guest.vmcb.VIRT_EXT = 1
    r = m.run(timeout=20)
    assert r.exit_code == DONE
    assert (m.regs.r9, m.regs.r10) == (label(src, "src"), label(src, "dst"))
    assert m.cpu.branch_records.br_from == 0


def test_without_virtualization_the_guest_records_into_the_processors_registers(guest):
    body = wrmsr(DEBUGCTL, 1) + "src:\njmp dst\nnop\ndst:\nnop\n"
    m = guest(body + hc_exit(DONE))
    m.guest.vmcb.DBGCTL = 0              # not loaded: VIRT_EXT.LBR is clear
    assert m.run(timeout=20).exit_code == DONE
    lbr = m.cpu.branch_records
    assert (lbr.dbgctl, lbr.br_from, lbr.br_to) == (1, label(body, "src"), label(body, "dst"))
    assert m.guest.vmcb.BR_FROM == 0     # and the VMCB's fields are not touched


def test_lbr_virtualization_stores_a_debugctl_the_guest_cleared(guest):
    # VMRUN loads DBGCTL = 1; the guest clears it and exits on CPUID; the handler writes
    # a save-area field, so the VMRUN back is a full one: it must load the 0 the #VMEXIT
    # stored, not the 1 VMRUN first loaded (§15.23)
    from sandbox.hypervisor.handlers import Action
    body = wrmsr(DEBUGCTL, 0) + f"xor eax, eax\ncpuid\nmov ecx, {DEBUGCTL:#x}\nrdmsr\nmov r13, rax\n"
    m = guest(body + hc_exit(DONE))
    m.intercept("cpuid")

    @m.on(0x72)
    def on_cpuid(m, e):
        m.guest.vmcb.CR2 = 0x1234
        m.advance(e)
        return Action.RESUME
    m.guest.vmcb.VIRT_EXT = 1
    m.guest.vmcb.DBGCTL = 1
    r = m.run(timeout=20)
    assert r.exit_code == DONE, (r.reason, r.detail)
    assert m.regs.r13 == 0
    assert m.guest.vmcb.DBGCTL == 0


def test_lbr_virtualization_survives_a_run_that_stops_without_an_exit(guest):
    # an instruction budget ends the first run inside the guest; the next run goes on
    # where it stopped, with the guest's records
    body = (wrmsr(DEBUGCTL, 1) + "src:\njmp dst\nnop\ndst:\n" + "nop\n" * 200 +
            f"mov ecx, {FROM:#x}\nrdmsr\nmov r13, rax\nmov ecx, {DEBUGCTL:#x}\nrdmsr\nmov r14, rax\n")
    m = guest(body + hc_exit(DONE))
    m.guest.vmcb.VIRT_EXT = 1
    assert m.run(max_insns=60, timeout=20).reason == "insn-budget"
    assert m.guest.vmcb.BR_FROM == label(body, "src")       # stored when the run stopped
    r = m.run(timeout=20)
    assert r.exit_code == DONE, (r.reason, r.detail)
    assert (m.regs.r13, m.regs.r14) == (label(body, "src"), 1)


def test_a_fuzz_case_does_not_leave_its_records_to_the_next():
    from sandbox.fuzz.case import Case, VmcbConfig
    from sandbox.fuzz.snapshot import Harness
    h = Harness()
    vmrun_vmmcall = VmcbConfig(intercepts=[0, 0, 0, 0, 0b11, 0])      # misc2: VMRUN, VMMCALL
    code = assemble(wrmsr(DEBUGCTL, 1) + "jmp skip\nnop\nskip:\n" + hc_exit(0), 0x100000)
    out = h.run(Case(code=code, config=vmrun_vmmcall))
    assert out.result.reason == "guest-exit", out.result
    assert not h.cpu.branch_records.clear          # the case enabled LBR and branched
    h.run(Case(code=assemble(hc_exit(0), 0x100000), config=vmrun_vmmcall))
    assert h.cpu.branch_records.clear


@pytest.mark.parametrize("msr,write", [(FROM, False), (DEBUGCTL, False), (DEBUGCTL, True)])
def test_a_single_step_traps_after_an_msr_the_model_carries_out(guest, msr, write):
    # TF set by POPF: the next instruction is the RDMSR/WRMSR, and the #DB trap after it
    # reports the RIP past it with DR6.BS (the model runs these MSRs itself, not Unicorn)
    op = (wrmsr(msr, 0) if write else f"mov ecx, {msr:#x}\nrdmsr\n").rstrip("\n").split("\n")
    head = wrmsr(DEBUGCTL, 1) + "src:\njmp dst\ndst:\n" + "\n".join(op[:-1]) + "\n"
    body = head + "pushfq\nor qword ptr [rsp], 0x100\npopfq\nop:\n" + op[-1] + "\nafter:\nnop\n"
    m = guest(body + hc_exit(DONE))
    install_reporting_idt(m)
    r = m.run(timeout=20)
    assert r.exit_code == 0x100 + 1, (r.reason, r.detail, r.exit_code)
    assert m.regs.rsi == label(body, "after")                  # the frame's RIP: after the MSR access
    assert m.cpu.st.reg_read(UC_X86_REG_DR6) & (1 << 14)                # DR6.BS
    assert m.cpu.branch_records.dbgctl == 0                                # and the #DB cleared LBR
