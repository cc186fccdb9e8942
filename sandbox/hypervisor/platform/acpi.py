"""Minimal ACPI tables and the ACPI power-management timer.

A kvm-unit-tests guest finds ACPI tables the BIOS way (lib/acpi.c): the
RSDP on a 16-byte boundary in 0xE0000-0xFFFFF, its RSDT, and in it the FADT
("FACP"), whose PM_TMR_BLK names the PM timer's port (vmexit.flat's
``inl_from_pmtimer``).  Layouts from the ACPI Specification 6.x: RSDP §5.2.5.3
(revision 0: 20 bytes, checksum over them), system description header
§5.2.6 (36 bytes, checksum over the whole table), RSDT §5.2.7, FADT §5.2.9
(PM_TMR_BLK at offset 76, PM_TMR_LEN at 91); the PM timer §4.8.3.3 is a
24-bit counter at 3.579545 MHz, read with a 32-bit IN.
"""
from __future__ import annotations

import struct
from typing import Callable

RSDP_AT = 0xF0000
RSDT_AT = 0xF0040
FADT_AT = 0xF0080
PM_TIMER_PORT = 0x608              # QEMU's (PIIX4/ICH9 PM base 0x600 + 8)
PM_TIMER_HZ = 3_579_545
OEM_ID = b"AMDVSB"


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _table(sig: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    hdr = struct.pack("<4sIBB6s8sI4sI", sig, length, revision, 0, OEM_ID, b"SANDBOX ", 1, b"AMDV", 1)
    t = bytearray(hdr + body)
    t[9] = _checksum(bytes(t))
    return bytes(t)


def tables() -> list[tuple[int, bytes]]:
    """(guest-physical address, bytes) of the RSDP, the RSDT and the FADT."""
    fadt_body = bytearray(116 - 36)
    struct.pack_into("<I", fadt_body, 76 - 36, PM_TIMER_PORT)     # PM_TMR_BLK
    fadt_body[91 - 36] = 4                                        # PM_TMR_LEN
    fadt = _table(b"FACP", 1, bytes(fadt_body))
    rsdt = _table(b"RSDT", 1, struct.pack("<I", FADT_AT))
    rsdp = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, RSDT_AT))
    rsdp[8] = _checksum(bytes(rsdp))
    return [(RSDP_AT, bytes(rsdp)), (RSDT_AT, rsdt), (FADT_AT, fadt)]


class AcpiPmTimer:
    """The PM timer at :data:`PM_TIMER_PORT`, counting guest time."""

    def __init__(self, now_ns: Callable[[], int], port: int = PM_TIMER_PORT) -> None:
        self.now_ns, self.port = now_ns, port

    def owns(self, port: int) -> bool:
        return self.port <= port < self.port + 4

    def read(self, port: int, size: int) -> int:
        ticks = self.now_ns() * PM_TIMER_HZ // 1_000_000_000 & 0xFFFFFF
        return ticks >> (8 * (port - self.port))

    def write(self, port: int, size: int, value: int) -> None:
        pass                                   # read-only
