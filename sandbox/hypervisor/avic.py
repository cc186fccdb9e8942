"""The hypervisor's side of AVIC (APM vol. 2 §15.29): the backing page, the
APIC ID tables, the VMCB fields, posting device interrupts with a doorbell,
and the two AVIC exits.

``enable_avic(m)`` (after ``m.load``, on ``Machine(platform="pc")``) gives
the guest's local APIC to the processor's AVIC (:mod:`sandbox.svm.avic`),
the way KVM's ``avic.c`` does:

* a **backing page** initialised from the platform's APIC model
  (:class:`~sandbox.hypervisor.platform.apic.LocalApic`), a **physical APIC ID
  table** whose entry for the guest's APIC ID points at it (valid, IsRunning:
  the vCPU is loaded on host processor :data:`HOST_APIC_ID`), an empty
  **logical APIC ID table** the hypervisor fills when the guest writes LDR;
* VMCB: AVIC_APIC_BAR = the xAPIC base, the three pointers,
  AVIC_PHYSICAL_MAX_INDEX, and AVIC_ENABLE in V_INTR.  The APIC page stays
  out of the nested page table (the processor redirects its accesses);
* **AVIC_NOACCEL**: a trapped write (SVR, LVT, the timer, LDR ...) is
  replayed into the APIC model, so its timer and modes work as before; a
  faulting access (the current count, a read-only register, an unaligned or
  non-MOV access) is emulated and the instruction skipped;
* **AVIC_INCOMPLETE_IPI**: an IPI AVIC does not deliver (NMI, INIT, a
  level-triggered one) is sent by the APIC model; a target not running would
  be woken (there is one vCPU: counted);
* interrupts the APIC model raises (its timer, an emulated IPI) move into
  the backing page's IRR before every VMRUN, where the processor delivers
  them -- the platform's EVENTINJ path is not used.

:meth:`AvicApic.post` is how a device running on another host processor
raises an interrupt: the vector into the IRR, and a doorbell to the host
processor the vCPU runs on when IsRunning is set.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..svm.avic import (NOACCEL_OFFSET_MASK, NOACCEL_WRITE, PHYS_HOST_ID_MASK, PHYS_IS_RUNNING, BackingPage, Handling,
                        IpiFailure, Reg, classify, logical_entry, physical_entry)
from ..svm.exitcodes import ExitCode
from ..svm.stop import StopReason
from ..svm.vmcb import VIntr
from .handlers import RESUME
from .mmio import MmioDecodeError, complete, decode_access, decode_form
from .platform.apic import XAPIC_BASE

if TYPE_CHECKING:
    from ..svm.cpu import ExitRecord
    from .handlers import Action
    from .machine import Machine
    from .platform.apic import LocalApic

#: the host physical APIC ID of the processor the vCPU runs on
HOST_APIC_ID = 0
_Q = struct.Struct("<Q")
_I = struct.Struct("<I")
#: registers copied from the APIC model into a fresh backing page
_INITIAL = (Reg.ID, Reg.VERSION, Reg.TPR, Reg.LDR, Reg.DFR, Reg.SVR, Reg.ESR, Reg.LVT_TIMER, Reg.LVT_THERMAL,
            Reg.LVT_PERF, Reg.LVT_LINT0, Reg.LVT_LINT1, Reg.LVT_ERROR, Reg.TMICT, Reg.TDCR)


class AvicApic:
    """One vCPU's AVIC state in host memory, and the handlers of its exits."""

    def __init__(self, m: "Machine", apic: "LocalApic") -> None:
        self.m, self.apic = m, apic
        mem = m.mem
        self.backing_hpa = mem.alloc_page()
        self.physical_hpa = mem.alloc_page()
        self.logical_hpa = mem.alloc_page()
        self.page = BackingPage(mem.view, self.backing_hpa)
        for off in _INITIAL:
            self.page[off] = apic.read_reg(off)
        self.page.update_ppr()
        self.apic_id = apic.apic_id
        self._set_physical(running=True)
        v = m.guest.vmcb
        v.AVIC_APIC_BAR = XAPIC_BASE
        v.AVIC_BACKING_PAGE = self.backing_hpa
        v.AVIC_LOGICAL_TABLE = self.logical_hpa
        v.AVIC_PHYSICAL_TABLE = self.physical_hpa | self.apic_id       # AVIC_PHYSICAL_MAX_INDEX
        v.V_INTR = v.V_INTR | VIntr.AVIC_ENABLE
        m.handlers[ExitCode.AVIC_NOACCEL] = self.handle_noaccel
        m.handlers[ExitCode.AVIC_INCOMPLETE_IPI] = self.handle_incomplete_ipi
        m.resume_hooks.insert(0, self.before_vmrun)        # before the platform's EVENTINJ path
        self.stats = {"posted": 0, "doorbells": 0, "noaccel_trap": 0, "noaccel_fault": 0, "incomplete_ipi": 0,
                      "wakeups": 0}

    # ------------------------------------------------------------- tables
    def _set_physical(self, running: bool) -> None:
        _Q.pack_into(self.m.mem.view, self.physical_hpa + 8 * self.apic_id,
                     physical_entry(HOST_APIC_ID, self.backing_hpa, running=running))

    def _set_logical(self, ldr: int) -> None:
        """LDR written: the logical table maps the guest's logical ID to its APIC ID
        (flat model: one entry per set bit; cluster model: cluster x 4 + bit)."""
        view = self.m.mem.view
        view[self.logical_hpa:self.logical_hpa + 4096] = bytes(4096)
        dest = ldr >> 24
        flat = (self.page[Reg.DFR] >> 28) == 0xF
        idx = ([b for b in range(8) if dest >> b & 1] if flat
               else [(dest >> 4) * 4 + b for b in range(4) if dest >> b & 1])
        for i in idx:
            _I.pack_into(view, self.logical_hpa + 4 * i, logical_entry(self.apic_id))

    # ------------------------------------------------------------ posting
    def post(self, vector: int) -> None:
        """A device raises ``vector`` from another host processor: set it in the
        IRR, and ring the doorbell of the processor the vCPU runs on (IsRunning);
        a vCPU not running sees it at its next VMRUN."""
        self.page.set_bit(Reg.IRR, vector)
        self.stats["posted"] += 1
        e = _Q.unpack_from(self.m.mem.view, self.physical_hpa + 8 * self.apic_id)[0]
        if e & PHYS_IS_RUNNING:
            self.stats["doorbells"] += 1
            self.m.cpu.avic_doorbell(e & PHYS_HOST_ID_MASK)

    def before_vmrun(self, m: "Machine", e: "ExitRecord") -> "Action | None":
        """Interrupts the APIC model raised (its timer, an emulated IPI) go to the IRR."""
        apic = self.apic
        if apic.irr:
            irr = apic.irr
            apic.irr = 0
            for vec in range(256):
                if irr >> vec & 1:
                    self.page.set_bit(Reg.IRR, vec)
        return None

    # ------------------------------------------------------------- exits
    def handle_noaccel(self, m: "Machine", e: "ExitRecord") -> "Action":
        """AVIC_NOACCEL.  Trap or fault is told by the register, as the APM's
        table (and KVM) do: a trapped write (done, RIP past it) is replayed into
        the APIC model; a faulting access is emulated here and skipped."""
        off = e.exitinfo1 & NOACCEL_OFFSET_MASK
        if e.exitinfo1 & NOACCEL_WRITE and (off == Reg.EOI or classify(off, True) is Handling.TRAP):
            self.stats["noaccel_trap"] += 1
            self._trap_write(off, e.exitinfo2)
            return RESUME
        self.stats["noaccel_fault"] += 1
        code = m.read_virt(e.rip, 15)
        try:
            acc = decode_access(code, XAPIC_BASE | off, m.regs, decode_form(code, m.cpu.guest_code_size()))
        except MmioDecodeError as err:
            return m.stop(StopReason.MMIO_ERROR, f"AVIC_NOACCEL at RIP {e.rip:#x}: {err}")
        if not acc.is_write:
            complete(acc, self._read(off, acc.size), m.regs)
        # a write that faults is to a read-only or reserved register, or not an aligned
        # doubleword (undefined on the xAPIC, SDM §11.4.1): dropped
        m.advance(e, e.rip + acc.form.length)
        return RESUME

    def _read(self, off: int, size: int) -> int:
        if off in (Reg.TMCCT, Reg.APR):
            return self.apic.read_reg(off) & ((1 << (8 * size)) - 1)
        return self.page[off] & ((1 << (8 * size)) - 1)

    def _trap_write(self, off: int, info2: int) -> None:
        page = self.page
        if off == Reg.EOI:                    # a level-triggered EOI: EXITINFO2 = the vector
            page.set_bit(Reg.ISR, info2 & 0xFF, False)
            page.update_ppr()
            return
        value = page[off]
        if off == Reg.LDR:
            self._set_logical(value)
        self.apic.write_reg(off, value)
        for r in (Reg.SVR, *range(Reg.LVT_TIMER, Reg.LVT_ERROR + 1, 0x10), Reg.ESR, Reg.LDR, Reg.DFR, Reg.ID):
            page[r] = self.apic.read_reg(r)   # what the APIC model made of it (masks, latched errors)

    def handle_incomplete_ipi(self, m: "Machine", e: "ExitRecord") -> "Action":
        """AVIC_INCOMPLETE_IPI (a trap: the ICR holds the value, RIP is past the write)."""
        self.stats["incomplete_ipi"] += 1
        cause = e.exitinfo2 >> 32
        lo, hi = e.exitinfo1 & 0xFFFF_FFFF, e.exitinfo1 >> 32
        if cause == IpiFailure.INVALID_INT_TYPE:
            self.apic.write_reg(0x310, hi)             # the APIC model sends it (NMI, INIT, level ...)
            self.apic.write_reg(0x300, lo)
        elif cause == IpiFailure.TARGET_NOT_RUNNING:
            self.stats["wakeups"] += 1                 # the target's IRR is set: it would be woken
        return RESUME


def enable_avic(m: "Machine") -> AvicApic:
    """Hand the guest's local APIC to the processor's AVIC (needs the PC platform)."""
    platform = getattr(m, "platform", None)
    apic = getattr(platform, "apic", None)
    if apic is None:
        raise ValueError("AVIC needs the PC platform's local APIC (Machine(platform='pc'))")
    return AvicApic(m, apic)
