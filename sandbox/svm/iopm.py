"""The I/O permission map (APM vol. 2 §15.10).

12 KiB, 4 KiB-aligned, one bit per port (1 = intercept).  An access of
``size`` bytes to ``port`` checks the bits of ports ``port .. port+size-1``;
ports do not wrap, which is why the map has bits past 0xFFFF (an ``inl``
from 0xFFFF tests bits 0x10000-0x10002).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..memory.hostmem import HostMemory

IOPM_SIZE = 3 * 4096
IOPM_PAGES = 3


class IOPM:
    def __init__(self, mem: "HostMemory", hpa: int) -> None:
        if hpa & 0xFFF:
            raise ValueError("IOPM must be 4 KiB aligned")
        self.mem, self.hpa = mem, hpa

    def set(self, port: int, on: bool = True, count: int = 1) -> None:
        for p in range(port, port + count):
            a = self.hpa + (p >> 3)
            b = self.mem.read_u8(a)
            self.mem.write_u8(a, (b | (1 << (p & 7))) if on else (b & ~(1 << (p & 7))))

    def set_all(self, on: bool = True) -> None:
        self.mem.fill(self.hpa, IOPM_SIZE, 0xFF if on else 0)

    def bit(self, port: int) -> bool:
        return bool(self.mem.read_u8(self.hpa + (port >> 3)) >> (port & 7) & 1)

    def intercepts(self, port: int, size: int) -> bool:
        """Does an access of ``size`` bytes at ``port`` hit a set bit?"""
        return any(self.bit(p) for p in range(port, port + size))


class IoioInfo:
    """EXITINFO1 of VMEXIT_IOIO (APM §15.10.2, Figure 15-2)."""
    TYPE_IN = 1 << 0
    STR = 1 << 2
    REP = 1 << 3
    SZ8 = 1 << 4
    SZ16 = 1 << 5
    SZ32 = 1 << 6
    A16 = 1 << 7
    A32 = 1 << 8
    A64 = 1 << 9
    SEG_SHIFT = 10
    PORT_SHIFT = 16

    @classmethod
    def encode(cls, port: int, size: int, is_in: bool, string: bool = False, rep: bool = False,
               addr_size: int = 64, seg: int = 3) -> int:
        v = (port & 0xFFFF) << cls.PORT_SHIFT
        v |= {1: cls.SZ8, 2: cls.SZ16, 4: cls.SZ32}[size]
        v |= {16: cls.A16, 32: cls.A32, 64: cls.A64}[addr_size]
        if is_in:
            v |= cls.TYPE_IN
        if string:
            v |= cls.STR
            v |= (seg & 7) << cls.SEG_SHIFT
        if rep:
            v |= cls.REP
        return v
