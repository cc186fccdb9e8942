"""Events: exceptions, interrupts and their delivery through the guest IDT.

Unicorn never delivers an x86 exception itself; it reports it to a hook and
this part decides: the exception's intercept (#VMEXIT 40h + vector), or
delivery through the guest's IDT, escalating to #DF and shutdown (APM vol. 2
§8.2.9, §15.12).  It also injects what the hypervisor queues at VMRUN --
EVENTINJ (§15.20) and a pending virtual interrupt V_IRQ (§15.21.4) -- and
watches the instructions that open a virtual-interrupt window.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Callable

from unicorn import Uc
from unicorn import x86_const as X

from ..arch import M64, RFLAGS_IF
from ..memory.hostmem import HostMemory, page_spans
from ..memory.mmu import GuestGP, GuestPageFault, NestedFault
from ..memory.paging import Access
from . import decode as D
from .controls import GuestControls
from .cpustate import CpuState, code_size
from .events import HAS_ERROR_CODE, DeliveryFault, GuestAccess, Vec, combine, deliver
from .exitcodes import ExitCode, excp
from .extension import NO_EXTENSION, ProcessorExtension
from .stop import StopReason
from .vmcb import (OFF_EVENTINJ, OFF_INTERRUPT_SHADOW, OFF_V_INTR, OFF_V_INTR_VECTOR, INTERRUPT_SHADOW_ACTIVE,
                   V_INTR_PRIO_SHIFT, V_TPR_MASK, Event, EventType, VIntr)

if TYPE_CHECKING:
    from .avic import Avic
    from .cpu import SvmCpu
    from .lbr import BranchRecords
    from .fill import TlbFill
    from .run import RunLoop
    from .scanner import DecisionView, Scanner
    from .smc import CodeChanges
    from .world_switch import SwitchState, WorldSwitch

_Q = struct.Struct("<Q")
_RIP, _RSP, _RFLAGS = X.UC_X86_REG_RIP, X.UC_X86_REG_RSP, X.UC_X86_REG_RFLAGS
#: vectors Unicorn raises after an instruction completes, with the state it left
#: (single-step #DB; INT3 and INTO, which change no flags): not faults inside one
_TRAPS = frozenset({Vec.DB, Vec.BP, Vec.OF})
_DELIVERY_FAULTS = (DeliveryFault, GuestPageFault, GuestGP)
#: EVENTINJ's bits and TYPEs as plain ints (an IntEnum/IntFlag operation is a Python call)
_EVENT_VALID, _EVENT_EV = int(Event.VALID), int(Event.EV)
_TYPE_INTR, _TYPE_NMI, _TYPE_SOFT_INT = int(EventType.INTR), int(EventType.NMI), int(EventType.SOFT_INT)


class Interrupts:
    """Exception intercepts, IDT delivery, EVENTINJ, V_IRQ and the interrupt window."""

    def __init__(self, uc: Uc, st: CpuState, mem: HostMemory, ctl: GuestControls, sw: "SwitchState") -> None:
        self._uc, self._st, self._ctl, self._sw = uc, st, ctl, sw
        self._view = mem.view
        self.ext: ProcessorExtension = NO_EXTENSION
        #: supervisor reads and writes of guest linear memory, for delivery and the TSS
        self.access = GuestAccess(self._read, self._write)
        #: events vectored so far (:meth:`deliver`): the run loop tells by it whether
        #: the guest went elsewhere between two of its slices
        self.deliveries = 0

    def connect(self, cpu: "SvmCpu", fill: "TlbFill", scanner: "Scanner", ws: "WorldSwitch", run: "RunLoop",
                smc: "CodeChanges", avic: "Avic", lbr: "BranchRecords") -> None:
        """Bind what delivery calls: the walker, the scanner's watch, the #VMEXIT,
        stopping the run, the rescan of a code page the processor writes, and the
        last-branch records (an event is recorded)."""
        self._cpu = cpu
        self._lbr = lbr
        self._smc = smc
        self._avic = avic
        self._walker = fill.guest_walker
        self._watch = scanner.watch
        self._insn_bytes = fill.insn_bytes
        self._vmexit = ws.vmexit
        self._after_exit = ws.after_exit_in_hook
        self._halt = run.halt
        self._fault_flags = run.fault_flags
        self._fail: Callable[[str, BaseException | None], None] = run.fail

    # -------------------------------------------------------- Unicorn hooks
    def on_intr(self, uc, intno: int, ud) -> None:
        """UC_HOOK_INTR: an exception (or INT n) Unicorn raised."""
        try:
            if intno < 32 and intno not in _TRAPS:
                self._fault_flags()         # a fault a QEMU helper raised inside the instruction
            st = self._st
            rip = st.rip                    # the state's RIP is what a register read returns
            err = st.error_code if intno in HAS_ERROR_CODE else None
            st.clear_old_exception()        # the model delivers it: nothing stays "in flight" for QEMU
            if intno >= 32:
                # a software interrupt the scanner did not see (cannot happen
                # with INT n always hooked); deliver it like INT n
                self.deliver(intno, None, software=True, rip_after=rip, fault_rip=rip - 2)
                return
            self.raise_exception(intno, err, rip)
        except BaseException as e:
            self._fail(f"internal error delivering vector {intno}: {type(e).__name__}: {e}", e)

    def on_invalid(self, uc, ud) -> bool:
        """#UD reaches Unicorn's invalid-instruction hook, not the interrupt hook."""
        try:
            rip = self._st.reg_read(_RIP)
            if self.ext.emulate_invalid(self._cpu, rip):
                return True                           # an SEV instruction Unicorn does not know (PVALIDATE)
            self.raise_exception(Vec.UD, None, rip)
        except BaseException as e:
            self._fail(f"internal error delivering #UD: {type(e).__name__}: {e}", e)
        return True

    # ----------------------------------------------------------- exceptions
    def raise_exception(self, vector: int, err: int | None, rip: int, cr2: int | None = None) -> None:
        """An exception raised by guest execution at ``rip``: intercept or deliver."""
        if self._ctl.ivec[2] >> vector & 1:          # word 2: the exception intercepts
            info1 = err if err is not None else 0
            info2 = cr2 if (vector == Vec.PF and cr2 is not None) else 0
            insn = self._insn_bytes(rip) if vector == Vec.PF else b""
            self._vmexit(excp(vector), info1, info2, rip=rip, nrip=0, insn=insn)
            self._after_exit(rip)
            return
        if cr2 is not None:
            self._st.reg_write(X.UC_X86_REG_CR2, cr2)
        self.deliver(vector, err, software=False, rip_after=rip, fault_rip=rip)

    def deliver(self, vector: int, err: int | None, *, software: bool, rip_after: int, fault_rip: int,
                external: bool = False, etype: int | None = None) -> None:
        """Vector an event through the guest IDT, escalating to #DF and shutdown.

        A fault during delivery that the VMCB intercepts exits with EXITINTINFO
        describing the event being delivered (APM §15.7.2): TYPE 0 for an
        external interrupt, 2 NMI, 4 INT n, 3 for exceptions (INT3/INT1 too).
        """
        self.deliveries += 1
        if etype is None:
            etype = (EventType.INTR if external else
                     EventType.SOFT_INT if software and vector not in (1, 3) else EventType.EXCEPTION)
        vec, ec, soft, ty, ret_rip = vector, err, software, int(etype), rip_after
        # a failed attempt changes none of the processor's state (the frame's segments
        # are committed last)
        st = self._st
        rflags = st.reg_read(_RFLAGS)
        rsp = st.q[4]
        access = self.access
        for _ in range(3):
            try:
                new_rip, new_rsp, new_flags = deliver(st, access, vec, ec, software=soft, rip=ret_rip,
                                                      rflags=rflags, rsp=rsp, external=external)
            except _DELIVERY_FAULTS as f:
                nxt = self._delivery_fault(f, vec, ec, ty, fault_rip)
                if nxt is None:
                    return
                vec, ec = nxt
                soft, ret_rip, ty, external = False, fault_rip, EventType.EXCEPTION, False
                continue
            except NestedFault as f:
                self._vmexit(ExitCode.NPF, f.exitinfo1, f.gpa, rip=fault_rip, nrip=0,
                             exitintinfo=_intinfo(vec, ty, ec))
                self._after_exit(fault_rip)
                return
            # commit: the segments and RSP, then RFLAGS and RIP through Unicorn
            # (their writes have side effects: lazy flags, a new block)
            st.q[4] = new_rsp & M64
            st.reg_write(_RFLAGS, new_flags)
            st.reg_write(_RIP, new_rip)
            if self._lbr.engaged:
                # an exception raised by the instruction at fault_rip, or an event taken there
                self._lbr.event(vec, fault_rip, new_rip)
            return
        self.shutdown(fault_rip)

    def _delivery_fault(self, f: Exception, vec: int, err: int | None, ty: int,
                        fault_rip: int) -> tuple[int, int] | None:
        """Delivering ``vec`` faulted with ``f``: exit, shut down (None), or the next event to deliver."""
        # a non-canonical IDT/GDT/TSS address read during delivery is #GP(0)
        fvec, ferr = ((Vec.PF, f.error_code) if isinstance(f, GuestPageFault) else
                      (Vec.GP, 0) if isinstance(f, GuestGP) else (f.vector, f.error_code))
        ivec = self._ctl.ivec
        # The new exception's own intercept comes first (APM §15.7.2: e.g.
        # a #PF intercepted while delivering another event exits as #PF
        # with EXITINTINFO = that event -- what shadow paging relies on);
        # only an unintercepted one combines into #DF or shutdown.
        nxt = fvec if ivec[2] >> fvec & 1 else combine(vec, fvec)
        if nxt is None:
            self.shutdown(fault_rip)
            return None
        nerr = 0 if nxt == Vec.DF else ferr
        if ivec[2] >> nxt & 1:
            info2 = f.address if nxt == Vec.PF else 0
            self._vmexit(excp(nxt), nerr or 0, info2, rip=fault_rip, nrip=0, exitintinfo=_intinfo(vec, ty, err))
            self._after_exit(fault_rip)
            return None
        if nxt == Vec.PF:
            self._st.reg_write(X.UC_X86_REG_CR2, f.address)
        return nxt, nerr

    def shutdown(self, rip: int) -> None:
        """Triple fault: #VMEXIT(SHUTDOWN), which cannot resume, or the machine stops (APM §15.12)."""
        if self._ctl.intercepted(ExitCode.SHUTDOWN):
            self._vmexit(ExitCode.SHUTDOWN, 0, 0, rip=rip, nrip=0)
            self._after_exit(rip, resumable=False)
        else:
            self._halt(StopReason.SHUTDOWN, f"triple fault at {rip:#x}")

    # ------------------------------------------------ guest memory access
    def read_as(self, gva: int, n: int, user: bool) -> bytes:
        """``n`` bytes of guest linear memory read through the walker (A bits set), as a
        user access when ``user``; raises the walk's fault."""
        out = b""
        for a, _, chunk in page_spans(gva, n):
            h = self._walker().translate(a, Access.READ, user).hpa
            out += bytes(self._view[h:h + chunk])
        return out

    def _read(self, gva: int, n: int) -> bytes:
        return self.read_as(gva, n, False)

    def _write(self, gva: int, data: bytes) -> None:
        for a, at, chunk in page_spans(gva, len(data)):
            h = self._walker().translate(a, Access.WRITE, False).hpa
            self._view[h:h + chunk] = data[at:at + chunk]
            self._smc.processor_wrote(h)

    # ------------------------------------------------- virtual interrupts
    def virq_deliverable(self, rflags: int) -> bool:
        """V_IRQ pending, IF set, and its priority beats V_TPR unless V_IGN_TPR (§15.21.4)."""
        v = _Q.unpack_from(self._view, self._ctl.vmcb_hpa + OFF_V_INTR)[0]
        if not v & VIntr.V_IRQ or v & VIntr.AVIC_ENABLE or not rflags & RFLAGS_IF:
            return False                 # V_IRQ is ignored while AVIC is on (§15.29.2)
        return bool(v & VIntr.V_IGN_TPR) or ((v >> V_INTR_PRIO_SHIFT) & 0xF) > (v & V_TPR_MASK)

    def inject_virq(self) -> None:
        """Take the pending virtual interrupt: V_IRQ is cleared as it is dispatched (§15.21.4)."""
        mv, b = self._view, self._ctl.vmcb_hpa
        v = _Q.unpack_from(mv, b + OFF_V_INTR)[0]
        vec = mv[b + OFF_V_INTR_VECTOR]
        _Q.pack_into(mv, b + OFF_V_INTR, v & ~VIntr.V_IRQ)
        rip = self._st.reg_read(_RIP)
        self.deliver(vec, None, software=False, rip_after=rip, fault_rip=rip, external=True)

    def entry_events(self, eventinj: int, rip: int, rflags: int) -> None:
        """EVENTINJ (APM §15.20) and a pending virtual interrupt (§15.21.4) at VMRUN.
        An exit raised while delivering them is left pending for VMRUN's caller."""
        mv, b, st, sw = self._view, self._ctl.vmcb_hpa, self._st, self._sw
        if eventinj & _EVENT_VALID:
            # EVENTINJ's fields (APM §15.20, Fig. 15-5): VECTOR 7:0, TYPE 10:8, EV 11, ERRORCODE 63:32
            ty = (eventinj >> 8) & 7
            err = eventinj >> 32 if eventinj & _EVENT_EV else None
            _Q.pack_into(mv, b + OFF_EVENTINJ, eventinj & ~_EVENT_VALID)
            st.reg_write(_RIP, rip)
            # §15.20: for TYPE 2 (NMI) the VECTOR field is ignored; an NMI is vector 2
            vector = 2 if ty == _TYPE_NMI else eventinj & 0xFF
            self.deliver(vector, err, software=(ty == _TYPE_SOFT_INT), rip_after=rip,
                         fault_rip=rip, external=(ty == _TYPE_INTR), etype=ty)
        elif self.virq_deliverable(rflags) and not _Q.unpack_from(mv, b + OFF_INTERRUPT_SHADOW)[0] \
                & INTERRUPT_SHADOW_ACTIVE:
            if self._ctl.intercepted(ExitCode.VINTR):
                self._vmexit(ExitCode.VINTR, 0, 0, rip=rip, nrip=0)
                self._after_exit(rip)
                return
            st.reg_write(_RIP, rip)
            self.inject_virq()
        elif self.virq_deliverable(rflags):
            # held only by the interrupt shadow VMRUN loaded (INTERRUPT_SHADOW, §15.21.5), which
            # covers one instruction: the V_IRQ is taken after it (kvm-unit-tests
            # virq_inject_within_shadow), so that address is watched as after an STI
            try:
                n = D.length_of(self.access.read(rip, D.MAX_INSN), code_size(st.hflags))
            except (GuestPageFault, NestedFault, GuestGP):
                n = None
            if n is not None:
                self._watch(rip + n)
            return
        elif self._avic.deliverable(rflags) is not None:
            st.reg_write(_RIP, rip)          # AVIC: the virtual IRR, evaluated at VMRUN (§15.29.2)
            self._avic.deliver_pending()
        else:
            return
        if sw.exit is None and sw.stop is None:
            sw.entry_rip = st.reg_read(_RIP)

    def watch_irq_window(self, address: int, insn: D.Insn, st: CpuState, view: "DecisionView",
                         code: bytes) -> None:
        """STI / POPF / IRET while a V_IRQ (or an AVIC interrupt) waits for RFLAGS.IF (APM §15.21.4).

        Finds where the interrupt can first be taken -- after the instruction
        following STI (its interrupt shadow), after POPF, at IRET's return
        address -- and watches that address with a one-shot check.
        """
        if not _Q.unpack_from(self._view, self._ctl.vmcb_hpa + OFF_V_INTR)[0] & VIntr.V_IRQ \
                and not self._avic.waiting():
            return
        try:
            if insn.kind == D.Kind.STI:
                nxt = address + insn.length
                shadowed = D.length_of(self.access.read(nxt, D.MAX_INSN), insn.mode)
                if shadowed is None:
                    return
                target = nxt + shadowed
            elif insn.kind == D.Kind.POPF:
                target = address + insn.length
            else:
                # IRET: the return address, as wide as the IRET's operand (IRETQ, IRETD, IRET)
                n = insn.opsize // 8
                target = int.from_bytes(self.access.read(st.gpr(4) & ((1 << insn.addrsize) - 1), n), "little")
        except (GuestPageFault, NestedFault, GuestGP):
            return
        self._watch(target)

    def window_open(self) -> bool:
        """At a watched address: take the pending virtual interrupt if it is
        deliverable now (or exit on VINTR).  True when control moved."""
        rflags = self._st.reg_read(_RFLAGS)
        if not self.virq_deliverable(rflags):
            return self._avic.deliver_pending()
        rip = self._st.reg_read(_RIP)
        if self._ctl.intercepted(ExitCode.VINTR):
            self._vmexit(ExitCode.VINTR, 0, 0, rip=rip, nrip=0)
            self._after_exit(rip)
            return True
        self.inject_virq()
        return True


def _intinfo(vec: int, ty: int, err: int | None) -> int:
    """EXITINTINFO for the event that was being delivered (APM §15.7.2; the EVENTINJ
    layout, Fig. 15-5): VECTOR, TYPE, EV with ERRORCODE for a vector that pushes one, V."""
    v = (vec & 0xFF) | ((ty & 7) << 8) | _EVENT_VALID
    if err is not None and vec in HAS_ERROR_CODE:
        v |= _EVENT_EV | ((err & 0xFFFF_FFFF) << 32)
    return v
