"""The MSRs a guest's processor implements itself, for the hypervisor's MSR
handlers (the default one and the PC platform's): what runs on the processor
when RDMSR/WRMSR is intercepted, and which of them hold a linear address."""
from __future__ import annotations

#: hold a linear address: a non-canonical WRMSR is #GP(0) (APM vol. 2 §4.5.3, SDM vol. 4 "WRMSR")
CANONICAL_MSRS = frozenset({0xC000_0100, 0xC000_0101, 0xC000_0102,    # FS_BASE GS_BASE KERNEL_GS_BASE
                            0xC000_0082, 0xC000_0083,                  # LSTAR CSTAR
                            0x175, 0x176})                             # SYSENTER_ESP SYSENTER_EIP
#: architectural MSRs the processor implements for the guest (APM vol. 2 appendix A)
NATIVE_MSRS = frozenset({
    0xFE, *range(0x200, 0x210), 0x250, 0x258, 0x259, *range(0x268, 0x270), 0x277, 0x2FF,   # MTRRs, PAT
    0x174, 0x175, 0x176,                                      # SYSENTER_CS/ESP/EIP
    0x1A0,                                                    # MISC_ENABLE (KVM offers it on every vendor)
    0x1D9, 0x1DB, 0x1DC, 0x1DD, 0x1DE,                        # DEBUGCTL, LastBranch/LastException From/ToIP
    0xC000_0080, 0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084,   # EFER STAR LSTAR CSTAR SFMASK
    0xC000_0100, 0xC000_0101, 0xC000_0102, 0xC000_0103,       # FS/GS/KERNEL_GS_BASE, TSC_AUX
    *range(0xC001_0000, 0xC001_0008),                         # PerfEvtSel0-3, PerfCtr0-3 (they read 0)
    0xC001_0015,                                              # HWCR
})
