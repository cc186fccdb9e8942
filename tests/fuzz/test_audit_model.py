"""The audit model's shortcut: an instruction outside ``MODELLED`` is expected
to run with no #VMEXIT whatever the guest's state, so its expectation is
decided once per address and bytes.  These tests check the shortcut against
independent facts: every interceptable instruction the generator's table
builds (APM vol. 2 Appendix C) is in the modelled set, and for any other
instruction the full model, asked under a state that arms everything, names
no exit."""
from __future__ import annotations

import random

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from unicorn import x86_const as X

from sandbox.fuzz import audit
from sandbox.fuzz.table import TABLE

_cs = Cs(CS_ARCH_X86, CS_MODE_64)


class _Regs:
    """Unicorn's reg_read for a CPL-0 guest with CR4 clear and rCX/rDX/rAX zero."""

    def reg_read(self, r: int) -> int:
        return {X.UC_X86_REG_CS: 0x8}.get(r, 0)


def _all_armed() -> audit.GuestState:
    mm = bytearray(b"\xff" * 0x1000) + bytearray(0x1000)
    mm[0x4D0:0x4D8] = (1 << 12).to_bytes(8, "little")          # EFER.SVME in the VMCB's save area
    return audit.GuestState(_Regs(), mm, 0, 0, 0)             # IOPM and MSRPM all ones too


@pytest.mark.parametrize("t", TABLE, ids=lambda t: t.name)
def test_every_interceptable_instruction_is_modelled(t):
    rng = random.Random(t.name)
    for _ in range(20):
        code = t.build(rng)
        ins = next(_cs.disasm(code, 0x1000, 1), None)
        if ins is None:
            continue
        assert ins.id in audit.MODELLED, f"{t.name}: {code.hex()} decodes as {ins.mnemonic} (id {ins.id})"


def test_an_unmodelled_instruction_expects_no_exit_even_with_everything_armed():
    rng = random.Random(11)
    g = _all_armed()
    seen = 0
    for _ in range(3000):
        code = bytes(rng.randrange(256) for _ in range(15))
        ins = next(_cs.disasm(code, 0x2000, 1), None)
        if ins is None or ins.id in audit.MODELLED:
            continue
        seen += 1
        e = audit.expected_exit(code, 0x2000, g, shortcut=False)
        assert e is not None and e.code is None, (code.hex(), ins.mnemonic)
    assert seen > 1000


def test_a_modelled_instruction_is_decided_on_the_state_each_time():
    """CPUID at the same address and bytes: armed, then not -- the cache holds the
    decode, never the decision."""
    code = bytes.fromhex("0fa2") + bytes(13)
    g = _all_armed()
    assert audit.expected_exit(code, 0x3000, g).code == audit.CPUID
    g.mm[0x0C:0x10] = bytes(4)                                 # intercept word 3 (CPUID is bit 18) clear
    assert audit.expected_exit(code, 0x3000, g).code is None
