"""Event delivery through the guest's own IDT (APM vol. 2 §8.9, long mode).

Unicorn never vectors an exception through the guest IDT, so the processor
model does it here: gate lookup, privilege checks, the IST / RSPn stack
switch, the 64-bit frame (SS, RSP, RFLAGS, CS, RIP, error code), IF
clearing for interrupt gates, and the CPL change.  A fault during delivery
escalates to #DF, and a fault while delivering #DF is a shutdown (§8.2.9).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Callable

from .cpustate import R_CS, R_SS, attrib_to_flags

if TYPE_CHECKING:
    pass


class Vec(IntEnum):
    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XF = 19
    VC = 29


#: vectors that push an error code (§8.2)
HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})


class Shutdown(Exception):
    """Triple fault: the processor enters the shutdown state."""


@dataclass
class DeliveryFault(Exception):
    """A fault raised while delivering an event (becomes the next event)."""
    vector: int
    error_code: int | None = 0


def combine(first: int, second: int) -> int | None:
    """Vector to deliver when ``second`` faults during delivery of ``first``
    (§8.2.9 Table 8-7): 8 for a double fault, None for shutdown, else ``second``."""
    if first == Vec.DF:
        return None
    if (first in CONTRIBUTORY and second in CONTRIBUTORY) or \
       (first == Vec.PF and (second in CONTRIBUTORY or second == Vec.PF)):
        return Vec.DF
    return second


@dataclass
class GuestAccess:
    """What delivery needs from the processor: supervisor-privilege reads and
    writes of guest linear memory (raising ``GuestPageFault`` / ``NestedFault``)."""
    read: Callable[[int, int], bytes]
    write: Callable[[int, bytes], None]


def read_descriptor(mem: GuestAccess, gdt_base: int, gdt_limit: int, selector: int) -> int | None:
    idx = selector & ~7
    if selector & 4 or idx + 7 > gdt_limit or idx == 0:
        return None
    return struct.unpack("<Q", mem.read(gdt_base + idx, 8))[0]


def _canonical(va: int) -> bool:
    top = (va & 0xFFFF_FFFF_FFFF_FFFF) >> 47
    return top == 0 or top == 0x1FFFF


def descriptor_attrib(desc: int) -> int:
    """12-bit VMCB-style attrib from a descriptor's bits 55:52 and 47:40."""
    return ((desc >> 40) & 0xFF) | (((desc >> 52) & 0xF) << 8)


def deliver(st, mem: GuestAccess, vector: int, error_code: int | None, *, software: bool,
            rip: int, rflags: int, rsp: int, external: bool = False) -> tuple[int, int, int]:
    """Deliver one event; returns the new (RIP, RSP, RFLAGS) and updates segment
    state in ``st`` (the processor's :class:`~sandbox.svm.cpustate.CpuState`).

    Raises :class:`DeliveryFault` for a fault during delivery.
    """
    idt_base, idt_limit = st.idt()
    gdt_base, gdt_limit = st.gdt()
    cpl = st.cpl
    ext = 1 if (external or not software) else 0
    gate_off = vector * 16
    if gate_off + 15 > idt_limit:
        raise DeliveryFault(Vec.GP, vector * 8 + 2 + ext)
    lo, hi = struct.unpack("<QQ", mem.read(idt_base + gate_off, 16))
    gtype = (lo >> 40) & 0xF
    dpl = (lo >> 45) & 3
    present = (lo >> 47) & 1
    if gtype not in (0xE, 0xF):
        raise DeliveryFault(Vec.GP, vector * 8 + 2 + ext)
    if software and dpl < cpl:
        raise DeliveryFault(Vec.GP, vector * 8 + 2)
    if not present:
        raise DeliveryFault(Vec.NP, vector * 8 + 2 + ext)
    target = (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16) | ((hi & 0xFFFFFFFF) << 32)
    sel = (lo >> 16) & 0xFFFF
    ist = (lo >> 32) & 7
    desc = read_descriptor(mem, gdt_base, gdt_limit, sel)
    if desc is None:
        raise DeliveryFault(Vec.GP, (sel & 0xFFFC) + ext)
    cattr = descriptor_attrib(desc)
    if not (cattr & 0x18) == 0x18 or not cattr & 0x200:     # code segment, 64-bit
        raise DeliveryFault(Vec.GP, (sel & 0xFFFC) + ext)
    if not cattr & 0x80:
        raise DeliveryFault(Vec.NP, (sel & 0xFFFC) + ext)
    new_cpl = cpl if cattr & 0x4 else (cattr >> 5) & 3      # conforming keeps CPL
    if new_cpl > cpl:
        raise DeliveryFault(Vec.GP, (sel & 0xFFFC) + ext)
    tr_sel, tr_base, tr_limit, _ = st.tr()
    new_rsp = rsp
    if ist:
        if 0x24 + 8 * ist > tr_limit + 1:
            raise DeliveryFault(Vec.TS, tr_sel & 0xFFFC)
        new_rsp = struct.unpack("<Q", mem.read(tr_base + 0x24 + 8 * (ist - 1), 8))[0]
    elif new_cpl < cpl:
        if 4 + 8 * new_cpl + 8 > tr_limit + 1:
            raise DeliveryFault(Vec.TS, tr_sel & 0xFFFC)
        new_rsp = struct.unpack("<Q", mem.read(tr_base + 4 + 8 * new_cpl, 8))[0]
    new_rsp &= ~0xF
    ss_sel = st.seg(R_SS)[0]
    cs_sel = st.seg(R_CS)[0]
    frame = [ss_sel, rsp, rflags, cs_sel, rip]
    if error_code is not None:
        frame.append(error_code & 0xFFFFFFFF)
    data = struct.pack(f"<{len(frame)}Q", *reversed(frame))
    new_rsp -= len(data)
    if not _canonical(new_rsp) or not _canonical(new_rsp + len(data) - 1):
        raise DeliveryFault(Vec.SS, 0)      # non-canonical stack in long mode: #SS(0) (APM vol. 2 §8.9.3)
    mem.write(new_rsp, data)        # faults here propagate as #PF / NPF
    # commit: CS from the gate, SS = NULL (RPL = new CPL) on a privilege change
    base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
    limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
    if cattr & 0x800:
        limit = (limit << 12) | 0xFFF
    if new_cpl != cpl:
        st.set_seg(R_SS, new_cpl, 0, 0, attrib_to_flags((new_cpl << 5)))
    st.set_seg(R_CS, (sel & 0xFFFC) | new_cpl, base, limit, attrib_to_flags(cattr))
    st.set_cpl(new_cpl)
    new_flags = rflags & ~((1 << 8) | (1 << 14) | (1 << 16) | (1 << 17))   # TF NT RF VM
    if gtype == 0xE:
        new_flags &= ~(1 << 9)                                            # IF
    return target, new_rsp, new_flags
