"""Instructions that do not exit but that Unicorn cannot run as the processor would.

The scanner hands every candidate the VMCB does not intercept to
:meth:`NativeInsns.handle`, which dispatches on the instruction kind the way
KVM's exit handlers do (one small function each): the I/O-permission #GP
Unicorn skips, HLT, INT n / INT3 / ICEBP / INTO through the guest IDT, MOV
to CR (illegal values and the tagged TLB's side effects), INVLPG, and the SVM
instructions (STGI/CLGI, INVLPGA, virtualized VMLOAD/VMSAVE).

It also owns the instruction hooks Unicorn offers for IN/OUT that reach
pass-through devices.  RDTSC/RDTSCP the VMCB does not intercept run natively
in Unicorn, which adds ``env->tsc_offset`` (written at VMRUN) to the host's
TSC; :func:`host_tsc` is that same clock, calibrated at import.  A processor
given a virtual time-stamp counter (:attr:`NativeInsns.tsc_clock`, for
reproducible runs) reads that clock instead, here, for every RDTSC/RDTSCP.
"""
from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Callable

from unicorn import UC_PROT_ALL, Uc
from unicorn import x86_const as X

from ..arch import CR4_FSGSBASE, CR4_OSXSAVE, CR4_TSD, CR4_UMIP, DR6_BS, EFER_LMA, MSR_TSC_AUX, RFLAGS_TF
from ..memory.hostmem import HostMemory
from ..memory.mmu import GuestException, GuestGP, GuestPageFault, NestedFault, NestedLayer
from ..memory.paging import Access, canonical
from ..memory.tlb import Tlb
from . import decode as D
from .alignment import CR0_AM, RFLAGS_AC
from .controls import GuestControls
from .engine import TCG_BUFFER_SMALL, x86_64_engine
from .cpustate import HF_CS64, HF_LMA, R_FS, R_GS, CpuState
from .decision import (IRQ_WINDOW, effective_address, mov_to_cr_faults, mov_to_dr_faults, svm_rax_faults,
                       wrmsr_faults, xsetbv_faults)
from .events import Vec
from .fast_syscall import FastSyscalls
from .lbr import LBR_MSRS
from .null_selector import iret_to_outer_succeeds, load_null, null_for_outer
from .exitcodes import ExitCode, excp
from .port_hooks import PortIoHooks
from .stop import StopReason
from .vmcb import (OFF_CSTAR, OFF_KERNEL_GS_BASE, OFF_LSTAR, OFF_SFMASK, OFF_STAR, OFF_SYSENTER_CS,
                   OFF_SYSENTER_EIP, OFF_SYSENTER_ESP, OFF_V_INTR, OFF_VIRT_EXT, SEGMENTS, EventType, VIntr,
                   VirtExt)
from .state_save import get_seg, put_seg

if TYPE_CHECKING:
    from .alignment import AlignmentCheck
    from .lbr import BranchRecords
    from .avic import Avic
    from .fill import TlbFill
    from .interrupts import Interrupts
    from .run import RunLoop
    from .scanner import DecisionView
    from .smc import CodeChanges
    from .world_switch import SwitchState, WorldSwitch

class _TscClock:
    """A linear map from ``time.perf_counter_ns()`` to the TSC Unicorn's RDTSC
    reads (QEMU's ``cpu_get_tsc``: the host's own counter).

    Each anchor is the best of a few RDTSCs bracketed by clock reads (the
    narrowest bracket; its midpoint is the read's time).  Two anchors ~10 ms
    apart at import give the first frequency; later, at most every
    :attr:`REANCHOR_NS`, a new anchor re-bases the map and the frequency is
    taken over the whole baseline since import, so the slope's error does not
    grow into the offset over a long run."""
    REANCHOR_NS = 500_000_000

    def __init__(self, gap_s: float = 0.01) -> None:
        uc = x86_64_engine(TCG_BUFFER_SMALL)
        uc.mem_map(0, 0x2000, UC_PROT_ALL)
        uc.mem_write(0x1000, b"\x0f\x31")                      # rdtsc
        uc.emu_start(0x1000, 0x1002)                            # translated once
        self._uc = uc
        self.ns0, self.tsc0 = self._probe(15)
        time.sleep(gap_s)
        self.ns, self.tsc = self._probe(15)
        self.dns, self.dtsc = max(1, self.ns - self.ns0), max(1, self.tsc - self.tsc0)

    def _probe(self, samples: int) -> tuple[int, int]:
        uc, clock, rr = self._uc, time.perf_counter_ns, self._uc.reg_read
        best = (1 << 62, 0, 0)
        for _ in range(samples):
            t0 = clock()
            uc.emu_start(0x1000, 0x1002)
            t1 = clock()
            if t1 - t0 < best[0]:
                best = (t1 - t0, (t0 + t1) // 2, rr(X.UC_X86_REG_RDX) << 32 | rr(X.UC_X86_REG_RAX) & 0xFFFF_FFFF)
        return best[1], best[2]

    def now(self) -> int:
        t = time.perf_counter_ns()
        if t - self.ns > self.REANCHOR_NS:
            self.ns, self.tsc = self._probe(5)
            self.dns, self.dtsc = max(1, self.ns - self.ns0), max(1, self.tsc - self.tsc0)
            t = time.perf_counter_ns()
        return (self.tsc + (t - self.ns) * self.dtsc // self.dns) & 0xFFFF_FFFF_FFFF_FFFF


_CLOCK = _TscClock()
#: the host TSC's frequency as calibrated at import (what RDTSC counts per second)
TSC_HZ = _CLOCK.dtsc * 1_000_000_000 // _CLOCK.dns


def host_tsc() -> int:
    """The host's time-stamp counter, the clock a native RDTSC in the guest reads."""
    return _CLOCK.now()


_Q = struct.Struct("<Q")

#: VMLOAD/VMSAVE's MSRs and where they sit in the VMCB (APM §15.5.2)
_VMSAVE_MSRS = ((OFF_KERNEL_GS_BASE, 0xC000_0102), (OFF_STAR, 0xC000_0081), (OFF_LSTAR, 0xC000_0082),
                (OFF_CSTAR, 0xC000_0083), (OFF_SFMASK, 0xC000_0084), (OFF_SYSENTER_CS, 0x174),
                (OFF_SYSENTER_ESP, 0x175), (OFF_SYSENTER_EIP, 0x176))
_IO = frozenset({D.Kind.IN, D.Kind.OUT, D.Kind.INS, D.Kind.OUTS})
_SVM = frozenset({D.Kind.VMLOAD, D.Kind.VMSAVE, D.Kind.SKINIT, D.Kind.VMRUN, D.Kind.STGI, D.Kind.CLGI,
                  D.Kind.INVLPGA, D.Kind.VMMCALL})
_SOFT_INT_VECTOR = {D.Kind.INT3: int(Vec.BP), D.Kind.ICEBP: int(Vec.DB)}
RFLAGS_OF = 1 << 11

Handler = Callable[[int, D.Insn, CpuState, "DecisionView", bytes], None]


def _operand(st: CpuState, insn: D.Insn) -> int:
    """MOV CRn/DRn's register operand: 64 bits in 64-bit mode, 32 elsewhere (the
    upper half a compatibility-mode register may still hold is not part of it)."""
    v = st.gpr(insn.rm)
    return v if insn.mode == 64 else v & 0xFFFF_FFFF


#: instructions CR4.UMIP restricts to CPL 0 (seen when their intercept is armed)
UMIP_KINDS = frozenset({D.Kind.SGDT, D.Kind.SIDT, D.Kind.SLDT, D.Kind.STR, D.Kind.SMSW})


class NativeInsns:
    """Emulation of what Unicorn gets wrong or cannot do for instructions that do not exit."""

    def __init__(self, uc: Uc, st: CpuState, mem: HostMemory, tlb: Tlb, ctl: GuestControls,
                 sw: "SwitchState") -> None:
        self._uc, self._st, self._mem, self._tlb, self._ctl, self._sw = uc, st, mem, tlb, ctl, sw
        self._view = mem.view
        #: ``fn(port, size, is_in, value) -> value``: not-intercepted port I/O reaches the platform
        self.io_passthrough: Callable[[int, int, bool, int], int] | None = None
        #: the host TSC when it is virtual (None: the host's own, read natively by Unicorn);
        #: set through :meth:`SvmCpu.virtualize_tsc`, which also hooks every RDTSC/RDTSCP
        self.tsc_clock: Callable[[], int] | None = None
        #: CR4 bits of features the processor was built without (:mod:`.features`): reserved, #GP to set
        self.cr4_absent = 0
        #: MSRs of features the processor was built without: RDMSR/WRMSR of them is #GP
        self.msr_absent: frozenset = frozenset()
        self._table: dict[D.Kind, Handler] = {k: self._io_permission for k in _IO}
        self._table.update({k: self._svm_insn for k in _SVM})
        self._table.update({D.Kind.HLT: self._hlt, D.Kind.INTN: self._soft_int, D.Kind.INT3: self._soft_int,
                            D.Kind.ICEBP: self._soft_int, D.Kind.MOV_TO_CR: self._mov_to_cr,
                            D.Kind.MOV_TO_DR: self._mov_to_dr, D.Kind.WRMSR: self._wrmsr,
                            D.Kind.RDMSR: self._rdmsr,
                            D.Kind.XSETBV: self._xsetbv,
                            D.Kind.LGDT: self._load_table_base, D.Kind.LIDT: self._load_table_base,
                            D.Kind.WRFSBASE: self._wrfsgsbase, D.Kind.WRGSBASE: self._wrfsgsbase,
                            D.Kind.IRET: self._iret, D.Kind.LOAD_FS_GS: self._load_fs_gs,
                            D.Kind.INVLPG: self._invlpg, D.Kind.INTO: self._into,
                            D.Kind.VEX_LEGACY: self._vex_legacy,
                            D.Kind.RDTSC: self._rdtsc, D.Kind.RDTSCP: self._rdtsc})
        self._table.update({k: self._umip for k in UMIP_KINDS})
        #: SYSCALL, SYSENTER and SYSEXIT (:mod:`.fast_syscall`)
        self._syscalls = FastSyscalls(uc, st)
        self._table.update(self._syscalls.handlers())

    def install_hooks(self) -> None:
        """Unicorn's instruction hooks for IN/OUT, raw (:class:`PortIoHooks`).
        RDTSC/RDTSCP need none: the scanner catches intercepted ones, and
        Unicorn adds TSC_OFFSET (in ``env->tsc_offset``, written at VMRUN) to
        the others at native speed."""
        self._port_hooks = PortIoHooks(self._uc, self._insn_in, self._insn_out)

    def connect(self, fill: "TlbFill", ws: "WorldSwitch", interrupts: "Interrupts", run: "RunLoop",
                smc: "CodeChanges", avic: "Avic", alignment: "AlignmentCheck", lbr: "BranchRecords") -> None:
        """Bind what the emulation calls: soft-TLB flushes and the walker's
        statistics, the #VMEXIT, event delivery, and stopping the run."""
        self._fill = fill
        self._align_cr0 = alignment.cr0
        self._lbr = lbr
        self._processor_wrote = smc.processor_wrote
        self._vmexit = ws.vmexit
        self._after_exit = ws.after_exit_in_hook
        self._raise = interrupts.raise_exception
        self._deliver = interrupts.deliver
        self._syscalls.connect(interrupts.raise_exception, self._completed)
        self._interrupts = interrupts
        self._avic = avic
        self._halt = run.halt
        self._fail = run.fail
        self._access = interrupts.access
        self._watch_irq_window = interrupts.watch_irq_window
        for k in IRQ_WINDOW - {D.Kind.IRET}:          # IRET: _iret checks its RIP first
            self._table[k] = interrupts.watch_irq_window

    def handle(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """The instruction at ``address`` runs without an exit: do the model's part of it."""
        h = self._table.get(insn.kind)
        if h is not None:
            h(address, insn, st, view, code)

    def _set_rip(self, rip: int) -> None:
        self._st.reg_write(X.UC_X86_REG_RIP, rip)

    # ------------------------------------------------------------ handlers
    def _io_permission(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """Port I/O not intercepted: only the I/O-permission #GP is the model's
        to raise (Unicorn does not check IOPL or the TSS bitmap)."""
        cpl = view.cpl
        if not cpl:
            return                  # CPL 0 is never above IOPL: no RFLAGS read
        port = insn.imm if insn.imm is not None else st.gpr(2) & 0xFFFF
        if cpl > (view.rflags() >> 12) & 3 and not view.io_allowed_by_tss(port, insn.opsize // 8):
            self._raise(Vec.GP, 0, address)

    def _hlt(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """HLT is privileged (#GP before the intercept); at CPL 0 it waits for
        a pending virtual interrupt, or ends the run."""
        if view.cpl:
            self._raise(Vec.GP, 0, address)
            return
        rflags = self._st.reg_read(X.UC_X86_REG_RFLAGS)
        self._set_rip(address + insn.length)
        if self._interrupts.virq_deliverable(rflags):
            self._interrupts.inject_virq()
            return
        if self._avic.deliver_pending():
            return
        self._halt(StopReason.HALT, f"HLT at {address:#x} with no pending interrupt")

    def _soft_int(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """INT n, INT3 and ICEBP go through the guest IDT (Unicorn never delivers them)."""
        k = insn.kind
        vec = insn.imm if k == D.Kind.INTN else _SOFT_INT_VECTOR[k]
        self._deliver(vec, None, software=(k == D.Kind.INTN) or k == D.Kind.INT3,
                      rip_after=address + insn.length, fault_rip=address)

    def _into(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """INTO (APM vol. 3 "INTO"): #UD in 64-bit mode; elsewhere, with RFLAGS.OF set,
        an #OF trap through the guest IDT (the gate's DPL checked, as for INT n), or
        the #OF intercept's #VMEXIT at the INTO (as INT3's #BP, §15.12).  With OF
        clear it does nothing, and Unicorn runs it as such."""
        if st.hflags & HF_CS64:
            self._raise(Vec.UD, None, address)
            return
        if not st.reg_read(X.UC_X86_REG_RFLAGS) & RFLAGS_OF:
            return
        nrip = address + insn.length
        if self._ctl.ivec[2] >> Vec.OF & 1:
            self._vmexit(excp(Vec.OF), 0, 0, rip=address, nrip=nrip)
            self._after_exit(address)
            return
        self._deliver(Vec.OF, None, software=True, rip_after=nrip, fault_rip=address, etype=EventType.EXCEPTION)

    def _vex_legacy(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """A VEX prefix on a legacy opcode is #UD; Unicorn would execute the legacy
        instruction.  Outside 64-bit mode C4/C5 whose next byte has ModRM.mod != 11
        are LES/LDS, which run natively."""
        if not st.hflags & HF_CS64 and code[insn.opcode_off + 1] >> 6 != 3:
            return
        self._raise(Vec.UD, None, address)

    def _umip(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """SGDT/SIDT/SLDT/STR/SMSW at CPL > 0 with CR4.UMIP: #GP (APM vol. 2 §3.1.3);
        Unicorn does not implement UMIP.  Seen only when their intercepts are armed."""
        if view.cpl and st.cr(4) & CR4_UMIP:
            self._raise(Vec.GP, 0, address)

    def _mov_to_cr(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        value = _operand(st, insn)
        if view.cpl == 0 and (mov_to_cr_faults(insn.reg, value, st.cr(0), bool(st.efer & EFER_LMA), insn.mode == 64)
                              or insn.reg == 4 and value & self.cr4_absent):
            self._raise(Vec.GP, 0, address)        # Unicorn would load the illegal value
        else:
            if insn.reg == 0 and view.cpl == 0:
                self._align_cr0(value)               # CR0.AM switches the alignment check
            self.observe_cr_write(insn.reg)

    def _mov_to_dr(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        if view.cpl == 0 and mov_to_dr_faults(insn.reg, _operand(st, insn), st.cr(4)):
            self._raise(Vec.GP, 0, address)        # Unicorn would load (DR6) or drop (DR7) the bits

    def _wrmsr(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """Unicorn's WRMSR drops EFER bits it does not implement and checks nothing else."""
        if view.cpl:
            return
        msr = st.gpr(1) & 0xFFFFFFFF
        value = (st.gpr(0) & 0xFFFFFFFF) | (st.gpr(2) & 0xFFFFFFFF) << 32
        if msr in self.msr_absent or wrmsr_faults(msr, value, st.cr(0), st.efer):
            self._raise(Vec.GP, 0, address)
        elif msr in LBR_MSRS:
            # Unicorn drops the write: the model keeps DebugCtl (the records are read-only)
            if self._lbr.wrmsr(msr, value):
                self._completed(address + insn.length)
            else:
                self._raise(Vec.GP, 0, address)
        elif msr == MSR_TSC_AUX and value >> 32:
            # AMD processors ignore TSC_AUX[63:32] (reads return zero); Unicorn would keep them
            self._uc.reg_write(X.UC_X86_REG_MSR, (msr, value & 0xFFFFFFFF))
            self._completed(address + insn.length)

    def _completed(self, next_rip: int) -> None:
        """The model carried out the instruction itself: RIP past it, and the guest's
        single step (RFLAGS.TF) traps after it, #DB with DR6.BS (APM vol. 2 §13.1.1.3),
        as Unicorn would have trapped after running it."""
        st = self._st
        stepping = st.reg_read(X.UC_X86_REG_RFLAGS) & RFLAGS_TF
        self._set_rip(next_rip)
        if stepping:
            st.reg_write(X.UC_X86_REG_DR6, st.reg_read(X.UC_X86_REG_DR6) | DR6_BS)
            self._raise(Vec.DB, None, next_rip)

    def _rdmsr(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """An MSR of a feature the processor lacks (Unicorn would read it): #GP(0).
        DebugCtl and the branch records are the model's (Unicorn reads them as 0)."""
        if view.cpl:
            return                                   # Unicorn raises the #GP itself
        msr = st.gpr(1) & 0xFFFFFFFF
        if msr in self.msr_absent:
            self._raise(Vec.GP, 0, address)
        elif msr in LBR_MSRS:
            v = self._lbr.rdmsr(msr)
            st.set_gpr(0, v & 0xFFFFFFFF)
            st.set_gpr(2, v >> 32)
            self._completed(address + insn.length)

    def _xsetbv(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """Unicorn accepts XCR0.YMM without SSE; at CPL > 0 or without CR4.OSXSAVE
        Unicorn raises the #GP / #UD that comes first."""
        if view.cpl == 0 and st.cr(4) & CR4_OSXSAVE and xsetbv_faults(
                st.gpr(1) & 0xFFFFFFFF, (st.gpr(0) & 0xFFFFFFFF) | (st.gpr(2) & 0xFFFFFFFF) << 32):
            self._raise(Vec.GP, 0, address)

    def _iret(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """IRETQ to a non-canonical RIP is #GP(0) at the IRET, before any state is
        loaded (APM vol. 3 "IRET"); Unicorn would load it all and fault at the fetch.
        Otherwise IRET may open an interrupt window."""
        if insn.opsize == 64:
            rsp = st.gpr(4)
            if not canonical(self._peek(rsp, 8, canonical=0)):
                self._raise(Vec.GP, 0, address)
                return
            if st.hflags & HF_LMA and view.cpl < 3:
                # to an outer level: FS and GS keep their bases where IRET nulls them (AMD)
                new_cpl = iret_to_outer_succeeds(st, self._peek_or_none, rsp, st.reg_read(X.UC_X86_REG_RFLAGS))
                if new_cpl is not None:
                    null_for_outer(st, new_cpl)
        self._watch_irq_window(address, insn, st, view, code)

    def _load_fs_gs(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """MOV FS/GS or POP FS/GS of a null selector in 64-bit mode keeps the segment's
        hidden base (:func:`~.null_selector.load_null`); any other load is QEMU's, and
        so is an operand read that faults (QEMU raises the fault itself)."""
        if insn.lock:
            self._raise(Vec.UD, None, address)     # LOCK on an instruction that cannot take it (vol. 3 §1.2.5)
            return
        if not st.hflags & HF_CS64:
            return
        pop = insn.mod == -1
        if insn.mod == 3:
            selector = st.gpr(insn.rm) & 0xFFFF
        else:
            n = (2 if insn.opsize == 16 else 8) if pop else 2
            gva = st.gpr(4) if pop else effective_address(code, insn, view, address + insn.length)
            if gva & (n - 1) and view.cpl == 3 and st.cr(0) & CR0_AM and view.rflags() & RFLAGS_AC:
                return          # a misaligned operand: #AC(0) (vol. 2 §8.2.18), raised by the alignment check
            value = self._read_as(gva, n, view.cpl == 3)
            if value is None:
                return
            selector = value & 0xFFFF
        if selector & 0xFFFC:
            return
        load_null(st, R_FS if insn.reg == 4 else R_GS, selector)
        if pop:
            st.set_gpr(4, (st.gpr(4) + n) & 0xFFFF_FFFF_FFFF_FFFF)
        self._completed(address + insn.length)

    def _read_as(self, gva: int, n: int, user: bool) -> int | None:
        """A little-endian value read as the instruction reads it (a user access at
        CPL 3; A bits set by the walk), or None when that read faults."""
        try:
            return int.from_bytes(self._interrupts.read_as(gva, n, user), "little")
        except (GuestPageFault, NestedFault, GuestGP, GuestException):
            return None

    def _peek_or_none(self, gva: int, n: int) -> int | None:
        return self._peek(gva, n, canonical=None)

    def _load_table_base(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView",
                         code: bytes) -> None:
        """LGDT/LIDT: a non-canonical descriptor-table base is #GP(0) (APM vol. 3 "LGDT",
        "LIDT"); Unicorn loads it.  The operand: 2-byte limit, 8-byte base in 64-bit mode."""
        if view.cpl == 0 and insn.mode == 64:          # elsewhere a 32-bit base: nothing to check
            ea = effective_address(code, insn, view, address + insn.length)
            if not canonical(self._peek(ea + 2, 8, canonical=0)):
                self._raise(Vec.GP, 0, address)

    def _wrfsgsbase(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """A non-canonical FS/GS base is #GP(0) (APM vol. 3 "WRFSBASE"); Unicorn loads it."""
        if st.cr(4) & CR4_FSGSBASE and st.hflags & HF_CS64 and insn.opsize == 64 \
                and not canonical(st.gpr(insn.rm)):
            self._raise(Vec.GP, 0, address)

    def _peek(self, gva: int, n: int, canonical: int) -> int:
        """A little-endian value the instruction is about to read; ``canonical``
        when the read would fault (the instruction then raises that fault itself)."""
        try:
            return int.from_bytes(self._access.read(gva, n), "little")
        except (GuestPageFault, NestedFault, GuestGP, GuestException):
            return canonical

    def observe_cr_write(self, cr: int) -> None:
        """A MOV to CR0/CR3/CR4 about to run: its TLB side effect (APM §5.5.2).
        Unicorn flushes its own soft TLB when it executes the move; the tagged
        model behind it is updated here.  MOV CR3 keeps global entries; a CR0 or
        CR4 write may change PG/WP/PGE/SMEP and drops the ASID's entries.  The
        processor's walker, which holds CR0/CR3/CR4, is rebuilt at the next walk."""
        if cr == 3:
            self._tlb.flush_asid(self._ctl.asid, keep_global=True)
        elif cr in (0, 4):
            self._tlb.flush_asid(self._ctl.asid)
        else:
            return
        self._fill.drop_walker()

    def _invlpg(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """INVLPG drops the page in the current ASID, global or not (APM §5.5.3)."""
        va = effective_address(code, insn, view, address + insn.length)
        self._tlb.flush_page(self._ctl.asid, va & ~0xFFF)

    def _svm_insn(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """SVM instructions the VMCB does not intercept.  VMMCALL and SKINIT
        raise #UD (APM §15.4, §15.18); the rest need EFER.SVME and CPL 0."""
        k = insn.kind
        if k in (D.Kind.VMMCALL, D.Kind.SKINIT) or not view.efer_svme():
            self._raise(Vec.UD, None, address)
        elif view.cpl:
            self._raise(Vec.GP, 0, address)
        elif k in (D.Kind.VMRUN, D.Kind.VMLOAD, D.Kind.VMSAVE) and svm_rax_faults(insn, st.gpr(0)):
            self._raise(Vec.GP, 0, address)      # rAX check precedes the intercept
        elif k in (D.Kind.STGI, D.Kind.CLGI):
            self._guest_gif(k == D.Kind.STGI)
            self._set_rip(address + insn.length)
        elif k == D.Kind.INVLPGA:
            va = st.gpr(0) & ((1 << insn.addrsize) - 1)      # rAX by the address size
            self.invlpga(va, st.gpr(1) & 0xFFFF_FFFF)
            self._set_rip(address + insn.length)
        else:
            self._virtual_vmload_vmsave(address, insn, st)

    def _guest_gif(self, on: bool) -> None:
        """STGI/CLGI not intercepted: with vGIF they set V_GIF (APM §15.33.2);
        without it they would act on the physical GIF, which this model keeps."""
        at = self._ctl.vmcb_hpa + OFF_V_INTR
        v = _Q.unpack_from(self._view, at)[0]
        if v & VIntr.V_GIF_ENABLE:
            _Q.pack_into(self._view, at, (v | VIntr.V_GIF) if on else (v & ~VIntr.V_GIF))
        else:
            self._sw.gif = on

    def invlpga(self, va: int, asid: int) -> None:
        """INVLPGA: rAX = the virtual page, ECX = the ASID whose translation
        goes (APM §15.16.3); the hypervisor's way to drop one guest page."""
        self._tlb.flush_page(asid, va & ~0xFFF)
        if asid == self._ctl.asid:
            self._fill.flush_soft_tlb()

    def _virtual_vmload_vmsave(self, address: int, insn: D.Insn, st: CpuState) -> None:
        """VMLOAD/VMSAVE the VMCB does not intercept.

        With VMSAVE/VMLOAD virtualization (VIRT_EXT bit 1, APM §15.33.1) rAX is
        a guest-physical address, translated through the nested page table.
        Without it the hardware would use rAX as a *host*-physical address; the
        sandbox never lets a guest reach host memory outside its nested
        mappings, so it stops the run and names the misconfiguration.
        """
        ctl = self._ctl
        virt = _Q.unpack_from(self._view, ctl.vmcb_hpa + OFF_VIRT_EXT)[0] & VirtExt.VMSAVE_VMLOAD_VIRTUALIZATION
        if not virt:
            self._halt(StopReason.ERROR, f"{insn.kind.name} at {address:#x} is not intercepted and VMSAVE/VMLOAD "
                       "virtualization is off: the guest would access host-physical memory")
            return
        if st.gpr(0) & 0xFFF:
            self._raise(Vec.GP, 0, address)
            return
        nested = NestedLayer(self._mem, ctl.n_cr3, self._fill.stats)
        try:
            hpa = nested.translate(st.gpr(0), Access.WRITE if insn.kind == D.Kind.VMSAVE else Access.READ).phys
        except NestedFault as f:
            self._vmexit(ExitCode.NPF, f.exitinfo1, f.gpa, rip=address, nrip=0)
            self._after_exit(address)
            return
        if insn.kind == D.Kind.VMSAVE:
            self._vmsave(hpa, st)
            self._processor_wrote(hpa)         # a VMSAVE into a code page is self-modifying code
        else:
            self._vmload(hpa, st)
        self._set_rip(address + insn.length)

    def _vmsave(self, hpa: int, st: CpuState) -> None:
        """FS, GS, TR, LDTR (with their hidden parts) and the MSRs into the VMCB at ``hpa``."""
        mv, uc = self._view, self._uc
        put_seg(mv, hpa + SEGMENTS["FS"], st.seg(R_FS))
        put_seg(mv, hpa + SEGMENTS["GS"], st.seg(R_GS))
        put_seg(mv, hpa + SEGMENTS["TR"], st.tr())
        put_seg(mv, hpa + SEGMENTS["LDTR"], st.ldt())
        for off, msr in _VMSAVE_MSRS:
            _Q.pack_into(mv, hpa + off, uc.reg_read(X.UC_X86_REG_MSR, msr))

    def _vmload(self, hpa: int, st: CpuState) -> None:
        """The same state from the VMCB at ``hpa`` into the processor."""
        mv, uc = self._view, self._uc
        st.set_seg(R_FS, *get_seg(mv, hpa + SEGMENTS["FS"]))
        st.set_seg(R_GS, *get_seg(mv, hpa + SEGMENTS["GS"]))
        for name in ("TR", "LDTR"):
            st.set_system_seg(name, *get_seg(mv, hpa + SEGMENTS[name]))
        for off, msr in _VMSAVE_MSRS:
            uc.reg_write(X.UC_X86_REG_MSR, (msr, _Q.unpack_from(mv, hpa + off)[0]))

    # ----------------------------------------------------- TSC and port I/O
    def host_tsc(self) -> int:
        """The host's time-stamp counter: :attr:`tsc_clock` when it is virtual, else :func:`host_tsc`."""
        clock = self.tsc_clock
        return clock() if clock is not None else host_tsc()

    def _rdtsc(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView", code: bytes) -> None:
        """RDTSC/RDTSCP not intercepted, on a virtual TSC: EDX:EAX = the virtual
        host TSC + TSC_OFFSET (APM §15.30.5), RDTSCP's ECX = TSC_AUX[31:0], and RIP
        past it.  Whatever else the instruction may do is left to Unicorn: the #GP
        of CR4.TSD above CPL 0, a LOCK prefix, a single step's #DB (the guest's TF)
        -- those run natively.  Without a virtual
        TSC nothing is done here (the scanner hooks these only for an intercept)."""
        clock = self.tsc_clock
        if clock is None or (view.cpl and st.cr(4) & CR4_TSD):
            return
        if 0xF0 in code[:insn.length] or st.reg_read(X.UC_X86_REG_RFLAGS) & RFLAGS_TF:
            return
        tsc = (clock() + self._ctl.tsc_offset) & 0xFFFF_FFFF_FFFF_FFFF
        aux = self._uc.reg_read(X.UC_X86_REG_MSR, MSR_TSC_AUX) & 0xFFFF_FFFF if insn.kind == D.Kind.RDTSCP else None
        q = st.q
        q[0] = tsc & 0xFFFF_FFFF                     # RAX, RDX zero-extended (QEMU order: rax rcx rdx)
        q[2] = tsc >> 32
        if aux is not None:
            q[1] = aux                               # RCX
        self._set_rip(address + insn.length)

    def _insn_in(self, handle, port: int, size: int, ud) -> int:
        """IN (or an INS element) that did not exit: the platform's port, or all ones."""
        try:
            io = self.io_passthrough
            if io is None:
                return (1 << (8 * size)) - 1
            return io(port, size, True, 0)
        except BaseException as e:          # never let an exception unwind through C
            self._fail(f"internal error in IN from port {port:#x}: {type(e).__name__}: {e}", e)
            return 0

    def _insn_out(self, handle, port: int, size: int, value: int, ud) -> None:
        """OUT (or an OUTS element) that did not exit: the platform's port, or nowhere."""
        try:
            io = self.io_passthrough
            if io is not None:
                io(port, size, False, value)
        except BaseException as e:
            self._fail(f"internal error in OUT to port {port:#x}: {type(e).__name__}: {e}", e)
