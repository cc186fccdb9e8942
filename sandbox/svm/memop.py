"""The memory operand of an instruction, decoded as the processor's decode
assists see it (APM vol. 2 §15.34): what a MOV, MOVZX or MOVSX to or from
memory reads or writes, and through which register.

The hypervisor's MMIO emulation (:mod:`sandbox.hypervisor.mmio`) and the
processor's AVIC (:mod:`.avic`, which completes accelerated APIC accesses
itself) both decode device-register accesses with :func:`decode_form`.
"""
from __future__ import annotations

from dataclasses import dataclass

from capstone import x86_const as CX

from .decode import capstone_decoders

_CS = capstone_decoders(detail=True)

#: capstone register name -> (64-bit register, bit offset, width in bits)
SUBREG: dict[str, tuple[str, int, int]] = {}
for _n, (_d, _w, _b, _l) in {
        "rax": ("eax", "ax", "al", "ah"), "rbx": ("ebx", "bx", "bl", "bh"), "rcx": ("ecx", "cx", "cl", "ch"),
        "rdx": ("edx", "dx", "dl", "dh"), "rsi": ("esi", "si", "sil", None), "rdi": ("edi", "di", "dil", None),
        "rbp": ("ebp", "bp", "bpl", None), "rsp": ("esp", "sp", "spl", None)}.items():
    SUBREG.update({_n: (_n, 0, 64), _d: (_n, 0, 32), _w: (_n, 0, 16), _b: (_n, 0, 8)})
    if _l:
        SUBREG[_l] = (_n, 8, 8)
for _i in range(8, 16):
    _r = f"r{_i}"
    SUBREG.update({_r: (_r, 0, 64), _r + "d": (_r, 0, 32), _r + "w": (_r, 0, 16), _r + "b": (_r, 0, 8)})


class MmioDecodeError(Exception):
    """The instruction that touched MMIO is not one the hypervisor emulates."""


@dataclass(frozen=True)
class AccessForm:
    """What an instruction does to memory, independent of register values."""
    length: int
    size: int                   # bytes accessed
    is_write: bool
    src_reg: tuple[str, int, int] | None = None     # a store's source register
    imm: int | None = None                          # a store's immediate
    dst_reg: tuple[str, int, int] | None = None     # a load's destination register
    extend: str = ""                                # "", "zx" or "sx" (MOVZX/MOVSX)
    mnemonic: str = ""


def decode_form(code: bytes, mode: int = 64) -> AccessForm:
    """Decode the instruction in ``code`` (at most 15 bytes) into its access form, as
    code of a ``mode``-bit code segment (64, 32 or 16)."""
    insn = next(_CS[mode].disasm(code, 0, 1), None)
    if insn is None:
        raise MmioDecodeError(f"undecodable instruction bytes {code.hex()}")
    m = insn.mnemonic
    ops = insn.operands
    if m not in ("mov", "movabs", "movzx", "movsx") or len(ops) != 2:
        raise MmioDecodeError(f"'{m} {insn.op_str}' touches MMIO; only MOV/MOVZX/MOVSX are emulated")
    dst, src = ops
    if dst.type == CX.X86_OP_MEM:
        if src.type == CX.X86_OP_REG:
            return AccessForm(insn.size, dst.size, True, src_reg=SUBREG[insn.reg_name(src.reg)], mnemonic=m)
        if src.type == CX.X86_OP_IMM:
            return AccessForm(insn.size, dst.size, True, imm=src.imm & ((1 << (8 * dst.size)) - 1), mnemonic=m)
    elif src.type == CX.X86_OP_MEM and dst.type == CX.X86_OP_REG:
        ext = {"movzx": "zx", "movsx": "sx"}.get(m, "")
        return AccessForm(insn.size, src.size, False, dst_reg=SUBREG[insn.reg_name(dst.reg)], extend=ext,
                          mnemonic=m)
    raise MmioDecodeError(f"'{m} {insn.op_str}' has no memory operand the model can emulate")


def store_value(form: AccessForm, src: int) -> int:
    """The value a store writes: its immediate, or the source sub-register of
    ``src`` (the full 64-bit register's value)."""
    if form.imm is not None:
        return form.imm
    _, shift, width = form.src_reg
    return (src >> shift) & ((1 << width) - 1) & ((1 << (8 * form.size)) - 1)


def load_result(form: AccessForm, result: int, old: int) -> int:
    """The destination register's new 64-bit value after a load of ``result``
    (``old``: its value before), with the x86 width rules: 32-bit destinations
    zero-extend, 8/16-bit ones merge, MOVSX sign-extends."""
    _, shift, width = form.dst_reg
    v = result & ((1 << (8 * form.size)) - 1)
    if form.extend == "sx" and v >> (8 * form.size - 1):
        v |= ((1 << width) - 1) & ~((1 << (8 * form.size)) - 1)
    v &= (1 << width) - 1
    if width >= 32:
        return v
    mask = ((1 << width) - 1) << shift
    return (old & ~mask) | (v << shift)
