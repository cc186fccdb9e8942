"""Which MSRs a PC-platform guest has, as KVM decides it: every RDMSR/WRMSR
exits (the MSR permission map is all ones) and the hypervisor serves it.

* MSRs a device owns (the local APIC's; :class:`MachineCheckBanks` here) go
  to it;
* the TSC (0x10) is the guest TSC the processor's RDTSC returns: host TSC +
  TSC_OFFSET; a write moves TSC_OFFSET;
* the architectural MSRs of :data:`~sandbox.hypervisor.msr_table.NATIVE_MSRS` run on the processor itself
  (Unicorn's WRMSR/RDMSR, re-executed unintercepted), after the hypervisor's
  canonical-address check for those holding a linear address;
* any other MSR raises #GP(0), as on hardware.  (Unicorn's own RDMSR returns
  0 and WRMSR ignores the value for an MSR it does not know: QEMU 5's TCG
  ``helper_rdmsr`` default case.)
"""
from __future__ import annotations

from ..devices import MsrFault

MSR_TSC = 0x10
# NATIVE_MSRS and CANONICAL_MSRS, shared with the default MSR handler: sandbox/hypervisor/msr_table.py

MCG_CAP, MCG_STATUS, MCG_CTL = 0x179, 0x17A, 0x17B
MC0_CTL = 0x400
MCG_CTL_P = 1 << 8


class MachineCheckBanks:
    """The machine-check MSRs (SDM vol. 3B §16.3; APM vol. 2 §9.3): MCG_CAP
    (bank count, MCG_CTL present), MCG_STATUS, MCG_CTL and four MSRs per bank
    from 0x400 (CTL, STATUS, ADDR, MISC).  Write rules are KVM's
    (arch/x86/kvm/x86.c set_msr_mce): MCG_CTL and MCi_CTL take 0 or all ones
    (MCi_CTL bits 0 and 10 may be clear), MCi_STATUS only 0 (HWCR.McStatusWrEn
    is clear).  MSRs of banks beyond the count raise #GP."""

    def __init__(self, banks: int = 10) -> None:
        self.banks = banks
        self.mcg_status = 0
        self.mcg_ctl = (1 << 64) - 1
        self.regs = [0] * (4 * banks)
        for i in range(banks):
            self.regs[4 * i] = (1 << 64) - 1

    def owns_msr(self, msr: int) -> bool:
        return MCG_CAP <= msr <= MCG_CTL or MC0_CTL <= msr < MC0_CTL + 4 * 32

    def _bank_reg(self, msr: int) -> int:
        i = msr - MC0_CTL
        if not 0 <= i < 4 * self.banks:
            raise MsrFault(f"machine-check bank MSR {msr:#x} beyond {self.banks} banks")
        return i

    def rdmsr(self, msr: int) -> int:
        if msr == MCG_CAP:
            return self.banks | MCG_CTL_P
        if msr == MCG_STATUS:
            return self.mcg_status
        if msr == MCG_CTL:
            return self.mcg_ctl
        return self.regs[self._bank_reg(msr)]

    def wrmsr(self, msr: int, value: int) -> None:
        if msr == MCG_CAP:
            raise MsrFault("MCG_CAP is read-only")
        if msr == MCG_STATUS:
            self.mcg_status = value
            return
        if msr == MCG_CTL:
            if value not in (0, (1 << 64) - 1):
                raise MsrFault("MCG_CTL takes 0 or all ones")
            self.mcg_ctl = value
            return
        i = self._bank_reg(msr)
        if i % 4 == 0 and value != 0 and (value | (1 << 10) | 1) != (1 << 64) - 1:
            raise MsrFault("MCi_CTL takes 0 or all ones")
        if i % 4 == 1 and value != 0:
            raise MsrFault("MCi_STATUS takes 0")
        self.regs[i] = value
