"""One page of Unicorn's soft TLB flushed, not all of it.

Unicorn's API flushes the whole soft TLB (``UC_CTL_TLB_FLUSH``); every page
the guest touches afterwards comes back through the TLB-fill hook, a Python
2-D walk or tagged-TLB lookup each.  Where one page's entries must go -- a
code page's executable ones when the guest stores to it, its writable ones
when it runs again (:mod:`.smc`) -- QEMU's
``tlb_flush_page`` drops just that page (every MMU index, its victim-TLB
entries and its jump-cache entries).  libunicorn exports it under its
per-target name; it takes the ``CPUState *``, which the engine keeps in
``struct uc_struct`` at the offset :mod:`.cpustate` calibrates and verifies
at import (``engine_cpu``), and the whole mechanism is checked once on a
scratch engine before it is used.
Where any of it is missing or behaves otherwise, :func:`page_flusher`
returns None and callers flush everything, as before.

Like :mod:`.engine`, this module reaches into libunicorn's internals.
"""
from __future__ import annotations

import ctypes
from typing import Callable

from unicorn import UC_PROT_ALL, UC_TLB_VIRTUAL, Uc
from unicorn.unicorn_py3.unicorn import uclib

from .cpustate import INTERNALS, engine_cell
from .engine import TCG_BUFFER_SMALL, SelfTest, add_raw_tlb_fill_hook, x86_64_engine

_FLUSH_PAGE = "tlb_flush_page_x86_64"           # void (CPUState *cpu, target_ulong addr)



def _raw_flusher(uc: Uc) -> Callable[[int], None] | None:
    fn = getattr(uclib, _FLUSH_PAGE, None)
    if fn is None:
        return None
    cpu = engine_cell(uc, INTERNALS.engine_cpu).value
    if not cpu:
        return None                     # the engine's CPU is not created yet
    # no callback into Python and nothing that blocks: the GIL is kept (see engine.in_hook_fn)
    flush = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)(ctypes.cast(fn, ctypes.c_void_p).value)
    ptr = ctypes.c_void_p(cpu)
    return lambda gva: flush(ptr, gva)


def _self_test() -> bool:
    """On a scratch engine with a virtual TLB: code reading two data pages
    runs three times; between the second and the third run the first data
    page is flushed.  The fills must be: all three pages, then none, then
    that page alone."""
    uc = x86_64_engine(TCG_BUFFER_SMALL)
    uc.mem_map(0, 0x3000)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    fills: list[int] = []

    def fill(handle, vaddr: int, access: int, entry, ud) -> bool:
        fills.append(vaddr & ~0xFFF)
        entry[0].paddr = vaddr & ~0xFFF
        entry[0].perms = UC_PROT_ALL
        return True

    keep = add_raw_tlb_fill_hook(uc, fill)
    code = bytes.fromhex("488b042500100000" "488b1c2500200000")     # mov rax, [0x1000]; mov rbx, [0x2000]
    uc.mem_write(0, code)
    flush = _raw_flusher(uc)
    if flush is None:
        return False
    runs = []
    for i in range(3):
        if i == 2:
            flush(0x1000)
        n = len(fills)
        uc.emu_start(0, len(code))
        runs.append(sorted(fills[n:]))
    del keep
    return runs == [[0, 0x1000, 0x2000], [], [0x1000]]


def page_flusher(uc: Uc) -> Callable[[int], None] | None:
    """``flush(gva)``: drop the soft-TLB entries of the page at ``gva`` on
    ``uc`` (which must have its CPU, i.e. memory mapped); None where this
    libunicorn cannot do it as checked."""
    return _raw_flusher(uc) if _CHECK.passed() else None


#: the self-test, taken once (not passed: this libunicorn cannot flush one page as checked)
_CHECK = SelfTest(_self_test)
