"""Why a run ended: the one list of stop reasons.

The values are the strings the command line prints and writes into
``--json`` records (``"reason": "guest-exit"``); a :class:`StopReason`
compares equal to its string.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class StopReason(StrEnum):
    # the processor
    EXIT = "exit"                        #: the hypervisor did not resume an exit
    HALT = "halt"                        #: HLT with no interrupt that could wake the guest
    SHUTDOWN = "shutdown"                #: triple fault without the SHUTDOWN intercept
    INSN_BUDGET = "insn-budget"          #: the instruction budget ran out
    TIMEOUT = "timeout"                  #: the wall-clock limit was reached
    EXIT_BUDGET = "exit-budget"          #: the exit budget ran out
    ERROR = "error"                      #: the model could not go on (an internal or emulation error)
    STOPPED = "stopped"                  #: emulation stopped from outside
    # the hypervisor
    GUEST_EXIT = "guest-exit"            #: the guest's EXIT hypercall (or isa-debug-exit)
    GUEST_TERMINATED = "guest-terminated"  #: an SEV-ES guest asked for termination through the GHCB
    HANDLER_ERROR = "handler-error"      #: an exit handler raised
    UNHANDLED_EXIT = "unhandled-exit"    #: no handler for the exit code
    INVALID_VMCB = "invalid-vmcb"        #: VMRUN failed with VMEXIT_INVALID
    NPF = "npf"                          #: a nested page fault the hypervisor cannot resolve
    MMIO_ERROR = "mmio-error"            #: an MMIO access the hypervisor cannot emulate
    SHADOW_ERROR = "shadow-error"        #: the shadow MMU cannot build a mapping
    GHCB_ERROR = "ghcb-error"            #: a malformed GHCB request


@dataclass
class StopInfo:
    """Why :meth:`~sandbox.svm.cpu.SvmCpu.vmrun` returned.

    ``error`` keeps the original exception when the model itself failed
    (``reason`` is :attr:`StopReason.ERROR` and ``detail`` names where), so a
    caller can re-raise it or print its traceback instead of a summary line.
    """
    reason: StopReason
    detail: str = ""
    error: BaseException | None = None
