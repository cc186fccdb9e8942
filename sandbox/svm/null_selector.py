"""FS and GS keep their base when IRET to an outer privilege level nulls them.

An IRET that returns to a less privileged level loads a null selector into each
of ES, DS, FS and GS that its new CPL may not use -- a data or non-conforming
code segment whose DPL is below the new CPL (APM vol. 3 "IRET", the
``seg = NULL`` step of its return-to-outer-privilege path).  What the null
selector leaves in the hidden part is the processor's: Intel processors clear
the base, AMD processors before Zen 3 keep it (Zen 3 reports the clearing as
CPUID Fn8000_0021_EAX[6] NullSelectorClearsBase; Linux calls the older
behaviour X86_BUG_NULL_SEG).  The family-17h processor modelled here keeps it;
in 64-bit mode only the FS and GS bases are ever used, so those are the two
that matter.  QEMU's TCG clears it.

QEMU leaves an FS or GS that is already null alone.  So when an IRETQ is about
to return to an outer level and will succeed, the processor model loads the
null selector into FS and GS itself, keeping their hidden state, just before
QEMU runs the IRET.  "Will succeed" is decided first by the IRET's own checks
on the frame, CS and SS (:func:`iret_to_outer_succeeds`), so an IRET that
faults leaves every selector as it was.  kvm-unit-tests' svm_l2_ac_test relies
on it: its #AC handler at CPL 0 uses the GS base after an IRETQ to CPL 3.

A MOV to FS or GS, or a POP of them, that loads a null selector in 64-bit mode
keeps the hidden part the same way (Linux probes for it: ``loadsegment(fs, 0)``
after writing FS_BASE, then reads FS_BASE back); the processor model carries
those out itself (:func:`load_null`), and leaves a non-null selector, or an
operand read that faults, to QEMU.
"""
from __future__ import annotations

from typing import Callable

from .cpustate import DESC_C, DESC_CS, DESC_DPL_SHIFT, DESC_P, DESC_S, DESC_W, R_FS, R_GS, CpuState

RFLAGS_NT = 1 << 14


def _descriptor(st: CpuState, read: Callable[[int, int], int | None], selector: int) -> int | None:
    """The high dword of ``selector``'s descriptor (QEMU's ``e2``, its flags), or
    None when it lies beyond its table's limit or cannot be read."""
    if selector & 4:
        _, base, limit, _ = st.ldt()
    else:
        base, limit = st.gdt()
    index = selector & ~7
    if index + 7 > limit:
        return None
    return read(base + index + 4, 4)


def iret_to_outer_succeeds(st: CpuState, read: Callable[[int, int], int | None], rsp: int,
                           rflags: int) -> int | None:
    """The CPL an IRETQ at CPL ``st``'s returns to, when it returns to an outer
    (less privileged) level and every check on RFLAGS.NT, its frame (at ``rsp``),
    its CS and its SS passes (APM vol. 3 "IRET"); else None.  ``read(address, n)``
    reads guest memory as the IRET would, and returns None when that faults."""
    if rflags & RFLAGS_NT:
        return None                       # a task return: #GP(0) in long mode
    cs = read(rsp + 8, 8)                                    # the frame: RIP CS RFLAGS RSP SS
    if cs is None:
        return None
    cs &= 0xFFFF
    rpl = cs & 3
    if not cs & 0xFFFC or rpl <= st.hflags & 3:
        return None                       # a #GP, or no change of privilege (nothing is nulled)
    rest = [read(rsp + 8 * i, 8) for i in (0, 2, 3, 4)]
    if None in rest:
        return None
    ss = rest[3] & 0xFFFF
    e2 = _descriptor(st, read, cs)
    if e2 is None or not e2 & DESC_S or not e2 & DESC_CS or not e2 & DESC_P:
        return None
    dpl = (e2 >> DESC_DPL_SHIFT) & 3
    if (dpl > rpl) if e2 & DESC_C else (dpl != rpl):
        return None
    if not ss & 0xFFFC or ss & 3 != rpl:
        return None                       # (a null SS, legal for an IRETQ to CPL 1 or 2, is left to QEMU)
    s2 = _descriptor(st, read, ss)
    if s2 is None or not s2 & DESC_S or s2 & DESC_CS or not s2 & DESC_W or not s2 & DESC_P:
        return None
    if (s2 >> DESC_DPL_SHIFT) & 3 != rpl:
        return None
    return rpl


def null_for_outer(st: CpuState, new_cpl: int) -> list[int]:
    """Load the null selector into FS and GS where the IRET to ``new_cpl`` will
    (a data or non-conforming code segment with DPL < ``new_cpl``), keeping
    base, limit and attributes; returns the segment indices nulled."""
    done = []
    for idx in (R_FS, R_GS):
        sel, base, limit, flags = st.seg(idx)
        if not sel & 0xFFFC:
            continue
        if (not flags & DESC_CS or not flags & DESC_C) and (flags >> DESC_DPL_SHIFT) & 3 < new_cpl:
            st.set_seg(idx, 0, base, limit, flags)
            done.append(idx)
    return done


def load_null(st: CpuState, idx: int, selector: int) -> None:
    """MOV or POP of the null ``selector`` (index 0, TI 0, any RPL) into FS or GS
    (``idx``) in 64-bit mode: the selector changes, the hidden base, limit and
    attributes stay (QEMU's ``helper_load_seg`` would zero them)."""
    _, base, limit, flags = st.seg(idx)
    st.set_seg(idx, selector, base, limit, flags)
