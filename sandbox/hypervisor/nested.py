"""Nested SVM: the guest (L1) runs its own guest (L2) under the sandbox's hypervisor (L0).

Opt-in, as in KVM (``Machine(nested=True)``, ``sandbox run --nested``); the
design follows KVM's ``arch/x86/kvm/svm/nested.c``:

* L1 sees SVM in CPUID and may set EFER.SVME, VM_HSAVE_PA and VM_CR (MSR
  intercepts on L1's VMCB, "VMCB01").
* L1's VMRUN is intercepted by L0: VMCB12 (in L1 memory, RAX = its GPA) is
  checked with the processor's own §15.5.1 checks, then L0 builds VMCB02:
  L2's state from VMCB12's save area, intercepts = L0's | L1's, merged
  IOPM/MSRPM, TSC_OFFSET = L0's + L1's, an ASID of its own, and nested paging
  through either L0's NPT (VMCB12 without NP: L2 physical = L1 physical) or a
  shadow NPT L0 builds on VMEXIT_NPF by walking L1's NPT (at VMCB12.N_CR3, in
  L1 memory) and composing it with L0's.  VMCB01 keeps L1's state: it is the
  host save area (KVM keeps it in the vCPU, VM_HSAVE_PA is only recorded).
* An L2 exit that L1 intercepts (VMCB12's vectors, L1's IOPM/MSRPM, an NPF of
  L1's NPT) is reflected: an emulated #VMEXIT into VMCB12 (exit fields and the
  L2 save area), L1 resumes after its VMRUN with GIF = 0 (APM §15.6, §15.17).
  Any other L2 exit goes to L0's own handler table and L2 resumes.
* STGI/CLGI (a virtual GIF), VMLOAD/VMSAVE on L1 GPAs and INVLPGA are emulated.

Between levels the machine re-enters the processor with the other VMCB
(``Machine.switch_to``); the general-purpose registers other than RAX/RSP
stay in the processor, as VMRUN and #VMEXIT leave them on hardware.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from unicorn import x86_const as X

from ..arch import (CR0_PG, CR4_SMEP, DR6_BS, DR7_RESET, EFER_LMA, EFER_LME, EFER_NXE, EFER_SVME, M64, MAXPHYADDR,
                    MSR_EFER, MSR_KERNEL_GS_BASE, RFLAGS_IF, RFLAGS_RF, RFLAGS_TF)
from ..memory.hostmem import PAGE_SIZE
from ..memory.npt import NestedPageTable
from ..memory.paging import PFErr, walk
from ..svm.consistency import MSRPM_SIZE, VmcbImage, consistency
from ..svm.cpu import ExitRecord
from ..svm.decision import wrmsr_faults
from ..svm.cpustate import R_FS, R_GS
from ..svm.events import Vec
from ..svm.exitcodes import ExitCode, excp
from ..svm.iopm import IOPM, IOPM_PAGES, IoioInfo
from ..svm.msrpm import MSRPM, MSRPM_PAGES, msrpm_bit
from ..svm.vmcb import (INTERRUPT_SHADOW_ACTIVE, OFF_INTERCEPTS, OFF_STAR, SAVE_AREA, SEGMENTS, VMCB, Event, EventType,
                        NpControl, TlbControl, VIntr, VirtExt)
from ..svm.state_save import get_seg, put_seg
from .guest import Guest, GuestPhysicalMemory
from .handlers import FIXED_LEAVES, RESUME, Action, handle_mmio, handle_msr
from .devices import MmioMode

if TYPE_CHECKING:
    from .machine import Machine

MSR_VM_CR = 0xC001_0114
MSR_VM_HSAVE_PA = 0xC001_0117
#: VM_CR.SVMDIS (bit 4): SVM disabled; L1 may not set it while EFER.SVME is 1
VM_CR_SVMDIS = 1 << 4
#: VM_CR.LOCK (bit 3): with SVMDIS set, LOCK and SVMDIS no longer change
VM_CR_LOCK = 1 << 3
#: VM_CR's defined bits (DPD, R_INIT, DIS_A20M, LOCK, SVMDIS; APM §15.30.1): the rest are
#: reserved, and a WRMSR setting one is #GP(0), as KVM's svm_set_vm_cr
VM_CR_VALID = 0x1F
M32 = 0xFFFF_FFFF
#: the state-save area VMRUN loads and #VMEXIT saves (segments ES .. the last MSR field)
SAVE_LEN = 0x700 - SAVE_AREA
_Q = struct.Struct("<Q")
#: the MSRs VMLOAD/VMSAVE move (APM §15.5.2): STAR LSTAR CSTAR SFMASK KernelGsBase SYSENTER_CS/ESP/EIP
_VMSAVE_MSRS = ((OFF_STAR + 0x00, 0xC000_0081), (OFF_STAR + 0x08, 0xC000_0082), (OFF_STAR + 0x10, 0xC000_0083),
                (OFF_STAR + 0x18, 0xC000_0084), (OFF_STAR + 0x20, 0xC000_0102), (OFF_STAR + 0x28, 0x174),
                (OFF_STAR + 0x30, 0x175), (OFF_STAR + 0x38, 0x176))
#: Fn8000_000A: revision 1, 16 ASIDs, EDX: NP (0), LbrVirt (1), NRIPS (3), VMCB clean bits (5),
#: PauseFilter (10), PauseFilterThreshold (12)
SVM_FEATURES = (1, 16, 0, (1 << 0) | (1 << 1) | (1 << 3) | (1 << 5) | (1 << 10) | (1 << 12))


# the VMCB bits tested on every nested VMRUN and #VMEXIT, as plain ints (an int & an
# IntFlag member goes through the enum's Python __rand__)
_NP_ENABLE = int(NpControl.NP_ENABLE)
_SEV_ANY = int(NpControl.SEV_ENABLE | NpControl.SEV_ES_ENABLE)
_LBRV = int(VirtExt.LBR_VIRTUALIZATION)
_FLUSH_ASID = int(TlbControl.FLUSH_ASID)
_EVENT_VALID = int(Event.VALID)
_V_IRQ, _V_INTR_MASKING = int(VIntr.V_IRQ), int(VIntr.V_INTR_MASKING)

#: the segments whose base 64-bit mode ignores, and a base's offset in a VMCB segment record
_FLAT_IN_64 = ("ES", "CS", "SS", "DS")
_SEG_BASE = 8
_ATTR_L = 1 << 9                      # CS.L in the VMCB's attribute format (APM Table B-2)


def _canonical(va: int) -> int:
    """``va`` sign-extended from bit 47 (48-bit linear addresses)."""
    va &= (1 << 48) - 1
    return va | (M64 & ~((1 << 48) - 1)) if va >> 47 else va


def _canonical_base(seg: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    sel, base, limit, flags = seg
    return sel, _canonical(base), limit, flags


class NestedContext(GuestPhysicalMemory):
    """VMCB02: the context L0 runs L2 in (what :meth:`Machine.use` switches to).

    Guest-like for the default handlers: ``vmcb``, ``iopm``, ``msrpm``,
    ``npt`` (L0's NPT of L1 without NP in VMCB12, else the shadow NPT) and
    guest-physical access through it."""

    SPACE = "L2 GPA"

    def __init__(self, l1: "Guest", asid: int) -> None:
        mem = l1.mem
        self.mem, self.l1, self.ram_size, self.npt_page = mem, l1, l1.ram_size, PAGE_SIZE
        self.alloc_vmcb()
        #: all ones: while L1 intercepts IOIO (MSR), every L2 port (MSR) access exits to L0,
        #: which reads L1's own map at the exit -- L1 may change its map while L2 runs
        self.iopm = IOPM(mem, mem.alloc_contiguous(IOPM_PAGES))
        self.msrpm = MSRPM(mem, mem.alloc_contiguous(MSRPM_PAGES))
        self.iopm.set_all(True)
        self.msrpm.set_all(True)
        self.shadow = NestedPageTable(mem)
        self.npt: NestedPageTable = l1.npt
        self.asid = asid
        self.ram = l1.ram
        #: the L1 pages of L1's NPT the shadow was built from: L1 GPA -> (HPA, bytes when last walked)
        self.walked: dict[int, tuple[int, bytes]] = {}

    def reset_shadow(self) -> None:
        """Forget every shadow mapping (L1's NPT changed, or another N_CR3)."""
        sh, mem = self.shadow, self.mem
        for t in sh.tables - {sh.root}:
            mem.free_page(t)
        mem.write(sh.root, bytes(PAGE_SIZE))
        sh.tables = {sh.root}
        sh.leaves = {}
        self.walked = {}

    def shadow_current(self) -> bool:
        """Every L1 NPT page the shadow was built from still holds what was walked.
        (A slice of the mmap is bytes, compared with one memcmp; a memoryview compared
        with bytes goes item by item, some 40 times slower.)"""
        raw = self.mem.raw
        return all(raw[h:h + PAGE_SIZE] == b for h, b in self.walked.values())

    def record_walked(self, gpas: set[int]) -> None:
        """Remember the L1 NPT pages a walk read (after its A/D updates)."""
        view = self.mem.view
        for g in gpas:
            h = self.l1.npt.lookup(g)
            if h is not None:
                self.walked[g] = (h, bytes(view[h:h + PAGE_SIZE]))


class NestedSvm:
    """L0's emulation of SVM for its guest: installs itself on ``m`` (handlers, CPUID, MSRs)."""

    def __init__(self, m: "Machine") -> None:
        self.m = m
        self.l1 = m.guest
        asid = max(g.vmcb.GUEST_ASID for g in m.guests) + 1
        self.ctx = NestedContext(self.l1, asid)
        m.guests.append(self.ctx)             # type: ignore[arg-type]  (Guest-like)
        #: L1's view: EFER.SVME, VM_HSAVE_PA, VM_CR, the virtual GIF
        self.svme = False
        #: L2's own EFER.SVME as L2 sees it (VMCB02 keeps SVME set, as a VMRUN must)
        self.l2_svme = True
        self.hsave_pa = 0
        self.vm_cr = 0
        self.gif = True
        #: in guest mode (L2 runs): the HPA and GPA of VMCB12, and whether it enables NP
        self.guest_mode = False
        self.vmcb12_hpa = 0
        self.vmcb12_gpa = 0
        self.np12 = False
        self.n_cr3_12 = 0
        #: VMCB12's ES/CS/SS/DS bases L2 runs without in 64-bit mode (offset -> raw bytes)
        self.ignored_bases: dict[int, bytes] = {}
        #: L2's RIP at the last VMRUN (its interrupt shadow covers the instruction there)
        self.entry_rip = -1
        #: the ASID VMCB12 gave L2 at the last VMRUN
        self.asid12 = -1
        self.nested_runs = 0
        m.cpuid_overrides.setdefault((0x8000_0001, -1), self._cpuid_ext())
        m.cpuid_overrides.setdefault((0x8000_000A, -1), SVM_FEATURES)
        if m.sev is None:                     # the extended leaves now reach Fn8000_000A
            m.cpuid_overrides.setdefault((0x8000_0000, -1), (0x8000_000A, *FIXED_LEAVES[0][1:]))
        #: L0's MSR handler before nested SVM took the exit (the PC platform's, or the default)
        self._l0_msr = m.handlers.get(int(ExitCode.MSR), handle_msr)
        for code, fn in ((ExitCode.VMRUN, self.vmrun), (ExitCode.VMLOAD, self.vmload),
                         (ExitCode.VMSAVE, self.vmsave), (ExitCode.STGI, self.stgi), (ExitCode.CLGI, self.clgi),
                         (ExitCode.INVLPGA, self.invlpga), (ExitCode.MSR, self.msr)):
            m.handlers[int(code)] = fn
        v = self.l1.vmcb
        v.set_intercept(ExitCode.MSR)
        for msr in (MSR_EFER, MSR_VM_CR, MSR_VM_HSAVE_PA):
            self.l1.msrpm.set(msr, read=True, write=True)

    @staticmethod
    def _cpuid_ext() -> tuple[int, int, int, int]:
        a, b, c, d = FIXED_LEAVES[0x8000_0001]
        return a, b, c | (1 << 2), d           # ECX[2]: SVM

    # ------------------------------------------------------------------ L1's MSRs
    def msr(self, m: "Machine", e: ExitRecord) -> Action | None:
        """EFER (SVME is L1's virtual bit), VM_HSAVE_PA and VM_CR; the rest to L0's MSR handler.
        While L2 runs (an access L1 does not intercept): L2's EFER, its SVME as VMCB12 gave
        it; VM_HSAVE_PA and VM_CR are the processor's one register each, L1's (as KVM's
        svm_get_msr/svm_set_msr, whatever the guest mode -- kvm-unit-tests'
        msr_intercept_check has L2 read what L1 reads)."""
        regs = m.regs
        msr, write = regs.rcx & M32, e.exitinfo1 == 1
        value = (regs.rax & M32) | (regs.rdx & M32) << 32
        if self.guest_mode and msr == MSR_EFER:
            return self._l2_efer(m, e, write, value)
        if msr == MSR_EFER:
            if not write:
                v = (m.guest.vmcb.EFER & ~EFER_SVME) | (EFER_SVME if self.svme else 0)
                regs.rax, regs.rdx = v & M32, v >> 32
            elif value & EFER_SVME and self.vm_cr & VM_CR_SVMDIS:
                m.inject(Vec.GP, error_code=0)
                return RESUME
            else:
                self.svme = bool(value & EFER_SVME)
                m.guest.vmcb.EFER = value | EFER_SVME
        elif msr == MSR_VM_HSAVE_PA:
            # a page-aligned physical address below MAXPHYADDR (APM §15.30.4)
            if write and (value & 0xFFF or value >> MAXPHYADDR):
                m.inject(Vec.GP, error_code=0)
                return RESUME
            if write:
                self.hsave_pa = value
            else:
                regs.rax, regs.rdx = self.hsave_pa & M32, self.hsave_pa >> 32
        elif msr == MSR_VM_CR:
            if write:
                # reserved bits, and SVMDIS while the writer's EFER.SVME is set, are #GP(0)
                # (APM §15.30.1); once SVMDIS is set, LOCK and SVMDIS stay
                keep = VM_CR_LOCK | VM_CR_SVMDIS if self.vm_cr & VM_CR_SVMDIS else 0
                new = (self.vm_cr & keep) | (value & VM_CR_VALID & ~keep)
                svme = self.l2_svme if self.guest_mode else self.svme
                if value & ~VM_CR_VALID or (new & VM_CR_SVMDIS and svme):
                    m.inject(Vec.GP, error_code=0)
                    return RESUME
                self.vm_cr = new
            else:
                regs.rax, regs.rdx = self.vm_cr & M32, self.vm_cr >> 32
        else:
            return self._l0_msr(m, e)
        m.advance(e)
        return RESUME

    def _l2_efer(self, m: "Machine", e: ExitRecord, write: bool, value: int) -> Action:
        """RDMSR/WRMSR of EFER by L2 that L1 does not intercept: L2's SVME is its own
        (it may clear it, and then its SVM instructions are #UD); VMCB02 keeps SVME set."""
        v02, regs = m.guest.vmcb, m.regs
        efer = v02.EFER
        if not write:
            v = (efer & ~EFER_SVME) | (EFER_SVME if self.l2_svme else 0)
            regs.rax, regs.rdx = v & M32, v >> 32
        elif wrmsr_faults(MSR_EFER, value, v02.CR0, efer):
            m.inject(Vec.GP, error_code=0)
            return RESUME
        else:
            self.l2_svme = bool(value & EFER_SVME)
            v02.EFER = (value & ~EFER_LMA) | (efer & EFER_LMA) | EFER_SVME      # LMA is read-only
        m.advance(e)
        return RESUME

    # ------------------------------------------------------------------ checks
    def _svm_insn_faults(self, m: "Machine", e: ExitRecord, *, rax_page: bool) -> bool:
        """#UD without EFER.SVME (L1's virtual one, or L2's own while L2 runs), #GP at
        CPL > 0 or for a VMCB address outside L1's memory; True when raised."""
        if not (self.l2_svme if self.guest_mode else self.svme):
            m.inject(Vec.UD)
            return True
        if m.cpu.guest_cpl():                 # the processor's, as at the exit (no VMCB write-back)
            m.inject(Vec.GP, error_code=0)
            return True
        if rax_page:
            gpa = m.regs.rax
            if gpa & 0xFFF or gpa + PAGE_SIZE > self.l1.ram_size or self.l1.npt.lookup(gpa) is None:
                m.inject(Vec.GP, error_code=0)
                return True
        return False

    # ------------------------------------------------------------------ VMRUN
    def vmrun(self, m: "Machine", e: ExitRecord) -> Action | None:
        if self.guest_mode:                   # L2's VMRUN: L1 always intercepts it (checked at VMRUN)
            return self.reflect(e)
        if self._svm_insn_faults(m, e, rax_page=True):
            return RESUME
        gpa = m.regs.rax
        hpa12 = self.l1.gpa_to_hpa(gpa)
        nrip = e.nrip or e.rip + 3
        img = VmcbImage.read(m.mem.view, hpa12)
        # the permission maps may lie anywhere below L1's MAXPHYADDR (APM §15.5.1: "extends to a
        # physical address >= the maximum supported"); an exit reads them where they are
        why = consistency(img, 1 << MAXPHYADDR, cr4_mbz=m.cpu.cr4_reserved)
        if not why and img.intercepted(ExitCode.MSR) and img.msrpm + MSRPM_SIZE > self.l1.ram_size:
            # L1's MSRPM is read for the L2 exits it governs; one outside L1's memory fails the
            # VMRUN, as under KVM, which merges it at VMRUN (kvm-unit-tests "Test MSRPM address")
            why = "MSRPM outside L1's memory"
        if not why and img.np_control & _SEV_ANY:
            # L1's processor offers no SEV (CPUID Fn8000_001F is not L1's): §15.34.3
            why = "SEV enable set in VMCB12, but L1's processor has no SEV"
        v12 = VMCB(m.mem, hpa12)
        if why:
            # VMEXIT_INVALID for L1 (APM §15.5.1): EXITCODE = -1, L1 goes on after its VMRUN
            v12.EXITCODE, v12.EXITINFO1, v12.EXITINFO2 = M64, 0, 0
            self.invalid_reason = why
            m.advance(e, nrip)
            return RESUME
        self.vmcb12_hpa, self.vmcb12_gpa = hpa12, gpa
        v01 = self.l1.vmcb
        v01.RIP = nrip                        # where L1 resumes at the #VMEXIT that ends L2
        # the VMRUN completes: it clears L1's RFLAGS.RF (which let it past an instruction
        # breakpoint on itself); a single step (TF) is taken after the #VMEXIT (see reflect)
        v01.RFLAGS &= ~RFLAGS_RF
        self._build_vmcb02(m, v12, img)
        self.l2_svme = bool(img.efer & EFER_SVME)   # set: VMRUN's checks refuse a VMCB12 without it
        self.guest_mode = True
        self.gif = True                        # VMRUN sets GIF
        self.nested_runs += 1
        return m.switch_to(self.ctx)          # type: ignore[arg-type]

    def _build_vmcb02(self, m: "Machine", v12: VMCB, img: VmcbImage) -> None:
        ctx, mem, v01 = self.ctx, m.mem, self.l1.vmcb
        hpa02, hpa12 = ctx.vmcb_hpa, self.vmcb12_hpa
        mem.write(hpa02, bytes(PAGE_SIZE))
        mem.write(hpa02 + SAVE_AREA, mem.read(hpa12 + SAVE_AREA, SAVE_LEN))
        v02 = ctx.vmcb
        w01 = list(struct.unpack("<6I", mem.read(self.l1.vmcb_hpa + OFF_INTERCEPTS, 24)))
        # L0's interrupt window for L1 (V_IRQ + VINTR in VMCB01) is L1's alone
        w01[ExitCode.VINTR >> 5] &= ~(1 << (ExitCode.VINTR & 31))
        mem.write(hpa02 + OFF_INTERCEPTS, struct.pack("<6I", *(a | b for a, b in zip(w01, img.ivec))))
        # permission maps: L0's for L1 when L1 does not intercept the class; else all ones,
        # and the exit asks L1's map (read at the exit, as the processor reads it)
        v02.IOPM_BASE_PA = ctx.iopm.hpa if img.intercepted(ExitCode.IOIO) else self.l1.iopm.hpa
        v02.MSRPM_BASE_PA = ctx.msrpm.hpa if img.intercepted(ExitCode.MSR) else self.l1.msrpm.hpa
        v02.TSC_OFFSET = (v01.TSC_OFFSET + img.tsc_offset) & M64
        self._pause_filter(v01, img)
        v02.GUEST_ASID = ctx.asid
        # LBR virtualization as L1 asks (VMCB02's DBGCTL ... LASTEXCPTO are VMCB12's, copied
        # with the save area and back at the #VMEXIT); without it L2 records into the
        # registers L1 has, as on hardware (KVM's nested_vmcb02_prepare_save)
        v02.VIRT_EXT = v12.VIRT_EXT & _LBRV
        v02.V_INTR = v12.V_INTR
        v02.INTERRUPT_SHADOW = v12.INTERRUPT_SHADOW
        # in 64-bit mode the ES, CS, SS and DS bases are ignored (APM vol. 2 §4.12): L2 runs
        # with them zero, and VMCB12 keeps its own values (kvm-unit-tests test_canonicalization:
        # VMRUN succeeds with a non-canonical CS.base and does not rewrite it)
        self.ignored_bases = {}
        if img.efer & EFER_LME and img.cr0 & CR0_PG and img.cs_attr & _ATTR_L:     # long mode, 64-bit CS
            for name in _FLAT_IN_64:
                at = SEGMENTS[name] + _SEG_BASE
                self.ignored_bases[at] = mem.read(hpa12 + at, 8)
                mem.write(hpa02 + at, bytes(8))
        self.entry_rip = img.rip                # where the shadow VMRUN loaded applies
        v02.EVENTINJ = img.eventinj
        v02.NP_CONTROL = _NP_ENABLE
        np12 = bool(img.np_control & _NP_ENABLE)
        # L0 runs every L2 on one ASID of its own: L1's TLB_CONTROL, another L1 ASID, another
        # NPT, or an L1 NPT that changed since the shadow was built flush it (APM §15.16)
        flush = bool(img.tlb_control) or img.asid != self.asid12 or np12 != self.np12
        if np12:                               # L2 GPA -> L1's NPT -> L1 GPA -> L0's NPT: a shadow NPT
            if img.n_cr3 != self.n_cr3_12 or not self.np12 or not ctx.shadow_current():
                ctx.reset_shadow()
                flush = True
            self.n_cr3_12 = img.n_cr3
            ctx.npt = ctx.shadow
        else:                                  # L2 physical = L1 physical
            ctx.npt = self.l1.npt
        self.np12, self.asid12 = np12, img.asid
        v02.TLB_CONTROL = _FLUSH_ASID if flush else 0
        v02.N_CR3 = ctx.npt.n_cr3
        v02.set_intercept(ExitCode.NPF)

    def _pause_filter(self, v01: VMCB, img: VmcbImage) -> None:
        """VMCB02's PAUSE filter, as KVM's nested.c sets it: L1's count and threshold
        when L0 does not intercept PAUSE; else L0's, with a zero L1 asks for (it
        intercepts PAUSE) kept, so L1 sees every PAUSE it filters nothing of."""
        v02 = self.ctx.vmcb
        if not v01.intercept(ExitCode.PAUSE):
            v02.PAUSE_FILTER_COUNT, v02.PAUSE_FILTER_THRESHOLD = img.pause_filter_count, img.pause_filter_threshold
            return
        v02.PAUSE_FILTER_COUNT, v02.PAUSE_FILTER_THRESHOLD = v01.PAUSE_FILTER_COUNT, v01.PAUSE_FILTER_THRESHOLD
        if img.intercepted(ExitCode.PAUSE):
            if not img.pause_filter_count:
                v02.PAUSE_FILTER_COUNT = 0
            if not img.pause_filter_threshold:
                v02.PAUSE_FILTER_THRESHOLD = 0

    # ------------------------------------------------------------------ L2 exits
    def handler_for(self, rec: ExitRecord, h):
        """The handler of an exit taken while L2 runs: reflect it to L1, or L0's own."""
        if rec.exitcode == ExitCode.NPF:
            return self._npf if self.np12 else h
        if rec.exitcode == ExitCode.VMRUN or self._l1_intercepts(rec):
            return lambda m, e: self.reflect(e)
        return h

    def _l1_intercepts(self, rec: ExitRecord) -> bool:
        v12 = VMCB(self.m.mem, self.vmcb12_hpa)
        code = rec.exitcode
        if code in (ExitCode.INTR, ExitCode.NMI, ExitCode.INVALID) or code > 0x400:
            return False                        # physical events stay with L0
        if not v12.intercept(code):
            return False
        if code == ExitCode.IOIO:
            info = rec.exitinfo1
            port = info >> 16 & 0xFFFF
            size = 1 if info & IoioInfo.SZ8 else (2 if info & IoioInfo.SZ16 else 4)
            base = v12.IOPM_BASE_PA & ~0xFFF
            try:
                raw = self.l1.read_phys(base + (port >> 3), 2)
            except KeyError:
                return True
            bits = int.from_bytes(raw, "little") >> (port & 7)
            return bool(bits & ((1 << size) - 1))
        if code == ExitCode.MSR:
            bit = msrpm_bit(self.m.regs.rcx & M32, rec.exitinfo1 == 1)
            if bit is None:
                return True
            try:
                byte = self.l1.read_phys((v12.MSRPM_BASE_PA & ~0xFFF) + (bit >> 3), 1)[0]
            except KeyError:
                return True
            return bool(byte >> (bit & 7) & 1)
        return True

    def _npf(self, m: "Machine", e: ExitRecord) -> Action | None:
        """VMEXIT_NPF from L2 with L1's NPT: fix the shadow, or reflect L1's NPF."""
        l2gpa = e.exitinfo2
        err = e.exitinfo1
        access = 1 if err & PFErr.W else (2 if err & PFErr.ID else 0)
        npt01 = self.l1.npt

        pages: set[int] = set()

        def rd(a: int) -> int:
            hpa = npt01.lookup(a)
            if hpa is None:
                raise LookupError(a)
            pages.add(a & ~0xFFF)
            return _Q.unpack_from(m.mem.view, hpa)[0]

        def wr(a: int, v: int) -> None:
            m.mem.write(npt01.lookup(a), _Q.pack(v))
        try:
            # L1's NPT is walked as L1's processor would: its NX bit is reserved while L1's
            # EFER.NXE is clear (APM §15.25.2, the host's NXE applies to nested tables), and a
            # fetch's fault reports I/D only with the host's EFER.NXE or CR4.SMEP set (APM vol. 2
            # §8.4.2, as KVM's walk_addr_generic: "is_efer_nx || is_cr4_smep"); nested accesses
            # are user accesses, so SMEP itself never faults here
            nxe = bool(self.l1.vmcb.EFER & EFER_NXE)
            smep = bool(self.l1.vmcb.CR4 & CR4_SMEP)
            r = walk(self.n_cr3_12, l2gpa, access, True, rd, wr, wp=True, nxe=nxe, smep=smep)
        except LookupError:
            r = None
        self.ctx.record_walked(pages)
        if r is None or r.fault is not None:
            fault = (r.fault if r is not None else int(PFErr.P | PFErr.RSVD))
            info1 = fault | (err & (PFErr.FINAL | PFErr.PT_WALK))
            return self.reflect(ExitRecord(int(ExitCode.NPF), info1, l2gpa, e.exitintinfo, e.rip, 0, e.insn))
        hpa = npt01.lookup(r.phys & ~0xFFF)
        region = m.bus.region(r.phys) if hpa is None else None
        if region is not None and region.mode is MmioMode.TRAP:
            # L1's NPT maps the L2 page onto one of L1's device windows (the APIC): the
            # access is L1's device access, emulated at the L1 address like L1's own
            return handle_mmio(m, ExitRecord(int(ExitCode.NPF), e.exitinfo1, r.phys, e.exitintinfo, e.rip,
                                             e.nrip, e.insn), region)
        if hpa is None:
            return m.stop("npf", f"L2 GPA {l2gpa:#x} -> L1 GPA {r.phys:#x} is not L1 RAM (MMIO under L2 "
                                 "is not emulated)")
        # writable in the shadow only once L1's leaf is Dirty: L2's first write walks again and sets D
        self.ctx.shadow.map(l2gpa & ~0xFFF, hpa, write=r.writable and (access == 1 or r.dirty),
                            execute=r.executable)
        if e.exitintinfo & _EVENT_VALID:
            # the NPF interrupted an event's delivery (e.g. L1's EVENTINJ through L2's IDT):
            # L0 injects it again, from EXITINTINFO (APM §15.7.2)
            self.ctx.vmcb.EVENTINJ = e.exitintinfo
        return RESUME

    # ------------------------------------------------------------------ physical interrupts
    def holds_interrupt(self, nmi: bool = False) -> bool:
        """A physical interrupt (``nmi``: an NMI) for L1 cannot be taken now.

        While L1 runs: GIF is clear (APM §15.17: between L1's #VMEXIT and its
        STGI every interrupt, NMI included, is held).  While L2 runs: GIF is
        set (VMRUN set it); an INTR is masked by L1's RFLAGS.IF as of its
        VMRUN when VMCB12 has V_INTR_MASKING, else by L2's RFLAGS.IF
        (§15.21.1), as KVM's ``svm_interrupt_blocked`` reads it."""
        if not self.gif:
            return True                         # L1 between its #VMEXIT and STGI, or L2 after its own CLGI
        if not self.guest_mode:
            return False
        if nmi:
            return False
        if VMCB(self.m.mem, self.vmcb12_hpa).V_INTR & _V_INTR_MASKING:
            return not self.l1.vmcb.RFLAGS & RFLAGS_IF
        return not self.ctx.vmcb.RFLAGS & RFLAGS_IF

    def l1_leaves_virq_to_l0(self) -> bool:
        """L2 runs and VMCB12 has neither V_IRQ nor the VINTR intercept nor V_INTR_MASKING:
        L0 may use VMCB02's V_IRQ for an interrupt window of its own."""
        if not self.guest_mode:
            return False
        v12 = VMCB(self.m.mem, self.vmcb12_hpa)
        return not v12.V_INTR & (_V_IRQ | _V_INTR_MASKING) and not v12.intercept(ExitCode.VINTR)

    def exit_on_interrupt(self, nmi: bool = False, smi: bool = False) -> bool:
        """L2 runs and L1 intercepts the physical interrupt (INTR, NMI or SMI): the
        interrupt becomes an emulated #VMEXIT to L1 and stays pending for L1,
        which takes it once its GIF and RFLAGS.IF allow (§15.21.2).  True when done."""
        return self._reflect_if_l1_intercepts(ExitCode.SMI if smi else (ExitCode.NMI if nmi else ExitCode.INTR))

    def exception_for_l1(self, vector: int, error_code: int | None) -> bool:
        """L0 raises an exception in L2 (an instruction it emulates faults): when L1
        intercepts that exception it gets the #VMEXIT, with L2 at the faulting
        instruction, as KVM's nested_svm_inject_exception_vmexit; True when done."""
        return self._reflect_if_l1_intercepts(excp(vector), error_code or 0)

    def _reflect_if_l1_intercepts(self, code: int, exitinfo1: int = 0) -> bool:
        """While L2 runs, an event that is not an instruction's (an interrupt, an exception
        L0 raises): L1's #VMEXIT ``code`` at L2's RIP when VMCB12 intercepts it; True then."""
        if not self.guest_mode or not VMCB(self.m.mem, self.vmcb12_hpa).intercept(code):
            return False
        self.reflect(ExitRecord(int(code), exitinfo1, 0, 0, self.ctx.vmcb.RIP, 0))
        return True

    def reflect(self, e: ExitRecord) -> Action:
        """The emulated #VMEXIT from L2 to L1 (APM §15.6): exit fields and L2's state into
        VMCB12, L1 on at the instruction after its VMRUN with GIF = 0."""
        m, ctx = self.m, self.ctx
        m.cpu.flush_guest_state()
        mem, hpa12 = m.mem, self.vmcb12_hpa
        v02, v12 = ctx.vmcb, VMCB(mem, hpa12)
        mem.write(hpa12 + SAVE_AREA, mem.read(ctx.vmcb_hpa + SAVE_AREA, SAVE_LEN))
        if not self.l2_svme:                    # L2 cleared its EFER.SVME: VMCB12 shows it so
            v12.EFER = v12.EFER & ~EFER_SVME
        for at, raw in self.ignored_bases.items():
            mem.write(hpa12 + at, raw)
        v12.EXITCODE, v12.EXITINFO1, v12.EXITINFO2 = e.exitcode & M64, e.exitinfo1 & M64, e.exitinfo2 & M64
        # an event L1 injected that the processor has not delivered yet goes back in
        # EXITINTINFO (APM §15.7.2), as an interrupted delivery would
        pending = v02.EVENTINJ
        v12.EXITINTINFO = e.exitintinfo or (pending if pending & _EVENT_VALID else 0)
        v12.NRIP = e.nrip
        v12.EVENTINJ = 0
        # the shadow VMRUN loaded covers L2's first instruction only (APM §15.21.5): once L2
        # has moved on, the #VMEXIT reports it over (the processor model does not write it back)
        shadow = v02.INTERRUPT_SHADOW
        if e.rip != self.entry_rip:
            shadow &= ~INTERRUPT_SHADOW_ACTIVE
        v12.INTERRUPT_SHADOW = shadow
        # V_TPR goes back to L1, and V_IRQ (cleared once the virtual interrupt was taken) when
        # L1 had set it -- a V_IRQ L0 set in VMCB02 for its own window stays L0's
        keep = (_V_IRQ if v12.V_INTR & _V_IRQ else 0) | 0xF
        v12.V_INTR = (v12.V_INTR & ~keep) | (v02.V_INTR & keep)
        self.guest_mode = False
        self.gif = False                        # #VMEXIT clears GIF (APM §15.17)
        v01 = self.l1.vmcb
        # the #VMEXIT disables L1's breakpoints: DR7 = 400h (APM §15.6; KVM's nested_svm_vmexit
        # sets L1's DR7 to DR7_FIXED_1), so an instruction breakpoint L1 armed on its VMRUN
        # does not fire again at the next one
        v01.DR7 = DR7_RESET
        if v01.RFLAGS & RFLAGS_TF:
            # L1 single-stepped its VMRUN: the #DB trap comes after the #VMEXIT, before L1's
            # next instruction, on the host side (APM vol. 2 §15.5.1 on host RFLAGS.TF; KVM's
            # nested_svm_vmexit queues it the same way). GIF does not hold exceptions.
            v01.DR6 |= DR6_BS
            v01.inject(Event(Vec.DB, EventType.EXCEPTION))
        return m.switch_to(self.l1)

    # ------------------------------------------------------------------ the other SVM instructions
    def vmload(self, m: "Machine", e: ExitRecord) -> Action | None:
        """L1's VMLOAD, or L2's when L1 does not intercept it (``handler_for`` reflects the
        intercepted ones): it runs on the current state, rAX an L1 physical address, as KVM does."""
        if self._svm_insn_faults(m, e, rax_page=True):
            return RESUME
        hpa, cpu = self.l1.gpa_to_hpa(m.regs.rax), m.cpu
        st, mv = cpu.st, m.mem.view
        # the loaded segment bases and KERNEL_GS_BASE are canonical whatever VMCB12 holds: a
        # VMSAVE after the VMLOAD stores them sign-extended from bit 47 (kvm-unit-tests
        # test_canonicalization, "Test FS.base for canonical form")
        st.set_seg(R_FS, *_canonical_base(get_seg(mv, hpa + SEGMENTS["FS"])))
        st.set_seg(R_GS, *_canonical_base(get_seg(mv, hpa + SEGMENTS["GS"])))
        for name in ("TR", "LDTR"):
            st.set_system_seg(name, *_canonical_base(get_seg(mv, hpa + SEGMENTS[name])))
        for off, msr in _VMSAVE_MSRS:
            value = _Q.unpack_from(mv, hpa + off)[0]
            cpu.uc.reg_write(X.UC_X86_REG_MSR, (msr, _canonical(value) if msr == MSR_KERNEL_GS_BASE else value))
        m.advance(e)
        return RESUME

    def vmsave(self, m: "Machine", e: ExitRecord) -> Action | None:
        """L1's VMSAVE, or L2's when L1 does not intercept it (``handler_for`` reflects the
        intercepted ones): it runs on the current state, rAX an L1 physical address, as KVM does."""
        if self._svm_insn_faults(m, e, rax_page=True):
            return RESUME
        hpa, cpu = self.l1.gpa_to_hpa(m.regs.rax), m.cpu
        st, mv = cpu.st, m.mem.view
        put_seg(mv, hpa + SEGMENTS["FS"], st.seg(R_FS))
        put_seg(mv, hpa + SEGMENTS["GS"], st.seg(R_GS))
        put_seg(mv, hpa + SEGMENTS["TR"], st.tr())
        put_seg(mv, hpa + SEGMENTS["LDTR"], st.ldt())
        for off, msr in _VMSAVE_MSRS:
            _Q.pack_into(mv, hpa + off, cpu.uc.reg_read(X.UC_X86_REG_MSR, msr))
        m.advance(e)
        return RESUME

    def stgi(self, m: "Machine", e: ExitRecord) -> Action | None:
        """STGI from L1, or from L2 when L1 does not intercept it (an intercepted one
        was reflected before this): the GIF of the level that runs.  An interrupt it
        held is then taken -- by L2's INTR intercept in L1, kvm-unit-tests'
        svm_intr_intercept_mix_gif -- at the resume that follows."""
        if self._svm_insn_faults(m, e, rax_page=False):
            return RESUME
        self.gif = True
        m.advance(e)
        return RESUME

    def clgi(self, m: "Machine", e: ExitRecord) -> Action | None:
        """CLGI from L1, or from L2 when L1 does not intercept it: GIF = 0 holds every
        physical interrupt and NMI (APM §15.17) until STGI or a #VMEXIT to L1."""
        if self._svm_insn_faults(m, e, rax_page=False):
            return RESUME
        self.gif = False
        m.advance(e)
        return RESUME

    def invlpga(self, m: "Machine", e: ExitRecord) -> Action | None:
        """INVLPGA from L1: drop the page from L2's TLB (L0's ASID for L2)."""
        if self.guest_mode:
            return self.reflect(e)
        if self._svm_insn_faults(m, e, rax_page=False):
            return RESUME
        m.invlpga(m.regs.rax & ~0xFFF, self.ctx.asid)
        m.advance(e)
        return RESUME
