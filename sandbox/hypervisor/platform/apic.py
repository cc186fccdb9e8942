"""The local APIC of the one virtual CPU: xAPIC (MMIO at 0xFEE00000) and
x2APIC (MSRs 0x800-0x8FF), switched by IA32_APIC_BASE (MSR 0x1B).

References: Intel SDM vol. 3A ch. 11 "Advanced Programmable Interrupt
Controller (APIC)" (§11.4.4 IA32_APIC_BASE, §11.4.8 version register, §11.5
LVT and timer, §11.6 ICR, §11.8 IRR/ISR/TMR, TPR/PPR and EOI, §11.9 spurious
vector, §11.12 x2APIC: MSR map, state transitions, self-IPI); AMD APM vol. 2
ch. 16 "Advanced Programmable Interrupt Controller".

The device is plain state; the platform (:mod:`.pc`) turns a pending vector
into an injected interrupt and calls :meth:`LocalApic.timer_fired` when the
guest-time deadline of :attr:`LocalApic.deadline_ns` passes.  The timer
counts guest time (``now_ns``) at a 1 GHz APIC bus clock (as KVM's), divided
by the divide configuration register; the TSC-deadline mode compares with
the guest TSC (``tsc``), converted at ``tsc_hz``.
"""
from __future__ import annotations

from typing import Callable

from ..devices import MsrFault

MSR_APIC_BASE = 0x1B
MSR_TSC_DEADLINE = 0x6E0
X2APIC_MSR_BASE = 0x800
X2APIC_MSR_END = 0x8FF
XAPIC_BASE = 0xFEE00000

BASE_BSP = 1 << 8
BASE_EXTD = 1 << 10
BASE_EN = 1 << 11
MAXPHYADDR = 48
#: bits of IA32_APIC_BASE that must be zero: 7:0, 9, and MAXPHYADDR and up (SDM §11.4.4)
BASE_RESERVED = 0xFF | (1 << 9) | ~((1 << MAXPHYADDR) - 1) & ((1 << 64) - 1)

# register offsets (SDM Table 11-1)
ID, LVR, TPR, APR, PPR, EOI, RRD, LDR, DFR, SVR = 0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0
ISR, TMR, IRR, ESR = 0x100, 0x180, 0x200, 0x280
LVT_CMCI, ICR, ICR2 = 0x2F0, 0x300, 0x310
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = 0x320, 0x330, 0x340, 0x350, 0x360, 0x370
TMICT, TMCCT, TDCR, SELF_IPI = 0x380, 0x390, 0x3E0, 0x3F0

#: version register: version 0x14 (integrated APIC), 6 LVT entries -> "max LVT" 5 (SDM §11.4.8)
VERSION = 0x14 | (5 << 16)
LVT_MASKED = 1 << 16
SVR_ENABLE = 1 << 8
TIMER_ONESHOT, TIMER_PERIODIC, TIMER_TSC_DEADLINE = 0, 1, 2
BUS_HZ = 1_000_000_000

# ICR fields (SDM §11.6.1)
DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_STARTUP = 0, 1, 2, 4, 5, 6
SH_NONE, SH_SELF, SH_ALL, SH_OTHERS = 0, 1, 2, 3
ICR_DEST_LOGICAL = 1 << 11
ICR_WRITABLE = 0x000CCFFF            # vector, delivery mode, dest mode, level, trigger, shorthand
ESR_SEND_ILLEGAL, ESR_RECV_ILLEGAL = 1 << 5, 1 << 6

#: writable bits of each LVT entry (SDM Figure 11-8); six entries, no CMCI (max LVT 5, as AMD's)
LVT_BITS = {LVT_TIMER: 0x700FF, LVT_THERMAL: 0x107FF, LVT_PERF: 0x107FF,
            LVT_LINT0: 0x1A7FF, LVT_LINT1: 0x1A7FF, LVT_ERROR: 0x100FF}

#: x2APIC MSR semantics (SDM §11.12.1.2, Table 11-6): readable / writable register offsets
X2_READ = {ID, LVR, TPR, PPR, LDR, SVR, ESR, ICR, *LVT_BITS, TMICT, TMCCT, TDCR,
           *range(ISR, ISR + 0x80, 0x10), *range(TMR, TMR + 0x80, 0x10), *range(IRR, IRR + 0x80, 0x10)}
X2_WRITE = {TPR, SVR, ESR, ICR, *LVT_BITS, TMICT, TDCR, EOI, SELF_IPI}


class LocalApic:
    """One local APIC (the bootstrap processor's)."""

    def __init__(self, apic_id: int = 0, now_ns: Callable[[], int] = lambda: 0,
                 tsc: Callable[[], int] = lambda: 0, tsc_hz: int = 2_500_000_000,
                 on_timer_change: Callable[[], None] | None = None) -> None:
        self.apic_id = apic_id
        self.now_ns, self.tsc, self.tsc_hz = now_ns, tsc, tsc_hz
        #: called when :attr:`deadline_ns` changes (the platform re-arms its timer)
        self.on_timer_change = on_timer_change
        self.base = XAPIC_BASE | BASE_BSP | BASE_EN
        self.nmi_pending = False
        #: an SMI sent through the ICR (delivery mode 010b) that the processor has not taken
        self.smi_pending = False
        self.deadline_ns: int | None = None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """The register state after power-up or a disable (SDM §11.4.7.1)."""
        self.id_reg = self.apic_id << 24
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFFFFFF
        self.svr = 0xFF
        self.irr = self.isr = self.tmr = 0       # 256-bit vectors as ints
        self.esr = self.esr_pending = 0
        self.icr = 0
        self.icr2 = 0
        self.lvt = {r: LVT_MASKED for r in LVT_BITS}
        self.tmict = 0
        self.tdcr = 0
        self.tsc_deadline = 0
        self._period_start = 0
        if self.deadline_ns is not None:
            self.deadline_ns = None                # next timer expiry in guest time
            self._changed()

    @property
    def mode(self) -> str:
        if not self.base & BASE_EN:
            return "disabled"
        return "x2apic" if self.base & BASE_EXTD else "xapic"

    @property
    def software_enabled(self) -> bool:
        return self.mode != "disabled" and bool(self.svr & SVR_ENABLE)

    # -------------------------------------------------------------- priority
    @staticmethod
    def _highest(bits: int) -> int:
        return bits.bit_length() - 1              # -1 when empty

    @property
    def ppr(self) -> int:
        """Processor priority (SDM §11.8.3.1): the TPR, or the in-service class if higher."""
        isrv = max(self._highest(self.isr), 0)
        return self.tpr & 0xFF if (self.tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0

    def pending_vector(self) -> int | None:
        """The vector the APIC would present to the processor now: the highest
        IRR bit whose priority class is above the PPR's (SDM §11.8.3.1)."""
        if not self.irr or not self.software_enabled:
            return None
        v = self._highest(self.irr)
        return v if (v & 0xF0) > (self.ppr & 0xF0) else None

    def accept(self, vector: int) -> None:
        """The processor took ``vector``: IRR -> ISR (SDM §11.8.4)."""
        self.irr &= ~(1 << vector)
        self.isr |= 1 << vector

    def set_irr(self, vector: int, level: bool = False) -> None:
        """An interrupt arrives (fixed delivery).  Vectors 0-15 are illegal
        (receive illegal vector error, SDM §11.5.3)."""
        if vector < 16:
            self.esr_pending |= ESR_RECV_ILLEGAL
            return
        if self.mode == "disabled":
            return
        self.irr |= 1 << vector
        if level:
            self.tmr |= 1 << vector
        else:
            self.tmr &= ~(1 << vector)

    def eoi(self) -> None:
        v = self._highest(self.isr)
        if v >= 0:
            self.isr &= ~(1 << v)

    # ------------------------------------------------------------------- IPIs
    def _send_ipi(self, low: int, dest: int) -> None:
        """ICR write (SDM §11.6.1): with one CPU, an IPI reaches this APIC when
        the shorthand is self or all-including-self, or the destination names it."""
        vector, dm = low & 0xFF, (low >> 8) & 7
        shorthand = (low >> 18) & 3
        if shorthand == SH_OTHERS:
            return
        if shorthand == SH_NONE and not self._is_dest(dest, bool(low & ICR_DEST_LOGICAL)):
            return
        if dm in (DM_FIXED, DM_LOWEST):
            if vector < 16:
                self.esr_pending |= ESR_SEND_ILLEGAL | ESR_RECV_ILLEGAL
                return
            self.set_irr(vector, level=bool(low & (1 << 15)))
        elif dm == DM_NMI:
            self.nmi_pending = True
        elif dm == DM_SMI:
            self.smi_pending = True
        # INIT and STARTUP address other processors (none here)

    def _is_dest(self, dest: int, logical: bool) -> bool:
        x2 = self.mode == "x2apic"
        if dest == (0xFFFFFFFF if x2 else 0xFF):
            return True
        if not logical:
            return dest == self.apic_id
        if x2:                                    # cluster model (SDM §11.12.10.2)
            ldr = self._x2_ldr()
            return (dest >> 16) == (ldr >> 16) and bool(dest & ldr & 0xFFFF)
        if (self.dfr >> 28) == 0xF:               # flat model
            return bool((dest & 0xFF) & (self.ldr >> 24))
        return (dest >> 4) == (self.ldr >> 28) and bool(dest & (self.ldr >> 24) & 0xF)

    def _x2_ldr(self) -> int:
        return ((self.apic_id >> 4) << 16) | (1 << (self.apic_id & 0xF))

    # ------------------------------------------------------------------ timer
    def _timer_mode(self) -> int:
        return (self.lvt[LVT_TIMER] >> 17) & 3

    def _divisor(self) -> int:
        v = (self.tdcr & 3) | ((self.tdcr >> 1) & 4)
        return 1 if v == 7 else 2 << v

    def _period_ns(self) -> int:
        return self.tmict * self._divisor() * 1_000_000_000 // BUS_HZ

    def _changed(self) -> None:
        if self.on_timer_change is not None:
            self.on_timer_change()

    def _start_count(self) -> None:
        self._period_start = self.now_ns()
        self.deadline_ns = self._period_start + self._period_ns() if self.tmict else None
        self._changed()

    def _arm_tsc_deadline(self) -> None:
        if not self.tsc_deadline or self._timer_mode() != TIMER_TSC_DEADLINE:
            self.deadline_ns = None
        else:
            delta = self.tsc_deadline - self.tsc()
            self.deadline_ns = self.now_ns() + max(0, delta) * 1_000_000_000 // self.tsc_hz
        self._changed()

    def current_count(self) -> int:
        """TMCCT (SDM §11.5.4): counts down from TMICT; 0 once a one-shot count ends."""
        if not self.tmict or self.deadline_ns is None or self._timer_mode() == TIMER_TSC_DEADLINE:
            return 0
        left = max(0, self.deadline_ns - self.now_ns())
        return min(self.tmict, left * BUS_HZ // 1_000_000_000 // self._divisor())

    def timer_fired(self) -> None:
        """The platform saw guest time reach :attr:`deadline_ns`."""
        if self.deadline_ns is None:
            return
        lvt = self.lvt[LVT_TIMER]
        mode = self._timer_mode()
        if mode == TIMER_PERIODIC and self.tmict:
            period = max(1, self._period_ns())
            now = self.now_ns()
            while self.deadline_ns <= now:
                self.deadline_ns += period
        else:
            self.deadline_ns = None
            if mode == TIMER_TSC_DEADLINE:
                self.tsc_deadline = 0         # the MSR reads 0 once it fired (SDM §11.5.4.1)
        self._changed()
        if not lvt & LVT_MASKED and self.software_enabled:
            self.set_irr(lvt & 0xFF)

    # -------------------------------------------------------------- registers
    def read_reg(self, off: int) -> int:
        x2 = self.mode == "x2apic"
        if off == ID:
            return self.apic_id if x2 else self.id_reg
        if off == LVR:
            return VERSION
        if off == TPR:
            return self.tpr
        if off == APR:
            return 0
        if off == PPR:
            return self.ppr
        if off == LDR:
            return self._x2_ldr() if x2 else self.ldr
        if off == DFR:
            return self.dfr
        if off == SVR:
            return self.svr
        if ISR <= off < ISR + 0x80:
            return (self.isr >> (8 * (off - ISR) // 4)) & 0xFFFFFFFF
        if TMR <= off < TMR + 0x80:
            return (self.tmr >> (8 * (off - TMR) // 4)) & 0xFFFFFFFF
        if IRR <= off < IRR + 0x80:
            return (self.irr >> (8 * (off - IRR) // 4)) & 0xFFFFFFFF
        if off == ESR:
            return self.esr
        if off == ICR:
            return self.icr
        if off == ICR2:
            return self.icr2
        if off in self.lvt:
            return self.lvt[off]
        if off == TMICT:
            return self.tmict
        if off == TMCCT:
            return self.current_count()
        if off == TDCR:
            return self.tdcr
        return 0

    def write_reg(self, off: int, value: int) -> None:
        value &= 0xFFFFFFFF
        x2 = self.mode == "x2apic"
        if off == ID and not x2:
            self.id_reg = value & 0xFF000000
        elif off == TPR:
            self.tpr = value & 0xFF
        elif off == EOI:
            self.eoi()
        elif off == LDR and not x2:
            self.ldr = value & 0xFF000000
        elif off == DFR and not x2:
            self.dfr = value | 0x0FFFFFFF
        elif off == SVR:
            self.svr = value & 0x3FF
            if not value & SVR_ENABLE:        # software disable masks every LVT (SDM §11.4.7.2)
                for r in self.lvt:
                    self.lvt[r] |= LVT_MASKED
        elif off == ESR:
            self.esr, self.esr_pending = self.esr_pending, 0     # a write latches the errors (§11.5.3)
        elif off == ICR:
            self.icr = value & ICR_WRITABLE
            self._send_ipi(self.icr, self.icr2 >> 24)
        elif off == ICR2 and not x2:
            self.icr2 = value & 0xFF000000
        elif off in self.lvt:
            v = value & LVT_BITS[off]
            if not self.svr & SVR_ENABLE:
                v |= LVT_MASKED
            if off == LVT_TIMER:
                old_mode = self._timer_mode()
                self.lvt[off] = v
                if self._timer_mode() != old_mode:     # a mode change disarms the timer
                    self.tmict, self.tsc_deadline, self.deadline_ns = 0, 0, None
                    self._changed()
            else:
                self.lvt[off] = v
        elif off == TMICT:
            if self._timer_mode() != TIMER_TSC_DEADLINE:      # ignored in TSC-deadline mode
                self.tmict = value
                self._start_count()
        elif off == TDCR:
            self.tdcr = value & 0xB
        elif off == SELF_IPI and x2:
            self.set_irr(value & 0xFF)

    # ------------------------------------------------------------------- MMIO
    def mmio_read(self, offset: int, size: int) -> int:
        if self.mode != "xapic":
            return (1 << (8 * size)) - 1         # the window is closed in x2APIC mode or when disabled
        reg, byte = offset & 0xFF0, offset & 0xF
        if byte > 3:
            return 0
        return (self.read_reg(reg) >> (8 * byte)) & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if self.mode != "xapic" or offset & 0xF:
            return                                # registers are written as aligned dwords
        self.write_reg(offset & 0xFF0, value)

    # -------------------------------------------------------------------- MSRs
    def owns_msr(self, msr: int) -> bool:
        return msr == MSR_APIC_BASE or msr == MSR_TSC_DEADLINE or X2APIC_MSR_BASE <= msr <= X2APIC_MSR_END

    def rdmsr(self, msr: int) -> int:
        if msr == MSR_APIC_BASE:
            return self.base
        if msr == MSR_TSC_DEADLINE:
            return self.tsc_deadline if self._timer_mode() == TIMER_TSC_DEADLINE else 0
        off = (msr - X2APIC_MSR_BASE) << 4
        if self.mode != "x2apic" or off not in X2_READ:
            raise MsrFault(f"RDMSR {msr:#x}")
        if off == ICR:
            return self.icr | (self.icr2 << 32)
        return self.read_reg(off)

    def wrmsr(self, msr: int, value: int) -> None:
        if msr == MSR_APIC_BASE:
            self._write_base(value)
            return
        if msr == MSR_TSC_DEADLINE:
            if self._timer_mode() == TIMER_TSC_DEADLINE:
                self.tsc_deadline = value
                self._arm_tsc_deadline()
            return
        off = (msr - X2APIC_MSR_BASE) << 4
        if self.mode != "x2apic" or off not in X2_WRITE:
            raise MsrFault(f"WRMSR {msr:#x}")
        if off != ICR and value >> 32:
            raise MsrFault("x2APIC register bits 63:32 are reserved")
        if off == SELF_IPI and value & ~0xFF:
            raise MsrFault("x2APIC self-IPI bits 31:8 are reserved")
        if off == EOI and value:
            raise MsrFault("x2APIC EOI takes 0")
        if off == ICR:
            self.icr2 = value >> 32
            self.icr = value & ICR_WRITABLE
            self._send_ipi(self.icr, self.icr2)
            return
        self.write_reg(off, value)

    def _write_base(self, value: int) -> None:
        """IA32_APIC_BASE with the x2APIC state transitions (SDM §11.12.5.1):
        EXTD without EN is invalid, x2APIC -> xAPIC and disabled -> x2APIC are #GP."""
        if value & BASE_RESERVED or value & BASE_EXTD and not value & BASE_EN:
            raise MsrFault("invalid IA32_APIC_BASE")
        old = self.mode
        new = "disabled" if not value & BASE_EN else ("x2apic" if value & BASE_EXTD else "xapic")
        if (old, new) in (("x2apic", "xapic"), ("disabled", "x2apic")):
            raise MsrFault(f"APIC mode {old} -> {new}")
        self.base = (value & ~BASE_BSP) | (self.base & BASE_BSP)
        if new == "disabled" and old != "disabled":
            self.reset()
