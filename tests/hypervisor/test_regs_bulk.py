"""The handler API's bulk register write and the console sink (issue 11's exit path)."""
from __future__ import annotations

import pytest

from sandbox import ExitCode, RESUME
from sandbox.hypervisor.machine import SealedRegs, SevEsRegisterError

from conftest import hc_exit

# CPUID twice: the first result is kept in R8..R11, the second in RAX..RDX
SRC = """
    mov eax, 7
    xor ecx, ecx
    cpuid
    mov r8, rax
    mov r9, rbx
    mov r10, rcx
    mov r11, rdx
    mov eax, 7
    cpuid
    mov r12, rax
""" + hc_exit(0)


def test_set_abcd_reaches_the_guest_as_four_writes_do(guest):
    """RAX, RBX, RCX, RDX after set_abcd are what the guest reads (values chosen
    to cover the 64-bit range: the mask keeps them as written)."""
    vals = [(0x1111_2222_3333_4444, 0x5555, 0xFFFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0001),
            (1, 2, 3, 4)]
    m = guest(SRC)

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        m.regs.set_abcd(vals.pop(0))
        m.advance(e)
        return RESUME

    r = m.run(timeout=30)
    assert r.reason == "guest-exit", r.detail
    assert (r.regs["r8"], r.regs["r9"], r.regs["r10"], r.regs["r11"]) == \
        (0x1111_2222_3333_4444, 0x5555, 0xFFFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0001)
    assert r.regs["r12"] == 1 and (r.regs["rbx"], r.regs["rcx"], r.regs["rdx"]) == (2, 3, 4)


def test_sealed_regs_refuse_the_bulk_write(guest):
    with pytest.raises(SevEsRegisterError):
        SealedRegs(guest(hc_exit(0))).set_abcd((0, 0, 0, 0))


def test_console_sink_set_after_construction_gets_every_byte(guest):
    src = "mov edx, 0x3f8\n" + "".join(f"mov al, {c}\nout dx, al\n" for c in b"hi!") + hc_exit(0)
    m = guest(src)
    got: list[bytes] = []
    m.console_sink = got.append
    r = m.run(timeout=30)
    assert r.reason == "guest-exit" and r.console == "hi!"
    assert got == [b"h", b"i", b"!"]
    m.console_sink = None
    assert m.console_sink is None


def test_register_writes_outside_64_bits_are_kept_modulo_2_64(guest):
    """A handler's value outside 0..2**64-1 reaches the guest as the 64-bit register
    holds it (two's complement for negatives), through set_abcd and an attribute write."""
    m = guest(SRC)
    vals = [(-1, -2, (1 << 64) | 5, -(1 << 63)), (1, 2, 3, 4)]

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        m.regs.set_abcd(vals.pop(0))
        if not vals:
            m.regs.rax = -7
            m.regs.rdx = 1 << 64
        m.advance(e)
        return RESUME

    r = m.run(timeout=30)
    assert r.reason == "guest-exit", r.detail
    assert (r.regs["r8"], r.regs["r9"], r.regs["r10"], r.regs["r11"]) == \
        (2**64 - 1, 2**64 - 2, 5, 2**63)
    assert r.regs["r12"] == 2**64 - 7 and (r.regs["rbx"], r.regs["rcx"], r.regs["rdx"]) == (2, 3, 0)


def test_cpuid_reads_only_eax_for_the_leaf(guest):
    """CPUID takes the leaf from EAX (APM vol. 3, CPUID): RAX = 2**32 asks for leaf 0,
    whose EBX:EDX:ECX spell the vendor."""
    m = guest("mov rax, 0x100000000\nxor ecx, ecx\ncpuid\n" + hc_exit(0))
    m.intercept("cpuid")
    r = m.run(timeout=30)
    assert r.reason == "guest-exit", r.detail
    vendor = b"".join(r.regs[k].to_bytes(4, "little") for k in ("rbx", "rdx", "rcx"))
    assert vendor == b"AuthenticAMD"
