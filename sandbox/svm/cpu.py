"""The SVM processor model: VMRUN, the guest run, and #VMEXIT.

:class:`SvmCpu` is the "silicon": it owns the Unicorn engine, with host DRAM
mapped as the host-physical address space, and coordinates the parts that
each model one piece of the hardware:

* :mod:`.fill` -- the TLB fill: the ASID-tagged TLB and the 2-D walk behind
  Unicorn's soft TLB, and the code-page bookkeeping;
* :mod:`.scanner` -- finds intercept-enabled instructions with address-ranged
  code hooks placed by a page scanner, decodes and decides them;
* :mod:`.native` -- what instructions that do not exit need from the model;
* :mod:`.interrupts` -- exceptions, IDT delivery, EVENTINJ, virtual interrupts;
* :mod:`.world_switch` (with :mod:`.consistency`) -- VMRUN, #VMEXIT and the
  hypervisor's dispatch loop, against a VMCB in host memory;
* :mod:`.run` -- the guest run in Unicorn slices, the timer and the limits.

Exits that the hypervisor handles and resumes are processed inside the
Unicorn hook that detected them (the world switch is a state transfer, not
an ``emu_start`` round trip), which keeps an intercepted CPUID round trip in
the microseconds.
"""
from __future__ import annotations

from typing import Callable

from ..arch import EFER_LMA, EFER_LME, EFER_NXE
from ..memory.hostmem import HostMemory
from ..memory.mmu import TwoDimWalker, WalkStats
from ..memory.tlb import Tlb
from .consistency import VmrunError, check_vmrun
from .controls import GuestControls
from .cpustate import CpuState
from .decode import Kind
from .engine import add_raw_event_hooks, add_raw_tlb_fill_hook, new_engine
from .extension import NO_EXTENSION, ProcessorExtension
from .fill import FillObserver, TlbFill
from .avic import Avic
from .interrupts import Interrupts
from .native import TSC_HZ, NativeInsns
from .alignment import AlignmentCheck
from .lbr import BranchRecords
from .breakpoints import HardwareBreakpoints
from .features import FEATURES, absent_msrs, reserved_cr4, undefined_kinds
from .pause_filter import PauseFilter
from .run import GUEST_IPS, RunLimits, RunLoop
from .scanner import Decide, Scanner
from .smc import CodeChanges
from .stop import StopInfo, StopReason
from .vmcb import VMCB
from .world_switch import ExitRecord, SwitchState, WorldSwitch

__all__ = ["SvmCpu", "ExitRecord", "StopInfo", "StopReason", "RunLimits", "VmrunError", "GUEST_IPS", "TSC_HZ"]


class SvmCpu:
    """One AMD64 processor with SVM, executing guest code through Unicorn.

    The entry points a hypervisor calls on every exit are bound at
    construction to the part that implements them (no extra call per use):
    ``guest_gpr(i)`` / ``set_guest_gpr(i, v)``, ``host_access`` (installed as
    ``HostMemory.sync``), ``flush_guest_state()``, ``raise_exception(...)``,
    ``insn_bytes(addr)`` and ``flush_tlb()``.

    Hooks for tools that drive the processor from outside (the fuzzer):
    :meth:`add_fill_observer`, :meth:`reset_translation_caches`,
    :meth:`shed_candidate_hooks` with :attr:`candidate_hook_count`, the
    replaceable :attr:`decide`, :attr:`nested_paging` and :meth:`expire_timeout`.
    """

    def __init__(self, mem: HostMemory) -> None:
        self.mem = mem
        self.uc = uc = new_engine(mem)
        self.st = st = CpuState(uc)
        # host (root-mode) state the hypervisor sets up, as by WRMSR
        self.host_efer = EFER_LME | EFER_LMA | EFER_NXE
        self.vm_hsave_pa = 0
        #: the VMCB of the current (or last) VMRUN
        self.vmcb: VMCB | None = None
        #: the ASID-tagged TLB (Unicorn's soft TLB is a cache in front of it)
        self.tlb = tlb = Tlb()
        #: set when a VMRUN carried out a TLB_CONTROL flush request; the hypervisor clears it
        self.tlb_control_done = False
        self._ext: ProcessorExtension = NO_EXTENSION
        #: the features this processor was built without (:meth:`remove_features`)
        self.features_removed: frozenset[str] = frozenset()
        self._ctl = ctl = GuestControls()
        self._sw = sw = SwitchState()
        #: the world switch's flags (read-only outside the processor)
        self.switch: SwitchState = sw
        self._fill = fill = TlbFill(uc, st, mem, tlb, ctl, WalkStats())
        self._scanner = scanner = Scanner(uc, st, mem, ctl, sw)
        self._native = native = NativeInsns(uc, st, mem, tlb, ctl, sw)
        self._interrupts = interrupts = Interrupts(uc, st, mem, ctl, sw)
        self._ws = ws = WorldSwitch(uc, st, mem, tlb, ctl, sw)
        self._run = run = RunLoop(uc, st, ctl, sw)
        self._smc = smc = CodeChanges(uc)
        self._avic = avic = Avic(mem.view, st, sw, lambda: ctl.vmcb_hpa)
        pause = PauseFilter(run.clock_now, run.keep_clock)
        align = AlignmentCheck(uc, st)
        align.connect(fill.insn_bytes, interrupts.raise_exception, run.restart_slice, run.fail)
        #: DebugCtl and the last-branch records (APM §13.1.1.9), LBR virtualization (§15.23)
        self.branch_records = lbr = BranchRecords(uc, st)
        lbr.connect(fill.insn_bytes, run.restart_slice, run.fail,
                    lambda: scanner.hook_kinds(frozenset({Kind.RDMSR})))

        #: QEMU's instruction-breakpoint objects, kept in line with DR0-DR3 and DR7
        self.breakpoints = bps = HardwareBreakpoints(uc, st)
        bps.connect(run.restart_slice)

        def before_slice() -> None:        # the per-instruction hooks switch between slices
            align.apply()
            lbr.apply()
            bps.apply()
        run.before_slice = before_slice
        fill.connect(scanner, run.fail)
        fill.insn_mark, fill.store_given_up = run.insn_mark, run.store_given_up
        run.hook_ran = scanner.hook_ran
        scanner.connect(self, fill, ws, native, interrupts, pause, run.fail, run.restart_slice)
        native.connect(fill, ws, interrupts, run, smc, avic, align, lbr)
        interrupts.connect(self, fill, scanner, ws, run, smc, avic, lbr)
        ws.connect(self, fill, scanner, interrupts, pause, align, lbr, bps)
        run.connect(fill, ws, interrupts, avic)
        avic.connect(ws.vmexit, ws.after_exit_in_hook, interrupts.deliver, fill.insn_bytes)
        smc.connect(fill, scanner)
        self._fill_hook = add_raw_tlb_fill_hook(uc, fill.on_tlb_fill)     # kept alive with the processor
        self._event_hooks = add_raw_event_hooks(uc, interrupts.on_intr, interrupts.on_invalid)
        native.install_hooks()
        # -- the per-exit entry points, bound to their part ---------------------
        #: guest GPR ``i`` while the hypervisor runs (QEMU order: rax rcx rdx rbx rsp ...)
        self.guest_gpr: Callable[[int], int] = ws.save_area.guest_gpr
        #: set guest GPR ``i`` in the processor (the next VMRUN finds it there)
        self.set_guest_gpr: Callable[[int, int], None] = ws.save_area.set_guest_gpr
        #: write the lazily saved part of the guest state into the VMCB
        self.flush_guest_state: Callable[[], None] = ws.save_area.flush_guest_state
        #: ``host_access(hpa, n, write)``: the hypervisor touches host memory (``HostMemory.sync``)
        self.host_access: Callable[..., None] = ws.host_access
        #: ``raise_exception(vector, err, rip, cr2=None)``: intercept it or deliver it to the guest
        self.raise_exception: Callable[..., None] = interrupts.raise_exception
        #: up to 15 bytes of guest code at an address, as the processor fetched them
        self.insn_bytes: Callable[[int], bytes] = fill.insn_bytes
        #: whether the guest's CS is a 64-bit code segment (CS.L), read without a VMCB write-back
        self.guest_cs_long: Callable[[], bool] = ws.save_area.guest_cs_long
        #: the guest's code-segment size (64, 32, 16) as the processor runs it, without a write-back
        self.guest_code_size: Callable[[], int] = ws.save_area.guest_code_size
        #: the guest's CPL while the hypervisor handles its exit, read without a VMCB write-back
        self.guest_cpl: Callable[[], int] = ws.save_area.guest_cpl
        #: ``fetched_bytes(addr)``: guest code at ``addr`` as fetched, without a walk (None if no longer mapped)
        self.fetched_bytes: Callable[[int], bytes | None] = fill.fetched_bytes
        #: empty Unicorn's soft TLB, the untagged cache in front of :attr:`tlb`
        self.flush_tlb: Callable[[], None] = fill.flush_soft_tlb

    # ------------------------------------------------------------------ VMRUN
    def vmrun(self, vmcb_hpa: int, on_exit: Callable[[ExitRecord], bool] | None = None,
              limits: RunLimits | None = None) -> StopInfo:
        """Execute VMRUN with rAX = ``vmcb_hpa`` (APM §15.5).

        Runs the guest until an exit the hypervisor does not resume (then
        returns with the VMCB holding the exit), or until the run stops
        (budget, timeout, halt, shutdown).  ``on_exit(record)`` is the
        hypervisor's exit handler; returning True means "VMRUN again".
        An internal error stops the run with :attr:`StopInfo.error` set.
        """
        check_vmrun(self.host_efer, self.vm_hsave_pa, vmcb_hpa, self.mem.size)
        limits = limits or RunLimits()
        self._run.limits = limits
        if self.vmcb is None or self.vmcb.hpa != vmcb_hpa:
            self.vmcb = VMCB(self.mem, vmcb_hpa)
        if self._ws.launch(vmcb_hpa, on_exit, limits.max_exits):
            self._run.run()
        self._ext.at_stop(self)
        self._ws.save_area.flush_guest_state()
        return self._sw.stop

    def take_vmexit(self, code: int, info1: int, info2: int, *, rip: int, nrip: int) -> None:
        """#VMEXIT from inside the guest run (an extension's intercept or an
        instruction it emulates): save the state, then hand the exit to the
        hypervisor; the guest resumes or the run stops as it decides."""
        self._ws.vmexit(code, info1, info2, rip=rip, nrip=nrip)
        self._ws.after_exit_in_hook(rip)

    def save_stopped_state(self) -> None:
        """After a run that stopped without a #VMEXIT (instruction budget,
        timeout, :meth:`stop_guest`): the guest state goes into the VMCB, so
        the next :meth:`vmrun` continues the guest where it stopped."""
        if self._sw.exit is None and self.vmcb is not None:
            self._ws.save_area.save_stopped_state()
            lbr = self.branch_records
            if lbr.engaged:                  # LBR virtualization: the guest's records into the VMCB too
                lbr.vmexit(self.mem.view, self.vmcb.hpa, self.st.rip)

    def stop_guest(self) -> None:
        """From a code hook of an outside tool (a debugger's breakpoint): end
        the run before the instruction at the hook's address executes
        (reason ``stopped``)."""
        self.uc.emu_stop()

    def switch_vmcb(self, vmcb_hpa: int) -> None:
        """From an exit handler: VMRUN the VMCB at ``vmcb_hpa`` when the handler
        resumes, inside the same run (see :meth:`WorldSwitch.switch_vmcb`)."""
        self._ws.switch_vmcb(vmcb_hpa)
        self.vmcb = VMCB(self.mem, vmcb_hpa)

    def require_full_vmrun(self) -> None:
        """Make the next VMRUN take every check and reload the whole VMCB."""
        self._sw.fast_ok = False

    def remove_features(self, names: frozenset[str]) -> None:
        """Become a processor without the features ``names`` (:mod:`.features`): their
        instructions #UD before any intercept check, their CR4 bits #GP to set."""
        self._scanner.undefine(undefined_kinds(names))
        self._native.cr4_absent |= reserved_cr4(names)
        msrs = absent_msrs(names)
        if msrs:                             # RDMSR/WRMSR looked at even when not intercepted
            self._native.msr_absent |= msrs
            self._scanner.hook_kinds(frozenset({Kind.RDMSR, Kind.WRMSR}))
        for n in names:                      # the CPU's own CPUID and decoder too
            f = FEATURES[n]
            self.st.clear_cpuid_feature(f.leaf, f.reg, f.bit)
        self.uc.ctl_flush_tb()
        self.features_removed = self.features_removed | names

    @property
    def cr4_reserved(self) -> int:
        """CR4 bits reserved (MBZ) on this processor beyond the architectural ones: those
        of the features it lacks (MOV to CR4 #GP, VMRUN VMEXIT_INVALID)."""
        return self._native.cr4_absent

    def invlpga(self, va: int, asid: int) -> None:
        """INVLPGA: rAX = the virtual page, ECX = the ASID whose translation
        goes (APM §15.16.3); the hypervisor's way to drop one guest page."""
        self._native.invlpga(va, asid)

    def walker(self, stats: WalkStats | None = None) -> TwoDimWalker:
        """A 2-D walker for the current guest context.  The processor's own
        walks count into :attr:`stats`; pass ``stats`` for walks made on the
        hypervisor's behalf, which are not guest memory references."""
        return self._fill.build_walker(self._fill.stats if stats is None else stats)

    def hypervisor_page(self, gva: int, access: int, set_ad: bool = False) -> int | None:
        """The host page of guest-virtual ``gva`` for a supervisor ``access``
        the hypervisor makes on the guest's behalf, by the processor's fast
        walk (nothing counted; A/D bits only with ``set_ad``), or None when
        only the general :meth:`walker` can decide (a fault included)."""
        return self._fill.hypervisor_page(gva, access, set_ad)

    def pass_once(self, rip: int) -> None:
        """Execute the instruction at ``rip`` once without the intercept check."""
        self._scanner.pass_once(rip)

    @property
    def pass_once_rip(self) -> int | None:
        """The address :meth:`pass_once` armed and that has not executed yet, or None."""
        return self._scanner.pass_once_rip

    def host_tsc(self) -> int:
        """The host's time-stamp counter (the virtual one after :meth:`virtualize_tsc`)."""
        return self._native.host_tsc()

    def virtualize_tsc(self, clock: Callable[[], int] | None) -> None:
        """Make the host's time-stamp counter ``clock()`` (None: the real one again).

        Every RDTSC/RDTSCP is then hooked: one the VMCB intercepts exits as
        before, one it does not reads ``clock() + TSC_OFFSET`` (see
        :meth:`NativeInsns._rdtsc`), and :meth:`host_tsc` -- what handlers
        read -- is ``clock()`` too.  A run whose guest reads the time then
        depends on nothing but its input: the fuzzer's cases do (a native
        RDTSC reads the host's clock, so a seeded campaign would not
        reproduce).  The hooks stay after ``None`` (they decide as before)."""
        self._native.tsc_clock = clock
        if clock is not None:
            self._scanner.hook_kinds(frozenset({Kind.RDTSC, Kind.RDTSCP}))

    def arm_timer(self, period_ns: int) -> None:
        """A periodic physical interrupt in guest time (0 disarms it); see :meth:`RunLoop.arm_timer`."""
        self._run.arm_timer(period_ns)

    def schedule_remote(self, period_ns: int, fn: Callable[[], None] | None) -> None:
        """Work another processor does every ``period_ns`` of guest time; see :meth:`RunLoop.schedule_remote`."""
        self._run.schedule_remote(period_ns, fn)

    def kick(self) -> None:
        """An IPI from another processor: #VMEXIT(INTR) after the remote event that sent it."""
        self._run.kick()

    @property
    def avic(self) -> Avic:
        """The processor's AVIC (APM §15.29): active while the VMCB sets AVIC_ENABLE."""
        return self._avic

    def avic_doorbell(self, host_apic_id: int) -> None:
        """A write of ``host_apic_id`` to the AVIC_DOORBELL MSR (C001_011Bh) on another processor."""
        self._avic.doorbell(host_apic_id)

    # ------------------------------------------------- hooks for outside tools
    def add_fill_observer(self, fn: FillObserver) -> None:
        """Call ``fn(gva, access, hpa, perms)`` after every successful TLB fill
        (``access``: Unicorn's UC_MEM_* type; ``hpa``/``perms``: what was granted).
        A processor with no observer pays nothing for the hook."""
        self._fill.add_observer(fn)

    def add_write_observer(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(hpa_page)`` for every store the processor model itself makes
        into memory from Python (event frames, VMSAVE).  Guest stores show as
        writable fills (:meth:`add_fill_observer`); the hypervisor writes
        through its ``HostMemory``."""
        self._smc.write_observers.append(fn)

    def reset_translation_caches(self) -> None:
        """Forget every code-page scan, cached decode and decision, pending
        cross-modifying-code commit, interrupt-window watch and one-shot
        :meth:`pass_once`; drop Unicorn's translated blocks and soft TLB.  The
        ASID-tagged :attr:`tlb` is architectural and stays (``tlb.flush_all()``)."""
        self._scanner.reset()
        self._fill.drop_walker()
        self._fill.after_reset()

    def shed_candidate_hooks(self) -> int:
        """Delete every per-address candidate hook (each translated block is
        checked against all of them, so thousands slow Unicorn down), then
        :meth:`reset_translation_caches` so pages are scanned and hooked anew.
        Returns how many hooks were deleted."""
        n = self._scanner.shed_hooks()
        self._fill.drop_walker()
        self._fill.after_reset()
        return n

    @property
    def watched_code_pages(self) -> frozenset[int]:
        """Host pages of code the guest stored to, on which QEMU checks every
        store against its translated blocks (:mod:`.smc`)."""
        return self._fill.watched_pages

    @property
    def candidate_hook_count(self) -> int:
        """Per-address candidate hooks installed."""
        return len(self._scanner.hooks)

    @property
    def decide(self) -> Decide:
        """The intercept decision function, ``decide(insn, view, rip, code) ->
        ExitInfo | None`` (default :func:`sandbox.svm.decision.decide`).
        Assign another to test the processor with a different decision (the
        fuzzer's planted bugs); decisions cached from the old one are dropped."""
        return self._scanner.decide

    @decide.setter
    def decide(self, fn: Decide) -> None:
        self._scanner.set_decide(fn)

    @property
    def nested_paging(self) -> bool:
        """NP_ENABLE of the running guest, as the last full VMRUN latched it."""
        return self._ctl.np

    def expire_timeout(self) -> None:
        """End the run as its wall-clock limit does (flag, then stop emulation);
        any thread may call it."""
        self._run.expire()

    # ------------------------------------------------------------- state
    @property
    def ext(self) -> ProcessorExtension:
        """What plugs in from above (SEV); the default does nothing."""
        return self._ext

    @ext.setter
    def ext(self, ext: ProcessorExtension) -> None:
        self._ext = ext
        for part in (self._fill, self._scanner, self._interrupts, self._ws):
            part.ext = ext
        self._fill.drop_walker()

    @property
    def stats(self) -> WalkStats:
        """Memory references of the processor's own 2-D walks."""
        return self._fill.stats

    @stats.setter
    def stats(self, stats: WalkStats) -> None:
        self._fill.set_stats(stats)

    @property
    def gif(self) -> bool:
        """The global interrupt flag (APM §15.17)."""
        return self._sw.gif

    @gif.setter
    def gif(self, on: bool) -> None:
        self._sw.gif = on

    @property
    def exit_count(self) -> int:
        """#VMEXITs taken (VMEXIT_INVALID included); ``RunLimits.max_exits`` counts against it."""
        return self._ws.exit_count

    @exit_count.setter
    def exit_count(self, n: int) -> None:
        self._ws.exit_count = n

    @property
    def on_exit(self) -> Callable[[ExitRecord], bool] | None:
        return self._ws.on_exit

    @on_exit.setter
    def on_exit(self, fn: Callable[[ExitRecord], bool] | None) -> None:
        self._ws.on_exit = fn

    @property
    def io_passthrough(self) -> Callable[[int, int, bool, int], int] | None:
        """``fn(port, size, is_in, value) -> value`` for port I/O the VMCB does not intercept."""
        return self._native.io_passthrough

    @io_passthrough.setter
    def io_passthrough(self, fn: Callable[[int, int, bool, int], int] | None) -> None:
        self._native.io_passthrough = fn

    @property
    def tsc_offset(self) -> int:
        """TSC_OFFSET as the last full VMRUN latched it (APM §15.30.4)."""
        return self._ctl.tsc_offset

    @tsc_offset.setter
    def tsc_offset(self, v: int) -> None:
        self._ctl.tsc_offset = v
        self._ws.apply_tsc_offset()

    @property
    def invalid_reason(self) -> str:
        """Why the last VMRUN failed with VMEXIT_INVALID."""
        return self._ws.invalid_reason

    @property
    def vmcb_hpa(self) -> int:
        """Host-physical address of the VMCB of the current (or last) VMRUN."""
        return self._ctl.vmcb_hpa

    @property
    def iopm_hpa(self) -> int:
        return self._ctl.iopm_hpa

    @property
    def msrpm_hpa(self) -> int:
        return self._ctl.msrpm_hpa

    # -------------------------------------------------------- the run's figures
    @property
    def limits(self) -> RunLimits:
        return self._run.limits

    @property
    def insns(self) -> int | None:
        """Instructions started in the last run (counted only with an instruction budget)."""
        return self._run.insns

    @property
    def guest_clock(self) -> int:
        """Guest time in retired instructions (counted in timer or budget slices)."""
        return self._run.guest_clock

    @guest_clock.setter
    def guest_clock(self, v: int) -> None:
        # the platform advances guest time over a HLT to the next timer deadline
        self._run.guest_clock = v

    @property
    def guest_time_ns(self) -> int:
        return self._run.guest_time_ns

    def idle_until(self, time_ns: int) -> None:
        """The processor idles (HLT) until guest time ``time_ns``: the clock jumps there."""
        self._run.idle_until(time_ns)

    @property
    def timer_period(self) -> int:
        return self._run.timer_period

    @property
    def timer_next(self) -> int:
        return self._run.timer_next

    @property
    def timer_ticks(self) -> int:
        return self._run.timer_ticks

    @property
    def timer_masked(self) -> int:
        """Timer interrupts the VMCB did not intercept (the host fielded them)."""
        return self._run.timer_masked
