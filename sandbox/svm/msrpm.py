"""The MSR permission map (APM vol. 2 §15.11, Table 15-8).

8 KiB, 4 KiB-aligned, two bits per MSR: the low bit intercepts RDMSR, the
high bit WRMSR.  Three MSR ranges are covered; an MSR outside them always
exits when MSR_PROT is set.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..memory.hostmem import HostMemory

MSRPM_SIZE = 2 * 4096
MSRPM_PAGES = 2
#: (first MSR, byte offset of its range in the map); each range is 0x2000 MSRs
RANGES = ((0x0000_0000, 0x000), (0xC000_0000, 0x800), (0xC001_0000, 0x1000))
#: SEV_STATUS can never be intercepted (APM §15.34.10)
UNINTERCEPTABLE = frozenset({0xC001_0131})


def msrpm_bit(msr: int, write: bool) -> int | None:
    """Bit number of ``msr`` in the map, or None when no range covers it."""
    for base, byte_off in RANGES:
        if base <= msr < base + 0x2000:
            return byte_off * 8 + (msr - base) * 2 + (1 if write else 0)
    return None


class MSRPM:
    def __init__(self, mem: "HostMemory", hpa: int) -> None:
        if hpa & 0xFFF:
            raise ValueError("MSRPM must be 4 KiB aligned")
        self.mem, self.hpa = mem, hpa

    def set(self, msr: int, read: bool | None = None, write: bool | None = None) -> None:
        for is_w, on in ((False, read), (True, write)):
            if on is None:
                continue
            bit = msrpm_bit(msr, is_w)
            if bit is None:
                raise ValueError(f"MSR {msr:#x} is outside the MSRPM ranges (it always exits)")
            a = self.hpa + (bit >> 3)
            b = self.mem.read_u8(a)
            self.mem.write_u8(a, (b | (1 << (bit & 7))) if on else (b & ~(1 << (bit & 7))))

    def set_all(self, on: bool = True) -> None:
        self.mem.fill(self.hpa, MSRPM_SIZE, 0xFF if on else 0)

    def intercepts(self, msr: int, write: bool) -> bool:
        if msr in UNINTERCEPTABLE:
            return False
        bit = msrpm_bit(msr, write)
        if bit is None:
            return True
        return bool(self.mem.read_u8(self.hpa + (bit >> 3)) >> (bit & 7) & 1)
