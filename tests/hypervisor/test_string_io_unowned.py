"""REP INS/OUTS with a port no device serves move a page of elements at a time.

The reference is the device path: the same guest runs once with the port
unclaimed (no device call at all) and once with a device that claims it and
behaves as an unclaimed port does -- reads all ones, drops writes -- and is
called once per element (it has no run methods; test_string_io_runs checks
the page runs themselves against an element loop).  Every architectural result must agree:
the bytes stored, RCX/RSI/RDI, where the run stopped, and the fault (a
nested-page fault at the end of guest RAM, with the progress up to it)."""
from __future__ import annotations

import pytest

from conftest import DATA, SMALL_RAM, hc_exit

PORT = 0x2F0


class FloatingPort:
    """A device on PORT that reads all ones and ignores writes: an unclaimed port's
    behaviour, behind a device (so the handler calls it for every element)."""

    def __init__(self) -> None:
        self.reads = self.writes = 0

    def owns(self, port: int) -> bool:
        return port == PORT

    def read(self, port: int, size: int) -> int:
        self.reads += 1
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        self.writes += 1


def _run(guest, src: str, claimed: bool):
    m = guest(src)
    dev = FloatingPort()
    if claimed:
        m.bus.attach(dev)
    m.set_ports([PORT, PORT + 1, PORT + 2, PORT + 3])
    r = m.run(timeout=20)
    window = m.guest.read_phys(DATA - 0x3000, 0x8000)
    return r, window, dev


END = SMALL_RAM                      # the first guest-physical byte past RAM: no nested mapping

CASES = {
    # (instruction, pointer register, start, count, DF)
    "insb-across-pages": ("rep insb", "rdi", DATA - 0x123, 0x2345, 0),
    "insw-odd-start": ("rep insw", "rdi", DATA - 0x1001, 0x1801, 0),
    "insd-straddling-element": ("rep insd", "rdi", DATA - 2, 0x500, 0),
    "insd-backwards": ("rep insd", "rdi", DATA + 0x1006, 0x900, 1),
    "insw-backwards-straddle": ("rep insw", "rdi", DATA + 0xFFF, 0x700, 1),
    "outsb-across-pages": ("rep outsb", "rsi", DATA - 0x10, 0x3000, 0),
    "outsd-backwards": ("rep outsd", "rsi", DATA + 0x1FFC, 0x801, 1),
    "insb-not-rep": ("insb", "rdi", DATA + 7, 1, 0),
    "insb-into-the-end-of-ram": ("rep insb", "rdi", END - 0x1801, 0x3000, 0),
    "outsw-from-the-end-of-ram": ("rep outsw", "rsi", END - 0xFF1, 0x1000, 0),
    "insd-a32": ("rep insd", "edi", DATA - 0x11, 0x600, 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_unclaimed_port_string_io_matches_the_element_loop(guest, name):
    insn, reg, start, count, df = CASES[name]
    src = (f"mov {reg}, {start:#x}\nmov rcx, {count:#x}\nmov dx, {PORT:#x}\n"
           + ("std\n" if df else "") + (".byte 0x67\n" if reg == "edi" else "") + insn + "\ncld\n"
           + "mov r12, rcx\nmov r13, rsi\nmov r14, rdi\n" + hc_exit(0x55))
    fast, fast_mem, _ = _run(guest, src, claimed=False)
    ref, ref_mem, dev = _run(guest, src, claimed=True)
    assert dev.reads + dev.writes > 0                  # the reference did go element by element
    assert (fast.reason, fast.detail) == (ref.reason, ref.detail)
    assert (fast.rip, fast.rflags) == (ref.rip, ref.rflags)
    for r in ("rcx", "rsi", "rdi", "r12", "r13", "r14"):
        assert fast.regs[r] == ref.regs[r], r
    assert fast_mem == ref_mem
    if "end-of-ram" in name:
        # the guest's tables end with its RAM: the element there faults, and with no
        # IDT the fault ends the run -- after the elements before it moved
        assert fast.reason == "shutdown" and 0 < fast.regs["rcx"] < count
    else:
        assert fast.reason == "guest-exit" and fast.regs["r12"] == (0 if insn.startswith("rep") else count)
