"""Unicorn's IN/OUT instruction hooks, called straight from C.

Port I/O the VMCB does not intercept runs in Unicorn, whose IN/OUT helpers
(also used by INS/OUTS) call a UC_HOOK_INSN for the port's value.  The
binding's own hooks run two Python frames (an exception guard taking
``*args, **kwargs`` and an adapter) before the callback, on every execution;
these call it directly.  The callback types take the engine handle as a
plain ``c_void_p`` (the binding's ``uc_engine`` type builds an object per
call).  Like :mod:`sandbox.svm.engine`, this module reaches into the
binding's ctypes internals (``uclib``, ``uc_hook_h``).
"""
from __future__ import annotations

import ctypes
from typing import Callable

from unicorn import UC_HOOK_INSN, Uc, UcError
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT

from .engine import raw_handle

#: ``uint32_t cb(uc_engine *uc, uint32_t port, int size, void *user_data)`` (unicorn.h ``uc_cb_insn_in_t``)
_IN_CFUNC = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p)
#: ``void cb(uc_engine *uc, uint32_t port, int size, uint32_t value, void *user_data)`` (``uc_cb_insn_out_t``)
_OUT_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32,
                              ctypes.c_void_p)

InFn = Callable[[object, int, int, object], int]
OutFn = Callable[[object, int, int, int, object], None]


class PortIoHooks:
    """UC_HOOK_INSN for IN (``fn_in(handle, port, size, user_data) -> value``)
    and OUT (``fn_out(handle, port, size, value, user_data)``) on every address,
    for the life of the engine.  The callbacks are called from C: they must not
    raise.  The object keeps the C thunks alive; keep it as long as the engine."""

    def __init__(self, uc: Uc, fn_in: InFn, fn_out: OutFn) -> None:
        self._cbs = (_IN_CFUNC(fn_in), _OUT_CFUNC(fn_out))
        h = raw_handle(uc)
        for cb, insn in zip(self._cbs, (UC_X86_INS_IN, UC_X86_INS_OUT)):
            hh = uc_hook_h()
            err = uclib.uc_hook_add(h, ctypes.byref(hh), UC_HOOK_INSN, cb, None, ctypes.c_uint64(1),
                                    ctypes.c_uint64(0), ctypes.c_int(insn))
            if err:
                raise UcError(err)
