"""The virtio-mmio console device against the OASIS virtio 1.1 spec, driven
directly (no guest): register values from §4.2.2, feature negotiation from
§2.2 / §6.1, the split-virtqueue layout from §2.6.  Guest memory is a plain
bytearray here, so every expected byte is laid out by the test itself."""
from __future__ import annotations

import struct

import pytest

from sandbox.hypervisor.virtio import VirtioConsole

MAGIC_VALUE, VERSION, DEVICE_ID, DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x000, 0x004, 0x008, 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL, QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM = 0x020, 0x024, 0x030, 0x034, 0x038
QUEUE_READY, QUEUE_NOTIFY, INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x044, 0x050, 0x060, 0x064, 0x070
QUEUE_DESC_LOW, QUEUE_DRIVER_LOW, QUEUE_DEVICE_LOW = 0x080, 0x090, 0x0A0
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 0x40
DESC, AVAIL, USED, DATA = 0x1000, 0x2000, 0x3000, 0x8000


class Ram:
    """Guest-physical memory: 64 KiB; an address outside raises KeyError, as Guest.read_phys does."""

    def __init__(self) -> None:
        self.b = bytearray(0x10000)

    def _chk(self, gpa: int, n: int) -> None:
        if gpa < 0 or gpa + n > len(self.b):
            raise KeyError(gpa)

    def read_phys(self, gpa: int, n: int) -> bytes:
        self._chk(gpa, n)
        return bytes(self.b[gpa:gpa + n])

    def write_phys(self, gpa: int, data: bytes) -> None:
        self._chk(gpa, len(data))
        self.b[gpa:gpa + len(data)] = data


def negotiated(qsz: int = 8) -> tuple[VirtioConsole, Ram]:
    """A console the driver brought up (§3.1.1) with queue 1 at DESC/AVAIL/USED."""
    ram = Ram()
    d = VirtioConsole(ram)
    for v in (0, ACK, ACK | DRIVER):
        d.mmio_write(STATUS, 4, v)
    d.mmio_write(DRIVER_FEATURES_SEL, 4, 1)
    d.mmio_write(DRIVER_FEATURES, 4, 1)                  # VERSION_1 (bit 32)
    d.mmio_write(STATUS, 4, ACK | DRIVER | FEATURES_OK)
    d.mmio_write(QUEUE_SEL, 4, 1)
    d.mmio_write(QUEUE_NUM, 4, qsz)
    for reg, addr in ((QUEUE_DESC_LOW, DESC), (QUEUE_DRIVER_LOW, AVAIL), (QUEUE_DEVICE_LOW, USED)):
        d.mmio_write(reg, 4, addr)
        d.mmio_write(reg + 4, 4, 0)
    d.mmio_write(QUEUE_READY, 4, 1)
    d.mmio_write(STATUS, 4, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    return d, ram


def put_desc(ram: Ram, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
    ram.write_phys(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


def publish(ram: Ram, heads: list[int], start: int = 0, qsz: int = 8) -> None:
    for k, h in enumerate(heads):
        ram.write_phys(AVAIL + 4 + 2 * ((start + k) % qsz), struct.pack("<H", h))
    ram.write_phys(AVAIL + 2, struct.pack("<H", start + len(heads)))


def test_identification_registers():
    d = VirtioConsole(Ram())
    assert d.mmio_read(MAGIC_VALUE, 4) == 0x74726976            # "virt", little-endian
    assert d.mmio_read(VERSION, 4) == 2                         # non-legacy
    assert d.mmio_read(DEVICE_ID, 4) == 3                       # console (§5.3.1)
    d.mmio_write(DEVICE_FEATURES_SEL, 4, 1)
    assert d.mmio_read(DEVICE_FEATURES, 4) & 1                  # VERSION_1 offered
    d.mmio_write(QUEUE_SEL, 4, 1)
    assert d.mmio_read(QUEUE_NUM_MAX, 4) >= 1 and d.mmio_read(QUEUE_READY, 4) == 0
    d.mmio_write(QUEUE_SEL, 4, 2)                               # a console with one port has 2 queues
    assert d.mmio_read(QUEUE_NUM_MAX, 4) == 0


def test_features_ok_refused_without_version_1():
    d = VirtioConsole(Ram())
    d.mmio_write(STATUS, 4, ACK | DRIVER)
    d.mmio_write(STATUS, 4, ACK | DRIVER | FEATURES_OK)         # no features accepted: legacy driver
    assert not d.mmio_read(STATUS, 4) & FEATURES_OK
    d.mmio_write(STATUS, 4, 0)                                  # reset
    assert d.mmio_read(STATUS, 4) == 0


def test_queue_size_must_be_a_power_of_two():
    d = VirtioConsole(Ram())
    d.mmio_write(QUEUE_SEL, 4, 1)
    d.mmio_write(QUEUE_NUM, 4, 6)
    d.mmio_write(QUEUE_READY, 4, 1)
    assert d.mmio_read(STATUS, 4) & NEEDS_RESET and d.mmio_read(QUEUE_READY, 4) == 0


def test_transmit_chain_and_used_ring():
    d, ram = negotiated()
    ram.write_phys(DATA, b"hello, ")
    ram.write_phys(DATA + 0x100, b"virtio")
    put_desc(ram, 3, DATA, 7, flags=1, nxt=5)                   # NEXT
    put_desc(ram, 5, DATA + 0x100, 6)
    put_desc(ram, 0, DATA + 0x100, 3)
    publish(ram, [3, 0])
    d.mmio_write(QUEUE_NOTIFY, 4, 1)
    assert bytes(d.output) == b"hello, virtiovir"
    # used ring (§2.6.8): idx, then {id, len} per buffer; a transmit buffer's used length is 0
    assert struct.unpack("<H", ram.read_phys(USED + 2, 2))[0] == 2
    assert struct.unpack("<IIII", ram.read_phys(USED + 4, 16)) == (3, 0, 0, 0)
    assert d.mmio_read(INTERRUPT_STATUS, 4) & 1
    d.mmio_write(INTERRUPT_ACK, 4, 1)
    assert d.mmio_read(INTERRUPT_STATUS, 4) == 0
    assert d.stats.notifies == 1 and d.stats.buffers == 2 and d.stats.descriptors == 3


def test_wrapping_indices():
    d, ram = negotiated(qsz=4)
    sent = b""
    for rnd in range(5):                                        # 15 buffers through a 4-entry ring
        heads = [k % 4 for k in range(3 * rnd, 3 * rnd + 3)][:3]
        for k, h in enumerate(heads):
            payload = bytes([0x41 + rnd]) * (k + 1)
            ram.write_phys(DATA + 0x10 * h, payload)
            put_desc(ram, h, DATA + 0x10 * h, len(payload))
            sent += payload
        # keep at most 3 outstanding, the device consumes them at the notify
        publish(ram, heads, start=3 * rnd, qsz=4)
        d.mmio_write(QUEUE_NOTIFY, 4, 1)
    assert bytes(d.output) == sent
    assert struct.unpack("<H", ram.read_phys(USED + 2, 2))[0] == 15


@pytest.mark.parametrize("bad", ["loop", "outside", "indirect"])
def test_malformed_queues_set_needs_reset(bad):
    d, ram = negotiated()
    if bad == "loop":
        put_desc(ram, 0, DATA, 1, flags=1, nxt=1)
        put_desc(ram, 1, DATA, 1, flags=1, nxt=0)
    elif bad == "outside":
        put_desc(ram, 0, 0xFFFF0000, 16)
    else:
        put_desc(ram, 0, DATA, 16, flags=4)
    publish(ram, [0])
    d.mmio_write(QUEUE_NOTIFY, 4, 1)
    assert d.mmio_read(STATUS, 4) & NEEDS_RESET
    assert d.error


def test_notify_before_driver_ok_is_ignored():
    ram = Ram()
    d = VirtioConsole(ram)
    put_desc(ram, 0, DATA, 4)
    publish(ram, [0])
    d.mmio_write(QUEUE_NOTIFY, 4, 1)
    assert d.output == b"" and d.stats.notifies == 1
