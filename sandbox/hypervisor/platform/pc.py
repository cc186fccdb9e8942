"""The small PC a kvm-unit-tests guest expects, on the hypervisor's DeviceBus.

* COM1 at 0x3F8 (the machine's serial console);
* ``isa-debug-exit`` at 0xF4 (:mod:`.debug_exit`): a write ends the run;
* QEMU's ``fw_cfg`` at 0x510/0x511 (:mod:`.fw_cfg`): signature, RAM size, CPU
  count, the command line;
* the 8259 pair at 0x20/0x21 and 0xA0/0xA1, masked (:mod:`.pic`);
* ACPI RSDP/RSDT/FADT at 0xF0000 and the ACPI PM timer at 0x608 (:mod:`.acpi`);
* the local APIC (:mod:`.apic`): xAPIC registers in the MMIO window at
  0xFEE00000 (trap-and-emulate: VMEXIT_NPF), x2APIC registers, IA32_APIC_BASE
  and IA32_TSC_DEADLINE as intercepted MSRs, MOV CR8 (the TPR) intercepted;
  its timer on the processor's guest-time timer (#VMEXIT(INTR));
* KVM's hypercall ABI for VMMCALL (unknown numbers return -KVM_ENOSYS);
* every MSR intercepted, served as :mod:`.msrs` says (#GP for unknown ones);
  the machine-check banks.

**Interrupts reach the guest through the VMCB**, as KVM's SVM code does
(svm_inject_irq / svm_enable_irq_window): after every exit the hypervisor
looks at the APIC (:meth:`PcPlatform.after_exit`, a resume hook).  A pending
vector the guest can take now (RFLAGS.IF = 1, no interrupt shadow) is moved
from IRR to ISR and injected with EVENTINJ (TYPE 0, external interrupt);
otherwise the hypervisor asks for an interrupt window: V_IRQ = 1 with
V_IGN_TPR and the VINTR intercept (APM §15.21.4), so the processor exits
with VMEXIT_VINTR as soon as the guest can take an interrupt, and the vector
is injected then.  An NMI (ICR delivery mode NMI) is injected with EVENTINJ
TYPE 2; further NMIs are held until the handler's IRET, which is
intercepted while an NMI is in service (APM §15.21.3: the processor does not
track NMI blocking for the hypervisor).  HLT with IF = 1 and nothing pending
lets guest time jump to the APIC timer's deadline, as an idle CPU would.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ...svm.exitcodes import ExitCode
from ...svm.stop import StopReason
from ...svm.vmcb import Event, EventType, VIntr
from . import acpi
from .apic import XAPIC_BASE, LocalApic
from .debug_exit import IsaDebugExit
from .fw_cfg import FwCfg
from ..msr_table import CANONICAL_MSRS, NATIVE_MSRS
from .msrs import MSR_TSC, MachineCheckBanks
from .pic import LegacyPic
from ...svm.cpu import TSC_HZ
from ..devices import MmioMode
from ..handlers import KVM_ENOSYS, RESUME

if TYPE_CHECKING:
    from ..handlers import Action
    from ..machine import Machine

RFLAGS_IF = 1 << 9
#: CPUID Fn0000_0001 ECX bits the platform adds: x2APIC (21), TSC-deadline timer (24)
CPUID1_ECX_X2APIC = 1 << 21
CPUID1_ECX_TSC_DEADLINE = 1 << 24
#: CPUID Fn0000_0007_ECX[2]: UMIP (CR4.UMIP makes SGDT/SIDT/SLDT/STR/SMSW #GP at CPL > 0)
CPUID7_ECX_UMIP = 1 << 2
KVM_HC_VAPIC_POLL_IRQ = 1
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class PcPlatform:
    """The PC devices and the interrupt plumbing of one :class:`Machine`."""

    name = "pc"

    def __init__(self, m: "Machine") -> None:
        self.m = m
        self.debug_exit = IsaDebugExit()
        self.fw_cfg = FwCfg(m.guest.ram_size)
        self.pic = LegacyPic()
        self.apic = LocalApic(now_ns=lambda: m.cpu.guest_time_ns, tsc=self.guest_tsc, tsc_hz=TSC_HZ,
                              on_timer_change=self._arm_timer)
        self.mca = MachineCheckBanks()
        self.pm_timer = acpi.AcpiPmTimer(lambda: m.cpu.guest_time_ns)
        for dev in (self.debug_exit, self.fw_cfg, self.pic, self.apic, self.mca, self.pm_timer):
            m.bus.attach(dev)
        m.map_mmio(XAPIC_BASE, 0x1000, self.apic, MmioMode.TRAP)
        g = m.guest
        for gpa, data in acpi.tables():          # where a BIOS leaves them (0xF0000, reserved in the E820 map)
            g.write_phys(gpa, data)
        for base, n in ((self.debug_exit.base, self.debug_exit.size), (0x510, 2), (0x20, 2), (0xA0, 2),
                        (acpi.PM_TIMER_PORT, 4)):
            g.iopm.set(base, True, n)
        g.vmcb.set_intercept(ExitCode.IOIO)
        # COM1's line status register is polled before every character: served
        # without an exit (the processor's port pass-through reaches the bus)
        g.iopm.set(0x3FD, False)
        g.msrpm.set_all(True)                # every MSR access exits (see .msrs)
        g.vmcb.set_intercept(ExitCode.MSR)
        # Unicorn has no UMIP: the processor model raises UMIP's #GP (CPL > 0, CR4.UMIP)
        # before an armed descriptor-table intercept, so the platform arms them (the
        # CPL 0 exits re-execute the instruction)
        for code in (ExitCode.GDTR_READ, ExitCode.IDTR_READ, ExitCode.LDTR_READ, ExitCode.TR_READ):
            g.vmcb.set_intercept(code)
        g.vmcb.set_intercept(ExitCode.CR8_READ)
        g.vmcb.set_intercept(ExitCode.CR8_WRITE)
        self._cpuid = m.handlers[ExitCode.CPUID]
        m.handlers[ExitCode.CPUID] = self._handle_cpuid
        self._msr = m.handlers[ExitCode.MSR]
        m.handlers[ExitCode.MSR] = self._handle_msr
        m.handlers[ExitCode.CR8_READ] = self._handle_cr8
        m.handlers[ExitCode.CR8_WRITE] = self._handle_cr8
        m.handlers[ExitCode.HLT] = self._handle_hlt
        m.handlers[ExitCode.VINTR] = self._handle_vintr
        m.handlers[ExitCode.IRET] = self._handle_iret
        m.handlers[ExitCode.VMMCALL] = self._handle_vmmcall
        m.resume_hooks.append(self.after_exit)
        self.window = False              # an interrupt window is requested (V_IRQ + VINTR)
        self.nmi_in_service = False      # an injected NMI's handler has not executed IRET yet
        self.injected = {"intr": 0, "nmi": 0, "smi": 0, "windows": 0}

    def set_cmdline(self, cmdline: str) -> None:
        self.fw_cfg.set_cmdline(cmdline.encode("utf-8"))

    def guest_tsc(self) -> int:
        return (self.m.cpu.host_tsc() + self.m.guest.vmcb.TSC_OFFSET) & 0xFFFF_FFFF_FFFF_FFFF

    # ----------------------------------------------------------------- timer
    def _arm_timer(self) -> None:
        """Program the processor's guest-time timer for the APIC's next deadline."""
        m, d = self.m, self.apic.deadline_ns
        if d is None:
            if m.timer_callback == self._tick:
                m.set_timer(0)
            return
        m.set_timer(max(1, d - m.cpu.guest_time_ns), self._tick)

    def _tick(self, m: "Machine") -> None:
        d = self.apic.deadline_ns
        if d is not None and m.cpu.guest_time_ns >= d:
            self.apic.timer_fired()          # re-arms through on_timer_change
        else:
            self._arm_timer()

    # -------------------------------------------------------------- handlers
    def _handle_cpuid(self, m: "Machine", e) -> "Action":
        leaf, sub = m.guest.vmcb.RAX & 0xFFFFFFFF, m.regs.rcx & 0xFFFFFFFF
        act = self._cpuid(m, e)
        if leaf == 1:
            m.regs.rcx = m.regs.rcx | CPUID1_ECX_X2APIC | CPUID1_ECX_TSC_DEADLINE
        elif leaf == 7 and sub == 0:
            m.regs.rcx = m.regs.rcx | CPUID7_ECX_UMIP
        return act

    def _handle_msr(self, m: "Machine", e) -> "Action":
        """Every RDMSR/WRMSR (see :mod:`.msrs`): devices, the TSC, the
        processor's own MSRs, else #GP."""
        msr = m.regs.rcx & 0xFFFFFFFF
        write = e.exitinfo1 == 1
        value = (m.regs.rax & 0xFFFFFFFF) | ((m.regs.rdx & 0xFFFFFFFF) << 32)
        if m.bus.msr_owner(msr) is not None:
            return self._msr(m, e)
        if msr == MSR_TSC:
            v = m.guest.vmcb
            if write:
                v.TSC_OFFSET = (value - m.cpu.host_tsc()) & 0xFFFF_FFFF_FFFF_FFFF
            else:
                tsc = self.guest_tsc()
                m.regs.rax, m.regs.rdx = tsc & 0xFFFFFFFF, tsc >> 32
            m.advance(e)
            return RESUME
        if msr in NATIVE_MSRS:
            if write and msr in CANONICAL_MSRS and (value >> 47) not in (0, 0x1FFFF):
                m.inject(13, EventType.EXCEPTION, 0)        # Unicorn would store it unchecked
            else:
                m.cpu.pass_once(e.rip)
            return RESUME
        m.inject(13, EventType.EXCEPTION, 0)
        return RESUME

    def _handle_vmmcall(self, m: "Machine", e) -> "Action":
        """KVM's hypercall ABI (Documentation/virt/kvm/x86/hypercalls.rst): RAX = the
        number, RAX = the result.  KVM_HC_VAPIC_POLL_IRQ (1) returns 0; every other
        number -KVM_ENOSYS.  (The sandbox's own EXIT/PRINT hypercalls are not on this
        platform: a kvm-unit-tests guest calls VMMCALL with RAX = 0 to time the exit.)"""
        nr = m.regs.rax & 0xFFFFFFFF
        m.regs.rax = 0 if nr == KVM_HC_VAPIC_POLL_IRQ else (-KVM_ENOSYS) & 0xFFFF_FFFF_FFFF_FFFF
        m.advance(e)
        return RESUME

    def _handle_cr8(self, m: "Machine", e) -> "Action":
        """MOV from/to CR8: the APIC's TPR[7:4] (APM §15.21.3); EXITINFO1 names the GPR."""
        name = GPR_NAMES[e.exitinfo1 & 0xF]
        if e.exitcode == ExitCode.CR8_READ:
            setattr(m.regs, name, self.apic.tpr >> 4)
        else:
            v = getattr(m.regs, name)
            if v >> 4:
                m.inject(13, EventType.EXCEPTION, 0)      # CR8[63:4] are reserved
                return RESUME
            self.apic.tpr = (v & 0xF) << 4
        m.advance(e)
        return RESUME

    def _handle_hlt(self, m: "Machine", e) -> "Action":
        m.advance(e)
        n = m.nested
        if self.apic.nmi_pending and not self.nmi_in_service and not (n is not None and n.holds_interrupt(nmi=True)):
            return RESUME                       # an NMI that can be taken (GIF = 0 holds it) wakes HLT
        if n is not None and n.guest_mode:
            # L2's HLT: an interrupt wakes it when it is not masked for L2 -- by L1's IF under
            # V_INTR_MASKING (APM §15.21.1) -- and then either exits to L1 or reaches L2
            wakes = not n.holds_interrupt()
        else:
            wakes = bool(m.guest.vmcb.RFLAGS & RFLAGS_IF)
        if wakes:
            if self.apic.pending_vector() is not None:
                return RESUME
            d = self.apic.deadline_ns
            if d is not None:
                # an idle processor: guest time runs on to the timer's deadline
                m.cpu.idle_until(d)
                self.apic.timer_fired()
                return RESUME
        return m.stop(StopReason.HALT, f"guest executed HLT at {e.rip:#x} with no interrupt to wake it")

    def _handle_vintr(self, m: "Machine", e) -> "Action":
        """The interrupt window opened: drop the request; after_exit injects."""
        n = m.nested
        if n is not None and n.guest_mode:
            v = m.guest.vmcb                  # L0's window in VMCB02 (see _open_l2_window)
            v.V_INTR = v.V_INTR & ~(VIntr.V_IRQ | VIntr.V_IGN_TPR)
            v.set_intercept(ExitCode.VINTR, False)
            return RESUME
        self._close_window()
        return RESUME

    def _open_l2_window(self, n) -> None:
        """L2 masks the interrupt with its own RFLAGS.IF (no V_INTR_MASKING): ask the
        processor for L2's interrupt window in VMCB02 -- V_IRQ with V_IGN_TPR and the
        VINTR intercept (APM §15.21.4) -- unless L1 uses V_IRQ or VINTR for L2 itself.
        VMCB02 is rebuilt at every VMRUN and its V_IRQ goes back to VMCB12 only when L1
        had set it, so the window never reaches L1."""
        if not n.l1_leaves_virq_to_l0():
            return
        v = self.m.guest.vmcb
        if not v.V_INTR & VIntr.V_IRQ:
            v.V_INTR = v.V_INTR | VIntr.V_IRQ | VIntr.V_IGN_TPR
            v.set_intercept(ExitCode.VINTR)
            self.injected["windows"] += 1

    def _handle_iret(self, m: "Machine", e) -> "Action":
        """IRET of an NMI handler: NMIs are unblocked once it completes.  A
        64-bit IRET to the same CS and SS is completed here, so a held NMI is
        taken right after it; any other IRET runs on the processor."""
        self.nmi_in_service = False
        m.guest.vmcb.set_intercept(ExitCode.IRET, False)
        if self.apic.nmi_pending and self._emulate_iret64(m):
            return RESUME
        m.cpu.pass_once(e.rip)
        return RESUME

    def _emulate_iret64(self, m: "Machine") -> bool:
        v = m.guest.vmcb
        if not v.EFER & (1 << 10) or not v.seg("CS").attrib & 0x200:
            return False                     # not 64-bit mode
        try:
            rip, csel, rflags, rsp, ssel = struct.unpack("<5Q", m.read_virt(v.RSP, 40))
        except Exception:
            return False
        if csel & 0xFFFF != v.seg("CS").selector or ssel & 0xFFFF != v.seg("SS").selector:
            return False                     # a privilege or segment change: the processor's IRET
        v.RIP, v.RSP = rip, rsp
        v.RFLAGS = (rflags & 0x3C7FD5) | 0x2   # CPL 0 loads every flag but RF and VM (64-bit mode)
        return True

    # ------------------------------------------------------------- injection
    def _window_vmcb(self):
        """The VMCB of the guest the APIC belongs to (under nested SVM, L1's)."""
        n = self.m.nested
        return n.l1.vmcb if n is not None else self.m.guest.vmcb

    def _open_window(self) -> None:
        v = self._window_vmcb()
        if not self.window:
            v.V_INTR = (v.V_INTR | VIntr.V_IRQ | VIntr.V_IGN_TPR)
            v.set_intercept(ExitCode.VINTR)
            self.window = True
            self.injected["windows"] += 1

    def _close_window(self) -> None:
        if self.window:
            v = self._window_vmcb()
            v.V_INTR = v.V_INTR & ~(VIntr.V_IRQ | VIntr.V_IGN_TPR)
            v.set_intercept(ExitCode.VINTR, False)
            self.window = False

    def _route_smi(self, n) -> bool:
        """The APIC's SMI: held while GIF = 0 (APM §15.17; True), L1's #VMEXIT(SMI) when L2
        runs and L1 intercepts it (True), else taken by the processor -- with L0's SMI
        intercept the #VMEXIT(SMI) comes to this hypervisor, which (as KVM's
        smi_interception) does nothing more; without it the processor enters SMM, not
        modelled, as a firmware SMI handler that returns at once: the guest sees nothing,
        and what else is pending goes on (RFLAGS.IF does not hold an SMI; False)."""
        if n is not None and n.holds_interrupt(nmi=True):
            return True
        self.apic.smi_pending = False
        self.injected["smi"] += 1
        return n is not None and n.exit_on_interrupt(smi=True)

    def _nested_route(self, n) -> bool:
        """Nested SVM: True when the APIC's interrupt is not for the VMCB now
        current -- held (GIF clear, or masked while L2 runs: the next exit looks
        again) or turned into L1's #VMEXIT(INTR/NMI).  L0's interrupt window
        belongs to L1's VMCB; while L2 runs none is opened."""
        nmi = self.apic.nmi_pending and not self.nmi_in_service
        if nmi:
            if n.holds_interrupt(nmi=True):
                return True
            if n.exit_on_interrupt(nmi=True):
                return True
            return False
        if self.apic.pending_vector() is None:
            return False
        if n.holds_interrupt():
            if self.window and not n.guest_mode:
                self._close_window()
            if n.guest_mode and n.gif:
                # masked by L2's RFLAGS.IF: a window finds when it sets it; held by L2's
                # own CLGI, only its STGI (an exit to L0) can release it -- no window
                self._open_l2_window(n)
            return True
        if n.exit_on_interrupt():
            return True
        if n.guest_mode and (self.m.guest.vmcb.INTERRUPT_SHADOW & 1 or not self.m.guest.vmcb.RFLAGS & RFLAGS_IF):
            return True
        return False

    def after_exit(self, m: "Machine", e) -> "Action | None":
        """Resume hook: end the run on a debug-exit write, else queue what the APIC presents."""
        if self.debug_exit.value is not None:
            m.guest_exit_code = self.debug_exit.value
            return m.stop(StopReason.GUEST_EXIT, f"isa-debug-exit: the guest wrote {self.debug_exit.value:#x} "
                                                 f"(QEMU exit status {self.debug_exit.status})")
        apic, n = self.apic, m.nested
        if apic.smi_pending and self._route_smi(n):
            return None
        if not apic.irr and not apic.nmi_pending:
            if self.window:
                self._close_window()
            return None
        if n is not None and self._nested_route(n):
            return None
        v = m.guest.vmcb
        if v.EVENTINJ & (1 << 31):
            # an event is already queued (a reflected exception): the interrupt waits
            # for the window after it (the handler's IRET is watched with V_IRQ set)
            if apic.pending_vector() is not None:
                self._open_window()
            return None
        if apic.nmi_pending and not self.nmi_in_service:
            apic.nmi_pending = False
            self.nmi_in_service = True
            v.inject(Event(2, EventType.NMI))
            v.set_intercept(ExitCode.IRET)
            self.injected["nmi"] += 1
            return None
        vec = apic.pending_vector()
        if vec is None:
            if self.window:
                self._close_window()
            return None
        if v.RFLAGS & RFLAGS_IF and not v.INTERRUPT_SHADOW & 1:
            apic.accept(vec)
            v.inject(Event(vec, EventType.INTR))
            self.injected["intr"] += 1
            self._close_window()
        else:
            self._open_window()
        return None


def install(m: "Machine", name: str = "pc") -> PcPlatform:
    if name != "pc":
        raise ValueError(f"unknown platform {name!r}; the only one is 'pc'")
    return PcPlatform(m)
