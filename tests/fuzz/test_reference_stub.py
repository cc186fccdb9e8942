"""The differential reference's host stub: the case's registers encoded without keystone.

The stub is assembled once; each case's ``mov reg, imm64`` is encoded by hand
(REX.W B8+r, AMD64 APM vol. 3 MOV).  Checked against capstone's decoding, and
against a stub keystone assembles from text, case by case on QEMU's first exit.
"""
from __future__ import annotations

import random

import capstone
import pytest
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from sandbox.fuzz import differential as D
from sandbox.fuzz.case import GPRS
from sandbox.fuzz.generate import next_case

VALUES = [0, 1, 0x7F, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000, 0x8000_0000_0000_0000, (1 << 64) - 1]


@pytest.mark.parametrize("name", GPRS)
def test_mov_imm64_decodes_as_that_move(name):
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for v in VALUES:
        code = D.mov_imm64(name, v)
        (insn,) = md.disasm(code, 0)
        assert insn.size == len(code) == 10
        assert insn.mnemonic == "movabs"
        reg, imm = (x.strip() for x in insn.op_str.split(","))
        assert reg == name and int(imm, 16) == v


def _keystone_stub(case) -> bytes:
    """The whole stub from text, as keystone assembles it (the reference's former way)."""
    regs = "\n".join(f"mov {n}, {v:#x}" for n, v in case.regs.items() if n not in ("rax", "rsp"))
    src = D._STUB_HEAD_SRC + regs + "\n" + D._STUB_TAIL_SRC
    return bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(src, D.STUB)[0])


def test_first_exits_match_a_keystone_assembled_stub(monkeypatch):
    cases = [next_case(random.Random(i), [], 64) for i in range(60)]
    q = D.QemuSvm()
    ours = [q.first_exit(c) for c in cases]
    monkeypatch.setattr(D, "_stub", _keystone_stub)
    theirs = [q.first_exit(c) for c in cases]
    assert sum(e is not None for e in ours) > 20
    assert ours == theirs
