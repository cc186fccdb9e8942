"""x86-64 architectural constants every layer shares: the platform's
MAXPHYADDR, control-register and EFER bits, MSR numbers, exception vectors.

The bottom of the import graph: it imports nothing from the project.
"""
from __future__ import annotations

#: physical-address width of the virtual CPU (CPUID Fn8000_0008 EAX[7:0])
MAXPHYADDR = 48
M64 = 0xFFFF_FFFF_FFFF_FFFF

# CR0 (APM vol. 2 §3.1.1)
CR0_PE, CR0_WP, CR0_NW, CR0_CD, CR0_PG = 1 << 0, 1 << 16, 1 << 29, 1 << 30, 1 << 31
CR0_RESERVED = 0xFFFF_FFFF_0000_0000
# CR3 (§3.1.2): bits 63:52 must be zero in long mode
CR3_LONG_MBZ = 0xFFF0_0000_0000_0000
#: ... and bits 51:MAXPHYADDR are beyond the physical address width: a MOV to CR3
#: setting one is #GP(0) as well (§3.1.2; KVM's kvm_vcpu_is_legal_cr3)
CR3_LONG_RESERVED = CR3_LONG_MBZ | (((1 << 52) - 1) & ~((1 << MAXPHYADDR) - 1))
# CR4 (§3.7.1); the reserved mask is kvm-unit-tests' SVM_CR4_RESERVED_MASK
CR4_TSD, CR4_DE, CR4_PSE, CR4_PAE, CR4_PGE, CR4_PCE = 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 7, 1 << 8
CR4_UMIP, CR4_OSXSAVE, CR4_SMEP = 1 << 11, 1 << 18, 1 << 20
CR4_RESERVED = 0xFFFF_FFFF_FE08_E000
CR4_LA57, CR4_FSGSBASE, CR4_PCIDE = 1 << 12, 1 << 16, 1 << 17
CR4_SMAP, CR4_PKE, CR4_CET, CR4_PKS = 1 << 21, 1 << 22, 1 << 23, 1 << 24
#: features this processor does not implement -- its walk and TLB have no 5-level
#: paging, PCID, SMAP, protection keys or CET, and no CPUID leaf reports them: a MOV
#: to CR4 setting one is #GP(0) like any reserved bit (§3.7.1; KVM derives its CR4
#: reserved bits from the guest's CPUID the same way)
CR4_UNIMPLEMENTED = CR4_LA57 | CR4_PCIDE | CR4_SMAP | CR4_PKE | CR4_CET | CR4_PKS
# DR6/DR7 (§13.1.1): bits 63:32 must be zero -- a MOV to DR6/DR7 setting one is #GP(0)
# (vol. 3 "MOV DRn"), and VMRUN refuses a VMCB holding one (§15.5.1)
DR6_RESERVED = 0xFFFF_FFFF_0000_0000
DR7_RESERVED = 0xFFFF_FFFF_0000_0000
#: DR6.BS: the #DB was a single step (RFLAGS.TF)
DR6_BS = 1 << 14
#: DR7 with every breakpoint disabled (bit 10 reads as one)
DR7_RESET = 0x400
# EFER (§3.1.7)
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE, EFER_SVME = 1 << 0, 1 << 8, 1 << 10, 1 << 11, 1 << 12
#: 63:16, 15 and 9 must be zero: what VMRUN checks (§15.5.1, "any MBZ bit of EFER").
#: Bit 15 (TCE) is reserved here because this processor does not implement the
#: translation-cache extension (CPUID Fn8000_0001_ECX[17] = 0) and Unicorn would drop
#: it from the loaded EFER; KVM refuses it the same way when the guest's CPUID lacks TCE
EFER_RESERVED = 0xFFFF_FFFF_FFFF_8200
#: the EFER bits this processor implements (SYSCALL, long mode, NX, SVM); a WRMSR
#: setting any other is #GP(0) (§3.1.7; KVM's efer_reserved_bits). LMA is
#: read-only: the value written there is ignored
EFER_WRITABLE = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE | EFER_SVME
# RFLAGS
RFLAGS_TF, RFLAGS_IF, RFLAGS_RF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 16, 1 << 17
# XCR0 (§11.5.2): x87 must stay enabled; YMM (AVX) needs SSE
XCR0_X87, XCR0_SSE, XCR0_YMM = 1 << 0, 1 << 1, 1 << 2

# MSRs
MSR_EFER = 0xC000_0080
MSR_TSC_AUX = 0xC000_0103
MSR_VM_HSAVE_PA = 0xC001_0117
MSR_APIC_BASE, MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP, MSR_PAT = 0x1B, 0x174, 0x175, 0x176, 0x277
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK = 0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE = 0xC000_0100, 0xC000_0101, 0xC000_0102
#: control-transfer recording (APM vol. 2 §13.1.1.9): DebugCtl, LastBranchFromIP,
#: LastBranchToIP, LastExceptionFromIP, LastExceptionToIP
MSR_DEBUGCTL = 0x1D9
MSR_LAST_BRANCH_FROM_IP, MSR_LAST_BRANCH_TO_IP = 0x1DB, 0x1DC
MSR_LAST_EXCEPTION_FROM_IP, MSR_LAST_EXCEPTION_TO_IP = 0x1DD, 0x1DE
#: MSRs holding a linear address: a WRMSR of a non-canonical one is #GP(0)
#: (vol. 3 "WRMSR"; KVM's __kvm_set_msr)
MSR_CANONICAL = frozenset({MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_CSTAR,
                           MSR_SYSENTER_ESP, MSR_SYSENTER_EIP})
#: PAT entry encodings (§7.8.1): 0 UC, 1 WC, 4 WT, 5 WP, 6 WB, 7 UC-; 2 and 3 are reserved
PAT_TYPES = frozenset({0, 1, 4, 5, 6, 7})
#: APIC_BASE: bits 7:0 and 9 reserved, 10 (x2APIC enable) absent on this processor,
#: 63:MAXPHYADDR beyond the physical address width (§16.3.1; KVM's kvm_apic_set_base)
APIC_BASE_RESERVED = (M64 & ~((1 << MAXPHYADDR) - 1)) | 0x6FF
#: VM_HSAVE_PA: a page-aligned physical address (§15.30.4)
VM_HSAVE_PA_RESERVED = (M64 & ~((1 << MAXPHYADDR) - 1)) | 0xFFF

#: the SEV-ES VMM Communication exception (APM vol. 2 §15.35.5)
VEC_VC = 29
