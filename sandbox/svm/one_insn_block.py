"""The next translated block holds one instruction: QEMU's ``cpu->cflags_next_tb``.

A guest store that overwrites the block running it (a code page the guest
writes, :mod:`.smc`) makes QEMU give up the storing instruction, with
nothing written, and run it again as a block of its own (its precise
self-modifying-code handling, ``tb_invalidate_phys_page_range``).  The
instruction's code hooks then fire twice.  For the candidate hook that is
harmless -- it decides again as before -- except where the hypervisor let
the instruction run once unintercepted (:meth:`~.scanner.Scanner.pass_once`,
SGDT [RIP+n] over its own block, say): the second firing would be taken for
a new execution and exit again, for ever.  So the instruction that runs
unintercepted is run as a one-instruction block from the start, which QEMU
never gives up (a store into a one-instruction block is completed, and the
block after it translated anew): the flag QEMU sets for that, in
``CPUState``, is set before the guest resumes.  The TLB fill sets it too,
for a while, at a page where QEMU was seen giving such a store up
(:meth:`~.fill.TlbFill._after_stores`): a guest that stores into its running
code once tends to at every instruction, and QEMU translates up to 512
instructions for each store it then gives up.

``cflags_next_tb`` is the field after QEMU 5.0's two ints, one pointer and
seven bools at the start of ``struct CPUState`` (include/hw/core/cpu.h),
-1 when unused; the engine keeps the ``CPUState *`` at the offset
:mod:`.cpustate` calibrates (``engine_cpu``).  The mechanism is checked once
on a scratch engine, block sizes and all, before it is used; where it does
not behave as checked, the sandbox refuses to start (the guarantee above
would not hold).
"""
from __future__ import annotations

import ctypes

from unicorn import UC_HOOK_BLOCK, UC_PROT_ALL, Uc

from .cpustate import INTERNALS, engine_cell, engine_memory
from .engine import TCG_BUFFER_SMALL, SelfTest, x86_64_engine

#: ``offsetof(CPUState, cflags_next_tb)`` on a 64-bit host
OFF_CFLAGS_NEXT_TB = 24
#: ``cflags_next_tb`` when no block is asked for, and the one-instruction block's
#: flags (CF_COUNT_MASK = 1; Unicorn runs no other CF_* bit: one thread, no icount)
UNSET, ONE_INSN = 0xFFFF_FFFF, 1
#: the most instructions a block can be asked to hold (QEMU 5.0's CF_COUNT_MASK, 0x1ff)
MAX_COUNT = 0x1FF


class OneInsnBlock:
    """``next()`` makes the next block Unicorn translates or looks up hold one instruction."""

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._cell: ctypes.c_uint32 | None = None

    def next(self) -> None:
        cell = self._cell
        if cell is None:
            cell = self._cell = _cell(self._uc)
        if cell.value == UNSET:
            cell.value = ONE_INSN

    def next_count(self, n: int) -> None:
        """The next block holds at most ``n`` instructions (1 to :data:`MAX_COUNT`;
        fewer where QEMU ends it anyway, at a branch say).  A one-instruction
        block asked for and not yet translated is kept."""
        if not 1 <= n <= MAX_COUNT:
            raise ValueError(f"a block holds 1 to {MAX_COUNT} instructions, not {n}")
        cell = self._cell
        if cell is None:
            cell = self._cell = _cell(self._uc)
        if cell.value == UNSET or cell.value > n:
            cell.value = n


def _cell(uc: Uc) -> ctypes.c_uint32:
    """``cflags_next_tb`` of ``uc``'s CPU, in place, once the mechanism is checked."""
    if not _CHECK.passed():
        raise RuntimeError("this libunicorn does not run a one-instruction block on request "
                           "(CPUState.cflags_next_tb): the sandbox needs Unicorn 2.1.x")
    return _raw_cell(uc)


def _raw_cell(uc: Uc) -> ctypes.c_uint32:
    cpu = engine_cell(uc, INTERNALS.engine_cpu).value
    if not cpu:
        raise RuntimeError("the engine's CPU is not created yet")
    return engine_memory(uc, cpu + OFF_CFLAGS_NEXT_TB, ctypes.c_uint32)


def _self_test() -> bool:
    """Four NOPs run three times on a scratch engine: as one block, then -- the
    flag set -- as a block of one NOP and a block of the other three, then --
    a count of two asked for -- as two blocks of two; the flag is unset again
    after each."""
    uc = x86_64_engine(TCG_BUFFER_SMALL)
    uc.mem_map(0, 0x1000, UC_PROT_ALL)
    uc.mem_write(0, b"\x90" * 4)
    blocks: list[tuple[int, int]] = []
    uc.hook_add(UC_HOOK_BLOCK, lambda uc, addr, size, ud: blocks.append((addr, size)))
    uc.emu_start(0, 4)
    cell = _raw_cell(uc)
    first, blocks[:] = list(blocks), []
    if first != [(0, 4)] or cell.value != UNSET:
        return False
    cell.value = ONE_INSN
    uc.emu_start(0, 4)
    if blocks != [(0, 1), (1, 3)] or cell.value != UNSET:
        return False
    blocks[:] = []
    cell.value = 2
    uc.emu_start(0, 4)
    return blocks == [(0, 2), (2, 2)] and cell.value == UNSET


_CHECK = SelfTest(_self_test)
