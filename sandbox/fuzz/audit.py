"""The soundness audit: an independent model of which instruction exits, and how.

:func:`expected_exit` decodes one instruction with **capstone** and computes
the #VMEXIT the APM prescribes for it under the current intercept vectors,
IOPM and MSRPM -- EXITCODE, EXITINFO1, EXITINFO2 and nRIP -- without using
the sandbox's decoder or decision code (:mod:`sandbox.svm.decode`,
:mod:`sandbox.svm.decision`).  Exit codes are literal values from APM vol. 2
Appendix C, Table C-1.

:class:`Auditor` runs a case instruction by instruction (a code hook over
every address, installed before any of the processor's own hooks so it sees
each instruction first), and compares each expectation with the exits the
sandbox raised.  Each instruction's bytes are read where the processor
fetched them, and :func:`may_exit` -- a look at the opcode after the
prefixes -- settles the common instruction that no model can expect an exit
from, before any decode:

* an armed intercept whose instruction completed with no #VMEXIT (``missed``);
* a #VMEXIT for an instruction whose intercept is clear (``spurious``);
* a wrong EXITCODE, EXITINFO1, EXITINFO2 or nRIP (``mismatch``).
"""
from __future__ import annotations

from dataclasses import dataclass

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone import x86_const as C
from unicorn import UC_MEM_FETCH, Uc
from unicorn import x86_const as X

from ..arch import MAXPHYADDR
from ..memory.paging import Access
from ..svm.engine import RawCodeHook, RegReader

# APM vol. 2 Table C-1
CPUID, RDTSC, RDTSCP, RDPMC, HLT, PAUSE = 0x72, 0x6E, 0x87, 0x6F, 0x78, 0x77
INVD, WBINVD, MONITOR, MWAIT, XSETBV = 0x76, 0x89, 0x8A, 0x8B, 0x8D
PUSHF, POPF, IRET, SWINT, ICEBP, RSM = 0x70, 0x71, 0x74, 0x75, 0x88, 0x73
IDTR_READ, GDTR_READ, LDTR_READ, TR_READ = 0x66, 0x67, 0x68, 0x69
IDTR_WRITE, GDTR_WRITE, LDTR_WRITE, TR_WRITE = 0x6A, 0x6B, 0x6C, 0x6D
CR_READ, CR_WRITE, DR_READ, DR_WRITE, CR0_SEL_WRITE = 0x00, 0x10, 0x20, 0x30, 0x65
INVLPG, INVLPGA, IOIO, MSR, INVPCID = 0x79, 0x7A, 0x7B, 0x7C, 0xA2
VMRUN, VMMCALL, VMLOAD, VMSAVE, STGI, CLGI, SKINIT = 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86
EXCP_BP, EXCP_PF = 0x43, 0x4E
#: every instruction-intercept exit code the audit models
INSN_CODES = frozenset({CPUID, RDTSC, RDTSCP, RDPMC, HLT, PAUSE, INVD, WBINVD, MONITOR, MWAIT, XSETBV, PUSHF,
                        POPF, IRET, SWINT, ICEBP, RSM, IDTR_READ, GDTR_READ, LDTR_READ, TR_READ, IDTR_WRITE,
                        GDTR_WRITE, LDTR_WRITE, TR_WRITE, CR0_SEL_WRITE, INVLPG, INVLPGA, IOIO, MSR, INVPCID,
                        VMRUN, VMMCALL, VMLOAD, VMSAVE, STGI, CLGI, SKINIT, *range(0x00, 0x40)})
NPF = 0x400
CR4_TSD, CR4_DE, CR4_PCE, CR4_UMIP, CR4_OSXSAVE = 1 << 2, 1 << 3, 1 << 8, 1 << 11, 1 << 18

_cs = Cs(CS_ARCH_X86, CS_MODE_64)
_cs.detail = True

_FIXED = {C.X86_INS_CPUID: CPUID, C.X86_INS_PAUSE: PAUSE, C.X86_INS_INVD: INVD, C.X86_INS_WBINVD: WBINVD,
          C.X86_INS_WBNOINVD: WBINVD, C.X86_INS_PUSHF: PUSHF, C.X86_INS_PUSHFQ: PUSHF, C.X86_INS_POPF: POPF,
          C.X86_INS_POPFQ: POPF, C.X86_INS_IRET: IRET, C.X86_INS_IRETD: IRET, C.X86_INS_IRETQ: IRET,
          C.X86_INS_INT1: ICEBP, C.X86_INS_RSM: RSM, C.X86_INS_VMMCALL: VMMCALL,
          # MONITORX/MWAITX: the MONITOR(X) / MWAIT(X) intercepts (APM Table B-1, misc2 bits 10-11);
          # legal at any CPL, so no CPL gate
          C.X86_INS_MONITORX: MONITOR, C.X86_INS_MWAITX: MWAIT}
_CPL0 = {C.X86_INS_HLT: HLT, C.X86_INS_INVD: INVD, C.X86_INS_WBINVD: WBINVD, C.X86_INS_WBNOINVD: WBINVD,
         C.X86_INS_LGDT: GDTR_WRITE, C.X86_INS_LIDT: IDTR_WRITE, C.X86_INS_LLDT: LDTR_WRITE,
         C.X86_INS_LTR: TR_WRITE, C.X86_INS_INVPCID: INVPCID, C.X86_INS_MONITOR: MONITOR,
         C.X86_INS_MWAIT: MWAIT}
_UMIP = {C.X86_INS_SGDT: GDTR_READ, C.X86_INS_SIDT: IDTR_READ, C.X86_INS_SLDT: LDTR_READ, C.X86_INS_STR: TR_READ}
_SVM = {C.X86_INS_VMRUN: VMRUN, C.X86_INS_VMLOAD: VMLOAD, C.X86_INS_VMSAVE: VMSAVE, C.X86_INS_STGI: STGI,
        C.X86_INS_CLGI: CLGI, C.X86_INS_SKINIT: SKINIT, C.X86_INS_INVLPGA: INVLPGA}
_IO = {C.X86_INS_IN: (True, False), C.X86_INS_OUT: (False, False), C.X86_INS_INSB: (True, True),
       C.X86_INS_INSW: (True, True), C.X86_INS_INSD: (True, True), C.X86_INS_OUTSB: (False, True),
       C.X86_INS_OUTSW: (False, True), C.X86_INS_OUTSD: (False, True)}
_PREFIX_BYTES = frozenset({0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, *range(0x40, 0x50)})


#: APM vol. 3 Appendix A, one-byte opcode map: the opcodes of the instructions a
#: model below can expect an exit from -- INS/OUTS (6C-6F), PUSHF/POPF (9C, 9D),
#: INT3, INT n, IRET (CC, CD, CF), IN/OUT (E4-E7, EC-EF), INT1 (F1), HLT (F4) --
#: and PAUSE (F3 90, :data:`_NOP`)
_ONE_BYTE = frozenset({0x6C, 0x6D, 0x6E, 0x6F, 0x9C, 0x9D, 0xCC, 0xCD, 0xCF, 0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED,
                       0xEE, 0xEF, 0xF1, 0xF4})
_NOP = 0x90
#: the two-byte map (0F xx): groups 6 and 7 (0F 00: SLDT, STR, LLDT, LTR; 0F 01: SGDT, SIDT,
#: LGDT, LIDT, SMSW, LMSW, INVLPG, MONITOR(X), MWAIT(X), XSETBV, RDTSCP and the SVM
#: instructions), CLTS (06), INVD (08), WBINVD/WBNOINVD (09), MOV CRn/DRn (20-23),
#: WRMSR, RDTSC, RDMSR, RDPMC (30-33), the 0F 38 map (INVPCID is 66 0F 38 82),
#: CPUID (A2), RSM (AA)
_TWO_BYTE = frozenset({0x00, 0x01, 0x06, 0x08, 0x09, 0x20, 0x21, 0x22, 0x23, 0x30, 0x31, 0x32, 0x33, 0x38, 0xA2,
                       0xAA})


def may_exit(code: bytes) -> bool:
    """False when no model below can expect an exit from the instruction at the
    start of ``code``, whatever the guest's state: its opcode, after any
    prefixes, is none of the intercepted instructions' (True when unsure, e.g.
    ``code`` ends inside the prefixes).  ``tests/fuzz/test_audit_model.py``
    checks it against the full model over the opcode maps."""
    try:
        k = 0
        c = code[0]
        while c in _PREFIX_BYTES:
            k += 1
            c = code[k]
        if c == 0x0F:
            return code[k + 1] in _TWO_BYTE
        if c == _NOP:
            return 0xF3 in code[:k]              # PAUSE is F3 90
        return c in _ONE_BYTE
    except IndexError:
        return True


@dataclass(frozen=True)
class Expect:
    """The exit the APM prescribes (``code`` None: the instruction runs, or faults, with no intercept)."""
    code: int | None
    info1: int | None = None       # None: not defined for this exit / not compared
    info2: int | None = None
    nrip: int | None = None
    what: str = ""
    #: the expectation holds for the instruction's next iteration too: a REP string
    #: I/O instruction, which changes none of what the model read for it (DX, CPL,
    #: IOPL; the IOPM and the intercepts change only at a #VMEXIT)
    repeats: bool = False


class GuestState:
    """What the model reads about the guest: registers from Unicorn, the
    VMCB's intercept words, and the IOPM/MSRPM bytes in host memory."""

    def __init__(self, uc, mm, vmcb_hpa: int, iopm_hpa: int, msrpm_hpa: int) -> None:
        self.uc, self.mm = uc, mm
        self.vmcb, self.iopm, self.msrpm = vmcb_hpa, iopm_hpa, msrpm_hpa
        # Unicorn's own register state, through its C API when ``uc`` is an engine
        self._read = RegReader(uc).read if isinstance(uc, Uc) else uc.reg_read

    def armed(self, code: int) -> bool:
        w = int.from_bytes(self.mm[self.vmcb + 4 * (code >> 5):self.vmcb + 4 * (code >> 5) + 4], "little")
        return bool(w >> (code & 31) & 1)

    def reg(self, r: int) -> int:
        return self._read(r)

    def cpl(self) -> int:
        return self._read(X.UC_X86_REG_CS) & 3

    def svme(self) -> bool:
        return bool(int.from_bytes(self.mm[self.vmcb + 0x4D0:self.vmcb + 0x4D8], "little") >> 12 & 1)

    def iopm_bit(self, port: int) -> bool:
        return bool(self.mm[self.iopm + (port >> 3)] >> (port & 7) & 1)

    def msrpm_bit(self, bit: int) -> bool:
        return bool(self.mm[self.msrpm + (bit >> 3)] >> (bit & 7) & 1)


_GPR = (X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX, X.UC_X86_REG_RSP,
        X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI, X.UC_X86_REG_R8, X.UC_X86_REG_R9,
        X.UC_X86_REG_R10, X.UC_X86_REG_R11, X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14,
        X.UC_X86_REG_R15)
_UC_OF_CS = {getattr(C, f"X86_REG_{n}"): getattr(X, f"UC_X86_REG_{n}") for n in
             ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10", "R11", "R12", "R13",
              "R14", "R15", "EAX", "EBX", "ECX", "EDX", "ESI", "EDI", "EBP", "ESP", "R8D", "R9D", "R10D",
              "R11D", "R12D", "R13D", "R14D", "R15D")}


def _msrpm_bit(msr: int, write: bool) -> int | None:
    """APM §15.11 Table 15-8: three 0x2000-MSR ranges at byte offsets 0, 0x800, 0x1000."""
    for lo, byte in ((0, 0), (0xC000_0000, 0x800), (0xC001_0000, 0x1000)):
        if lo <= msr <= lo + 0x1FFF:
            return byte * 8 + 2 * (msr - lo) + int(write)
    return None


def _linear(ins, g: GuestState, nrip: int) -> int | None:
    """Linear address of the memory operand (INVLPG's EXITINFO1, APM §15.8.2);
    ``nrip``: the next instruction's RIP, the base of a RIP-relative operand."""
    for op in ins.operands:
        if op.type == C.X86_OP_MEM:
            m = op.mem
            a = m.disp
            if m.base == C.X86_REG_RIP:
                a += nrip
            elif m.base:
                if m.base not in _UC_OF_CS:
                    return None
                a += g.reg(_UC_OF_CS[m.base])
            if m.index:
                if m.index not in _UC_OF_CS:
                    return None
                a += g.reg(_UC_OF_CS[m.index]) * m.scale
            if ins.prefix[3] == 0x67:
                a &= 0xFFFF_FFFF
            if m.segment == C.X86_REG_FS:
                a += g.reg(X.UC_X86_REG_FS_BASE)
            elif m.segment == C.X86_REG_GS:
                a += g.reg(X.UC_X86_REG_GS_BASE)
            return a & 0xFFFF_FFFF_FFFF_FFFF
    return None


def decode(code: bytes, rip: int):
    for ins in _cs.disasm(code, rip, 1):
        return ins
    return None


#: the second opcode bytes of MOV from/to CRn: the only sensitive instructions LOCK is
#: legal on (AMD's encoding of CR8, APM vol. 3 "MOV CRn"); on any other it is #UD
_MOV_CR = (0x20, 0x22)
#: a handler's answer when the instruction is not of its class
_OTHER = object()
_LOCK_UD = frozenset({C.X86_INS_RDTSC, C.X86_INS_RDTSCP, C.X86_INS_RDPMC, C.X86_INS_RDMSR, C.X86_INS_WRMSR,
                      C.X86_INS_INT, C.X86_INS_INVLPG, C.X86_INS_SMSW, C.X86_INS_LMSW, C.X86_INS_CLTS,
                      C.X86_INS_XSETBV})


class _At:
    """One decoded instruction and the guest state the model reads for it (each
    register read when a model first asks for it: a read is a call into Unicorn)."""
    __slots__ = ("ins", "code", "g", "nrip", "_cpl", "lock", "name", "k", "none")

    def __init__(self, ins, code: bytes, g: GuestState, nrip: int, lock: bool, name: str, k: int,
                 none: Expect) -> None:
        self.ins, self.code, self.g, self.nrip, self.lock = ins, code, g, nrip, lock
        self.name, self.k, self.none = name, k, none      # k: offset of the opcode, after the prefixes
        self._cpl: int | None = None

    @property
    def cpl(self) -> int:
        c = self._cpl
        if c is None:
            c = self._cpl = self.g.cpl()
        return c

    @property
    def cr4(self) -> int:
        return self.g.reg(X.UC_X86_REG_CR4)

    def exit_if(self, c: int, info1: int | None = 0, info2: int | None = 0, n: int | None = None) -> Expect:
        if not self.g.armed(c):
            return self.none
        return Expect(c, info1, info2, self.nrip if n is None else n, self.name)

    @property
    def is_mov_crdr(self) -> bool:
        code, k = self.code, self.k
        return self.ins.id == C.X86_INS_MOV and code[k] == 0x0F and code[k + 1] in (0x20, 0x21, 0x22, 0x23)


#: the instructions :func:`_plain` answers for
_PLAIN = frozenset({*_FIXED, *_CPL0, *_UMIP, C.X86_INS_RDTSC, C.X86_INS_RDTSCP, C.X86_INS_RDPMC, C.X86_INS_XSETBV,
                    C.X86_INS_INT, C.X86_INS_INT3, C.X86_INS_SMSW, C.X86_INS_LMSW, C.X86_INS_CLTS})
#: every instruction some model below looks at: any other instruction's
#: expectation is "no intercept" whatever the guest's state
#: (``tests/fuzz/test_audit_model.py`` checks that the models answer so)
MODELLED = frozenset({*_FIXED, *_CPL0, *_UMIP, *_SVM, *_IO, *_LOCK_UD, C.X86_INS_RDTSC, C.X86_INS_RDTSCP,
                      C.X86_INS_RDPMC, C.X86_INS_XSETBV, C.X86_INS_INT, C.X86_INS_INT3, C.X86_INS_SMSW,
                      C.X86_INS_LMSW, C.X86_INS_CLTS, C.X86_INS_MOV, C.X86_INS_RDMSR, C.X86_INS_WRMSR,
                      C.X86_INS_INVLPG})
#: an instruction's own bytes -> (the instruction decoded at address 0, opcode offset,
#: text, its "no exit" expectation, whether a model looks at it).  x86 encodings are prefix-free:
#: bytes that decode as a whole instruction of length n decode the same whatever
#: follows them, so an entry serves every window that starts with those bytes, in
#: any case.  The address enters the model only through nRIP and RIP-relative
#: operands, both computed from the instruction's RIP.
_decoded: dict[bytes, tuple] = {}
#: the same entries by the whole 15-byte window they were found for (one lookup in a loop)
_windows: dict[bytes, tuple] = {}
_decoded_lengths: tuple[int, ...] = ()
_DECODED_MAX = 1 << 13


def _decode_at(code: bytes) -> tuple | None:
    """The instruction at the start of ``code`` (decoded once per encoding: loops,
    REP iterations and the cases of a campaign step the same encodings many times)."""
    global _decoded_lengths
    hit = _windows.get(code)
    if hit is not None:
        return hit
    for n in _decoded_lengths:
        hit = _decoded.get(code[:n])
        if hit is not None:
            _windows[code] = hit
            return hit
    ins = decode(code, 0)
    if ins is None:
        return _locked(code)
    k = 0
    while k < ins.size and code[k] in _PREFIX_BYTES:
        k += 1
    name = f"{ins.mnemonic} {ins.op_str}".strip()
    if len(_windows) >= _DECODED_MAX:
        _windows.clear()
        _decoded.clear()
        _decoded_lengths = ()
    iid = ins.id
    # a REP string I/O instruction that runs with no exit does so on each iteration
    none = Expect(None, what=name, repeats=iid in _IO and _IO[iid][1])
    lock = ins.prefix[0] == 0xF0
    model = _model_of(iid, code, k)
    if lock and model is not None and not (model is _mov_crdr and code[k + 1] in _MOV_CR):
        model = None                        # LOCK on a non-lockable instruction: #UD first
    hit = _decoded[code[:ins.size]] = _windows[code] = (ins, k, name, none, model, lock)
    if ins.size not in _decoded_lengths:
        _decoded_lengths = tuple(sorted((*_decoded_lengths, ins.size)))
    return hit


def _locked(code: bytes) -> tuple | None:
    """An instruction behind a LOCK prefix it cannot take, which capstone does not
    decode: #UD at decode, before any intercept (APM vol. 3 §1.2.5), so no exit
    for an instruction a model covers.  LOCK MOV CRn (AMD's encoding of CR8) is
    left without an expectation."""
    k = 0
    while k < len(code) and code[k] in _PREFIX_BYTES:
        k += 1
    if 0xF0 not in code[:k] or code[k:k + 1] == b"\x0f" and k + 1 < len(code) and code[k + 1] in _MOV_CR:
        return None
    ins = decode(bytes(b for b in code[:k] if b != 0xF0) + code[k:], 0)
    if ins is None or ins.id not in MODELLED:
        return None
    name = f"lock {ins.mnemonic} {ins.op_str}".strip()
    return ins, k, name, Expect(None, what=name), None, True


def _model_of(iid: int, code: bytes, k: int):
    """The one model below that answers for the instruction (None: none does, so
    it runs with no intercept): the first of :func:`expected_exit`'s chain that
    does not answer ``_OTHER``, picked once per encoding."""
    if iid in _PLAIN:
        return _plain
    if iid == C.X86_INS_MOV and code[k] == 0x0F and code[k + 1] in (0x20, 0x21, 0x22, 0x23):
        return _mov_crdr
    if iid in _IO:
        return _ioio
    if iid in (C.X86_INS_RDMSR, C.X86_INS_WRMSR):
        return _msr
    if iid == C.X86_INS_INVLPG or iid in _SVM:
        return _invlpg_svm
    return None


def expected_exit(code: bytes, rip: int, g: GuestState, shortcut: bool = True) -> Expect | None:
    """The APM's #VMEXIT for the instruction at ``rip``; None when the model does
    not cover it.  ``shortcut=False`` asks every model in turn, even for an
    instruction outside :data:`MODELLED` (the tests' check of that set and of
    the model picked per encoding)."""
    d = _decode_at(code)
    if d is None:
        return None
    ins, k, name, none, model, lock = d
    if shortcut:
        return none if model is None else model(_At(ins, code, g, rip + ins.size, lock, name, k, none))
    x = _At(ins, code, g, rip + ins.size, lock, name, k, none)
    if x.lock and not (x.is_mov_crdr and code[k + 1] in _MOV_CR):
        return x.none                       # LOCK on a non-lockable instruction: #UD first
    for handler in (_plain, _mov_crdr, _ioio, _msr, _invlpg_svm):
        r = handler(x)
        if r is not _OTHER:
            return r
    return x.none


def _plain(x: _At):
    """Instructions whose exit depends on the intercept bit, CPL and CR4 alone."""
    iid = x.ins.id
    if iid in _FIXED:
        return x.exit_if(_FIXED[iid])
    cpl = x.cpl
    cr4 = x.cr4 if cpl or iid == C.X86_INS_XSETBV else 0     # CR4 matters at CPL 3 only (XSETBV: always)
    if iid in (C.X86_INS_RDTSC, C.X86_INS_RDTSCP):
        if cpl and cr4 & CR4_TSD:
            return x.none                   # #GP first
        return x.exit_if(RDTSC if iid == C.X86_INS_RDTSC else RDTSCP)
    if iid == C.X86_INS_RDPMC:
        return x.none if cpl and not cr4 & CR4_PCE else x.exit_if(RDPMC)
    if iid in _CPL0:
        return x.none if cpl else x.exit_if(_CPL0[iid])
    if iid in _UMIP:
        return x.none if cpl and cr4 & CR4_UMIP else x.exit_if(_UMIP[iid])
    if iid == C.X86_INS_XSETBV:
        return x.none if cpl or not cr4 & CR4_OSXSAVE else x.exit_if(XSETBV)
    if iid == C.X86_INS_INT:
        return x.exit_if(SWINT, x.ins.operands[0].imm & 0xFF)
    if iid == C.X86_INS_INT3:
        return x.exit_if(EXCP_BP, None, None, None)
    if iid == C.X86_INS_SMSW:
        return x.none if cpl and cr4 & CR4_UMIP else x.exit_if(CR_READ)
    if iid == C.X86_INS_LMSW:
        if cpl:
            return x.none
        if x.g.armed(CR_WRITE):
            return x.exit_if(CR_WRITE)
        return x.exit_if(CR0_SEL_WRITE)     # LMSW under the selective intercept always exits (APM Table 15-7)
    if iid == C.X86_INS_CLTS:
        return x.none if cpl else x.exit_if(CR_WRITE)
    return _OTHER


def _mov_crdr(x: _At):
    """MOV to/from CRn and DRn (APM §15.8-15.9)."""
    if not x.is_mov_crdr:
        return _OTHER
    if x.cpl:
        return x.none
    code, k, g = x.code, x.k, x.g
    op2, modrm = code[k + 1], code[k + 2]
    reg = (modrm >> 3 & 7) | (8 if x.ins.rex & 4 else 0)
    gpr = (modrm & 7) | (8 if x.ins.rex & 1 else 0)
    if op2 in (0x20, 0x22):
        if x.lock:
            reg |= 8                        # AMD: LOCK MOV CR0 is CR8
        if reg not in (0, 2, 3, 4, 8):
            return x.none                   # #UD
        if op2 == 0x20:
            return x.exit_if(CR_READ + reg, (1 << 63) | gpr)
        if g.armed(CR_WRITE + reg):
            return x.exit_if(CR_WRITE + reg, (1 << 63) | gpr)
        if reg == 0 and g.armed(CR0_SEL_WRITE):
            changed = g.reg(_GPR[gpr]) ^ g.reg(X.UC_X86_REG_CR0)
            if changed & ~0b1010:           # any bit but TS (3) and MP (1)
                return x.exit_if(CR0_SEL_WRITE, (1 << 63) | gpr)
        return x.none
    if reg > 7 or (reg in (4, 5) and x.cr4 & CR4_DE):
        return x.none                       # #UD
    return x.exit_if((DR_READ if op2 == 0x21 else DR_WRITE) + reg, gpr)


def _ioio(x: _At):
    """IN/OUT/INS/OUTS against the IOPM, with EXITINFO1 (APM §15.10.2)."""
    ins, code, g = x.ins, x.code, x.g
    if ins.id not in _IO:
        return _OTHER
    is_in, string = _IO[ins.id]
    k = 0
    while code[k] in _PREFIX_BYTES:
        k += 1
    op0 = code[k]
    # REX.W takes precedence over 66h (APM vol. 3 §1.2.7); I/O has no 64-bit form, so it stays 32-bit
    # (capstone names 66 REX.W 6F "outsw"; QEMU's mo_b_d32 and XED agree on four bytes)
    size = 1 if op0 in (0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E) else \
        (2 if ins.prefix[2] == 0x66 and not ins.rex & 8 else 4)
    port = code[ins.size - 1] if op0 in (0xE4, 0xE5, 0xE6, 0xE7) else g.reg(X.UC_X86_REG_DX)
    iopl = g.reg(X.UC_X86_REG_RFLAGS) >> 12 & 3
    if x.cpl > iopl:
        return None                         # TSS I/O bitmap: not modelled
    if not g.armed(IOIO) or not any(g.iopm_bit(p) for p in range(port, port + size)):
        return x.none
    info = port << 16 | {1: 1 << 4, 2: 1 << 5, 4: 1 << 6}[size] | (1 << 8 if ins.prefix[3] == 0x67 else 1 << 9)
    if is_in:
        info |= 1
    if string:
        info |= 1 << 2
        if ins.prefix[0] in (0xF3, 0xF2):
            info |= 1 << 3
        seg = 0 if is_in else {0x26: 0, 0x2E: 1, 0x36: 2, 0x3E: 3, 0x64: 4, 0x65: 5}.get(ins.prefix[1], 3)
        info |= seg << 10
    return Expect(IOIO, info, x.nrip, x.nrip, x.name, repeats=string)


def _msr(x: _At):
    """RDMSR/WRMSR against the MSRPM (APM §15.11)."""
    iid, g = x.ins.id, x.g
    if iid not in (C.X86_INS_RDMSR, C.X86_INS_WRMSR):
        return _OTHER
    if x.cpl or not g.armed(MSR):
        return x.none
    write = iid == C.X86_INS_WRMSR
    msr = g.reg(X.UC_X86_REG_RCX) & 0xFFFF_FFFF
    if msr == 0xC001_0131:
        return x.none                       # SEV_STATUS is never intercepted (APM §15.34.10)
    bit = _msrpm_bit(msr, write)
    if bit is not None and not g.msrpm_bit(bit):
        return x.none
    return Expect(MSR, int(write), 0, x.nrip, x.name)


def _invlpg_svm(x: _At):
    """INVLPG, and the SVM instructions' #UD/#GP checks before their intercepts (APM §15.5)."""
    ins, g = x.ins, x.g
    if ins.id == C.X86_INS_INVLPG:
        return x.none if x.cpl else x.exit_if(INVLPG, _linear(ins, g, x.nrip))
    if ins.id not in _SVM:
        return _OTHER
    if not g.svme():
        return x.none                       # #UD
    if x.cpl:
        return x.none                       # #GP
    if ins.id in (C.X86_INS_VMRUN, C.X86_INS_VMLOAD, C.X86_INS_VMSAVE):
        rax = g.reg(X.UC_X86_REG_RAX)
        if ins.prefix[3] == 0x67:
            rax &= 0xFFFF_FFFF
        if rax & 0xFFF or rax >> MAXPHYADDR:
            return x.none                   # #GP: rAX not page-aligned or beyond MAXPHYADDR
    return x.exit_if(_SVM[ins.id])


@dataclass
class AuditFinding:
    kind: str           # missed | spurious | mismatch | order
    rip: int
    insn: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} at {self.rip:#x} ({self.insn}): {self.detail}"


class Auditor:
    """Steps every guest instruction through :func:`expected_exit` and checks the sandbox's exits."""

    def __init__(self, harness) -> None:
        self.h = harness
        cpu = harness.cpu
        g = harness.m.guest
        self.state = GuestState(harness.uc, harness.mm, g.vmcb_hpa, g.iopm.hpa, g.msrpm.hpa)
        self.findings: list[AuditFinding] = []
        #: the instruction stepped last and its expectation: (rip, Expect or None, bytes); an
        #: Expect of None is "no exit" from :func:`may_exit` (decoded only for a finding)
        self.pending: tuple[int, Expect | None, bytes] | None = None
        self.steps = 0
        self.enabled = False
        self._mm = harness.mm
        #: guest page -> host page of the processor's last fetch fill for it: where
        #: the instructions Unicorn runs from that page are read
        self._fetched: dict[int, int] = {}
        self._pages: dict[int, int] = {}        # guest page -> host page translated here (see _bytes_walked)
        self._pages_key: tuple | None = None
        self._raised: BaseException | None = None
        self._cpu = cpu
        cpu.add_fill_observer(self._on_fill)
        #: the per-instruction hook, on only while cases are audited: a harness that
        #: audits one case in N runs the others with no Python call per instruction
        self._hook = RawCodeHook(harness.uc, self._step)

    @property
    def hooked(self) -> bool:
        """Whether the per-instruction hook is on."""
        return self._hook.active

    @property
    def placed(self) -> bool:
        """Whether the per-instruction hook is in place (on, or parked while cases
        are not audited), ahead of every candidate hook placed since."""
        return self._hook.placed

    def begin(self) -> None:
        """Audit the next case: called after the harness's per-case reset, which
        dropped every translated block (each lies on a page fetched since the
        last drop, and those pages' blocks went: SvmCpu.reset_translation_caches),
        so every block from now on is translated with the hook on -- without the
        full flush :meth:`RawCodeHook.on` would otherwise repeat."""
        self._hook.on(drop_blocks=False)
        self.findings, self.pending, self.steps, self.enabled = [], None, 0, True
        self._pages_key = None

    def rest(self) -> None:
        """The next case is not audited: the per-instruction hook goes off.
        Called after the harness's per-case reset, so no block translated with
        the hook is left to call it (one that did would find the audit not
        enabled and return at once)."""
        self._hook.off()

    def end(self) -> list[AuditFinding]:
        self.enabled = False
        self.pending = None
        if self._raised is not None:         # Ctrl-C in the hook: raised once Unicorn has stopped
            e, self._raised = self._raised, None
            raise e
        return self.findings

    def _on_fill(self, gva: int, access: int, hpa: int, perms: int) -> None:
        if access == UC_MEM_FETCH:
            self._fetched[gva & ~0xFFF] = hpa & ~0xFFF

    def _bytes(self, rip: int) -> bytes:
        """Up to 15 bytes at ``rip`` from the host page the processor fetched
        them from: every page Unicorn runs code from is filled for a fetch
        first, and a refill (a flush, an eviction, a new mapping) observed."""
        off = rip & 0xFFF
        if off <= 0x1000 - 15:
            hpa = self._fetched.get(rip - off)
            if hpa is not None:
                h = hpa + off
                return self._mm[h:h + 15]
        return self._bytes_walked(rip)

    def _bytes_walked(self, rip: int) -> bytes:
        """:meth:`_bytes` across a page boundary, or for a page with no fetch fill
        seen: such a page is translated here, once while the processor's TLB
        is not flushed (a guest that rewrites an entry without a flush runs on
        the old translation too) and until the next exit."""
        tlb = self._cpu.tlb
        key = (id(tlb.stats), tlb.stats.flushes, self.state.cpl() == 3)
        if key != self._pages_key:
            self._pages_key, self._pages = key, {}
        pages, fetched, w = self._pages, self._fetched, None
        out = b""
        a = rip
        while len(out) < 15:
            page = a & ~0xFFF
            hpa = fetched.get(page)
            if hpa is None:
                hpa = pages.get(page)
            if hpa is None:
                try:
                    w = w or self._cpu.walker()
                    hpa = pages[page] = w.translate(page, Access.FETCH, key[2], set_ad=False).hpa
                except Exception:
                    break
            n = min(15 - len(out), 0x1000 - (a & 0xFFF))
            h = hpa + (a & 0xFFF)
            out += self._mm[h:h + n]
            a += n
        return out

    def _step(self, handle, address: int, size: int, user_data) -> None:
        """The code hook (called from C: must not raise)."""
        if not self.enabled:
            return
        try:
            last = self.pending
            if last is not None:
                self._settle_missed()
            self.steps += 1
            if self._cpu.pass_once_rip == address:
                return                           # the hypervisor re-executes it unintercepted
            code = self._bytes(address)
            if last is not None and last[0] == address and last[1] is not None and last[1].repeats \
                    and last[2] == code:
                self.pending = last              # the next iteration of a REP string I/O, with no exit between
                return
            if not may_exit(code):
                self.pending = (address, None, code)
                return
            exp = expected_exit(code, address, self.state)
            if exp is not None:
                self.pending = (address, exp, code)
        except Exception as e:                   # the audit must never break the run it watches
            self.findings.append(AuditFinding("audit-error", address, "?", f"{type(e).__name__}: {e}"))
            self.pending = None
        except BaseException as e:               # Ctrl-C: stop the run, raise it from end()
            self._raised = e
            self.h.uc.emu_stop()

    def _settle_missed(self) -> None:
        """The next instruction began: the pending one completed without a #VMEXIT."""
        rip, exp, _ = self.pending
        self.pending = None
        if exp is not None and exp.code is not None:
            self.findings.append(AuditFinding("missed", rip, exp.what,
                                              f"intercept {exp.code:#x} is armed but the instruction completed "
                                              f"with no #VMEXIT"))

    def on_exit(self, rec) -> None:
        if not self.enabled:
            return
        self._pages_key = None                    # the hypervisor may change the guest's mappings
        p = self.pending
        if p is None:
            return
        rip, exp, code = p
        if rec.rip != rip:
            return
        self.pending = None
        if exp is None:
            if rec.exitcode in INSN_CODES:
                self.findings.append(AuditFinding("spurious", rip, _text(code, rip),
                                                  f"#VMEXIT {rec.exitcode:#x} but the APM gives no intercept here"))
            return
        if rec.exitcode in INSN_CODES or rec.exitcode == EXCP_BP and exp.code == EXCP_BP:
            if exp.code is None:
                self.findings.append(AuditFinding("spurious", rip, exp.what,
                                                  f"#VMEXIT {rec.exitcode:#x} but the APM gives no intercept here"))
                return
            bad = []
            if rec.exitcode != exp.code:
                bad.append(f"EXITCODE {rec.exitcode:#x} != {exp.code:#x}")
            else:
                for f, got, want in (("EXITINFO1", rec.exitinfo1, exp.info1), ("EXITINFO2", rec.exitinfo2, exp.info2),
                                     ("nRIP", rec.nrip, exp.nrip)):
                    if want is not None and got != want:
                        bad.append(f"{f} {got:#x} != {want:#x}")
            if bad:
                self.findings.append(AuditFinding("mismatch", rip, exp.what, "; ".join(bad)))
            return
        if exp.code is not None and not _fetch_fault(rec):
            self.findings.append(AuditFinding("order", rip, exp.what,
                                              f"#VMEXIT {rec.exitcode:#x} came before the armed intercept "
                                              f"{exp.code:#x} (instruction intercepts precede memory exceptions, "
                                              f"APM §15.7)"))


def _text(code: bytes, rip: int) -> str:
    """The instruction's text, for a finding."""
    ins = decode(code, rip)
    return f"{ins.mnemonic} {ins.op_str}".strip() if ins is not None else code.hex()


def _fetch_fault(rec) -> bool:
    """An instruction-fetch fault (#PF or NPF with I/D = 1) precedes any intercept check."""
    if rec.exitcode in (NPF, EXCP_PF):
        return bool(rec.exitinfo1 & 0x10)
    return False
