"""A paravirtual device: virtio over MMIO ("modern", version 2) with split
virtqueues in guest memory, and a virtio console on it.

References: OASIS *Virtual I/O Device (VIRTIO) Version 1.1*, §2.6 (split
virtqueues: descriptor table, available ring, used ring, alignment),
§3.1.1 (driver initialization), §4.2.2 (the MMIO register layout below),
§4.2.3 (MMIO device operation), §5.3 (console device, ID 3).

The transport is an ordinary MMIO device on the hypervisor's
:class:`~sandbox.hypervisor.devices.DeviceBus`: map it with
``m.map_mmio(gpa, 0x1000, VirtioConsole(m.guest))`` and every register
access is a VMEXIT_NPF the hypervisor decodes (``MmioMode.TRAP``).  The
data path is what makes virtio cheap: the driver puts buffers in guest
memory and exits once per *notify* (a write to QueueNotify), however many
buffers it queued; the device then reads the descriptors and the data
through the hypervisor's view of guest memory (``Guest.read_phys`` /
``write_phys``) and returns them on the used ring, which the driver reads
without an exit.

Interrupts: the device sets InterruptStatus bit 0 (used buffer) as the spec
says, but this sandbox has no interrupt controller to raise a line yet, so
drivers poll the used ring (and set ``VIRTQ_AVAIL_F_NO_INTERRUPT``).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

MAGIC = 0x7472_6976                 # "virt"
VERSION = 2                         # the non-legacy MMIO interface
VENDOR_ID = 0x5342_5841             # "AXBS": this sandbox
DEVICE_CONSOLE = 3

# feature bits (§6)
F_VERSION_1 = 1 << 32

# device status bits (§2.1)
S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK = 1, 2, 4, 8
S_DEVICE_NEEDS_RESET, S_FAILED = 0x40, 0x80

# descriptor flags (§2.6.5)
DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
INT_USED_BUFFER = 1


class Reg:
    """virtio-mmio register offsets (§4.2.2, Table "MMIO Device Register Layout")."""
    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


class GuestMemory(Protocol):
    """The hypervisor's view of guest-physical memory (a :class:`~sandbox.hypervisor.guest.Guest`)."""

    def read_phys(self, gpa: int, n: int) -> bytes: ...

    def write_phys(self, gpa: int, data: bytes) -> None: ...


class VirtqueueError(Exception):
    """The driver handed the device a malformed queue (the device then needs a reset)."""


_DESC = struct.Struct("<QIHH")      # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")   # id, len


@dataclass
class Virtqueue:
    """One split virtqueue as the driver configured it (§2.6)."""
    num_max: int
    num: int = 0
    ready: bool = False
    desc: int = 0                   # descriptor table GPA (16-byte aligned)
    driver: int = 0                 # available ring GPA (2-byte aligned)
    device: int = 0                 # used ring GPA (4-byte aligned)
    last_avail: int = 0             # the next available-ring entry the device consumes
    used_idx: int = 0

    def reset(self) -> None:
        self.num = self.desc = self.driver = self.device = self.last_avail = self.used_idx = 0
        self.ready = False


@dataclass
class VirtioStats:
    notifies: int = 0               # QueueNotify writes: the data path's exits
    register_reads: int = 0
    register_writes: int = 0
    buffers: int = 0                # descriptor chains consumed
    descriptors: int = 0
    bytes_out: int = 0              # bytes the device read from driver buffers
    bytes_in: int = 0               # bytes the device wrote into driver buffers

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


class VirtioMmio:
    """The virtio-mmio transport (§4.2): registers, feature negotiation,
    status, and queue configuration.  A device subclass sets
    :attr:`device_id`, the queues and the device features, and consumes
    buffers in :meth:`process`."""

    device_id = 0
    device_features = F_VERSION_1

    def __init__(self, mem: GuestMemory, queues: int = 1, queue_num_max: int = 256) -> None:
        self.mem = mem
        self.queues = [Virtqueue(queue_num_max) for _ in range(queues)]
        self.stats = VirtioStats()
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.error: str | None = None

    # -- the bus interface ------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        self.stats.register_reads += 1
        if offset >= Reg.CONFIG:
            cfg = self.config_space()
            off = offset - Reg.CONFIG
            return int.from_bytes(cfg[off:off + size].ljust(size, b"\0"), "little")
        q = self._queue()
        return {
            Reg.MAGIC_VALUE: MAGIC,
            Reg.VERSION: VERSION,
            Reg.DEVICE_ID: self.device_id,
            Reg.VENDOR_ID: VENDOR_ID,
            Reg.DEVICE_FEATURES: (self.device_features >> (32 * self.device_features_sel)) & 0xFFFF_FFFF
            if self.device_features_sel < 2 else 0,
            Reg.QUEUE_NUM_MAX: q.num_max if q is not None else 0,
            Reg.QUEUE_READY: int(q.ready) if q is not None else 0,
            Reg.INTERRUPT_STATUS: self.interrupt_status,
            Reg.STATUS: self.status,
            Reg.CONFIG_GENERATION: self.config_generation,
        }.get(offset, 0)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.stats.register_writes += 1
        value &= 0xFFFF_FFFF
        q = self._queue()
        if offset == Reg.STATUS:
            self._write_status(value)
        elif offset == Reg.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == Reg.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == Reg.DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & S_FEATURES_OK:
                sh = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << sh)) | value << sh
        elif offset == Reg.QUEUE_SEL:
            self.queue_sel = value
        elif offset == Reg.QUEUE_NOTIFY:
            self._notify(value)
        elif offset == Reg.INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif q is not None and not q.ready or offset == Reg.QUEUE_READY:
            self._write_queue(q, offset, value)

    # -- registers -------------------------------------------------------------
    def _queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_status(self, value: int) -> None:
        if value == 0:                      # reset (§4.2.3.1)
            self.reset()
            return
        if value & S_FEATURES_OK and not self.status & S_FEATURES_OK:
            # the device accepts the features only if they are a subset of
            # its own and VERSION_1 is among them (§6.1, §2.2.1)
            if self.driver_features & ~self.device_features or not self.driver_features & F_VERSION_1:
                value &= ~S_FEATURES_OK
        self.status = value & 0xFF | self.status & S_DEVICE_NEEDS_RESET

    def _write_queue(self, q: Virtqueue | None, offset: int, value: int) -> None:
        if q is None:
            return
        lo = lambda old: (old & ~0xFFFF_FFFF) | value               # noqa: E731
        hi = lambda old: (old & 0xFFFF_FFFF) | value << 32          # noqa: E731
        if offset == Reg.QUEUE_NUM:
            q.num = value
        elif offset == Reg.QUEUE_READY:
            if value & 1:
                self._check_queue(q)
            q.ready = bool(value & 1) and self.error is None
        elif offset == Reg.QUEUE_DESC_LOW:
            q.desc = lo(q.desc)
        elif offset == Reg.QUEUE_DESC_HIGH:
            q.desc = hi(q.desc)
        elif offset == Reg.QUEUE_DRIVER_LOW:
            q.driver = lo(q.driver)
        elif offset == Reg.QUEUE_DRIVER_HIGH:
            q.driver = hi(q.driver)
        elif offset == Reg.QUEUE_DEVICE_LOW:
            q.device = lo(q.device)
        elif offset == Reg.QUEUE_DEVICE_HIGH:
            q.device = hi(q.device)

    def _check_queue(self, q: Virtqueue) -> None:
        """QueueNum a power of 2 no larger than QueueNumMax, rings aligned (§2.6)."""
        if not 0 < q.num <= q.num_max or q.num & (q.num - 1):
            self._needs_reset(f"queue size {q.num} is not a power of 2 in 1..{q.num_max}")
        elif q.desc % 16 or q.driver % 2 or q.device % 4:
            self._needs_reset("virtqueue parts not aligned (descriptors 16, available ring 2, used ring 4)")

    def _needs_reset(self, why: str) -> None:
        self.error = why
        self.status |= S_DEVICE_NEEDS_RESET

    def reset(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = self.driver_features_sel = self.queue_sel = 0
        self.interrupt_status = 0
        self.error = None
        for q in self.queues:
            q.reset()

    def config_space(self) -> bytes:
        """The device-specific configuration at offset 0x100."""
        return b""

    # -- the data path -----------------------------------------------------------
    def _notify(self, index: int) -> None:
        self.stats.notifies += 1
        if index >= len(self.queues) or not self.status & S_DRIVER_OK or self.status & S_DEVICE_NEEDS_RESET:
            return
        q = self.queues[index]
        if not q.ready:
            return
        try:
            if self.drain(index, q):
                self.interrupt_status |= INT_USED_BUFFER
        except (VirtqueueError, KeyError) as e:     # KeyError: a GPA outside guest RAM
            self._needs_reset(str(e))

    def drain(self, index: int, q: Virtqueue) -> int:
        """Consume every buffer the driver made available on queue ``index``;
        returns how many were used."""
        mem = self.mem
        avail_idx = _U16.unpack(mem.read_phys(q.driver + 2, 2))[0]
        pending = (avail_idx - q.last_avail) & 0xFFFF
        if pending > q.num:
            raise VirtqueueError(f"available index {avail_idx} is {pending} entries ahead of the device")
        for _ in range(pending):
            slot = q.last_avail % q.num
            head = _U16.unpack(mem.read_phys(q.driver + 4 + 2 * slot, 2))[0]
            written = self.process(index, self._chain(q, head))
            # the used element, then the used index (§2.6.8)
            mem.write_phys(q.device + 4 + 8 * (q.used_idx % q.num), _USED_ELEM.pack(head, written))
            q.used_idx = (q.used_idx + 1) & 0xFFFF
            mem.write_phys(q.device + 2, _U16.pack(q.used_idx))
            q.last_avail = (q.last_avail + 1) & 0xFFFF
            self.stats.buffers += 1
        return pending

    def _chain(self, q: Virtqueue, head: int) -> list[tuple[int, int, bool]]:
        """The descriptor chain at ``head``: (GPA, length, device-writable) each."""
        out = []
        i = head
        for _ in range(q.num):
            if i >= q.num:
                raise VirtqueueError(f"descriptor index {i} outside a queue of {q.num}")
            addr, length, flags, nxt = _DESC.unpack(self.mem.read_phys(q.desc + 16 * i, 16))
            if flags & DESC_F_INDIRECT:
                raise VirtqueueError("indirect descriptors were not negotiated")
            out.append((addr, length, bool(flags & DESC_F_WRITE)))
            self.stats.descriptors += 1
            if not flags & DESC_F_NEXT:
                return out
            i = nxt
        raise VirtqueueError(f"descriptor chain at {head} loops")

    def process(self, index: int, chain: list[tuple[int, int, bool]]) -> int:
        """Handle one buffer; returns the bytes written into it (the used length)."""
        return 0


class VirtioConsole(VirtioMmio):
    """virtio-console (§5.3), one port: queue 0 receiveq, queue 1 transmitq.

    Bytes the driver sends on the transmit queue go to :attr:`output` (and
    ``sink``, if set); receive buffers are returned empty (no input)."""

    device_id = DEVICE_CONSOLE
    RECEIVEQ, TRANSMITQ = 0, 1

    def __init__(self, mem: GuestMemory, queue_num_max: int = 256, cols: int = 80, rows: int = 25) -> None:
        super().__init__(mem, queues=2, queue_num_max=queue_num_max)
        self.output = bytearray()
        self.sink = None
        self.cols, self.rows = cols, rows

    def config_space(self) -> bytes:
        # struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr (§5.3.4)
        return struct.pack("<HHII", self.cols, self.rows, 1, 0)

    def process(self, index: int, chain: list[tuple[int, int, bool]]) -> int:
        if index != self.TRANSMITQ:
            return 0
        for gpa, length, writable in chain:
            if writable:
                raise VirtqueueError("a transmit buffer must be device-readable")
            data = self.mem.read_phys(gpa, length)
            self.output += data
            self.stats.bytes_out += length
            if self.sink is not None:
                self.sink(data)
        return 0
