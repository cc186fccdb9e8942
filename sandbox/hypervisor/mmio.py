"""Memory-mapped I/O: turning a VMEXIT_NPF into a device access and back.

A hypervisor marks a guest-physical window as MMIO by leaving it out of
the nested page table.  A guest access then exits with VMEXIT_NPF
(EXITINFO2 = the GPA, APM §15.25.6) and the guest's instruction bytes in
the VMCB (decode assists, §15.34).  :func:`decode_access` turns those bytes
into an :class:`MmioAccess` -- address, size, direction, value -- and
:func:`complete` writes a read's result into the destination register; the
hypervisor then resumes at the next instruction.

Supported instructions are the ones drivers use on device registers: MOV
to and from memory (register or immediate source, ``movabs`` included) and
MOVZX/MOVSX loads.  Anything else touching MMIO is reported, not guessed.
"""
from __future__ import annotations

from dataclasses import dataclass

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone import x86_const as CX

_cs = Cs(CS_ARCH_X86, CS_MODE_64)
_cs.detail = True

#: capstone register name -> (64-bit register, bit offset, width in bits)
_SUBREG: dict[str, tuple[str, int, int]] = {}
for _n, (_d, _w, _b, _l) in {
        "rax": ("eax", "ax", "al", "ah"), "rbx": ("ebx", "bx", "bl", "bh"), "rcx": ("ecx", "cx", "cl", "ch"),
        "rdx": ("edx", "dx", "dl", "dh"), "rsi": ("esi", "si", "sil", None), "rdi": ("edi", "di", "dil", None),
        "rbp": ("ebp", "bp", "bpl", None), "rsp": ("esp", "sp", "spl", None)}.items():
    _SUBREG.update({_n: (_n, 0, 64), _d: (_n, 0, 32), _w: (_n, 0, 16), _b: (_n, 0, 8)})
    if _l:
        _SUBREG[_l] = (_n, 8, 8)
for _i in range(8, 16):
    _r = f"r{_i}"
    _SUBREG.update({_r: (_r, 0, 64), _r + "d": (_r, 0, 32), _r + "w": (_r, 0, 16), _r + "b": (_r, 0, 8)})


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


@dataclass(frozen=True)
class MmioAccess:
    """One decoded guest access to a device register."""
    gpa: int
    size: int
    is_write: bool
    value: int | None           # the value written (None for a read)
    form: AccessForm


def decode_form(code: bytes) -> AccessForm:
    """Decode the instruction in ``code`` (at most 15 bytes) into its access form."""
    insn = next(_cs.disasm(code, 0, 1), None)
    if insn is None:
        raise MmioDecodeError(f"undecodable instruction bytes {code.hex()}")
    m = insn.mnemonic
    ops = insn.operands
    if m not in ("mov", "movabs", "movzx", "movsx") or len(ops) != 2:
        raise MmioDecodeError(f"'{m} {insn.op_str}' touches MMIO; only MOV/MOVZX/MOVSX are emulated")
    dst, src = ops
    if dst.type == CX.X86_OP_MEM:
        if src.type == CX.X86_OP_REG:
            return AccessForm(insn.size, dst.size, True, src_reg=_SUBREG[insn.reg_name(src.reg)], mnemonic=m)
        if src.type == CX.X86_OP_IMM:
            return AccessForm(insn.size, dst.size, True, imm=src.imm & ((1 << (8 * dst.size)) - 1), mnemonic=m)
    elif src.type == CX.X86_OP_MEM and dst.type == CX.X86_OP_REG:
        ext = {"movzx": "zx", "movsx": "sx"}.get(m, "")
        return AccessForm(insn.size, src.size, False, dst_reg=_SUBREG[insn.reg_name(dst.reg)], extend=ext,
                          mnemonic=m)
    raise MmioDecodeError(f"'{m} {insn.op_str}' has no memory operand the model can emulate")


def _sub(value: int, reg: tuple[str, int, int]) -> int:
    _, shift, width = reg
    return (value >> shift) & ((1 << width) - 1)


def decode_access(code: bytes, gpa: int, regs, form: AccessForm | None = None) -> MmioAccess:
    """The access at ``gpa`` made by the instruction in ``code``; ``regs``
    supplies source register values (``regs.rax`` ...)."""
    f = form or decode_form(code)
    value = None
    if f.is_write:
        value = f.imm if f.imm is not None else _sub(getattr(regs, f.src_reg[0]), f.src_reg)
        value &= (1 << (8 * f.size)) - 1
    return MmioAccess(gpa, f.size, f.is_write, value, f)


def complete(access: MmioAccess, result: int, regs) -> None:
    """Write a read's ``result`` into its destination register with the x86
    width rules: 32-bit destinations zero-extend, 8/16-bit ones merge."""
    f = access.form
    if f.is_write:
        return
    name, shift, width = f.dst_reg
    v = result & ((1 << (8 * f.size)) - 1)
    if f.extend == "sx" and v >> (8 * f.size - 1):
        v |= ((1 << width) - 1) & ~((1 << (8 * f.size)) - 1)
    v &= (1 << width) - 1
    if width == 64:
        setattr(regs, name, v)
    elif width == 32:
        setattr(regs, name, v)
    else:
        old = getattr(regs, name)
        mask = ((1 << width) - 1) << shift
        setattr(regs, name, (old & ~mask) | (v << shift))
