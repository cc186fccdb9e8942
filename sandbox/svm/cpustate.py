"""Fast, complete access to the emulated CPU's state.

Unicorn's register API exposes only segment *selectors*, and each call from
Python costs about a microsecond.  A VMRUN must load, and a #VMEXIT must
save, the hidden part of CS/SS/DS/ES (base, limit, attributes) and the CPL
(APM vol. 2 §15.5.1), so this module reads Unicorn's CPU context -- QEMU's
``CPUX86State`` -- directly: one ``uc_context_save`` copies it into a
buffer we can unpack with ``struct``, and ``uc_context_restore`` writes it
back.

The layout is QEMU 5.0's, as bundled by Unicorn 2.1.  Every offset used here
is verified at import against values written through Unicorn's own API, so
a Unicorn with another layout fails loudly instead of silently.
"""
from __future__ import annotations

import ctypes
import struct

from unicorn import Uc, UC_ARCH_X86, UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_MODE_64, UC_PROT_ALL, UC_TLB_VIRTUAL, UcError
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

# -- QEMU CPUX86State layout (x86_64 target) ---------------------------------
OFF_REGS = 0
OFF_EIP = 128
OFF_EFLAGS = 136
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

DESC_B = 1 << 22
DESC_L = 1 << 21
DESC_DPL_SHIFT = 13

_SEG = struct.Struct("<I4xQII")    # selector, base, limit, flags
_Q = struct.Struct("<Q")
_I = struct.Struct("<I")
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


class CpuState:
    """Raw view of one Unicorn x86-64 CPU's state.

    :meth:`load` snapshots the CPU into :attr:`data`; getters read the
    snapshot; setters patch it; :meth:`store` writes it back.  Register
    accessors that have side effects inside QEMU (CR0/CR3/CR4/EFER, RIP,
    RFLAGS) go through Unicorn's API instead, via :meth:`reg_write`.
    """

    def __init__(self, uc: Uc) -> None:
        self.uc = uc
        self._h = uc._uch
        self._ctx = uc.context_save()
        addr = ctypes.cast(self._ctx.context, ctypes.c_void_p).value
        size = self._ctx.size - CONTEXT_DATA
        self.data = memoryview((ctypes.c_char * size).from_address(addr + CONTEXT_DATA)).cast("B")
        self._save = uclib.uc_context_save
        self._restore = uclib.uc_context_restore
        self._rr = uclib.uc_reg_read
        self._rw = uclib.uc_reg_write
        self.dirty = False         # snapshot holds writes not yet stored
        self._val = ctypes.c_uint64()
        self._pval = ctypes.byref(self._val)

    # -- whole-context transfer ------------------------------------------------
    def load(self) -> "CpuState":
        if self.dirty:
            self.store()
        self._save(self._h, self._ctx.context)
        return self

    def store(self) -> None:
        self._restore(self._h, self._ctx.context)
        self.dirty = False

    # -- direct register access through Unicorn (side effects honoured) --------
    def reg_read(self, reg: int) -> int:
        if self.dirty:
            self.store()
        self._rr(self._h, reg, self._pval)
        return self._val.value

    def reg_write(self, reg: int, value: int) -> None:
        if self.dirty:
            self.store()
        self._val.value = value & 0xFFFFFFFFFFFFFFFF
        err = self._rw(self._h, reg, self._pval)
        if err:
            raise UcError(err)

    # -- snapshot accessors ------------------------------------------------------
    def gprs(self) -> tuple[int, ...]:
        return _REGS.unpack_from(self.data, OFF_REGS)

    def gpr(self, i: int) -> int:
        return _Q.unpack_from(self.data, OFF_REGS + 8 * i)[0]

    def set_gpr(self, i: int, v: int) -> None:
        """Patch a GPR in the snapshot; written back by the next load() or store()."""
        _Q.pack_into(self.data, OFF_REGS + 8 * i, v & 0xFFFFFFFFFFFFFFFF)
        self.dirty = True

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

    @property
    def cpl(self) -> int:
        return self.hflags & HF_CPL_MASK

    def cr(self, n: int) -> int:
        return _Q.unpack_from(self.data, OFF_CR + 8 * n)[0]

    @property
    def efer(self) -> int:
        return _Q.unpack_from(self.data, OFF_EFER)[0]

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


def _verify_layout() -> None:
    """Check every offset above against Unicorn's own register API."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    for i, rid in enumerate(GPR_IDS):
        uc.reg_write(rid, 0x1111_0000_0000_0000 + i * 0x101)
    uc.reg_write(X.UC_X86_REG_RIP, 0xDEAD_B000)
    uc.reg_write(X.UC_X86_REG_CS, 0x33)
    uc.reg_write(X.UC_X86_REG_SS, 0x2B)
    uc.reg_write(X.UC_X86_REG_DS, 0x23)
    uc.reg_write(X.UC_X86_REG_ES, 0x1B)
    uc.reg_write(X.UC_X86_REG_GS_BASE, 0x7777_0000)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x4000, 0x57, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, 0x5000, 0xFFF, 0))
    uc.reg_write(X.UC_X86_REG_CR3, 0x3000)
    uc.reg_write(X.UC_X86_REG_CR2, 0xC0C0_0000)
    st = CpuState(uc).load()
    problems = []
    for i, rid in enumerate(GPR_IDS):
        if st.gpr(i) != 0x1111_0000_0000_0000 + i * 0x101:
            problems.append(f"gpr {i}")
    if st.rip != 0xDEAD_B000:
        problems.append("eip")
    if [st.seg(i)[0] for i in (R_CS, R_SS, R_DS, R_ES)] != [0x33, 0x2B, 0x23, 0x1B]:
        problems.append("segment selectors")
    if st.seg(R_GS)[1] != 0x7777_0000:
        problems.append("segment base")
    if st.gdt() != (0x4000, 0x57) or st.idt() != (0x5000, 0xFFF):
        problems.append("gdt/idt")
    if st.cr(3) != 0x3000 or st.cr(2) != 0xC0C0_0000:
        problems.append("cr")
    if st.efer != uc.reg_read(X.UC_X86_REG_MSR, 0xC0000080):
        problems.append("efer")
    if not st.hflags & HF_LMA:
        problems.append("hflags")
    if problems:
        raise ImportError("Unicorn's CPUX86State layout differs from the one this sandbox "
                          f"was built for ({', '.join(problems)}); use unicorn 2.1.x")
    del st, uc


_verify_layout()


def _calibrate_error_code() -> int:
    """Find ``env->error_code`` by raising #GP(0x1230) and INT 0x80 in a scratch CPU.

    QEMU keeps ``int error_code; int exception_is_int; target_ulong
    exception_next_eip;`` together; INT 0x80 pins the last two and #GP with a
    selector error code pins the first.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    # int 0x80 ; mov ax, 0x1230 ; mov ds, ax
    uc.mem_write(0x1000, bytes.fromhex("cd8066b830128ed8"))
    snaps: list[bytes] = []

    def hook(u, intno, ud):
        snaps.append(bytes(u.context_save())[CONTEXT_DATA:])
        if len(snaps) == 2:
            u.emu_stop()
    uc.hook_add(UC_HOOK_INTR, hook)
    uc.emu_start(0x1000, 0x1010, count=4)
    if len(snaps) != 2:
        raise ImportError("cannot calibrate Unicorn's exception state")
    a, b = snaps
    for off in range(OFF_EFER, len(a) - 16, 8):
        if _Q.unpack_from(a, off + 8)[0] == 0x1002 and _I.unpack_from(a, off + 4)[0] == 1 \
                and _I.unpack_from(b, off)[0] == 0x1230:
            return off
    raise ImportError("cannot locate env->error_code in Unicorn's CPU context")


OFF_ERROR_CODE = _calibrate_error_code()


def _find_dr() -> int:
    """Locate ``env->dr[8]`` by writing distinct markers to DR0-DR3."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    marks = [0x0D0D_0000_1111_0000 + i for i in range(4)]
    for i, reg in enumerate((X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3)):
        uc.reg_write(reg, marks[i])
    data = bytes(uc.context_save())[CONTEXT_DATA:]
    hits = [o for o in range(OFF_EFER, len(data) - 32, 8)
            if [_Q.unpack_from(data, o + 8 * i)[0] for i in range(4)] == marks]
    if len(hits) != 1:
        raise ImportError("cannot locate env->dr[] in Unicorn's CPU context")
    return hits[0]


OFF_DR = _find_dr()


def _find_emu_counter() -> int | None:
    """Offset of ``uc->emu_counter`` in Unicorn's engine struct, or None.

    Unicorn counts instructions only when ``emu_start`` is given a ``count``,
    and does not export the counter.  Its struct keeps ``size_t emu_counter;
    size_t emu_count;`` side by side; a scratch run with a distinctive count
    that is reached exactly pins the pair.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x1000, UC_PROT_ALL)
    uc.mem_write(0x1000, b"\x48\xff\xc0\xeb\xfb")     # inc rax ; jmp -5
    budget = 0x1357
    uc.emu_start(0x1000, 0x2000, count=budget)
    if uc.reg_read(X.UC_X86_REG_RAX) != (budget + 1) // 2:
        return None
    addr = uc._uch.value
    raw = ctypes.string_at(addr, 2048)
    hits = [o for o in range(0, len(raw) - 16, 8)
            if _Q.unpack_from(raw, o + 8)[0] == budget and _Q.unpack_from(raw, o)[0] in (budget, budget + 1)]
    return hits[0] if len(hits) == 1 else None


OFF_EMU_COUNTER = _find_emu_counter()


def emu_counter(uc: Uc) -> int | None:
    """Instructions Unicorn counted in the last ``emu_start(count=...)``."""
    if OFF_EMU_COUNTER is None:
        return None
    return _Q.unpack_from(ctypes.string_at(uc._uch.value + OFF_EMU_COUNTER, 8))[0]


def _find_invalid_addr() -> int | None:
    """Offset of ``uc->invalid_addr``: the exact address whose TLB fill failed.

    Unicorn's fill callback only sees the page; the faulting address with its
    page offset (CR2, NPF EXITINFO2) is kept in the engine struct.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)

    def fill(u, vaddr, access, entry, ud):
        if vaddr == 0x5000:
            return False
        entry.paddr = vaddr
        entry.perms = UC_PROT_ALL
        return True
    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    uc.mem_write(0x1000, bytes.fromhex("488b042523510000"))   # mov rax, [0x5123]
    try:
        uc.emu_start(0x1000, 0x1008)
    except UcError:
        pass
    raw = ctypes.string_at(uc._uch.value, 2048)
    hits = [o for o in range(0, len(raw) - 8, 8) if _Q.unpack_from(raw, o)[0] == 0x5123]
    return hits[0] if len(hits) == 1 else None


OFF_INVALID_ADDR = _find_invalid_addr()


def invalid_addr(uc: Uc) -> int | None:
    """The exact address of the last failed TLB fill, if Unicorn's struct was located."""
    if OFF_INVALID_ADDR is None:
        return None
    return _Q.unpack_from(ctypes.string_at(uc._uch.value + OFF_INVALID_ADDR, 8))[0]
