"""What the debug modules need to know about a #VMEXIT.

The processor's exit record (EXITCODE, EXITINFO1, EXITINFO2 and the guest
RIP, APM vol. 2 §15.6 and Appendix C) satisfies :class:`ExitLike`; the
timeline and the recordings take anything that does.
"""
from __future__ import annotations

from typing import Protocol

from ..svm.exitcodes import exit_name


class ExitLike(Protocol):
    exitcode: int
    exitinfo1: int
    exitinfo2: int
    rip: int


def exit_label(code: int) -> str:
    """The APM name of an exit code (``CPUID``), or its number if it has none."""
    return exit_name(code)


def describe_exit(code: int, rip: int, info1: int, info2: int) -> str:
    """``CPUID (0x72) at rip 0x100004, exitinfo1 0x0, exitinfo2 0x0``."""
    return f"{exit_label(code)} ({code:#x}) at rip {rip:#x}, exitinfo1 {info1:#x}, exitinfo2 {info2:#x}"
