"""INTO (APM vol. 3 "INTO"): #UD in 64-bit mode; in compatibility and legacy mode an
#OF trap when RFLAGS.OF is set (the saved RIP is the next instruction), nothing when it
is clear.  With the #OF exception intercepted the #VMEXIT comes at the INTO, as INT3's
#BP does (APM vol. 2 §15.12).  kvm-unit-tests' svm_exception_test reaches INTO through
a far call to a 32-bit code segment; so do these guests, with a far return."""
from __future__ import annotations

import struct

from conftest import BASE, assemble, capture, hc_exit, install_reporting_idt

from sandbox import Segment

CODE32 = 0x18
#: null, 64-bit code (0x08), data (0x10), 32-bit code (0x18)
GDT = struct.pack("<4Q", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CF9B000000FFFF)
GDT_AT = 0x1000
OF = 4


def compat_guest(guest, set_eax: str):
    """64-bit code far-returns to 32-bit code that runs ``set_eax``, ADD EAX, 1 and INTO,
    then exits with 0x55.  The 32-bit instructions used encode as in 64-bit mode."""
    head = f"push {CODE32:#x}\nmov rax, compat\npush rax\nretfq\ncompat:\n{set_eax}\nadd eax, 1\n"
    src = head + ".byte 0xce\nafter:\n" + hc_exit(0x55)
    m = guest(src)
    m.guest.write_phys(GDT_AT, GDT)
    m.guest.vmcb.set_seg("GDTR", Segment(0, 0, len(GDT) - 1, GDT_AT))
    install_reporting_idt(m)
    into_at = BASE + len(assemble(head))
    return m, into_at


def test_into_with_of_set_is_an_of_trap_in_compatibility_mode(guest):
    m, into_at = compat_guest(guest, "mov eax, 0x7fffffff")        # + 1 overflows: OF = 1
    r = m.run(timeout=20)
    assert r.exit_code == 0x100 + OF, (r.reason, r.detail, r.exit_code)
    assert m.regs.rsi == into_at + 1                                # a trap: the frame's RIP is after INTO
    assert m.regs.rdx == CODE32                                     # the frame's CS: compatibility mode


def test_into_with_of_clear_does_nothing(guest):
    m, _ = compat_guest(guest, "mov eax, 1")
    r = m.run(timeout=20)
    assert r.exit_code == 0x55, (r.reason, r.detail, r.exit_code)


def test_intercepted_of_exits_at_the_into(guest):
    m, into_at = compat_guest(guest, "mov eax, 0x7fffffff")
    m.intercept("excp4")
    recs = capture(m, 0x40 + OF)
    m.run(timeout=20)
    assert len(recs) == 1 and recs[0].code == 0x40 + OF
    assert recs[0].rip == into_at and recs[0].nrip == into_at + 1


def test_into_is_ud_in_64_bit_mode(guest):
    src = "mov eax, 0x7fffffff\nadd eax, 1\n.byte 0xce\n" + hc_exit(0x55)
    m = guest(src)
    install_reporting_idt(m)
    r = m.run(timeout=20)
    assert r.exit_code == 0x100 + 6, (r.reason, r.detail, r.exit_code)
    assert m.regs.rsi == BASE + len(assemble("mov eax, 0x7fffffff\nadd eax, 1\n"))   # a fault: at INTO
