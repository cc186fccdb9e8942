"""Port-I/O devices the default hypervisor emulates."""
from __future__ import annotations

from typing import Callable

COM1 = 0x3F8


class Serial16550:
    """A write-mostly 16550 UART at ``base``: THR output is the guest console.

    The line status register always reports the transmitter empty (bits 5
    and 6), so polling guests never wait.
    """

    def __init__(self, base: int = COM1, sink: Callable[[bytes], None] | None = None) -> None:
        self.base = base
        self.output = bytearray()
        self.sink = sink
        self._regs = [0] * 8
        self._lcr = 0

    def owns(self, port: int) -> bool:
        return self.base <= port < self.base + 8

    def read(self, port: int, size: int) -> int:
        off = port - self.base
        if off == 5:            # LSR: THR empty, transmitter empty
            return 0x60
        if off == 3:
            return self._lcr
        if off == 0:
            return 0            # no input
        return self._regs[off]

    def write(self, port: int, size: int, value: int) -> None:
        off = port - self.base
        if off == 0 and not self._lcr & 0x80:
            b = bytes([value & 0xFF])
            self.output += b
            if self.sink:
                self.sink(b)
        elif off == 3:
            self._lcr = value & 0xFF
        else:
            self._regs[off] = value & 0xFF

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


class PortBus:
    """Port-I/O devices by port number; unclaimed ports read all-ones."""

    def __init__(self) -> None:
        self.devices: list = []
        self.log: list[tuple[str, int, int, int]] = []

    def attach(self, dev) -> None:
        self.devices.append(dev)

    def io(self, port: int, size: int, is_in: bool, value: int = 0) -> int:
        for d in self.devices:
            if d.owns(port):
                if is_in:
                    return d.read(port, size) & ((1 << (8 * size)) - 1)
                d.write(port, size, value)
                return 0
        return ((1 << (8 * size)) - 1) if is_in else 0
