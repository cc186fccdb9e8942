"""The execution engine: Unicorn set up as this processor's core, and its raw hooks.

Host DRAM is mapped as the host-physical address space, Unicorn's own x86
page walk is replaced by the TLB-fill hook (``UC_TLB_VIRTUAL``), and the
per-address code hooks the scanner places go through Unicorn's C API with one
shared C callback.

This is the one module of the processor that reaches into the Unicorn
binding's internals: the engine handle ``uc._uch`` and the ctypes hook API
(``uclib``, ``uc_hook_h``, the callback types), and into one QEMU function
libunicorn exports (:class:`TbInvalidator`).  :mod:`sandbox.svm.cpustate`
reads the same handle for its context transfers, on its own.
"""
from __future__ import annotations

import ctypes
from typing import Callable

from unicorn import (UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_TLB_FILL, UC_MODE_64, UC_PROT_ALL,
                     UC_TLB_VIRTUAL, Uc, UcError)
from unicorn import unicorn_const as UCC
from unicorn.x86_const import UC_X86_REG_MSR
from unicorn.unicorn_py3.arch.intel import HOOK_INSN_CPUID_CFUNC
from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC, HOOK_TLB_FILL_CFUNC, uc_hook_h, uclib

from ..memory.hostmem import HostMemory


def new_engine(mem: HostMemory) -> Uc:
    """A 64-bit x86 Unicorn over ``mem``: DRAM and, above it, the plaintext
    cache of SEV pages (``HostMemory.cache_base``), with a virtual TLB."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map_ptr(0, 2 * mem.size, UC_PROT_ALL, mem.address)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    # No exit address: with an ``until`` address Unicorn probes that page
    # through the TLB-fill hook after every emu_start, which is not a guest
    # access (and would overwrite the exact address of a real fault).
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    return uc


def raw_handle(uc: Uc) -> ctypes.c_void_p:
    """The ``uc_engine *`` behind a binding object (a binding internal)."""
    return uc._uch


def in_hook_fn(name: str) -> Callable[..., int]:
    """Unicorn's C function ``name`` for calls made from inside a hook: a
    foreign function that keeps the GIL (the hook already holds it, and these
    calls never block; one that calls back into Python, as ``uc_hook_del``
    may through the TLB fill, re-enters with the GIL this thread holds, as
    ctypes callbacks take it re-entrantly) and has no ``argtypes``, so
    ctypes converts nothing through ``from_param``.  Its arguments must be
    ctypes objects of the C types (the engine handle, a ``c_void_p``, a
    ``byref``) or C ``int`` values (register ids); it returns the ``uc_err``.

    The binding's functions release and retake the GIL and convert every
    argument: about half the cost of a call as short as a context copy."""
    addr = ctypes.cast(getattr(uclib, name), ctypes.c_void_p).value
    return ctypes.PYFUNCTYPE(ctypes.c_int)(addr)


#: ``uc_ctl``'s control word for a write with no arguments (``UC_CTL_WRITE(type, 0)`` in unicorn.h)
_CTL_TLB_FLUSH = UCC.UC_CTL_IO_WRITE << 30 | UCC.UC_CTL_TLB_FLUSH
_uc_ctl = in_hook_fn("uc_ctl")


def flush_soft_tlb(uc: Uc) -> None:
    """Empty Unicorn's soft TLB (there is no Python wrapper for this control).
    A flush only resets QEMU's tables (no fill, no hook): called keeping the
    GIL, as :func:`in_hook_fn` describes (a fuzz case flushes about three times)."""
    err = _uc_ctl(uc._uch, _CTL_TLB_FLUSH)
    if err:
        raise UcError(err)


class TbInvalidator:
    """Drops Unicorn's translated blocks on given host-physical pages, with no
    virtual-to-physical translation.

    ``ctl_remove_cache`` takes a virtual address and resolves it through the
    soft TLB, which under ``UC_TLB_VIRTUAL`` means a TLB-fill hook (a Python
    2-D walk, and a fetch fill that rescans the page) whenever the entry is not
    cached, and the translation of the moment, not the one a block was built
    under.  QEMU's own ``tb_invalidate_phys_range`` takes the RAM address, which
    is the host-physical address here (:func:`new_engine` maps all of it as one
    RAM block at 0, the engine's only one).  libunicorn exports it under its
    per-target name; when a build does not, :attr:`available` is False and the
    caller flushes every block instead (``ctl_flush_tb``)."""

    _SYMBOL = "tb_invalidate_phys_range_x86_64"

    def __init__(self, uc: Uc) -> None:
        fn = getattr(uclib, self._SYMBOL, None)
        self.available = fn is not None
        if fn is not None:
            addr = ctypes.cast(fn, ctypes.c_void_p).value
            # void tb_invalidate_phys_range(struct uc_struct *uc, ram_addr_t start, ram_addr_t end);
            # GIL kept: it never calls back into Python (no TLB fill, no hook)
            self._fn = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)(addr)
            self._h = raw_handle(uc)

    def pages(self, pages) -> None:
        """Drop every translated block that has a byte on one of ``pages`` (page-aligned)."""
        fn, h = self._fn, self._h
        for p in pages:
            fn(h, p, p + 0x1000)


def add_raw_insn_hook(uc: Uc, fn: Callable[[], int], insn: int) -> object:
    """A UC_HOOK_INSN for RDTSC/RDTSCP, which the binding does not wrap
    (they share CPUID's callback type).  ``fn()`` returns 1 to skip the
    instruction.  Keep the returned object alive as long as the hook."""
    cb = HOOK_INSN_CPUID_CFUNC(lambda h, ud: fn())
    hh = uc_hook_h()
    err = uclib.uc_hook_add(raw_handle(uc), ctypes.byref(hh), UC_HOOK_INSN, cb, None, ctypes.c_uint64(1),
                            ctypes.c_uint64(0), ctypes.c_int(insn))
    if err:
        raise UcError(err)
    return cb


class RegReader:
    """Integer register reads (up to 64 bits) through Unicorn's C ``uc_reg_read``
    with one reused buffer: about a fifth of the binding's ``reg_read``.  The
    processor's :class:`~sandbox.svm.cpustate.CpuState` reads through one, and so
    do observers outside the processor model (the fuzzer's soundness audit)."""

    def __init__(self, uc: Uc) -> None:
        self._h = raw_handle(uc)
        self._buf = ctypes.c_uint64()
        self._ref = ctypes.byref(self._buf)
        self._read = uclib.uc_reg_read

    def read(self, reg: int) -> int:
        buf = self._buf
        buf.value = 0                      # narrower registers (CS) fill only their low bytes
        err = self._read(self._h, reg, self._ref)
        if err:
            raise UcError(err)
        return buf.value


class _MsrValue(ctypes.Structure):
    """Unicorn's ``uc_x86_msr``: the argument of a UC_X86_REG_MSR access."""
    _fields_ = (("rid", ctypes.c_uint32), ("value", ctypes.c_uint64))


class MsrWriter:
    """WRMSR as the binding's ``reg_write(UC_X86_REG_MSR, (msr, value))`` does
    it, through Unicorn's C ``uc_reg_write`` with one reused buffer (the
    binding builds the structure and picks its class on every call).  The
    write only updates QEMU's state (no TLB fill, no hook): the GIL is kept."""

    def __init__(self, uc: Uc) -> None:
        self._h = raw_handle(uc)
        self._buf = _MsrValue()
        self._ref = ctypes.byref(self._buf)
        self._write = in_hook_fn("uc_reg_write")

    def write(self, msr: int, value: int) -> None:
        buf = self._buf
        buf.rid, buf.value = msr, value & 0xFFFF_FFFF_FFFF_FFFF
        err = self._write(self._h, UC_X86_REG_MSR, self._ref)
        if err:
            raise UcError(err)


class RawCodeHook:
    """A UC_HOOK_CODE on every address straight from C, ``fn(handle, address,
    size, user_data)`` (which must not raise), switched on and off.  The
    binding's own hook runs two Python frames before the callback.

    Unicorn decides at translation whether a block calls code hooks, so a
    block translated while the hook was off never calls it: :meth:`on` drops
    every translated block.  Blocks translated while it was on call it after
    :meth:`off` until they are dropped (the callback must tolerate that)."""

    def __init__(self, uc: Uc, fn: Callable[[object, int, int, object], None]) -> None:
        self._uc = uc
        self._h = raw_handle(uc)
        self._cb = HOOK_CODE_CFUNC(fn)
        self._hh: uc_hook_h | None = None

    @property
    def active(self) -> bool:
        return self._hh is not None

    def on(self) -> None:
        if self._hh is not None:
            return
        hh = uc_hook_h()
        err = uclib.uc_hook_add(self._h, ctypes.byref(hh), UC_HOOK_CODE, self._cb, None, ctypes.c_uint64(1),
                                ctypes.c_uint64(0))
        if err:
            raise UcError(err)
        self._hh = hh
        self._uc.ctl_flush_tb()

    def off(self) -> None:
        if self._hh is None:
            return
        hh, self._hh = self._hh, None
        err = uclib.uc_hook_del(self._h, hh)
        if err:
            raise UcError(err)


def add_raw_tlb_fill_hook(uc: Uc, fn: Callable[[object, int, int, object, object], bool]) -> object:
    """UC_HOOK_TLB_FILL straight from C: ``fn(handle, vaddr, access, entry, user_data)``
    with ``entry`` a pointer to the ``uc_tlb_entry`` to fill (``entry[0].paddr``,
    ``entry[0].perms``); it returns True when the page is mapped and must not
    raise.  The binding's own hook runs two Python frames (an exception guard
    taking ``*args, **kwargs`` and an adapter) before the callback on every
    soft-TLB miss.  Keep the returned object alive as long as the hook."""
    ccb = HOOK_TLB_FILL_CFUNC(fn)
    hh = uc_hook_h()
    err = uclib.uc_hook_add(raw_handle(uc), ctypes.byref(hh), UC_HOOK_TLB_FILL, ccb, None, ctypes.c_uint64(1),
                            ctypes.c_uint64(0))
    if err:
        raise UcError(err)
    return ccb


class CodeHooks:
    """Address-ranged UC_HOOK_CODE hooks, one per address, sharing one C callback.

    A hook on an address where no instruction begins never fires, and one
    whose address is never executed is free; but every translated block is
    checked against every hook, and ``uc_hook_del`` is O(n), so a long-lived
    processor sheds them now and then (:meth:`shed`).
    """

    def __init__(self, uc: Uc, callback: Callable[[object, int, int, object], None]) -> None:
        """``callback(handle, address, size, user_data)`` is called from C: it
        must not raise."""
        self._h = raw_handle(uc)
        # uc_hook_add only allocates and links the hook (no TLB fill, no callback):
        # called keeping the GIL, with no argument conversion (see in_hook_fn)
        self._add = in_hook_fn("uc_hook_add")
        # uc_hook_del may resolve the hook's translated blocks through the TLB
        # fill (Python, re-entered with the GIL this thread holds)
        self._del = in_hook_fn("uc_hook_del")
        self._cb = HOOK_CODE_CFUNC(callback)
        self._hh = uc_hook_h()
        self._hh_ref = ctypes.byref(self._hh)
        #: address -> hook handle (the ``uc_hook`` value)
        self.handles: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.handles)

    def __contains__(self, addr: int) -> bool:
        return addr in self.handles

    def add(self, addr: int) -> None:
        """Hook the instruction that may begin at ``addr`` (once)."""
        if addr not in self.handles:
            self.add_new((addr,))

    def add_new(self, addrs) -> None:
        """Hook each of ``addrs`` that is not hooked yet."""
        handles, add, h, ref, hh, cb, u64 = self.handles, self._add, self._h, self._hh_ref, self._hh, self._cb, \
            ctypes.c_uint64
        for addr in addrs:
            if addr in handles:
                continue
            a = u64(addr)
            err = add(h, ref, UC_HOOK_CODE, cb, None, a, a)
            if err:
                raise UcError(err)
            handles[addr] = hh.value

    def shed(self) -> int:
        """Delete every hook; returns how many there were.  Translated blocks
        compiled with them must be dropped by the caller.

        Deleting a hook makes Unicorn drop the translated blocks of its page,
        which it finds through the TLB fill: a fill may scan and add hooks
        meanwhile (they are kept; a hook on an address is always sound)."""
        old, self.handles = self.handles, {}
        delete, h = self._del, self._h
        for hh in old.values():
            delete(h, uc_hook_h(hh))
        return len(old)
