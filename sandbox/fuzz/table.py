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


#: ``Random.getrandbits`` and ``Random.random`` of the case's generator, bound once per
#: case and passed down: looking either up on a ``Random`` costs more than the draw
Bits = Callable[[int], int]
Uniform = Callable[[], float]


def below(rng: random.Random, n: int) -> int:
    """``rng.randrange(n)`` for ``n > 0``, drawn as CPython's ``Random`` draws it
    (``getrandbits`` of ``n``'s bit length, redrawn while out of range), so a
    seed gives the same cases; one Python frame instead of the two or three of
    ``randrange``/``choice``."""
    return _below(rng.getrandbits, n)


def _below(bits: Bits, n: int) -> int:
    """:func:`below` from the generator's bound ``getrandbits``."""
    k = n.bit_length()
    r = bits(k)
    while r >= n:
        r = bits(k)
    return r


def pick(rng: random.Random, seq):
    """``rng.choice(seq)`` for a non-empty ``seq``, drawn as :func:`below` draws."""
    return seq[_below(rng.getrandbits, len(seq))]


# The hot draws below are :func:`below`'s and ``Random.random``'s, in the order the
# plain code would make them, written out inline: ``bits(k)`` redrawn while out of
# range is ``below(n)`` with ``k = n.bit_length()`` (so ``below(8)`` draws 4 bits).
# What a draw selects comes from tables built once: a case draws about 400 times,
# and a Python frame or a ``bytes([...])`` per draw cost more than the draws.

#: ModRM byte for (mod, reg, rm): ``_MODRM[mod * 64 + reg * 8 + rm]`` (one-byte bytes)
_MODRM = tuple(bytes([(mod << 6) | (reg << 3) | rm]) for mod in range(4) for reg in range(8) for rm in range(8))
#: a SIB byte for (scale, index, base): ``_BYTE[scale * 64 + index * 8 + base]``; any byte
_BYTE = tuple(bytes([b]) for b in range(256))
#: the RIP-relative memory operand's disp32 for ``below(128) - 64``
_RIP_DISP = tuple((d - 64).to_bytes(4, "little", signed=True) for d in range(128))
_BASES = (3, 6, 7)                         # rbx rsi rdi: initialised to point into the data page
_INDEXES = (0, 1, 2, 4)                    # rax rcx rdx none


def modrm_mem(rng: random.Random, reg: int) -> bytes:
    """A memory ModRM (+SIB, +disp) with ``reg`` in ModRM.reg; base registers
    are those the case initialises to point into the data page."""
    return _modrm_mem(rng.getrandbits, rng.random, reg)


def _modrm_mem(bits: Bits, rand: Uniform, reg: int) -> bytes:
    mod = bits(2)                          # pick((0, 1, 2))
    while mod == 3:
        mod = bits(2)
    form = rand()
    if form < 0.15:                        # RIP-relative
        d = bits(8)                        # below(128)
        while d >= 128:
            d = bits(8)
        return _MODRM[reg * 8 + 5] + _RIP_DISP[d]
    base = bits(2)                         # pick(_BASES)
    while base == 3:
        base = bits(2)
    if form < 0.45:
        idx = bits(3)                      # pick(_INDEXES)
        while idx >= 4:
            idx = bits(3)
        scale = bits(3)                    # below(4)
        while scale >= 4:
            scale = bits(3)
        m = _MODRM[mod * 64 + reg * 8 + 4] + _BYTE[scale * 64 + _INDEXES[idx] * 8 + _BASES[base]]
    else:
        m = _MODRM[mod * 64 + reg * 8 + _BASES[base]]
    if mod == 1:
        d = bits(9)                        # below(256)
        while d >= 256:
            d = bits(9)
        return m + _BYTE[d]
    if mod == 2:
        d = bits(12)                       # below(0x800)
        while d >= 0x800:
            d = bits(12)
        return m + d.to_bytes(4, "little")
    return m


def modrm_reg(rng: random.Random, reg: int) -> bytes:
    return _MODRM[192 + reg * 8 + below(rng, 8)]


@dataclass(frozen=True)
class Template:
    name: str
    intercept: str                       # APM intercept name (sandbox.svm.intercepts)
    #: the encoding: fixed bytes, or drawn by ``draw(getrandbits, random)`` of a generator
    draw: bytes | Callable[[Bits, Uniform], bytes]
    prefixes: tuple[int, ...] = LEGACY   # prefixes that may precede it
    rex: bool = True

    def build(self, rng: random.Random) -> bytes:
        """One encoding, drawn from ``rng``."""
        d = self.draw
        return d if isinstance(d, bytes) else d(rng.getrandbits, rng.random)


def _op_modrm(op: bytes, reg: int, mem: bool | None = None) -> Callable[[Bits, Uniform], bytes]:
    def f(bits: Bits, rand: Uniform) -> bytes:
        if mem if mem is not None else rand() < 0.5:
            return op + _modrm_mem(bits, rand, reg)
        return op + _MODRM[192 + reg * 8 + _below(bits, 8)]
    return f


def _crdr(op2: int, regs: tuple[int, ...]) -> Callable[[Bits, Uniform], bytes]:
    return lambda bits, rand: bytes([0x0F, op2, 0xC0 | (regs[_below(bits, len(regs))] << 3) | _below(bits, 8)])


def _imm8(op: int, values: tuple[int, ...] = ()) -> Callable[[Bits, Uniform], bytes]:
    return lambda bits, rand: bytes([op, values[_below(bits, len(values))] if values and rand() < 0.7
                                     else _below(bits, 256)])


def _one_of(*ops: int) -> Callable[[Bits, Uniform], bytes]:
    return lambda bits, rand: _BYTE[ops[_below(bits, len(ops))]]


def _io_imm(*ops: int) -> Callable[[Bits, Uniform], bytes]:
    ports = (0x80, 0x60, 0x70, 0x71, 0xF8, 0x7F, 0xFF)
    return lambda bits, rand: _BYTE[ops[_below(bits, len(ops))]] + _BYTE[ports[_below(bits, len(ports))]]


TABLE: tuple[Template, ...] = (
    Template("cpuid", "cpuid", b"\x0f\xa2"),
    Template("rdtsc", "rdtsc", b"\x0f\x31"),
    Template("rdtscp", "rdtscp", b"\x0f\x01\xf9"),
    Template("rdpmc", "rdpmc", b"\x0f\x33"),
    Template("hlt", "hlt", b"\xf4"),
    Template("pause", "pause", b"\xf3\x90", prefixes=(0x66, 0x67) + SEGMENT_PREFIXES, rex=False),
    Template("invd", "invd", b"\x0f\x08"),
    Template("wbinvd", "wbinvd", b"\x0f\x09"),
    Template("monitor", "monitor", b"\x0f\x01\xc8"),
    Template("mwait", "mwait", b"\x0f\x01\xc9"),
    Template("xsetbv", "xsetbv", b"\x0f\x01\xd1"),
    Template("pushf", "pushf", b"\x9c"),
    Template("popf", "popf", b"\x9d"),
    Template("iret", "iret", b"\xcf"),
    Template("intn", "intn", _imm8(0xCD, (0x80, 0x21, 3, 0x40))),
    Template("int3", "excp3", b"\xcc"),
    Template("icebp", "icebp", b"\xf1"),
    Template("into", "excp4", b"\xce"),
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
    Template("clts", "cr0_write", b"\x0f\x06"),
    Template("in_imm", "ioio", _io_imm(0xE4, 0xE5)),
    Template("out_imm", "ioio", _io_imm(0xE6, 0xE7)),
    Template("in_dx", "ioio", _one_of(0xEC, 0xED)),
    Template("out_dx", "ioio", _one_of(0xEE, 0xEF)),
    Template("ins", "ioio", _one_of(0x6C, 0x6D)),
    Template("outs", "ioio", _one_of(0x6E, 0x6F)),
    Template("rdmsr", "msr", b"\x0f\x32"),
    Template("wrmsr", "msr", b"\x0f\x30"),
    Template("vmmcall", "vmmcall", b"\x0f\x01\xd9"),
    Template("vmrun", "vmrun", b"\x0f\x01\xd8"),
    Template("vmload", "vmload", b"\x0f\x01\xda"),
    Template("vmsave", "vmsave", b"\x0f\x01\xdb"),
    Template("stgi", "stgi", b"\x0f\x01\xdc"),
    Template("clgi", "clgi", b"\x0f\x01\xdd"),
    Template("skinit", "skinit", b"\x0f\x01\xde"),
    Template("invlpga", "invlpga", b"\x0f\x01\xdf"),
    Template("rsm", "rsm", b"\x0f\xaa"),
    Template("rdpru", "rdpru", b"\x0f\x01\xfd"),
    Template("invpcid", "invpcid", lambda bits, rand: b"\x66\x0f\x38\x82" + _modrm_mem(bits, rand, _below(bits, 4))),
)

_F_MOV_IMM = tuple(bytes([0x48, 0xC7, 0xC0 | r]) for r in (0, 1, 2))                     # mov r64, imm32
_F_ADD = tuple(bytes([0x48, 0x01, 0xC0 | (a << 3) | b]) for a in range(8) for b in (0, 1, 2, 0))  # add r, r
_F_PUSH_POP = tuple(bytes([0x50 + a, 0x58 + b]) for a in (0, 1, 3) for b in (0, 1, 3))
_F_XOR = tuple(bytes([0x31, 0xC0 | (r * 9)]) for r in (0, 1, 2))
_F_MOV_DX = tuple(bytes([0x66, 0xBA, *p.to_bytes(2, "little")]) for p in (0x80, 0x60, 0x3F8, 0x7FF, 0xFFFF, 0x1F0))


#: benign filler: register moves, arithmetic, stack, data-page stores, short forward jumps
def filler(rng: random.Random) -> bytes:
    return draw_filler(rng.getrandbits, rng.random)


def draw_filler(bits: Bits, rand: Uniform) -> bytes:
    """:func:`filler` from the generator's bound ``getrandbits`` and ``random``."""
    r = bits(4)                                        # below(9)
    while r >= 9:
        r = bits(4)
    if r == 2:
        return b"\x90"
    if r == 5:
        return b"\xeb\x00"                                                           # jmp +0
    if r == 0:
        a = bits(2)                                    # pick((rax, rcx, rdx))
        while a == 3:
            a = bits(2)
        v = bits(13)                                   # below(0x1000)
        while v >= 0x1000:
            v = bits(13)
        return _F_MOV_IMM[a] + v.to_bytes(4, "little")
    if r == 1:
        a = bits(4)                                    # below(8)
        while a >= 8:
            a = bits(4)
        b = bits(3)                                    # pick of four
        while b >= 4:
            b = bits(3)
        return _F_ADD[a * 4 + b]
    if r == 3:                                         # push/pop pair
        a = bits(2)
        while a == 3:
            a = bits(2)
        b = bits(2)
        while b == 3:
            b = bits(2)
        return _F_PUSH_POP[a * 3 + b]
    if r == 6:                                         # xor r, r
        a = bits(2)
        while a == 3:
            a = bits(2)
        return _F_XOR[a]
    if r == 8:                                         # mov dx, port
        a = bits(3)
        while a >= 6:
            a = bits(3)
        return _F_MOV_DX[a]
    a = bits(2)                                        # reg: pick((0, 1, 2))
    while a == 3:
        a = bits(2)
    return (b"\x48\x89" if r == 4 else b"\x48\x8b") + _modrm_mem(bits, rand, a)    # store to / load from data
