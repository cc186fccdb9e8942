"""The execution engine: Unicorn set up as this processor's core, and its raw hooks.

Host DRAM is mapped as the host-physical address space, Unicorn's own x86
page walk is replaced by the TLB-fill hook (``UC_TLB_VIRTUAL``), and the
per-address code hooks the scanner places go through Unicorn's C API with one
shared C callback.

This module reaches into the Unicorn binding's internals: the engine handle
``uc._uch`` and the ctypes hook API (``uclib``, ``uc_hook_h``, the callback
types), and into one QEMU function libunicorn exports (:class:`TbInvalidator`).
Two more do, each for one job: :mod:`sandbox.svm.cpustate` reads the same
handle for its context transfers, and :mod:`sandbox.svm.port_hooks` installs
the IN/OUT instruction hooks through the same C API.
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


#: Bytes of QEMU's translation buffer for an engine that runs guests (Unicorn's
#: default is 1 GiB).  Generated x86-64 code calls a helper with a rel32 call
#: only when the helper lies within 2 GiB of it; farther, each call loads the
#: helper's address from the block's constant pool, and QEMU keeps that pool
#: sorted by insertion (``new_pool_insert``): quadratic in the calls of a block,
#: and an instruction-budget or code hook makes one call per guest instruction.
#: A few 1 GiB buffers in one process (the machine's, the fuzzer's reference
#: engine, a clock probe) put all but the first out of reach of libunicorn;
#: buffers this size stay near it.  A full buffer is flushed by QEMU and refilled.
TCG_BUFFER = 128 << 20
#: ... for an engine that translates a handful of blocks (QEMU's minimum is 1 MiB)
TCG_BUFFER_SMALL = 1 << 20


def x86_64_engine(tcg_buffer: int = TCG_BUFFER) -> Uc:
    """A 64-bit x86 Unicorn whose translation buffer is ``tcg_buffer`` bytes
    (set before anything makes Unicorn allocate it)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_tcg_buffer_size(tcg_buffer)
    return uc


def new_engine(mem: HostMemory) -> Uc:
    """A 64-bit x86 Unicorn over ``mem``: DRAM and, above it, the plaintext
    cache of SEV pages (``HostMemory.cache_base``), with a virtual TLB."""
    uc = x86_64_engine()
    uc.mem_map_ptr(0, 2 * mem.size, UC_PROT_ALL, mem.address)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    # No exit address: with an ``until`` address Unicorn probes that page
    # through the TLB-fill hook after every emu_start, which is not a guest
    # access (and would overwrite the exact address of a real fault).
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    return uc


class SelfTest:
    """A check that a libunicorn internal behaves as this package relies on, run
    once per process (on a scratch engine) the first time it is asked for; a
    check that raises has failed."""

    def __init__(self, test: Callable[[], bool]) -> None:
        self._test = test
        self._passed: bool | None = None

    def passed(self) -> bool:
        if self._passed is None:
            try:
                self._passed = bool(self._test())
            except Exception:
                self._passed = False
        return self._passed


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


def pointer_arg(address: int) -> object:
    """A prepared C pointer argument with the value ``address``, for the foreign
    functions of :func:`in_hook_fn`: a ``byref`` of a ctypes
    object placed at that address (nothing is read there).  ctypes passes such an
    argument as it is, where a ``c_void_p`` costs a search of its format table on
    every call."""
    return ctypes.byref(ctypes.c_char.from_address(address))


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

    def span(self, start: int, end: int) -> None:
        """Drop every translated block that has a byte in host-physical [start, end)."""
        self._fn(self._h, start, end)


def add_raw_insn_hook(uc: Uc, fn: Callable[[], int], insn: int) -> object:
    """A UC_HOOK_INSN for RDTSC/RDTSCP, which the binding does not wrap
    (they share CPUID's callback type).  ``fn()`` returns 1 to skip the
    instruction.  Keep the returned object alive as long as the hook."""
    cb = HOOK_INSN_CPUID_CFUNC(lambda h, ud: fn())
    _hook_add_everywhere(uc, UC_HOOK_INSN, cb, ctypes.c_int(insn))
    return cb


def _hook_add_everywhere(uc: Uc, kind: int, cb: object, *extra: object) -> None:
    """``uc_hook_add`` of the C callback ``cb`` for every address (begin 1 > end 0)."""
    hh = uc_hook_h()
    err = uclib.uc_hook_add(raw_handle(uc), ctypes.byref(hh), kind, cb, None, ctypes.c_uint64(1),
                            ctypes.c_uint64(0), *extra)
    if err:
        raise UcError(err)


class RegReader:
    """Integer register reads (up to 64 bits) through Unicorn's C ``uc_reg_read``
    with one reused buffer: about a fifth of the binding's ``reg_read``.  The
    processor's :class:`~sandbox.svm.cpustate.CpuState` reads through one, and so
    do observers outside the processor model (the fuzzer's soundness audit)."""

    def __init__(self, uc: Uc) -> None:
        self._h = raw_handle(uc)
        self._buf = ctypes.c_uint64()
        self._ref = ctypes.byref(self._buf)
        # a register read only copies QEMU's state (no TLB fill, no hook): the
        # GIL is kept and no argument converted (see in_hook_fn)
        self._read = in_hook_fn("uc_reg_read")

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


#: ``struct hook``'s ``uint64_t begin, end`` (uc_priv.h): a code hook fires where
#: ``begin <= address <= end`` (``begin > end``: everywhere), checked when it is
#: called.  Writing them moves a hook to another address, or parks it, in place.
#: Deleting one instead costs a search of the hook list in ``uc_hook_del``, a drop
#: of the blocks compiled starting at its address (each resolved through the TLB
#: fill), and another search to unlink it at the end of the next ``emu_start``.
_RANGE = ctypes.c_uint64 * 2
#: the range of a parked hook: one non-canonical address, where no instruction is fetched
PARKED = 0x8000_0000_0000_0000


def _locate_hook_range() -> int | None:
    """The offset of ``begin, end`` in Unicorn's ``struct hook`` (the handle
    points to it), found with a distinctive range; None when not found."""
    uc = x86_64_engine(TCG_BUFFER_SMALL)
    begin, end = 0x5EC0_DE00_0000_1357, 0x5EC0_DE00_0000_2468
    hh = uc_hook_h()
    cb = HOOK_CODE_CFUNC(lambda *a: None)
    if uclib.uc_hook_add(raw_handle(uc), ctypes.byref(hh), UC_HOOK_CODE, cb, None, ctypes.c_uint64(begin),
                         ctypes.c_uint64(end)):
        return None
    raw = ctypes.string_at(hh.value, 128)
    hits = [o for o in range(0, 120, 8) if int.from_bytes(raw[o:o + 8], "little") == begin
            and int.from_bytes(raw[o + 8:o + 16], "little") == end]
    uclib.uc_hook_del(raw_handle(uc), hh)
    return hits[0] if len(hits) == 1 else None


_HOOK_RANGE_AT = _locate_hook_range()

#: engine handle -> code hooks added that must run ahead of every candidate hook
#: placed after them (Unicorn calls code hooks in list order); see :class:`CodeHooks`
_ORDERED_ADDS: dict[int, int] = {}


class RawCodeHook:
    """A UC_HOOK_CODE on every address straight from C, ``fn(handle, address,
    size, user_data)`` (which must not raise), switched on and off.  The
    binding's own hook runs two Python frames before the callback.

    Unicorn decides at translation whether a block calls code hooks, so a
    block translated while the hook was off never calls it: :meth:`on` drops
    every translated block.  Blocks translated while it was on call it after
    :meth:`off` until they are dropped (the callback must tolerate that).

    Switched off, the hook is parked (its range moved where nothing runs), not
    deleted: switched on again it keeps its place in Unicorn's hook list, ahead
    of every candidate hook (:class:`CodeHooks`) placed since it was added."""

    def __init__(self, uc: Uc, fn: Callable[[object, int, int, object], None]) -> None:
        self._uc = uc
        self._h = raw_handle(uc)
        self._cb = HOOK_CODE_CFUNC(fn)
        self._hh: uc_hook_h | None = None
        self._range: ctypes.Array | None = None     # begin, end of the parked or active hook
        self._on = False

    @property
    def active(self) -> bool:
        """Whether the hook is on."""
        return self._on

    @property
    def placed(self) -> bool:
        """Whether the hook is in Unicorn's hook list, on or parked: then it
        runs ahead of every :class:`CodeHooks` hook placed since it was added."""
        return self._on or self._range is not None

    def on(self, drop_blocks: bool = True) -> None:
        """Switch the hook on, dropping every translated block (translated
        without the hook, they would not call it).  ``drop_blocks=False``: the
        caller has just dropped them all itself."""
        if self._on:
            return
        if self._range is not None:
            self._range[0], self._range[1] = 1, 0         # every address
        else:
            hh = uc_hook_h()
            err = uclib.uc_hook_add(self._h, ctypes.byref(hh), UC_HOOK_CODE, self._cb, None, ctypes.c_uint64(1),
                                    ctypes.c_uint64(0))
            if err:
                raise UcError(err)
            self._hh = hh
            key = self._h.value
            _ORDERED_ADDS[key] = _ORDERED_ADDS.get(key, 0) + 1
            if _HOOK_RANGE_AT is not None:
                self._range = _RANGE.from_address(hh.value + _HOOK_RANGE_AT)
        self._on = True
        if drop_blocks:
            self._uc.ctl_flush_tb()

    def switch(self, on: bool) -> None:
        """On or off, as ``on`` says (:meth:`on` drops every translated block)."""
        if on:
            self.on()
        else:
            self.off()

    def off(self) -> None:
        if not self._on:
            return
        self._on = False
        if self._range is not None:
            self._range[0] = self._range[1] = PARKED
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
    _hook_add_everywhere(uc, UC_HOOK_TLB_FILL, ccb)
    return ccb


#: ``void cb(uc_engine *uc, uint32_t intno, void *user_data)`` (unicorn.h ``uc_cb_hookintr_t``)
_INTR_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)
#: ``bool cb(uc_engine *uc, void *user_data)`` (``uc_cb_hookinsn_invalid_t``)
_INVALID_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)


def add_raw_event_hooks(uc: Uc, on_intr: Callable[[object, int, object], None],
                        on_invalid: Callable[[object, object], bool]) -> object:
    """UC_HOOK_INTR (``on_intr(handle, intno, user_data)``) and UC_HOOK_INSN_INVALID
    (``on_invalid(handle, user_data) -> bool``: True to go on) straight from C, for
    the life of the engine: the binding's hooks run two Python frames before the
    callback on every exception.  The callbacks must not raise.  Keep the returned
    object alive as long as the hooks."""
    cbs = (_INTR_CFUNC(on_intr), _INVALID_CFUNC(on_invalid))
    for cb, kind in zip(cbs, (UCC.UC_HOOK_INTR, UCC.UC_HOOK_INSN_INVALID)):
        _hook_add_everywhere(uc, kind, cb)
    return cbs


#: ``bool cb(uc_engine *uc, uc_mem_type type, uint64_t address, int size, int64_t value,
#: void *user_data)`` (unicorn.h ``uc_cb_eventmem_t``)
_EVENTMEM_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int,
                                   ctypes.c_int64, ctypes.c_void_p)


class StoreWatch:
    """Host pages on which QEMU checks every store against its translated blocks.

    QEMU drops the translated blocks a store overwrites in ``notdirty_write()``,
    which only stores through a "not dirty" soft-TLB entry reach.  Unicorn
    2.1.4 marks an entry dirty after its first store when the entry has no
    execute permission -- unless a memory hook is installed on the page
    (``uc_mem_hook_installed``), when it never does.  So a page is watched
    with a UC_HOOK_MEM_WRITE_PROT hook bounded to it: that hook type does not
    slow translated code down (only MEM_READ/MEM_WRITE hooks make TCG drop its
    fast path), and it never fires here, since all of DRAM is mapped writable.
    The hooks stay until :meth:`clear` (outside a run)."""

    def __init__(self, uc: Uc) -> None:
        self._h = raw_handle(uc)
        # uc_hook_add only allocates and links the hook: called keeping the GIL (see in_hook_fn)
        self._add = in_hook_fn("uc_hook_add")
        self._hh = uc_hook_h()
        self._cb = _EVENTMEM_CFUNC(lambda *args: False)
        #: host page -> its hook handle
        self.pages: dict[int, int] = {}

    def watch(self, hpa: int) -> None:
        """Watch host page ``hpa`` (page-aligned), if it is not watched yet."""
        if hpa in self.pages:
            return
        err = self._add(self._h, ctypes.byref(self._hh), UCC.UC_HOOK_MEM_WRITE_PROT, self._cb, None,
                        ctypes.c_uint64(hpa), ctypes.c_uint64(hpa + 0xFFF))
        if err:
            raise UcError(err)
        self.pages[hpa] = self._hh.value

    def clear(self) -> None:
        """Stop watching every page (outside a run)."""
        pages, self.pages = self.pages, {}
        for k in pages.values():
            err = uclib.uc_hook_del(self._h, uc_hook_h(k))
            if err:
                raise UcError(err)


class CodeHooks:
    """Address-ranged UC_HOOK_CODE hooks, one per address, sharing one C callback.

    A hook on an address where no instruction begins never fires, and one
    whose address is never executed is free; but every translated block is
    checked against every hook, so a long-lived processor sheds them now and
    then (:meth:`shed`).

    A shed parks the hooks (see :data:`PARKED`) and later additions take their
    range back, where deleting them is O(n) each in ``uc_hook_del``.  Parked
    hooks are deleted for good every :attr:`DELETE_EVERY` sheds (a hook keeps
    a record of each block compiled starting at its address until it is
    deleted), and before one is reused behind a hook that must run ahead of
    the candidates (:class:`RawCodeHook`, added after it).
    """

    #: sheds between two that delete every hook (parking the others)
    DELETE_EVERY = 64

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
        #: hook handle -> its range (None: hooks are deleted, never parked)
        self._ranges: dict[int, ctypes.Array] | None = {} if _HOOK_RANGE_AT is not None else None
        self._parked: list[int] = []    # parked hooks, reused by add_new
        self._stale: list[int] = []     # parked hooks never to be reused, deleted at the next shed
        self._sheds = 0
        self._key = self._h.value
        self._ordered = _ORDERED_ADDS.get(self._key, 0)

    def __len__(self) -> int:
        return len(self.handles)

    def __contains__(self, addr: int) -> bool:
        return addr in self.handles

    @property
    def parked(self) -> int:
        """Hooks parked, for reuse or deletion."""
        return len(self._parked) + len(self._stale)

    def add(self, addr: int) -> None:
        """Hook the instruction that may begin at ``addr`` (once)."""
        if addr not in self.handles:
            self.add_new((addr,))

    def add_new(self, addrs) -> None:
        """Hook each of ``addrs`` that is not hooked yet."""
        if _ORDERED_ADDS.get(self._key, 0) != self._ordered:
            # the parked hooks sit ahead of a hook that must run first: never reused,
            # deleted at the next shed (not here: this may run inside a TLB fill)
            self._ordered = _ORDERED_ADDS.get(self._key, 0)
            self._stale += self._parked
            self._parked = []
        handles, parked, ranges = self.handles, self._parked, self._ranges
        add, h, ref, hh, cb, u64 = self._add, self._h, self._hh_ref, self._hh, self._cb, ctypes.c_uint64
        for addr in addrs:
            if addr in handles:
                continue
            if parked:
                k = parked.pop()
                r = ranges[k]
                r[0] = r[1] = addr
                handles[addr] = k
                continue
            a = u64(addr)
            err = add(h, ref, UC_HOOK_CODE, cb, None, a, a)
            if err:
                raise UcError(err)
            k = handles[addr] = hh.value
            if ranges is not None:
                ranges[k] = _RANGE.from_address(k + _HOOK_RANGE_AT)

    def shed(self) -> int:
        """Take every hook off its address; returns how many there were.
        Translated blocks compiled with them must be dropped by the caller.

        Deleting a hook makes Unicorn drop the translated blocks of its page,
        which it finds through the TLB fill: a fill may scan and add hooks
        meanwhile (they are kept; a hook on an address is always sound)."""
        old, self.handles = self.handles, {}
        self._sheds += 1
        ranges = self._ranges
        stale, self._stale = self._stale, []
        self._delete(stale)
        if ranges is None or self._sheds % self.DELETE_EVERY == 0:
            parked, self._parked = self._parked, []
            self._delete(parked)
            self._delete(old.values())
        else:
            for k in old.values():
                r = ranges[k]
                r[0] = r[1] = PARKED
            self._parked += old.values()
        return len(old)

    def _delete(self, hooks) -> None:
        delete, h, ranges = self._del, self._h, self._ranges
        for k in list(hooks):
            if ranges is not None:
                del ranges[k]
            delete(h, uc_hook_h(k))
