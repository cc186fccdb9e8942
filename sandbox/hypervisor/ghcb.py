"""The GHCB (Guest-Hypervisor Communication Block) and the hypervisor's VMGEXIT handler.

An SEV-ES guest's registers are encrypted in its VMSA, so for a
non-automatic exit the guest's #VC handler copies what the hypervisor needs
into the GHCB -- a page the guest shares (C-bit clear) and whose GPA it
writes to the GHCB MSR C001_0130h -- and executes VMGEXIT (F3 0F 01 D9).
The processor exits with VMEXIT_VMGEXIT (0x403) and puts the GHCB MSR value
in the VMCB's GHCB_PA (0A0h).  The hypervisor reads SW_EXITCODE,
SW_EXITINFO1/2 and the register fields the valid bitmap marks, does the
work, writes the results (marking them valid) and resumes; the guest
continues after its VMGEXIT.

Layout (GHCB specification, AMD pub. 56421; Linux ``struct ghcb_save_area``):
register fields at their VMSA offsets, SW_EXITCODE 390h, SW_EXITINFO1 398h,
SW_EXITINFO2 3A0h, SW_SCRATCH 3A8h, valid bitmap 3F0h (bit n = the qword at
offset 8n), shared buffer 800h, protocol version FFAh, usage FFCh.

Errors follow KVM: a GHCB that lacks a required input gets SW_EXITINFO1 = 2
and SW_EXITINFO2 = GHCB_ERR_MISSING_INPUT; an event the hypervisor does not
support gets GHCB_ERR_INVALID_EVENT; a GHCB GPA that is not a mapped,
page-aligned page stops the run with a one-line reason.
"""
from __future__ import annotations

import struct
from enum import IntEnum
from typing import TYPE_CHECKING

from ..svm.iopm import IoioInfo
from ..svm.stop import StopReason
from .handlers import RESUME, Action, _cpuid_leaf

if TYPE_CHECKING:
    from ..svm.cpu import ExitRecord
    from .machine import Machine


class Ghcb(IntEnum):
    """Byte offsets in the GHCB page."""
    CPL = 0x0CB
    RIP = 0x178
    RSP = 0x1D8
    RAX = 0x1F8
    RCX = 0x308
    RDX = 0x310
    RBX = 0x318
    RBP = 0x328
    RSI = 0x330
    RDI = 0x338
    SW_EXITCODE = 0x390
    SW_EXITINFO1 = 0x398
    SW_EXITINFO2 = 0x3A0
    SW_SCRATCH = 0x3A8
    XCR0 = 0x3E8
    VALID_BITMAP = 0x3F0
    SHARED_BUFFER = 0x800
    PROTOCOL_VERSION = 0xFFA
    USAGE = 0xFFC


class GhcbError(IntEnum):
    """SW_EXITINFO2 values when SW_EXITINFO1 = 2 (Linux GHCB_ERR_*)."""
    NOT_REGISTERED = 1
    INVALID_USAGE = 2
    INVALID_SCRATCH_AREA = 3
    MISSING_INPUT = 4
    INVALID_INPUT = 5
    INVALID_EVENT = 6


VMEXIT_VMGEXIT = 0x403
VMGEXIT_BYTES = bytes.fromhex("f30f01d9")
_Q = struct.Struct("<Q")


class GhcbPage:
    """A GHCB image the hypervisor reads from and writes back to guest memory."""

    def __init__(self, raw: bytes) -> None:
        self.raw = bytearray(raw)
        self._in_valid = int.from_bytes(self.raw[Ghcb.VALID_BITMAP:Ghcb.VALID_BITMAP + 16], "little")

    def valid(self, off: int) -> bool:
        return bool(self._in_valid >> (off // 8) & 1)

    def get(self, off: int) -> int:
        return _Q.unpack_from(self.raw, off)[0]

    def set(self, off: int, v: int) -> None:
        _Q.pack_into(self.raw, off, v & 0xFFFF_FFFF_FFFF_FFFF)
        bm = int.from_bytes(self.raw[Ghcb.VALID_BITMAP:Ghcb.VALID_BITMAP + 16], "little") | (1 << (off // 8))
        self.raw[Ghcb.VALID_BITMAP:Ghcb.VALID_BITMAP + 16] = bm.to_bytes(16, "little")

    def clear_valid(self) -> None:
        self.raw[Ghcb.VALID_BITMAP:Ghcb.VALID_BITMAP + 16] = bytes(16)

    def error(self, err: GhcbError) -> None:
        self.set(Ghcb.SW_EXITINFO1, 2)
        self.set(Ghcb.SW_EXITINFO2, int(err))


def handle_vmgexit(m: "Machine", e: "ExitRecord") -> "Action":
    """VMEXIT_VMGEXIT: serve the request in the guest's GHCB (CPUID, IOIO, MSR, VMMCALL)."""
    gpa = m.guest.vmcb.GHCB_PA
    if gpa & 0xFFF or m.guest.npt.lookup(gpa) is None:
        return m.stop(StopReason.GHCB_ERROR, f"VMGEXIT with GHCB GPA {gpa:#x}, which is not a mapped, page-aligned page")
    g = GhcbPage(m.guest.read_phys(gpa, 4096))
    m.sev.ghcb_log.append((g.get(Ghcb.SW_EXITCODE), g.get(Ghcb.SW_EXITINFO1), g.get(Ghcb.SW_EXITINFO2)))
    need = (Ghcb.SW_EXITCODE, Ghcb.SW_EXITINFO1, Ghcb.SW_EXITINFO2)
    code = g.get(Ghcb.SW_EXITCODE)
    g.clear_valid()

    def missing(*offs: int) -> bool:
        return any(not g.valid(o) for o in offs)
    stop = None
    if missing(*need):
        g.error(GhcbError.MISSING_INPUT)
    elif code == 0x72:                                   # CPUID
        if missing(Ghcb.RAX, Ghcb.RCX):
            g.error(GhcbError.MISSING_INPUT)
        else:
            a, b, c, d = _cpuid_leaf(m, g.get(Ghcb.RAX) & 0xFFFFFFFF, g.get(Ghcb.RCX) & 0xFFFFFFFF)
            for off, v in ((Ghcb.RAX, a), (Ghcb.RBX, b), (Ghcb.RCX, c), (Ghcb.RDX, d)):
                g.set(off, v)
            g.set(Ghcb.SW_EXITINFO1, 0)
    elif code == 0x7B:                                   # IOIO, EXITINFO1 as APM §15.10.2
        info = g.get(Ghcb.SW_EXITINFO1)
        port = info >> 16 & 0xFFFF
        size = 1 if info & IoioInfo.SZ8 else (2 if info & IoioInfo.SZ16 else 4)
        if info & IoioInfo.STR:
            g.error(GhcbError.INVALID_INPUT)             # string I/O needs the scratch area: not offered
        elif info & IoioInfo.TYPE_IN:
            g.set(Ghcb.RAX, m.bus.io(port, size, True))
            g.set(Ghcb.SW_EXITINFO1, 0)
        elif missing(Ghcb.RAX):
            g.error(GhcbError.MISSING_INPUT)
        else:
            m.bus.io(port, size, False, g.get(Ghcb.RAX) & ((1 << (8 * size)) - 1))
            g.set(Ghcb.SW_EXITINFO1, 0)
    elif code == 0x7C:                                   # MSR: EXITINFO1 0 = RDMSR, 1 = WRMSR
        write = g.get(Ghcb.SW_EXITINFO1) & 1
        if missing(Ghcb.RCX) or (write and missing(Ghcb.RAX, Ghcb.RDX)):
            g.error(GhcbError.MISSING_INPUT)
        else:
            msr = g.get(Ghcb.RCX) & 0xFFFFFFFF
            if write:
                m.msrs[msr] = (g.get(Ghcb.RAX) & 0xFFFFFFFF) | (g.get(Ghcb.RDX) & 0xFFFFFFFF) << 32
                g.set(Ghcb.SW_EXITINFO1, 0)
            elif msr in m.msrs:
                v = m.msrs[msr]
                g.set(Ghcb.RAX, v & 0xFFFFFFFF)
                g.set(Ghcb.RDX, v >> 32)
                g.set(Ghcb.SW_EXITINFO1, 0)
            else:
                g.error(GhcbError.INVALID_INPUT)         # the guest's #VC handler raises #GP
    elif code == 0x81:                                   # VMMCALL: RAX = function, RDI = argument
        if missing(Ghcb.RAX):
            g.error(GhcbError.MISSING_INPUT)
        elif g.get(Ghcb.RAX) == 0:
            m.guest_exit_code = g.get(Ghcb.RDI) & 0xFFFFFFFF if g.valid(Ghcb.RDI) else 0
            g.set(Ghcb.SW_EXITINFO1, 0)
            stop = (StopReason.GUEST_EXIT, f"EXIT hypercall (through the GHCB) with code {m.guest_exit_code}")
        else:
            g.error(GhcbError.INVALID_INPUT)
    elif code == 0x8000_FFFE:                            # TERM_REQUEST
        stop = (StopReason.GUEST_TERMINATED, f"guest requested termination, reason {g.get(Ghcb.SW_EXITINFO1):#x}")
    else:
        g.error(GhcbError.INVALID_EVENT)
    m.guest.write_phys(gpa, bytes(g.raw))
    if stop is not None:
        return m.stop(*stop)
    return RESUME
