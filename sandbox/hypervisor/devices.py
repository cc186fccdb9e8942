"""Devices the hypervisor emulates, on one bus: port I/O and MMIO.

A device answers port reads/writes (``owns(port)``, ``read``, ``write``;
optionally ``read_string``/``write_string`` for a run of INS/OUTS elements),
accesses to a memory-mapped register window (``mmio_read(offset,
size)``, ``mmio_write(offset, size, value)``) and/or MSRs (``owns_msr(msr)``,
``rdmsr(msr)``, ``wrmsr(msr, value)``, raising :class:`MsrFault` for #GP).  :class:`DeviceBus` routes
both kinds; the hypervisor (:mod:`sandbox.hypervisor.mmio`) turns a guest's VMEXIT_IOIO
or VMEXIT_NPF into one of these calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

COM1 = 0x3F8
PAGE = 4096
_UNRESOLVED = object()           # a port the bus has not looked up yet


class MmioMode(Enum):
    """How a hypervisor serves an MMIO window (see :meth:`~sandbox.hypervisor.machine.Machine.map_mmio`)."""
    TRAP = "trap"        # every access exits and is emulated
    GRANT = "grant"      # the first access maps a register page; writes are found by Dirty-bit polling


class MsrFault(Exception):
    """A device refuses an MSR access: the guest gets #GP(0)."""


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
            self.output.append(value & 0xFF)
            if self.sink:
                self.sink(bytes((value & 0xFF,)))
        elif off == 3:
            self._lcr = value & 0xFF
        else:
            self._regs[off] = value & 0xFF

    def write_string(self, port: int, size: int, data: bytes) -> None:
        """``len(data) // size`` writes of ``size`` bytes each (little-endian, in
        order), as :meth:`write` would take them: THR with LCR.DLAB (bit 7) clear
        sends each element's low byte, the sink getting them in one call; any
        other register keeps the last element's low byte (a write to LCR cannot
        come between, so DLAB is the same for the whole run)."""
        if not data:
            return
        off = port - self.base
        if off == 0 and not self._lcr & 0x80:
            out = data if size == 1 else data[::size]
            self.output += out
            if self.sink:
                self.sink(bytes(out))
        elif off == 3:
            self._lcr = data[-size]
        else:
            self._regs[off] = data[-size]

    def read_string(self, port: int, size: int, count: int) -> bytes:
        """``count`` reads of ``size`` bytes, concatenated: a read has no side
        effect here, so every element is the same value."""
        return (self.read(port, size) & ((1 << (8 * size)) - 1)).to_bytes(size, "little") * count

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


@dataclass
class MmioRegion:
    """A guest-physical window [``gpa``, ``gpa + size``) that belongs to ``device``."""
    gpa: int
    size: int
    device: object
    mode: MmioMode | None = None        # how the hypervisor serves it
    backing: dict = field(default_factory=dict)   # GPA page -> HPA, once granted

    def __contains__(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size


class DeviceBus:
    """Port-I/O devices by port number and MMIO devices by guest-physical
    window; unclaimed ports and MMIO addresses read all-ones."""

    def __init__(self) -> None:
        self.devices: list = []
        self.regions: list[MmioRegion] = []
        #: port -> its device (None: unclaimed), filled as ports are used; a device's
        #: ports are fixed once attached, and attaching empties it
        self._owners: dict[int, object] = {}

    def attach(self, dev) -> None:
        self.devices.append(dev)
        self._owners.clear()

    def attach_mmio(self, gpa: int, size: int, dev, mode: MmioMode | None = None) -> MmioRegion:
        if gpa % PAGE or size <= 0 or size % PAGE:
            raise ValueError(f"an MMIO window must be whole 4 KiB pages, not {gpa:#x}+{size:#x}")
        for r in self.regions:
            if gpa < r.gpa + r.size and r.gpa < gpa + size:
                raise ValueError(f"MMIO window {gpa:#x}+{size:#x} overlaps {r.gpa:#x}+{r.size:#x}")
        r = MmioRegion(gpa, size, dev, mode)
        self.regions.append(r)
        if dev not in self.devices:
            self.devices.append(dev)
            self._owners.clear()
        return r

    def msr_owner(self, msr: int):
        """The device that serves MSR ``msr`` (``owns_msr``, ``rdmsr``, ``wrmsr``), if any."""
        for d in self.devices:
            owns = getattr(d, "owns_msr", None)
            if owns is not None and owns(msr):
                return d
        return None

    def region(self, gpa: int) -> MmioRegion | None:
        for r in self.regions:
            if gpa in r:
                return r
        return None

    def port_owner(self, port: int):
        """The device that serves port ``port``, or None (reads float high, writes are dropped).
        The first attached device that ``owns`` it, looked up once per port."""
        try:
            return self._owners[port]
        except KeyError:
            pass
        owner = None
        for d in self.devices:
            owns = getattr(d, "owns", None)
            if owns is not None and owns(port):
                owner = d
                break
        self._owners[port] = owner
        return owner

    def io(self, port: int, size: int, is_in: bool, value: int = 0) -> int:
        """A port access: the owner's ``read`` (masked to ``size`` bytes) or
        ``write``; an unclaimed port reads all-ones.  This runs on every IOIO
        exit and every pass-through IN/OUT: the owner comes from the per-port cache."""
        d = self._owners.get(port, _UNRESOLVED)
        if d is _UNRESOLVED:
            d = self.port_owner(port)
        if d is None:
            return ((1 << (8 * size)) - 1) if is_in else 0
        if is_in:
            return d.read(port, size) & ((1 << (8 * size)) - 1)
        d.write(port, size, value)
        return 0

    def mmio(self, gpa: int, size: int, is_write: bool, value: int = 0) -> int:
        r = self.region(gpa)
        if r is None:
            return 0 if is_write else (1 << (8 * size)) - 1
        if is_write:
            r.device.mmio_write(gpa - r.gpa, size, value)
            return 0
        return r.device.mmio_read(gpa - r.gpa, size) & ((1 << (8 * size)) - 1)


#: the name the port-only bus had
PortBus = DeviceBus


class StatusControlDevice:
    """The seed's I/O device: a status register the guest polls and a control
    register it writes commands to.

    Reachable through two ports (``base`` = status, ``base + 4`` = control)
    and through two MMIO register pages (status page, control page); the
    device counts every access it sees and every command it receives.
    """

    STATUS_READY = 0x01

    def __init__(self, base: int = 0x510) -> None:
        self.base = base
        self.status = self.STATUS_READY
        self.status_reads = 0
        self.commands: list[int] = []

    # port I/O
    def owns(self, port: int) -> bool:
        return port in (self.base, self.base + 4)

    def read(self, port: int, size: int) -> int:
        self.status_reads += 1
        return self.status

    def write(self, port: int, size: int, value: int) -> None:
        self.commands.append(value)

    # MMIO: page 0 holds the status register, page 1 the control register
    def mmio_read(self, offset: int, size: int) -> int:
        if offset < PAGE:
            self.status_reads += 1
            return self.status
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if offset >= PAGE:
            self.commands.append(value)
