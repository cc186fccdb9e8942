"""The guest run: Unicorn slices, the virtual timer, the watchdog and the run's limits.

Between a VMRUN that enters the guest and the exit the hypervisor does not
resume, the guest runs in ``emu_start`` slices.  A slice ends at a timer
deadline, at the end of an instruction budget, when the watchdog fires, or
when a TLB fill failed -- then the #PF or #NPF the fill kept is raised here,
outside any Unicorn hook.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from unicorn import Uc, UcError
from unicorn import x86_const as X

from ..memory.hostmem import PAGE_SIZE
from ..memory.mmu import GuestException, GuestGP, GuestPageFault, NestedFault
from ..memory.paging import PFErr
from .controls import GuestControls
from .cpustate import HF_CS64, OFF_EMU_COUNTER, OFF_INVALID_ADDR, R_CS, CpuState, code_size, engine_cell
from .decode import whole_insns
from .events import Vec
from .exitcodes import ExitCode
from .one_insn_block import MAX_COUNT
from .scanner import CC_ARITH, CC_OP_EFLAGS, LAZY_FLAGS, QCC_OP, QCC_SRC, QEFLAGS
from .stop import StopInfo, StopReason

if TYPE_CHECKING:
    from .avic import Avic
    from .fill import TlbFill
    from .interrupts import Interrupts
    from .world_switch import SwitchState, WorldSwitch

#: the guest clock's nominal rate: one retired instruction is 10 ns of guest time
GUEST_IPS = 100_000_000
#: the budget of a slice counted only to keep guest time (never reached)
_CLOCK_ONLY = 1 << 62
_RIP = X.UC_X86_REG_RIP


@dataclass
class RunLimits:
    max_insns: int = 0            # 0: not counted
    timeout_s: float = 10.0
    max_exits: int = 10_000_000


class RunLoop:
    """Runs the entered guest until the run stops; owns guest time and the timer."""

    def __init__(self, uc: Uc, st: CpuState, ctl: GuestControls, sw: "SwitchState") -> None:
        self._uc, self._st, self._ctl, self._sw = uc, st, ctl, sw
        #: Unicorn's instruction counter and the address of its last failed fill, in place
        self._counter = engine_cell(uc, OFF_EMU_COUNTER)
        self._invalid = engine_cell(uc, OFF_INVALID_ADDR)
        self.limits = RunLimits()
        #: instructions started in the last run (counted only with an instruction budget)
        self.insns: int | None = None
        self.timed_out = False
        #: guest time: instructions retired in counted slices (see :meth:`arm_timer`)
        self.guest_clock = 0
        self.timer_period = self.timer_next = 0
        self.timer_ticks = self.timer_masked = 0
        self._slice_budget = 0            # instructions the running emu_start may count (0: not counting)
        self._in_emu = False
        self._rearm = False               # the timer was re-armed while a slice ran
        #: called before every slice's emu_start (the alignment check switches its hook there)
        self.before_slice: Callable[[], None] | None = None
        # work another processor does at set points of guest time (see schedule_remote)
        self.remote_period = self.remote_next = 0
        self.remote_fn: Callable[[], None] | None = None
        self.remote_events = 0
        self._kicked = False
        #: the block last cut short before a page it ran on into (:meth:`_run_on`):
        #: (its first instruction's address, that page, the instructions asked for,
        #: the exits and deliveries so far), None when none is
        self._cut: tuple[int, int, int, tuple[int, int]] | None = None
        #: run-on fetch faults not raised, the block cut short instead
        self.run_on_faults = 0
        #: whether the translated blocks were made with Unicorn's counting hook (see
        #: :meth:`fault_flags`): the last slice counted
        self._counted_blocks = False
        self._fix_flags = LAZY_FLAGS.passed()
        #: whether the instruction at an address just had a candidate-hook call
        #: (bound by the processor: ``Scanner.hook_ran``): it had Unicorn's hook
        #: prologue in an uncounted slice too (:meth:`fault_flags`)
        self.hook_ran: Callable[[int], bool] = lambda rip: False
        #: slices started, so an instruction count names one point of one slice (:meth:`insn_mark`)
        self._slices = 0

    def connect(self, fill: "TlbFill", ws: "WorldSwitch", interrupts: "Interrupts", avic: "Avic") -> None:
        """Bind the failed fill's fault, the #VMEXIT, exception delivery and the
        AVIC (which takes APIC-page accesses and doorbells)."""
        self._fill = fill
        self._ws = ws
        self._interrupts = interrupts
        self._avic = avic
        self._vmexit = ws.vmexit
        self._after_exit = ws.after_exit_in_hook
        self._raise = interrupts.raise_exception

    # ------------------------------------------------------ ending the run
    def halt(self, reason: StopReason, detail: str = "") -> None:
        """The run stops here (HLT, shutdown, a configuration the model refuses)."""
        self._sw.stop = StopInfo(reason, detail)
        self._uc.emu_stop()

    def fail(self, msg: str, exc: BaseException | None = None) -> None:
        """An internal error: the run stops, keeping the original exception in the stop."""
        self._sw.stop = StopInfo(StopReason.ERROR, msg, exc)
        try:
            self._uc.emu_stop()
        except UcError:
            pass

    def expire(self) -> None:
        """The wall-clock limit: flag, then stop emulation (any thread may call it)."""
        self.timed_out = True
        self._uc.emu_stop()

    # ------------------------------------------------------------ the run
    def run(self) -> None:
        """Run the guest from the world switch's entry RIP until the run stops
        (within :attr:`limits`, which VMRUN set)."""
        self._st.reg_write(_RIP, self._sw.entry_rip)
        # The wall-clock limit is a sleeping watchdog thread, not emu_start's
        # ``timeout``: Unicorn's timer thread polls every 2 us and steals a
        # core from the guest on a small machine.
        self.timed_out = False
        self.insns = None
        self._cut = None
        watchdog = None
        if self.limits.timeout_s:
            watchdog = threading.Timer(self.limits.timeout_s, self.expire)
            watchdog.daemon = True
            watchdog.start()
        try:
            self._run_slices()
        finally:
            if watchdog is not None:
                watchdog.cancel()

    def _run_slices(self) -> None:
        """emu_start until the run stops; restart after page faults.

        With an instruction budget, Unicorn counts every instruction it starts
        (an intercepted one included); the budget spans all slices of the run.
        """
        sw, limits = self._sw, self.limits
        while sw.stop is None:
            if self.timed_out:
                sw.stop = self._slice_ended()
                break
            budget = 0
            if limits.max_insns:
                budget = limits.max_insns - (self.insns or 0)
                if budget <= 0:
                    sw.stop = StopInfo(StopReason.INSN_BUDGET, f"instruction budget of {limits.max_insns} reached")
                    break
            if self.timer_period:
                due = max(1, self.timer_next - self.guest_clock)
                budget = min(budget, due) if budget else due
            if self.remote_period:
                due = max(1, self.remote_next - self.guest_clock)
                budget = min(budget, due) if budget else due
            if not budget and self._ctl.pause_filter_threshold:
                budget = _CLOCK_ONLY           # the PAUSE filter's threshold measures guest time
            if not self._slice(budget):
                break

    def _slice(self, budget: int) -> bool:
        """One ``emu_start``; False when the run ends."""
        sw, limits = self._sw, self.limits
        self._fill.pending_fault = None
        if self.before_slice is not None:
            self.before_slice()
        self._slice_budget, self._in_emu, self._rearm = budget, True, False
        self._slices += 1
        if budget and not self._counted_blocks:
            # Unicorn adds its counting hook without dropping the blocks translated
            # before, which lack the hook's prologue (it drops them all when it
            # takes the hook away): every block of a counted slice must have it
            self._uc.ctl_flush_tb()
        self._counted_blocks = bool(budget)
        try:
            try:
                self._uc.emu_start(sw.entry_rip, 0xFFFF_FFFF_FFFF_FFFF, count=budget)
            finally:
                self._in_emu = False
                self._count_slice(budget)
        except UcError as e:
            if sw.stop is not None:
                return False
            f = self._fill.pending_fault
            if f is None:
                sw.stop = StopInfo(StopReason.ERROR, f"emulation error: {e}")
                return False
            self._memory_fault(f)
            if sw.stop is None and sw.exit is None:
                sw.entry_rip = self._st.reg_read(_RIP)
            return True
        if sw.stop is not None:
            return False
        if self._rearm and not self.timed_out:
            sw.entry_rip = self._st.reg_read(_RIP)      # the timer was re-armed: a new slice, a new bound
            return True
        # emu_start returned by itself: a timer deadline, a remote event, the budget, or the watchdog's emu_stop
        if not self.timed_out and self.remote_period and self.guest_clock >= self.remote_next:
            self._remote_event()
            return True
        if not self.timed_out and self.timer_period and self.guest_clock >= self.timer_next:
            self._timer_interrupt()
            return True
        if not self.timed_out and limits.max_insns and self.insns is not None and self.insns < limits.max_insns:
            sw.entry_rip = self._st.reg_read(_RIP)
            return True
        sw.stop = self._slice_ended()
        return False

    def _slice_ended(self) -> StopInfo:
        if self.timed_out:
            return StopInfo(StopReason.TIMEOUT, f"wall-clock limit of {self.limits.timeout_s:g} s reached")
        if self.limits.max_insns:
            return StopInfo(StopReason.INSN_BUDGET, f"instruction budget of {self.limits.max_insns} reached")
        return StopInfo(StopReason.STOPPED, "emulation stopped")

    def _count_slice(self, budget: int) -> None:
        if budget:
            n = min(self._counter.value, budget)
            self.guest_clock += n
            if self.limits.max_insns:
                self.insns = (self.insns or 0) + n

    # ------------------------------------------------------- memory faults
    def _memory_fault(self, f: Exception) -> None:
        """A TLB fill failed: #PF into the guest (or its intercept) or VMEXIT_NPF."""
        st = self._st
        st.clear_old_exception()
        if self._fill.fault_fetch and self._run_on():
            return                  # not the guest's fault: the block is translated again, shorter
        self._cut = None
        if not self._fill.fault_fetch:
            self.fault_flags()
        rip = st.rip
        # the fill saw only the page; Unicorn kept the exact faulting address
        exact = self._invalid.value
        off = exact & 0xFFF if exact & ~0xFFF == self._fill.fault_page else 0
        if isinstance(f, NestedFault):
            gpa = f.gpa | off if f.exitinfo1 & PFErr.FINAL else f.gpa
            if f.exitinfo1 & PFErr.FINAL and self._avic.claims(gpa):
                self._avic.guest_access(rip, gpa)      # AVIC: the APIC page goes to the backing page
                return
            insn = self._fill.insn_bytes(rip)
            self._vmexit(ExitCode.NPF, f.exitinfo1, gpa, rip=rip, nrip=0, insn=insn)
            self._after_exit_outside(rip)
        elif isinstance(f, GuestPageFault):
            self._exception_outside(Vec.PF, f.error_code, rip, cr2=f.address | off)
        elif isinstance(f, GuestGP):
            self._exception_outside(Vec.GP, 0, rip)
        elif isinstance(f, GuestException):          # SEV-SNP #VC raised by the memory system
            self._exception_outside(f.vector, f.error_code, rip)

    def fault_flags(self) -> None:
        """The lazy flags as they were when the faulting instruction began, for a
        fault raised inside an instruction (a data access, a QEMU helper's #DE or
        #GP ...) in a counted slice, or in an instruction a candidate hook
        covers; nothing otherwise.

        Unicorn 2.1.4 puts before every instruction a code hook covers -- the
        counting hook covers all -- a prologue that, after the hook's call,
        computes the lazy flags (``gen_compute_eflags``: cc_src = the flags,
        cc_op = CC_OP_EFLAGS).  The instruction's restart record
        (``tcg_gen_insn_start``) was written before it, with the lazy operation
        of the instruction before; a data access that faults restores that
        operation (``restore_state_to_opc``) beside the computed cc_src, and
        RFLAGS read from the pair is garbage (SUB AL, F0h from 0, then a faulting
        load: CF read back 0).  The instruction has changed no flag state before
        its access (QEMU restarts it from its record alone), so the computed form
        is the flags before it, as a precise fault leaves them (APM vol. 2 §8.1).
        QEMU has already left the run, computing eflags from the pair; both are
        put right.  A fetch fault comes at translation, before any of the block
        ran: its state is the block's entry state, left alone.  A trap raised after
        an instruction (single-step #DB) has the state that instruction left, its
        lazy operation included: not for this.

        Not only the counting hook puts the prologue there: so does the
        candidate hook the processor places on an instruction (INSB, say), in
        an uncounted slice as well -- a shadow miss on INSB's store left the
        SUB before it with OF and CF set (seed 28, ``--paging shadow``).  There
        the repair needs the candidate hook's call at this very instruction to
        be the last one (``Scanner.hook_ran``) and cc_src to be a flags word (no
        bit outside OF SF ZF AF PF CF), as the prologue leaves it: a block
        translated before the hook was placed holds the instruction's plain lazy
        operands, and runs it with no call."""
        if not self._fix_flags:
            return
        q = self._st.q
        if not self._slice_budget and not (self.hook_ran(self._st.rip) and not q[QCC_SRC] & ~CC_ARITH):
            return
        self._computed_flags()

    def store_given_up(self) -> None:
        """QEMU gave up a store into the block running it, in a counted slice
        (:meth:`~.fill.TlbFill._after_stores` saw the instruction fetched again
        with no instruction started since its store): its precise
        self-modifying-code handling restored the state at the storing
        instruction (``cpu_restore_state``) and runs it again as a block of its
        own.  That restore is the one a fault makes (:meth:`fault_flags`), with
        the same stale lazy operation beside the computed cc_src: ``ADD EAX,
        EAX`` then ``MOV [RIP+0], ECX`` over the next instruction left CF = 1
        from 0 + 0 (seed 27).  No Python runs between the restore and the
        instruction's new block but the fetch fill that block needs, which
        calls this.  (In an uncounted slice nothing tells a given-up store from
        a branch back to the instruction: a candidate storing into its own
        running block after a flag-setting instruction is not repaired.)"""
        if self._slice_budget and self._fix_flags:
            self._computed_flags()

    def insn_mark(self) -> tuple[int, int] | None:
        """A point of the running counted slice: instructions started (Unicorn's
        counter) and the slice; None in an uncounted slice."""
        if not (self._in_emu and self._slice_budget):
            return None
        return (self._slices, self._counter.value)

    def _computed_flags(self) -> None:
        """cc_src holds the computed flags (Unicorn's hook prologue): RFLAGS and cc_op follow it."""
        q = self._st.q
        flags = q[QCC_SRC] & CC_ARITH
        q[QEFLAGS] = q[QEFLAGS] & ~CC_ARITH | flags
        q[QCC_OP] = q[QCC_OP] & ~0xFFFF_FFFF | CC_OP_EFLAGS

    def _run_on(self) -> bool:
        """Whether the failed fetch fill was QEMU's, not the guest's: True when it
        is, with the next block asked to end before the page the fill was for.

        QEMU (5.0, as in Unicorn 2) fetches every instruction of a block when it
        translates it, before the block's first instruction runs, and lets a block
        run on across a page boundary.  A fetch fault for the next page then comes
        at the block's start -- RIP there, CR2 on the next page -- while the
        instructions before the one that reaches that page have not run.  The
        processor raises an instruction-fetch fault only for the instruction
        whose bytes are not there, after every earlier one has completed (APM
        vol. 2 §8.1: exceptions are precise, the saved rIP is that of the
        faulting instruction; §8.2.15: CR2 is the address that faulted).  QEMU
        7.1 ends a block before a non-first instruction that crosses into
        another page; here the block is asked for again holding only the
        instructions that lie wholly on its first page (counted with the
        decoder's lengths; one, should that block still run on), and the fault,
        if real, is raised by the block that starts with the instruction
        reaching the page.

        The instructions before that one are straight-line code (QEMU ends a
        block at every branch), so the guest comes back to the same block start
        before reaching it only through an exit or a delivered event: the same
        fault with neither counted in between is the shortened block's own."""
        st, fill = self._st, self._fill
        hflags = st.hflags
        pc = st.seg(R_CS)[1] + st.rip             # the block's start, as QEMU computes it
        if not hflags & HF_CS64:
            pc &= 0xFFFF_FFFF
        page, fault_page = pc & ~(PAGE_SIZE - 1), fill.fault_page
        if fault_page == page:
            return False                          # the block's first page: the first instruction's fetch
        events = (self._ws.exit_count, self._interrupts.deliveries)
        cut = self._cut
        if cut is not None and cut[:2] == (pc, fault_page) and cut[3] == events:
            # the block just asked for ran on too (nothing ran in between)
            if cut[2] == 1:
                self._cut = None
                return False                      # one instruction, and it reaches the page: its fault
            n = 1
        else:
            # at least one: the first instruction may reach the page (the one-instruction
            # block then faults again, and that fault is raised), or capstone may not
            # decode what QEMU runs (LOCK PUSH: #UD on the processor, a PUSH to QEMU)
            n = max(1, self._whole_insns(pc, page, code_size(hflags)))
        self._cut = (pc, fault_page, n, events)
        self.run_on_faults += 1
        fill.one_insn_block.next_count(n)
        return True

    def _whole_insns(self, pc: int, page: int, mode: int) -> int:
        """How many instructions from ``pc`` lie wholly on its ``page`` (at most a
        block's worth), by the decoder's lengths."""
        code = self._fill.code_page(page)
        if code is None:
            return 0
        return whole_insns(code[pc - page:], mode, MAX_COUNT)

    def _exception_outside(self, vec: int, err: int | None, rip: int, cr2: int | None = None) -> None:
        self._raise(vec, err, rip, cr2)
        sw = self._sw
        if sw.exit is None and sw.stop is None:
            sw.entry_rip = self._st.reg_read(_RIP)

    def _after_exit_outside(self, rip: int) -> None:
        self._after_exit(rip)
        if self._sw.stop is None:
            self._sw.entry_rip = self._st.reg_read(_RIP)

    def restart_slice(self) -> bool:
        """End the running slice, so the next one starts with what changed (a timer or
        remote deadline, guest-time counting, the translated blocks :attr:`before_slice`
        drops); False when no slice runs."""
        if not self._in_emu:
            return False
        self._rearm = True
        self._uc.emu_stop()
        return True

    def keep_clock(self) -> None:
        """Guest time must be counted from here on (a PAUSE filter threshold came into
        force): a slice that is not counting ends, and the next one counts."""
        if not self._slice_budget:
            self.restart_slice()

    # -------------------------------------------------------- virtual timer
    def arm_timer(self, period_ns: int) -> None:
        """A periodic physical interrupt in guest time (0 disarms it).

        Guest time is counted in retired guest instructions at the model's
        nominal :data:`GUEST_IPS`; the run is sliced at each deadline with
        Unicorn's instruction count, so a timer costs nothing per instruction
        in Python.  At a deadline the processor takes the interrupt: a
        #VMEXIT(INTR) when the VMCB intercepts INTR (APM §15.13.1)."""
        if period_ns < 0:
            raise ValueError("timer period must be positive")
        self.timer_period = max(1, period_ns * GUEST_IPS // 1_000_000_000) if period_ns else 0
        self.timer_next = self.clock_now() + self.timer_period
        # armed by a hypervisor handling an exit inside the run: end this
        # slice, so the next one is bounded by the new deadline
        self.restart_slice()

    def clock_now(self) -> int:
        """Guest time in instructions, including the running slice's progress."""
        if self._in_emu and self._slice_budget:
            return self.guest_clock + min(self._counter.value, self._slice_budget)
        return self.guest_clock

    def idle_until(self, time_ns: int) -> None:
        """Guest time jumps forward to ``time_ns`` (an idle processor); never backwards."""
        now = self.guest_time_ns
        if time_ns > now:
            self.guest_clock += -(-(time_ns - now) * GUEST_IPS // 1_000_000_000)

    @property
    def guest_time_ns(self) -> int:
        return self.clock_now() * 1_000_000_000 // GUEST_IPS

    # ------------------------------------------------------ remote events
    def schedule_remote(self, period_ns: int, fn: Callable[[], None] | None) -> None:
        """Run ``fn`` every ``period_ns`` of guest time (0 or None: stop), as
        work another processor does concurrently -- a device's emulation thread
        posting interrupts.  It does not interrupt this processor: the run is
        only sliced there so the work happens at that point of guest time.  What
        ``fn`` sends this processor arrives after it: a doorbell (AVIC evaluates
        the virtual IRR, no exit) or a kick (:meth:`kick`, a physical interrupt)."""
        if period_ns < 0:
            raise ValueError("remote event period must be positive")
        self.remote_fn = fn if period_ns else None
        self.remote_period = max(1, period_ns * GUEST_IPS // 1_000_000_000) if period_ns and fn else 0
        self.remote_next = self.clock_now() + self.remote_period
        self.restart_slice()

    def kick(self) -> None:
        """A physical interrupt (an IPI from another processor) arrives: taken
        after the remote event that sent it, as #VMEXIT(INTR) when intercepted."""
        self._kicked = True

    def _remote_event(self) -> None:
        self.remote_next = self.guest_clock + self.remote_period
        self.remote_events += 1
        sw = self._sw
        rip = self._st.reg_read(_RIP)
        sw.entry_rip = rip
        self.remote_fn()
        if self._kicked:
            self._kicked = False
            self._avic.doorbell_pending = False
            if self._ctl.intercepted(ExitCode.INTR):
                self._vmexit(ExitCode.INTR, 0, 0, rip=rip, nrip=0)
                self._after_exit_outside(rip)
                return
        if self._avic.doorbell_pending:
            self._avic.doorbell_pending = False
            if self._avic.deliver_pending() and sw.exit is None and sw.stop is None:
                sw.entry_rip = self._st.reg_read(_RIP)

    def _timer_interrupt(self) -> None:
        self.timer_next = self.guest_clock + self.timer_period
        self.timer_ticks += 1
        rip = self._st.reg_read(_RIP)
        self._sw.entry_rip = rip
        if not self._ctl.intercepted(ExitCode.INTR):
            self.timer_masked += 1      # not intercepted: the host would field it; the guest never sees it
            return
        self._vmexit(ExitCode.INTR, 0, 0, rip=rip, nrip=0)
        self._after_exit_outside(rip)
