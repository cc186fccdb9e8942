"""SYSCALL, SYSENTER and SYSEXIT: the fast system-call instructions, carried out by the model.

Unicorn 2.1.4 replaces QEMU's helpers of SYSCALL and SYSENTER with a call of
its UC_HOOK_INSN hooks and a step over the instruction, so on Unicorn alone a
guest's SYSCALL does nothing at all: no transfer to the kernel entry, no #UD
with EFER.SCE = 0.  And Unicorn's CPU model is Intel's, where SYSENTER and
SYSEXIT are valid in 64-bit mode; on this (AMD) processor they are #UD in long
mode.  SVM has no intercept for any of them (APM vol. 2 §15.9-15.13), so the
processor hooks them always (:data:`~.decision.ALWAYS`) and does them here,
before Unicorn runs them.  SYSRET is QEMU's own helper, and so is SYSEXIT
outside long mode.

APM vol. 3, "SYSCALL" and "SYSENTER" (the operation pseudocode):

* SYSCALL: #UD when EFER.SCE = 0.  In long mode RCX = the next RIP, R11 =
  RFLAGS with RF clear, RFLAGS &= ~(SFMASK | RF); CS = STAR[47:32] & FFFCh,
  a flat 64-bit code segment of DPL 0; SS = STAR[47:32] + 8, flat data; RIP
  = LSTAR from 64-bit mode, CSTAR from compatibility mode.  In legacy mode
  ECX = the next EIP, RFLAGS.VM, IF and RF clear, CS and SS flat 32-bit
  segments from the same selectors, EIP = STAR[31:0].
* SYSENTER: #UD in long mode; #GP(0) in real mode or with SYSENTER_CS null;
  else CS = SYSENTER_CS, SS = SYSENTER_CS + 8, flat 32-bit segments of DPL 0,
  ESP = SYSENTER_ESP, EIP = SYSENTER_EIP, RFLAGS.VM, IF and RF clear.
* SYSEXIT: #UD in long mode.

The descriptor caches loaded are the fixed flat ones the pseudocode gives
(the GDT is not read), with the Accessed bit set, as QEMU's own helpers load
them.  A single step (RFLAGS.TF) traps after the instruction when TF is still
set once it is done: SYSCALL's SFMASK can clear it, so the kernel entry is not
trapped (QEMU's "TF is checked after the syscall insn completes").
"""
from __future__ import annotations

from typing import Callable

from unicorn import Uc
from unicorn import x86_const as X

from ..arch import (CR0_PE, EFER_LMA, EFER_SCE, MSR_CSTAR, MSR_LSTAR, MSR_SFMASK, MSR_STAR, MSR_SYSENTER_CS,
                    MSR_SYSENTER_EIP, MSR_SYSENTER_ESP, RFLAGS_IF, RFLAGS_RF, RFLAGS_VM)
from . import decode as D
from .cpustate import (DESC_A, DESC_B, DESC_CS, DESC_G, DESC_L, DESC_P, DESC_S, DESC_W, HF_CS64, R_CS, R_SS,
                       CpuState)
from .events import Vec

M32, M64 = 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF

#: the flat DPL-0 code segment SYSCALL loads in long mode (L = 1, D = 0) and in legacy mode (D = 1);
#: DESC_W is a code segment's R bit
CODE64 = DESC_G | DESC_P | DESC_S | DESC_CS | DESC_W | DESC_A | DESC_L
CODE32 = DESC_G | DESC_B | DESC_P | DESC_S | DESC_CS | DESC_W | DESC_A
#: the flat DPL-0 stack segment both instructions load (B = 1, writable)
STACK = DESC_G | DESC_B | DESC_P | DESC_S | DESC_W | DESC_A

Raise = Callable[[int, int | None, int], None]
Completed = Callable[[int], None]


class FastSyscalls:
    """The model's SYSCALL, SYSENTER and SYSEXIT (see the module's docstring)."""

    def __init__(self, uc: Uc, st: CpuState) -> None:
        self._uc, self._st = uc, st
        self._raise: Raise = lambda vector, err, rip: None
        self._completed: Completed = lambda rip: None

    def connect(self, raise_exception: Raise, completed: Completed) -> None:
        """Bind exception delivery (``raise(vector, error code, rip)``) and the end
        of an instruction the model carried out (``completed(next rip)``: RIP, and
        the single-step trap)."""
        self._raise, self._completed = raise_exception, completed

    def handlers(self) -> dict[D.Kind, Callable[..., None]]:
        """The native handlers, by instruction kind."""
        return {D.Kind.SYSCALL: self.syscall, D.Kind.SYSENTER: self.sysenter, D.Kind.SYSEXIT: self.sysexit}

    def _msr(self, msr: int) -> int:
        return self._uc.reg_read(X.UC_X86_REG_MSR, msr)

    def syscall(self, address: int, insn: D.Insn, st: CpuState, view, code: bytes) -> None:
        if not st.efer & EFER_SCE:
            self._raise(Vec.UD, None, address)
            return
        nxt = address + insn.length
        star = self._msr(MSR_STAR)
        sel = (star >> 32) & 0xFFFF
        rflags = st.reg_read(X.UC_X86_REG_RFLAGS)
        if st.efer & EFER_LMA:
            target = self._msr(MSR_LSTAR if st.hflags & HF_CS64 else MSR_CSTAR)
            st.set_gpr(1, nxt & M64)                        # RCX
            st.set_gpr(11, rflags & ~RFLAGS_RF)             # R11
            st.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~(self._msr(MSR_SFMASK) & M32 | RFLAGS_RF))
            code_flags = CODE64
        else:
            target = star & M32
            st.set_gpr(1, nxt & M32)                        # ECX (the upper half is left as it was)
            st.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~(RFLAGS_VM | RFLAGS_IF | RFLAGS_RF))
            code_flags = CODE32
        st.set_seg(R_CS, sel & 0xFFFC, 0, M32, code_flags)
        st.set_seg(R_SS, (sel + 8) & 0xFFFC, 0, M32, STACK)
        self._completed(target)

    def sysenter(self, address: int, insn: D.Insn, st: CpuState, view, code: bytes) -> None:
        if st.efer & EFER_LMA:
            self._raise(Vec.UD, None, address)
            return
        cs = self._msr(MSR_SYSENTER_CS) & 0xFFFF
        if not st.cr(0) & CR0_PE or not cs & 0xFFFC:
            self._raise(Vec.GP, 0, address)
            return
        rflags = st.reg_read(X.UC_X86_REG_RFLAGS)
        st.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~(RFLAGS_VM | RFLAGS_IF | RFLAGS_RF))
        st.set_seg(R_CS, cs & 0xFFFC, 0, M32, CODE32)
        st.set_seg(R_SS, (cs + 8) & 0xFFFC, 0, M32, STACK)
        st.set_gpr(4, self._msr(MSR_SYSENTER_ESP) & M32)
        self._completed(self._msr(MSR_SYSENTER_EIP) & M32)

    def sysexit(self, address: int, insn: D.Insn, st: CpuState, view, code: bytes) -> None:
        if st.efer & EFER_LMA:
            self._raise(Vec.UD, None, address)
