"""Memory-mapped I/O: turning a VMEXIT_NPF into a device access and back.

A hypervisor marks a guest-physical window as MMIO by leaving it out of
the nested page table.  A guest access then exits with VMEXIT_NPF
(EXITINFO2 = the GPA, APM §15.25.6) and the guest's instruction bytes in
the VMCB (decode assists, §15.34).  :func:`decode_access` turns those bytes
into an :class:`MmioAccess` -- address, size, direction, value -- and
:func:`complete` writes a read's result into the destination register; the
hypervisor then resumes at the next instruction.

Supported instructions are the ones drivers use on device registers: MOV
to and from memory (register or immediate source, ``movabs`` included) and
MOVZX/MOVSX loads.  Anything else touching MMIO is reported, not guessed.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..svm.memop import SUBREG, AccessForm, MmioDecodeError, decode_form, load_result, store_value

__all__ = ["AccessForm", "MmioAccess", "MmioDecodeError", "complete", "decode_access", "decode_form", "SUBREG"]


@dataclass(frozen=True)
class MmioAccess:
    """One decoded guest access to a device register."""
    gpa: int
    size: int
    is_write: bool
    value: int | None           # the value written (None for a read)
    form: AccessForm


def decode_access(code: bytes, gpa: int, regs, form: AccessForm | None = None) -> MmioAccess:
    """The access at ``gpa`` made by the instruction in ``code``; ``regs``
    supplies source register values (``regs.rax`` ...)."""
    f = form or decode_form(code)
    value = None
    if f.is_write:
        value = store_value(f, getattr(regs, f.src_reg[0]) if f.src_reg else 0)
    return MmioAccess(gpa, f.size, f.is_write, value, f)


def complete(access: MmioAccess, result: int, regs) -> None:
    """Write a read's ``result`` into its destination register with the x86
    width rules: 32-bit destinations zero-extend, 8/16-bit ones merge."""
    f = access.form
    if f.is_write:
        return
    name = f.dst_reg[0]
    setattr(regs, name, load_result(f, result, getattr(regs, name)))
