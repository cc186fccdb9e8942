"""The GHCB (Guest-Hypervisor Communication Block) and the hypervisor's VMGEXIT handler.

An SEV-ES guest's registers are encrypted in its VMSA, so for a
non-automatic exit the guest's #VC handler copies what the hypervisor needs
into the GHCB -- a page the guest shares (C-bit clear) and whose GPA it
writes to the GHCB MSR C001_0130h -- and executes VMGEXIT (F3 0F 01 D9).
The processor exits with VMEXIT_VMGEXIT (0x403) and puts the GHCB MSR value
in the VMCB's GHCB_PA (0A0h).

:func:`handle_vmgexit` serves the request as KVM's ``sev_handle_vmgexit``
does: it checks the request, turns SW_EXITCODE and SW_EXITINFO1/2 into an
exit record and calls the ordinary handler of that exit code from
``m.handlers`` -- the handler a guest without SEV-ES gets -- with ``m.regs``
backed by the GHCB's register fields (:class:`GhcbRegs`).  What the handler
writes goes back into the GHCB, marked valid; an event it raises becomes the
GHCB's exception report (SW_EXITINFO1 = 1, SW_EXITINFO2 = the event in
EVENTINJ format; GHCB specification, AMD pub. 56421, and KVM's
``svm_complete_emulated_msr``); the guest's #VC handler moves its own RIP.

Layout (GHCB specification; Linux ``struct ghcb_save_area``): register fields
at their VMSA offsets, SW_EXITCODE 390h, SW_EXITINFO1 398h, SW_EXITINFO2 3A0h,
SW_SCRATCH 3A8h, valid bitmap 3F0h (bit n = the qword at offset 8n), shared
buffer 800h, protocol version FFAh, usage FFCh.

Errors follow KVM: a GHCB that lacks a required input gets SW_EXITINFO1 = 2
and SW_EXITINFO2 = GHCB_ERR_MISSING_INPUT; an event the hypervisor does not
support gets GHCB_ERR_INVALID_EVENT; string I/O (which needs the scratch
area) gets GHCB_ERR_INVALID_INPUT; a GHCB GPA that is not a mapped,
page-aligned page stops the run with a one-line reason.
"""
from __future__ import annotations

import struct
from enum import IntEnum
from typing import TYPE_CHECKING, Callable

from ..memory.hostmem import PAGE_SIZE
from ..svm.cpu import ExitRecord
from ..svm.exitcodes import ExitCode, exit_name
from ..svm.iopm import IoioInfo
from ..svm.stop import StopReason
from ..svm.vmcb import Event
from .handlers import RESUME, Action

if TYPE_CHECKING:
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
    R8 = 0x340
    R9 = 0x348
    R10 = 0x350
    R11 = 0x358
    R12 = 0x360
    R13 = 0x368
    R14 = 0x370
    R15 = 0x378
    SW_EXITCODE = 0x390
    SW_EXITINFO1 = 0x398
    SW_EXITINFO2 = 0x3A0
    SW_SCRATCH = 0x3A8
    XCR0 = 0x3E8
    VALID_BITMAP = 0x3F0
    SHARED_BUFFER = 0x800
    PROTOCOL_VERSION = 0xFFA
    USAGE = 0xFFC


class GhcbResponse(IntEnum):
    """SW_EXITINFO1[31:0] after VMGEXIT (GHCB specification; Linux GHCB_HV_RESP_*)."""
    NO_ACTION = 0
    ISSUE_EXCEPTION = 1        # SW_EXITINFO2 = the exception, in EVENTINJ format
    MALFORMED_INPUT = 2        # SW_EXITINFO2 = a GhcbError


class GhcbError(IntEnum):
    """SW_EXITINFO2 values when SW_EXITINFO1 = 2 (Linux GHCB_ERR_*)."""
    NOT_REGISTERED = 1
    INVALID_USAGE = 2
    INVALID_SCRATCH_AREA = 3
    MISSING_INPUT = 4
    INVALID_INPUT = 5
    INVALID_EVENT = 6


class VmgexitCode(IntEnum):
    """SW_EXITCODE values that are GHCB protocol requests, not SVM exit codes."""
    TERM_REQUEST = 0x8000_FFFE


#: the GPRs a GHCB carries, by ``m.regs`` name
GHCB_GPRS = {name.lower(): off for name, off in Ghcb.__members__.items()
             if name in ("RAX", "RBX", "RCX", "RDX", "RSP", "RBP", "RSI", "RDI") or name[1:].isdigit()}
_EXIT_FIELDS = (Ghcb.SW_EXITCODE, Ghcb.SW_EXITINFO1, Ghcb.SW_EXITINFO2)
_Q = struct.Struct("<Q")
M64 = 0xFFFF_FFFF_FFFF_FFFF


class GhcbPage:
    """A GHCB image the hypervisor reads from and writes back to guest memory."""

    def __init__(self, raw: bytes) -> None:
        self.raw = bytearray(raw)
        self._in_valid = int.from_bytes(self.raw[Ghcb.VALID_BITMAP:Ghcb.VALID_BITMAP + 16], "little")

    def valid(self, off: int) -> bool:
        """The guest marked the field at ``off`` valid in its request."""
        return bool(self._in_valid >> (off // 8) & 1)

    def get(self, off: int) -> int:
        return _Q.unpack_from(self.raw, off)[0]

    def set(self, off: int, v: int) -> None:
        """Write a field of the response and mark it valid."""
        _Q.pack_into(self.raw, off, v & M64)
        bm = int.from_bytes(self.raw[Ghcb.VALID_BITMAP:Ghcb.VALID_BITMAP + 16], "little") | (1 << (off // 8))
        self.raw[Ghcb.VALID_BITMAP:Ghcb.VALID_BITMAP + 16] = bm.to_bytes(16, "little")

    def clear_valid(self) -> None:
        self.raw[Ghcb.VALID_BITMAP:Ghcb.VALID_BITMAP + 16] = bytes(16)

    def respond(self, info1: int, info2: int) -> None:
        self.set(Ghcb.SW_EXITINFO1, info1)
        self.set(Ghcb.SW_EXITINFO2, info2)

    def error(self, err: GhcbError) -> None:
        self.respond(GhcbResponse.MALFORMED_INPUT, err)


class GhcbRegs:
    """``m.regs`` while a VMGEXIT request is served: the registers the GHCB
    carries (KVM's ``sev_es_sync_from_ghcb``; a field the guest did not mark
    valid reads 0).  Registers a handler writes go back into the GHCB,
    marked valid (``sev_es_sync_to_ghcb``); RIP is the guest's #VC handler's
    business, and an event becomes the GHCB's exception report."""

    __slots__ = ("page", "values", "written")

    def __init__(self, page: GhcbPage) -> None:
        object.__setattr__(self, "page", page)
        object.__setattr__(self, "values", {n: page.get(off) if page.valid(off) else 0
                                            for n, off in GHCB_GPRS.items()})
        object.__setattr__(self, "written", set())

    def __getattr__(self, name: str) -> int:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(f"the GHCB carries no register {name!r}") from None

    def __setattr__(self, name: str, value: int) -> None:
        if name not in self.values:
            raise AttributeError(f"the GHCB carries no register {name!r}")
        self.values[name] = value & M64
        self.written.add(name)

    def as_dict(self) -> dict[str, int]:
        return dict(self.values)

    def set_abcd(self, values: tuple[int, int, int, int], next_rip: int | None = None) -> None:
        """RAX, RBX, RCX, RDX = ``values`` (each written back to the GHCB, marked
        valid); ``next_rip`` as :meth:`complete` (nothing to do)."""
        for name, v in zip(("rax", "rbx", "rcx", "rdx"), values):
            self.__setattr__(name, v)

    def complete(self, next_rip: int) -> None:
        """Nothing: the guest's #VC handler skips the instruction that raised #VC."""

    def inject(self, event: Event) -> None:
        """SW_EXITINFO1 = 1 (issue an exception), SW_EXITINFO2 = the event."""
        self.page.respond(GhcbResponse.ISSUE_EXCEPTION, event.encode())

    def sync_to_ghcb(self) -> None:
        for name in self.written:
            self.page.set(GHCB_GPRS[name], self.values[name])


def _msr_inputs(info1: int) -> tuple[Ghcb, ...]:
    return (Ghcb.RCX, Ghcb.RAX, Ghcb.RDX) if info1 else (Ghcb.RCX,)


def _ioio_inputs(info1: int) -> tuple[Ghcb, ...]:
    return () if info1 & IoioInfo.TYPE_IN else (Ghcb.RAX,)


#: the exits a guest may request through the GHCB, and the register fields
#: each needs (KVM's ``sev_es_validate_vmgexit``), by SW_EXITINFO1
GHCB_EXITS: dict[int, Callable[[int], tuple[Ghcb, ...]]] = {
    ExitCode.CPUID: lambda info1: (Ghcb.RAX, Ghcb.RCX),
    ExitCode.IOIO: _ioio_inputs,
    ExitCode.MSR: _msr_inputs,
    ExitCode.VMMCALL: lambda info1: (Ghcb.RAX,),
}


def check_request(page: GhcbPage) -> GhcbError | None:
    """Why the request in ``page`` cannot be served, or None."""
    if not all(page.valid(f) for f in _EXIT_FIELDS):
        return GhcbError.MISSING_INPUT
    code, info1 = page.get(Ghcb.SW_EXITCODE), page.get(Ghcb.SW_EXITINFO1)
    if code == VmgexitCode.TERM_REQUEST:
        return None
    inputs = GHCB_EXITS.get(code)
    if inputs is None:
        return GhcbError.INVALID_EVENT
    if code == ExitCode.IOIO and info1 & IoioInfo.STR:
        return GhcbError.INVALID_INPUT          # string I/O needs the scratch area: not offered
    if not all(page.valid(f) for f in inputs(info1)):
        return GhcbError.MISSING_INPUT
    return None


def handle_vmgexit(m: "Machine", e: ExitRecord) -> Action:
    """VMEXIT_VMGEXIT: serve the request in the guest's GHCB through ``m.handlers``."""
    gpa = m.guest.vmcb.GHCB_PA
    if gpa & 0xFFF or m.guest.npt.lookup(gpa) is None:
        return m.stop(StopReason.GHCB_ERROR,
                      f"VMGEXIT with GHCB GPA {gpa:#x}, which is not a mapped, page-aligned page")
    page = GhcbPage(m.guest.read_phys(gpa, PAGE_SIZE))
    request = tuple(page.get(f) for f in _EXIT_FIELDS)
    m.sev.ghcb_log.append(request)
    page.clear_valid()
    err = check_request(page)
    if err is not None:
        page.error(err)
        act = RESUME
    else:
        act = _serve(m, page, ExitRecord(*request, exitintinfo=0, rip=0, nrip=0, index=e.index))
    m.guest.write_phys(gpa, bytes(page.raw))
    return act


def _serve(m: "Machine", page: GhcbPage, rec: ExitRecord) -> Action:
    """Run the request's exit handler with ``m.regs`` backed by the GHCB."""
    if rec.exitcode == VmgexitCode.TERM_REQUEST:
        return m.stop(StopReason.GUEST_TERMINATED, f"guest requested termination, reason {rec.exitinfo1:#x}")
    handler = m.handlers.get(rec.exitcode)
    if handler is None:
        return m.stop(StopReason.UNHANDLED_EXIT, f"no handler for {exit_name(rec.exitcode)} requested through the GHCB")
    page.respond(GhcbResponse.NO_ACTION, 0)
    regs = GhcbRegs(page)
    outer, m.regs = m.regs, regs
    try:
        act = handler(m, rec)
    finally:
        m.regs = outer
    regs.sync_to_ghcb()
    return RESUME if act is None else act
