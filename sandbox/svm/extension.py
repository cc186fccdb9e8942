"""How features above the processor plug into it (SEV is the one today).

The processor calls these hooks at fixed points of VMRUN, an intercept, the
#VMEXIT state save, a hypervisor access to host memory and the 2-D walk.
:class:`ProcessorExtension` is the do-nothing default, which is what a
processor without a secure processor does; :mod:`sandbox.sev` provides the
real one.  The processor never imports the extension's implementation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .vmcb import NpControl

if TYPE_CHECKING:
    from ..memory.encryption import MemoryEncryption
    from .cpu import SvmCpu
    from .world_switch import ExitRecord


#: SEV_ENABLE | SEV_ES_ENABLE as a plain int (an IntFlag operation costs a microsecond per VMRUN)
_SEV_ENABLES = int(NpControl.SEV_ENABLE | NpControl.SEV_ES_ENABLE)


class ProcessorExtension:
    """The hooks the processor calls; every default leaves behaviour unchanged."""

    def vmrun_check(self, cpu: "SvmCpu", asid: int, np_control: int) -> str:
        """VMRUN's checks of the extension's VMCB controls (APM §15.5.1): the
        reason for VMEXIT_INVALID, or '' when legal.  Runs before the
        save-area checks, because an SEV-ES guest's state comes from its VMSA."""
        if np_control & _SEV_ENABLES:
            return "SEV enable set, but the processor has no secure processor"
        return ""

    def before_vmrun(self, cpu: "SvmCpu") -> None:
        """VMRUN, before the VMCB is read: reload what the extension keeps elsewhere."""

    def intercept(self, cpu: "SvmCpu", exitcode: int, rip: int, length: int) -> bool:
        """An intercepted instruction is about to exit; True when the extension
        handled it instead (SEV-ES: #VC, VMGEXIT, the GHCB MSR)."""
        return False

    def emulate_invalid(self, cpu: "SvmCpu", rip: int) -> bool:
        """Unicorn reports the instruction at ``rip`` as invalid; True when the
        extension executed it (SEV-SNP: PVALIDATE)."""
        return False

    def at_vmexit(self, cpu: "SvmCpu") -> None:
        """#VMEXIT, before anything the hypervisor can see is written (SEV:
        DRAM holds only ciphertext from here on)."""

    def after_vmexit(self, cpu: "SvmCpu", rec: "ExitRecord") -> None:
        """#VMEXIT, after the exit fields are written (SEV-ES: state into the VMSA)."""

    def at_stop(self, cpu: "SvmCpu") -> None:
        """The run returns to the hypervisor for good (SEV: write back plaintext)."""

    def host_access(self, hpa: int, n: int, write: bool) -> None:
        """The hypervisor reads or writes host memory at [hpa, hpa + n)."""

    def encryption(self) -> "MemoryEncryption | None":
        """The memory-encryption layer the 2-D walk stacks on top, if active."""
        return None


#: the default, shared: it holds no state
NO_EXTENSION = ProcessorExtension()
