"""QEMU's ``isa-debug-exit`` device: a guest write ends the run.

QEMU (hw/misc/debugexit.c, ``-device isa-debug-exit,iobase=0xf4,iosize=0x4``)
exits the emulator with status ``(value << 1) | 1`` when the guest writes
``value`` to the port, so a status of 1 means the guest wrote 0.
kvm-unit-tests' ``exit(code)`` writes its code there with ``outl``.

Here the write ends the run with :attr:`StopReason.GUEST_EXIT`: the run's
``exit_code`` is the value written and :attr:`status` QEMU's exit status.
"""
from __future__ import annotations

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_SIZE = 4


class IsaDebugExit:
    def __init__(self, base: int = DEBUG_EXIT_PORT, size: int = DEBUG_EXIT_SIZE) -> None:
        self.base, self.size = base, size
        #: the value the guest wrote (None until it writes)
        self.value: int | None = None

    @property
    def status(self) -> int | None:
        """QEMU's process exit status for the value written."""
        return None if self.value is None else (self.value << 1) | 1

    def owns(self, port: int) -> bool:
        return self.base <= port < self.base + self.size

    def read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1               # write-only, as QEMU's (reads float high)

    def write(self, port: int, size: int, value: int) -> None:
        if self.value is None:
            self.value = value & ((1 << (8 * size)) - 1)
