"""The world switch: VMRUN's guest-state load, #VMEXIT's save, and the dispatch loop.

Exits the hypervisor resumes are handled inside the Unicorn hook that
detected them: the world switch is a state transfer, not an ``emu_start``
round trip, which keeps an intercepted CPUID round trip in the microseconds.

Two shortcuts make that transfer cheap, both what the APM allows:

* #VMEXIT writes RIP, RSP and RAX to the VMCB at once; the rest of the
  state-save area is written back lazily, before the hypervisor's first
  access to it through ``HostMemory`` (:meth:`WorldSwitch.host_access`).
* VMRUN after a handler that touched only RAX, RSP and RIP (never-cached
  fields, APM §15.15.3) skips the checks and the reload: everything else was
  checked and loaded at the last full VMRUN and is still what the processor
  holds -- what the VMCB clean bits let hardware do.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from unicorn import Uc, UcError
from unicorn import x86_const as X

from ..arch import EFER_LMA, EFER_SVME, M64, MSR_EFER
from ..memory.hostmem import HostMemory
from ..memory.tlb import Tlb, TlbMode
from .consistency import VmcbImage, consistency
from .controls import GuestControls
from .cpustate import OFF_EIP, SEG_INDEX, CpuState
from .engine import MsrWriter
from .exitcodes import ExitCode, exit_name
from .extension import NO_EXTENSION, ProcessorExtension
from .state_save import SEGMENT_REGS, StateSaveArea, get_seg
from .stop import StopInfo, StopReason
from .vmcb import (EXIT_INFO_END, GUEST_INSN_BYTES, OFF_CPL, OFF_EVENTINJ, OFF_EXITCODE, OFF_GUEST_INSN_LEN,
                   OFF_NRIP, OFF_RAX, OFF_RIP, OFF_RSP, OFF_TLB_CONTROL, OFF_V_INTR, OFF_VIRT_EXT, SAVE_AREA,
                   SEGMENTS, VMCB_SIZE, Event, NpControl, TlbControl, VIntr, VirtExt)

if TYPE_CHECKING:
    from .breakpoints import HardwareBreakpoints
    from .alignment import AlignmentCheck
    from .lbr import BranchRecords
    from .pause_filter import PauseFilter
    from .cpu import SvmCpu
    from .fill import TlbFill
    from .interrupts import Interrupts
    from .scanner import Scanner

_Q = struct.Struct("<Q")
#: the VMCB bits VMRUN tests on every entry, as plain ints (an IntFlag operation costs a microsecond)
_EVENT_VALID = int(Event.VALID)
_VIRQ_OR_AVIC = int(VIntr.V_IRQ | VIntr.AVIC_ENABLE)
_NP_ENABLE = int(NpControl.NP_ENABLE)
_PAUSE = int(ExitCode.PAUSE)
_LBRV = int(VirtExt.LBR_VIRTUALIZATION)
_EXIT3 = struct.Struct("<QQQ")
_EXIT4 = struct.Struct("<4Q")        # EXITCODE, EXITINFO1, EXITINFO2, EXITINTINFO
_N_CR3_ADDR = 0x000F_FFFF_FFFF_F000
_RIP, _RSP, _RAX, _RFLAGS = X.UC_X86_REG_RIP, X.UC_X86_REG_RSP, X.UC_X86_REG_RAX, X.UC_X86_REG_RFLAGS
#: the never-cached fields #VMEXIT writes at once (APM §15.15.3): RIP, RSP, RAX
_EAGER = tuple((off, off + 8) for off in (OFF_RIP, OFF_RSP, OFF_RAX))
_EAGER_QWORDS = frozenset({OFF_RIP, OFF_RSP, OFF_RAX})
# qword indices into the VMCB (HostMemory.qwords[(vmcb_hpa >> 3) + i]) for the exit path
_QRIP, _QRSP, _QRAX, _QNRIP, _QEVENTINJ = (o >> 3 for o in (OFF_RIP, OFF_RSP, OFF_RAX, OFF_NRIP, OFF_EVENTINJ))
_QEXITCODE = OFF_EXITCODE >> 3         # EXITCODE, EXITINFO1, EXITINFO2, EXITINTINFO: four qwords
_FLUSH_ON_SWITCH = TlbMode.FLUSH_ON_SWITCH
#: where the processor's state after the GPRs begins (``CpuState.data``): RIP, flags, segments ...
_MEMO_FROM = OFF_EIP
#: a record without its generated ``__init__`` (the exit path stores every field itself)
_new_record = object.__new__


@dataclass(slots=True)
class ExitRecord:
    """One #VMEXIT as the hypervisor sees it (mirrors the VMCB's exit fields)."""
    exitcode: int
    exitinfo1: int
    exitinfo2: int
    exitintinfo: int
    rip: int
    nrip: int
    insn: bytes = b""
    index: int = 0
    #: the guest level the exit came from, as the hypervisor sees it ("L1"; "L2" under nested SVM)
    level: str = "L1"

    @property
    def name(self) -> str:
        return exit_name(self.exitcode)

    # the VMCB's own names (APM vol. 2 §15.6, Appendix C), as the README writes them: e.EXITCODE ...
    EXITCODE = property(lambda self: self.exitcode, doc="EXITCODE (VMCB 070h)")
    EXITINFO1 = property(lambda self: self.exitinfo1, doc="EXITINFO1 (VMCB 078h)")
    EXITINFO2 = property(lambda self: self.exitinfo2, doc="EXITINFO2 (VMCB 080h)")
    EXITINTINFO = property(lambda self: self.exitintinfo, doc="EXITINTINFO (VMCB 088h)")
    NRIP = property(lambda self: self.nrip, doc="nRIP (VMCB 0C8h): the next sequential instruction pointer")
    RIP = property(lambda self: self.rip, doc="the guest RIP at the #VMEXIT (VMCB 578h)")


@dataclass(slots=True)
class SwitchState:
    """The flags that steer the world switch, in one place.

    ``exit``
        The #VMEXIT waiting to be dispatched, or None.  Set by #VMEXIT (and
        by VMRUN's VMEXIT_INVALID); cleared by the dispatch loop before it
        VMRUNs again and by a new top-level VMRUN.
    ``stop``
        Why the run ends (:class:`StopInfo`), or None while it goes on.  Set
        by the dispatch loop (an exit not resumed, the exit budget), by the
        run loop (budget, watchdog, emulation error) and by halts and internal
        errors; cleared only by a new top-level VMRUN.
    ``exit_resumable``
        The pending exit may resume (False for #VMEXIT(SHUTDOWN), until a
        handler switches to another VMCB).  Set with every exit handed to the
        dispatch loop, by VMEXIT_INVALID and by :meth:`WorldSwitch.switch_vmcb`.
    ``defer_dispatch``
        Exits raised while VMRUN itself runs (EVENTINJ, V_IRQ delivery) are
        left pending for VMRUN's caller instead of being dispatched where they
        happen.  Set around every VMRUN and around the entry events; restored
        after them.
    ``entry_rip``
        Where the guest resumes: set by VMRUN (the VMCB's RIP, or the handler
        an entry event vectored to), and after a fault, a timer interrupt or
        a budget slice by the run loop.
    ``last_exit_rip``
        RIP of the last exit dispatched, where a stopped run leaves RIP.
        Set by the dispatch loop; cleared by a top-level VMRUN.
    ``fast_ok``
        The last VMRUN fully checked and loaded this VMCB, with no event to
        inject: a VMRUN after an exit whose handler wrote only RAX/RSP/RIP may
        take the fast re-entry.  Set at the end of a full VMRUN without
        EVENTINJ or V_IRQ pending; cleared by a top-level VMRUN, at the start
        of every full VMRUN, and by ``require_full_vmrun`` (SEV-ES).
    ``vmcb_written``
        The hypervisor wrote a VMCB field other than RIP/RSP/RAX and the exit
        information since the last #VMEXIT: the next VMRUN is a full one.
        Set by ``host_access``; cleared by #VMEXIT.
    ``loaded``
        The bytes of the state-save fields (``state_save.LOADED_RANGES``) as last loaded
        into, or written back from, the processor; a full VMRUN reloads them
        only when the VMCB differs.  Set by a full load and by
        ``flush_guest_state``; cleared (None) by a top-level VMRUN.
    ``lazy_pending``
        The state-save area beyond RIP/RSP/RAX has not been written back since
        the last #VMEXIT.  Set by #VMEXIT; cleared by ``flush_guest_state``
        (the hypervisor's first access to the save area, a full VMRUN, the
        end of the run).
    ``saved_regs``
        (RAX, RSP) as #VMEXIT wrote them, so the fast re-entry writes only
        what the handler changed.  Set by #VMEXIT.
    ``gif``
        The global interrupt flag: set by VMRUN, cleared by #VMEXIT, and by
        STGI/CLGI the VMCB does not intercept without vGIF (APM §15.17).
    """
    exit: ExitRecord | None = None
    stop: StopInfo | None = None
    exit_resumable: bool = True
    defer_dispatch: bool = False
    entry_rip: int = 0
    last_exit_rip: int | None = None
    fast_ok: bool = False
    vmcb_written: bool = False
    loaded: bytes | None = None
    lazy_pending: bool = False
    saved_regs: tuple[int, int] = (0, 0)
    gif: bool = True


class WorldSwitch:
    """VMRUN (checks, guest-state load, entry events), #VMEXIT and the hypervisor loop."""

    def __init__(self, uc: Uc, st: CpuState, mem: HostMemory, tlb: Tlb, ctl: GuestControls,
                 sw: SwitchState) -> None:
        self._uc, self._st, self._mem, self._tlb, self._ctl, self.sw = uc, st, mem, tlb, ctl, sw
        self._msr = MsrWriter(uc)
        self._view = mem.view
        self._q = mem.qwords
        #: the current VMCB's page as bytes and as qwords (``_vq[off >> 3]``), kept with
        #: ``ctl.vmcb_hpa`` by :meth:`_use_vmcb`: the exit path indexes it with constants
        self._vb: memoryview = memoryview(bytearray(VMCB_SIZE))
        self._vq: memoryview = self._vb.cast("Q")
        #: ``fn()``: the processor's RIP := the current VMCB's RIP field (uc_reg_write from DRAM)
        self._write_rip: Callable[[], int] = st.write_rip_raw
        self._views_at = -1                  # the VMCB address the views are of (-1: none)
        #: VMCB address -> its (bytes view, qwords view, RIP writer), for VMCBs used before
        self._views_of: dict[int, tuple[memoryview, memoryview, Callable[[], int]]] = {}
        self.ext: ProcessorExtension = NO_EXTENSION
        self.exit_count = 0
        self.max_exits = 0
        self.on_exit: Callable[[ExitRecord], bool] | None = None
        #: why the last VMRUN failed with VMEXIT_INVALID
        self.invalid_reason = ""
        self._sync = self.host_access
        #: the VMCB's state-save area between #VMEXIT and VMRUN, and the guest GPRs
        self.save_area = area = StateSaveArea(st, sw, self._view, ctl)
        # the two the switch calls itself (the guest-state load; host_access, switch_vmcb)
        self.snapshot_vmcb = area.snapshot_vmcb
        self.flush_guest_state = area.flush_guest_state
        #: the last full guest-state load: (the VMCB's loaded fields, RFLAGS, the processor's
        #: state from RIP on before it, and after it); see :meth:`_load_guest_state`
        self._memo: tuple[bytes, int, bytes, bytes] | None = None

    def connect(self, cpu: "SvmCpu", fill: "TlbFill", scanner: "Scanner", interrupts: "Interrupts",
                pause: "PauseFilter", alignment: "AlignmentCheck", lbr: "BranchRecords",
                breakpoints: "HardwareBreakpoints") -> None:
        """Bind what the switch drives: soft-TLB flushes and the walker, the
        scanner's arming and cross-modifying code, the entry events, the PAUSE
        filter's counter (loaded at every VMRUN), the last-branch records
        (LBR virtualization swaps them), QEMU's breakpoints (a DR7 loaded in a hook)."""
        self._cpu = cpu
        self._breakpoints_loaded = breakpoints.loaded_in_hook
        self._lbr = lbr
        self._pause = pause
        self._align_cr0 = alignment.cr0
        self._flush_soft_tlb = fill.flush_soft_tlb
        self._drop_walker = fill.drop_walker
        self._arm_scanner = scanner.arm
        self._code_hpa = scanner.code_hpa
        self._xmod_pages = scanner.xmod_pages
        self._xmod_commit = scanner.xmod_commit
        self._hypervisor_wrote = scanner.hypervisor_wrote
        self._entry_events = interrupts.entry_events

    # ------------------------------------------------------------- VMRUN
    def launch(self, vmcb_hpa: int, on_exit: Callable[[ExitRecord], bool] | None, max_exits: int) -> bool:
        """A VMRUN from the hypervisor: load the guest (dispatching the exits
        its entry raised).  True when the guest is to run from ``sw.entry_rip``."""
        sw = self.sw
        self._use_vmcb(vmcb_hpa)
        self.on_exit, self.max_exits = on_exit, max_exits
        self._mem.sync = self._sync
        sw.fast_ok = False
        sw.stop = sw.exit = None
        sw.loaded = None
        sw.last_exit_rip = None
        sw.defer_dispatch = True
        try:
            self.enter(in_hook=False)
        finally:
            sw.defer_dispatch = False
        if sw.exit is not None and sw.stop is None and not self.dispatch_loop():
            return False
        return sw.stop is None

    def enter(self, in_hook: bool) -> bool:
        """VMRUN's checks and guest-state load; False after VMEXIT_INVALID."""
        if self.ext is not NO_EXTENSION:
            self.ext.before_vmrun(self._cpu)
        sw = self.sw
        if not (in_hook and sw.fast_ok and not sw.vmcb_written):
            return self._enter_full(in_hook)
        self._reenter(self._q, self._ctl.vmcb_hpa >> 3)
        return True

    def _reenter(self, q, b: int) -> None:
        """VMRUN after an exit whose handler touched only RAX/RSP/RIP (never-cached
        fields, APM §15.15.3) and the GPRs the processor keeps:
        everything else was checked and loaded at the last VMRUN and is still
        what the processor holds (what the VMCB clean bits let hardware skip).
        ``q``/``b``: the DRAM qwords and the VMCB's qword index."""
        sw = self.sw
        rip, rax = q[b + _QRIP], q[b + _QRAX]
        o_rax, o_rsp = sw.saved_regs
        gq = self._st.q
        if rax != o_rax:
            gq[0] = rax
        rsp = q[b + _QRSP]
        if rsp != o_rsp:
            gq[4] = rsp
        tlb_ctl = self._view[(b << 3) + OFF_TLB_CONTROL]
        if tlb_ctl or self._tlb.mode is _FLUSH_ON_SWITCH:
            self.tlb_control(tlb_ctl)      # TLB_CONTROL acts on every VMRUN
        if self._xmod_pages:
            self._xmod_commit()      # after the flush: it refills through current translations
        self._drop_walker()
        if self._ctl.pause_filter_count:
            self._pause.load(self._ctl)      # the counter starts again at every VMRUN
        if self._lbr.reload:
            self._lbr.vmrun(self._view, b << 3)     # the guest's records again (LBR virtualization)
        sw.gif = True
        sw.entry_rip = rip

    def _use_vmcb(self, vmcb_hpa: int) -> None:
        """The VMCB at ``vmcb_hpa`` is the current one (``ctl.vmcb_hpa`` and the page views)."""
        self._ctl.vmcb_hpa = vmcb_hpa
        if vmcb_hpa == self._views_at:
            return                           # the same VMCB as before (every case of a fuzz campaign)
        views = self._views_of.get(vmcb_hpa)
        if views is not None:                # one of the few a hypervisor alternates (nested SVM's two)
            self._vb, self._vq, self._write_rip = views
            self._views_at = vmcb_hpa
            return
        if 0 <= vmcb_hpa and vmcb_hpa + VMCB_SIZE <= len(self._view):
            self._vb = self._view[vmcb_hpa:vmcb_hpa + VMCB_SIZE]
            self._write_rip = self._st.rip_writer(self._mem.address + vmcb_hpa + OFF_RIP)
            self._views_at = vmcb_hpa
        else:           # VMRUN's checks refuse the address before an exit can use the views
            self._vb = memoryview(bytearray(VMCB_SIZE))
            self._write_rip = self._st.write_rip_raw
            self._views_at = -1
        self._vq = self._vb.cast("Q")
        if self._views_at != -1:
            if len(self._views_of) >= 8:
                self._views_of.clear()
            self._views_of[vmcb_hpa] = (self._vb, self._vq, self._write_rip)

    def switch_vmcb(self, vmcb_hpa: int) -> None:
        """From a handler: the dispatch loop's next VMRUN takes the VMCB at
        ``vmcb_hpa`` (a hypervisor that emulates VMRUN and #VMEXIT for its own
        guest moves between two VMCBs).  The current VMCB gets the lazily saved
        state first; the next entry is a full one (checks, load, events).  The
        GPRs other than RAX and RSP stay in the processor, as on hardware."""
        sw = self.sw
        self.flush_guest_state()
        self._use_vmcb(vmcb_hpa)
        sw.fast_ok = False
        sw.loaded = None
        sw.vmcb_written = True
        # a #VMEXIT(SHUTDOWN) left its guest's state undefined, not the next guest's:
        # VMRUN of another VMCB goes on (nested SVM reflects an L2 shutdown to L1)
        sw.exit_resumable = True

    def _enter_full(self, in_hook: bool) -> bool:
        """VMRUN through every check: §15.5.1, the controls, the guest state, the entry events."""
        sw = self.sw
        sw.fast_ok = False
        self.flush_guest_state()
        mv, b = self._view, self._ctl.vmcb_hpa
        v = VmcbImage.read(mv, b)
        # SEV first: an SEV-ES guest's state comes from its VMSA (APM §15.35.8)
        why = self.ext.vmrun_check(self._cpu, v.asid, v.np_control) or consistency(v, self._mem.size,
                                                                                    cr4_mbz=self._cpu.cr4_reserved)
        if why:
            self._vmexit_invalid(why, v.rip)
            return False
        # host state goes to VM_HSAVE_PA (format is implementation-specific)
        sw.gif = True
        flush = self._latch_controls(v)
        self._pause.load(self._ctl)
        if self._load_guest_state(v, not in_hook):        # with RAX, RSP and RFLAGS
            flush = True
            if in_hook:
                self._breakpoints_loaded()     # DR7 (the slice ends if QEMU's breakpoints differ)
        self._align_cr0(v.cr0)
        lbr = self._lbr
        if mv[b + OFF_VIRT_EXT] & _LBRV or lbr.engaged:         # (engaged covers a latched one)
            lbr.vmrun(mv, b)                # LBR virtualization (APM §15.23)
        sw.entry_rip = v.rip
        if not in_hook:
            self._st.reg_write(_RIP, v.rip)
        if v.tlb_control or self._tlb.mode is TlbMode.FLUSH_ON_SWITCH:
            self.tlb_control(v.tlb_control)
        elif flush:
            self._flush_soft_tlb()
        if self._xmod_pages:
            self._xmod_commit()          # after the flush: it refills through current translations
        self._drop_walker()
        self._arm_scanner()
        # event injection (APM §15.20)
        if not v.eventinj & _EVENT_VALID and not _Q.unpack_from(mv, b + OFF_V_INTR)[0] & _VIRQ_OR_AVIC:
            sw.fast_ok = True
            return sw.exit is None and sw.stop is None     # no event, no V_IRQ, no AVIC: nothing to take
        defer, sw.defer_dispatch = sw.defer_dispatch, True
        try:
            self._entry_events(v.eventinj, v.rip, v.rflags)
        finally:
            sw.defer_dispatch = defer
        return sw.exit is None and sw.stop is None

    def _vmexit_invalid(self, why: str, rip: int) -> None:
        """VMEXIT_INVALID: no guest state was loaded and no instruction runs."""
        self.invalid_reason = why
        _EXIT3.pack_into(self._view, self._ctl.vmcb_hpa + OFF_EXITCODE, ExitCode.INVALID, 0, 0)
        self.exit_count += 1
        self.sw.exit = ExitRecord(int(ExitCode.INVALID), 0, 0, 0, rip, 0, b"", self.exit_count)
        self.sw.exit_resumable = True

    def _latch_controls(self, v: VmcbImage) -> bool:
        """Take the controls VMRUN works from; True when the translation context changed."""
        ctl = self._ctl
        ctl.ivec = v.ivec
        ctl.iopm_hpa, ctl.msrpm_hpa = v.iopm, v.msrpm
        np_on = bool(v.np_control & _NP_ENABLE)
        # Unicorn's soft TLB is untagged: empty it whenever the translation
        # context changes; the ASID-tagged model behind it keeps its entries.
        flush = v.asid != ctl.asid or np_on != ctl.np or (np_on and v.n_cr3 != ctl.n_cr3)
        ctl.np, ctl.n_cr3, ctl.asid = np_on, v.n_cr3 & _N_CR3_ADDR, v.asid
        ctl.tsc_offset = v.tsc_offset
        if v.intercepted(_PAUSE):
            ctl.pause_filter_threshold, ctl.pause_filter_count = v.pause_filter_threshold, v.pause_filter_count
        else:
            ctl.pause_filter_threshold = ctl.pause_filter_count = 0
        self.apply_tsc_offset()
        return flush

    def apply_tsc_offset(self) -> None:
        """Put the latched TSC_OFFSET where Unicorn's RDTSC/RDTSCP add it
        (``env->tsc_offset``), so the ones not intercepted run natively."""
        self._st.tsc_offset = self._ctl.tsc_offset

    def _load_guest_state(self, v: VmcbImage, remember: bool) -> bool:
        """Load RAX, RSP, RFLAGS and, when the VMCB's differs from what the processor
        holds (the first run, or the hypervisor changed it), the control and segment
        state; True after a full load.  Called right after :meth:`_latch_controls`.

        A full load is a function of the VMCB's fields and the processor's state
        outside the GPRs, and touches only the processor's state (its TLB flushes
        are repeated by the caller's): the last one from the hypervisor's VMRUN
        (``remember``) is kept (:attr:`_memo`), and a load of the same fields onto
        the same state -- every fuzz case's VMRUN from the restored host context --
        is one copy into the CPU state."""
        sw, st = self.sw, self._st
        snap = self.snapshot_vmcb()
        if snap == sw.loaded:
            st.reg_write(_RAX, v.rax)
            st.reg_write(_RSP, v.rsp)
            st.reg_write(_RFLAGS, v.rflags)
            return False
        data = st.data
        pre = data[_MEMO_FROM:].tobytes()
        memo = self._memo
        if memo is not None and memo[0] == snap and memo[1] == v.rflags and memo[2] == pre:
            data[_MEMO_FROM:] = memo[3]
            q = st.q
            q[0] = v.rax
            q[4] = v.rsp
            sw.loaded = snap
            return True
        gprs = data[:_MEMO_FROM].tobytes()
        self._full_load(v)
        st.reg_write(_RAX, v.rax)
        st.reg_write(_RSP, v.rsp)
        st.reg_write(_RFLAGS, v.rflags)
        sw.loaded = snap
        if not remember:
            return True
        # keep it when it changed no GPR but RAX and RSP (the MSR write borrows and restores
        # RCX/RAX/RDX): a reuse copies only the state from RIP on, and patches RAX and RSP
        q = st.q
        if q[0] == v.rax & M64 and q[4] == v.rsp & M64 and data[8:32] == gprs[8:32] \
                and data[40:_MEMO_FROM] == gprs[40:]:
            self._memo = (snap, v.rflags, pre, data[_MEMO_FROM:].tobytes())
        return True

    def _full_load(self, v: VmcbImage) -> None:
        """The control registers, EFER, DR6/DR7, segments, descriptor tables and CPL
        from the VMCB into the processor (through Unicorn where its writes have side
        effects: hidden flags, TLB flushes)."""
        st, mv, b = self._st, self._view, self._ctl.vmcb_hpa
        st.reg_write(X.UC_X86_REG_CR0, v.cr0)
        st.reg_write(X.UC_X86_REG_CR4, v.cr4)
        self._msr.write(MSR_EFER, v.efer & ~EFER_SVME)
        st.reg_write(X.UC_X86_REG_CR3, v.cr3)
        st.reg_write(X.UC_X86_REG_CR2, v.cr2)
        st.reg_write(X.UC_X86_REG_DR6, v.dr6)
        st.reg_write(X.UC_X86_REG_DR7, v.dr7)
        if bool(st.efer & EFER_LMA) != bool(v.efer & EFER_LMA):
            st.set_lma(bool(v.efer & EFER_LMA))      # e.g. a legacy-mode guest after a long-mode one
        for name in SEGMENT_REGS:
            st.set_seg(SEG_INDEX[name], *get_seg(mv, b + SEGMENTS[name]))
        for name in ("GDTR", "IDTR"):
            _, base, limit, _ = get_seg(mv, b + SEGMENTS[name])
            st.set_dtable(name, base, limit)
        st.set_cpl(mv[b + OFF_CPL] if v.cr0 & 1 else 0)

    def tlb_control(self, tlb_ctl: int) -> None:
        """VMRUN carries out TLB_CONTROL (APM §15.16.2, Table 15-11); in
        pre-ASID mode every world switch flushes everything."""
        tlb, asid = self._tlb, self._ctl.asid
        if tlb.mode is TlbMode.FLUSH_ON_SWITCH or tlb_ctl == TlbControl.FLUSH_ALL:
            tlb.flush_all()
        elif tlb_ctl == TlbControl.FLUSH_ASID:
            tlb.flush_asid(asid)
        elif tlb_ctl == TlbControl.FLUSH_ASID_LOCAL:
            tlb.flush_asid(asid, keep_global=True)
        elif tlb_ctl:
            tlb.flush_all()          # reserved encodings: the safe superset
        self._flush_soft_tlb()
        self._cpu.tlb_control_done = bool(tlb_ctl)

    # ------------------------------------------------------------ #VMEXIT
    def vmexit(self, code: int, info1: int, info2: int, *, rip: int, nrip: int, insn: bytes = b"",
               exitintinfo: int = 0) -> ExitRecord:
        """#VMEXIT (APM §15.6): save guest state and the exit information into the VMCB.

        RIP, RSP and RAX -- the fields a handler touches on nearly every exit --
        are written at once; the rest (RFLAGS included, which Unicorn computes
        lazily and costs a call to read) of the state-save area is written
        back lazily, before the hypervisor's first access to it through
        HostMemory (``host_access``).  Either way nothing that reads host memory can
        see the VMCB before it holds the guest state.
        """
        st = self._st
        cpu = self._cpu
        ext = self.ext
        if ext is not NO_EXTENSION:
            ext.at_vmexit(cpu)               # SEV: DRAM holds ciphertext before the hypervisor runs
        q = self._q
        b = self._ctl.vmcb_hpa >> 3          # a VMCB is 4 KiB aligned (VMRUN checks it)
        gq = st.q
        rax, rsp = gq[0], gq[4]              # QEMU order: rax rcx rdx rbx rsp
        q[b + _QRIP] = rip
        q[b + _QRSP] = rsp
        q[b + _QRAX] = rax
        sw = self.sw
        sw.saved_regs = (rax, rsp)
        sw.lazy_pending = True
        sw.vmcb_written = False
        self._mem.sync = self._sync
        q[b + _QEXITCODE] = code & M64
        q[b + _QEXITCODE + 1] = info1 & M64
        q[b + _QEXITCODE + 2] = info2 & M64
        q[b + _QEXITCODE + 3] = exitintinfo
        q[b + _QNRIP] = nrip
        q[b + _QEVENTINJ] = 0                # EVENTINJ consumed
        mv = self._view
        mv[(b << 3) + OFF_GUEST_INSN_LEN] = len(insn) & 0xF
        if insn:
            mv[(b << 3) + GUEST_INSN_BYTES:(b << 3) + GUEST_INSN_BYTES + len(insn)] = insn
        self.exit_count = n = self.exit_count + 1
        # ExitRecord(int(code), info1, info2, exitintinfo, rip, nrip, insn, n), without its __init__ call
        rec = _new_record(ExitRecord)
        rec.exitcode = int(code)
        rec.exitinfo1 = info1
        rec.exitinfo2 = info2
        rec.exitintinfo = exitintinfo
        rec.rip = rip
        rec.nrip = nrip
        rec.insn = insn
        rec.index = n
        rec.level = "L1"
        sw.exit = rec
        sw.gif = False        # #VMEXIT clears GIF
        if self._lbr.engaged:
            self._lbr.vmexit(mv, b << 3, rip)     # before SEV-ES moves the state-save area
        if ext is not NO_EXTENSION:
            ext.after_vmexit(cpu, rec)       # SEV-ES: state into the encrypted VMSA
        return rec

    def host_access(self, hpa: int, n: int, write: bool = False) -> None:
        """The hypervisor reads or writes host memory (``HostMemory.sync``):
        the VMCB must hold the guest state first, and a write to a page the
        guest executed is cross-modifying code."""
        ext = self.ext
        if ext is not NO_EXTENSION:
            ext.host_access(hpa, n, write)
        off = hpa - self._ctl.vmcb_hpa
        if off + n <= 0 or off >= VMCB_SIZE:
            if write:
                code = self._code_hpa
                # (a write within one page that held no code needs nothing: the common case)
                if code and ((hpa & ~0xFFF) in code or (hpa + n - 1) >> 12 != hpa >> 12):
                    self._hypervisor_wrote(hpa, n)
            return
        if n == 8 and off in _EAGER_QWORDS:
            return
        for lo, hi in _EAGER:
            if lo <= off and off + n <= hi:
                return
        if write and not (OFF_EXITCODE <= off and off + n <= EXIT_INFO_END):
            self.sw.vmcb_written = True      # anything but the exit fields: reload at VMRUN
        if off + n > SAVE_AREA:
            self.flush_guest_state()

    # ---------------------------------------------------- the dispatch loop
    def exit_in_hook(self, code: int, info1: int, info2: int, rip: int, nrip: int) -> None:
        """An intercepted instruction's whole round trip, from its code hook:
        #VMEXIT, the hypervisor's handler, and
        the VMRUN back -- :meth:`vmexit` then :meth:`after_exit_in_hook`.

        The common case is written out in one frame: no step of a code store
        in progress, no processor extension, a handler that resumes having
        written only RAX/RSP/RIP and the GPRs the processor keeps (the fast re-entry of
        :meth:`_reenter`).  Anything else takes the general functions.
        ``code``, ``info1``, ``info2`` are in range (0 <= x < 2**64)."""
        sw = self.sw
        if self.ext is not NO_EXTENSION or sw.defer_dispatch or self._lbr.engaged:
            self.vmexit(code, info1, info2, rip=rip, nrip=nrip)
            self.after_exit_in_hook(rip)
            return
        # #VMEXIT (as vmexit): RIP/RSP/RAX and the exit fields at once, the rest lazily
        gq = self._st.q
        vq = self._vq                        # the VMCB page as qwords
        rax = gq[0]
        rsp = gq[4]
        vq[_QRIP] = rip
        vq[_QRSP] = rsp
        vq[_QRAX] = rax
        vb = self._vb
        _EXIT4.pack_into(vb, OFF_EXITCODE, code, info1, info2, 0)
        vq[_QNRIP] = nrip
        vq[_QEVENTINJ] = 0                   # EVENTINJ consumed
        vb[OFF_GUEST_INSN_LEN] = 0
        sw.lazy_pending = sw.exit_resumable = True
        sw.vmcb_written = sw.gif = False     # #VMEXIT clears GIF
        self._mem.sync = self._sync
        self.exit_count = n = self.exit_count + 1
        # ExitRecord(code, info1, info2, 0, rip, nrip, b"", n), without the call of its __init__
        rec = _new_record(ExitRecord)
        rec.exitcode = code
        rec.exitinfo1 = info1
        rec.exitinfo2 = info2
        rec.exitintinfo = 0
        rec.rip = sw.last_exit_rip = rip     # the hypervisor (as after_exit_in_hook and dispatch_loop)
        rec.nrip = nrip
        rec.insn = b""
        rec.index = n
        rec.level = "L1"
        sw.exit = rec
        if n >= self.max_exits:
            sw.stop = StopInfo(StopReason.EXIT_BUDGET, f"{n} exits")
            self._leave_hook(False, rip)
            return
        on_exit = self.on_exit
        if on_exit is None or not on_exit(rec) or sw.stop is not None:
            if sw.stop is None:
                sw.stop = StopInfo(StopReason.EXIT)
            self._leave_hook(False, rip)
            return
        sw.exit = None
        if sw.vmcb_written or not sw.fast_ok or vb[OFF_TLB_CONTROL] \
                or self._tlb.mode is _FLUSH_ON_SWITCH or self._xmod_pages:
            sw.saved_regs = (rax, rsp)       # what _reenter compares with (only it reads them)
            self._leave_hook(self._enter_in_hook(), rip)
            return
        # VMRUN: the fast re-entry (:meth:`_reenter` with no TLB_CONTROL and no
        # cross-modifying code), written out: this is every round trip's last step
        v = vq[_QRAX]
        if v != rax:
            gq[0] = v
        v = vq[_QRSP]
        if v != rsp:
            gq[4] = v
        self._drop_walker()
        if self._ctl.pause_filter_count:
            self._pause.load(self._ctl)      # the PAUSE filter's counter starts again
        sw.gif = True
        sw.entry_rip = vq[_QRIP]
        err = self._write_rip()              # RIP straight from the VMCB's RIP field
        if err:
            raise UcError(err)

    def after_exit_in_hook(self, rip: int, resumable: bool = True) -> None:
        """Hand the exit to the hypervisor; resume in place or stop the run."""
        sw = self.sw
        sw.exit_resumable = resumable
        if sw.defer_dispatch:
            return                    # inside VMRUN itself: the caller dispatches
        self._leave_hook(self.dispatch_loop(), rip)

    def _leave_hook(self, resumed: bool, rip: int) -> None:
        """After the hypervisor ran inside a hook: the guest continues at
        ``sw.entry_rip``, or the run stops with the intercepted instruction
        not executed (RIP on the last exit's instruction)."""
        sw = self.sw
        if resumed:
            self._st.reg_write(_RIP, sw.entry_rip)
            return
        try:
            self._uc.emu_stop()
        except UcError:
            pass
        self._st.reg_write(_RIP, sw.last_exit_rip if sw.last_exit_rip is not None else rip)

    def _enter_in_hook(self) -> bool:
        """VMRUN from the dispatch loop (exits it raises are dispatched in turn);
        True when the guest continues at ``sw.entry_rip``."""
        sw = self.sw
        sw.defer_dispatch = True
        try:
            self.enter(in_hook=True)
        finally:
            sw.defer_dispatch = False
        if sw.stop is not None:
            return False
        return sw.exit is None or self.dispatch_loop()

    def dispatch_loop(self) -> bool:
        """The hypervisor loop: hand the pending exit to the handler and VMRUN again
        while it resumes.  True when the guest continues at ``sw.entry_rip``.

        The VMRUN after a handler that touched only RAX/RSP/RIP and the GPRs the
        processor keeps is the fast re-entry (:meth:`_reenter`)."""
        sw = self.sw
        while True:
            rec = sw.exit
            sw.last_exit_rip = rec.rip
            if self.exit_count >= self.max_exits:
                sw.stop = StopInfo(StopReason.EXIT_BUDGET, f"{self.exit_count} exits")
                return False
            resume = False
            if self.on_exit is not None:
                resume = bool(self.on_exit(rec)) and sw.exit_resumable
                if sw.stop is not None:
                    return False
            if not resume:
                sw.stop = StopInfo(StopReason.EXIT)
                return False
            sw.exit = None
            sw.defer_dispatch = True
            try:
                self.enter(in_hook=True)
            finally:
                sw.defer_dispatch = False
            if sw.stop is not None:
                return False
            if sw.exit is None:
                return True
