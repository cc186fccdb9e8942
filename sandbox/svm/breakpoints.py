"""Hardware instruction breakpoints that follow DR0-DR3 and DR7, whoever writes them.

QEMU keeps one breakpoint object on the CPU for each instruction breakpoint
DR7 enables, made when guest code moves to DR7 or to an enabled DR0-DR3
(``cpu_x86_update_dr7``, ``helper_set_dr``); translation consults those
objects, not DR7.  The model writes the debug registers in other ways: VMRUN
loads DR7 from the VMCB as a register (APM vol. 2 §15.5.1), a fuzz case's
restore and a reused state load copy the whole CPU state back.  None of that
reached QEMU's objects: a breakpoint one guest armed fired in the next guest
or the next fuzz case, and one a hypervisor set through the VMCB never fired.

:class:`HardwareBreakpoints` makes the objects match DR0-DR3 and DR7 before
every slice of guest execution (:meth:`~HardwareBreakpoints.apply`): when
QEMU's list differs from what DR7 enables, every CPU breakpoint is removed
and DR7's are installed by QEMU's own ``cpu_x86_update_dr7`` (called with a
DR7 that enabled nothing before, so it removes nothing).  A VMRUN inside a
hook that loads debug registers QEMU does not hold ends the slice
(:meth:`~HardwareBreakpoints.loaded_in_hook`).  A guest that enables no
breakpoint pays a few word reads per slice.

Unicorn builds QEMU without watchpoints, so data breakpoints (R/W = 01b or
11b) never fire, here as under Unicorn alone; an enabled I/O breakpoint sets
QEMU's HF_IOBPT flag, as its own DR7 write does.

Like :mod:`.soft_tlb`, this module reaches into libunicorn's internals: the
breakpoint list's head in QEMU's ``CPUState`` and ``env->cpu_breakpoint[4]``
right after ``env->dr[8]`` (QEMU 5.0's ``CPUX86State``), located and checked
once on a scratch engine (:func:`layout`).
"""
from __future__ import annotations

import ctypes
import struct
from typing import Callable

from unicorn import UC_PROT_ALL, Uc
from unicorn.unicorn_py3.unicorn import uclib

from .cpustate import INTERNALS, OFF_DR, OFF_HFLAGS, CpuState, engine_cell, engine_memory, live_env, missing
from .engine import TCG_BUFFER_SMALL, pointer_arg, x86_64_engine

#: QEMU's flag on the breakpoints DR7 made (include/hw/core/cpu.h)
BP_CPU = 0x20
#: DR7 bit 10 reads as 1 (QEMU ORs it in); R/W and LEN of breakpoint i at bits 16 + 4i
DR7_FIXED_1 = 0x400
#: QEMU's "an I/O breakpoint is enabled" hflag (target/i386/cpu.h HF_IOBPT_SHIFT)
HF_IOBPT = 1 << 24
_TYPE_EXEC, _TYPE_IO = 0, 2

#: ``struct CPUBreakpoint``: ``vaddr pc; int flags; QTAILQ_ENTRY entry`` (its next pointer first)
_NODE = struct.Struct("<Qi4xQ")
_Q = struct.Struct("<Q")
#: ``env->cpu_breakpoint[4]`` follows ``env->dr[8]``
OFF_BP_POINTERS = OFF_DR + 64
_HEAD_NAME = "CPUState breakpoints"
_UPDATE_DR7 = "cpu_x86_update_dr7_x86_64"          # void (CPUX86State *env, uint32_t new_dr7)
_REMOVE_ALL = "cpu_breakpoint_remove_all_x86_64"   # void (CPUState *cpu, int mask)

_head_offset: int | None = None


def _c_function(name: str, *argtypes) -> Callable[..., None]:
    """QEMU's ``name`` from libunicorn, called keeping the GIL (it never calls back into Python)."""
    f = getattr(uclib, name, None)
    if f is None:
        raise missing(name)
    return ctypes.PYFUNCTYPE(None, *argtypes)(ctypes.cast(f, ctypes.c_void_p).value)


def enabled_breakpoints(dr7: int) -> tuple[list[int], bool]:
    """The instruction breakpoints DR7 enables (L or G set, R/W = 00b) by number,
    and whether it enables an I/O breakpoint (R/W = 10b)."""
    exec_bps, io = [], False
    for i in range(4):
        if dr7 >> (2 * i) & 3:
            kind = dr7 >> (16 + 4 * i) & 3
            if kind == _TYPE_EXEC:
                exec_bps.append(i)
            elif kind == _TYPE_IO:
                io = True
    return exec_bps, io


def _arm_two(a: int, b: int) -> Uc:
    """A scratch engine whose code moves ``a`` to DR0, ``b`` to DR1 and enables both as
    local instruction breakpoints: QEMU makes its two objects."""
    uc = x86_64_engine(TCG_BUFFER_SMALL)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    code = (b"\x48\xb8" + _Q.pack(a) + b"\x0f\x23\xc0"          # mov rax, a ; mov dr0, rax
            + b"\x48\xb8" + _Q.pack(b) + b"\x0f\x23\xc8"        # mov rax, b ; mov dr1, rax
            + b"\xb8\x05\x00\x00\x00\x0f\x23\xf8")              # mov eax, 5 ; mov dr7, rax
    uc.mem_write(0x1000, code)
    uc.emu_start(0x1000, 0x1000 + len(code))
    return uc


def _locate_head() -> int:
    """The offset of ``breakpoints.tqh_first`` in QEMU's ``CPUState``: with two
    breakpoints armed by guest code, the one word of the CPU object before its
    ``env`` that points to the first, whose node names the second as its next."""
    a, b = 0x5A5A_1000, 0x5A5A_2000
    uc = _arm_two(a, b)
    env = live_env(uc)
    cpu = engine_cell(uc, INTERNALS.engine_cpu).value
    p0, p1, p2, p3 = struct.unpack("<4Q", ctypes.string_at(env + OFF_BP_POINTERS, 32))
    if not p0 or not p1 or p2 or p3:
        raise missing("env cpu_breakpoint")
    if _NODE.unpack(ctypes.string_at(p0, _NODE.size)) != (a, BP_CPU, p1) \
            or _NODE.unpack(ctypes.string_at(p1, _NODE.size)) != (b, BP_CPU, 0):
        raise missing("CPUBreakpoint")
    words = ctypes.string_at(cpu, env - cpu)
    hits = [o for o in range(0, len(words) - 7, 8) if _Q.unpack_from(words, o)[0] == p0]
    if len(hits) != 1:
        raise missing(_HEAD_NAME)
    return hits[0]


def _self_test(head: int) -> None:
    """On a scratch engine with two breakpoints armed by its code: DR7 loaded as a
    register with only DR1 enabled, then with none, must leave QEMU's list
    holding DR1's alone, then nothing."""
    a, b = 0x5A5A_1000, 0x5A5A_2000
    uc = _arm_two(a, b)
    st = CpuState(uc)
    bps = HardwareBreakpoints(uc, st, head)
    want = []
    for dr7 in (DR7_FIXED_1 | 1 << 2, DR7_FIXED_1):
        st.q[OFF_DR // 8 + 7] = dr7
        bps.apply()
        want.append(bps.installed() == ([b] if dr7 & 4 else []) and st.q[OFF_DR // 8 + 7] == dr7)
    if not all(want):
        raise missing(_HEAD_NAME)


def layout() -> int:
    """The checked offset of the breakpoint list's head in ``CPUState`` (found once)."""
    global _head_offset
    if _head_offset is None:
        head = _locate_head()
        _self_test(head)
        _head_offset = head
    return _head_offset


class HardwareBreakpoints:
    """QEMU's instruction-breakpoint objects kept in line with DR0-DR3 and DR7."""

    def __init__(self, uc: Uc, st: CpuState, head: int | None = None) -> None:
        cpu = engine_cell(uc, INTERNALS.engine_cpu).value
        env = live_env(uc)
        self._head = engine_memory(uc, cpu + (layout() if head is None else head), ctypes.c_uint64)
        self._q = st.q
        self._dr = OFF_DR // 8                      # q index of DR0; DR7 at +7
        self._ptr = OFF_BP_POINTERS // 8            # q index of env->cpu_breakpoint[0]
        self._hf = OFF_HFLAGS // 8                  # hflags: the low half of this word
        assert OFF_DR % 8 == 0 and OFF_HFLAGS % 8 == 0
        update = _c_function(_UPDATE_DR7, ctypes.c_void_p, ctypes.c_uint32)
        remove_all = _c_function(_REMOVE_ALL, ctypes.c_void_p, ctypes.c_int)
        env_arg, cpu_arg = pointer_arg(env), pointer_arg(cpu)
        self._update = lambda dr7: update(env_arg, dr7)
        self._remove_all = lambda: remove_all(cpu_arg, BP_CPU)
        #: ends the running slice (the run loop's ``restart_slice``); set by :meth:`connect`
        self._restart: Callable[[], bool] = lambda: False
        #: resynchronizations made (what tests and the curious read)
        self.resyncs = 0

    def connect(self, restart_slice: Callable[[], bool]) -> None:
        self._restart = restart_slice

    def _nodes(self) -> list[tuple[int, int]]:
        """QEMU's CPU breakpoints in list order: (the node's address, its pc)."""
        out, n = [], self._head.value
        while n:
            pc, flags, nxt = _NODE.unpack(ctypes.string_at(n, _NODE.size))
            if flags & BP_CPU:
                out.append((n, pc))
            n = nxt
        return out

    def installed(self) -> list[int]:
        """The addresses of QEMU's CPU breakpoints, in list order."""
        return [pc for _, pc in self._nodes()]

    def _idle(self) -> bool:
        """Nothing installed, nothing enabled, no breakpoint pointer, no I/O flag."""
        q, p = self._q, self._ptr
        return not (self._head.value or q[self._dr + 7] & 0xFF or q[p] or q[p + 1] or q[p + 2] or q[p + 3]
                    or q[self._hf] & HF_IOBPT)

    def in_step(self) -> bool:
        """QEMU's objects and pointers are what DR0-DR3 and DR7 make them."""
        if self._idle():
            return True
        q, d, p = self._q, self._dr, self._ptr
        exec_bps, io = enabled_breakpoints(q[d + 7])
        if bool(q[self._hf] & HF_IOBPT) != io:
            return False
        nodes = self._nodes()
        if len(nodes) != len(exec_bps):
            return False
        at = dict(nodes)
        for i in range(4):
            ptr = q[p + i]
            if i in exec_bps:
                if at.get(ptr) != q[d + i] or not ptr:
                    return False
            elif ptr:
                return False
        return True

    def apply(self) -> None:
        """Between slices: remove QEMU's CPU breakpoints and install DR7's when they differ."""
        if self.in_step():
            return
        self.resyncs += 1
        q, d, p = self._q, self._dr, self._ptr
        self._remove_all()
        q[p] = q[p + 1] = q[p + 2] = q[p + 3] = 0
        dr7 = q[d + 7]
        q[d + 7] = DR7_FIXED_1                      # nothing enabled: the update removes nothing
        self._update(dr7 & 0xFFFF_FFFF)             # installs, sets or clears HF_IOBPT
        q[d + 7] = dr7                              # the register as it was loaded

    def loaded_in_hook(self) -> None:
        """A VMRUN inside a hook loaded the debug registers: when QEMU's objects no
        longer match, forget the pointers (a guest's own DR7 write would free
        through them) and end the slice, so :meth:`apply` runs before the next."""
        if self.in_step():
            return
        p = self._ptr
        q = self._q
        q[p] = q[p + 1] = q[p + 2] = q[p + 3] = 0
        self._restart()
