"""Alignment checking: #AC(0) for a misaligned data access at CPL 3 with CR0.AM and
RFLAGS.AC set (APM vol. 2 §8.2.18; SDM vol. 3 §6.15, "Interrupt 17").

QEMU's TCG -- so Unicorn -- never checks alignment, and a memory hook cannot stop
the access it reports.  So while the guest's CR0.AM is set, every instruction
passes a per-instruction hook first (a raw C callback, as the soundness audit's):
at CPL 3 with RFLAGS.AC it decodes the instruction (capstone, cached by its
bytes) and raises #AC before it runs when a 2-, 4- or 8-byte data access --
an explicit memory operand, or the stack slot a PUSH, POP, CALL or RET uses --
is not aligned to its size.  The hook runs after the candidate hooks of the same
instruction, so an instruction intercept comes first (APM §15.7).  With CR0.AM
clear (every guest that does not ask for alignment checks) nothing is paid.

What is not checked: operands of other sizes (x87 80-bit, 16-byte SSE, whose
alignment rules are #GP ones), segment bases other than FS and GS (64-bit mode
ignores them), and the implicit accesses of far transfers and string I/O.
"""
from __future__ import annotations

from typing import Callable

from capstone import x86_const as CX
from unicorn import Uc
from unicorn import x86_const as X

from ..arch import M64
from .cpustate import OFF_HFLAGS, CpuState, code_size
from .decode import capstone_decoders
from .engine import RawCodeHook
from .events import Vec

CR0_AM = 1 << 18
RFLAGS_AC = 1 << 18
_QHFLAGS = OFF_HFLAGS >> 3
#: instructions whose memory operand is not a data access
_NO_ACCESS = frozenset({CX.X86_INS_LEA, CX.X86_INS_NOP, CX.X86_INS_PREFETCH, CX.X86_INS_PREFETCHW,
                        CX.X86_INS_PREFETCHNTA, CX.X86_INS_PREFETCHT0, CX.X86_INS_PREFETCHT1,
                        CX.X86_INS_PREFETCHT2, CX.X86_INS_CLFLUSH, CX.X86_INS_CLFLUSHOPT, CX.X86_INS_CLWB,
                        CX.X86_INS_INVLPG, CX.X86_INS_INVLPGA})
_PUSHES = frozenset({CX.X86_INS_PUSH, CX.X86_INS_PUSHFQ, CX.X86_INS_PUSHF, CX.X86_INS_CALL})
_POPS = frozenset({CX.X86_INS_POP, CX.X86_INS_POPFQ, CX.X86_INS_POPF, CX.X86_INS_RET})
_CHECKED_SIZES = (2, 4, 8)
_CS = capstone_decoders(detail=True)


def _uc_reg(cs_reg: int) -> int:
    """The Unicorn register id of capstone register ``cs_reg``."""
    return getattr(X, "UC_X86_REG_" + _CS[64].reg_name(cs_reg).upper())


#: one access an instruction makes: ("mem", segment, base, index, scale, disp, size, rip-relative
#: next RIP offset or 0) with Unicorn register ids (0: none), or ("push" | "pop", size)
Access = tuple


def accesses(code: bytes, mode: int = 64) -> tuple[Access, ...] | None:
    """The data accesses alignment checking looks at for the instruction at the start of
    ``code`` in a ``mode``-bit code segment (None: it does not decode)."""
    ins = next(_CS[mode].disasm(code, 0, 1), None)
    if ins is None:
        return None
    out: list[Access] = []
    if ins.id not in _NO_ACCESS:
        for op in ins.operands:
            if op.type != CX.X86_OP_MEM or op.size not in _CHECKED_SIZES:
                continue
            m = op.mem
            rip_rel = m.base == CX.X86_REG_RIP
            out.append(("mem", _uc_reg(m.segment) if m.segment in (CX.X86_REG_FS, CX.X86_REG_GS) else 0,
                        0 if rip_rel or not m.base else _uc_reg(m.base), _uc_reg(m.index) if m.index else 0,
                        m.scale, m.disp, op.size, ins.size if rip_rel else 0))
    # a stack slot: the operand size (64-bit mode: 8, or 2 with 66; elsewhere the segment's, 66 the other)
    o16 = code[:1] == b"\x66" and ins.id in (CX.X86_INS_PUSH, CX.X86_INS_POP)
    slot = (2 if o16 else 8) if mode == 64 else ((2 if mode == 32 else 4) if o16 else mode // 8)
    if ins.id in _PUSHES:
        out.append(("push", slot))
    elif ins.id in _POPS:
        out.append(("pop", slot))
    return tuple(out)


_SEG_BASE = {X.UC_X86_REG_FS: X.UC_X86_REG_FS_BASE, X.UC_X86_REG_GS: X.UC_X86_REG_GS_BASE}


class AlignmentCheck:
    """#AC at CPL 3 while CR0.AM and RFLAGS.AC are set (see the module)."""

    def __init__(self, uc: Uc, st: CpuState) -> None:
        self._uc, self._st = uc, st
        self._hook = RawCodeHook(uc, self._step)
        #: the guest's CR0.AM as last seen (VMRUN, MOV to CR0): the hook should be on
        self.wanted = False
        self._decoded: dict[tuple[bytes, int], tuple[Access, ...] | None] = {}

    def connect(self, insn_bytes: Callable[[int], bytes], raise_exception: Callable[..., None],
                restart_slice: Callable[[], bool], fail: Callable[[str, BaseException | None], None]) -> None:
        self._insn_bytes, self._raise = insn_bytes, raise_exception
        self._restart_slice, self._fail = restart_slice, fail

    def cr0(self, value: int) -> None:
        """The guest's CR0 is ``value`` from now on (a VMRUN loaded it, or a MOV to CR0 is
        about to write it): the per-instruction hook follows CR0.AM.  Switching it needs
        the translated blocks dropped, which happens between two slices of the run."""
        want = bool(value & CR0_AM)
        if want == self.wanted:
            return
        self.wanted = want
        if not self._restart_slice():
            self.apply()

    def apply(self) -> None:
        """Put the hook in the state :attr:`wanted` asks for (outside ``emu_start``)."""
        self._hook.switch(self.wanted)

    def _step(self, handle, address: int, size: int, user_data) -> None:
        """The per-instruction hook (called from C: must not raise)."""
        try:
            if not self.wanted:
                return                           # a block translated while it was on
            st = self._st
            if st.q[_QHFLAGS] & 3 != 3:
                return
            rd = self._uc.reg_read
            if not rd(X.UC_X86_REG_RFLAGS) & RFLAGS_AC:
                return
            code = self._insn_bytes(address)
            key = (code, code_size(st.q[_QHFLAGS]))
            acc = self._decoded.get(key, False)
            if acc is False:
                if len(self._decoded) > 4096:
                    self._decoded.clear()
                acc = self._decoded[key] = accesses(*key)
            for a in acc or ():
                if a[0] == "mem":
                    _, seg, base, index, scale, disp, n, rip_len = a
                    ea = disp + (rd(base) if base else 0) + (rd(index) * scale if index else 0)
                    if rip_len:
                        ea += address + rip_len
                    if seg:
                        ea += rd(_SEG_BASE[seg])
                else:
                    n = a[1]
                    ea = rd(X.UC_X86_REG_RSP) - (n if a[0] == "push" else 0)
                if ea & M64 & (n - 1):
                    self._raise(Vec.AC, 0, address)
                    return
        except BaseException as e:               # never let an exception unwind through C
            self._fail(f"internal error in the alignment check at {address:#x}: {type(e).__name__}: {e}", e)
