"""The intercept decision: does this instruction #VMEXIT, and with what?

One small function per instruction class, in one table indexed by
:class:`~sandbox.svm.decode.Kind` (the shape of KVM's exit-handler table, on the
other side of the world switch).  Each returns an :class:`ExitInfo` when the
VMCB intercepts the instruction, or ``None`` when it runs natively.

Instructions whose simple exceptions (#UD, CPL #GP) come first are left to
run natively so the CPU raises them: "instruction intercepts are checked
after simple exceptions ... but before exceptions related to memory
accesses" (APM vol. 2 §15.7).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Protocol

from ..arch import (APIC_BASE_RESERVED, CR0_PG, CR3_LONG_RESERVED, CR4_DE, CR4_RESERVED, CR4_UNIMPLEMENTED,
                    DR6_RESERVED, DR7_RESERVED, XCR0_SSE, XCR0_X87, XCR0_YMM,
                    EFER_LME, EFER_WRITABLE, MAXPHYADDR, MSR_APIC_BASE, MSR_CANONICAL, MSR_EFER, MSR_PAT,
                    MSR_VM_HSAVE_PA, PAT_TYPES, VM_HSAVE_PA_RESERVED)
from ..memory.paging import canonical
from .decode import Insn, Kind
from .exitcodes import ExitCode
from .iopm import IoioInfo
from .msrpm import msrpm_bit, UNINTERCEPTABLE

CR_VALID = 1 << 63      # EXITINFO1[63]: decode assist valid for MOV CRx (APM §15.8.1)
#: the control registers MOV CRn may name; any other is #UD (APM vol. 3 MOV CRn), and instruction
#: intercepts are checked after such simple exceptions (APM vol. 2 §15.9), so it never exits
MOVABLE_CRS = frozenset({0, 2, 3, 4, 8})
CR0_TS, CR0_MP = 1 << 3, 1 << 1


@dataclass(frozen=True, slots=True)
class ExitInfo:
    exitcode: int
    exitinfo1: int = 0
    exitinfo2: int = 0


class GuestView(Protocol):
    """What the decision needs to know about the guest at the instruction."""
    cpl: int
    intercepts: tuple[int, int, int, int, int, int]   # the six words at 000h-014h

    def gpr(self, i: int) -> int: ...
    def cr(self, n: int) -> int: ...
    def rflags(self) -> int: ...
    def iopm_bit(self, port: int) -> bool: ...
    def msrpm_byte(self, off: int) -> int: ...
    def seg_base(self, idx: int) -> int: ...
    def io_allowed_by_tss(self, port: int, size: int) -> bool: ...


def armed(v: GuestView, bit: int) -> bool:
    return bool(v.intercepts[bit >> 5] >> (bit & 31) & 1)


def _simple(code: int, cpl0: bool = False) -> Callable[[Insn, GuestView, int], ExitInfo | None]:
    def check(i: Insn, v: GuestView, rip: int) -> ExitInfo | None:
        if cpl0 and v.cpl:
            return None
        return ExitInfo(code) if armed(v, code) else None
    return check


# -- effective address of a memory operand (INVLPG's EXITINFO1) -----------------
#: 16-bit addressing: ModRM.rm -> (base, index) GPR numbers (None: absent); rm 6 with mod 00 is disp16
_EA16 = ((3, 6), (3, 7), (5, 6), (5, 7), (6, None), (7, None), (5, None), (3, None))
_R_SS, _R_DS = 2, 3


def effective_address(code: bytes, i: Insn, v: GuestView, next_rip: int) -> int:
    """The linear address of the instruction's ModRM memory operand: 64-bit mode adds
    only an FS or GS base (and RIP-relative disp32); outside it the segment's base is
    added (SS for rBP/rSP-based forms, DS otherwise, or the override) and the address
    wraps at 32 bits (APM vol. 3 §1.4, vol. 2 §4.5)."""
    p = i.modrm_off
    m = code[p]
    mod, rm = m >> 6, m & 7
    p += 1
    if i.addrsize == 16:
        base, index = _EA16[rm]
        if mod == 0 and rm == 6:
            addr, base = struct.unpack_from("<H", code, p)[0], None
        else:
            addr = (v.gpr(base) if base is not None else 0) + (v.gpr(index) if index is not None else 0)
            if mod == 1:
                addr += struct.unpack_from("<b", code, p)[0]
            elif mod == 2:
                addr += struct.unpack_from("<h", code, p)[0]
        addr &= 0xFFFF
        seg = i.seg if i.seg is not None else (_R_SS if base == 5 else _R_DS)
        return (addr + v.seg_base(seg)) & 0xFFFF_FFFF
    rex_x, rex_b = (i.rex >> 1) & 1, i.rex & 1
    addr = 0
    base = None
    if rm == 4:
        sib = code[p]
        p += 1
        scale, idx, base = 1 << (sib >> 6), ((sib >> 3) & 7) | (rex_x << 3), (sib & 7) | (rex_b << 3)
        if idx != 4:
            addr += v.gpr(idx) * scale
        if (sib & 7) == 5 and mod == 0:
            addr += struct.unpack_from("<i", code, p)[0]
            p += 4
            base = None
        else:
            addr += v.gpr(base)
    elif rm == 5 and mod == 0:
        # RIP-relative in 64-bit mode; a plain disp32 elsewhere
        addr = struct.unpack_from("<i", code, p)[0] + (next_rip if i.mode == 64 else 0)
        p += 4
    else:
        base = rm | (rex_b << 3)
        addr += v.gpr(base)
    if mod == 1:
        addr += struct.unpack_from("<b", code, p)[0]
    elif mod == 2:
        addr += struct.unpack_from("<i", code, p)[0]
    if i.addrsize == 32:
        addr &= 0xFFFFFFFF
    if i.mode != 64:
        seg = i.seg if i.seg is not None else (_R_SS if base in (4, 5) else _R_DS)
        return (addr + v.seg_base(seg)) & 0xFFFF_FFFF
    if i.seg in (4, 5):
        addr += v.seg_base(i.seg)
    return addr & 0xFFFF_FFFF_FFFF_FFFF


# -- per-class checks ---------------------------------------------------------------
def _cpuid(i, v, rip):
    return ExitInfo(ExitCode.CPUID) if armed(v, ExitCode.CPUID) else None


def _rdtsc(i, v, rip):
    if v.cpl and v.cr(4) & (1 << 2):          # CR4.TSD: #GP first
        return None
    return ExitInfo(ExitCode.RDTSC) if armed(v, ExitCode.RDTSC) else None


def _rdtscp(i, v, rip):
    if v.cpl and v.cr(4) & (1 << 2):
        return None
    return ExitInfo(ExitCode.RDTSCP) if armed(v, ExitCode.RDTSCP) else None


def _rdpmc(i, v, rip):
    if v.cpl and not v.cr(4) & (1 << 8):      # CR4.PCE
        return None
    return ExitInfo(ExitCode.RDPMC) if armed(v, ExitCode.RDPMC) else None


def _descriptor_read(code_: int):
    def check(i, v, rip):
        if v.cpl and v.cr(4) & (1 << 11):     # CR4.UMIP
            return None
        return ExitInfo(code_) if armed(v, code_) else None
    return check


def _mov_from_cr(i, v, rip):
    if v.cpl or i.reg not in MOVABLE_CRS:
        return None
    code = 0x00 + i.reg
    return ExitInfo(code, CR_VALID | i.rm) if armed(v, code) else None


def _mov_to_cr(i, v, rip):
    if v.cpl or i.reg not in MOVABLE_CRS:
        return None
    code = 0x10 + i.reg
    if armed(v, code):
        return ExitInfo(code, CR_VALID | i.rm)
    if i.reg == 0 and armed(v, ExitCode.CR0_SEL_WRITE):
        new = v.gpr(i.rm)
        if (new ^ v.cr(0)) & ~(CR0_TS | CR0_MP) & 0xFFFFFFFF:
            return ExitInfo(ExitCode.CR0_SEL_WRITE, CR_VALID | i.rm)
    return None


def _smsw(i, v, rip):
    if v.cpl and v.cr(4) & (1 << 11):
        return None
    return ExitInfo(ExitCode.CR0_READ) if armed(v, ExitCode.CR0_READ) else None


def _lmsw(i, v, rip):
    """LMSW treats the selective CR0-write intercept as non-selective: it exits
    whatever value it writes (APM Table 15-7; kvm-unit-tests "sel cr0 lmsw")."""
    if v.cpl:
        return None
    if armed(v, ExitCode.CR0_WRITE):
        return ExitInfo(ExitCode.CR0_WRITE)
    if armed(v, ExitCode.CR0_SEL_WRITE):
        return ExitInfo(ExitCode.CR0_SEL_WRITE)
    return None


def _clts(i, v, rip):
    if v.cpl:
        return None
    return ExitInfo(ExitCode.CR0_WRITE) if armed(v, ExitCode.CR0_WRITE) else None


def _mov_dr(write: bool):
    def check(i, v, rip):
        if v.cpl or i.reg > 7:
            return None
        code = (0x30 if write else 0x20) + i.reg
        return ExitInfo(code, i.rm) if armed(v, code) else None
    return check


def io_exit(i: Insn, v: GuestView, rip: int, code: bytes = b"") -> ExitInfo | None:
    """IN/OUT/INS/OUTS: the IOPM's bits for every byte of the access (APM §15.10.2)."""
    size = i.opsize // 8
    is_in = i.kind in (Kind.IN, Kind.INS)
    string = i.kind in (Kind.INS, Kind.OUTS)
    port = i.imm if i.imm is not None else v.gpr(2) & 0xFFFF
    # at CPL 0 the IOPL check always passes: RFLAGS (a call to compute) is read only above it
    if v.cpl and v.cpl > (v.rflags() >> 12) & 3 and not v.io_allowed_by_tss(port, size):
        return None                                   # #GP before the intercept
    if not armed(v, ExitCode.IOIO):
        return None
    if not any(v.iopm_bit(p) for p in range(port, port + size)):
        return None
    seg = 0 if i.kind == Kind.INS else (i.seg if i.seg is not None else 3)
    info1 = IoioInfo.encode(port, size, is_in, string=string, rep=i.rep and string,
                            addr_size=i.addrsize, seg=seg)
    return ExitInfo(ExitCode.IOIO, info1, rip + i.length)


def _msr(write: bool):
    def check(i, v, rip):
        if v.cpl:
            return None
        if not armed(v, ExitCode.MSR):
            return None
        msr = v.gpr(1) & 0xFFFFFFFF
        if msr in UNINTERCEPTABLE:
            return None
        bit = msrpm_bit(msr, write)
        if bit is not None and not v.msrpm_byte(bit >> 3) >> (bit & 7) & 1:
            return None
        return ExitInfo(ExitCode.MSR, 1 if write else 0)
    return check


def _intn(i, v, rip):
    return ExitInfo(ExitCode.SWINT, i.imm) if armed(v, ExitCode.SWINT) else None


def _int3(i, v, rip):
    return ExitInfo(ExitCode.EXCP_BP) if armed(v, ExitCode.EXCP_BP) else None


def _into(i, v, rip):
    return None       # INTO: its #UD (64-bit mode) or #OF (RFLAGS.OF) is the native handler's


def _invlpg_check(i, v, rip, code: bytes = b""):
    if v.cpl:
        return None
    if not armed(v, ExitCode.INVLPG):
        return None
    return ExitInfo(ExitCode.INVLPG, effective_address(code, i, v, rip + i.length))


def svm_rax_faults(i: Insn, rax: int) -> bool:
    """VMRUN/VMLOAD/VMSAVE: #GP when rAX is not page-aligned or is beyond
    MAXPHYADDR, checked before the intercept (APM §15.5.1; Bochs and QEMU agree)."""
    rax &= (1 << i.addrsize) - 1                    # rAX: EAX (or AX) by the address size
    return bool(rax & 0xFFF or rax >> MAXPHYADDR)


def _svm(code_: int, uses_rax: bool = False):
    def check(i, v, rip):
        # EFER.SVME=0 or real mode: #UD first; CPL>0: #GP first (APM §15.5.1)
        if not v.efer_svme() or v.cpl:
            return None
        if uses_rax and svm_rax_faults(i, v.gpr(0)):
            return None
        return ExitInfo(code_) if armed(v, code_) else None
    return check


def _vmmcall(i, v, rip):
    return ExitInfo(ExitCode.VMMCALL) if armed(v, ExitCode.VMMCALL) else None


def _xsetbv(i, v, rip):
    if not v.cr(4) & (1 << 18) or v.cpl:     # CR4.OSXSAVE=0: #UD; CPL>0: #GP
        return None
    return ExitInfo(ExitCode.XSETBV) if armed(v, ExitCode.XSETBV) else None


def _monitor(code_: int):
    def check(i, v, rip, code: bytes = b""):
        # MONITOR/MWAIT are CPL-0 instructions (#UD first at CPL>0); MONITORX/MWAITX
        # (0F 01 FA / FB) run at any CPL and hit the same intercepts (APM Table B-1)
        x_form = len(code) > i.modrm_off and code[i.modrm_off] in (0xFA, 0xFB)
        if v.cpl and not x_form:
            return None
        return ExitInfo(code_) if armed(v, code_) else None
    return check


def _no_intercept(i, v, rip) -> None:
    """An instruction SVM has no intercept for (the model hooks it for another reason)."""
    return None


DECIDE: dict[Kind, Callable] = {
    Kind.CPUID: _cpuid,
    Kind.RDTSC: _rdtsc,
    Kind.RDTSCP: _rdtscp,
    Kind.RDPMC: _rdpmc,
    Kind.HLT: _simple(ExitCode.HLT, cpl0=True),
    Kind.PAUSE: _simple(ExitCode.PAUSE),
    Kind.INVLPGA: _svm(ExitCode.INVLPGA),
    Kind.INVD: _simple(ExitCode.INVD, cpl0=True),
    Kind.WBINVD: _simple(ExitCode.WBINVD, cpl0=True),
    Kind.MONITOR: _monitor(ExitCode.MONITOR),
    Kind.MWAIT: _monitor(ExitCode.MWAIT),
    Kind.XSETBV: _xsetbv,
    Kind.PUSHF: _simple(ExitCode.PUSHF),
    Kind.POPF: _simple(ExitCode.POPF),
    Kind.IRET: _simple(ExitCode.IRET),
    Kind.INTN: _intn,
    Kind.INT3: _int3,
    Kind.INTO: _into,
    Kind.VEX_LEGACY: _no_intercept,      # #UD, a simple exception: before any intercept (§15.9)
    Kind.SYSCALL: _no_intercept,         # SVM has no intercept for the fast system calls
    Kind.SYSENTER: _no_intercept,
    Kind.SYSEXIT: _no_intercept,
    Kind.ICEBP: _simple(ExitCode.ICEBP),
    Kind.SGDT: _descriptor_read(ExitCode.GDTR_READ),
    Kind.SIDT: _descriptor_read(ExitCode.IDTR_READ),
    Kind.SLDT: _descriptor_read(ExitCode.LDTR_READ),
    Kind.STR: _descriptor_read(ExitCode.TR_READ),
    Kind.LGDT: _simple(ExitCode.GDTR_WRITE, cpl0=True),
    Kind.LIDT: _simple(ExitCode.IDTR_WRITE, cpl0=True),
    Kind.LLDT: _simple(ExitCode.LDTR_WRITE, cpl0=True),
    Kind.LTR: _simple(ExitCode.TR_WRITE, cpl0=True),
    Kind.MOV_FROM_CR: _mov_from_cr,
    Kind.MOV_TO_CR: _mov_to_cr,
    Kind.SMSW: _smsw,
    Kind.LMSW: _lmsw,
    Kind.CLTS: _clts,
    Kind.MOV_FROM_DR: _mov_dr(False),
    Kind.MOV_TO_DR: _mov_dr(True),
    Kind.RDMSR: _msr(False),
    Kind.WRMSR: _msr(True),
    Kind.VMMCALL: _vmmcall,
    Kind.VMRUN: _svm(ExitCode.VMRUN, uses_rax=True),
    Kind.VMLOAD: _svm(ExitCode.VMLOAD, uses_rax=True),
    Kind.VMSAVE: _svm(ExitCode.VMSAVE, uses_rax=True),
    Kind.STGI: _svm(ExitCode.STGI),
    Kind.CLGI: _svm(ExitCode.CLGI),
    Kind.SKINIT: _svm(ExitCode.SKINIT),
    Kind.RSM: _simple(ExitCode.RSM),
    Kind.RDPRU: _simple(ExitCode.RDPRU),
    Kind.INVPCID: _simple(ExitCode.INVPCID, cpl0=True),
    Kind.STI: _no_intercept,          # no intercept; watched for interrupt windows
    Kind.WRFSBASE: _no_intercept,     # no intercept; checked for a non-canonical base
    Kind.WRGSBASE: _no_intercept,
    Kind.LOAD_FS_GS: _no_intercept,   # no intercept; a null selector keeps the base (AMD)
}
#: kinds whose decision also reads the instruction bytes: ``f(insn, view, rip, code)``
NEEDS_CODE = {Kind.INVLPG: _invlpg_check, Kind.IN: io_exit, Kind.OUT: io_exit, Kind.INS: io_exit,
              Kind.OUTS: io_exit, Kind.MONITOR: DECIDE[Kind.MONITOR], Kind.MWAIT: DECIDE[Kind.MWAIT]}


def decide(insn: Insn, v: GuestView, rip: int, code: bytes) -> ExitInfo | None:
    """The #VMEXIT this instruction causes under the current VMCB, or None."""
    f = NEEDS_CODE.get(insn.kind)
    if f is not None:
        return f(insn, v, rip, code)
    return DECIDE[insn.kind](insn, v, rip)


#: instruction kinds each intercept bit makes the scanner look for
def kinds_for_bits(bits: set[int]) -> set[Kind]:
    k: set[Kind] = set()
    table = {
        ExitCode.CPUID: [Kind.CPUID], ExitCode.RDTSC: [Kind.RDTSC], ExitCode.RDTSCP: [Kind.RDTSCP],
        ExitCode.RDPMC: [Kind.RDPMC], ExitCode.HLT: [Kind.HLT], ExitCode.PAUSE: [Kind.PAUSE],
        ExitCode.INVLPG: [Kind.INVLPG], ExitCode.INVLPGA: [Kind.INVLPGA], ExitCode.INVD: [Kind.INVD],
        ExitCode.WBINVD: [Kind.WBINVD], ExitCode.MONITOR: [Kind.MONITOR], ExitCode.MWAIT: [Kind.MWAIT],
        ExitCode.XSETBV: [Kind.XSETBV], ExitCode.PUSHF: [Kind.PUSHF], ExitCode.POPF: [Kind.POPF],
        ExitCode.IRET: [Kind.IRET], ExitCode.SWINT: [Kind.INTN], ExitCode.ICEBP: [Kind.ICEBP],
        ExitCode.GDTR_READ: [Kind.SGDT], ExitCode.IDTR_READ: [Kind.SIDT], ExitCode.LDTR_READ: [Kind.SLDT],
        ExitCode.TR_READ: [Kind.STR], ExitCode.GDTR_WRITE: [Kind.LGDT], ExitCode.IDTR_WRITE: [Kind.LIDT],
        ExitCode.LDTR_WRITE: [Kind.LLDT], ExitCode.TR_WRITE: [Kind.LTR],
        ExitCode.IOIO: [Kind.IN, Kind.OUT, Kind.INS, Kind.OUTS], ExitCode.MSR: [Kind.RDMSR, Kind.WRMSR],
        ExitCode.VMMCALL: [Kind.VMMCALL], ExitCode.STGI: [Kind.STGI], ExitCode.CLGI: [Kind.CLGI],
        ExitCode.RSM: [Kind.RSM], ExitCode.RDPRU: [Kind.RDPRU],
        ExitCode.INVPCID: [Kind.INVPCID], ExitCode.CR0_SEL_WRITE: [Kind.MOV_TO_CR, Kind.LMSW],
        ExitCode.EXCP_BP: [Kind.INT3],
    }
    for b in bits:
        if b in table:
            k.update(table[b])
        elif 0x00 <= b <= 0x0F:
            k.add(Kind.MOV_FROM_CR)
            if b == 0:
                k.add(Kind.SMSW)
        elif 0x10 <= b <= 0x1F:
            k.add(Kind.MOV_TO_CR)
            if b == 0x10:
                k.update((Kind.LMSW, Kind.CLTS))
        elif 0x20 <= b <= 0x2F:
            k.add(Kind.MOV_FROM_DR)
        elif 0x30 <= b <= 0x3F:
            k.add(Kind.MOV_TO_DR)
    return k


@dataclass(frozen=True, slots=True)
class VectorsOnly:
    """The view a STATE_FREE decision needs: just the intercept vectors."""
    intercepts: tuple[int, ...]


#: kinds whose decision reads nothing but the intercept vectors (cacheable per address)
STATE_FREE = frozenset({Kind.STI, Kind.CPUID, Kind.PUSHF, Kind.POPF, Kind.IRET, Kind.PAUSE, Kind.VMMCALL, Kind.ICEBP,
                        Kind.INTN, Kind.INT3, Kind.INTO, Kind.RSM, Kind.RDPRU, Kind.VEX_LEGACY, Kind.LOAD_FS_GS,
                        Kind.SYSCALL, Kind.SYSENTER, Kind.SYSEXIT})

#: decoded while a virtual interrupt waits for RFLAGS.IF: the instructions that can set it
IRQ_WINDOW = frozenset({Kind.STI, Kind.POPF, Kind.IRET})

#: always decoded, intercepted or not: HLT ends a slice in Unicorn; INT n / INT3 /
#: ICEBP / INTO are delivered through the guest IDT by this model; the SVM
#: instructions touch physical memory and must never run on Unicorn's own SVM code
ALWAYS = {Kind.HLT, Kind.INTN, Kind.INT3, Kind.INTO, Kind.ICEBP, Kind.VMRUN, Kind.VMLOAD,
          Kind.VMSAVE, Kind.SKINIT, Kind.STGI, Kind.CLGI, Kind.INVLPGA, Kind.VMMCALL,
          # port I/O: Unicorn skips the IOPL / TSS-bitmap check, so the model makes it
          Kind.IN, Kind.OUT, Kind.INS, Kind.OUTS,
          # MOV to CR/DR, WRMSR: Unicorn accepts (or silently drops) reserved bits
          # the processor must refuse with #GP
          Kind.MOV_TO_CR, Kind.MOV_TO_DR, Kind.WRMSR, Kind.XSETBV,
          # LGDT/LIDT/IRET/WRFSBASE/WRGSBASE: Unicorn loads a non-canonical base or RIP
          Kind.LGDT, Kind.LIDT, Kind.IRET, Kind.WRFSBASE, Kind.WRGSBASE,
          # a VEX prefix on a sensitive legacy opcode: Unicorn runs the legacy instruction
          Kind.VEX_LEGACY,
          # a null selector into FS/GS: QEMU clears the base the modelled processor keeps
          Kind.LOAD_FS_GS,
          # SYSCALL/SYSENTER: Unicorn runs them as no-ops; SYSENTER/SYSEXIT: #UD in long mode
          Kind.SYSCALL, Kind.SYSENTER, Kind.SYSEXIT}



def wrmsr_faults(msr: int, value: int, cr0: int, efer: int) -> bool:
    """#GP(0) from WRMSR of an illegal value to an MSR this processor implements
    (APM vol. 3 "WRMSR"; KVM's checks where the APM leaves a choice):
    EFER -- a bit it does not implement, or LME changed while CR0.PG = 1
    (vol. 2 §3.1.7); PAT -- a reserved memory type (§7.8.1); APIC_BASE --
    reserved bits; VM_HSAVE_PA -- not a page-aligned physical address
    (§15.30.4); FS/GS/KernelGS base, LSTAR, CSTAR, SYSENTER_ESP/EIP -- a
    non-canonical address."""
    if msr == MSR_EFER:
        return bool(value & ~EFER_WRITABLE or ((value ^ efer) & EFER_LME and cr0 & CR0_PG))
    if msr == MSR_PAT:
        return any((value >> (8 * i)) & 0xFF not in PAT_TYPES for i in range(8))
    if msr == MSR_APIC_BASE:
        return bool(value & APIC_BASE_RESERVED)
    if msr == MSR_VM_HSAVE_PA:
        return bool(value & VM_HSAVE_PA_RESERVED)
    if msr in MSR_CANONICAL:
        return not canonical(value)
    return False


def xsetbv_faults(ecx: int, value: int) -> bool:
    """#GP(0) from XSETBV (APM vol. 3 "XSETBV", vol. 2 §11.5.2): ECX names no XCR
    (only XCR0 exists), XCR0.X87 = 0, or YMM enabled without SSE.  (Unicorn checks
    the first two and the bits its CPUID leaf 0Dh does not report, not the third.)"""
    return bool(ecx != 0 or not value & XCR0_X87 or (value & XCR0_YMM and not value & XCR0_SSE))


def mov_to_dr_faults(reg: int, value: int, cr4: int) -> bool:
    """#GP(0) from MOV to DRn in 64-bit mode: a 1 in bits 63:32 of DR6 or DR7
    (DR4/DR5 alias them while CR4.DE = 0; with DE = 1 they are #UD, which
    Unicorn raises) -- APM vol. 3 "MOV DRn", vol. 2 §13.1.1."""
    if reg in (4, 5) and cr4 & CR4_DE:
        return False
    if reg in (4, 6):
        return bool(value & DR6_RESERVED)
    if reg in (5, 7):
        return bool(value & DR7_RESERVED)
    return False


def mov_to_cr_faults(reg: int, value: int, cr0: int, long_mode: bool = True, cs64: bool = True) -> bool:
    """#GP(0) from MOV to CRn for an illegal value, in 64-bit mode (APM vol. 2 §3.1.1-3.1.3, §3.7.1,
    "MOV CRn" in vol. 3): reserved bits of CR0 (63:32), CR3 (63:52 and 51:MAXPHYADDR), CR4
    (reserved, or a feature this processor lacks: LA57, PCIDE, SMAP, PKE, CET, PKS) or CR8
    (63:4); CR0.NW = 1 with CD = 0; clearing CR0.PG in 64-bit mode (``cs64``: in compatibility
    mode it is how long mode is left, APM vol. 2 §14.7), CR0.PE with PG set; clearing CR4.PAE
    in long mode. Outside long mode (EFER.LMA = 0, e.g. a multiboot kernel before it enables
    paging) only CR0.NW without CD, CR0.PG without PE and the reserved or unimplemented CR4
    bits fault."""
    if not long_mode:
        if reg == 0:
            return bool(value & (1 << 29) and not value & (1 << 30) or value & (1 << 31) and not value & 1)
        if reg == 4:
            return bool(value & (CR4_RESERVED | CR4_UNIMPLEMENTED))
        return False
    if reg == 0:
        pg = value & (1 << 31)
        return bool(value >> 32 or (value & (1 << 29) and not value & (1 << 30))
                    or (not pg and cs64) or (pg and not value & 1))
    if reg == 3:
        return bool(value & CR3_LONG_RESERVED)
    if reg == 4:
        return bool(value & (CR4_RESERVED | CR4_UNIMPLEMENTED) or not value & (1 << 5))
    if reg == 8:
        return bool(value >> 4)
    return False
