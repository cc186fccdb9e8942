"""The VMRUN differential: the same VMCB state under Unicorn's bundled QEMU SVM.

A fresh Unicorn (CPU model EPYC, flat memory, nested paging off so guest
physical = QEMU physical) holds the harness's guest image at the same
addresses -- the identity page tables at CR3 = 2000h, the GDT, the HLT at the
entry point, the IDT and its HLT handlers -- and a host stub that sets
EFER.SVME and VM_HSAVE_PA and executes VMRUN on a VMCB built from the state.
What QEMU does first is read in the ``UC_HOOK_INTR`` hook: ``100h +
EXITCODE`` for a #VMEXIT (here the HLT intercept), the vector for an
exception or an injected event (Unicorn stops there; QEMU's ``do_vmexit``
never runs), and the guest's registers as QEMU loaded them.  ``helper_vmrun``
loads CR0 before CR4, and ``cpu_x86_update_cr0`` ignores a CR0 that turns
paging on with EFER.LME while CR4.PAE (still the host's) is clear; the stub
sets the host's CR4.PAE first so the guest's CR0 is loaded as given.

QEMU's deviations from the APM (:data:`ALLOW`), checked against its source
(``helper_vmrun`` in ``target/i386/svm_helper.c`` of Unicorn 2.1):

* ``no-consistency-checks`` -- ``helper_vmrun`` has none ("FIXME: guest
  state consistency checks"), so QEMU enters every state; APM §15.5.1
  requires VMEXIT_INVALID.  Only states the rule model calls legal are compared.
* ``cr0-et`` -- QEMU forces CR0.ET (bit 4) to 1 when it loads CR0; the APM
  (vol. 2 §3.1.1) defines ET as read-only 1 on AMD64 processors, so a VMCB
  CR0 with ET clear is loaded with ET set by both.  Compared with ET masked.
* ``efer-bits`` -- QEMU masks EFER to the bits its
  model supports (``cpu_load_efer``); EFER bits 15:13 and 7:1 are
  feature-dependent / RAZ (vol. 2 Figure 3-8): not compared.
* ``rflags`` -- QEMU loads RFLAGS through ``cpu_load_eflags``, which keeps
  its own reserved-bit handling; RFLAGS is compared on IF, TF, DF and the
  arithmetic flags only (vol. 2 §3.1.6).
* ``nmi-vector`` -- QEMU raises NMI injection as vector 2 whatever the VECTOR
  field holds, as APM §15.20 says ("if TYPE is 2 (NMI), the VECTOR field is
  ignored"): this one is *not* a deviation, and is compared.
* ``dr`` -- QEMU stores DR6/DR7 without the fixed-bit handling of MOV DR:
  not compared (the round-trip oracle checks them against the VMCB).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from keystone import KS_ARCH_X86, KS_MODE_64, Ks
from unicorn import UC_HOOK_INTR, UC_PROT_ALL, UcError
from unicorn import x86_const as X

from ..hypervisor.image import GDT, GDT_BASE
from ..svm.engine import x86_64_engine
from ..svm.vmcb import (OFF_CPL, OFF_CR4, OFF_EFER, OFF_EVENTINJ, OFF_GUEST_ASID, OFF_INTERCEPTS,
                        OFF_IOPM_BASE_PA, OFF_RAX, OFF_RSP, OFF_V_INTR, SEGMENTS)
from .oracle import Finding
from .vmrun_model import delivered_vector, verdict
from .vmrun_state import ENTRY, HANDLERS, IDT_BASE, VmrunState
from .vmrun_target import VmrunOutcome, guest_image, long64

MEM = 4 << 20
PML4, PDPT, PD = 0x2000, 0x3000, 0x4000
STUB, VMCB, HSAVE = 0x8000, 0x10000, 0x11000
EXCP_VMEXIT = 0x100
HLT_EXIT = 0x78
ALLOW = {
    "no-consistency-checks": "QEMU's helper_vmrun has no consistency checks; APM §15.5.1 requires them",
    "cr0-et": "QEMU forces CR0.ET; APM vol. 2 §3.1.1: ET is read-only 1",
    "efer-bits": "QEMU masks EFER to its model's bits; EFER 15:13, 7:1 are feature-dependent / RAZ",
    "rflags": "QEMU's cpu_load_eflags handles reserved RFLAGS bits its own way; compared on defined flags",
    "dr": "QEMU loads DR6/DR7 without MOV DR's fixed bits; compared by the round-trip oracle instead",
}
RFLAGS_DEFINED = 0x0DD5 | 0x100 | 0x200 | 0x400          # CF PF AF ZF SF OF, TF, IF, DF
CR0_ET = 1 << 4


@dataclass
class QemuFirst:
    """QEMU's first event after VMRUN: a #VMEXIT (exitcode) or a vector, at rip."""
    exitcode: int | None
    vector: int | None
    rip: int
    regs: dict


def _stub() -> bytes:
    src = f"""
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x1000
    wrmsr
    mov ecx, 0xC0010117
    mov eax, {HSAVE:#x}
    xor edx, edx
    wrmsr
    mov rax, cr4
    or rax, 0x20
    mov cr4, rax
    mov rax, cr0
    mov cr0, rax
    jmp go
    go:
    mov rax, {VMCB:#x}
    .byte 0x0f, 0x01, 0xd8
    hlt
    """
    enc, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(src, STUB)
    return bytes(enc)


_STUB: bytes | None = None


def vmcb_bytes(s: VmrunState) -> bytes:
    """The VMCB for QEMU: the state, with nested paging off (QEMU's memory is flat)."""
    v = bytearray(0x1000)
    struct.pack_into("<6I", v, OFF_INTERCEPTS, *s.intercepts)
    struct.pack_into("<QQ", v, OFF_IOPM_BASE_PA, s.iopm_base, s.msrpm_base)
    struct.pack_into("<I", v, OFF_GUEST_ASID, s.asid)
    struct.pack_into("<Q", v, OFF_V_INTR, s.v_intr)
    struct.pack_into("<Q", v, OFF_EVENTINJ, s.eventinj)
    for name, sel, attr in (("ES", 0x10, 0xC93), ("CS", 0x08, s.cs_attr), ("SS", 0x10, 0xC93), ("DS", 0x10, 0xC93)):
        struct.pack_into("<HHIQ", v, SEGMENTS[name], sel, attr, 0xFFFFFFFF, 0)
    struct.pack_into("<HHIQ", v, SEGMENTS["GDTR"], 0, 0, 23, GDT_BASE)
    struct.pack_into("<HHIQ", v, SEGMENTS["IDTR"], 0, 0, 256 * 16 - 1, IDT_BASE)
    v[OFF_CPL] = s.cpl
    struct.pack_into("<Q", v, OFF_EFER, s.efer)
    struct.pack_into("<7Q", v, OFF_CR4, s.cr4, s.cr3, s.cr0, s.dr7, s.dr6, s.rflags, s.rip)
    struct.pack_into("<Q", v, OFF_RSP, s.rsp)
    struct.pack_into("<Q", v, OFF_RAX, s.rax)
    return bytes(v)


def qemu_first(s: VmrunState) -> QemuFirst | None:
    """Run VMRUN of ``s`` under QEMU; its first event, or None if QEMU's run failed."""
    global _STUB
    if _STUB is None:
        _STUB = _stub()
    uc = x86_64_engine()
    uc.ctl_set_cpu_model(X.UC_CPU_X86_EPYC)
    uc.mem_map(0, MEM, UC_PROT_ALL)
    uc.mem_write(PML4, struct.pack("<Q", PDPT | 7))
    uc.mem_write(PDPT, struct.pack("<Q", PD | 7))
    uc.mem_write(PD, b"".join(struct.pack("<Q", (i << 21) | 0x87) for i in range(512)))
    uc.mem_write(GDT_BASE, struct.pack("<3Q", *GDT))
    for gpa, data in guest_image():
        uc.mem_write(gpa, data)
    uc.mem_write(VMCB, vmcb_bytes(s))
    uc.mem_write(STUB, _STUB)
    got: list[QemuFirst] = []

    def intr(uc_, intno, ud):
        if not got:
            regs = {"CR0": uc_.reg_read(X.UC_X86_REG_CR0), "CR3": uc_.reg_read(X.UC_X86_REG_CR3),
                    "CR4": uc_.reg_read(X.UC_X86_REG_CR4), "RSP": uc_.reg_read(X.UC_X86_REG_RSP),
                    "RFLAGS": uc_.reg_read(X.UC_X86_REG_RFLAGS),
                    "EFER": uc_.reg_read(X.UC_X86_REG_MSR, 0xC000_0080)}
            rip = uc_.reg_read(X.UC_X86_REG_RIP)
            if intno >= EXCP_VMEXIT:
                got.append(QemuFirst(intno - EXCP_VMEXIT, None, rip, regs))
            else:
                got.append(QemuFirst(None, intno, rip, regs))
        uc_.emu_stop()
    uc.hook_add(UC_HOOK_INTR, intr)
    try:
        uc.emu_start(STUB, STUB + len(_STUB), count=256)
    except UcError:
        pass
    return got[0] if got else None


def compare(s: VmrunState, out: VmrunOutcome, dram: int, q: QemuFirst | None = None) -> list[Finding]:
    """Disagreements with QEMU on a legal state the sandbox entered (after :data:`ALLOW`)."""
    if out.invalid or out.first is None or out.crash or verdict(s, dram).expect_invalid is not False:
        return []                                     # "no-consistency-checks": QEMU enters everything
    if not long64(s):
        return []                                     # the QEMU stub's tables and IDT are 64-bit ones
    q = q if q is not None else qemu_first(s)
    if q is None:
        return []
    e = out.first
    ev = s.eventinj
    fs: list[Finding] = []
    if ev & (1 << 31):
        mine = e.rip - HANDLERS if e.exitcode == HLT_EXIT and HANDLERS <= e.rip < HANDLERS + 256 else None
        theirs = q.vector if q.vector is not None else (
            q.rip - HANDLERS if q.exitcode == HLT_EXIT and HANDLERS <= q.rip < HANDLERS + 256 else None)
        if mine is not None and theirs is not None and mine != theirs:
            fs.append(Finding("vmrun-differential", f"EVENTINJ type {ev >> 8 & 7}: sandbox delivered vector "
                                                    f"{mine:#x}, QEMU {theirs:#x} (fields: {delivered_vector(ev):#x})"))
        return fs
    if not (e.exitcode == HLT_EXIT and e.rip == ENTRY and q.exitcode == HLT_EXIT and q.rip == ENTRY):
        if e.exitcode == HLT_EXIT and e.rip == ENTRY and q.exitcode is None:
            fs.append(Finding("vmrun-differential", f"sandbox reached the HLT at {ENTRY:#x}; QEMU raised vector "
                                                    f"{q.vector:#x} at {q.rip:#x}"))
        return fs
    mine = {"CR0": out.saved["CR0"] | CR0_ET, "CR3": out.saved["CR3"], "CR4": out.saved["CR4"],
            "RSP": out.saved["RSP"], "RFLAGS": out.saved["RFLAGS"] & RFLAGS_DEFINED,
            "EFER": out.saved["EFER"] & ~0xE0FE}
    theirs = dict(q.regs, CR0=q.regs["CR0"] | CR0_ET, RFLAGS=q.regs["RFLAGS"] & RFLAGS_DEFINED,
                  EFER=q.regs["EFER"] & ~0xE0FE)
    for k in mine:
        if mine[k] != theirs[k]:
            fs.append(Finding("vmrun-differential", f"{k} as loaded: sandbox {mine[k]:#x}, QEMU {theirs[k]:#x}"))
    return fs
