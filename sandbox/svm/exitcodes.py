"""SVM intercept exit codes (APM vol. 2, Appendix C, Table C-1).

Intercept exit codes equal the flat bit position of the intercept in the
VMCB intercept vectors 000h-017h (word x 32 + bit); see :mod:`sandbox.svm.intercepts`.
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    # 0x00-0x0F CRn read, 0x10-0x1F CRn write
    CR0_READ = 0x00
    CR2_READ = 0x02
    CR3_READ = 0x03
    CR4_READ = 0x04
    CR8_READ = 0x08
    CR0_WRITE = 0x10
    CR2_WRITE = 0x12
    CR3_WRITE = 0x13
    CR4_WRITE = 0x14
    CR8_WRITE = 0x18
    # 0x20-0x2F DRn read, 0x30-0x3F DRn write
    DR0_READ = 0x20
    DR7_READ = 0x27
    DR0_WRITE = 0x30
    DR7_WRITE = 0x37
    # 0x40-0x5F exception vector n
    EXCP_DE = 0x40
    EXCP_DB = 0x41
    EXCP_NMI = 0x42
    EXCP_BP = 0x43
    EXCP_OF = 0x44
    EXCP_BR = 0x45
    EXCP_UD = 0x46
    EXCP_NM = 0x47
    EXCP_DF = 0x48
    EXCP_TS = 0x4A
    EXCP_NP = 0x4B
    EXCP_SS = 0x4C
    EXCP_GP = 0x4D
    EXCP_PF = 0x4E
    EXCP_MF = 0x50
    EXCP_AC = 0x51
    EXCP_MC = 0x52
    EXCP_XF = 0x53
    EXCP_VC = 0x5D
    EXCP_SX = 0x5E
    INTR = 0x60
    NMI = 0x61
    SMI = 0x62
    INIT = 0x63
    VINTR = 0x64
    CR0_SEL_WRITE = 0x65
    IDTR_READ = 0x66
    GDTR_READ = 0x67
    LDTR_READ = 0x68
    TR_READ = 0x69
    IDTR_WRITE = 0x6A
    GDTR_WRITE = 0x6B
    LDTR_WRITE = 0x6C
    TR_WRITE = 0x6D
    RDTSC = 0x6E
    RDPMC = 0x6F
    PUSHF = 0x70
    POPF = 0x71
    CPUID = 0x72
    RSM = 0x73
    IRET = 0x74
    SWINT = 0x75
    INVD = 0x76
    PAUSE = 0x77
    HLT = 0x78
    INVLPG = 0x79
    INVLPGA = 0x7A
    IOIO = 0x7B
    MSR = 0x7C
    TASK_SWITCH = 0x7D
    FERR_FREEZE = 0x7E
    SHUTDOWN = 0x7F
    VMRUN = 0x80
    VMMCALL = 0x81
    VMLOAD = 0x82
    VMSAVE = 0x83
    STGI = 0x84
    CLGI = 0x85
    SKINIT = 0x86
    RDTSCP = 0x87
    ICEBP = 0x88
    WBINVD = 0x89
    MONITOR = 0x8A
    MWAIT = 0x8B
    MWAIT_CONDITIONAL = 0x8C
    XSETBV = 0x8D
    RDPRU = 0x8E
    EFER_WRITE_TRAP = 0x8F
    CR0_WRITE_TRAP = 0x90
    INVLPGB = 0xA0
    INVLPGB_ILLEGAL = 0xA1
    INVPCID = 0xA2
    MCOMMIT = 0xA3
    TLBSYNC = 0xA4
    BUSLOCK = 0xA5
    IDLE_HLT = 0xA6
    NPF = 0x400
    AVIC_INCOMPLETE_IPI = 0x401
    AVIC_NOACCEL = 0x402
    VMGEXIT = 0x403
    INVALID = 0xFFFF_FFFF_FFFF_FFFF  # -1
    BUSY = 0xFFFF_FFFF_FFFF_FFFE  # -2
    IDLE_REQUIRED = 0xFFFF_FFFF_FFFF_FFFD  # -3
    INVALID_PMC = 0xFFFF_FFFF_FFFF_FFFC  # -4


def exit_name(code: int) -> str:
    """APM-style name of any exit code, including the ranged ones (remembered:
    an enum lookup costs microseconds, and a trace names every exit)."""
    name = _NAMES.get(code)
    if name is None:
        name = _exit_name(code)
        if len(_NAMES) < 4096:           # arbitrary codes (a fuzzer's) must not grow it without bound
            _NAMES[code] = name
    return name


_NAMES: dict[int, str] = {}


def _exit_name(code: int) -> str:
    try:
        return ExitCode(code).name
    except ValueError:
        pass
    if 0x00 <= code <= 0x0F:
        return f"CR{code}_READ"
    if 0x10 <= code <= 0x1F:
        return f"CR{code - 0x10}_WRITE"
    if 0x20 <= code <= 0x2F:
        return f"DR{code - 0x20}_READ"
    if 0x30 <= code <= 0x3F:
        return f"DR{code - 0x30}_WRITE"
    if 0x40 <= code <= 0x5F:
        return f"EXCP{code - 0x40}"
    if 0x90 <= code <= 0x9F:
        return f"CR{code - 0x90}_WRITE_TRAP"
    return f"UNKNOWN_{code:#x}"


#: exit codes EXCP_DE ... EXCP_DE + 31 are the exception intercepts, by vector
EXCP_FIRST = int(ExitCode.EXCP_DE)
EXCP_END = EXCP_FIRST + 32


def excp(vector: int) -> int:
    """Exit code of exception ``vector`` (EXCP_DE + vector)."""
    return EXCP_FIRST + vector


def is_excp(code: int) -> bool:
    """True for the exit code of an exception intercept (0x40-0x5F)."""
    return EXCP_FIRST <= code < EXCP_END
