"""The x86-64 register layout the gdb stub offers, and its target description.

gdb learns a remote target's registers from a target description
(gdb manual, "Target Descriptions", "Target Description Format" and
"Standard Target Features" / "i386 Features"), which the stub serves as
``target.xml`` through ``qXfer:features:read``. Register numbers -- the
order of the ``g`` packet and the numbers in ``p``/``P`` -- are the order of
the ``<reg>`` elements in that document.

For an ``i386:x86-64`` target, gdb requires the feature
``org.gnu.gdb.i386.core`` with, in order, ``rax rbx rcx rdx rsi rdi rbp rsp
r8``-``r15 rip eflags cs ss ds es fs gs``, the x87 registers ``st0``-``st7``
and ``fctrl fstat ftag fiseg fioff foseg fooff fop``; it accepts
``org.gnu.gdb.i386.sse`` (``xmm0``-``xmm15``, ``mxcsr``) and
``org.gnu.gdb.i386.segments`` (``fs_base``, ``gs_base``). Registers of a
feature gdb does not know are still shown by ``info registers`` (in their
group) and usable as ``$name``: the system registers ``cr0 cr2 cr3 cr4 cr8
efer`` are in such a feature, ``org.amdv-sandbox.sys`` (the manual defines
no x86 system-register feature), typed as flags where the bits have names.

A target that cannot provide a register (the x87 state, say) reports it
unavailable; the stub then sends ``x`` digits for it, which gdb shows as
``<unavailable>``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    group: str
    feature: str

    @property
    def size(self) -> int:
        return self.bits // 8


CORE, SSE, SEGMENTS, SYS = ("org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse",
                            "org.gnu.gdb.i386.segments", "org.amdv-sandbox.sys")

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENT_NAMES = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
SYSTEM_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")


def _layout() -> tuple[Reg, ...]:
    regs: list[Reg] = []
    for n in GPR_NAMES:
        t = {"rbp": "data_ptr", "rsp": "data_ptr"}.get(n, "int64")
        regs.append(Reg(n, 64, t, "general", CORE))
    regs.append(Reg("rip", 64, "code_ptr", "general", CORE))
    regs.append(Reg("eflags", 32, "i386_eflags", "general", CORE))
    regs += [Reg(n, 32, "int32", "general", CORE) for n in SEGMENT_NAMES]
    regs += [Reg(f"st{i}", 80, "i387_ext", "float", CORE) for i in range(8)]
    regs += [Reg(n, 32, "int", "float", CORE) for n in X87_CONTROL]
    regs += [Reg(f"xmm{i}", 128, "vec128", "vector", SSE) for i in range(16)]
    regs.append(Reg("mxcsr", 32, "i386_mxcsr", "vector", SSE))
    regs += [Reg(n, 64, "int", "system", SEGMENTS) for n in ("fs_base", "gs_base")]
    sys_types = {"cr0": "sandbox_cr0", "cr4": "sandbox_cr4", "efer": "sandbox_efer"}
    regs += [Reg(n, 64, sys_types.get(n, "int64"), "system", SYS) for n in SYSTEM_NAMES]
    return tuple(regs)


#: every register the stub offers, in gdb register-number order
REGISTERS: tuple[Reg, ...] = _layout()
REGISTER_NUMBER: dict[str, int] = {r.name: i for i, r in enumerate(REGISTERS)}
#: bytes of a ``g`` packet's data (each byte two hex digits)
G_PACKET_BYTES = sum(r.size for r in REGISTERS)


def _flags(type_id: str, size: int, fields: dict[str, int]) -> str:
    body = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in fields.items())
    return f'<flags id="{type_id}" size="{size}">{body}</flags>'


# bit names: RFLAGS (APM vol. 2 §3.1.6), MXCSR (APM vol. 1 §4.2.2),
# CR0 / CR4 (APM vol. 2 §3.1.1, §3.1.3), EFER (APM vol. 2 §3.1.7)
_EFLAGS = {"CF": 0, "": 1, "PF": 2, "AF": 4, "ZF": 6, "SF": 7, "TF": 8, "IF": 9, "DF": 10, "OF": 11,
           "NT": 14, "RF": 16, "VM": 17, "AC": 18, "VIF": 19, "VIP": 20, "ID": 21}
_MXCSR = {"IE": 0, "DE": 1, "ZE": 2, "OE": 3, "UE": 4, "PE": 5, "DAZ": 6, "IM": 7, "DM": 8, "ZM": 9,
          "OM": 10, "UM": 11, "PM": 12, "FZ": 15}
_CR0 = {"PE": 0, "MP": 1, "EM": 2, "TS": 3, "ET": 4, "NE": 5, "WP": 16, "AM": 18, "NW": 29, "CD": 30,
        "PG": 31}
_CR4 = {"VME": 0, "PVI": 1, "TSD": 2, "DE": 3, "PSE": 4, "PAE": 5, "MCE": 6, "PGE": 7, "PCE": 8,
        "OSFXSR": 9, "OSXMMEXCPT": 10, "UMIP": 11, "LA57": 12, "FSGSBASE": 16, "PCIDE": 17,
        "OSXSAVE": 18, "SMEP": 20, "SMAP": 21, "PKE": 22, "CET": 23}
_EFER = {"SCE": 0, "LME": 8, "LMA": 10, "NXE": 11, "SVME": 12, "LMSLE": 13, "FFXSR": 14, "TCE": 15}

_TYPES = {
    CORE: _flags("i386_eflags", 4, _EFLAGS),
    SSE: ('<vector id="v4f" type="ieee_single" count="4"/>'
          '<vector id="v2d" type="ieee_double" count="2"/>'
          '<vector id="v16i8" type="int8" count="16"/>'
          '<vector id="v8i16" type="int16" count="8"/>'
          '<vector id="v4i32" type="int32" count="4"/>'
          '<vector id="v2i64" type="int64" count="2"/>'
          '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
          '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
          '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
          '<field name="uint128" type="uint128"/></union>'
          + _flags("i386_mxcsr", 4, _MXCSR)),
    SEGMENTS: "",
    SYS: (_flags("sandbox_cr0", 8, _CR0) + _flags("sandbox_cr4", 8, _CR4)
          + _flags("sandbox_efer", 8, _EFER)),
}


def target_xml() -> str:
    """The whole description as one document (no ``xi:include``)."""
    parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
             '<target version="1.0">', "<architecture>i386:x86-64</architecture>"]
    for feature in (CORE, SSE, SEGMENTS, SYS):
        parts.append(f'<feature name="{feature}">')
        parts.append(_TYPES[feature])
        for r in REGISTERS:
            if r.feature == feature:
                parts.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" group="{r.group}"/>')
        parts.append("</feature>")
    parts.append("</target>")
    return "\n".join(p for p in parts if p)


TARGET_XML = target_xml()
