"""The Virtual Machine Control Block (APM vol. 2 §15.5, Appendix B).

A VMCB is one 4 KiB page of host memory: the control area at 000h-3FFh and
the state-save area at 400h-FFFh.  :class:`VMCB` is a typed window onto
that page; it holds no copy of its own, so what the hypervisor writes
through it is exactly what a dump of DRAM shows.

Every offset is pinned in :data:`FIELDS` and checked at import (the way
Linux pins ``struct vmcb`` with ``BUILD_BUG_ON``), and again by the tests
against the APM's Table B-1/B-2.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..memory.hostmem import HostMemory

VMCB_SIZE = 0x1000
CONTROL_AREA_SIZE = 0x400
SAVE_AREA = 0x400

_FMT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int


#: (name, offset, size) of every scalar field, APM names
FIELDS: dict[str, Field] = {f.name: f for f in (
    # -- control area (Table B-1) --
    Field("INTERCEPT_CR", 0x000, 4),          # 15:0 reads, 31:16 writes of CR0-15
    Field("INTERCEPT_DR", 0x004, 4),          # 15:0 reads, 31:16 writes of DR0-15
    Field("INTERCEPT_EXCEPTIONS", 0x008, 4),  # vectors 0-31
    Field("INTERCEPT_MISC1", 0x00C, 4),       # vector 3: INTR ... shutdown
    Field("INTERCEPT_MISC2", 0x010, 4),       # vector 4: VMRUN ... CR write traps
    Field("INTERCEPT_MISC3", 0x014, 4),       # vector 5: INVLPGB ... idle HLT
    Field("PAUSE_FILTER_THRESHOLD", 0x03C, 2),
    Field("PAUSE_FILTER_COUNT", 0x03E, 2),
    Field("IOPM_BASE_PA", 0x040, 8),
    Field("MSRPM_BASE_PA", 0x048, 8),
    Field("TSC_OFFSET", 0x050, 8),
    Field("GUEST_ASID", 0x058, 4),
    Field("TLB_CONTROL", 0x05C, 1),
    Field("V_INTR", 0x060, 8),                # V_TPR, V_IRQ, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING, V_INTR_VECTOR
    Field("V_TPR", 0x060, 1),
    Field("V_INTR_VECTOR", 0x064, 1),
    Field("INTERRUPT_SHADOW", 0x068, 8),
    Field("EXITCODE", 0x070, 8),
    Field("EXITINFO1", 0x078, 8),
    Field("EXITINFO2", 0x080, 8),
    Field("EXITINTINFO", 0x088, 8),
    Field("NP_CONTROL", 0x090, 8),            # 0 NP_ENABLE, 1 SEV, 2 SEV-ES
    Field("AVIC_APIC_BAR", 0x098, 8),
    Field("GHCB_PA", 0x0A0, 8),
    Field("EVENTINJ", 0x0A8, 8),
    Field("N_CR3", 0x0B0, 8),
    Field("VIRT_EXT", 0x0B8, 8),              # 0 LBR virtualization, 1 VMSAVE/VMLOAD virtualization
    Field("VMCB_CLEAN", 0x0C0, 4),
    Field("NRIP", 0x0C8, 8),
    Field("GUEST_INSN_LEN", 0x0D0, 1),        # decode assist: bytes fetched (3:0)
    Field("AVIC_BACKING_PAGE", 0x0E0, 8),
    Field("AVIC_LOGICAL_TABLE", 0x0F0, 8),
    Field("AVIC_PHYSICAL_TABLE", 0x0F8, 8),
    Field("VMSA_PA", 0x108, 8),
    # -- state-save area (Table B-2); segment records are separate --
    Field("CPL", 0x4CB, 1),
    Field("EFER", 0x4D0, 8),
    Field("CR4", 0x548, 8),
    Field("CR3", 0x550, 8),
    Field("CR0", 0x558, 8),
    Field("DR7", 0x560, 8),
    Field("DR6", 0x568, 8),
    Field("RFLAGS", 0x570, 8),
    Field("RIP", 0x578, 8),
    Field("RSP", 0x5D8, 8),
    Field("S_CET", 0x5E0, 8),
    Field("SSP", 0x5E8, 8),
    Field("ISST_ADDR", 0x5F0, 8),
    Field("RAX", 0x5F8, 8),
    Field("STAR", 0x600, 8),
    Field("LSTAR", 0x608, 8),
    Field("CSTAR", 0x610, 8),
    Field("SFMASK", 0x618, 8),
    Field("KERNEL_GS_BASE", 0x620, 8),
    Field("SYSENTER_CS", 0x628, 8),
    Field("SYSENTER_ESP", 0x630, 8),
    Field("SYSENTER_EIP", 0x638, 8),
    Field("CR2", 0x640, 8),
    Field("G_PAT", 0x668, 8),
    Field("DBGCTL", 0x670, 8),
    Field("BR_FROM", 0x678, 8),
    Field("BR_TO", 0x680, 8),
    Field("LASTEXCPFROM", 0x688, 8),
    Field("LASTEXCPTO", 0x690, 8),
    Field("SPEC_CTRL", 0x6E0, 8),
)}

GUEST_INSN_BYTES = 0x0D1   # 15 bytes of the intercepted instruction (decode assist)
GUEST_INSN_MAX = 15

#: segment records (selector u16, attrib u16, limit u32, base u64), Table B-2
SEGMENTS: dict[str, int] = {
    "ES": 0x400, "CS": 0x410, "SS": 0x420, "DS": 0x430, "FS": 0x440, "GS": 0x450,
    "GDTR": 0x460, "LDTR": 0x470, "IDTR": 0x480, "TR": 0x490,
}

# Offsets pinned against the APM at import (Linux's BUILD_BUG_ON on struct vmcb).
assert FIELDS["EXITCODE"].offset == 0x70 and FIELDS["EXITINFO1"].offset == 0x78
assert FIELDS["N_CR3"].offset == 0xB0 and FIELDS["NRIP"].offset == 0xC8
assert FIELDS["RIP"].offset == 0x578 and FIELDS["RAX"].offset == 0x5F8 and FIELDS["CR2"].offset == 0x640
assert SEGMENTS["TR"] == 0x490 and FIELDS["EFER"].offset == 0x4D0 and FIELDS["G_PAT"].offset == 0x668
assert all(f.offset + f.size <= VMCB_SIZE for f in FIELDS.values())


def _at(name: str) -> int:
    return FIELDS[name].offset


# The offsets the processor reads and writes directly, by APM name.  Each is
# taken from FIELDS / SEGMENTS above, so a VMCB offset is written down once.
OFF_INTERCEPTS = _at("INTERCEPT_CR")          # the six intercept words, 000h-017h
OFF_IOPM_BASE_PA = _at("IOPM_BASE_PA")
OFF_MSRPM_BASE_PA = _at("MSRPM_BASE_PA")
OFF_TSC_OFFSET = _at("TSC_OFFSET")
OFF_PAUSE_FILTER_THRESHOLD = _at("PAUSE_FILTER_THRESHOLD")
OFF_PAUSE_FILTER_COUNT = _at("PAUSE_FILTER_COUNT")
OFF_GUEST_ASID = _at("GUEST_ASID")
OFF_TLB_CONTROL = _at("TLB_CONTROL")
OFF_V_INTR = _at("V_INTR")                    # the VINTR control quadword (:class:`VIntr`)
OFF_V_INTR_VECTOR = _at("V_INTR_VECTOR")
OFF_INTERRUPT_SHADOW = _at("INTERRUPT_SHADOW")
OFF_EXITCODE = _at("EXITCODE")                # EXITCODE, EXITINFO1, EXITINFO2, EXITINTINFO follow
OFF_EXITINTINFO = _at("EXITINTINFO")
OFF_NP_CONTROL = _at("NP_CONTROL")
OFF_AVIC_APIC_BAR = _at("AVIC_APIC_BAR")
OFF_AVIC_BACKING_PAGE = _at("AVIC_BACKING_PAGE")
OFF_AVIC_LOGICAL_TABLE = _at("AVIC_LOGICAL_TABLE")
OFF_AVIC_PHYSICAL_TABLE = _at("AVIC_PHYSICAL_TABLE")
OFF_EVENTINJ = _at("EVENTINJ")
OFF_N_CR3 = _at("N_CR3")
OFF_VIRT_EXT = _at("VIRT_EXT")
OFF_NRIP = _at("NRIP")
OFF_GUEST_INSN_LEN = _at("GUEST_INSN_LEN")
OFF_CPL = _at("CPL")
OFF_EFER = _at("EFER")
OFF_CR4 = _at("CR4")                          # CR4, CR3, CR0, DR7, DR6, RFLAGS, RIP follow
OFF_CR3 = _at("CR3")
OFF_CR0 = _at("CR0")
OFF_DR7 = _at("DR7")
OFF_DR6 = _at("DR6")
OFF_RFLAGS = _at("RFLAGS")
OFF_RIP = _at("RIP")
OFF_RSP = _at("RSP")
OFF_RAX = _at("RAX")
OFF_STAR = _at("STAR")
OFF_LSTAR = _at("LSTAR")
OFF_CSTAR = _at("CSTAR")
OFF_SFMASK = _at("SFMASK")
OFF_KERNEL_GS_BASE = _at("KERNEL_GS_BASE")
OFF_SYSENTER_CS = _at("SYSENTER_CS")
OFF_SYSENTER_ESP = _at("SYSENTER_ESP")
OFF_SYSENTER_EIP = _at("SYSENTER_EIP")
OFF_CR2 = _at("CR2")
OFF_DBGCTL = _at("DBGCTL")                    # DBGCTL, BR_FROM, BR_TO, LASTEXCPFROM, LASTEXCPTO follow
#: end of the exit-information fields (EXITCODE ... EXITINTINFO)
EXIT_INFO_END = OFF_EXITINTINFO + FIELDS["EXITINTINFO"].size
#: a segment record is selector (u16), attrib (u16), limit (u32), base (u64)
SEG_ATTRIB = 2
SEG_RECORD_SIZE = 16
#: the intercept words, as ``struct`` reads them from OFF_INTERCEPTS
INTERCEPT_WORDS = 6

# The processor moves these runs with one struct call each: pin the order.
assert (OFF_CR3, OFF_CR0, OFF_DR7, OFF_DR6, OFF_RFLAGS, OFF_RIP) == tuple(OFF_CR4 + 8 * i for i in range(1, 7))
assert _at("EXITINFO1") == OFF_EXITCODE + 8 and _at("EXITINFO2") == OFF_EXITCODE + 16
assert OFF_EXITINTINFO == OFF_EXITCODE + 24 and OFF_V_INTR_VECTOR == OFF_V_INTR + 4


class NpControl(IntFlag):
    NP_ENABLE = 1 << 0
    SEV_ENABLE = 1 << 1
    SEV_ES_ENABLE = 1 << 2


class VIntr(IntFlag):
    """Bits of the V_INTR quadword at 060h."""
    V_IRQ = 1 << 8
    V_GIF = 1 << 9
    V_IGN_TPR = 1 << 20
    V_INTR_MASKING = 1 << 24
    V_GIF_ENABLE = 1 << 25
    X2AVIC_ENABLE = 1 << 30       # AVIC for x2APIC MSR accesses (not modelled: x2APIC MSRs exit as usual)
    AVIC_ENABLE = 1 << 31         # APM §15.29.6


#: V_TPR is V_INTR[3:0]; V_INTR_PRIO is V_INTR[19:16] (APM §15.21.4)
V_TPR_MASK = 0xF
V_INTR_PRIO_SHIFT = 16
#: AVIC pointers (APM §15.29.6, Table B-1): the APIC BAR is a guest-physical
#: address, the backing page and the two tables host-physical, bits 51:12;
#: AVIC_PHYSICAL_TABLE[7:0] is AVIC_PHYSICAL_MAX_INDEX (the highest valid index)
AVIC_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
AVIC_PHYSICAL_MAX_INDEX_MASK = 0xFF

#: INTERRUPT_SHADOW bit 0: the guest is in an interrupt shadow (APM §15.21.5)
INTERRUPT_SHADOW_ACTIVE = 1


class VirtExt(IntFlag):
    """Bits of VIRT_EXT at 0B8h."""
    LBR_VIRTUALIZATION = 1 << 0
    VMSAVE_VMLOAD_VIRTUALIZATION = 1 << 1


class TlbControl(IntEnum):
    DO_NOTHING = 0x00
    FLUSH_ALL = 0x01
    FLUSH_ASID = 0x03
    FLUSH_ASID_LOCAL = 0x07


class EventType(IntEnum):
    """EVENTINJ / EXITINTINFO TYPE field (APM §15.20)."""
    INTR = 0
    NMI = 2
    EXCEPTION = 3
    SOFT_INT = 4


@dataclass(frozen=True)
class Event:
    """An EVENTINJ / EXITINTINFO value (APM §15.20, Fig. 15-5)."""
    vector: int
    type: EventType
    error_code: int | None = None
    valid: bool = True

    VALID = 1 << 31
    EV = 1 << 11

    def encode(self) -> int:
        v = (self.vector & 0xFF) | ((int(self.type) & 7) << 8)
        if self.error_code is not None:
            v |= self.EV | ((self.error_code & 0xFFFFFFFF) << 32)
        if self.valid:
            v |= self.VALID
        return v

    @classmethod
    def decode(cls, raw: int) -> "Event":
        ev = bool(raw & cls.EV)
        ty = (raw >> 8) & 7
        try:
            t = EventType(ty)
        except ValueError:
            t = ty  # type: ignore[assignment]  # reserved: VMRUN rejects it
        return cls(vector=raw & 0xFF, type=t, error_code=(raw >> 32) if ev else None,
                   valid=bool(raw & cls.VALID))


@dataclass
class Segment:
    """A VMCB segment record: selector, 12-bit attrib, limit, base (APM §15.5.1)."""
    selector: int = 0
    attrib: int = 0
    limit: int = 0
    base: int = 0

    _S = struct.Struct("<HHIQ")

    def pack(self) -> bytes:
        return self._S.pack(self.selector & 0xFFFF, self.attrib & 0xFFFF, self.limit & 0xFFFFFFFF,
                            self.base & 0xFFFFFFFFFFFFFFFF)

    @classmethod
    def unpack(cls, raw: bytes) -> "Segment":
        return cls(*cls._S.unpack(raw))

    # attrib bits: type 3:0, S 4, DPL 6:5, P 7, AVL 8, L 9, D/B 10, G 11
    @property
    def dpl(self) -> int:
        return (self.attrib >> 5) & 3

    @property
    def present(self) -> bool:
        return bool(self.attrib & 0x80)

    @property
    def long(self) -> bool:
        return bool(self.attrib & 0x200)

    @property
    def db(self) -> bool:
        return bool(self.attrib & 0x400)


class VMCB:
    """Typed accessors over a VMCB page at host-physical ``hpa``.

    Scalar fields are attributes named as in the APM (``vmcb.EXITCODE``,
    ``vmcb.N_CR3``, ``vmcb.RIP`` ...); segment records are reached with
    :meth:`seg` / :meth:`set_seg`.
    """

    __slots__ = ("mem", "hpa")

    def __init__(self, mem: "HostMemory", hpa: int) -> None:
        if hpa & 0xFFF:
            raise ValueError(f"VMCB must be 4 KiB aligned, got {hpa:#x}")
        if hpa < 0 or hpa + VMCB_SIZE > mem.size:
            raise ValueError(f"VMCB at {hpa:#x} is outside host memory")
        self.mem = mem
        self.hpa = hpa

    # -- segments -------------------------------------------------------------
    def seg(self, name: str) -> Segment:
        return Segment.unpack(self.mem.read(self.hpa + SEGMENTS[name], 16))

    def set_seg(self, name: str, s: Segment) -> None:
        self.mem.write(self.hpa + SEGMENTS[name], s.pack())

    # -- intercept vectors (flat bit index == exit code) ----------------------
    def intercept(self, bit: int) -> bool:
        word, b = divmod(bit, 32)
        return bool(self.mem.read_u32(self.hpa + 4 * word) >> b & 1)

    def set_intercept(self, bit: int, on: bool = True) -> None:
        word, b = divmod(bit, 32)
        a = self.hpa + 4 * word
        v = self.mem.read_u32(a)
        self.mem.write_u32(a, (v | (1 << b)) if on else (v & ~(1 << b)))

    def intercept_words(self) -> tuple[int, int, int, int, int, int]:
        return struct.unpack("<6I", self.mem.read(self.hpa, 24))

    # -- decode assist ----------------------------------------------------------
    @property
    def guest_insn_bytes(self) -> bytes:
        n = self.GUEST_INSN_LEN & 0xF
        return self.mem.read(self.hpa + GUEST_INSN_BYTES, n)

    # -- event injection --------------------------------------------------------
    def inject(self, event: Event) -> None:
        """Queue ``event`` in EVENTINJ for delivery at the next VMRUN."""
        self.EVENTINJ = event.encode()

    def clear(self) -> None:
        self.mem.write(self.hpa, bytes(VMCB_SIZE))

    def __repr__(self) -> str:
        return f"VMCB(hpa={self.hpa:#x})"


def _field_property(f: Field) -> property:
    st = struct.Struct(_FMT[f.size])
    off, size, mask = f.offset, f.size, (1 << (8 * f.size)) - 1
    unpack, pack = st.unpack_from, st.pack_into

    # The VMCB page was bounds-checked when the VMCB was made; HostMemory's
    # sync hook still sees every access (lazy #VMEXIT state, clean tracking).
    def get(self: VMCB) -> int:
        mem = self.mem
        a = self.hpa + off
        if mem.sync is not None:
            mem.sync(a, size, False)
        return unpack(mem.raw, a)[0]

    def set_(self: VMCB, value: int) -> None:
        mem = self.mem
        a = self.hpa + off
        if mem.sync is not None:
            mem.sync(a, size, True)
        pack(mem.raw, a, value & mask)
    return property(get, set_, doc=f"{f.name} at VMCB+{f.offset:03X}h ({f.size} bytes)")


for _f in FIELDS.values():
    setattr(VMCB, _f.name, _field_property(_f))
