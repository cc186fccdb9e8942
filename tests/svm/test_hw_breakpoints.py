"""Hardware instruction breakpoints follow DR0-DR3 and DR7 however they are loaded
(sandbox/svm/breakpoints.py).

QEMU makes a breakpoint object when guest code writes DR7; a DR7 that VMRUN loads from
the VMCB (APM vol. 2 §15.5.1) or a fuzz restore copies back must arm and disarm the
same breakpoints.  Expected outcomes are the architectural ones: an instruction
breakpoint is a fault-class #DB at the instruction (SDM vol. 3 §17.3.1.1, the frame's
RIP is the breakpoint's address) with DR6.B<n> set, and only while DR7 enables it."""
from __future__ import annotations

from conftest import BASE, assemble, hc_exit, install_reporting_idt

from sandbox import RESUME, ExitCode
from sandbox.fuzz.case import CODE_BASE, Case, VmcbConfig
from sandbox.fuzz.generate import TERMINATOR
from sandbox.fuzz.snapshot import Harness
from sandbox.svm.breakpoints import DR7_FIXED_1, HardwareBreakpoints, enabled_breakpoints
from sandbox.svm.cpustate import OFF_DR

DB = 1
#: intercept vector words: VMRUN (required) and VMMCALL, which ends a case (TERMINATOR)
VMRUN_VMMCALL = [0, 0, 0, 0, 0b11, 0]


def _set_dr7_on_cpuid(m, dr7: int) -> list[int]:
    """The CPUID handler writes ``dr7`` into the VMCB (the next VMRUN loads it) and resumes."""
    seen = []

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        seen.append(m.guest.vmcb.DR7)
        m.guest.vmcb.DR7 = dr7
        m.advance(e)
        return RESUME
    return seen


def _guest(guest, head: str):
    src = head + "cpuid\ntarget:\nnop\n" + hc_exit(0x55)
    m = guest(src)
    install_reporting_idt(m)
    m.intercept("cpuid")
    return m, BASE + len(assemble(head + "cpuid\ntarget:\n"))


def test_a_breakpoint_the_guest_armed_is_gone_once_the_vmcb_disables_it(guest):
    m, target = _guest(guest, "mov rax, target\nmov dr0, rax\nmov eax, 1\nmov dr7, rax\n")
    seen = _set_dr7_on_cpuid(m, DR7_FIXED_1)
    r = m.run(timeout=20)
    assert seen and seen[0] & 1, "the #VMEXIT saved the guest's DR7 with L0 set"
    assert r.exit_code == 0x55, (r.reason, r.detail, r.exit_code)


def test_a_breakpoint_the_hypervisor_arms_through_the_vmcb_fires(guest):
    m, target = _guest(guest, "mov rax, target\nmov dr0, rax\n")
    _set_dr7_on_cpuid(m, DR7_FIXED_1 | 1)
    r = m.run(timeout=20)
    assert r.exit_code == 0x100 + DB, (r.reason, r.detail, r.exit_code)
    assert m.regs.rsi == target                       # a fault: the frame's RIP is the instruction
    assert m.guest.vmcb.DR6 & 1                       # B0


def test_the_vmcb_moves_the_breakpoint_to_another_register(guest):
    """DR0 holds the first NOP after the CPUID, DR1 the second; the guest enables
    DR0's breakpoint, the hypervisor DR1's instead: the #DB comes at the second."""
    head = "mov rax, target\nmov dr0, rax\nmov rax, second\nmov dr1, rax\nmov eax, 1\nmov dr7, rax\n"
    src = head + "cpuid\ntarget:\nnop\nsecond:\nnop\n" + hc_exit(0x55)
    m = guest(src)
    install_reporting_idt(m)
    m.intercept("cpuid")
    _set_dr7_on_cpuid(m, DR7_FIXED_1 | 1 << 2)
    r = m.run(timeout=20)
    assert r.exit_code == 0x100 + DB, (r.reason, r.detail, r.exit_code)
    assert m.regs.rsi == BASE + len(assemble(head + "cpuid\ntarget:\nnop\nsecond:\n"))
    assert m.guest.vmcb.DR6 & 2                       # B1


def test_a_guest_armed_breakpoint_still_fires(guest):
    m, target = _guest(guest, "mov rax, target\nmov dr0, rax\nmov eax, 1\nmov dr7, rax\n")
    r = m.run(timeout=20)
    assert r.exit_code == 0x100 + DB, (r.reason, r.detail, r.exit_code)
    assert m.regs.rsi == target


def _arm_then_pass() -> tuple[Case, Case]:
    """Case A arms an instruction breakpoint at CODE_BASE + 800h and ends (VMMCALL);
    case B runs NOPs through that address to its VMMCALL."""
    at = CODE_BASE + 0x800
    arm = assemble(f"mov rax, {at:#x}\nmov dr0, rax\nmov eax, 1\nmov dr7, rax\n", CODE_BASE)
    return (Case(arm + TERMINATOR, 0, VmcbConfig(VMRUN_VMMCALL)),
            Case(b"\x90" * 32 + TERMINATOR, 0x800 - 16, VmcbConfig(VMRUN_VMMCALL)))


def test_a_fuzz_case_does_not_inherit_the_previous_cases_breakpoint():
    """Case A arms a breakpoint in the code window and ends; case B runs through
    that address.  B's outcome is the same after A as on a fresh harness."""
    a, b = _arm_then_pass()
    fresh = Harness().run(b)
    h = Harness()
    h.run(a)
    after = h.run(b)
    assert fresh.result.reason == "guest-exit", fresh.result.detail
    assert (after.result.reason, after.result.detail) == (fresh.result.reason, fresh.result.detail)
    assert [e.exitcode for e in fresh.exits] == [e.exitcode for e in after.exits]


def test_the_decoding_of_dr7():
    # R/W0 = 00 (exec) enabled by G0; R/W1 = 01 (write) enabled by L1; R/W2 = 10 (I/O) by L2;
    # R/W3 = 00 with neither L3 nor G3
    dr7 = 0b10 | 0b1 << 2 | 0b1 << 4 | 0b01 << 20 | 0b10 << 24
    assert enabled_breakpoints(dr7) == ([0], True)
    assert enabled_breakpoints(DR7_FIXED_1) == ([], False)


def test_apply_leaves_qemu_holding_what_dr7_enables(guest):
    """Straight on the processor: DR7 written as a register arms and disarms QEMU's objects."""
    m = guest(hc_exit(0))
    st = m.cpu.st
    bps = HardwareBreakpoints(m.cpu.uc, st)
    q, base = st.q, OFF_DR // 8
    q[base + 0], q[base + 2] = 0x1234, 0x5678
    q[base + 7] = DR7_FIXED_1 | 1 | 1 << 5          # L0 and G2
    bps.apply()
    assert bps.installed() == [0x1234, 0x5678]
    q[base + 7] = DR7_FIXED_1 | 1 << 5              # G2 alone
    bps.apply()
    assert bps.installed() == [0x5678]
    assert q[base + 7] == DR7_FIXED_1 | 1 << 5      # the register as loaded
    q[base + 7] = DR7_FIXED_1
    bps.apply()
    assert bps.installed() == []


def test_an_io_breakpoint_the_vmcb_enables_traps_after_the_out(guest):
    """CR4.DE on, DR0 = port 80h, R/W0 = 10b (I/O) enabled by the VMCB's DR7: the OUT
    completes and a #DB trap follows it (the frame's RIP is the next instruction)."""
    head = "mov rax, cr4\nor rax, 8\nmov cr4, rax\nmov eax, 0x80\nmov dr0, rax\ncpuid\nout 0x80, al\n"
    m = guest(head + "after:\nnop\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.intercept("cpuid")
    _set_dr7_on_cpuid(m, DR7_FIXED_1 | 0b10 << 16 | 1)
    r = m.run(timeout=20)
    assert r.exit_code == 0x100 + DB, (r.reason, r.detail, r.exit_code)
    assert m.regs.rsi == BASE + len(assemble(head))
    assert m.guest.vmcb.DR6 & 1


def test_a_dr_that_is_set_but_not_enabled_does_not_break_a_code_store(guest):
    """A store into the running code page with DR0 on the next instruction: a DR0
    that DR7 does not enable is no breakpoint, no #DB (when such stores were
    single-stepped, QEMU's step trap set DR6.B0 for it, as SDM vol. 3 §17.2.3
    allows, and the model had to tell).  Enabled, it is one."""
    for dr7, want in ((DR7_FIXED_1, 0x55), (DR7_FIXED_1 | 1, 0x100 + DB)):
        m = guest(f"mov rax, after\nmov dr0, rax\nmov eax, {dr7:#x}\nmov dr7, rax\n"
                  "lea rbx, [rip + scratch]\nmov byte ptr [rbx], 1\nafter:\nnop\n" + hc_exit(0x55)
                  + "scratch:\n.byte 0\n")
        install_reporting_idt(m)
        r = m.run(timeout=20)
        assert r.exit_code == want, (hex(dr7), r.reason, r.detail, r.exit_code)


def test_the_differential_reference_does_not_inherit_a_breakpoint():
    """The fuzz campaign's QEMU reference (one Unicorn reused across cases) clears what a
    case's MOV to DR7 installed, as the model does."""
    from sandbox.fuzz.differential import QemuSvm
    a, b = _arm_then_pass()
    want = QemuSvm().first_exit(b)
    q = QemuSvm()
    q.first_exit(a)
    got = q.first_exit(b)
    assert want is not None and want.exitcode == 0x81                 # VMMCALL
    assert got is not None and (got.exitcode, got.rip) == (want.exitcode, want.rip), q.last_event
