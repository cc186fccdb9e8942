"""The legacy 8259A pair, kept masked.

A kvm-unit-tests guest masks both PICs at boot (``mask_pic_interrupts``:
OCW1 0xFF to ports 0x21 and 0xA1) and uses the local APIC.  This model
keeps the registers a guest reads back -- the interrupt mask (OCW1 at the
odd port), the initialization sequence ICW1-ICW4 -- and raises nothing: no
device here is wired to an IRQ line.  (Intel 8259A data sheet: ICW1 has bit
4 set and goes to the even port; OCW2/OCW3 go to the even port with bit 4
clear; OCW3 with RR=1 selects IRR (RIS=0) or ISR (RIS=1) for the next read.)
"""
from __future__ import annotations


class _Pic8259:
    def __init__(self, base: int) -> None:
        self.base = base
        self.imr = 0xFF              # masked: no line is wired anyway
        self.icw_step = 0            # > 0 while ICW2..ICW4 are expected
        self.icw4 = False
        self.vector_base = 0
        self.read_isr = False

    def read(self, port: int) -> int:
        if port == self.base + 1:
            return self.imr
        return 0                     # IRR / ISR: nothing is ever requested or in service

    def write(self, port: int, value: int) -> None:
        value &= 0xFF
        if port == self.base:
            if value & 0x10:         # ICW1
                self.icw_step, self.icw4 = 2, bool(value & 1)
                self.imr = 0
            elif value & 0x08:       # OCW3
                if value & 0x02:
                    self.read_isr = bool(value & 1)
            return                   # OCW2 (EOI): nothing in service
        if self.icw_step == 2:
            self.vector_base = value & 0xF8
            self.icw_step = 3
        elif self.icw_step == 3:
            self.icw_step = 4 if self.icw4 else 0
        elif self.icw_step == 4:
            self.icw_step = 0
        else:
            self.imr = value         # OCW1


class LegacyPic:
    """Master at 0x20/0x21, slave at 0xA0/0xA1."""

    def __init__(self) -> None:
        self.master, self.slave = _Pic8259(0x20), _Pic8259(0xA0)

    def _chip(self, port: int) -> _Pic8259:
        return self.master if port < 0x80 else self.slave

    def owns(self, port: int) -> bool:
        return port in (0x20, 0x21, 0xA0, 0xA1)

    def read(self, port: int, size: int) -> int:
        return self._chip(port).read(port)

    def write(self, port: int, size: int, value: int) -> None:
        self._chip(port).write(port, value)
