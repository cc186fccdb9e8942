"""Planted bugs: copies of the intercept decision with one known defect each.

Used to prove the campaign finds real intercept bugs (tests and the
``--plant`` option of ``sandbox fuzz``).  Planting a bug makes
:func:`decision` return a wrapper around a *copy* of the decision table with
the defect; the snapshot harness gives every processor it runs that decision
through the processor's public ``decide`` attribute.  The project's own
table is never edited.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from ..svm import decision as D
from ..svm import world_switch
from ..svm.decode import Kind
from ..svm.exitcodes import ExitCode

#: the planted decision in this process, or None for the project's own
_planted: Callable | None = None


def _popf_66(i, v, rip):
    """Bug: POPF with an operand-size prefix (66h, a 16-bit POPF) is not intercepted."""
    if i.opsize == 16:
        return None
    return D.ExitInfo(ExitCode.POPF) if D.armed(v, ExitCode.POPF) else None


def _io_first_byte_only(i, v, rip, code=b""):
    """Bug: the IOPM check looks at the first port's bit only, ignoring the
    second (and further) bytes of a multi-byte access (APM §15.10.2)."""
    port = i.imm if i.imm is not None else v.gpr(2) & 0xFFFF
    size = i.opsize // 8
    if size > 1 and D.armed(v, ExitCode.IOIO) and not v.iopm_bit(port):
        return None
    return D.io_exit(i, v, rip, code)


BUGS: dict[str, tuple[str, Callable]] = {
    "popf-66": ("POPF with a 66h prefix is not intercepted", _popf_66),
    "iopm-2nd-byte": ("the IOPM check ignores the 2nd byte of a multi-byte port access", _io_first_byte_only),
}


#: VMRUN checks with one rule dropped: each hides the violation from the project's own
#: :func:`~sandbox.svm.consistency.consistency` by handing it a copy of the VMCB image
#: with the offending bits masked (the guest state loaded is the real one)
_CR0_CD, _CR0_NW, _CS_D = 1 << 30, 1 << 29, 1 << 10
VMRUN_BUGS: dict[str, tuple[str, Callable]] = {
    "vmrun-cd-nw": ("VMRUN accepts CR0.CD = 0 with CR0.NW = 1 (APM §15.5.1)",
                    lambda v: replace(v, cr0=v.cr0 | _CR0_CD) if v.cr0 & _CR0_NW else v),
    "vmrun-cs-l-d": ("VMRUN accepts EFER.LME, CR0.PG, CR4.PAE with CS.L and CS.D (APM §15.5.1)",
                     lambda v: replace(v, cs_attr=v.cs_attr & ~_CS_D)),
}
_real_consistency = world_switch.consistency


def _plant_vmrun(name: str) -> Callable[[], None]:
    hide = VMRUN_BUGS[name][1]

    def patch() -> None:
        world_switch.consistency = lambda v, dram_size, **kw: _real_consistency(hide(v), dram_size, **kw)
    return patch


def plant(name: str) -> Callable[[], None]:
    """A patch function that installs bug ``name`` (call it in the process that runs cases)."""
    if name in VMRUN_BUGS:
        return _plant_vmrun(name)
    if name not in BUGS:
        raise KeyError(f"unknown planted bug {name!r}; known: {', '.join([*BUGS, *VMRUN_BUGS])}")
    _, fn = BUGS[name]

    def patch() -> None:
        global _planted
        table = dict(D.DECIDE)
        needs_code = dict(D.NEEDS_CODE)
        if name == "popf-66":
            table[Kind.POPF] = fn
        else:
            for k in (Kind.IN, Kind.OUT, Kind.INS, Kind.OUTS):
                needs_code[k] = fn

        def decide(insn, v, rip, code):
            f = needs_code.get(insn.kind)
            if f is not None:
                return f(insn, v, rip, code)
            return table[insn.kind](insn, v, rip)
        _planted = decide
    return patch


def unplant() -> None:
    global _planted
    _planted = None
    world_switch.consistency = _real_consistency


def decision() -> Callable:
    """The decision function processors in this process should use: the planted one, or the project's."""
    return _planted if _planted is not None else D.decide
