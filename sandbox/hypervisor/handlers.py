"""The default exit handlers: one small function per exit, in one table.

:data:`DEFAULT_HANDLERS` maps an EXITCODE to ``handler(machine, exit)``, as
KVM's ``svm_exit_handlers`` does; every
:class:`~sandbox.hypervisor.machine.Machine` starts with a copy in
``m.handlers``, and ``m.on(code)`` replaces an entry.  A handler returns
:data:`RESUME` (or None) to VMRUN again, or ``m.stop(reason, detail)``.

Handlers reach the guest only through the machine: ``m.regs`` for its
registers, ``m.advance(exit)`` to complete the instruction and ``m.inject``
to raise an event.  So the same handler serves a guest whose registers are
in the VMCB and an SEV-ES guest that asks through its GHCB
(:mod:`sandbox.hypervisor.ghcb` calls it with GHCB-backed registers).
Users can call these handlers from their own (see ``hooks/``).
"""
from __future__ import annotations

import struct
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Callable

from ..arch import CR4_OSXSAVE, EFER_LMA, EFER_SVME, M64, MSR_EFER, MSR_TSC_AUX, RFLAGS_IF
from ..memory.hostmem import PAGE_SIZE
from ..memory.mmu import GuestGP, GuestPageFault, NestedFault
from ..svm.cpu import ExitRecord
from ..svm.decision import wrmsr_faults
from ..svm.events import HAS_ERROR_CODE, Vec, combine
from ..svm.exitcodes import ExitCode, excp
from ..svm.iopm import IoioInfo
from ..svm.stop import StopReason
from ..svm.vmcb import EventType, VIntr
from .devices import MmioMode, MmioRegion, MsrFault
from .mmio import MmioDecodeError, complete, decode_access, decode_form
from .msr_table import CANONICAL_MSRS, NATIVE_MSRS
from .string_io import STRING_IO_CHUNK, string_io

if TYPE_CHECKING:
    from .machine import Machine


class Action(Enum):
    """What a handler tells the hypervisor loop."""
    RESUME = "resume"
    STOP = "stop"


RESUME, STOP = Action.RESUME, Action.STOP
#: an exit handler: ``handler(machine, exit)``; None means RESUME
Handler = Callable[["Machine", ExitRecord], "Action | None"]


class Hypercall(IntEnum):
    """VMMCALL function numbers (RAX) of the default hypervisor."""
    EXIT = 0          # RDI = the guest's exit code; the run ends
    PRINT = 1         # RDI = guest-virtual address, RSI = length; the bytes go to the console


HYPERVISOR_VENDOR = b"AMDVSandbox\x00"
CPU_VENDOR = b"AuthenticAMD"
KVM_ENOSYS = 1000
KVM_EFAULT = 14
MSR_TSC = 0x10
M32 = 0xFFFF_FFFF
RFLAGS_DF = 1 << 10


# ------------------------------------------------------------------ CPUID
def _vendor_regs(vendor: bytes) -> tuple[int, int, int]:
    """EBX, ECX, EDX of a vendor string (EBX:EDX:ECX order, as CPUID returns it)."""
    return struct.unpack("<III", vendor[0:4] + vendor[8:12] + vendor[4:8])


_BRAND = b"AMD-V Sandbox Virtual CPU".ljust(48, b"\x00")
#: the leaves that do not depend on the guest or the platform
FIXED_LEAVES: dict[int, tuple[int, int, int, int]] = {
    0: (0xD, *_vendor_regs(CPU_VENDOR)),
    0x4000_0000: (0x4000_0001, *struct.unpack("<III", HYPERVISOR_VENDOR)),
    0x8000_0001: (0x00800F12, 0, (1 << 0), (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29) | 0x0183F3FF),
    **{0x8000_0002 + i: struct.unpack("<IIII", _BRAND[16 * i:16 * i + 16]) for i in range(3)},
    0x8000_0008: (0x3030, 0, 0, 0),           # 48 physical, 48 linear address bits
}


def _cpuid_leaf(m: "Machine", leaf: int, sub: int) -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX of the virtual CPU's CPUID leaf (``m.cpuid_overrides`` first)."""
    if m.cpuid_overrides:
        over = m.cpuid_overrides.get((leaf, sub)) or m.cpuid_overrides.get((leaf, -1))
        if over is not None:
            return over
    fixed = FIXED_LEAVES.get(leaf)
    if fixed is not None:
        return fixed
    if leaf == 1:
        eax = 0x00800F12                      # family 17h (Zen), model 1, stepping 2
        ebx = 0x00010800                      # CLFLUSH 8 qwords, 1 logical processor
        ecx = (1 << 0) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 23) | (1 << 26) | (1 << 31)
        if m.guest.vmcb.CR4 & CR4_OSXSAVE:
            ecx |= 1 << 27                    # OSXSAVE mirrors CR4
        return eax, ebx, ecx, 0x178BFBFF
    if leaf == 0x8000_0000:                   # with a secure processor, memory encryption is offered
        return 0x8000_001F if m.sev is not None else 0x8000_0008, *_vendor_regs(CPU_VENDOR)
    if leaf == 0x8000_001F and m.sev is not None:
        return m.sev.sp.cpuid_8000_001f()
    return 0, 0, 0, 0


def handle_cpuid(m: "Machine", e: ExitRecord) -> Action:
    """CPUID: virtualized leaves, hypervisor-present bit, vendor leaf 0x40000000."""
    regs = m.regs
    rax = regs.rax
    # the fixed leaves without a call or a mask (a RAX above 32 bits matches none of
    # them and takes the general lookup): this is the hottest exit
    out = (not m.cpuid_overrides and FIXED_LEAVES.get(rax)) or _cpuid_leaf(m, rax & M32, regs.rcx & M32)
    if m.cpuid_masks:
        mask = m.cpuid_masks.get(rax & M32)
        if mask is not None:                  # features the processor was built without
            out = tuple(v & k for v, k in zip(out, mask))
    regs.set_abcd(out, e.nrip)                # one call: four register writes and m.advance(e)
    return RESUME


# ------------------------------------------------------------------ time
def handle_rdtsc(m: "Machine", e: ExitRecord) -> Action:
    """RDTSC/RDTSCP: the host TSC plus the VMCB's TSC_OFFSET (RDTSCP: ECX = TSC_AUX)."""
    tsc = (m.cpu.host_tsc() + m.guest.vmcb.TSC_OFFSET) & M64
    m.regs.rax, m.regs.rdx = tsc & M32, tsc >> 32
    if e.exitcode == ExitCode.RDTSCP:
        m.regs.rcx = m.msrs.get(MSR_TSC_AUX, 0) & M32
    m.advance(e)
    return RESUME


def handle_rdpmc(m: "Machine", e: ExitRecord) -> Action:
    """RDPMC: the virtual CPU has no running performance counters; they read 0."""
    m.regs.rax = 0
    m.regs.rdx = 0
    m.advance(e)
    return RESUME


# ------------------------------------------------------------------ port I/O
# plain ints: an IntFlag operand costs a call on the exit path
_SZ8, _SZ16, _STR, _TYPE_IN = int(IoioInfo.SZ8), int(IoioInfo.SZ16), int(IoioInfo.STR), int(IoioInfo.TYPE_IN)
_SZ_SHIFT = (_SZ8 & -_SZ8).bit_length() - 1
#: (size, mask) by EXITINFO1's SZ8/SZ16/SZ32 bits: SZ8 wins, then SZ16, else 4 bytes
_IO_SIZES = tuple((1, 0xFF) if b & 1 else ((2, 0xFFFF) if b & 2 else (4, 0xFFFF_FFFF)) for b in range(8))


def handle_ioio(m: "Machine", e: ExitRecord) -> Action:
    """IN/OUT/INS/OUTS against the port bus (APM §15.10.2 EXITINFO1)."""
    info = e.exitinfo1
    size, mask = _IO_SIZES[info >> _SZ_SHIFT & 7]
    port = info >> 16 & 0xFFFF
    if info & _STR:
        return _string_ioio(m, e, port, size)
    regs = m.regs
    if info & _TYPE_IN:
        v = m.bus.io(port, size, True)
        regs.rax = v if size == 4 else (regs.rax & ~mask) | v      # 32-bit results zero-extend
    else:
        m.bus.io(port, size, False, regs.rax & mask)
    regs.complete(e.exitinfo2)                # m.advance(e, EXITINFO2): EXITINFO2 = the next RIP
    return RESUME


def _string_ioio(m: "Machine", e: ExitRecord, port: int, size: int) -> Action:
    """INS/OUTS: a chunk of the elements; a fault in the guest's memory operand
    is raised in the guest, the instruction restarting with RCX/RSI/RDI
    showing the progress made."""
    info = e.exitinfo1
    rep = bool(info & IoioInfo.REP)
    asz = 64 if info & IoioInfo.A64 else (32 if info & IoioInfo.A32 else 16)
    amask = (1 << asz) - 1
    step = -size if m.guest.vmcb.RFLAGS & RFLAGS_DF else size
    count = (m.regs.rcx if rep else 1) & amask
    try:
        string_io(m, info, port, size, min(count, STRING_IO_CHUNK), amask, step)
    except GuestPageFault as f:
        m.guest.vmcb.CR2 = f.address
        m.inject(Vec.PF, EventType.EXCEPTION, f.error_code)
        return RESUME
    except GuestGP:
        m.inject(Vec.GP, EventType.EXCEPTION, 0)
        return RESUME
    except NestedFault as f:
        return m.stop(StopReason.NPF, f"string I/O at {e.rip:#x} touched GPA {f.gpa:#x} outside the nested mappings")
    if rep and m.regs.rcx & amask:
        return RESUME                         # more to do: re-execute (RIP unchanged), as KVM does
    m.advance(e, e.exitinfo2)
    return RESUME


# ------------------------------------------------------------------ MSRs
def _rdmsr(m: "Machine", msr: int) -> int | None:
    """The value RDMSR returns from the MSRs the hypervisor emulates, or None."""
    if msr == MSR_TSC:
        return (m.cpu.host_tsc() + m.guest.vmcb.TSC_OFFSET) & M64
    if msr == MSR_EFER:
        return m.guest.vmcb.EFER & ~EFER_SVME
    return m.msrs.get(msr)


def _wrmsr(m: "Machine", msr: int, value: int) -> bool:
    """Perform WRMSR of an emulated MSR; False for #GP (an MSR not in the table, or an
    illegal value: the processor's own wrmsr_faults check, so nothing illegal
    reaches the VMCB)."""
    efer = m.guest.vmcb.EFER
    if wrmsr_faults(msr, value, m.guest.vmcb.CR0, efer):
        return False
    if msr == MSR_TSC:
        # the guest sets its TSC: the offset moves so that RDTSC reads ``value`` now, as KVM's
        # kvm_set_msr_common(MSR_IA32_TSC) -> kvm_synchronize_tsc / adjust_tsc_offset
        m.guest.vmcb.TSC_OFFSET = (value - m.cpu.host_tsc()) & M64
    elif msr == MSR_EFER:
        if value & EFER_SVME:
            return False                      # no nested SVM (CPUID says so): #GP, as KVM without nested
        m.guest.vmcb.EFER = (value & ~EFER_LMA) | (efer & EFER_LMA) | EFER_SVME     # LMA is read-only
    elif msr == MSR_TSC_AUX:
        m.msrs[msr] = value & M32                 # AMD ignores bits 63:32
    elif msr in m.msrs:
        m.msrs[msr] = value
    else:
        return False
    return True


def handle_msr(m: "Machine", e: ExitRecord) -> Action:
    """RDMSR/WRMSR (EXITINFO1 0/1), by the MSR table KVM keeps:

    1. an MSR a device owns (the local APIC's) goes to the device;
    2. the MSRs the hypervisor emulates: IA32_TSC (0x10; a write moves TSC_OFFSET),
       EFER, and :attr:`Machine.msrs` (TSC_AUX, APIC_BASE, PAT, the SNP RMP
       range ...);
    3. the architectural MSRs the processor implements
       (:data:`~sandbox.hypervisor.platform.msrs.NATIVE_MSRS`: SYSCALL/SYSENTER,
       FS/GS base, MTRRs ...) run on the processor, once, without the intercept,
       after the canonical check of those holding an address;
    4. every other MSR -- at or above C000_0000h too -- raises #GP(0), as on hardware.
    """
    regs = m.regs
    msr = regs.rcx & M32
    write = e.exitinfo1 == 1
    value = (regs.rax & M32) | (regs.rdx & M32) << 32
    dev = m.bus.msr_owner(msr)
    if dev is not None:
        try:
            if not write:
                v = dev.rdmsr(msr)
                regs.rax, regs.rdx = v & M32, v >> 32
            else:
                dev.wrmsr(msr, value)
        except MsrFault:
            m.inject(Vec.GP, EventType.EXCEPTION, 0)
            return RESUME
        m.advance(e)
        return RESUME
    if msr not in (MSR_TSC, MSR_EFER) and msr not in m.msrs and msr in NATIVE_MSRS:
        if write and (wrmsr_faults(msr, value, m.guest.vmcb.CR0, m.guest.vmcb.EFER)
                      or msr in CANONICAL_MSRS and (value >> 47) not in (0, 0x1FFFF)):
            m.inject(Vec.GP, EventType.EXCEPTION, 0)
        else:
            m.cpu.pass_once(e.rip)            # the processor executes it (RIP stays on it)
        return RESUME
    if not write:
        v = _rdmsr(m, msr)
        if v is None:
            m.inject(Vec.GP, EventType.EXCEPTION, 0)
            return RESUME
        regs.rax, regs.rdx = v & M32, v >> 32
    elif not _wrmsr(m, msr, value):
        m.inject(Vec.GP, EventType.EXCEPTION, 0)
        return RESUME
    m.advance(e)
    return RESUME


# ------------------------------------------------------------------ HLT, hypercalls
def handle_hlt(m: "Machine", e: ExitRecord) -> Action:
    """HLT ends the run unless a virtual interrupt is pending."""
    v = m.guest.vmcb
    m.advance(e)
    if v.V_INTR & VIntr.V_IRQ and v.RFLAGS & RFLAGS_IF:
        return RESUME
    return m.stop(StopReason.HALT, f"guest executed HLT at {e.rip:#x}")


def _hc_print(m: "Machine", gva: int, n: int) -> int:
    """The PRINT hypercall: the guest's bytes to the console; RAX result."""
    try:
        data = m.read_virt(gva, min(n, 1 << 16))
    except (GuestPageFault, GuestGP, NestedFault):
        return -KVM_EFAULT & M64
    m.console_write(data)
    return 0


def handle_vmmcall(m: "Machine", e: ExitRecord) -> Action:
    """Hypercalls: RAX = 0 EXIT (RDI = code), RAX = 1 PRINT (RDI = GVA, RSI = length);
    any other function returns -ENOSYS."""
    regs = m.regs
    nr = regs.rax
    if nr == Hypercall.EXIT:
        m.guest_exit_code = regs.rdi & M32
        m.advance(e)
        return m.stop(StopReason.GUEST_EXIT, f"EXIT hypercall with code {m.guest_exit_code}")
    regs.rax = _hc_print(m, regs.rdi, regs.rsi) if nr == Hypercall.PRINT else -KVM_ENOSYS & M64
    m.advance(e)
    return RESUME


# ------------------------------------------------------------------ nested paging, MMIO
def handle_npf(m: "Machine", e: ExitRecord) -> Action:
    """VMEXIT_NPF: an MMIO window's access goes to its device; any other
    nested fault ends the run (this hypervisor never pages guest memory)."""
    region = m.bus.region(e.exitinfo2) if e.exitinfo1 & (1 << 32) else None
    if region is not None:
        return handle_mmio(m, e, region)
    return m.stop(StopReason.NPF, f"nested page fault at GPA {e.exitinfo2:#x} (EXITINFO1 {e.exitinfo1:#x}) "
                                  f"from RIP {e.rip:#x}")


def handle_mmio(m: "Machine", e: ExitRecord, region: MmioRegion, gpa: int | None = None) -> Action:
    """A guest access to a device window: an NPF (EXITINFO2 = the GPA), or a
    shadow-paging #PF whose guest walk ended at ``gpa``."""
    gpa = e.exitinfo2 if gpa is None else gpa
    if region.mode is MmioMode.GRANT:
        page = gpa & ~(PAGE_SIZE - 1)
        hpa = region.backing.get(page)
        if hpa is None:
            hpa = region.backing[page] = m.mem.alloc_page()
            grant = getattr(region.device, "granted", None)     # devices may want to know (optional)
            if grant is not None:
                grant(m, page - region.gpa, hpa)
        m.guest.npt.map(page, hpa)          # the instruction re-executes against RAM
        return RESUME
    code = e.insn or m.read_virt(e.rip, 15)
    mode = m.cpu.guest_code_size()
    key = (e.rip, code, mode)
    form = m.mmio_forms.get(key)
    try:
        if form is None:
            form = m.mmio_forms[key] = decode_form(code, mode)
        acc = decode_access(code, gpa, m.regs, form)
    except MmioDecodeError as err:
        return m.stop(StopReason.MMIO_ERROR, f"at RIP {e.rip:#x}, GPA {gpa:#x}: {err}")
    if acc.is_write:
        m.bus.mmio(gpa, acc.size, True, acc.value)
    else:
        complete(acc, m.bus.mmio(gpa, acc.size, False), m.regs)
    m.advance(e, e.rip + form.length)
    return RESUME


# ------------------------------------------------------------------ events
def handle_intr(m: "Machine", e: ExitRecord) -> Action:
    """A physical interrupt: the virtual timer's tick."""
    if m.timer_callback is not None:
        m.timer_callback(m)
    return RESUME


def handle_shutdown(m: "Machine", e: ExitRecord) -> Action:
    """SHUTDOWN: the guest triple-faulted."""
    return m.stop(StopReason.SHUTDOWN, f"guest triple-faulted at {e.rip:#x}")


def handle_exception(m: "Machine", e: ExitRecord) -> Action:
    """An intercepted exception: reflect it into the guest (as KVM does for #PF/#UD).

    When it was raised while the processor delivered another exception
    (EXITINTINFO valid, TYPE 3), the hypervisor applies the double-fault
    rules itself (APM §8.2.9, as KVM's exception queue does): the pair
    becomes #DF, or a shutdown -- otherwise a guest with a broken IDT would
    bounce the same exception between the intercept and delivery forever."""
    vec = e.exitcode - excp(0)
    err = (e.exitinfo1 & M32) if vec in HAS_ERROR_CODE else None
    ii = e.exitintinfo
    if ii & (1 << 31) and (ii >> 8) & 7 == EventType.EXCEPTION:
        nxt = combine(ii & 0xFF, vec)
        if nxt is None:
            return m.stop(StopReason.SHUTDOWN, f"exception {vec} while delivering exception {ii & 0xFF} "
                                               f"at {e.rip:#x}: triple fault")
        if nxt != vec:
            m.inject(nxt, EventType.EXCEPTION, 0)
            return RESUME
    if vec == Vec.PF:
        m.guest.vmcb.CR2 = e.exitinfo2
    if vec in (Vec.BP, Vec.OF):               # traps: delivered after the instruction
        m.advance(e, e.nrip or e.rip)
        m.inject(vec, EventType.EXCEPTION)
        return RESUME
    m.inject(vec, EventType.EXCEPTION, err)
    return RESUME


# ------------------------------------------------------------------ everything else
def handle_svm_insn(m: "Machine", e: ExitRecord) -> Action:
    """VMRUN/VMLOAD/VMSAVE/STGI/CLGI/SKINIT/INVLPGA from the guest: no nested
    virtualization here, so the guest gets #UD, as KVM does with nested=0."""
    m.inject(Vec.UD)
    return RESUME


def handle_invalid(m: "Machine", e: ExitRecord) -> Action:
    """VMEXIT_INVALID: VMRUN refused the VMCB; the run ends with the processor's reason."""
    return m.stop(StopReason.INVALID_VMCB, m.cpu.invalid_reason)


def reexecute(m: "Machine", e: ExitRecord) -> Action:
    """Let the intercepted instruction run once on the processor, unintercepted:
    the hypervisor "emulates" it with the real instruction (descriptor-table
    accesses, PUSHF/POPF/IRET, INT n, MOV CR/DR, XSETBV ...)."""
    m.cpu.pass_once(e.rip)
    return RESUME


def skip_instruction(m: "Machine", e: ExitRecord) -> Action:
    """Instructions a hypervisor completes by skipping them (PAUSE, WBINVD,
    INVD, MONITOR, MWAIT)."""
    m.advance(e)
    return RESUME


#: exits the processor completes by running the instruction once more, unintercepted
REEXECUTED = (*range(ExitCode.CR0_READ, ExitCode.EXCP_DE), ExitCode.CR0_SEL_WRITE, ExitCode.IDTR_READ,
              ExitCode.GDTR_READ, ExitCode.LDTR_READ, ExitCode.TR_READ, ExitCode.IDTR_WRITE, ExitCode.GDTR_WRITE,
              ExitCode.LDTR_WRITE, ExitCode.TR_WRITE, ExitCode.PUSHF, ExitCode.POPF, ExitCode.IRET,
              ExitCode.SWINT, ExitCode.INVLPG, ExitCode.XSETBV, ExitCode.ICEBP, ExitCode.RDPRU)
SVM_INSNS = (ExitCode.VMRUN, ExitCode.VMLOAD, ExitCode.VMSAVE, ExitCode.STGI, ExitCode.CLGI, ExitCode.SKINIT,
             ExitCode.INVLPGA)

#: the default handler of each exit code (KVM's ``svm_exit_handlers``)
DEFAULT_HANDLERS: dict[int, Handler] = {
    **dict.fromkeys(REEXECUTED, reexecute),
    **{excp(v): handle_exception for v in range(32)},
    **dict.fromkeys(SVM_INSNS, handle_svm_insn),
    ExitCode.CPUID: handle_cpuid,
    ExitCode.RDTSC: handle_rdtsc,
    ExitCode.RDTSCP: handle_rdtsc,
    ExitCode.RDPMC: handle_rdpmc,
    ExitCode.IOIO: handle_ioio,
    ExitCode.MSR: handle_msr,
    ExitCode.HLT: handle_hlt,
    ExitCode.VMMCALL: handle_vmmcall,
    ExitCode.NPF: handle_npf,
    ExitCode.INTR: handle_intr,
    ExitCode.SHUTDOWN: handle_shutdown,
    ExitCode.INVALID: handle_invalid,
    ExitCode.PAUSE: skip_instruction,
    ExitCode.WBINVD: skip_instruction,
    ExitCode.INVD: skip_instruction,
    ExitCode.MONITOR: skip_instruction,
    ExitCode.MWAIT: skip_instruction,
}
