"""LOCK on an instruction that cannot take it is #UD (APM vol. 3 §1.2.5: the
prefix is legal only on the read-modify-write forms of ADC, ADD, AND, BTC, BTR,
BTS, CMPXCHG, CMPXCHG8B/16B, DEC, INC, NEG, NOT, OR, SBB, SUB, XADD, XCHG and XOR;
"an invalid-opcode exception occurs if LOCK is used with any other
instruction").  The #UD comes at decode, before the instruction's own intercept
is checked, so LOCK CPUID with CPUID intercepted is an EXCP_UD #VMEXIT when #UD
is intercepted and never a CPUID one.  QEMU (Unicorn) ignores the prefix and
runs LOCK CPUID, LOCK RDTSC, LOCK IN ... as the plain instruction, intercepted
or not; the sandbox's scanner hooks a LOCK before any sensitive opcode.

The one sensitive exception: LOCK MOV CR0 is AMD's alternate encoding of MOV
CR8 (APM vol. 3, "MOV CRn"), an access to CR8 -- intercepted as CR8 (exit 08h
for a read).  Exit codes: APM vol. 2 Appendix C."""
from __future__ import annotations

import pytest

from sandbox.fuzz.case import Case, VmcbConfig
from sandbox.fuzz.snapshot import Harness

EXCP_UD, CR8_READ, CPUID, RDTSC, IOIO, VMMCALL, SHUTDOWN = 0x46, 0x08, 0x72, 0x6E, 0x7B, 0x81, 0x7F
VMMCALL_BYTES = bytes.fromhex("0f01d9")


def _intercepts(ud: bool) -> list[int]:
    """Every instruction intercept of misc1 (bits 0-4, the external events, left clear),
    SHUTDOWN among them, VMRUN and VMMCALL, CR8 and DR reads -- and #UD when ``ud``."""
    return [1 << 8, 0xFFFF, (1 << 6) if ud else 0, 0xFFFF_FFE0, 0b11, 0]


def _exits(code: bytes, ud: bool, entry: int = 0x800) -> list[tuple[int, int]]:
    case = Case(code + VMMCALL_BYTES, entry, VmcbConfig(intercepts=_intercepts(ud), iopm=[0x60]), {}, "hand")
    out = Harness().run(case, audit=False)
    assert out.result is not None, out.crash
    return [(int(e.exitcode), e.rip) for e in out.exits]


LOCKED = {
    "cpuid": "f00fa2",
    "rdtsc": "f00f31",
    "in al, 0x60": "f0e460",
    "hlt": "f0f4",
    "rdmsr": "f00f32",
    "invlpg [rax]": "f00f0138",
    "mov rax, dr0": "f00f21c0",
    "vmmcall": "f00f01d9",
    "lock after 66h: cpuid": "66f00fa2",
}


@pytest.mark.parametrize("code", LOCKED.values(), ids=LOCKED.keys())
def test_lock_on_a_sensitive_instruction_is_ud_before_its_intercept(code):
    base = 0x100800
    assert _exits(bytes.fromhex(code), ud=True)[:1] == [(EXCP_UD, base)]


def test_without_the_ud_intercept_the_guest_takes_the_ud():
    """No #UD intercept: the guest's #UD, through its empty IDT (limit 0: #GP, then
    #DF, then shutdown, APM vol. 2 §8.2.9) -- the SHUTDOWN intercept, and no CPUID exit."""
    assert _exits(bytes.fromhex("f00fa2"), ud=False) == [(SHUTDOWN, 0x100800)]


def test_unprefixed_they_exit_as_themselves():
    assert _exits(bytes.fromhex("0fa2"), ud=True)[:1] == [(CPUID, 0x100800)]
    assert _exits(bytes.fromhex("0f31"), ud=True)[:1] == [(RDTSC, 0x100800)]


def test_lock_mov_from_cr0_is_a_cr8_read():
    assert _exits(bytes.fromhex("f00f20c0"), ud=True)[:1] == [(CR8_READ, 0x100800)]


def test_lock_on_an_instruction_the_vmcb_does_not_intercept_is_ud_too():
    """CPUID and RDTSC not intercepted, #UD intercepted: LOCK makes each #UD all
    the same -- QEMU would run them unprefixed."""
    for code in ("f00fa2", "f00f31", "66f00fa2"):
        case = Case(bytes.fromhex(code) + VMMCALL_BYTES, 0x800,
                    VmcbConfig(intercepts=[0, 0, 1 << 6, 1 << 31, 0b11, 0]), {}, "hand")
        out = Harness().run(case, audit=False)
        assert [(int(e.exitcode), e.rip) for e in out.exits][:1] == [(EXCP_UD, 0x100800)], code


@pytest.mark.parametrize("code,starts", [
    ("90f00fa2", [1]),          # NOP; LOCK CPUID: the LOCK begins the instruction
    ("66f00fa2", [0, 1]),       # 66h before it: either byte may begin it
    ("f0660fa2", [0]),          # at 66h it is CPUID without LOCK, which nothing arms
    ("f00fb100", []),           # LOCK CMPXCHG [RAX], EAX: lockable, not sensitive
    ("f00f20c0", []),           # LOCK MOV RAX, CR0: AMD's encoding of CR8, legal
])
def test_the_scan_finds_a_lock_before_any_sensitive_opcode(code, starts):
    from sandbox.svm import decode as D
    b = bytes.fromhex(code)
    assert D.scan(b, len(b), frozenset(), frozenset()) == starts
