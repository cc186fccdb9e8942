"""MSR auditor: record every intercepted RDMSR/WRMSR with its value and
print an audit table when the guest exits.

    sandbox run guest_images/popek_goldberg.S --intercept msr --hooks hooks/msr_auditor.py
"""
import sys

from sandbox import ExitCode, handlers

AUDIT: list[tuple[str, int, int, int]] = []


def audit_msr(m, e):
    msr = m.regs.rcx & 0xFFFFFFFF
    if e.exitinfo1:                                   # WRMSR (EXITINFO1 = 1)
        value = (m.regs.rdx & 0xFFFFFFFF) << 32 | (m.regs.rax & 0xFFFFFFFF)
        AUDIT.append(("WRMSR", msr, value, e.rip))
        return handlers.handle_msr(m, e)
    act = handlers.handle_msr(m, e)
    AUDIT.append(("RDMSR", msr, (m.regs.rdx & 0xFFFFFFFF) << 32 | (m.regs.rax & 0xFFFFFFFF), e.rip))
    return act


def report_on_exit(m, e):
    act = handlers.handle_vmmcall(m, e)
    if m.guest_exit_code is not None:
        for op, msr, value, rip in AUDIT:
            print(f"[msr] {op} {msr:#010x} = {value:#018x} at rip {rip:#x}", file=sys.stderr)
    return act


HANDLERS = {ExitCode.MSR: audit_msr, ExitCode.VMMCALL: report_on_exit}
