"""AVIC: the Advanced Virtual Interrupt Controller (APM vol. 2 §15.29).

With AVIC_ENABLE (V_INTR bit 31) set in the VMCB, the processor virtualizes
the guest's local APIC itself:

* **The backing page** (AVIC_BACKING_PAGE, a host-physical page) holds the
  guest's APIC registers at their xAPIC offsets.  A guest access to the APIC
  page (the guest-physical AVIC_APIC_BAR) is redirected to it and handled as
  :func:`classify` says (§15.29.3): *accelerated* -- completed by the
  processor, no exit; *trap* -- the write completes into the backing page,
  then #VMEXIT(AVIC_NOACCEL) with RIP after the instruction; *fault* -- the
  instruction does not execute, #VMEXIT(AVIC_NOACCEL) with RIP at it.
  EXITINFO1 = write (bit 32) | the register offset (bits 11:4); EXITINFO2 = the
  vector, for the trapped EOI of a level-triggered interrupt.
* **Interrupt delivery** (§15.29.2): the virtual IRR in the backing page is
  evaluated at VMRUN, after an accelerated TPR write, EOI or self-IPI, when a
  doorbell arrives for this processor and when the guest sets RFLAGS.IF; the
  highest vector whose priority class beats the virtual PPR is moved to the
  ISR and delivered through the guest IDT without an exit.  V_IRQ is ignored.
* **IPIs** (§15.29.4): an ICR write of a fixed, edge-triggered interrupt is
  accelerated: the destinations are found through the **logical APIC ID
  table** (4-byte entries: guest physical APIC ID 7:0, valid 31; index = the
  set bit of the flat logical destination, or cluster x 4 + bit) and the
  **physical APIC ID table** (8-byte entries: host physical APIC ID 7:0,
  backing page 51:12, IsRunning 62, valid 63; at most
  AVIC_PHYSICAL_MAX_INDEX + 1 of them); the vector is set in each target's
  backing page, and a running target on another processor is sent a
  **doorbell** (its host APIC ID).  What AVIC does not deliver exits with
  #VMEXIT(AVIC_INCOMPLETE_IPI) after the ICR write: EXITINFO1 = ICRH:ICRL,
  EXITINFO2 = the cause (:class:`IpiFailure`) in bits 63:32 and the table
  index in bits 8:0.  A target that is not running has its IRR bit set and
  the cause TARGET_NOT_RUNNING, so the hypervisor can wake it.

In the model the hypervisor leaves the APIC page out of the nested page
table, and the processor handles an access whose final translation fails
there (it would otherwise be VMEXIT_NPF).  Accesses are decoded as MOV,
MOVZX and MOVSX (:mod:`.memop`); any other instruction, or a register access
that is not an aligned doubleword, takes the fault path and the hypervisor
emulates it.  x2AVIC (the x2APIC MSRs) is not modelled.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Callable

from unicorn import x86_const as X

from ..arch import RFLAGS_IF
from .cpustate import code_size
from .exitcodes import ExitCode
from .memop import MmioDecodeError, decode_form, load_result, store_value
from .vmcb import (AVIC_ADDR_MASK, AVIC_PHYSICAL_MAX_INDEX_MASK, INTERRUPT_SHADOW_ACTIVE, OFF_AVIC_APIC_BAR,
                   OFF_AVIC_BACKING_PAGE, OFF_AVIC_LOGICAL_TABLE, OFF_AVIC_PHYSICAL_TABLE, OFF_INTERRUPT_SHADOW,
                   OFF_V_INTR, VIntr)

if TYPE_CHECKING:
    from .cpustate import CpuState
    from .world_switch import SwitchState

_Q = struct.Struct("<Q")
_I = struct.Struct("<I")
_RIP, _RFLAGS = X.UC_X86_REG_RIP, X.UC_X86_REG_RFLAGS
_UC_REG = {n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *(f"r{i}" for i in range(8, 16)))}


class Reg(IntEnum):
    """APIC register offsets in the APIC page and the backing page (SDM Table 11-1)."""
    ID = 0x20
    VERSION = 0x30
    TPR = 0x80
    APR = 0x90
    PPR = 0xA0
    EOI = 0xB0
    RRR = 0xC0
    LDR = 0xD0
    DFR = 0xE0
    SVR = 0xF0
    ISR = 0x100          # ISR0..7 at 0x100..0x170
    TMR = 0x180          # TMR0..7
    IRR = 0x200          # IRR0..7
    ESR = 0x280
    ICR_LO = 0x300
    ICR_HI = 0x310
    LVT_TIMER = 0x320
    LVT_THERMAL = 0x330
    LVT_PERF = 0x340
    LVT_LINT0 = 0x350
    LVT_LINT1 = 0x360
    LVT_ERROR = 0x370
    TMICT = 0x380
    TMCCT = 0x390
    TDCR = 0x3E0


class Handling(Enum):
    """What the processor does with a guest APIC access under AVIC (§15.29.3)."""
    ACCELERATED = "accelerated"
    TRAP = "trap"
    FAULT = "fault"


_BANKS = {*range(Reg.ISR, Reg.ISR + 0x80, 0x10), *range(Reg.TMR, Reg.TMR + 0x80, 0x10),
          *range(Reg.IRR, Reg.IRR + 0x80, 0x10)}
_LVT = {Reg.LVT_TIMER, Reg.LVT_THERMAL, Reg.LVT_PERF, Reg.LVT_LINT0, Reg.LVT_LINT1, Reg.LVT_ERROR}
#: reads served from the backing page; every other read faults (APR, EOI, RRR, the current count, reserved)
READ_ACCELERATED = frozenset({Reg.ID, Reg.VERSION, Reg.TPR, Reg.PPR, Reg.LDR, Reg.DFR, Reg.SVR, Reg.ESR,
                              Reg.ICR_LO, Reg.ICR_HI, Reg.TMICT, Reg.TDCR, *_LVT, *_BANKS})
#: writes the processor completes itself
WRITE_ACCELERATED = frozenset({Reg.TPR, Reg.EOI, Reg.ICR_LO, Reg.ICR_HI})
#: writes that complete into the backing page and then exit for the hypervisor to act on
WRITE_TRAP = frozenset({Reg.ID, Reg.LDR, Reg.DFR, Reg.SVR, Reg.ESR, Reg.TMICT, Reg.TDCR, *_LVT})


def classify(offset: int, is_write: bool) -> Handling:
    """How an aligned doubleword access to APIC register ``offset`` is handled
    (APM vol. 2 Table 15-22): read-only registers, the current count and
    reserved offsets fault; the registers whose writes the hypervisor must act
    on (ID, LDR, DFR, SVR, ESR, the LVT, the timer) trap."""
    if not is_write:
        return Handling.ACCELERATED if offset in READ_ACCELERATED else Handling.FAULT
    if offset in WRITE_ACCELERATED:
        return Handling.ACCELERATED
    return Handling.TRAP if offset in WRITE_TRAP else Handling.FAULT


class IpiFailure(IntEnum):
    """AVIC_INCOMPLETE_IPI EXITINFO2[63:32] (APM §15.29.9)."""
    INVALID_INT_TYPE = 0          # not fixed, or level-triggered: the hypervisor emulates it
    TARGET_NOT_RUNNING = 1        # IRR set in the target's backing page; IsRunning = 0
    INVALID_TARGET = 2            # a logical table entry not valid, or a physical ID beyond the max index
    INVALID_BACKING_PAGE = 3      # a physical table entry not valid
    INVALID_VECTOR = 4            # vector 0-15


#: AVIC_NOACCEL EXITINFO1 bit 32: the access was a write
NOACCEL_WRITE = 1 << 32
NOACCEL_OFFSET_MASK = 0xFF0
INCOMPLETE_IPI_INDEX_MASK = 0x1FF

# physical APIC ID table entry (§15.29.5)
PHYS_HOST_ID_MASK = 0xFF
PHYS_IS_RUNNING = 1 << 62
PHYS_VALID = 1 << 63
# logical APIC ID table entry
LOG_GUEST_ID_MASK = 0xFF
LOG_VALID = 1 << 31

# ICR fields (SDM §11.6.1)
DM_FIXED = 0
ICR_DEST_LOGICAL = 1 << 11
ICR_LEVEL = 1 << 15
SH_NONE, SH_SELF, SH_ALL, SH_OTHERS = 0, 1, 2, 3


def noaccel_info1(offset: int, is_write: bool) -> int:
    return (NOACCEL_WRITE if is_write else 0) | (offset & NOACCEL_OFFSET_MASK)


def incomplete_ipi_info(icr_lo: int, icr_hi: int, cause: IpiFailure, index: int) -> tuple[int, int]:
    """(EXITINFO1, EXITINFO2) of #VMEXIT(AVIC_INCOMPLETE_IPI)."""
    return (icr_hi << 32) | (icr_lo & 0xFFFF_FFFF), (int(cause) << 32) | (index & INCOMPLETE_IPI_INDEX_MASK)


def physical_entry(host_apic_id: int, backing_hpa: int, running: bool = True, valid: bool = True) -> int:
    return ((host_apic_id & PHYS_HOST_ID_MASK) | (backing_hpa & AVIC_ADDR_MASK)
            | (PHYS_IS_RUNNING if running else 0) | (PHYS_VALID if valid else 0))


def logical_entry(guest_physical_id: int, valid: bool = True) -> int:
    return (guest_physical_id & LOG_GUEST_ID_MASK) | (LOG_VALID if valid else 0)


@dataclass
class AvicExit:
    """An AVIC #VMEXIT: after the instruction (trap) or at it (fault)."""
    code: ExitCode
    info1: int
    info2: int
    trap: bool


@dataclass
class AvicStats:
    """What the processor's AVIC did without the hypervisor."""
    reads: int = 0                 # accelerated register reads
    writes: int = 0                # accelerated register writes (TPR, EOI, ICR)
    eois: int = 0
    ipis: int = 0                  # accelerated IPIs (self included)
    delivered: int = 0             # interrupts delivered from the virtual IRR without an exit
    doorbells_received: int = 0
    #: host APIC IDs the processor sent a doorbell to (targets running on other processors)
    doorbells_sent: list[int] = field(default_factory=list)

    def snapshot(self) -> dict[str, int]:
        return {"reads": self.reads, "writes": self.writes, "eois": self.eois, "ipis": self.ipis,
                "delivered": self.delivered, "doorbells_received": self.doorbells_received,
                "doorbells_sent": len(self.doorbells_sent)}


def highest(bits: int) -> int:
    return bits.bit_length() - 1


class BackingPage:
    """The APIC registers of one virtual APIC in host memory (a view, no copy)."""

    def __init__(self, view: memoryview, hpa: int) -> None:
        self.view, self.hpa = view, hpa

    def __getitem__(self, off: int) -> int:
        return _I.unpack_from(self.view, self.hpa + off)[0]

    def __setitem__(self, off: int, value: int) -> None:
        _I.pack_into(self.view, self.hpa + off, value & 0xFFFF_FFFF)

    def vector(self, base: int) -> int:
        """ISR, TMR or IRR as one 256-bit integer (eight registers 16 bytes apart)."""
        return sum(self[base + 0x10 * i] << (32 * i) for i in range(8))

    def set_bit(self, base: int, vec: int, on: bool = True) -> None:
        off = base + 0x10 * (vec >> 5)
        bit = 1 << (vec & 31)
        self[off] = (self[off] | bit) if on else (self[off] & ~bit)

    def ppr(self) -> int:
        """Processor priority (SDM §11.8.3.1): TPR, or the highest in-service class if higher."""
        tpr, isrv = self[Reg.TPR] & 0xFF, max(highest(self.vector(Reg.ISR)), 0)
        return tpr if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0

    def update_ppr(self) -> None:
        self[Reg.PPR] = self.ppr()

    def pending(self) -> int | None:
        """The highest IRR vector whose priority class beats the PPR's."""
        v = highest(self.vector(Reg.IRR))
        return v if v >= 0 and (v & 0xF0) > (self.ppr() & 0xF0) else None


class Avic:
    """The processor's AVIC for the guest of the current VMRUN (state: the VMCB
    and the pages it points at, read when used)."""

    def __init__(self, view: memoryview, st: "CpuState", sw: "SwitchState", vmcb_hpa: Callable[[], int],
                 host_apic_id: int = 0) -> None:
        self._view, self._st, self._sw, self._vmcb_hpa = view, st, sw, vmcb_hpa
        #: the host physical APIC ID of this processor (doorbells addressed to it are ours)
        self.host_apic_id = host_apic_id
        self.stats = AvicStats()
        self.doorbell_pending = False

    def connect(self, vmexit, after_exit, deliver, insn_bytes) -> None:
        """Bind the #VMEXIT, the hand-over to the hypervisor, IDT delivery and instruction fetch."""
        self._vmexit, self._after_exit, self._deliver, self._insn_bytes = vmexit, after_exit, deliver, insn_bytes

    # ---------------------------------------------------------- the VMCB
    def _q(self, off: int) -> int:
        return _Q.unpack_from(self._view, self._vmcb_hpa() + off)[0]

    @property
    def enabled(self) -> bool:
        return bool(self._q(OFF_V_INTR) & VIntr.AVIC_ENABLE)

    @property
    def apic_bar(self) -> int:
        return self._q(OFF_AVIC_APIC_BAR) & AVIC_ADDR_MASK

    def backing(self) -> BackingPage:
        return BackingPage(self._view, self._q(OFF_AVIC_BACKING_PAGE) & AVIC_ADDR_MASK)

    def claims(self, gpa: int) -> bool:
        """A guest access to ``gpa`` is an APIC access AVIC handles."""
        return (gpa & ~0xFFF) == self.apic_bar and self.enabled

    # ------------------------------------------------------ interrupts
    def deliverable(self, rflags: int) -> int | None:
        """The vector AVIC would deliver now: IF set, GIF set, no interrupt shadow."""
        if not self.enabled or not rflags & RFLAGS_IF or not self._sw.gif:
            return None
        if self._q(OFF_INTERRUPT_SHADOW) & INTERRUPT_SHADOW_ACTIVE:
            return None
        return self.backing().pending()

    def waiting(self) -> bool:
        """An interrupt is pending in the virtual IRR (perhaps blocked by RFLAGS.IF)."""
        return self.enabled and self.backing().pending() is not None

    def deliver_pending(self) -> bool:
        """Deliver the highest pending vector if the guest can take it now
        (IRR -> ISR, PPR updated, vectored through the guest IDT).  True if delivered."""
        vec = self.deliverable(self._st.reg_read(_RFLAGS))
        if vec is None:
            return False
        bp = self.backing()
        bp.set_bit(Reg.IRR, vec, False)
        bp.set_bit(Reg.ISR, vec)
        bp.update_ppr()
        self.stats.delivered += 1
        rip = self._st.reg_read(_RIP)
        self._deliver(vec, None, software=False, rip_after=rip, fault_rip=rip, external=True)
        return True

    def doorbell(self, host_apic_id: int) -> None:
        """A doorbell signal (the AVIC_DOORBELL MSR written on some processor):
        addressed to this processor, it makes the running guest's virtual IRR
        be evaluated at the next instruction boundary; to another, it is sent."""
        if host_apic_id != self.host_apic_id:
            self.stats.doorbells_sent.append(host_apic_id)
            return
        self.stats.doorbells_received += 1
        self.doorbell_pending = True

    # ------------------------------------------------------- register access
    def guest_access(self, rip: int, gpa: int) -> None:
        """The instruction at ``rip`` touched the APIC page at ``gpa``: complete
        it (accelerated) or exit as §15.29.3 says."""
        off = gpa & 0xFFF
        try:
            form = decode_form(self._insn_bytes(rip), code_size(self._st.hflags))
        except MmioDecodeError:
            self._exit(AvicExit(ExitCode.AVIC_NOACCEL, noaccel_info1(off, False), 0, trap=False), rip, rip)
            return
        write = form.is_write
        reg = off & NOACCEL_OFFSET_MASK
        how = classify(reg, write) if (off & 0xF) == 0 and form.size == 4 else Handling.FAULT
        nxt = rip + form.length
        if how is Handling.FAULT:
            self._exit(AvicExit(ExitCode.AVIC_NOACCEL, noaccel_info1(reg, write), 0, trap=False), rip, nxt)
            return
        bp = self.backing()
        st = self._st
        if not write:
            name = form.dst_reg[0]
            st.reg_write(_UC_REG[name], load_result(form, bp[reg], st.reg_read(_UC_REG[name])))
            st.reg_write(_RIP, nxt)
            self.stats.reads += 1
            return
        value = store_value(form, st.reg_read(_UC_REG[form.src_reg[0]]) if form.src_reg else 0)
        if how is Handling.TRAP:
            bp[reg] = value
            self._exit(AvicExit(ExitCode.AVIC_NOACCEL, noaccel_info1(reg, True), 0, trap=True), rip, nxt)
            return
        self.stats.writes += 1
        ex = self.write_accelerated(bp, reg, value)
        st.reg_write(_RIP, nxt)
        if ex is not None:
            self._exit(ex, rip, nxt)
            return
        self.deliver_pending()

    def write_accelerated(self, bp: BackingPage, reg: int, value: int) -> AvicExit | None:
        """An accelerated write (TPR, EOI, ICR): its effect on the backing page
        (and the IPI's targets); an exit when it is not complete."""
        if reg == Reg.TPR:
            bp[Reg.TPR] = value & 0xFF
            bp.update_ppr()
        elif reg == Reg.EOI:
            return self._eoi(bp)
        elif reg == Reg.ICR_HI:
            bp[Reg.ICR_HI] = value & 0xFF00_0000
        elif reg == Reg.ICR_LO:
            bp[Reg.ICR_LO] = value & ~(1 << 12)          # delivery status: idle
            return self.send_ipi(bp, value, bp[Reg.ICR_HI])
        return None

    def _exit(self, ex: AvicExit, rip: int, nxt: int) -> None:
        at = nxt if ex.trap else rip
        self._st.reg_write(_RIP, at)
        self._vmexit(ex.code, ex.info1, ex.info2, rip=at, nrip=0)
        self._after_exit(at)

    def _eoi(self, bp: BackingPage) -> AvicExit | None:
        """EOI (§15.29.3.1): the highest in-service vector is done; a
        level-triggered one (TMR set) traps, for the hypervisor's I/O APIC."""
        vec = highest(bp.vector(Reg.ISR))
        if vec < 0:
            return None
        if bp.vector(Reg.TMR) >> vec & 1:
            return AvicExit(ExitCode.AVIC_NOACCEL, noaccel_info1(Reg.EOI, True), vec, trap=True)
        bp.set_bit(Reg.ISR, vec, False)
        bp.update_ppr()
        self.stats.eois += 1
        return None

    # ------------------------------------------------------------------ IPIs
    def _table(self, off: int) -> tuple[int, int]:
        v = self._q(off)
        return v & AVIC_ADDR_MASK, v & AVIC_PHYSICAL_MAX_INDEX_MASK

    def physical(self, index: int) -> int:
        base, _ = self._table(OFF_AVIC_PHYSICAL_TABLE)
        return _Q.unpack_from(self._view, base + 8 * index)[0]

    def logical(self, index: int) -> int:
        base, _ = self._table(OFF_AVIC_LOGICAL_TABLE)
        return _I.unpack_from(self._view, base + 4 * index)[0]

    def send_ipi(self, bp: BackingPage, lo: int, hi: int) -> AvicExit | None:
        """An ICR write (§15.29.4): deliver a fixed, edge-triggered IPI to its
        targets' backing pages, doorbells to running ones on other processors."""
        def incomplete(cause: IpiFailure, index: int = 0) -> AvicExit:
            i1, i2 = incomplete_ipi_info(lo, hi, cause, index)
            return AvicExit(ExitCode.AVIC_INCOMPLETE_IPI, i1, i2, trap=True)
        vector, shorthand = lo & 0xFF, (lo >> 18) & 3
        if (lo >> 8) & 7 != DM_FIXED or lo & ICR_LEVEL:
            return incomplete(IpiFailure.INVALID_INT_TYPE)
        if vector < 16:
            return incomplete(IpiFailure.INVALID_VECTOR)
        self.stats.ipis += 1
        own = bp[Reg.ID] >> 24
        if shorthand == SH_SELF:
            bp.set_bit(Reg.IRR, vector)
            return None
        _, max_index = self._table(OFF_AVIC_PHYSICAL_TABLE)
        if shorthand in (SH_ALL, SH_OTHERS):
            ids = [i for i in range(max_index + 1) if self.physical(i) & PHYS_VALID
                   and (shorthand == SH_ALL or i != own)]
        else:
            dest = hi >> 24
            ids, fail = self._destinations(bp, dest, bool(lo & ICR_DEST_LOGICAL), max_index)
            if fail is not None:
                return incomplete(*fail)
        not_running = None
        for i in ids:
            e = self.physical(i)
            if not e & PHYS_VALID:
                return incomplete(IpiFailure.INVALID_BACKING_PAGE, i)
            BackingPage(self._view, e & AVIC_ADDR_MASK).set_bit(Reg.IRR, vector)
            if i == own:
                continue                                  # evaluated after the write
            if e & PHYS_IS_RUNNING:
                self.doorbell(e & PHYS_HOST_ID_MASK)
            elif not_running is None:
                not_running = i
        if not_running is not None:
            return incomplete(IpiFailure.TARGET_NOT_RUNNING, not_running)
        return None

    def _destinations(self, bp: BackingPage, dest: int, logical: bool,
                      max_index: int) -> tuple[list[int], tuple[IpiFailure, int] | None]:
        """Physical APIC IDs named by an xAPIC destination (SDM §11.6.2)."""
        if not logical:
            if dest == 0xFF:
                return [i for i in range(max_index + 1) if self.physical(i) & PHYS_VALID], None
            if dest > max_index:
                return [], (IpiFailure.INVALID_TARGET, dest)
            return [dest], None
        flat = (bp[Reg.DFR] >> 28) == 0xF
        idx = ([b for b in range(8) if dest >> b & 1] if flat
               else [(dest >> 4) * 4 + b for b in range(4) if dest >> b & 1])
        ids = []
        for i in idx:
            e = self.logical(i)
            if not e & LOG_VALID:
                return [], (IpiFailure.INVALID_TARGET, i)
            ids.append(e & LOG_GUEST_ID_MASK)
        return ids, None
