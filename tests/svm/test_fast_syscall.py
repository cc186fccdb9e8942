"""SYSCALL, SYSENTER and SYSEXIT on the modelled (AMD) processor.

Unicorn 2.1.4 runs SYSCALL and SYSENTER as no-ops and its Intel CPU model
decodes SYSENTER/SYSEXIT in 64-bit mode; the expected values below are the
APM's (vol. 3 "SYSCALL", "SYSRET", "SYSENTER", "SYSEXIT"), worked out by hand
from each test's inputs.  The fuzz campaign found the SYSENTER case (seed 35,
``--uncounted-every 1``): the counted and uncounted runs even disagreed on its
RIP, Unicorn's helper stepping over it from a stale EIP.
"""
from __future__ import annotations

import pytest

from tests.conftest import BASE, hc_exit, install_reporting_idt, user_guest, wrmsr

MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_SFMASK = 0xC000_0080, 0xC000_0081, 0xC000_0082, 0xC000_0084
MSR_SYSENTER_CS = 0x174
RF_DF, RF_IF, RF_TF = 1 << 10, 1 << 9, 1 << 8


SET_SCE = f"mov ecx, {MSR_EFER:#x}\nrdmsr\nor eax, 1\nwrmsr\n"

#: the kernel entry: keeps what SYSCALL handed it, then SYSRETQ (REX.W 0F 07) back to CPL 3
KERNEL = """
    jmp over
kentry:
    mov r12, rcx
    mov r13, r11
    pushfq
    pop r14
    mov r15, cs
    mov rbp, ss
    .byte 0x48, 0x0f, 0x07
over:
"""


def test_syscall_from_cpl3_enters_the_kernel_and_sysretq_returns(guest):
    """STAR[47:32] = 08h (kernel CS 08h, SS 10h), STAR[63:48] = 08h (SYSRETQ:
    CS 08h + 16 = 18h | 3, SS 08h + 8 = 10h | 3); SFMASK = DF | IF.  The user
    sets DF and calls.  Kernel side: RCX = the instruction after SYSCALL, R11 =
    the user's RFLAGS (DF set, RF clear), RFLAGS without DF and IF, CS 08h, SS
    10h.  Back at CPL 3: CS 1Bh, RFLAGS from R11 (DF set again)."""
    prelude = (KERNEL + SET_SCE + wrmsr(MSR_STAR, (0x08 << 48) | (0x08 << 32))
               + "lea rax, [rip + kentry]\nmov rdx, rax\nshr rdx, 32\n"
               + f"mov ecx, {MSR_LSTAR:#x}\nwrmsr\n" + wrmsr(MSR_SFMASK, RF_DF | RF_IF))
    body = "lea r8, [rip + back]\nstd\nxor eax, eax\nsyscall\nback:\nmov rbx, cs\npushfq\npop rsi\ncld\n"
    m = user_guest(guest, body, prelude=prelude)
    r = m.run()
    assert (r.reason, r.exit_code) == ("guest-exit", 0x55), (r.reason, r.detail, r.exit_code)
    user_flags = 0x2 | RF_DF | 0x44            # XOR EAX, EAX: ZF and PF; bit 1 is always set
    assert r.regs["r12"] == r.regs["r8"]        # RCX: the instruction after SYSCALL
    assert r.regs["r13"] == user_flags
    assert r.regs["r14"] == user_flags & ~(RF_DF | RF_IF)
    assert (r.regs["r15"], r.regs["rbp"]) == (0x08, 0x10)
    assert r.regs["rbx"] == 0x1B
    assert r.regs["rsi"] == user_flags


@pytest.mark.parametrize("max_insns", [0, 4096], ids=["uncounted", "counted"])
def test_r11_holds_the_flags_of_the_add_before_syscall(guest, max_insns):
    """ADD EAX, EAX with EAX = 8000_0000h: 0 with a carry out and a signed
    overflow -- CF, PF, ZF and OF (0x847).  SYSCALL at CPL 0 saves them in R11,
    whether or not an instruction budget counts the run (its hook changes how
    QEMU keeps the flags until an instruction needs them)."""
    src = (SET_SCE + wrmsr(MSR_STAR, 0x08 << 32) + "lea rax, [rip + entry]\nmov rdx, rax\nshr rdx, 32\n"
           + f"mov ecx, {MSR_LSTAR:#x}\nwrmsr\n" + wrmsr(MSR_SFMASK, 0)
           + "mov eax, 0x80000000\nadd eax, eax\nsyscall\n" + hc_exit(1) + "entry:\nmov rbx, r11\n" + hc_exit(2))
    m = guest(src)
    r = m.run(max_insns=max_insns)
    assert (r.reason, r.exit_code) == ("guest-exit", 2)
    assert r.regs["rbx"] == 0x847


def test_syscall_with_sce_clear_is_ud(guest):
    """EFER.SCE = 0 (the loader's EFER): SYSCALL is #UD, at its own address."""
    m = guest("nop\nsyscall\n" + hc_exit(1))
    install_reporting_idt(m)
    r = m.run()
    assert r.exit_code == 0x106                 # the #UD stub
    assert r.regs["rsi"] == BASE + 1            # the faulting RIP in the exception frame


@pytest.mark.parametrize("insn", ["sysenter", "sysexit"])
def test_sysenter_and_sysexit_are_ud_in_long_mode(guest, insn):
    """On an AMD processor SYSENTER and SYSEXIT are #UD in long mode (APM vol. 3),
    whatever SYSENTER_CS holds; Unicorn's Intel model would run them."""
    m = guest(wrmsr(MSR_SYSENTER_CS, 0x08) + f"{insn}\n" + hc_exit(1))
    install_reporting_idt(m)
    r = m.run()
    assert r.exit_code == 0x106
    pre = len(bytes.fromhex("b974010000" "b808000000" "ba00000000" "0f30"))
    assert r.regs["rsi"] == BASE + pre


def test_a_sysenter_intercepted_as_ud_exits_at_it(guest):
    """With the #UD intercept armed the #UD is a #VMEXIT(EXCP6) at SYSENTER, as the
    seed-35 case had it (there the #UD's delivery through an empty IDT faulted)."""
    m = guest("sysenter\n" + hc_exit(1))
    m.intercept("excp6")
    seen = []
    m.on(0x46)(lambda m, e: (seen.append(e.RIP), m.stop("ud"))[1])
    m.run()
    assert seen == [BASE]


def test_syscall_from_compatibility_mode_goes_to_cstar_in_64_bit_mode(guest):
    """From compatibility mode (a 32-bit code segment, EFER.LMA = 1) SYSCALL goes to
    CSTAR, not LSTAR, and loads the same 64-bit kernel CS: the entry's REX.W MOV
    runs as 64-bit code.  RCX = the instruction after the SYSCALL."""
    from sandbox import Segment
    src = (SET_SCE + wrmsr(MSR_STAR, 0x08 << 32) + wrmsr(MSR_LSTAR, 0x1234_0000)
           + "lea rax, [rip + centry]\nmov rdx, rax\nshr rdx, 32\nmov ecx, 0xC0000083\nwrmsr\n"
           + "lea r8, [rip + compat]\npush 0x18\npush r8\nretfq\n"
           + "compat:\n.byte 0x0f, 0x05\n" + hc_exit(1)
           + "centry:\nmov rbx, rcx\nmov rsi, cs\nmov r9, 0x1122334455667788\n" + hc_exit(2))
    m = guest(src)
    m.guest.write_phys(0x1000 + 3 * 8, (0x00CF9B000000FFFF).to_bytes(8, "little"))   # 32-bit code, DPL 0
    m.guest.vmcb.set_seg("GDTR", Segment(0, 0, 4 * 8 - 1, 0x1000))
    r = m.run()
    assert (r.reason, r.exit_code) == ("guest-exit", 2), (r.reason, r.detail)
    assert r.regs["rbx"] == r.regs["r8"] + 2
    assert r.regs["rsi"] == 0x08
    assert r.regs["r9"] == 0x1122334455667788
