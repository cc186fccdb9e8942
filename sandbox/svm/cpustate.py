"""Fast, complete access to the emulated CPU's state.

Unicorn's register API exposes only segment *selectors*, and each call from
Python costs about a microsecond.  A VMRUN must load, and a #VMEXIT must
save, the hidden part of CS/SS/DS/ES (base, limit, attributes) and the CPL
(APM vol. 2 §15.5.1), so this module reads and writes Unicorn's CPU state --
QEMU's ``CPUX86State`` -- directly, in place: Unicorn exports it only as
copies (``uc_context_save``/``uc_context_restore``, 5.5 KB each way), so
the state's address is found through the engine struct's ``cpu`` pointer.

The layout is QEMU 5.0's, as bundled by Unicorn 2.1; a few values (the debug
registers, the pending exception's error code, the TSC offset, and in
Unicorn's own engine struct the instruction counter, the failed-fill address
and the CPU pointer) are found by calibration.  Every Unicorn internal used
here is then verified at import by :func:`verify_internals` against values
written through Unicorn's own API or produced by the instruction semantics,
so a Unicorn with another layout fails loudly -- an ImportError naming the
value -- instead of silently.  Pointers not yet verified are followed only
through ``/proc/self/mem`` (:func:`read_process`), which fails where a plain
read would crash.
"""
from __future__ import annotations

import ctypes
import os
import struct
from functools import partial
from typing import Callable
from dataclasses import dataclass

import unicorn
from unicorn import UC_ERR_INSN_INVALID, UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_PROT_ALL, UC_TLB_VIRTUAL, Uc, UcError
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import UcContext

from .engine import TCG_BUFFER_SMALL, RegReader, in_hook_fn, pointer_arg, x86_64_engine

# -- QEMU CPUX86State layout (x86_64 target) ---------------------------------
OFF_REGS = 0
OFF_EIP = 128
OFF_HFLAGS = 176
OFF_HFLAGS2 = 180
OFF_SEGS = 184          # SegmentCache[6]: ES CS SS DS FS GS, 24 bytes each
SEG_SIZE = 24
OFF_LDT = OFF_SEGS + 6 * SEG_SIZE     # 328
OFF_TR = OFF_LDT + SEG_SIZE           # 352
OFF_GDT = OFF_TR + SEG_SIZE           # 376
OFF_IDT = OFF_GDT + SEG_SIZE          # 400
OFF_CR = OFF_IDT + SEG_SIZE           # 424: cr[0..8]
OFF_EFER = 592
CONTEXT_DATA = 40       # offsetof(struct uc_context, data)

R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)
SEG_INDEX = {"ES": R_ES, "CS": R_CS, "SS": R_SS, "DS": R_DS, "FS": R_FS, "GS": R_GS}

HF_CPL_MASK = 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF2_GIF = 1 << 0

# QEMU's descriptor-cache flags (target/i386/cpu.h): G, D/B, L, P, DPL, S and the type bits
DESC_G = 1 << 23
DESC_B = 1 << 22
DESC_L = 1 << 21
DESC_P = 1 << 15
DESC_DPL_SHIFT = 13
DESC_S = 1 << 12
DESC_CS, DESC_C, DESC_W, DESC_A = 1 << 11, 1 << 10, 1 << 9, 1 << 8     # W: R for a code segment


def code_size(hflags: int) -> int:
    """The code segment's size in bits from QEMU's hflags: 64 (CS.L in long mode), 32 (CS.D) or 16."""
    return 64 if hflags & HF_CS64 else (32 if hflags & HF_CS32 else 16)


_SEG = struct.Struct("<I4xQII")    # selector, base, limit, flags
_Q = struct.Struct("<Q")
_I = struct.Struct("<I")
_H = struct.Struct("<H")
_REGS = struct.Struct("<16Q")

GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
#: Unicorn register ids in QEMU's regs[] order
GPR_IDS = (X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX,
           X.UC_X86_REG_RSP, X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI,
           X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11,
           X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15)


def flags_to_attrib(flags: int) -> int:
    """QEMU descriptor flags -> 12-bit VMCB attrib (APM §15.5.1)."""
    return ((flags >> 8) & 0xFF) | ((flags >> 12) & 0xF00)


def attrib_to_flags(attrib: int) -> int:
    return ((attrib & 0xFF) << 8) | ((attrib & 0xF00) << 12)


#: ctypes type -> its subclass that can hold an engine (:func:`engine_memory`)
_ENGINE_TYPES: dict[type, type] = {}


def engine_memory(uc: Uc, address: int, ctype: type):
    """A ``ctype`` object in place at ``address``, in memory the engine ``uc`` owns
    (its CPU state, a field of its struct), holding ``uc``: the object, and a
    memoryview of it, keep the engine and so the memory alive."""
    t = _ENGINE_TYPES.get(ctype)
    if t is None:
        t = _ENGINE_TYPES[ctype] = type(f"Engine_{ctype.__name__}", (ctype,), {})
    obj = t.from_address(address)
    obj.engine = uc
    return obj


class CpuState:
    """Raw view of one Unicorn x86-64 CPU's state: QEMU's ``CPUX86State`` itself.

    :attr:`data` (and :attr:`q`, its 64-bit words) is the CPU's own memory,
    located at import (:func:`live_env`): getters read what the CPU holds now,
    setters change it at once, inside a hook as between runs -- what a
    ``uc_context_save``, a patch and a ``uc_context_restore`` would do, with
    no copy to fall out of date.  Register accessors that have side effects
    inside QEMU (CR0/CR3/CR4/EFER, RIP, RFLAGS) go through Unicorn's API
    instead, via :meth:`reg_write`.
    """

    def __init__(self, uc: Uc) -> None:
        self.uc = uc                 # (kept: the CPU's memory lives as long as the engine)
        self._h = uc._uch
        size = len(_context_bytes(uc)) - CONTEXT_DATA
        at = live_env(uc)
        env = engine_memory(uc, at, ctypes.c_char * size)
        #: QEMU's feature words (:data:`FEATURE_WORDS`), past the part the context copies
        self._features = engine_memory(uc, at + OFF_FEATURES, ctypes.c_uint64 * (max(FEATURE_WORDS.values()) + 1))
        self.data = memoryview(env).cast("B")
        #: the state as 64-bit words: GPR ``i`` (QEMU order) is ``q[i]`` (hot paths: no call per access)
        self.q = self.data[:size & ~7].cast("Q")
        self._read = RegReader(uc).read        # uc_reg_read into a buffer zeroed first (narrow registers)
        self._val = ctypes.c_uint64()
        self._pval = ctypes.byref(self._val)
        # hot-path calls that run no Python frame, GIL kept, no argument conversion (see
        # in_hook_fn), their pointer arguments prepared once (see pointer_arg):
        h = pointer_arg(self._h.value)
        self._h_arg = h
        self._write_reg = in_hook_fn("uc_reg_write")
        self._restore = in_hook_fn("uc_context_restore")
        #: ``write_rip_raw()``: uc_reg_write of RIP from :attr:`rip_cell` -- how a hook moves RIP
        #: (Unicorn then restarts translation there); returns Unicorn's error code
        self.rip_cell = ctypes.c_uint64()
        self.write_rip_raw: Callable[[], int] = partial(self._write_reg, h, X.UC_X86_REG_RIP,
                                                        ctypes.byref(self.rip_cell))

    def context_restorer(self, ctx: UcContext) -> Callable[[], int]:
        """``fn()``: ``uc_context_restore`` of the binding context ``ctx`` (one
        :meth:`Uc.context_save` took) into this CPU -- the binding's
        ``context_restore`` without its argument conversion.  Returns
        Unicorn's error code."""
        at = ctypes.cast(ctx.context, ctypes.c_void_p).value
        return partial(self._restore, pointer_arg(self._h.value), pointer_arg(at))

    def rip_writer(self, address: int) -> Callable[[], int]:
        """``fn()``: uc_reg_write of RIP from the qword at process address ``address``
        (e.g. a VMCB's RIP field in DRAM) -- :attr:`write_rip_raw` without the copy
        into :attr:`rip_cell`.  Returns Unicorn's error code."""
        return partial(self._write_reg, pointer_arg(self._h.value), X.UC_X86_REG_RIP, pointer_arg(address))

    # -- direct register access through Unicorn (side effects honoured) --------
    def reg_read(self, reg: int) -> int:
        return self._read(reg)

    def clear_cpuid_feature(self, leaf: int, reg: int, bit: int) -> None:
        """Take a feature away from the CPU itself: CPUID ``leaf`` stops reporting bit
        ``bit`` of register ``reg`` (0-3: EAX..EDX) and QEMU's translator, which decodes
        the feature's instructions only with the bit set, makes them #UD.  Blocks
        translated before keep the old decoding: drop them (``ctl_flush_tb``)."""
        self._features[FEATURE_WORDS[(leaf, reg)]] &= ~(1 << bit)

    def reg_write(self, reg: int, value: int) -> None:
        self._val.value = value & 0xFFFFFFFFFFFFFFFF
        err = self._write_reg(self._h_arg, reg, self._pval)     # no argument conversion, GIL kept
        if err:
            raise UcError(err)

    # -- state accessors ------------------------------------------------------
    def gprs(self) -> tuple[int, ...]:
        return _REGS.unpack_from(self.data, OFF_REGS)

    def gpr(self, i: int) -> int:
        return _Q.unpack_from(self.data, OFF_REGS + 8 * i)[0]

    def set_gpr(self, i: int, v: int) -> None:
        _Q.pack_into(self.data, OFF_REGS + 8 * i, v & 0xFFFFFFFFFFFFFFFF)

    @property
    def rip(self) -> int:
        return _Q.unpack_from(self.data, OFF_EIP)[0]

    @property
    def hflags(self) -> int:
        return _I.unpack_from(self.data, OFF_HFLAGS)[0]

    @hflags.setter
    def hflags(self, v: int) -> None:
        _I.pack_into(self.data, OFF_HFLAGS, v)

    @property
    def hflags2(self) -> int:
        return _I.unpack_from(self.data, OFF_HFLAGS2)[0]

    def dr(self, n: int) -> int:
        return _Q.unpack_from(self.data, OFF_DR + 8 * n)[0]

    @property
    def error_code(self) -> int:
        """QEMU's ``env->error_code`` of the exception being raised."""
        return _I.unpack_from(self.data, OFF_ERROR_CODE)[0]

    def clear_old_exception(self) -> None:
        """Forget QEMU's exception in flight.  QEMU resets it when it delivers an
        event itself; here the model delivers, so a later fault would otherwise
        be combined with a stale one into #DF (check_exception)."""
        _I.pack_into(self.data, OFF_OLD_EXCEPTION, 0xFFFFFFFF)

    @property
    def tsc_offset(self) -> int:
        """QEMU's ``env->tsc_offset``, which Unicorn's RDTSC/RDTSCP add to the host TSC."""
        return _Q.unpack_from(self.data, OFF_TSC_OFFSET)[0]

    @tsc_offset.setter
    def tsc_offset(self, v: int) -> None:
        _Q.pack_into(self.data, OFF_TSC_OFFSET, v & 0xFFFFFFFFFFFFFFFF)

    @property
    def cpl(self) -> int:
        return self.hflags & HF_CPL_MASK

    def cr(self, n: int) -> int:
        return _Q.unpack_from(self.data, OFF_CR + 8 * n)[0]

    @property
    def efer(self) -> int:
        return _Q.unpack_from(self.data, OFF_EFER)[0]

    def set_lma(self, on: bool) -> None:
        """Set EFER.LMA and hflags.LMA.  QEMU changes LMA only
        on a CR0.PG transition, so a world switch that loads EFER must set it."""
        lma = 1 << 10
        efer = self.efer
        _Q.pack_into(self.data, OFF_EFER, (efer | lma) if on else (efer & ~lma))
        self.hflags = (self.hflags | HF_LMA) if on else (self.hflags & ~(HF_LMA | HF_CS64))

    def seg(self, idx: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, qemu_flags) of segment register ``idx``."""
        return _SEG.unpack_from(self.data, OFF_SEGS + SEG_SIZE * idx)

    def _raw_seg(self, off: int) -> tuple[int, int, int, int]:
        return _SEG.unpack_from(self.data, off)

    def ldt(self) -> tuple[int, int, int, int]:
        return self._raw_seg(OFF_LDT)

    def tr(self) -> tuple[int, int, int, int]:
        return self._raw_seg(OFF_TR)

    def gdt(self) -> tuple[int, int]:
        _, base, limit, _ = self._raw_seg(OFF_GDT)
        return base, limit

    def idt(self) -> tuple[int, int]:
        _, base, limit, _ = self._raw_seg(OFF_IDT)
        return base, limit

    def set_dtable(self, which: str, base: int, limit: int) -> None:
        off = {"GDTR": OFF_GDT, "IDTR": OFF_IDT}[which]
        _SEG.pack_into(self.data, off, 0, base, limit, 0)

    def set_system_seg(self, which: str, selector: int, base: int, limit: int, flags: int) -> None:
        off = {"LDTR": OFF_LDT, "TR": OFF_TR}[which]
        _SEG.pack_into(self.data, off, selector, base, limit, flags)

    def set_seg(self, idx: int, selector: int, base: int, limit: int, flags: int) -> None:
        """Load a segment's hidden state, updating hflags as QEMU's
        ``cpu_x86_load_seg_cache`` does (CS32/CS64/SS32/ADDSEG, CPL from SS)."""
        _SEG.pack_into(self.data, OFF_SEGS + SEG_SIZE * idx, selector, base, limit & 0xFFFFFFFF, flags)
        hf = self.hflags
        if idx == R_CS:
            if hf & HF_LMA and flags & DESC_L:
                hf |= HF_CS32 | HF_SS32 | HF_CS64
                hf &= ~HF_ADDSEG
            else:
                hf = (hf & ~(HF_CS32 | HF_CS64)) | (HF_CS32 if flags & DESC_B else 0)
        if idx == R_SS:
            hf = (hf & ~HF_CPL_MASK) | ((flags >> DESC_DPL_SHIFT) & 3)
        ss_flags = self.seg(R_SS)[3]
        new = HF_SS32 if ss_flags & DESC_B else 0
        if not hf & HF_CS64:
            if not self.cr(0) & 1 or not hf & HF_CS32:
                new |= HF_ADDSEG
            elif self.seg(R_DS)[1] | self.seg(R_ES)[1] | self.seg(R_SS)[1]:
                new |= HF_ADDSEG
        hf = (hf & ~(HF_SS32 | HF_ADDSEG)) | new
        self.hflags = hf

    def set_cpl(self, cpl: int) -> None:
        self.hflags = (self.hflags & ~HF_CPL_MASK) | (cpl & 3)

    def set_gif(self, on: bool) -> None:
        v = self.hflags2
        _I.pack_into(self.data, OFF_HFLAGS2, (v | HF2_GIF) if on else (v & ~HF2_GIF))


# -- the Unicorn internals above, located and verified at import ----------------------
#: the Unicorn whose internals this module was written against (pyproject pins 2.1.x)
UNICORN_EXPECTED = "unicorn 2.1.4"


@dataclass(frozen=True)
class Internals:
    """Byte offsets of every Unicorn internal the model reads or writes.

    ``context_data`` is in Unicorn's ``struct uc_context``; ``emu_counter``,
    ``invalid_addr`` and ``engine_cpu`` (the ``CPUState *cpu`` pointer) are
    in its ``struct uc_struct`` (the engine behind ``Uc._uch``); ``cpu_env``
    is where the CPU state lies in QEMU's ``X86CPU`` that pointer points to;
    the rest are in QEMU's ``CPUX86State``.  The first group is QEMU 5.0's
    layout as Unicorn 2.1 bundles it; ``dr``, ``error_code``,
    ``old_exception``, ``tsc_offset``, ``emu_counter``, ``invalid_addr``,
    ``engine_cpu``, ``cpu_env`` and ``features`` are found by calibration.
    """
    context_data: int
    regs: int
    eip: int
    hflags: int
    hflags2: int
    segs: int
    ldt: int
    tr: int
    gdt: int
    idt: int
    cr: int
    efer: int
    dr: int
    error_code: int
    old_exception: int
    tsc_offset: int
    emu_counter: int
    invalid_addr: int
    engine_cpu: int
    cpu_env: int
    features: int


#: how an error message names each value
NAMES = {
    "context_data": "uc_context data", "regs": "CPUX86State regs", "eip": "CPUX86State eip",
    "hflags": "CPUX86State hflags", "hflags2": "CPUX86State hflags2", "segs": "CPUX86State segs",
    "ldt": "CPUX86State ldt", "tr": "CPUX86State tr", "gdt": "CPUX86State gdt",
    "idt": "CPUX86State idt", "cr": "CPUX86State cr", "efer": "CPUX86State efer",
    "dr": "CPUX86State dr", "error_code": "exception error_code",
    "old_exception": "exception old_exception", "tsc_offset": "CPUX86State tsc_offset",
    "emu_counter": "emu_counter", "invalid_addr": "invalid_addr",
    "engine_cpu": "uc_struct cpu", "cpu_env": "X86CPU env", "features": "CPUX86State features",
}
HANDLE = "Uc._uch engine handle"


def missing(*names: str) -> ImportError:
    quoted = ", ".join(f"'{n}'" for n in names)
    plural = "s" if len(names) > 1 else ""
    return ImportError(f"sandbox: Unicorn internal{plural} {quoted} not found at import "
                       f"({UNICORN_EXPECTED} expected, {unicorn.__version__} installed)")


def _handle(uc: Uc) -> int:
    h = getattr(uc, "_uch", None)
    if not isinstance(h, ctypes.c_void_p) or not h.value:
        raise missing(HANDLE)
    return h.value


def _context_bytes(uc: Uc) -> bytes:
    """The whole ``uc_context`` (header and CPUX86State) of ``uc`` as it is now."""
    return bytes(uc.context_save())


def _engine_bytes(uc: Uc, size: int = 2048) -> bytes:
    """The first ``size`` bytes of Unicorn's engine struct behind ``uc``."""
    return ctypes.string_at(_handle(uc), size)


def _scratch(code: bytes = b"", at: int = 0x1000) -> Uc:
    uc = x86_64_engine(TCG_BUFFER_SMALL)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    uc.mem_write(at, code)
    return uc


def _gp_error_code_run(selector: int) -> list[bytes]:
    """INT 0x80, then ``mov ds, selector`` (#GP(selector), beyond the empty GDT)
    in a fresh CPU: the context at each of the two exceptions."""
    # int 0x80 ; mov ax, selector ; mov ds, ax
    uc = _scratch(bytes.fromhex("cd8066b8") + _H.pack(selector) + bytes.fromhex("8ed8"))
    snaps: list[bytes] = []

    def hook(u, intno, ud):
        snaps.append(_context_bytes(u))
        if len(snaps) == 2:
            u.emu_stop()
    uc.hook_add(UC_HOOK_INTR, hook)
    uc.emu_start(0x1000, 0x1010, count=4)
    return snaps


def _locate_error_code() -> int:
    """``env->error_code``: QEMU keeps ``int error_code; int exception_is_int;
    target_ulong exception_next_eip;`` together; INT 0x80 (at 0x1000, two
    bytes) pins the last two and #GP(0x1230) the first."""
    snaps = _gp_error_code_run(0x1230)
    if len(snaps) == 2:
        a, b = (s[CONTEXT_DATA:] for s in snaps)
        for off in range(OFF_EFER, len(a) - 16, 8):
            if _Q.unpack_from(a, off + 8)[0] == 0x1002 and _I.unpack_from(a, off + 4)[0] == 1 \
                    and _I.unpack_from(b, off)[0] == 0x1230:
                return off
    raise missing(NAMES["error_code"])


def _locate_old_exception(error_code: int) -> int:
    """``env->old_exception``, QEMU's "contributory exception in flight" (-1
    when none): -1 after INT 0x80, 13 after a #GP whose delivery the interrupt
    hook took over; it lies a little after ``error_code``."""
    snaps = _gp_error_code_run(0x1230)
    if len(snaps) == 2:
        a, b = (s_[CONTEXT_DATA:] for s_ in snaps)
        for off in range(error_code, min(len(a), error_code + 512) - 4, 4):
            if _I.unpack_from(a, off)[0] == 0xFFFFFFFF and _I.unpack_from(b, off)[0] == 13:
                return off
    raise missing(NAMES["old_exception"])


_RDTSC_AT = 0x1000
#: an offset RDTSC must add: far above any host TSC difference a probe can see
_TSC_MARK = 0x5A5A << 48
_TSC_SLACK = 1 << 40


def _rdtsc_probe(uc: Uc, off: int, value: int) -> int:
    """RDTSC in ``uc`` (code at :data:`_RDTSC_AT`) with the qword at CPUX86State
    offset ``off`` set to ``value`` for the one instruction, then put back."""
    ctx = uc.context_save()
    addr = ctypes.cast(ctx.context, ctypes.c_void_p).value + CONTEXT_DATA + off
    cell = ctypes.c_uint64.from_address(addr)
    old, cell.value = cell.value, value
    uc.context_restore(ctx)
    uc.emu_start(_RDTSC_AT, _RDTSC_AT + 2)
    tsc = uc.reg_read(X.UC_X86_REG_RDX) << 32 | uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFF_FFFF
    ctx = uc.context_save()
    ctypes.c_uint64.from_address(ctypes.cast(ctx.context, ctypes.c_void_p).value + CONTEXT_DATA + off).value = old
    uc.context_restore(ctx)
    return tsc


def _tsc_offset_holds(uc: Uc, off: int) -> bool:
    """RDTSC with :data:`_TSC_MARK` at ``off`` reads the mark plus the host's
    progress since a plain RDTSC just before."""
    a = _rdtsc_probe(uc, off, 0)
    b = _rdtsc_probe(uc, off, _TSC_MARK)
    return 0 <= ((b - a) & 0xFFFF_FFFF_FFFF_FFFF) - _TSC_MARK < _TSC_SLACK


def _locate_tsc_offset(old_exception: int) -> int:
    """``env->tsc_offset``, which QEMU's RDTSC adds to the host TSC: it follows
    ``int old_exception`` and ``uint64_t vm_vmcb``; the qword whose value
    RDTSC adds pins it."""
    uc = _scratch(b"\x0f\x31", _RDTSC_AT)
    start = (old_exception + 4 + 7) & ~7
    hits = [o for o in range(start, start + 32, 8) if _tsc_offset_holds(uc, o)]
    if len(hits) != 1:
        raise missing(NAMES["tsc_offset"])
    return hits[0]


_DR_IDS = (X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3,
           None, None, X.UC_X86_REG_DR6, X.UC_X86_REG_DR7)


def _locate_dr() -> int:
    """``env->dr[8]``: the one place holding distinct markers written to DR0-DR3."""
    uc = x86_64_engine(TCG_BUFFER_SMALL)
    marks = [0x0D0D_0000_1111_0000 + i for i in range(4)]
    for reg, mark in zip(_DR_IDS, marks):
        uc.reg_write(reg, mark)
    data = _context_bytes(uc)[CONTEXT_DATA:]
    hits = [o for o in range(OFF_EFER, len(data) - 32, 8)
            if [_Q.unpack_from(data, o + 8 * i)[0] for i in range(4)] == marks]
    if len(hits) != 1:
        raise missing(NAMES["dr"])
    return hits[0]


def _locate_emu_counter() -> int:
    """``uc->emu_counter``: Unicorn counts instructions only when ``emu_start``
    has a ``count``, and does not export the counter.  Its struct keeps
    ``uint64_t emu_counter, emu_count;`` side by side; a run that exhausts a
    distinctive budget pins the pair."""
    uc = _scratch(b"\x48\xff\xc0\xeb\xfb")          # inc rax ; jmp -5
    budget = 0x1357
    uc.emu_start(0x1000, 0x2000, count=budget)
    if uc.reg_read(X.UC_X86_REG_RAX) == (budget + 1) // 2:
        raw = _engine_bytes(uc)
        hits = [o for o in range(0, len(raw) - 16, 8)
                if _Q.unpack_from(raw, o + 8)[0] == budget
                and _Q.unpack_from(raw, o)[0] in (budget, budget + 1)]
        if len(hits) == 1:
            return hits[0]
    raise missing(NAMES["emu_counter"])


def _refuse_page(uc: Uc, page: int) -> None:
    """A virtual TLB whose fill maps every page 1:1 except ``page``."""
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)

    def fill(u, vaddr, access, entry, ud):
        if vaddr == page:
            return False
        entry.paddr = vaddr
        entry.perms = UC_PROT_ALL
        return True
    uc.hook_add(UC_HOOK_TLB_FILL, fill)


def _locate_invalid_addr() -> int:
    """``uc->invalid_addr``: Unicorn's fill callback sees only the page; the
    exact faulting address (CR2, NPF EXITINFO2) is kept in the engine struct."""
    uc = _scratch(bytes.fromhex("488b042523510000"))      # mov rax, [0x5123]
    _refuse_page(uc, 0x5000)
    try:
        uc.emu_start(0x1000, 0x1008)
    except UcError:
        pass
    raw = _engine_bytes(uc)
    hits = [o for o in range(0, len(raw) - 8, 8) if _Q.unpack_from(raw, o)[0] == 0x5123]
    if len(hits) != 1:
        raise missing(NAMES["invalid_addr"])
    return hits[0]


def read_process(address: int, n: int) -> bytes | None:
    """``n`` bytes of this process's memory at ``address``, or None where any
    of them is unmapped: read through ``/proc/self/mem``, which fails with an
    error where a plain read would crash the process (the calibration follows
    pointers it has not verified yet)."""
    if not 0 < address < 1 << 63:
        return None
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        b = os.pread(fd, n, address)
    except (OSError, OverflowError, ValueError):
        return None
    finally:
        os.close(fd)
    return b if len(b) == n else None


#: the import error where this process cannot read itself through /proc/self/mem
PROC_MEM_MISSING = ("sandbox: cannot read /proc/self/mem, which the sandbox needs to find Unicorn's "
                    "CPU state (it runs on Linux, with /proc mounted)")

#: how far past ``uc->cpu`` the calibration looks for the CPU state (QEMU's
#: CPUState, with its 32 KiB jump cache, comes first in X86CPU)
_ENV_WINDOW = 0x20000


def _env_marks(uc: Uc, seed: int) -> bytes:
    """Distinct values written into the GPRs of ``uc`` through Unicorn's API:
    the first 128 bytes of its CPU state (``regs``)."""
    marks = [(0x5EED_0000_0000_0000 | seed << 40) + i * 0x0101_0101 for i in range(16)]
    for rid, v in zip(GPR_IDS, marks):
        uc.reg_write(rid, v)
    return _REGS.pack(*marks)


def _env_at(uc: Uc, engine_cpu: int, cpu_env: int) -> int | None:
    """The address of the CPU state of ``uc`` by the two offsets, or None when
    the pointer they follow is not readable."""
    raw = read_process(_handle(uc) + engine_cpu, 8) if engine_cpu % 8 == 0 and engine_cpu >= 0 else None
    return None if raw is None else _Q.unpack(raw)[0] + cpu_env


def _is_live_env(uc: Uc, env: int) -> bool:
    """``env`` holds the CPU state of ``uc`` itself, not a copy: it reads as
    Unicorn's context copy does, and follows a register written through the API."""
    state = _context_bytes(uc)[CONTEXT_DATA:]
    if read_process(env, len(state)) != state:
        return False
    old = uc.reg_read(X.UC_X86_REG_RAX)
    uc.reg_write(X.UC_X86_REG_RAX, old ^ 0xA5A5_0000_0000_5A5A)
    moved = read_process(env, 8) == _Q.pack(old ^ 0xA5A5_0000_0000_5A5A)
    uc.reg_write(X.UC_X86_REG_RAX, old)
    return moved


def _locate_env() -> tuple[int, int]:
    """``uc->cpu`` and ``env`` in the ``X86CPU`` it points to: the live CPU
    state, which Unicorn exports only as copies (``uc_context_save``).  Every
    pointer in the engine struct is followed (through :func:`read_process`)
    to the registers' distinct values written just before; a match that
    follows the next register write is the CPU itself, and the same two
    offsets must find it in another engine."""
    probe = ctypes.create_string_buffer(b"sandbox", 8)
    if read_process(ctypes.addressof(probe), 8) != probe.raw:
        raise ImportError(PROC_MEM_MISSING)
    uc = x86_64_engine(TCG_BUFFER_SMALL)
    want = _env_marks(uc, 1)
    raw = _engine_bytes(uc)
    found: list[tuple[int, int]] = []
    for off in range(0, len(raw), 8):
        p = _Q.unpack_from(raw, off)[0]
        window = read_process(p, _ENV_WINDOW)
        if window is None:
            window = b""
            for page in range(0, _ENV_WINDOW, 0x1000):      # the window may end unmapped
                chunk = read_process(p + page, 0x1000)
                if chunk is None:
                    break
                window += chunk
        k = window.find(want)
        while k >= 0:
            if _is_live_env(uc, p + k):
                found.append((off, k))
                break
            k = window.find(want, k + 1)
    other = x86_64_engine(TCG_BUFFER_SMALL)
    _env_marks(other, 2)
    for off, k in found:
        env = _env_at(other, off, k)
        if env is not None and _is_live_env(other, env):
            return off, k
    raise missing(NAMES["engine_cpu"])


def live_env(uc: Uc) -> int:
    """The address of the CPU state (``CPUX86State``) of ``uc``, checked
    (:func:`_is_live_env`): where Unicorn's register API and its context
    copies read and write it."""
    _context_bytes(uc)                  # (any API call creates the engine's CPU)
    env = _env_at(uc, INTERNALS.engine_cpu, INTERNALS.cpu_env)
    if env is None or not _is_live_env(uc, env):
        raise missing(NAMES["engine_cpu"], NAMES["cpu_env"])
    return env


#: QEMU's feature words (``FeatureWordArray features``, QEMU 5.0 ``enum FeatureWord``): the
#: CPUID (leaf, register) each holds, register 0-3 = EAX EBX ECX EDX.  CPUID answers these
#: leaves from them, and the translator decodes an instruction only when its bit is set.
FEATURE_WORDS = {(1, 3): 0, (1, 2): 1, (7, 1): 2, (7, 2): 3, (7, 3): 4,
                 (0x8000_0001, 3): 6, (0x8000_0001, 2): 7, (0x8000_0008, 1): 9}
_CPUID_AT = 0x1000


def _cpuid_run(leaf: int, uc: Uc | None = None) -> tuple[int, int, int, int]:
    """EAX..EDX of CPUID ``leaf`` (subleaf 0) in a fresh scratch CPU (or ``uc``, code at 0x1000)."""
    if uc is None:
        uc = _scratch(bytes.fromhex("0fa2"), _CPUID_AT)
    uc.reg_write(X.UC_X86_REG_RAX, leaf)
    uc.reg_write(X.UC_X86_REG_RCX, 0)
    uc.emu_start(_CPUID_AT, _CPUID_AT + 2)
    return tuple(uc.reg_read(r) & 0xFFFF_FFFF for r in
                 (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX))  # type: ignore


#: CPUID leaf 1 ECX[27]: OSXSAVE, which CPUID adds from CR4 (not a feature word bit)
_OSXSAVE_BIT = 1 << 27
#: how far past the start of the CPU state the feature words are looked for (they lie
#: beyond the part ``uc_context_save`` copies)
_FEATURES_WINDOW = 0x4000


def _locate_features(engine_cpu: int, cpu_env: int) -> int:
    """``env->features``: the qwords of :data:`FEATURE_WORDS` read as CPUID answers
    them in a scratch CPU, in its live state (leaf 1 ECX without OSXSAVE)."""
    answers = {leaf: _cpuid_run(leaf) for leaf in {leaf for leaf, _ in FEATURE_WORDS}}
    want = {w: answers[leaf][reg] & ~(_OSXSAVE_BIT if (leaf, reg) == (1, 2) else 0)
            for (leaf, reg), w in FEATURE_WORDS.items()}
    uc = _scratch()
    _env_marks(uc, 5)
    env = _env_at(uc, engine_cpu, cpu_env)
    state = read_process(env, _FEATURES_WINDOW) if env is not None and _is_live_env(uc, env) else None
    if state is not None:
        last = max(want) * 8 + 8
        for off in range(OFF_EFER, len(state) - last, 8):
            if all(_Q.unpack_from(state, off + 8 * w)[0] == v for w, v in want.items()):
                return off
    raise missing(NAMES["features"])


def locate_internals() -> Internals:
    """The fixed QEMU 5.0 layout plus the calibrated offsets; ImportError
    naming the first value that cannot be found."""
    return Internals(
        context_data=CONTEXT_DATA, regs=OFF_REGS, eip=OFF_EIP, hflags=OFF_HFLAGS,
        hflags2=OFF_HFLAGS2, segs=OFF_SEGS, ldt=OFF_LDT, tr=OFF_TR, gdt=OFF_GDT, idt=OFF_IDT,
        cr=OFF_CR, efer=OFF_EFER, dr=_locate_dr(), error_code=(err := _locate_error_code()),
        old_exception=(old := _locate_old_exception(err)), tsc_offset=_locate_tsc_offset(old),
        emu_counter=_locate_emu_counter(), invalid_addr=_locate_invalid_addr(),
        engine_cpu=(env := _locate_env())[0], cpu_env=env[1], features=_locate_features(*env))


def verify_internals(at: Internals) -> None:
    """Check every offset in ``at`` against values Unicorn's own API or the
    instruction semantics produce, in scratch CPUs other than the ones that
    calibrated them; ImportError naming every value that does not hold."""
    bad: list[str] = []

    def check(name: str, ok: bool) -> None:
        if not ok and name not in bad:
            bad.append(name)

    _verify_api_state(at, check, bad)
    if NAMES["hflags"] not in bad:
        _verify_cpl(at, check)
    _verify_exception_state(at, check)
    _verify_engine_counters(at, check)
    _verify_live_env(at, check)
    if not bad:
        _verify_features(at, check)
    if bad:
        raise missing(*bad)


Check = Callable[[str, bool], None]


def _verify_api_state(at: Internals, check: Check, bad: list[str]) -> None:
    """The state Unicorn's register API writes: GPRs, RIP, segments, tables, CRs, EFER, DRs, hflags."""
    # state written through Unicorn's register API
    uc = x86_64_engine(TCG_BUFFER_SMALL)
    gprs = [0x1111_0000_0000_0000 + i * 0x101 for i in range(16)]
    for rid, v in zip(GPR_IDS, gprs):
        uc.reg_write(rid, v)
    uc.reg_write(X.UC_X86_REG_RIP, 0xDEAD_B000)
    uc.reg_write(X.UC_X86_REG_RFLAGS, 0x402)    # DF: QEMU's env->df, beside hflags, becomes -1
    # (Unicorn loads FS and GS selectors through the GDT, the others as given)
    sels = (0x1B, 0x33, 0x2B, 0x23)                           # ES CS SS DS
    for rid, v in zip((X.UC_X86_REG_ES, X.UC_X86_REG_CS, X.UC_X86_REG_SS, X.UC_X86_REG_DS), sels):
        uc.reg_write(rid, v)
    uc.reg_write(X.UC_X86_REG_FS_BASE, 0x6666_0000)
    uc.reg_write(X.UC_X86_REG_GS_BASE, 0x7777_0000)
    tables = {"gdt": (X.UC_X86_REG_GDTR, (0, 0x4000, 0x57, 0)),
              "idt": (X.UC_X86_REG_IDTR, (0, 0x5000, 0xFFF, 0)),
              "ldt": (X.UC_X86_REG_LDTR, (0x30, 0x1111_2222_3333, 0x77, 0x8200)),
              "tr": (X.UC_X86_REG_TR, (0x28, 0xAAAA_BBBB_CCCC, 0x67, 0x8B00))}
    for rid, v in tables.values():
        uc.reg_write(rid, v)
    uc.reg_write(X.UC_X86_REG_CR2, 0xC0C0_0000)
    uc.reg_write(X.UC_X86_REG_CR3, 0x3000)
    drs = {0: 0xD0, 1: 0xD1, 2: 0xD2, 3: 0xD3, 6: 0xFFFF_4FF1, 7: 0x455}
    for n, v in drs.items():
        uc.reg_write(_DR_IDS[n], v)
    raw = _context_bytes(uc)
    # size_t context_size (the CPU state's size) opens the header, data[] closes it
    check(NAMES["context_data"], _Q.unpack_from(raw, 0)[0] == len(raw) - at.context_data)
    if bad:
        raise missing(*bad)
    d = raw[at.context_data:]

    def q(off: int) -> int:
        return _Q.unpack_from(d, off)[0] if 0 <= off <= len(d) - 8 else -1

    def i32(off: int) -> int:
        return _I.unpack_from(d, off)[0] if 0 <= off <= len(d) - 4 else -1

    def cache(off: int) -> tuple[int, ...]:
        return _SEG.unpack_from(d, off) if 0 <= off <= len(d) - SEG_SIZE else ()

    check(NAMES["regs"], [q(at.regs + 8 * i) for i in range(16)] == gprs)
    check(NAMES["eip"], q(at.eip) == 0xDEAD_B000)
    check(NAMES["segs"], [cache(at.segs + SEG_SIZE * i)[:1] for i in range(4)] == [(s,) for s in sels]
          and cache(at.segs + SEG_SIZE * R_FS)[1:2] == (0x6666_0000,)
          and cache(at.segs + SEG_SIZE * R_GS)[1:2] == (0x7777_0000,))
    for name, (_, (sel, base, limit, flags)) in tables.items():
        want = (sel, base, limit, flags) if name in ("ldt", "tr") else (base, limit)
        got = cache(getattr(at, name))
        check(NAMES[name], (got if name in ("ldt", "tr") else got[1:3]) == want)
    check(NAMES["cr"], [q(at.cr + 8 * n) for n in (0, 2, 3, 4)]
          == [uc.reg_read(r) for r in (X.UC_X86_REG_CR0, X.UC_X86_REG_CR2, X.UC_X86_REG_CR3,
                                       X.UC_X86_REG_CR4)])
    check(NAMES["efer"], q(at.efer) == uc.reg_read(X.UC_X86_REG_MSR, 0xC0000080))
    check(NAMES["dr"], all(q(at.dr + 8 * n) == v for n, v in drs.items()))
    # a fresh 64-bit CPU: long mode, 64-bit CS, CPL 0; GIF set (QEMU's reset)
    hf = i32(at.hflags)
    check(NAMES["hflags"], hf >= 0 and hf & (HF_LMA | HF_CS64) == HF_LMA | HF_CS64
          and hf & HF_CPL_MASK == 0)
    check(NAMES["hflags2"], i32(at.hflags2) == HF2_GIF)


def _verify_cpl(at: Internals, check: Check) -> None:
    """CPL written into hflags rules the CPU: MOV from CR0 runs at CPL 0, is #GP at CPL 3."""
    # CPL written into hflags rules the CPU: MOV from CR0 runs at CPL 0, is #GP at CPL 3
    uc = _scratch(bytes.fromhex("0f20c0"))          # mov rax, cr0
    ints: list[int] = []
    uc.hook_add(UC_HOOK_INTR, lambda u, intno, ud: (ints.append(intno), u.emu_stop()))
    for cpl, want in ((0, []), (3, [13])):
        ctx = uc.context_save()
        addr = ctypes.cast(ctx.context, ctypes.c_void_p).value + at.context_data + at.hflags
        ctypes.c_uint32.from_address(addr).value = \
            (ctypes.c_uint32.from_address(addr).value & ~HF_CPL_MASK) | cpl
        uc.context_restore(ctx)
        ints.clear()
        uc.emu_start(0x1000, 0x1003)
        check(NAMES["hflags"], ints == want)


def _verify_exception_state(at: Internals, check: Check) -> None:
    """The exception being raised (error code, old_exception) and TSC_OFFSET."""
    # the exception being raised: #GP(selector) from MOV DS, in a fresh CPU
    snaps = _gp_error_code_run(0x2468)
    check(NAMES["error_code"], len(snaps) == 2 and 0 <= at.error_code <= len(snaps[1]) - at.context_data - 4
          and _I.unpack_from(snaps[1], at.context_data + at.error_code)[0] == 0x2468)
    check(NAMES["old_exception"], len(snaps) == 2 and 0 <= at.old_exception <= len(snaps[1]) - at.context_data - 4
          and _I.unpack_from(snaps[0], at.context_data + at.old_exception)[0] == 0xFFFF_FFFF
          and _I.unpack_from(snaps[1], at.context_data + at.old_exception)[0] == 13)
    # TSC_OFFSET: a fresh CPU's RDTSC adds what is written there (and nothing beside it)
    check(NAMES["tsc_offset"], at.tsc_offset % 8 == 0 and at.tsc_offset > at.old_exception
          and _tsc_offset_holds(_scratch(b"\x0f\x31", _RDTSC_AT), at.tsc_offset))


def _verify_engine_counters(at: Internals, check: Check) -> None:
    """The engine's instruction counter and failed-fill address."""
    # the instruction counter: five NOPs reach the end before a budget of 50; then
    # the failed-fill address: a write to a refused page, at another offset than calibration's
    uc = _scratch(b"\x90" * 5 + bytes.fromhex("48891c25a86e0000"))     # mov [0x6ea8], rbx
    _refuse_page(uc, 0x6000)
    uc.emu_start(0x1000, 0x1005, count=50)
    raw = _engine_bytes(uc)
    check(NAMES["emu_counter"], 0 <= at.emu_counter <= len(raw) - 8
          and _Q.unpack_from(raw, at.emu_counter)[0] == 5)
    try:
        uc.emu_start(0x1005, 0x100D)
    except UcError:
        pass
    raw = _engine_bytes(uc)
    check(NAMES["invalid_addr"], 0 <= at.invalid_addr <= len(raw) - 8
          and _Q.unpack_from(raw, at.invalid_addr)[0] == 0x6EA8)


def _verify_live_env(at: Internals, check: Check) -> None:
    """The live CPU state: in a fresh engine, the two offsets lead to memory
    that reads as Unicorn's context copy, follows a register written through
    the API, and is what the API reads after a write there."""
    uc = x86_64_engine(TCG_BUFFER_SMALL)
    _env_marks(uc, 3)
    env = _env_at(uc, at.engine_cpu, at.cpu_env)
    ok = env is not None and _is_live_env(uc, env)
    if ok:
        cell = ctypes.c_uint64.from_address(env + at.regs + 8 * 3)    # RBX (verified memory)
        cell.value = 0x0BAD_CAFE_0000_0003
        ok = uc.reg_read(X.UC_X86_REG_RBX) == 0x0BAD_CAFE_0000_0003
    if not ok:
        for name in ("engine_cpu", "cpu_env"):
            check(NAMES[name], False)


def _verify_features(at: Internals, check: Check) -> None:
    """``features``: in a fresh CPU, clearing RDTSCP's bit in the live feature word
    makes CPUID 8000_0001h stop reporting it and RDTSCP #UD (QEMU's translator)."""
    uc = _scratch(bytes.fromhex("0fa2"), _CPUID_AT)
    uc.mem_write(0x2000, bytes.fromhex("0f01f9"))              # rdtscp
    _env_marks(uc, 4)
    env = _env_at(uc, at.engine_cpu, at.cpu_env)
    if env is None or not _is_live_env(uc, env):
        check(NAMES["features"], False)
        return
    before = _cpuid_run(0x8000_0001, uc)[3]
    cell = ctypes.c_uint64.from_address(env + at.features + 8 * FEATURE_WORDS[(0x8000_0001, 3)])
    ok = bool(before >> 27 & 1) and cell.value == before
    if ok:
        cell.value = before & ~(1 << 27)
        uc.ctl_flush_tb()
        try:
            uc.emu_start(0x2000, 0x2003)
            ud = False
        except UcError as e:                   # Unicorn reports #UD as an invalid instruction
            ud = e.errno == UC_ERR_INSN_INVALID
        ok = not _cpuid_run(0x8000_0001, uc)[3] >> 27 & 1 and ud
    check(NAMES["features"], ok)


INTERNALS = locate_internals()
verify_internals(INTERNALS)
OFF_DR = INTERNALS.dr
OFF_ERROR_CODE = INTERNALS.error_code
OFF_OLD_EXCEPTION = INTERNALS.old_exception
OFF_TSC_OFFSET = INTERNALS.tsc_offset
OFF_EMU_COUNTER = INTERNALS.emu_counter
OFF_INVALID_ADDR = INTERNALS.invalid_addr
OFF_FEATURES = INTERNALS.features


def engine_cell(uc: Uc, offset: int) -> ctypes.c_uint64:
    """The qword at ``offset`` (:data:`OFF_EMU_COUNTER`, :data:`OFF_INVALID_ADDR`,
    ``INTERNALS.engine_cpu``) in the engine struct of ``uc``, in place (see
    :func:`engine_memory`): ``.value`` reads it as it is now (no call into
    ctypes per read, for hot paths)."""
    return engine_memory(uc, _handle(uc) + offset, ctypes.c_uint64)


def emu_counter(uc: Uc) -> int:
    """Instructions Unicorn counted in the last ``emu_start(count=...)``: those
    executed, plus the one it stopped at when the count ran out."""
    return engine_cell(uc, OFF_EMU_COUNTER).value


def invalid_addr(uc: Uc) -> int:
    """The exact address of the last failed TLB fill."""
    return engine_cell(uc, OFF_INVALID_ADDR).value
