"""Differential reference: the same case under Unicorn's bundled QEMU SVM.

A second, independent Unicorn instance (CPU model EPYC) runs a tiny host
stub: WRMSR EFER.SVME and VM_HSAVE_PA, CR4.PAE on, a CR0 rewrite so QEMU
refreshes its hflags, then VMRUN on a VMCB holding the case's intercept
vectors and the same guest entry state (identity-mapped long mode, nested
paging off).  The host's CR4.PAE matters: QEMU's VMRUN loads the guest's CR0
before its CR4, and ``cpu_x86_update_cr0`` ignores a CR0 that turns paging on
with EFER.LME set while CR4.PAE is clear -- Unicorn's host runs long mode
without paging (CR0 = 11h, CR4 = 0), so without it the guest kept the host's
CR0 and ran in protected mode without paging.
QEMU then checks the intercepts itself; each #VMEXIT surfaces as
``UC_HOOK_INTR`` with ``intno = 0x100 + EXITCODE`` at the guest instruction,
and QEMU leaves EXITINFO1 in ``env->error_code`` (``cpu_vmexit``).  QEMU's
``do_vmexit`` never runs under Unicorn, so only the *first* exit of a case is
compared: EXITCODE and RIP, and EXITINFO1 where the APM defines it.

Known QEMU deviations (:data:`ALLOW`), each checked against the APM:

* ``rdtscp`` -- QEMU reports RDTSCP with the RDTSC exit code 0x6E; the APM
  (Table C-1) gives RDTSCP its own code 0x87.  QEMU is wrong.
* ``ioio`` -- IOIO exits do not surface under Unicorn (its port I/O path
  skips ``helper_svm_check_io``); APM §15.10 requires them.  Not compared.
* ``exceptions`` -- exception intercepts (0x40-0x5F) do not surface, and INT3
  arrives as a plain vector 3; APM §15.12 requires them.  Not compared.
* ``cr-above-8`` -- QEMU checks CR intercepts only for CR0-CR8.  Not compared.
* ``svm-rax`` -- QEMU checks the VMRUN/VMLOAD/VMSAVE intercept before rAX's
  alignment (its helpers test the intercept first); APM §15.5.1 and Bochs
  raise #GP first.  QEMU is wrong; not compared when rAX is misaligned.
* ``sev-status`` -- QEMU applies the MSRPM to SEV_STATUS (C001_0131h); APM
  §15.34.10 says that MSR is never intercepted.  Not compared.
* ``cr0-sel-write`` -- QEMU 5.0 has no selective CR0-write intercept (0x65);
  APM §15.9.1 defines it.  Not compared.
* ``invd`` -- QEMU's translator reports INVD with the WBINVD code
  (``(b & 2) ? INVD : WBINVD`` is never true for 0F 08); APM Table C-1: INVD
  0x76.  Not compared.
* ``lock-ud`` -- QEMU ignores a LOCK prefix on an instruction that cannot
  take it and exits for LOCK CPUID, LOCK RDTSC ...; APM vol. 3 §1.2.5: #UD,
  raised at decode before any intercept.  QEMU is wrong; not compared.
* ``fast-syscall`` -- Unicorn runs SYSCALL and SYSENTER as no-ops (its helpers
  only call hooks and step over them) and, as an Intel model, decodes
  SYSENTER/SYSEXIT in 64-bit mode; APM vol. 3: SYSCALL goes to the kernel
  entry (#UD with EFER.SCE = 0), SYSENTER/SYSEXIT are #UD in long mode.  QEMU
  is wrong here; a case holding their opcodes is not compared.
* ``unmodelled`` -- MONITOR/MWAIT (the EPYC model under Unicorn raises #UD),
  RDPRU and INVPCID (misc3 vector; QEMU 5.0 has neither), ICEBP (surfaces as
  vector 1): the APM defines all of these intercepts.  Not compared.

EXITINFO1 is compared only for MSR (QEMU's ``cpu_vmexit`` passes 0/1); QEMU
5.0 has no decode assists for the others.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from unicorn import UC_HOOK_INTR, UC_PROT_ALL, Uc, UcError
from unicorn import x86_const as X
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

from ..svm.breakpoints import HardwareBreakpoints
from ..svm.cpustate import CpuState
from ..svm.engine import TbInvalidator, x86_64_engine
from ..svm.exitcodes import EXCP_END, EXCP_FIRST, ExitCode, is_excp
from ..svm.msrpm import msrpm_bit
from ..svm.vmcb import (OFF_CPL, OFF_CR4, OFF_EFER, OFF_GUEST_ASID, OFF_INTERCEPTS, OFF_IOPM_BASE_PA, OFF_RAX,
                        OFF_RSP, SEGMENTS)
from .case import GPRS, Case

_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int

MEM = 4 << 20
PML4, PDPT, PD = 0x2000, 0x3000, 0x4000
GDT = 0x1000
STUB = 0x8000
VMCB, HSAVE = 0x10000, 0x11000
MSRPM_AT, IOPM_AT = 0x12000, 0x14000
STACK = 0x90000
EXCP_VMEXIT = 0x100         # QEMU under Unicorn: an intercept is interrupt 100h + EXITCODE

#: exit codes whose EXITINFO1 QEMU passes (MSR r/w, INVLPG address, CR/DR have none under QEMU 5)
INFO1_COMPARED = {ExitCode.MSR}
#: exits QEMU never raises under Unicorn (APM requires them): not compared
NOT_SURFACING = {ExitCode.IOIO} | set(range(EXCP_FIRST, EXCP_END))
ALLOW = {
    "rdtscp": "QEMU reports RDTSCP as RDTSC (0x6E); APM Table C-1: 0x87",
    "ioio": "IOIO exits do not surface under Unicorn; APM §15.10 requires them",
    "exceptions": "exception intercepts do not surface (INT3 arrives as vector 3); APM §15.12 requires them",
    "cr-above-8": "QEMU checks CR intercepts for CR0-CR8 only",
    "svm-rax": "QEMU checks the VMRUN/VMLOAD/VMSAVE intercept before rAX alignment; APM §15.5.1: #GP first",
    "cr0-sel-write": "QEMU 5.0 has no selective CR0-write intercept; APM §15.9.1 defines 0x65",
    "sev-status": "QEMU lets the MSRPM intercept RDMSR/WRMSR of SEV_STATUS; APM §15.34.10: never intercepted",
    "invd": "QEMU reports INVD as WBINVD; APM Table C-1: INVD 0x76",
    "lock-ud": "QEMU exits for a sensitive instruction behind a LOCK it cannot take; APM vol. 3 §1.2.5: #UD first",
    "fast-syscall": "Unicorn runs SYSCALL/SYSENTER as no-ops and decodes SYSENTER/SYSEXIT in 64-bit mode; "
                    "APM vol. 3: the kernel entry or #UD",
    "unmodelled": "MONITOR/MWAIT/RDPRU/INVPCID/ICEBP intercepts never surface from QEMU 5.0 under Unicorn",
    "cpuid-model": "a CPUID the case does not intercept returns its CPU model's values (APM vol. 3 CPUID: "
                   "implementation-specific), and the sandbox's processor and the reference's EPYC model differ: "
                   "an MSR, port or address taken from them may decide a later intercept differently",
}
#: SYSCALL, SYSENTER and SYSEXIT (0F 05, 0F 34, 0F 35): see "fast-syscall"
_FAST_SYSCALLS = (b"\x0f\x05", b"\x0f\x34", b"\x0f\x35")
#: CPUID's intercept bit: misc1 (intercept word 3) bit 18 (APM Table B-1)
_CPUID_WORD, _CPUID_BIT = 3, 18
_UNMODELLED = {ExitCode.MONITOR, ExitCode.MWAIT, ExitCode.MWAIT_CONDITIONAL, ExitCode.RDPRU, ExitCode.INVPCID,
               ExitCode.ICEBP}


@dataclass
class QemuExit:
    exitcode: int
    rip: int
    exitinfo1: int
    insn: bytes = b""          # the bytes at RIP when QEMU exited (after any self-modification)
    ecx: int = 0


_KS = []


def _assembler():
    """One keystone assembler for the process (building one takes longer than a stub)."""
    if not _KS:
        from keystone import KS_ARCH_X86, KS_MODE_64, Ks
        _KS.append(Ks(KS_ARCH_X86, KS_MODE_64))
    return _KS[0]


#: the host stub around the case's registers: EFER.SVME, VM_HSAVE_PA, CR4.PAE (see the
#: module's docstring), a CR0 rewrite; then the registers; then VMRUN on the VMCB
_STUB_HEAD_SRC = f"""
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x1000
    wrmsr
    mov ecx, 0xC0010117
    mov eax, {HSAVE:#x}
    xor edx, edx
    wrmsr
    mov rax, cr4
    or eax, 0x20
    mov cr4, rax
    mov rax, cr0
    mov cr0, rax
    jmp go
    go:
"""
_STUB_TAIL_SRC = f"""
    mov rax, {VMCB:#x}
    .byte 0x0f, 0x01, 0xd8
    hlt
"""
_STUB_PARTS: list[bytes] = []
#: GPR name -> its number in ModRM/REX encodings (the QEMU order of ``case.GPRS`` is that order)
_GPR_NUMBER = {n: i for i, n in enumerate(GPRS)}


def mov_imm64(name: str, value: int) -> bytes:
    """``mov <name>, imm64`` (REX.W B8+r io): the whole register, whatever the value."""
    i = _GPR_NUMBER[name]
    return bytes((0x48 | i >> 3, 0xB8 | i & 7)) + (value & (1 << 64) - 1).to_bytes(8, "little")


def _stub(case: Case) -> bytes:
    """The host code that enters the case: assembled once, the registers encoded per case
    (keystone took about 230 us a stub, a sixth of a reference run)."""
    if not _STUB_PARTS:
        head, _ = _assembler().asm(_STUB_HEAD_SRC, STUB)
        tail, _ = _assembler().asm(_STUB_TAIL_SRC, 0)      # position-independent
        _STUB_PARTS[:] = [bytes(head), bytes(tail)]
    head, tail = _STUB_PARTS
    regs = b"".join(mov_imm64(n, v) for n, v in case.regs.items() if n not in ("rax", "rsp"))
    return head + regs + tail


class QemuSvm:
    """One case after another under QEMU's SVM; :meth:`first_exit` returns a
    case's first #VMEXIT or None.

    One Unicorn serves every case: after each, the 64 KiB chunks of its memory
    that differ from the pristine image are copied back, the CPU context saved
    before the first case is restored, and the blocks translated from those
    chunks and the soft TLB are dropped, so each case starts from the same
    machine (as a new Unicorn would, at a fraction of the cost); the blocks of
    unchanged memory (the host stub's) are kept."""

    CHUNK = 1 << 16

    def __init__(self) -> None:
        self.uc: Uc | None = None
        self.last_event: tuple[int, int] | None = None
        self._got: list[QemuExit] = []

    def _build(self) -> None:
        uc = self.uc = x86_64_engine()
        uc.ctl_set_cpu_model(X.UC_CPU_X86_EPYC)
        self._mem = ctypes.create_string_buffer(MEM)
        self._addr = ctypes.addressof(self._mem)
        uc.mem_map_ptr(0, MEM, UC_PROT_ALL, self._addr)
        # identity map of the first 1 GiB with 2 MiB pages (guest tables)
        uc.mem_write(PML4, struct.pack("<Q", PDPT | 7))
        uc.mem_write(PDPT, struct.pack("<Q", PD | 7))
        uc.mem_write(PD, b"".join(struct.pack("<Q", (i << 21) | 0x87) for i in range(512)))
        uc.mem_write(GDT, struct.pack("<3Q", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF))
        self._pristine = ctypes.create_string_buffer(MEM)
        self._paddr = ctypes.addressof(self._pristine)
        ctypes.memmove(self._paddr, self._addr, MEM)
        self._ctx = uc.context_save()
        self._st = CpuState(uc)
        #: QEMU's breakpoint objects, which a context restore leaves as the last case made them
        self._breakpoints = HardwareBreakpoints(uc, self._st)
        # memory is one RAM block at 0: a guest-physical range is its RAM range
        self._tb_inv = TbInvalidator(uc)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)

    def _on_intr(self, uc: Uc, intno: int, ud) -> None:
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        if intno >= EXCP_VMEXIT and not self._got:
            self._got.append(QemuExit(intno - EXCP_VMEXIT, rip, self._st.error_code, bytes(uc.mem_read(rip, 15)),
                                      uc.reg_read(X.UC_X86_REG_RCX) & 0xFFFF_FFFF))
        elif self.last_event is None:
            self.last_event = (intno, rip)        # an exception QEMU raised in the guest
        uc.emu_stop()

    def _reset(self) -> Uc:
        """The machine as built: memory, CPU context, no translations."""
        if self.uc is None:
            self._build()
            return self.uc
        uc, live, clean, n = self.uc, self._addr, self._paddr, self.CHUNK
        inv = self._tb_inv
        for at in range(0, MEM, n):
            if _memcmp(live + at, clean + at, n):
                ctypes.memmove(live + at, clean + at, n)
                if inv.available:
                    inv.span(at, at + n)      # the blocks translated from what the case left there
        uc.context_restore(self._ctx)
        self._breakpoints.apply()           # the clean DR7 enables none: a case's are removed
        if not inv.available:
            uc.ctl_flush_tb()
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        return uc

    def first_exit(self, case: Case, max_insns: int = 1024) -> QemuExit | None:
        uc = self._reset()
        uc.mem_write(case.entry, case.code)
        v = bytearray(0x1000)
        w = case.config.intercepts
        struct.pack_into("<6I", v, OFF_INTERCEPTS, *w)
        struct.pack_into("<QQ", v, OFF_IOPM_BASE_PA, IOPM_AT, MSRPM_AT)     # IOPM_BASE_PA, MSRPM_BASE_PA
        struct.pack_into("<I", v, OFF_GUEST_ASID, 1)
        for name, sel, attr in (("ES", 0x10, 0xC93), ("CS", 0x08, 0x29B), ("SS", 0x10, 0xC93), ("DS", 0x10, 0xC93)):
            struct.pack_into("<HHIQ", v, SEGMENTS[name], sel, attr, 0xFFFFFFFF, 0)
        struct.pack_into("<HHIQ", v, SEGMENTS["GDTR"], 0, 0, 23, GDT)
        v[OFF_CPL] = 0
        struct.pack_into("<Q", v, OFF_EFER, 0x1D00)                 # EFER: SVME NXE LMA LME
        # CR4, CR3, CR0, DR7, DR6, RFLAGS, RIP
        struct.pack_into("<7Q", v, OFF_CR4, 0x620, PML4, 0x80010033, 0x400, 0xFFFF0FF0, 0x2, case.entry)
        struct.pack_into("<Q", v, OFF_RSP, STACK)
        struct.pack_into("<Q", v, OFF_RAX, case.regs.get("rax", 0))
        uc.mem_write(VMCB, bytes(v))
        iopm = bytearray(0x3000)
        for p in case.config.iopm:
            iopm[p >> 3] |= 1 << (p & 7)
        uc.mem_write(IOPM_AT, bytes(iopm))
        msrpm = bytearray(0x2000)
        for msr, r, wr in case.config.msrpm:
            for on, is_w in ((r, False), (wr, True)):
                b = msrpm_bit(msr, is_w)
                if on and b is not None:
                    msrpm[b >> 3] |= 1 << (b & 7)
        uc.mem_write(MSRPM_AT, bytes(msrpm))
        stub = _stub(case)
        uc.mem_write(STUB, stub)
        self._got = []
        self.last_event = None
        try:
            uc.emu_start(STUB, STUB + len(stub), count=max_insns + 64)
        except UcError:
            pass
        return self._got[0] if self._got else None


_PREFIXES = frozenset({0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, *range(0x40, 0x50)})


def _opcode(insn: bytes) -> bytes:
    """The instruction's bytes from its opcode on (legacy and REX prefixes skipped)."""
    k = 0
    while k < len(insn) and insn[k] in _PREFIXES:
        k += 1
    return insn[k:]


def _locked(insn: bytes) -> bool:
    """Whether a LOCK prefix stands before the instruction, and it is not MOV CRn
    (0F 20/22, where LOCK is AMD's encoding of CR8): #UD on the processor."""
    op = _opcode(insn)
    return 0xF0 in insn[:len(insn) - len(op)] and op[:2] not in (b"\x0f\x20", b"\x0f\x22")


def compared(code: int, rip: int, case: Case) -> str | None:
    """Why a sandbox exit is *not* compared (an allow-list key), or None."""
    if code == ExitCode.RDTSCP:
        return "rdtscp"
    if code == ExitCode.IOIO:
        return "ioio"
    if is_excp(code):
        return "exceptions"
    if ExitCode.CR8_READ < code <= ExitCode.CR0_READ + 15 or ExitCode.CR8_WRITE < code <= ExitCode.CR0_WRITE + 15:
        return "cr-above-8"
    if code == ExitCode.CR0_SEL_WRITE:
        return "cr0-sel-write"
    if code in (ExitCode.INVD, ExitCode.WBINVD):
        return "invd"
    if code in _UNMODELLED:
        return "unmodelled"
    if code in (ExitCode.VMRUN, ExitCode.VMLOAD, ExitCode.VMSAVE):
        return "svm-rax"
    return None


def differential(case: Case, sandbox_exits: list, qemu: QemuSvm | None = None) -> list[str]:
    """Disagreements between the sandbox's first exit and QEMU's, after the allow-list.
    QEMU runs only when the sandbox's first exit is one that is compared."""
    s = sandbox_exits[0] if sandbox_exits else None
    if s is None or s.exitcode > 0xFF and s.exitcode != ExitCode.NPF:
        return []                       # the sandbox stopped without an instruction exit
    if compared(s.exitcode, s.rip, case) is not None or s.exitcode in (ExitCode.NPF, ExitCode.SHUTDOWN):
        return []
    q = (qemu or QemuSvm()).first_exit(case)
    if q is None:
        return []          # inconclusive: QEMU's run ended on an emulation error or its budget
    if q.exitcode == ExitCode.RDTSC and _opcode(q.insn).startswith(b"\x0f\x01\xf9"):
        return []          # "rdtscp": QEMU checks the RDTSC bit for RDTSCP (and reports it as RDTSC)
    if _locked(q.insn):
        return []          # "lock-ud": QEMU ran a LOCK the processor refuses (#UD)
    if q.exitcode == ExitCode.MSR and q.ecx == 0xC001_0131:
        return []          # "sev-status": QEMU intercepts SEV_STATUS; APM §15.34.10: it cannot be
    if q.exitcode in NOT_SURFACING or compared(q.exitcode, q.rip, case) is not None:
        return []          # QEMU stopped first on an exit it reports wrongly (see ALLOW)
    if b"\x0f\xa2" in case.code and not case.config.intercepts[_CPUID_WORD] >> _CPUID_BIT & 1:
        return []          # "cpuid-model": the two processors answer CPUID differently (see ALLOW)
    if any(op in case.code for op in _FAST_SYSCALLS):
        return []          # "fast-syscall": QEMU under Unicorn steps over SYSCALL/SYSENTER (see ALLOW)
    out = []
    if (q.exitcode, q.rip) != (s.exitcode, s.rip):
        out.append(f"first exit: sandbox {s.exitcode:#x} at {s.rip:#x}, QEMU {q.exitcode:#x} at {q.rip:#x}")
    elif s.exitcode in INFO1_COMPARED and q.exitinfo1 != s.exitinfo1:
        out.append(f"{s.exitcode:#x} EXITINFO1: sandbox {s.exitinfo1:#x}, QEMU {q.exitinfo1:#x}")
    return out
