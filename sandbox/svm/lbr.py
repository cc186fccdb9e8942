"""Control-transfer recording (APM vol. 2 §13.1.1.9) and LBR virtualization (§15.23).

The processor keeps five registers: DebugCtl (MSR 1D9h: bit 0 LBR, bit 1 BTF,
bits 5:2 PB3:0, the rest MBZ) and the read-only LastBranchFromIP/ToIP
(1DBh/1DCh) and LastExceptionFromIP/ToIP (1DDh/1DEh).  While DebugCtl.LBR is set:

* a taken branch -- JMP, a taken Jcc, LOOPcc or JrCXZ, CALL, RET, IRET, far
  transfers, SYSCALL/SYSRET/SYSENTER/SYSEXIT -- loads LastBranchFromIP with the
  branch's address and LastBranchToIP with its target;
* an exception or interrupt first copies LastBranchFromIP/ToIP into
  LastExceptionFromIP/ToIP (the last branch taken before it), then records
  itself: from the instruction that raised it (or was interrupted, or the INT n)
  to the first instruction of its handler;
* a #DB clears DebugCtl.LBR and BTF before its handler runs and is not recorded,
  which leaves the records as they were (SDM vol. 3 §17.4.2, the P6 model of
  these MSRs that the APM's DebugCtl follows).

World switches are not branches: VMRUN and #VMEXIT record nothing.  With LBR
virtualization (VMCB 0B8h bit 0), VMRUN saves the host's five registers and
loads the guest's from the VMCB's state-save area (DBGCTL 670h, BR_FROM,
BR_TO, LASTEXCPFROM, LASTEXCPTO), and #VMEXIT stores the guest's there and
restores the host's; without it host and guest share the registers -- the
guest's branches "leak" to the host and the other way (kvm-unit-tests
svm_lbrv_test1-3 and svm_lbrv_nested_test1-3 check both).

QEMU's TCG records nothing.  So while DebugCtl.LBR is set every guest
instruction passes a per-instruction hook (a raw C callback, as the alignment
check's): a control transfer is decided at its own hook (a Jcc's condition from
RFLAGS, a LOOP's from RCX) and recorded at the next instruction's, whose
address is where it went -- or at the exception, interrupt or #VMEXIT that
comes first.  With DebugCtl.LBR clear nothing is paid.

Not modelled: BTF's single-stepping on branches only (the bit is kept and reads
back) and the performance-monitor pins PB0-PB3, which have nothing to drive.
"""
from __future__ import annotations

import struct
from typing import Callable

from capstone import x86_const as CX
from unicorn import Uc
from unicorn import x86_const as X

from ..arch import (M64, MSR_DEBUGCTL, MSR_LAST_BRANCH_FROM_IP, MSR_LAST_BRANCH_TO_IP, MSR_LAST_EXCEPTION_FROM_IP,
                    MSR_LAST_EXCEPTION_TO_IP)
from .cpustate import OFF_HFLAGS, CpuState, code_size
from .decode import capstone_decoders
from .engine import RawCodeHook
from .events import Vec
from .vmcb import OFF_DBGCTL, OFF_VIRT_EXT, VirtExt

DEBUGCTL_LBR, DEBUGCTL_BTF = 1 << 0, 1 << 1
#: LBR, BTF, PB0-PB3; bits 63:6 are MBZ (a WRMSR setting one is #GP(0))
DEBUGCTL_VALID = 0x3F
#: the four record MSRs (read-only: WRMSR is #GP(0))
RECORD_MSRS = (MSR_LAST_BRANCH_FROM_IP, MSR_LAST_BRANCH_TO_IP, MSR_LAST_EXCEPTION_FROM_IP, MSR_LAST_EXCEPTION_TO_IP)
LBR_MSRS = frozenset({MSR_DEBUGCTL, *RECORD_MSRS})
#: DBGCTL, BR_FROM, BR_TO, LASTEXCPFROM, LASTEXCPTO: consecutive in the state-save area
_STATE = struct.Struct("<5Q")
_LBRV = int(VirtExt.LBR_VIRTUALIZATION)
_RFLAGS = X.UC_X86_REG_RFLAGS
_QHFLAGS = OFF_HFLAGS >> 3

# what an instruction is, as far as recording goes: (kind, condition code, count mask)
_NOT, _ALWAYS, _JCC, _LOOPNE, _LOOPE, _LOOP, _JRCXZ = range(7)
_NOT_BRANCH = (_NOT, 0, 0)
_UNCONDITIONAL = frozenset({
    CX.X86_INS_JMP, CX.X86_INS_LJMP, CX.X86_INS_CALL, CX.X86_INS_LCALL, CX.X86_INS_RET, CX.X86_INS_RETF,
    CX.X86_INS_RETFQ, CX.X86_INS_IRET, CX.X86_INS_IRETD, CX.X86_INS_IRETQ, CX.X86_INS_SYSCALL,
    CX.X86_INS_SYSRET, CX.X86_INS_SYSRETQ, CX.X86_INS_SYSENTER, CX.X86_INS_SYSEXIT, CX.X86_INS_SYSEXITQ})
#: decoders by code-segment size: 64-bit, 32-bit (CS.D), 16-bit
_DECODERS = capstone_decoders(detail=True)


def classify(code: bytes, bits: int = 64) -> tuple[int, int, int]:
    """What recording needs of the instruction at the start of ``code`` in a
    ``bits``-bit code segment: ``(kind, condition code, mask of the count
    register)``.  INT n, INT3 and INTO are not branches here: the model delivers
    them, as events.  (Direct far JMP/CALL exist outside 64-bit mode only; LOOP
    and JrCXZ count with the address size: RCX, ECX or CX.)"""
    ins = next(_DECODERS[bits].disasm(code, 0, 1), None)
    if ins is None:
        return _NOT_BRANCH
    if ins.id in _UNCONDITIONAL:
        return (_ALWAYS, 0, 0)
    op = ins.opcode
    if 0x70 <= op[0] <= 0x7F:
        return (_JCC, op[0] & 0xF, 0)
    if op[0] == 0x0F and 0x80 <= op[1] <= 0x8F:
        return (_JCC, op[1] & 0xF, 0)
    if 0xE0 <= op[0] <= 0xE3:           # LOOPNE LOOPE LOOP JrCXZ: RCX, or ECX with 67h
        return (_LOOPNE + op[0] - 0xE0, 0, (1 << (8 * ins.addr_size)) - 1)
    return _NOT_BRANCH


def condition(cc: int, rflags: int) -> bool:
    """Jcc's condition ``cc`` (the opcode's low nibble) on ``rflags`` (APM vol. 3 "Jcc")."""
    cf, pf, zf = rflags & 1, rflags >> 2 & 1, rflags >> 6 & 1
    sf, of = rflags >> 7 & 1, rflags >> 11 & 1
    base = (of, cf, zf, cf | zf, sf, pf, sf ^ of, zf | (sf ^ of))[cc >> 1]
    return bool(base) != bool(cc & 1)


class BranchRecords:
    """DebugCtl, the last-branch and last-exception records, and their
    virtualization (see the module)."""

    def __init__(self, uc: Uc, st: CpuState) -> None:
        self._uc, self._st = uc, st
        self._hook = RawCodeHook(uc, self._step)
        self.dbgctl = self.br_from = self.br_to = self.ex_from = self.ex_to = 0
        #: the address of a taken control transfer not yet recorded (its target is the next instruction)
        self._pending: int | None = None
        #: the host's five registers while a guest with LBR virtualization runs
        self._host: tuple[int, int, int, int, int] | None = None
        #: the current VMCB asked for LBR virtualization at its last VMRUN
        self.latched = False
        #: the last #VMEXIT put the host's registers back: the next VMRUN must load the guest's
        self.reload = False
        #: anything to do at a world switch or an event: DebugCtl is not zero, or the
        #: current VMCB has LBR virtualization (its #VMEXIT stores the guest's registers)
        self.engaged = False
        #: RDMSR is hooked (with nothing recorded yet, Unicorn's RDMSR already reads the MSRs as 0)
        self._rdmsr_hooked = False
        self._classes: dict[tuple[bytes, int], tuple[int, int, int]] = {}

    def connect(self, insn_bytes: Callable[[int], bytes], restart_slice: Callable[[], bool],
                fail: Callable[[str, BaseException | None], None], hook_rdmsr: Callable[[], None]) -> None:
        self._insn_bytes, self._restart_slice, self._fail = insn_bytes, restart_slice, fail
        self._hook_rdmsr = hook_rdmsr

    # ------------------------------------------------------------------ MSRs
    def rdmsr(self, msr: int) -> int:
        """RDMSR of one of :data:`LBR_MSRS`."""
        if msr == MSR_DEBUGCTL:
            return self.dbgctl
        return (self.br_from, self.br_to, self.ex_from, self.ex_to)[RECORD_MSRS.index(msr)]

    def wrmsr(self, msr: int, value: int) -> bool:
        """WRMSR of one of :data:`LBR_MSRS`; False for #GP(0) (a record MSR, or a
        reserved DebugCtl bit)."""
        if msr != MSR_DEBUGCTL or value & ~DEBUGCTL_VALID:
            return False
        self.dbgctl = value
        self._changed()
        return True

    def reset(self) -> None:
        """All five registers zero, nothing pending or saved (a machine restored to a snapshot)."""
        self.dbgctl = self.br_from = self.br_to = self.ex_from = self.ex_to = 0
        self._pending = self._host = None
        self.latched = self.reload = False
        self._changed()

    @property
    def clear(self) -> bool:
        """All five registers zero, nothing pending or saved (what :meth:`reset` leaves)."""
        return not (self.dbgctl or self.br_from or self.br_to or self.ex_from or self.ex_to
                    or self._pending is not None or self._host is not None or self.latched)

    # ---------------------------------------------------------- world switch
    def vmrun(self, view, vmcb_hpa: int) -> None:
        """VMRUN loaded the VMCB at ``vmcb_hpa``: with LBR virtualization the
        host's registers are put aside and the guest's loaded (§15.23)."""
        self.latched = bool(view[vmcb_hpa + OFF_VIRT_EXT] & _LBRV)
        self.reload = False
        if self.latched:
            if self._host is None:
                self._host = self._regs()
            dbgctl, self.br_from, self.br_to, self.ex_from, self.ex_to = _STATE.unpack_from(view, vmcb_hpa + OFF_DBGCTL)
            self.dbgctl = dbgctl & DEBUGCTL_VALID
        self._changed()

    def vmexit(self, view, vmcb_hpa: int, rip: int) -> None:
        """#VMEXIT at guest ``rip``: a branch that reached ``rip`` is recorded
        first; with LBR virtualization the guest's registers go to the VMCB and
        the host's come back.  (The world switch calls this only while
        :attr:`engaged`; a run that stops without a #VMEXIT calls it too, so the
        next VMRUN loads what the guest had.)"""
        self._settle(rip)
        if self._host is not None:
            _STATE.pack_into(view, vmcb_hpa + OFF_DBGCTL, *self._regs())
            self.dbgctl, self.br_from, self.br_to, self.ex_from, self.ex_to = self._host
            self._host = None
            self.reload = self.latched      # a VMRUN of the same VMCB loads the guest's again
        self._changed()

    def _regs(self) -> tuple[int, int, int, int, int]:
        return self.dbgctl, self.br_from, self.br_to, self.ex_from, self.ex_to

    # ----------------------------------------------------------------- events
    def event(self, vector: int, from_rip: int, to_rip: int) -> None:
        """An exception or interrupt was delivered: raised by or taken at the
        instruction at ``from_rip``, its handler at ``to_rip``."""
        self._settle(from_rip)
        if vector == Vec.DB:
            if self.dbgctl & (DEBUGCTL_LBR | DEBUGCTL_BTF):
                self.dbgctl &= ~(DEBUGCTL_LBR | DEBUGCTL_BTF)
                self._changed()
            return
        if self.dbgctl & DEBUGCTL_LBR:
            self.ex_from, self.ex_to = self.br_from, self.br_to
            self.br_from, self.br_to = from_rip & M64, to_rip & M64

    def _settle(self, rip: int) -> None:
        """The pending branch reached ``rip`` (recorded), unless ``rip`` is the branch
        itself: it faulted there, or an event was taken before it ran (a branch to
        itself was recorded when the hook saw it again)."""
        p = self._pending
        if p is not None:
            self._pending = None
            if p != rip:
                self.br_from, self.br_to = p, rip & M64

    # --------------------------------------------------------------- the hook
    def _changed(self) -> None:
        """DebugCtl or the virtualization changed: the per-instruction hook follows
        DebugCtl.LBR (switched between two slices of a run)."""
        recording = bool(self.dbgctl & DEBUGCTL_LBR)
        if not recording:
            self._pending = None
        self.engaged = bool(self.dbgctl) or self.latched or self._host is not None
        if (recording != self._hook.active or (self.engaged and not self._rdmsr_hooked)) \
                and not self._restart_slice():
            self.apply()

    def apply(self) -> None:
        """Put the hook in the state DebugCtl asks for (outside ``emu_start``)."""
        self._hook.switch(bool(self.dbgctl & DEBUGCTL_LBR))
        if self.engaged and not self._rdmsr_hooked:
            self._rdmsr_hooked = True
            self._hook_rdmsr()

    def _step(self, handle, address: int, size: int, user_data) -> None:
        """The per-instruction hook (called from C: must not raise)."""
        try:
            if not self.dbgctl & DEBUGCTL_LBR:
                return                           # a block translated while it was on
            p = self._pending
            if p is not None:                     # the last instruction branched here
                self._pending = None
                self.br_from, self.br_to = p, address
            key = (self._insn_bytes(address)[:size], code_size(self._st.q[_QHFLAGS]))
            c = self._classes.get(key)
            if c is None:
                if len(self._classes) > 4096:
                    self._classes.clear()
                c = self._classes[key] = classify(*key)
            kind = c[0]
            if kind == _NOT:
                return
            if kind == _ALWAYS:
                taken = True
            elif kind == _JCC:
                taken = condition(c[1], self._st.reg_read(_RFLAGS))
            else:
                mask = c[2]
                count = self._st.gpr(1) & mask
                if kind == _JRCXZ:
                    taken = count == 0
                else:
                    taken = (count - 1) & mask != 0
                    if taken and kind != _LOOP:
                        zf = bool(self._st.reg_read(_RFLAGS) & 0x40)
                        taken = zf == (kind == _LOOPE)
            if taken:
                self._pending = address
        except BaseException as e:               # never let an exception unwind through C
            self._fail(f"internal error recording branches at {address:#x}: {type(e).__name__}: {e}", e)
