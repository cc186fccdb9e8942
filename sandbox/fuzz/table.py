"""Every instruction an SVM intercept can name, as byte templates (APM vol. 3
opcode maps; APM vol. 2 Appendix C for the intercept each one hits).

Each :class:`Template` builds one encoding from a random generator: ModRM
forms (register or memory, with SIB and displacements), immediates, and the
legacy/REX prefixes that are legal for it.  The grammar generator combines
these with filler instructions.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

#: legacy prefixes (APM vol. 3 §1.2): operand size, address size, REP/REPNE, segment overrides
SEGMENT_PREFIXES = (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65)
LEGACY = (0x66, 0x67, 0xF2, 0xF3) + SEGMENT_PREFIXES


def below(rng: random.Random, n: int) -> int:
    """``rng.randrange(n)`` for ``n > 0``, drawn as CPython's ``Random`` draws it
    (``getrandbits`` of ``n``'s bit length, redrawn while out of range), so a
    seed gives the same cases; one Python frame instead of the two or three of
    ``randrange``/``choice`` (a case draws about 140 times)."""
    k = n.bit_length()
    r = rng.getrandbits(k)
    while r >= n:
        r = rng.getrandbits(k)
    return r


def pick(rng: random.Random, seq):
    """``rng.choice(seq)`` for a non-empty ``seq``, drawn as :func:`below` draws."""
    return seq[below(rng, len(seq))]


def modrm_mem(rng: random.Random, reg: int) -> bytes:
    """A memory ModRM (+SIB, +disp) with ``reg`` in ModRM.reg; base registers
    are those the case initialises to point into the data page."""
    mod = pick(rng, (0, 1, 2))
    form = rng.random()
    if form < 0.15:
        return bytes([(0 << 6) | (reg << 3) | 5]) + (below(rng, 128) - 64).to_bytes(4, "little", signed=True)  # RIP-relative
    if form < 0.45:
        base = pick(rng, (3, 6, 7))               # rbx rsi rdi
        idx = pick(rng, (0, 1, 2, 4))             # rax rcx rdx none
        sib = (below(rng, 4) << 6) | (idx << 3) | base
        m = bytes([(mod << 6) | (reg << 3) | 4, sib])
    else:
        m = bytes([(mod << 6) | (reg << 3) | pick(rng, (3, 6, 7))])
    if mod == 1:
        m += bytes([below(rng, 256)])
    elif mod == 2:
        m += below(rng, 0x800).to_bytes(4, "little")
    return m


def modrm_reg(rng: random.Random, reg: int) -> bytes:
    return bytes([0xC0 | (reg << 3) | below(rng, 8)])


@dataclass(frozen=True)
class Template:
    name: str
    intercept: str                       # APM intercept name (sandbox.svm.intercepts)
    build: Callable[[random.Random], bytes]
    prefixes: tuple[int, ...] = LEGACY   # prefixes that may precede it
    rex: bool = True


def _fixed(b: bytes) -> Callable[[random.Random], bytes]:
    return lambda rng: b


def _op_modrm(op: bytes, reg: int, mem: bool | None = None) -> Callable[[random.Random], bytes]:
    def f(rng: random.Random) -> bytes:
        use_mem = mem if mem is not None else rng.random() < 0.5
        return op + (modrm_mem(rng, reg) if use_mem else modrm_reg(rng, reg))
    return f


def _crdr(op2: int, regs: tuple[int, ...]) -> Callable[[random.Random], bytes]:
    return lambda rng: bytes([0x0F, op2, 0xC0 | (pick(rng, regs) << 3) | below(rng, 8)])


def _imm8(op: int, values: tuple[int, ...] = ()) -> Callable[[random.Random], bytes]:
    return lambda rng: bytes([op, pick(rng, values) if values and rng.random() < 0.7 else below(rng, 256)])


TABLE: tuple[Template, ...] = (
    Template("cpuid", "cpuid", _fixed(b"\x0f\xa2")),
    Template("rdtsc", "rdtsc", _fixed(b"\x0f\x31")),
    Template("rdtscp", "rdtscp", _fixed(b"\x0f\x01\xf9")),
    Template("rdpmc", "rdpmc", _fixed(b"\x0f\x33")),
    Template("hlt", "hlt", _fixed(b"\xf4")),
    Template("pause", "pause", _fixed(b"\xf3\x90"), prefixes=(0x66, 0x67) + SEGMENT_PREFIXES, rex=False),
    Template("invd", "invd", _fixed(b"\x0f\x08")),
    Template("wbinvd", "wbinvd", _fixed(b"\x0f\x09")),
    Template("monitor", "monitor", _fixed(b"\x0f\x01\xc8")),
    Template("mwait", "mwait", _fixed(b"\x0f\x01\xc9")),
    Template("xsetbv", "xsetbv", _fixed(b"\x0f\x01\xd1")),
    Template("pushf", "pushf", _fixed(b"\x9c")),
    Template("popf", "popf", _fixed(b"\x9d")),
    Template("iret", "iret", _fixed(b"\xcf")),
    Template("intn", "intn", _imm8(0xCD, (0x80, 0x21, 3, 0x40))),
    Template("int3", "excp3", _fixed(b"\xcc")),
    Template("icebp", "icebp", _fixed(b"\xf1")),
    Template("into", "excp4", _fixed(b"\xce")),
    Template("sgdt", "gdtr_read", _op_modrm(b"\x0f\x01", 0, mem=True)),
    Template("sidt", "idtr_read", _op_modrm(b"\x0f\x01", 1, mem=True)),
    Template("lgdt", "gdtr_write", _op_modrm(b"\x0f\x01", 2, mem=True)),
    Template("lidt", "idtr_write", _op_modrm(b"\x0f\x01", 3, mem=True)),
    Template("smsw", "cr0_read", _op_modrm(b"\x0f\x01", 4)),
    Template("lmsw", "cr0_write", _op_modrm(b"\x0f\x01", 6)),
    Template("invlpg", "invlpg", _op_modrm(b"\x0f\x01", 7, mem=True)),
    Template("sldt", "ldtr_read", _op_modrm(b"\x0f\x00", 0)),
    Template("str", "tr_read", _op_modrm(b"\x0f\x00", 1)),
    Template("lldt", "ldtr_write", _op_modrm(b"\x0f\x00", 2)),
    Template("ltr", "tr_write", _op_modrm(b"\x0f\x00", 3)),
    Template("mov_from_cr", "cr0_read", _crdr(0x20, (0, 2, 3, 4))),
    Template("mov_to_cr", "cr0_write", _crdr(0x22, (0, 3, 4))),
    Template("mov_from_dr", "dr7_read", _crdr(0x21, tuple(range(8)))),
    Template("mov_to_dr", "dr7_write", _crdr(0x23, (0, 1, 2, 3, 7))),
    Template("clts", "cr0_write", _fixed(b"\x0f\x06")),
    Template("in_imm", "ioio", lambda rng: bytes([pick(rng, (0xE4, 0xE5)), pick(rng, (0x80, 0x60, 0x70, 0x71, 0xF8, 0x7F, 0xFF))])),
    Template("out_imm", "ioio", lambda rng: bytes([pick(rng, (0xE6, 0xE7)), pick(rng, (0x80, 0x60, 0x70, 0x71, 0xF8, 0x7F, 0xFF))])),
    Template("in_dx", "ioio", lambda rng: bytes([pick(rng, (0xEC, 0xED))])),
    Template("out_dx", "ioio", lambda rng: bytes([pick(rng, (0xEE, 0xEF))])),
    Template("ins", "ioio", lambda rng: bytes([pick(rng, (0x6C, 0x6D))])),
    Template("outs", "ioio", lambda rng: bytes([pick(rng, (0x6E, 0x6F))])),
    Template("rdmsr", "msr", _fixed(b"\x0f\x32")),
    Template("wrmsr", "msr", _fixed(b"\x0f\x30")),
    Template("vmmcall", "vmmcall", _fixed(b"\x0f\x01\xd9")),
    Template("vmrun", "vmrun", _fixed(b"\x0f\x01\xd8")),
    Template("vmload", "vmload", _fixed(b"\x0f\x01\xda")),
    Template("vmsave", "vmsave", _fixed(b"\x0f\x01\xdb")),
    Template("stgi", "stgi", _fixed(b"\x0f\x01\xdc")),
    Template("clgi", "clgi", _fixed(b"\x0f\x01\xdd")),
    Template("skinit", "skinit", _fixed(b"\x0f\x01\xde")),
    Template("invlpga", "invlpga", _fixed(b"\x0f\x01\xdf")),
    Template("rsm", "rsm", _fixed(b"\x0f\xaa")),
    Template("rdpru", "rdpru", _fixed(b"\x0f\x01\xfd")),
    Template("invpcid", "invpcid", lambda rng: b"\x66\x0f\x38\x82" + modrm_mem(rng, below(rng, 4))),
)

#: benign filler: register moves, arithmetic, stack, data-page stores, short forward jumps
def filler(rng: random.Random) -> bytes:
    r = below(rng, 9)
    if r == 0:
        return bytes([0x48, 0xC7, 0xC0 | pick(rng, (0, 1, 2)), *below(rng, 0x1000).to_bytes(4, "little")])
    if r == 1:
        return bytes([0x48, 0x01, 0xC0 | (below(rng, 8) << 3) | pick(rng, (0, 1, 2, 8 % 8))])
    if r == 2:
        return b"\x90"
    if r == 3:
        return bytes([0x50 + pick(rng, (0, 1, 3)), 0x58 + pick(rng, (0, 1, 3))])       # push/pop pair
    if r == 4:
        return b"\x48\x89" + modrm_mem(rng, pick(rng, (0, 1, 2)))                      # store to data
    if r == 5:
        return b"\xeb\x00"                                                             # jmp +0
    if r == 6:
        return bytes([0x31, 0xC0 | (pick(rng, (0, 1, 2)) * 9)])                        # xor r, r
    if r == 7:
        return b"\x48\x8b" + modrm_mem(rng, pick(rng, (0, 1, 2)))                      # load from data
    return bytes([0x66, 0xBA, *pick(rng, (0x80, 0x60, 0x3F8, 0x7FF, 0xFFFF, 0x1F0)).to_bytes(2, "little")])  # mov dx, port
