"""The VMCB's state-save area as the hypervisor sees it between a #VMEXIT and
the next VMRUN (APM §15.5.1, §15.6).

#VMEXIT writes RIP, RSP, RAX and the exit fields at once; the rest of the
guest state (segments, descriptor tables, CPL, EFER, control and debug
registers, RFLAGS) stays in the processor and is written into the VMCB only
when something may read it (:meth:`StateSaveArea.flush_guest_state`, called
through ``HostMemory``'s sync hook).  The guest's other GPRs are not in the
VMCB at all: the hypervisor reads and writes them in the processor, where the
next VMRUN finds them (as on hardware).
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from unicorn import x86_const as X

from ..arch import EFER_SVME, M64
from .cpustate import (DESC_L, HF_CPL_MASK, OFF_CR, OFF_DR, OFF_EFER as CTX_EFER, OFF_GDT, OFF_HFLAGS, OFF_IDT,
                       OFF_SEGS, R_CS, R_ES, SEG_SIZE,
                       CpuState, attrib_to_flags, code_size, flags_to_attrib)
from .controls import GuestControls
from .vmcb import (OFF_CPL, OFF_CR2, OFF_CR4, OFF_EFER, OFF_RAX, OFF_RFLAGS, OFF_RIP, OFF_RSP,
                   SEG_RECORD_SIZE, SEGMENTS)

if TYPE_CHECKING:
    from .world_switch import SwitchState

_Q = struct.Struct("<Q")
_SEGREC = struct.Struct("<HHIQ")     # VMCB segment record: selector, attrib, limit, base
_CR4_TO_DR6 = struct.Struct("<5Q")    # CR4, CR3, CR0, DR7, DR6
_RIP, _RFLAGS = X.UC_X86_REG_RIP, X.UC_X86_REG_RFLAGS
#: ES, CS, SS, DS as the processor's context holds them (selector, base, limit, flags each) ...
_CTX_DATA_SEGS = struct.Struct("<" + "I4xQII" * 4)
#: ... and as the VMCB does (selector, attrib, limit, base each; contiguous from ES)
_VMCB_DATA_SEGS = struct.Struct("<" + "HHIQ" * 4)
#: GDTR and IDTR in the context: adjacent segment caches, base and limit of each
_CTX_DTABLES = struct.Struct("<8xQI4x8xQI4x")
_VMCB_GDTR, _VMCB_IDTR = SEGMENTS["GDTR"], SEGMENTS["IDTR"]
#: qword indices into the context (``CpuState.q``): cr[0], dr[0], EFER
_Q_CR, _Q_DR, _Q_EFER = OFF_CR >> 3, OFF_DR >> 3, CTX_EFER >> 3
if (OFF_CR | OFF_DR | CTX_EFER) & 7 or OFF_IDT != OFF_GDT + _CTX_DTABLES.size // 2:
    raise ImportError("unicorn: CR, DR or EFER is not 8-byte aligned, or IDT does not follow GDT, in the CPU context")

#: the state-save fields a full VMRUN loads into the processor besides RIP/RSP/RAX/RFLAGS:
#: ES..TR, CPL..EFER, CR4..DR6, CR2; a change in them since the last load means "load again"
LOADED_RANGES = ((SEGMENTS["ES"], SEGMENTS["TR"] + SEG_RECORD_SIZE), (OFF_CPL, OFF_EFER + 8),
                 (OFF_CR4, OFF_RFLAGS), (OFF_CR2, OFF_CR2 + 8))
(_LO0, _HI0), (_LO1, _HI1), (_LO2, _HI2), (_LO3, _HI3) = LOADED_RANGES
#: the data segments VMRUN loads and #VMEXIT saves (FS, GS, TR, LDTR are VMLOAD/VMSAVE's)
SEGMENT_REGS = ("ES", "CS", "SS", "DS")


def put_seg(mv, at: int, seg: tuple[int, int, int, int]) -> None:
    """Store a (selector, base, limit, QEMU flags) segment as a VMCB record at ``at``."""
    sel, base, limit, flags = seg
    _SEGREC.pack_into(mv, at, sel, flags_to_attrib(flags), limit, base)


def get_seg(mv, at: int) -> tuple[int, int, int, int]:
    """The VMCB segment record at ``at`` as (selector, base, limit, QEMU flags)."""
    sel, attr, limit, base = _SEGREC.unpack_from(mv, at)
    return sel, base, limit, attrib_to_flags(attr)


class StateSaveArea:
    """The lazily written part of the current VMCB's state-save area, and the
    guest GPRs the processor keeps."""

    def __init__(self, st: CpuState, sw: "SwitchState", view: memoryview, ctl: GuestControls) -> None:
        self._st, self.sw, self._view, self._ctl = st, sw, view, ctl

    def snapshot_vmcb(self) -> bytes:
        """The state-save fields a full load takes, as bytes (see ``SwitchState.loaded``)."""
        b, mv = self._ctl.vmcb_hpa, self._view
        return (mv[b + _LO0:b + _HI0].tobytes() + mv[b + _LO1:b + _HI1].tobytes() + mv[b + _LO2:b + _HI2].tobytes()
                + mv[b + _LO3:b + _HI3].tobytes())

    def flush_guest_state(self) -> None:
        """Write the lazily saved part of the guest state into the VMCB."""
        sw = self.sw
        if not sw.lazy_pending:
            return
        sw.lazy_pending = False
        st = self._st
        q = st.q
        mv = self._view
        b = self._ctl.vmcb_hpa
        # ES, CS, SS, DS: four context records into four VMCB records, in one unpack and one pack
        s = _CTX_DATA_SEGS.unpack_from(st.data, OFF_SEGS + SEG_SIZE * R_ES)
        f0, f1, f2, f3 = s[3], s[7], s[11], s[15]
        _VMCB_DATA_SEGS.pack_into(
            mv, b + SEGMENTS["ES"],
            s[0], ((f0 >> 8) & 0xFF) | ((f0 >> 12) & 0xF00), s[2], s[1],
            s[4], ((f1 >> 8) & 0xFF) | ((f1 >> 12) & 0xF00), s[6], s[5],
            s[8], ((f2 >> 8) & 0xFF) | ((f2 >> 12) & 0xF00), s[10], s[9],
            s[12], ((f3 >> 8) & 0xFF) | ((f3 >> 12) & 0xF00), s[14], s[13])
        gdt_base, gdt_limit, idt_base, idt_limit = _CTX_DTABLES.unpack_from(st.data, OFF_GDT)
        _SEGREC.pack_into(mv, b + _VMCB_GDTR, 0, 0, gdt_limit, gdt_base)
        _SEGREC.pack_into(mv, b + _VMCB_IDTR, 0, 0, idt_limit, idt_base)
        mv[b + OFF_CPL] = st.data[OFF_HFLAGS] & HF_CPL_MASK      # hflags' low byte (little-endian)
        _Q.pack_into(mv, b + OFF_EFER, q[_Q_EFER] | EFER_SVME)
        _CR4_TO_DR6.pack_into(mv, b + OFF_CR4, q[_Q_CR + 4], q[_Q_CR + 3], q[_Q_CR], q[_Q_DR + 7], q[_Q_DR + 6])
        _Q.pack_into(mv, b + OFF_CR2, q[_Q_CR + 2])
        _Q.pack_into(mv, b + OFF_RFLAGS, st.reg_read(_RFLAGS))
        sw.loaded = self.snapshot_vmcb()

    def save_stopped_state(self) -> None:
        """A run stopped from outside (budget, watchdog, a debugger) with no
        #VMEXIT pending: write the guest state the processor holds into the
        VMCB's state-save area, as the #VMEXIT(INTR) of the host interrupt
        that stops a real guest would (APM §15.6), but without an exit code,
        so the next VMRUN resumes exactly where the guest stopped."""
        sw = self.sw
        st = self._st
        mv, b = self._view, self._ctl.vmcb_hpa
        rip = st.reg_read(_RIP)
        _Q.pack_into(mv, b + OFF_RIP, rip)
        _Q.pack_into(mv, b + OFF_RSP, st.gpr(4))
        _Q.pack_into(mv, b + OFF_RAX, st.gpr(0))
        sw.entry_rip = rip
        sw.lazy_pending = True
        self.flush_guest_state()

    def guest_gpr(self, i: int) -> int:
        """Guest GPR ``i`` (QEMU order: rax rcx rdx rbx rsp rbp rsi rdi r8-r15),
        as the processor holds it while the hypervisor runs."""
        return self._st.q[i]

    def guest_cs_long(self) -> bool:
        """CS.L of the guest as the processor holds it: the VMCB's CS.attrib
        bit 9, without the state-save write-back a VMCB read of it costs."""
        return bool(self._st.seg(R_CS)[3] & DESC_L)

    def guest_code_size(self) -> int:
        """The size of the guest's code segment as the processor runs it: 64 in 64-bit
        mode, else CS.D's 32 or 16 -- without a VMCB write-back."""
        return code_size(self._st.hflags)

    def guest_cpl(self) -> int:
        """The guest's CPL as the processor holds it (the VMCB's CPL field), without
        the state-save write-back a VMCB read of it costs."""
        return self._st.hflags & HF_CPL_MASK

    def set_guest_gpr(self, i: int, v: int) -> None:
        """Guest GPR ``i`` = ``v`` in the processor (the next VMRUN finds it there)."""
        self._st.q[i] = v & M64
