"""QEMU's firmware configuration device, the legacy port interface.

Port 0x510 selects an item (a 16-bit write), port 0x511 reads its bytes one
at a time, advancing an offset that the selector write resets; past the end
of an item, or for an unknown item, the data port reads 0 (QEMU
docs/specs/fw_cfg.rst, "Selector Register", "Data Register").

Items (``FW_CFG_*`` in QEMU's include/standard-headers/linux/qemu_fw_cfg.h,
and kvm-unit-tests' lib/x86/fwcfg.c, which selects an item with a 16-bit OUT
and reads numeric items as little-endian integers of 1-8 single-byte INs):

* 0x00 SIGNATURE ``"QEMU"``; 0x01 ID (feature bitmap, bit 0: traditional interface);
* 0x03 RAM_SIZE (u64, bytes); 0x05 NB_CPUS (u16); 0x0F MAX_CPUS (u16);
* 0x14 CMDLINE_SIZE (u32, including the NUL) and 0x15 CMDLINE_DATA;
* 0x19 FILE_DIR (big-endian count of 0: no files).
"""
from __future__ import annotations

import struct

FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_FILE_DIR = 0x19


class FwCfg:
    def __init__(self, ram_size: int, cmdline: bytes = b"", cpus: int = 1, max_cpus: int = 1) -> None:
        cmd = cmdline + b"\x00"
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", 1),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", max_cpus),
            FW_CFG_CMDLINE_SIZE: struct.pack("<I", len(cmd)),
            FW_CFG_CMDLINE_DATA: cmd,
            FW_CFG_FILE_DIR: struct.pack(">I", 0),
        }
        self.selector = 0
        self.offset = 0

    def set_cmdline(self, cmdline: bytes) -> None:
        cmd = cmdline + b"\x00"
        self.items[FW_CFG_CMDLINE_SIZE] = struct.pack("<I", len(cmd))
        self.items[FW_CFG_CMDLINE_DATA] = cmd

    def owns(self, port: int) -> bool:
        return port in (FW_CFG_PORT_SEL, FW_CFG_PORT_DATA)

    def read(self, port: int, size: int) -> int:
        if port != FW_CFG_PORT_DATA:
            return 0
        # the legacy data port is one byte wide: each read moves one byte
        data = self.items.get(self.selector & 0x3FFF, b"")
        b = data[self.offset] if self.offset < len(data) else 0
        self.offset += 1
        return b

    def write(self, port: int, size: int, value: int) -> None:
        if port == FW_CFG_PORT_SEL:
            self.selector = value & 0xFFFF
            self.offset = 0
        # writes to the data port are ignored (QEMU >= 2.4 makes the legacy data port read-only)
