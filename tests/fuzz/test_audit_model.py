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


class _RegsXsave(_Regs):
    """As :class:`_Regs`, with CR4.OSXSAVE set (XSETBV can exit)."""

    def reg_read(self, r: int) -> int:
        return audit.CR4_OSXSAVE if r == X.UC_X86_REG_CR4 else super().reg_read(r)


#: prefix runs in front of the opcodes: none, each legacy class, REX, and mixed orders
_PREFIX_RUNS = (b"", b"\xf3", b"\xf2", b"\x66", b"\x67", b"\xf0", b"\x2e", b"\x48", b"\x41\xf3",
                b"\xf3\x48", b"\x66\xf3\x26", b"\xf0\x66\x65\x4c")


def test_the_opcode_precheck_turns_away_only_instructions_no_model_exits_on():
    """``may_exit`` (the audit's look at the opcode before any decode) answers
    False only where the full model, asked under a state that arms every
    intercept, gives no exit: every opcode of the one-byte, 0F, 0F 38 and 0F 3A
    maps behind prefix runs, with every ModRM byte for groups 6 and 7 (0F 00, 0F 01)."""
    rng = random.Random(5)
    states = (_all_armed(), audit.GuestState(_RegsXsave(), _all_armed().mm, 0, 0, 0))
    opcodes = [bytes([b]) for b in range(256)] + [b"\x0f" + bytes([b]) for b in range(256)] + \
              [b"\x0f\x38" + bytes([b]) for b in range(256)] + [b"\x0f\x3a" + bytes([b]) for b in range(256)]
    checked = turned_away = 0
    for pre in _PREFIX_RUNS:
        for op in opcodes:
            tails = [bytes([m]) for m in range(256)] if op in (b"\x0f\x00", b"\x0f\x01") else \
                    [bytes([0xC0 | rng.randrange(64)]), bytes([rng.randrange(0xC0)]), bytes([0xD9])]
            for t in tails:
                code = (pre + op + t + bytes(rng.randrange(256) for _ in range(15)))[:15]
                checked += 1
                if audit.may_exit(code):
                    continue
                turned_away += 1
                for g in states:
                    e = audit.expected_exit(code, 0x2000, g, shortcut=False)
                    assert e is None or e.code is None, (code.hex(), e)
    assert turned_away > checked // 2


@pytest.mark.parametrize("t", TABLE, ids=lambda t: t.name)
def test_the_opcode_precheck_passes_every_interceptable_instruction(t):
    """Every encoding of an interceptable instruction (the generator's table,
    APM vol. 2 Appendix C) that the model gives an exit reaches the model,
    ahead of whatever bytes follow."""
    rng = random.Random(t.name)
    g = audit.GuestState(_RegsXsave(), _all_armed().mm, 0, 0, 0)
    for _ in range(20):
        code = (t.build(rng) + bytes(rng.randrange(256) for _ in range(15)))[:15]
        e = audit.expected_exit(code, 0x2000, g, shortcut=False)
        if e is not None and e.code is not None:
            assert audit.may_exit(code), code.hex()


def test_the_opcode_precheck_is_unsure_inside_the_prefixes():
    """A window that ends inside its prefix run (or right after 0F) may still be anything."""
    assert audit.may_exit(b"") and audit.may_exit(b"\x66\xf3") and audit.may_exit(b"\x48\x0f")
    assert not audit.may_exit(b"\x66\x90") and audit.may_exit(b"\x66\xf3\x90") and not audit.may_exit(b"\x48\x89\xc8")


class _RegsUser(_Regs):
    """A CPL-3 guest with IOPL 0 and every CR4 bit the model reads set."""

    def reg_read(self, r: int) -> int:
        return {X.UC_X86_REG_CS: 0x1B, X.UC_X86_REG_RDX: 0x80,
                X.UC_X86_REG_CR4: audit.CR4_TSD | audit.CR4_DE | audit.CR4_PCE | audit.CR4_UMIP
                | audit.CR4_OSXSAVE}.get(r, 0)


def test_the_model_picked_per_encoding_answers_as_the_whole_chain():
    """The model :func:`expected_exit` picks once per encoding gives what asking
    each model in turn gives, at CPL 0 and 3: every opcode of the one-byte and
    0F maps behind prefix runs (LOCK included), every ModRM byte of 0F 00/0F 01
    and of MOV CRn/DRn."""
    rng = random.Random(9)
    mm = _all_armed().mm
    states = (_all_armed(), audit.GuestState(_RegsXsave(), mm, 0, 0, 0), audit.GuestState(_RegsUser(), mm, 0, 0, 0))
    opcodes = [bytes([b]) for b in range(256)] + [b"\x0f" + bytes([b]) for b in range(256)]
    full = (b"\x0f\x00", b"\x0f\x01", b"\x0f\x20", b"\x0f\x21", b"\x0f\x22", b"\x0f\x23")
    compared = 0
    for pre in _PREFIX_RUNS:
        for op in opcodes:
            tails = [bytes([m]) for m in range(256)] if op in full else \
                    [bytes([0xC0 | rng.randrange(64)]), bytes([rng.randrange(0xC0)])]
            for t in tails:
                code = (pre + op + t + bytes(rng.randrange(256) for _ in range(15)))[:15]
                for g in states:
                    want = audit.expected_exit(code, 0x2000, g, shortcut=False)
                    assert audit.expected_exit(code, 0x2000, g) == want, (code.hex(), want)
                    compared += want is not None and want.code is not None
    assert compared > 1000


@pytest.mark.parametrize("code", ["f00fa2", "f00f31", "f0e460", "f0f4", "f00f01d9", "f00f21c0", "66f00fa2"])
def test_lock_on_a_sensitive_instruction_expects_no_exit(code):
    """Capstone decodes none of these (LOCK where it is not legal); the model still
    names the APM's outcome: #UD at decode, before any intercept (vol. 3 §1.2.5)."""
    e = audit.expected_exit(bytes.fromhex(code) + bytes(15), 0x1000, _all_armed())
    assert e is not None and e.code is None and e.what.startswith("lock ")


def test_the_audit_catches_an_exit_on_a_locked_instruction(monkeypatch):
    """The sandbox's #UD for LOCK taken away, LOCK CPUID exits as CPUID: the audit
    names that exit spurious."""
    from sandbox.fuzz.case import Case, VmcbConfig
    from sandbox.fuzz.snapshot import Harness
    from sandbox.svm import decode as D
    monkeypatch.setattr(D, "LOCK_LEGAL", frozenset(D.Kind))
    cfg = VmcbConfig(intercepts=[0, 0, 0, (1 << 31) | (1 << 18), 0b11, 0])   # SHUTDOWN, CPUID; VMRUN, VMMCALL
    out = Harness(audit=True).run(Case(bytes.fromhex("f00fa20f01d9"), 0x800, cfg, {}, "hand"), audit=True)
    assert [(f.kind, f.insn) for f in out.audit] == [("spurious", "lock cpuid")]
