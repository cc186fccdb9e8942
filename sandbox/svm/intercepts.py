"""VMCB intercept vectors (APM vol. 2 §15.9-15.13, Table B-1).

The intercept area 000h-017h is numbered as flat bits, ``word * 32 + bit``,
as Linux's ``INTERCEPT_*`` does.  With that numbering every intercept's bit
index *is* its exit code (APM Appendix C: "intercept exit codes equal the
bit position of the flag in the intercept vector"), so one table serves
both the VMCB and the exit decoder.
"""
from __future__ import annotations

import difflib

from .exitcodes import ExitCode, excp

#: flat bit index (== exit code) of every named intercept, APM names, lowercase
INTERCEPT_BITS: dict[str, int] = {}
for _n in range(16):
    INTERCEPT_BITS[f"cr{_n}_read"] = 0x00 + _n
    INTERCEPT_BITS[f"cr{_n}_write"] = 0x10 + _n
    INTERCEPT_BITS[f"dr{_n}_read"] = 0x20 + _n
    INTERCEPT_BITS[f"dr{_n}_write"] = 0x30 + _n
for _n in range(32):
    INTERCEPT_BITS[f"excp{_n}"] = excp(_n)
_NAMED = {
    "intr": ExitCode.INTR, "nmi": ExitCode.NMI, "smi": ExitCode.SMI, "init": ExitCode.INIT,
    "vintr": ExitCode.VINTR, "cr0_sel_write": ExitCode.CR0_SEL_WRITE,
    "idtr_read": ExitCode.IDTR_READ, "gdtr_read": ExitCode.GDTR_READ,
    "ldtr_read": ExitCode.LDTR_READ, "tr_read": ExitCode.TR_READ,
    "idtr_write": ExitCode.IDTR_WRITE, "gdtr_write": ExitCode.GDTR_WRITE,
    "ldtr_write": ExitCode.LDTR_WRITE, "tr_write": ExitCode.TR_WRITE,
    "rdtsc": ExitCode.RDTSC, "rdpmc": ExitCode.RDPMC, "pushf": ExitCode.PUSHF,
    "popf": ExitCode.POPF, "cpuid": ExitCode.CPUID, "rsm": ExitCode.RSM,
    "iret": ExitCode.IRET, "intn": ExitCode.SWINT, "invd": ExitCode.INVD,
    "pause": ExitCode.PAUSE, "hlt": ExitCode.HLT, "invlpg": ExitCode.INVLPG,
    "invlpga": ExitCode.INVLPGA, "ioio": ExitCode.IOIO, "msr": ExitCode.MSR,
    "task_switch": ExitCode.TASK_SWITCH, "ferr_freeze": ExitCode.FERR_FREEZE,
    "shutdown": ExitCode.SHUTDOWN, "vmrun": ExitCode.VMRUN, "vmmcall": ExitCode.VMMCALL,
    "vmload": ExitCode.VMLOAD, "vmsave": ExitCode.VMSAVE, "stgi": ExitCode.STGI,
    "clgi": ExitCode.CLGI, "skinit": ExitCode.SKINIT, "rdtscp": ExitCode.RDTSCP,
    "icebp": ExitCode.ICEBP, "wbinvd": ExitCode.WBINVD, "monitor": ExitCode.MONITOR,
    "mwait": ExitCode.MWAIT, "mwait_conditional": ExitCode.MWAIT_CONDITIONAL,
    "xsetbv": ExitCode.XSETBV, "rdpru": ExitCode.RDPRU,
    "efer_write_trap": ExitCode.EFER_WRITE_TRAP,
    "invlpgb": ExitCode.INVLPGB, "invlpgb_illegal": ExitCode.INVLPGB_ILLEGAL,
    "invpcid": ExitCode.INVPCID, "mcommit": ExitCode.MCOMMIT, "tlbsync": ExitCode.TLBSYNC,
    "buslock": ExitCode.BUSLOCK, "idle_hlt": ExitCode.IDLE_HLT,
}
INTERCEPT_BITS.update({k: int(v) for k, v in _NAMED.items()})
for _n in range(16):
    INTERCEPT_BITS[f"cr{_n}_write_trap"] = 0x90 + _n
#: aliases users reach for
INTERCEPT_ALIASES = {"swint": "intn", "int": "intn", "ioio_prot": "ioio", "msr_prot": "msr",
                     "exception_pf": "excp14", "exception_gp": "excp13", "exception_ud": "excp6"}

#: instructions a classical trap-and-emulate VMM must see (Popek & Goldberg),
#: plus the SVM instructions themselves
SENSITIVE: tuple[str, ...] = (
    "cr0_read", "cr3_read", "cr4_read", "cr8_read", "cr0_write", "cr3_write", "cr4_write", "cr8_write",
    *(f"dr{n}_read" for n in range(8)), *(f"dr{n}_write" for n in range(8)),
    "idtr_read", "gdtr_read", "ldtr_read", "tr_read", "idtr_write", "gdtr_write", "ldtr_write", "tr_write",
    "rdtsc", "rdtscp", "rdpmc", "pushf", "popf", "cpuid", "iret", "intn", "invd", "wbinvd", "pause",
    "hlt", "invlpg", "invlpga", "ioio", "msr", "shutdown", "vmrun", "vmmcall", "vmload", "vmsave",
    "stgi", "clgi", "skinit", "icebp", "monitor", "mwait", "xsetbv",
)

#: the intercepts that, armed all at once, form the ``all`` group: every
#: instruction and exception intercept (write traps and external events excluded;
#: write traps are SEV-ES only, INTR/NMI/SMI/INIT come from outside the guest)
ALL: tuple[str, ...] = tuple(
    n for n in INTERCEPT_BITS
    if not n.endswith("_write_trap") and n not in ("efer_write_trap", "intr", "nmi", "smi", "init", "vintr",
                                                   "ferr_freeze", "task_switch", "buslock", "idle_hlt",
                                                   "invlpgb", "invlpgb_illegal", "mcommit", "tlbsync",
                                                   "mwait_conditional")
)

GROUPS: dict[str, tuple[str, ...]] = {"all": ALL, "sensitive": SENSITIVE}


class UnknownIntercept(ValueError):
    pass


def resolve(names: str | list[str]) -> set[int]:
    """Turn ``"cpuid,hlt,sensitive"`` (or a list) into a set of flat bit indexes."""
    if isinstance(names, str):
        names = [n for n in names.replace(" ", ",").split(",") if n]
    bits: set[int] = set()
    for raw in names:
        n = raw.strip().lower()
        n = INTERCEPT_ALIASES.get(n, n)
        if n in GROUPS:
            bits.update(INTERCEPT_BITS[m] for m in GROUPS[n])
        elif n in INTERCEPT_BITS:
            bits.add(INTERCEPT_BITS[n])
        else:
            close = difflib.get_close_matches(n, list(INTERCEPT_BITS) + list(GROUPS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UnknownIntercept(f"unknown intercept name {raw!r}{hint}")
    return bits


def name_of(bit: int) -> str:
    for k, v in INTERCEPT_BITS.items():
        if v == bit:
            return k
    return f"bit{bit}"
