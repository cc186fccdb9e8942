"""Decoder for the instructions an SVM intercept can name.

Two jobs, both over raw instruction bytes:

* :func:`scan` finds every byte offset in a code window where an
  instruction of an armed class *could* begin, prefixes included.  Over-
  approximating is sound: a hook on an address where no instruction starts
  never fires.
* :func:`decode` decodes the one instruction at a hooked address: its class,
  length, prefixes and the operand fields that EXITINFO needs.

Only the sensitive opcodes are decoded in full; anything else comes back as
``None`` and runs natively.  64-bit mode encoding rules (APM vol. 3).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs

LEGACY_PREFIXES = frozenset({0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65})
SEG_PREFIX = {0x26: 0, 0x2E: 1, 0x36: 2, 0x3E: 3, 0x64: 4, 0x65: 5}   # ES CS SS DS FS GS
PREFIX_BYTES = LEGACY_PREFIXES | frozenset(range(0x40, 0x50))
MAX_INSN = 15


class Kind(Enum):
    CPUID = "cpuid"
    RDTSC = "rdtsc"
    RDTSCP = "rdtscp"
    RDPMC = "rdpmc"
    HLT = "hlt"
    PAUSE = "pause"
    INVLPG = "invlpg"
    INVLPGA = "invlpga"
    INVD = "invd"
    WBINVD = "wbinvd"
    MONITOR = "monitor"
    MWAIT = "mwait"
    XSETBV = "xsetbv"
    PUSHF = "pushf"
    POPF = "popf"
    IRET = "iret"
    INTN = "intn"
    INT3 = "int3"
    INTO = "into"
    ICEBP = "icebp"
    SGDT = "sgdt"
    SIDT = "sidt"
    SLDT = "sldt"
    STR = "str"
    LGDT = "lgdt"
    LIDT = "lidt"
    LLDT = "lldt"
    LTR = "ltr"
    MOV_FROM_CR = "mov_from_cr"
    MOV_TO_CR = "mov_to_cr"
    SMSW = "smsw"
    LMSW = "lmsw"
    CLTS = "clts"
    MOV_FROM_DR = "mov_from_dr"
    MOV_TO_DR = "mov_to_dr"
    IN = "in"
    OUT = "out"
    INS = "ins"
    OUTS = "outs"
    RDMSR = "rdmsr"
    WRMSR = "wrmsr"
    VMMCALL = "vmmcall"
    VMRUN = "vmrun"
    VMLOAD = "vmload"
    VMSAVE = "vmsave"
    STGI = "stgi"
    CLGI = "clgi"
    SKINIT = "skinit"
    RSM = "rsm"
    RDPRU = "rdpru"
    INVPCID = "invpcid"
    STI = "sti"
    WRFSBASE = "wrfsbase"
    WRGSBASE = "wrgsbase"
    #: MOV Sreg (8E /4, /5) and POP FS/GS (0F A1, 0F A9) into FS or GS: no intercept, but a
    #: null selector keeps the base on the modelled processor (:mod:`.null_selector`)
    LOAD_FS_GS = "load_fs_gs"
    #: a sensitive legacy 0F-map opcode behind a VEX prefix (C4/C5): no VEX instruction
    #: has that opcode, so it is #UD (APM vol. 3 §1.2.7 and §1.8; SDM vol. 2 §2.3.2),
    #: never the legacy instruction -- which Unicorn would execute (RDTSC, CPUID, MOV CRn ...)
    VEX_LEGACY = "vex_legacy"
    #: the fast system calls: no intercept, but Unicorn runs SYSCALL and SYSENTER as
    #: no-ops and its Intel CPU model decodes SYSENTER/SYSEXIT in long mode (:mod:`.fast_syscall`)
    SYSCALL = "syscall"
    SYSENTER = "sysenter"
    SYSEXIT = "sysexit"


#: the sensitive instructions a LOCK prefix is legal on: MOV to/from CRn, where it is
#: AMD's alternate encoding of CR8 (APM vol. 3 "MOV CRn"); on any other LOCK is #UD
#: (APM vol. 3 §1.2.5), which QEMU does not raise
LOCK_LEGAL = frozenset({Kind.MOV_FROM_CR, Kind.MOV_TO_CR})


@dataclass(slots=True)
class Insn:
    kind: Kind
    length: int
    opsize: int = 32           # operand size in bits
    addrsize: int = 64
    rep: bool = False          # F3 (or F2) present
    lock: bool = False
    seg: int | None = None     # explicit segment override (0-5)
    rex: int = 0
    reg: int = 0               # ModRM.reg (+REX.R) -- CR/DR number, /digit
    rm: int = 0                # ModRM.rm (+REX.B) -- GPR for register forms
    mod: int = 3
    imm: int | None = None     # imm8 of INT n / IN / OUT
    modrm_off: int = 0         # offset of the ModRM byte within the instruction
    opcode_off: int = 0
    mode: int = 64             # the code segment's size it was decoded for: 64, 32 or 16


# opcodes after 0F that are sensitive on their own (second byte -> kind)
_0F_SIMPLE = {
    0xA2: Kind.CPUID, 0x31: Kind.RDTSC, 0x33: Kind.RDPMC, 0x30: Kind.WRMSR, 0x32: Kind.RDMSR,
    0x08: Kind.INVD, 0x09: Kind.WBINVD, 0x06: Kind.CLTS, 0xAA: Kind.RSM,
    0x05: Kind.SYSCALL, 0x34: Kind.SYSENTER, 0x35: Kind.SYSEXIT,
}
# 0F 01 with mod == 11: third byte -> kind
_0F01_REG = {
    0xC8: Kind.MONITOR, 0xC9: Kind.MWAIT, 0xFA: Kind.MONITOR, 0xFB: Kind.MWAIT,
    0xD1: Kind.XSETBV, 0xD8: Kind.VMRUN, 0xD9: Kind.VMMCALL, 0xDA: Kind.VMLOAD, 0xDB: Kind.VMSAVE,
    0xDC: Kind.STGI, 0xDD: Kind.CLGI, 0xDE: Kind.SKINIT, 0xDF: Kind.INVLPGA, 0xF9: Kind.RDTSCP,
    0xFD: Kind.RDPRU,
}
_0F01_MEM = {0: Kind.SGDT, 1: Kind.SIDT, 2: Kind.LGDT, 3: Kind.LIDT, 4: Kind.SMSW, 6: Kind.LMSW, 7: Kind.INVLPG}
_0F00 = {0: Kind.SLDT, 1: Kind.STR, 2: Kind.LLDT, 3: Kind.LTR}
_ONE_BYTE = {
    0xF4: Kind.HLT, 0x9C: Kind.PUSHF, 0x9D: Kind.POPF, 0xCF: Kind.IRET, 0xCD: Kind.INTN,
    0xCC: Kind.INT3, 0xCE: Kind.INTO, 0xF1: Kind.ICEBP, 0xFB: Kind.STI,
    0xE4: Kind.IN, 0xE5: Kind.IN, 0xEC: Kind.IN, 0xED: Kind.IN,
    0xE6: Kind.OUT, 0xE7: Kind.OUT, 0xEE: Kind.OUT, 0xEF: Kind.OUT,
    0x6C: Kind.INS, 0x6D: Kind.INS, 0x6E: Kind.OUTS, 0x6F: Kind.OUTS,
}


def _modrm_len(code: bytes, i: int, addrsize: int) -> int | None:
    """Bytes taken by ModRM (+SIB +displacement) at ``code[i]``; None if truncated."""
    if i >= len(code):
        return None
    m = code[i]
    mod, rm = m >> 6, m & 7
    n = 1
    if mod == 3:
        return n
    if addrsize == 16:         # no SIB; disp16 alone for mod 00 rm 110 (APM vol. 3 §1.4.2)
        return n + (2 if (mod == 0 and rm == 6) or mod == 2 else mod)
    if rm == 4:
        if i + 1 >= len(code):
            return None
        sib = code[i + 1]
        n += 1
        if mod == 0 and (sib & 7) == 5:
            n += 4
    if mod == 0 and rm == 5:
        n += 4
    elif mod == 1:
        n += 1
    elif mod == 2:
        n += 4
    return n


@dataclass(slots=True)
class _Prefixes:
    """The prefixes in front of an opcode, and the sizes they select."""
    at: int                    # offset of the opcode
    opsize_66: bool
    rep: bool
    last_rep: int
    lock: bool
    seg: int | None
    rex: int
    opsize: int
    addrsize: int
    mode: int = 64

    @property
    def rex_r(self) -> int:
        return (self.rex >> 2) & 1

    @property
    def rex_b(self) -> int:
        return self.rex & 1

    def mk(self, kind: Kind, length: int, **kw) -> Insn | None:
        if length > MAX_INSN:
            return None       # over-long: #GP at decode, no intercept
        return Insn(kind, length, opsize=self.opsize, addrsize=self.addrsize, rep=self.rep, lock=self.lock,
                    seg=self.seg, rex=self.rex, opcode_off=self.at, mode=self.mode, **kw)


def _prefixes(code: bytes, mode: int = 64) -> _Prefixes | None:
    """Legacy prefixes and REX bytes in any order; a REX counts only when it
    immediately precedes the opcode (APM vol. 3 §1.2.7), otherwise it is ignored.
    Outside 64-bit mode (``mode`` 32 or 16, the code segment's size) 40-4F are
    INC/DEC, and the default operand and address sizes are the segment's (§1.2.2-3)."""
    i = 0
    opsize_66 = addr_67 = rep = lock = False
    seg = None
    last_rep = 0
    rex = 0
    n = len(code)
    while i < n and code[i] in PREFIX_BYTES:
        b = code[i]
        if 0x40 <= b <= 0x4F:
            if mode != 64:
                break                  # INC/DEC: an opcode
            rex = b
            i += 1
            continue
        rex = 0
        if b == 0x66:
            opsize_66 = True
        elif b == 0x67:
            addr_67 = True
        elif b in (0xF3, 0xF2):
            rep = True
            last_rep = b
        elif b == 0xF0:
            lock = True
        else:
            seg = SEG_PREFIX[b]
        i += 1
    if i >= n:
        return None
    if mode == 64:
        opsize = 64 if rex & 8 else (16 if opsize_66 else 32)
        addrsize = 32 if addr_67 else 64
    else:
        other = 16 if mode == 32 else 32
        opsize = other if opsize_66 else mode
        addrsize = other if addr_67 else mode
    return _Prefixes(i, opsize_66, rep, last_rep, lock, seg, rex, opsize, addrsize, mode)


def decode(code: bytes, mode: int = 64) -> Insn | None:
    """Decode the instruction at ``code[0]`` if it is one an intercept can name, as
    code of a ``mode``-bit code segment (64: CS.L; 32: CS.D; 16)."""
    p = _prefixes(code, mode)
    if p is None:
        return None
    op = code[p.at]
    if op == 0x0F:
        return _decode_0f(code, p)
    if op in VEX_PREFIXES:
        return _decode_vex(code, p)
    return _decode_one_byte(code, p)


#: the VEX prefixes (in 64-bit mode always VEX; elsewhere VEX when the next byte's
#: top two bits are set, else LES/LDS -- the processor checks the mode)
VEX_PREFIXES = (0xC4, 0xC5)
#: second bytes after 0F of the sensitive legacy instructions; with ModRM where they have one
_VEX_SENSITIVE_0F = frozenset(_0F_SIMPLE) | {0x00, 0x01, 0x20, 0x21, 0x22, 0x23, 0xAE}
_VEX_MODRM = frozenset({0x00, 0x01, 0x20, 0x21, 0x22, 0x23, 0xAE})


def vex_opcode(code: bytes, at: int) -> tuple[int, int, int] | None:
    """(opcode map, opcode, offset after the opcode) of the VEX instruction at
    ``code[at]`` (C5: map 1, the 0F map; C4: the map in its mmmmm field), or
    None when truncated."""
    if code[at] == 0xC5:
        return (1, code[at + 2], at + 3) if at + 2 < len(code) else None
    return (code[at + 1] & 0x1F, code[at + 3], at + 4) if at + 3 < len(code) else None


def _decode_vex(code: bytes, p: _Prefixes) -> Insn | None:
    """A VEX prefix on a sensitive legacy opcode (map 0F, or INVPCID's 0F 38 82)."""
    if p.mode != 64 and (p.at + 1 >= len(code) or code[p.at + 1] >> 6 != 3):
        return None                   # LES/LDS outside 64-bit mode
    v = vex_opcode(code, p.at)
    if v is None:
        return None
    vmap, op, after = v
    if vmap == 1 and op in _VEX_SENSITIVE_0F:
        if op == 0xAE:
            # VEX.0F AE /2 /3 with a memory operand are VLDMXCSR / VSTMXCSR; only
            # the register forms (WRFSBASE/WRGSBASE's) are #UD
            if after >= len(code) or code[after] >> 6 != 3 or (code[after] >> 3) & 7 not in (2, 3):
                return None
        ml = _modrm_len(code, after, p.addrsize) if op in _VEX_MODRM else 0
    elif vmap == 2 and op == 0x82:
        ml = _modrm_len(code, after, p.addrsize)
    else:
        return None
    return p.mk(Kind.VEX_LEGACY, after + (ml or 0))


def _decode_one_byte(code: bytes, p: _Prefixes) -> Insn | None:
    i = p.at
    op = code[i]
    if op == 0x8E:
        return _decode_mov_sreg(code, p)
    if op == 0x90 and p.rep and p.last_rep == 0xF3 and not p.rex & 1:
        return p.mk(Kind.PAUSE, i + 1)
    kind = _ONE_BYTE.get(op)
    if kind is None:
        return None
    if kind in (Kind.INTN,) or op in (0xE4, 0xE5, 0xE6, 0xE7):
        if i + 1 >= len(code):
            return None
        ins = p.mk(kind, i + 2, imm=code[i + 1])
    else:
        ins = p.mk(kind, i + 1)
    if ins is not None and kind in (Kind.IN, Kind.OUT, Kind.INS, Kind.OUTS):
        # operand size of the port access: byte forms have an even opcode; at most 32 bits
        ins.opsize = 8 if op % 2 == 0 else (16 if p.opsize == 16 else 32)
    if ins is not None and kind in (Kind.PUSHF, Kind.POPF, Kind.IRET) and p.mode == 64:
        # 64-bit mode: PUSHF/POPF default to 64 bits, IRET to 32 (IRETQ with REX.W)
        ins.opsize = 64 if (p.rex & 8 or (kind != Kind.IRET and not p.opsize_66)) else (16 if p.opsize_66 else 32)
    return ins


def _decode_mov_sreg(code: bytes, p: _Prefixes) -> Insn | None:
    """MOV FS/GS, r/m16 (8E /4, /5): ``reg`` is the segment (4 FS, 5 GS)."""
    i = p.at
    if i + 1 >= len(code) or (code[i + 1] >> 3) & 7 not in (4, 5):
        return None
    m = code[i + 1]
    ml = _modrm_len(code, i + 1, p.addrsize)
    if ml is None:
        return None
    return p.mk(Kind.LOAD_FS_GS, i + 1 + ml, reg=(m >> 3) & 7, rm=(m & 7) | (p.rex_b << 3), mod=m >> 6,
                modrm_off=i + 1)


#: POP FS, POP GS: second byte after 0F -> the segment (4 FS, 5 GS)
_POP_FS_GS = {0xA1: 4, 0xA9: 5}


def _decode_0f(code: bytes, p: _Prefixes) -> Insn | None:
    i, n = p.at, len(code)
    if i + 1 >= n:
        return None
    op2 = code[i + 1]
    if op2 in _POP_FS_GS:
        # in 64-bit mode 64-bit operand size by default, 16 with 66 (APM vol. 3 "POP"); ``mod`` -1: no ModRM
        ins = p.mk(Kind.LOAD_FS_GS, i + 2, reg=_POP_FS_GS[op2], mod=-1)
        if ins is not None and p.mode == 64:
            ins.opsize = 16 if p.opsize_66 and not p.rex & 8 else 64
        return ins
    if op2 in _0F_SIMPLE:
        return p.mk(_0F_SIMPLE[op2], i + 2)
    if op2 in (0x20, 0x22, 0x21, 0x23):
        if i + 2 >= n:
            return None
        m = code[i + 2]
        reg = ((m >> 3) & 7) | (p.rex_r << 3)
        if op2 in (0x20, 0x22) and p.lock:
            reg |= 8          # LOCK MOV CR0 is the AMD alternate encoding of CR8
        kind = {0x20: Kind.MOV_FROM_CR, 0x22: Kind.MOV_TO_CR,
                0x21: Kind.MOV_FROM_DR, 0x23: Kind.MOV_TO_DR}[op2]
        # MOV CR/DR ignore ModRM.mod and always take a register operand
        return p.mk(kind, i + 3, reg=reg, rm=(m & 7) | (p.rex_b << 3), mod=3, modrm_off=i + 2)
    if op2 == 0x01:
        return _decode_0f01(code, p) if i + 2 < n else None
    if op2 == 0x00:
        if i + 2 >= n:
            return None
        m = code[i + 2]
        digit = (m >> 3) & 7
        if digit not in _0F00:
            return None
        ml = _modrm_len(code, i + 2, p.addrsize)
        if ml is None:
            return None
        return p.mk(_0F00[digit], i + 2 + ml, reg=digit, rm=(m & 7) | (p.rex_b << 3), mod=m >> 6,
                    modrm_off=i + 2)
    if op2 == 0xAE and p.last_rep == 0xF3 and i + 2 < n and code[i + 2] >> 6 == 3 \
            and (code[i + 2] >> 3) & 7 in (2, 3):
        m = code[i + 2]                 # F3 0F AE /2, /3 (register form): WRFSBASE, WRGSBASE
        return p.mk(Kind.WRFSBASE if (m >> 3) & 7 == 2 else Kind.WRGSBASE, i + 3,
                    rm=(m & 7) | (p.rex_b << 3), modrm_off=i + 2)
    if op2 == 0x38 and i + 2 < n and code[i + 2] == 0x82 and p.opsize_66:
        ml = _modrm_len(code, i + 3, p.addrsize)
        if ml is None:
            return None
        return p.mk(Kind.INVPCID, i + 3 + ml, modrm_off=i + 3)
    return None


def _decode_0f01(code: bytes, p: _Prefixes) -> Insn | None:
    """Group 7 (0F 01): the SVM instructions, MONITOR/MWAIT, descriptor tables, SMSW/LMSW, INVLPG."""
    i = p.at
    m = code[i + 2]
    mod, digit = m >> 6, (m >> 3) & 7
    if mod == 3:
        if m in _0F01_REG:
            return p.mk(_0F01_REG[m], i + 3, modrm_off=i + 2)
        if digit == 4:
            return p.mk(Kind.SMSW, i + 3, rm=(m & 7) | (p.rex_b << 3), mod=3, modrm_off=i + 2)
        if digit == 6:
            return p.mk(Kind.LMSW, i + 3, rm=(m & 7) | (p.rex_b << 3), mod=3, modrm_off=i + 2)
        return None
    if digit in _0F01_MEM and digit != 5:
        ml = _modrm_len(code, i + 2, p.addrsize)
        if ml is None:
            return None
        return p.mk(_0F01_MEM[digit], i + 2 + ml, reg=digit, rm=(m & 7) | (p.rex_b << 3), mod=mod,
                    modrm_off=i + 2)
    return None


# -- candidate scanning ------------------------------------------------------------
#: first opcode byte -> kinds it may begin (used to build the scan set)
def opcode_starts(kinds: set[Kind]) -> tuple[frozenset[int], frozenset[int]]:
    """(single-byte opcodes, second bytes after 0F) that can begin one of ``kinds``."""
    one = {op for op, k in _ONE_BYTE.items() if k in kinds}
    if Kind.PAUSE in kinds:
        one.add(0x90)
    two: set[int] = {op2 for op2, k in _0F_SIMPLE.items() if k in kinds}
    if kinds & {Kind.MOV_FROM_CR, Kind.MOV_TO_CR, Kind.MOV_FROM_DR, Kind.MOV_TO_DR}:
        two |= {0x20, 0x21, 0x22, 0x23}
    if kinds & (set(_0F01_REG.values()) | set(_0F01_MEM.values())):
        two.add(0x01)
    if kinds & set(_0F00.values()):
        two.add(0x00)
    if Kind.INVPCID in kinds:
        two.add(0x38)
    if kinds & {Kind.WRFSBASE, Kind.WRGSBASE}:
        two.add(0xAE)
    if Kind.LOAD_FS_GS in kinds:
        one.add(0x8E)
        two |= set(_POP_FS_GS)
    return frozenset(one), frozenset(two)


#: the opcodes of every sensitive instruction: LOCK before any of them is #UD, the
#: instruction armed or not (:func:`scan`); LOCK MOV CRn (AMD's CR8) is legal
_ALL_ONE, _ALL_TWO = opcode_starts(set(Kind))
_LOCKED_TWO = _ALL_TWO - {0x20, 0x22}


def _locks_sensitive(window: bytes, j: int) -> bool:
    """Whether the LOCK at ``window[j]`` stands before a sensitive opcode (after
    more prefixes, if any): an opcode beyond the window counts as one (be safe)."""
    n = len(window)
    k = j + 1
    while k < n and k - j < MAX_INSN and window[k] in PREFIX_BYTES:
        k += 1
    if k >= n:
        return True
    op = window[k]
    if op == 0x0F:
        return k + 1 >= n or window[k + 1] in _LOCKED_TWO
    return op in _ALL_ONE


def _starts_table(one: frozenset[int]) -> bytes:
    """A ``bytes.translate`` table marking (01) the bytes that may begin a
    candidate: the single-byte opcodes of ``one``, 0F, LOCK and the VEX prefixes."""
    t = _STARTS.get(one)
    if t is None:
        if len(_STARTS) >= 64:
            _STARTS.clear()
        marks = one | {0x0F, 0xF0} | set(VEX_PREFIXES)
        t = _STARTS[one] = bytes(1 if b in marks else 0 for b in range(256))
    return t


_STARTS: dict[frozenset[int], bytes] = {}


def scan(window: bytes, limit: int, one: frozenset[int], two: frozenset[int]) -> list[int]:
    """Offsets ``< limit`` in ``window`` where an armed instruction may start.

    ``window`` may extend past ``limit`` (the next page's first bytes) so an
    instruction straddling the boundary is seen.  Every run of prefix bytes
    immediately before an opcode match also yields a candidate per byte.
    A LOCK prefix before any sensitive opcode is a candidate, armed or not: the
    hook raises the #UD the prefix makes it (QEMU runs it unprefixed).
    Candidates for a VEX prefix on a sensitive legacy 0F opcode are included,
    armed or not: Unicorn would run it as the legacy instruction, which must be
    #UD instead (an escape when its intercept is armed, a wrong result when it
    is not).  One ``translate`` marks every byte that may begin a candidate and
    ``find`` goes from one mark to the next (the page is mostly zeros).
    """
    hits: set[int] = set()
    n = len(window)
    marked = window.translate(_starts_table(one))
    # 90 is in ``one`` for PAUSE alone, which is F3 90: a bare 90 (NOP) is never
    # one, and only the prefix bytes with an F3 at or after them in the run are
    pause_only = 0x90 not in _ONE_BYTE
    j = marked.find(1)
    while j != -1:
        b = window[j]
        if b in one:
            # 8E is MOV Sreg: only its FS and GS forms (ModRM.reg 4, 5); a ModRM beyond the window: be safe
            hit = b != 0x8E or j + 1 >= n or (window[j + 1] >> 3) & 7 in (4, 5)
        elif b == 0x0F:
            # 0F AE is a candidate only in its WRFSBASE/WRGSBASE register forms (not the fences);
            # an opcode byte beyond the window: be safe
            hit = bool(two) and (j + 1 >= n or (window[j + 1] in two and (
                window[j + 1] != 0xAE or j + 2 >= n or 0xD0 <= window[j + 2] <= 0xDF)))
        elif b == 0xF0:
            # LOCK before any sensitive opcode, armed or not: the hook raises #UD
            # (APM vol. 3 §1.2.5), which QEMU would not
            hit = _locks_sensitive(window, j)
        else:
            v = vex_opcode(window, j)
            hit = v is None or (v[0] == 1 and v[1] in _VEX_SENSITIVE_0F) or (v[0] == 2 and v[1] == 0x82)
        if hit:
            pause = b == 0x90 and pause_only
            if j < limit and not pause:
                hits.add(j)
            f3 = not pause
            k = j - 1
            while k >= 0 and j - k < MAX_INSN and window[k] in PREFIX_BYTES:
                f3 = f3 or window[k] == 0xF3
                if f3 and k < limit:
                    hits.add(k)
                k -= 1
        j = marked.find(1, j + 1)
    return sorted(hits)


def capstone_decoders(detail: bool = False) -> dict[int, Cs]:
    """A capstone decoder for each code-segment size -- 64 (64-bit mode), 32 and 16 --
    with operand details when ``detail``."""
    out = {64: Cs(CS_ARCH_X86, CS_MODE_64), 32: Cs(CS_ARCH_X86, CS_MODE_32), 16: Cs(CS_ARCH_X86, CS_MODE_16)}
    for cs in out.values():
        cs.detail = detail
    return out


#: capstone, for the length of an instruction the decoder does not model
_CS = capstone_decoders()


def length_of(code: bytes, mode: int = 64) -> int | None:
    """Length of any instruction at ``code[0]`` in a ``mode``-bit code segment (capstone), or None."""
    for ins in _CS[mode].disasm(code, 0, 1):
        return ins.size
    return None


def whole_insns(code: bytes, mode: int = 64, limit: int = 0) -> int:
    """How many instructions decode back to back from ``code[0]`` within ``code``
    (an instruction cut off at its end is not counted), at most ``limit`` (0:
    no limit): one capstone pass, a third of the cost of one call per length."""
    n = 0
    for _ in _CS[mode].disasm_lite(code, 0):
        n += 1
        if n == limit:
            break
    return n
