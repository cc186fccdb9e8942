"""VMRUN's checks: the instruction's own faults, and the VMCB's consistency (APM §15.5).

:func:`check_vmrun` is what VMRUN checks before it touches the VMCB (#UD,
#GP: the host's fault, :class:`VmrunError`).  :func:`consistency` is APM
§15.5.1 "Canonicalization and Consistency Checks" of the guest state and
controls VMRUN is about to load: an illegal VMCB is VMEXIT_INVALID.  Both
read a :class:`VmcbImage`, the fields VMRUN reads, taken in one pass.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..arch import (CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR0_RESERVED, CR3_LONG_MBZ, CR3_LONG_RESERVED, CR4_PAE, CR4_RESERVED,
                    DR6_RESERVED, DR7_RESERVED, EFER_LMA, EFER_LME, EFER_RESERVED, EFER_SVME)
from ..memory.hostmem import PAGE_SIZE
from .exitcodes import ExitCode
from .vmcb import (INTERCEPT_WORDS, OFF_CR2, OFF_CR4, OFF_EFER, OFF_EVENTINJ, OFF_GUEST_ASID, OFF_INTERCEPTS,
                   OFF_IOPM_BASE_PA, OFF_MSRPM_BASE_PA, OFF_N_CR3, OFF_NP_CONTROL, OFF_PAUSE_FILTER_COUNT,
                   OFF_PAUSE_FILTER_THRESHOLD, OFF_RAX, OFF_RSP,
                   OFF_TLB_CONTROL, OFF_TSC_OFFSET, SEG_ATTRIB, SEGMENTS, Event, EventType, NpControl)

_CR4_TO_RIP = "7Q"    # CR4, CR3, CR0, DR7, DR6, RFLAGS, RIP
_ATTR_L, _ATTR_DB = 1 << 9, 1 << 10  # segment attrib: long mode, default operand size
#: the MSRPM is 8 KiB and the IOPM 12 KiB (APM §15.10-15.11)
MSRPM_SIZE, IOPM_SIZE = 0x2000, 0x3000
_N_CR3_MBZ = 0xFFF0_0000_0000_0000
#: the flag bits the checks test, as plain ints (an IntFlag operation costs a microsecond)
_NP_ENABLE = int(NpControl.NP_ENABLE)
_EVENT_VALID = int(Event.VALID)
_LEGAL_EVENT_TYPES = frozenset(int(t) for t in (EventType.INTR, EventType.NMI, EventType.EXCEPTION,
                                                EventType.SOFT_INT))
_VMRUN_WORD, _VMRUN_BIT = int(ExitCode.VMRUN) >> 5, 1 << (int(ExitCode.VMRUN) & 31)


def _fields(base: int, fields: list[tuple[int, str]]) -> struct.Struct:
    """One little-endian struct for ``(offset, format)`` fields in ascending order from
    ``base``, padded between them: the fields VMRUN reads, in one unpack."""
    fmt, at = "<", base
    for off, f in fields:
        if off < at:
            raise ValueError(f"VMCB field at {off:#x} overlaps or precedes the one before it")
        if off > at:
            fmt += f"{off - at}x"
        fmt += f
        at = off + struct.calcsize("<" + f)
    return struct.Struct(fmt)


#: the control-area fields a full VMRUN reads, in offset order (checked below)
_CONTROLS = _fields(OFF_INTERCEPTS, [(OFF_INTERCEPTS, f"{INTERCEPT_WORDS}I"), (OFF_PAUSE_FILTER_THRESHOLD, "H"),
                                     (OFF_PAUSE_FILTER_COUNT, "H"), (OFF_IOPM_BASE_PA, "Q"),
                                     (OFF_MSRPM_BASE_PA, "Q"), (OFF_TSC_OFFSET, "Q"), (OFF_GUEST_ASID, "I"),
                                     (OFF_TLB_CONTROL, "B"), (OFF_NP_CONTROL, "Q"), (OFF_EVENTINJ, "Q"),
                                     (OFF_N_CR3, "Q")])
#: ... and the state-save fields: CS.attrib, EFER, CR4..RIP, RSP, RAX, CR2
_SAVE_FROM = SEGMENTS["CS"] + SEG_ATTRIB
_SAVED = _fields(_SAVE_FROM, [(_SAVE_FROM, "H"), (OFF_EFER, "Q"), (OFF_CR4, _CR4_TO_RIP), (OFF_RSP, "Q"),
                              (OFF_RAX, "Q"), (OFF_CR2, "Q")])


class VmrunError(Exception):
    """VMRUN itself faulted in the host (#UD / #GP), before any guest state load."""


def check_vmrun(host_efer: int, vm_hsave_pa: int, vmcb_hpa: int, dram_size: int) -> None:
    """VMRUN's own #UD / #GP checks in the host (APM §15.5, "VMRUN" in vol. 3)."""
    if not host_efer & EFER_SVME:
        raise VmrunError("#UD: VMRUN with host EFER.SVME = 0")
    if vmcb_hpa & 0xFFF or vmcb_hpa + PAGE_SIZE > dram_size:
        raise VmrunError(f"#GP: VMCB address {vmcb_hpa:#x} is not a page-aligned address in DRAM")
    if not vm_hsave_pa or vm_hsave_pa & 0xFFF:
        raise VmrunError("#GP: VM_HSAVE_PA is not set to a page-aligned address")


@dataclass(slots=True)
class VmcbImage:
    """The VMCB fields a full VMRUN checks and loads."""
    ivec: tuple[int, ...]
    cr4: int
    cr3: int
    cr0: int
    dr7: int
    dr6: int
    rflags: int
    rip: int
    efer: int
    rsp: int
    rax: int
    cr2: int
    asid: int
    tlb_control: int
    np_control: int
    n_cr3: int
    iopm: int
    msrpm: int
    eventinj: int
    cs_attr: int
    tsc_offset: int
    pause_filter_threshold: int
    pause_filter_count: int

    @classmethod
    def read(cls, mv, b: int) -> "VmcbImage":
        """The fields of the VMCB at ``b`` in ``mv`` (host DRAM)."""
        c = _CONTROLS.unpack_from(mv, b + OFF_INTERCEPTS)
        cs_attr, efer, cr4, cr3, cr0, dr7, dr6, rflags, rip, rsp, rax, cr2 = _SAVED.unpack_from(mv, b + _SAVE_FROM)
        w = INTERCEPT_WORDS
        pause_threshold, pause_count, iopm, msrpm, tsc_offset, asid, tlb_control, np_control, eventinj, n_cr3 = c[w:]
        return cls(c[:w], cr4, cr3, cr0, dr7, dr6, rflags, rip, efer, rsp, rax, cr2, asid, tlb_control,
                   np_control, n_cr3, iopm & ~0xFFF, msrpm & ~0xFFF, eventinj, cs_attr, tsc_offset,
                   pause_threshold, pause_count)

    def intercepted(self, code: int) -> bool:
        return bool(self.ivec[code >> 5] >> (code & 31) & 1)


def consistency(v: VmcbImage, dram_size: int, cr4_mbz: int = 0) -> str:
    """APM §15.5.1 "Canonicalization and Consistency Checks"; '' when legal.
    ``cr4_mbz``: CR4 bits that are MBZ on this processor besides the architectural
    ones (those of features it was built without: :mod:`.features`)."""
    return _check_save_area(v, cr4_mbz) or _check_controls(v, dram_size) or _check_eventinj(v)


def _check_save_area(v: VmcbImage, cr4_mbz: int = 0) -> str:
    """The guest state: EFER, CR0, CR3, CR4, DR6, DR7 and the long-mode combination."""
    cr0, efer = v.cr0, v.efer
    if not efer & EFER_SVME:
        return "guest EFER.SVME is zero"
    if not cr0 & CR0_CD and cr0 & CR0_NW:
        return "CR0.CD = 0 and CR0.NW = 1"
    if cr0 & CR0_RESERVED:
        return "CR0[63:32] is not zero"
    if v.cr3 & CR3_LONG_MBZ and efer & EFER_LME and cr0 & CR0_PG:
        return "CR3 MBZ bits set"          # long mode is EFER.LME with CR0.PG (LMA follows them)
    if v.cr3 & CR3_LONG_RESERVED and cr0 & CR0_PG:
        # bits 63:MAXPHYADDR of a paging guest's CR3 are MBZ in legacy PAE and 32-bit paging
        # too (APM §15.5.1 "any MBZ bit of CR3"; kvm-unit-tests svm_pae_test, svm_pse_test)
        return "CR3 bits beyond MAXPHYADDR set"
    if v.cr4 & (CR4_RESERVED | cr4_mbz):
        return "CR4 MBZ bits set"
    if v.dr6 & DR6_RESERVED:
        return "DR6[63:32] is not zero"
    if v.dr7 & DR7_RESERVED:
        return "DR7[63:32] is not zero"
    if efer & EFER_RESERVED:
        return "EFER MBZ bits set"
    lme_pg = efer & EFER_LME and cr0 & CR0_PG
    if lme_pg and not v.cr4 & CR4_PAE:
        return "EFER.LME and CR0.PG with CR4.PAE = 0"
    if lme_pg and not cr0 & CR0_PE:
        return "EFER.LME and CR0.PG with CR0.PE = 0"
    if lme_pg and v.cs_attr & _ATTR_L and v.cs_attr & _ATTR_DB:
        return "EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D all set"
    return ""


def _check_controls(v: VmcbImage, dram_size: int) -> str:
    """The control area: the VMRUN intercept, the ASID, the permission maps, N_CR3."""
    if not v.ivec[_VMRUN_WORD] & _VMRUN_BIT:
        return "the VMRUN intercept bit is clear"
    if v.asid == 0:
        return "ASID is zero"
    # checked whether or not the MSR / IOIO intercepts are armed: §15.5.1 names the tables
    if v.msrpm + MSRPM_SIZE > dram_size:
        return "MSRPM extends past the end of physical memory"
    if v.iopm + IOPM_SIZE > dram_size:
        return "IOPM extends past the end of physical memory"
    if v.np_control & _NP_ENABLE and v.n_cr3 & _N_CR3_MBZ:
        return "N_CR3 MBZ bits set"
    return ""


def _check_eventinj(v: VmcbImage) -> str:
    """EVENTINJ: a legal TYPE, and a vector that TYPE may carry (APM §15.20)."""
    ev = v.eventinj
    if not ev & _EVENT_VALID:
        return ""
    ty = (ev >> 8) & 7
    vec = ev & 0xFF
    if ty not in _LEGAL_EVENT_TYPES:
        return "EVENTINJ TYPE is reserved"
    if ty == EventType.EXCEPTION and (vec == 2 or vec > 31):
        return "EVENTINJ injects a non-exception vector as an exception"
    if ty == EventType.EXCEPTION and vec in (4, 5) and v.efer & EFER_LMA:
        return "EVENTINJ injects #OF/#BR in 64-bit mode"
    return ""
