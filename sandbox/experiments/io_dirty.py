"""The seed's I/O experiment, run in a real guest and counted, not computed.

A guest workload reads a device status register ``reads`` times and writes
a control command ``writes`` times, with a fixed amount of computation per
iteration so the whole run lasts about one second of guest time
(:data:`sandbox.svm.cpu.GUEST_IPS`).  The same workload is run three ways:

``port``
    the registers are I/O ports the IOPM intercepts: every access is a
    VMEXIT_IOIO (the seed's 1,000,000 + 30,000 = 1,030,000 exits);
``mmio-trap``
    the registers are an MMIO window left out of the nested page table:
    every access is a VMEXIT_NPF the hypervisor decodes and emulates;
``mmio-poll``
    the first access to each of the two register pages exits (NPF) and the
    hypervisor maps the page; from then on it learns about new commands by
    polling the control page's nested Dirty bit on a 1 ms guest-time timer
    (#VMEXIT(INTR)), about 1,000 ticks for one second of guest time -- the
    seed's "about 1,002".

Commands carry a sequence number, so the polling device knows how many it
received even though it only sees the latest value on each tick.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

from ..hypervisor.devices import MmioMode, StatusControlDevice
from ..hypervisor.machine import Machine
from ..svm.cpu import GUEST_IPS
from ..svm.exitcodes import exit_name
from ..svm.stop import StopReason

STATUS_PORT, CONTROL_PORT = 0x510, 0x514
MMIO_GPA = 0x1E0000                 # two register pages inside the guest's identity map
MODES = ("port", "mmio-trap", "mmio-poll")
#: instructions of the workload loop outside the spin (counted from the source below)
_LOOP_OVERHEAD = 10


def workload_source(mode: str, reads: int, writes: int, seconds: float = 1.0) -> str:
    """Guest assembly for the workload; ``writes`` must divide evenly into
    blocks of 100 reads (3 writes per 100 reads in the seed's figures)."""
    if reads <= 0 or writes < 0 or writes * 100 % reads:
        raise ValueError("writes per 100 reads must be a whole number")
    per_block = writes * 100 // reads
    insns_per_iter = int(seconds * GUEST_IPS) // reads
    spin = max(1, (insns_per_iter - _LOOP_OVERHEAD) // 2)
    if mode == "port":
        read = f"mov dx, {STATUS_PORT:#x}\n    in al, dx"
        write = f"mov dx, {CONTROL_PORT:#x}\n    mov eax, r13d\n    out dx, eax"
    else:
        read = "mov al, byte ptr [r12]\n    nop"           # the same instruction count as IN
        write = "mov dword ptr [r12 + 0x1000], r13d"
    return f"""
    mov r12, {MMIO_GPA:#x}
    mov r14, {reads}
    xor r15, r15
    mov r13, 1
    mov r11, 100
work:
    {read}
    dec r11
    jnz same_block
    mov r11, 100
same_block:
    cmp r11, {per_block}
    ja no_command
    {write}
    inc r13
no_command:
    mov ecx, {spin}
compute:
    dec ecx
    jnz compute
    inc r15
    cmp r15, r14
    jb work
    mov edi, 0
    xor eax, eax
    .byte 0x0f,0x01,0xd9
"""


class PollingDevice(StatusControlDevice):
    """The device behind a granted register window: it reads commands out of
    the control page when the nested Dirty bit says it was written."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: dict[int, int] = {}     # window offset -> HPA
        self.last_seq = 0
        self.polls = 0

    def granted(self, m: Machine, offset: int, hpa: int) -> None:
        self.pages[offset] = hpa
        if offset == 0:
            m.mem.write(hpa, bytes([self.status]))

    def poll(self, m: Machine) -> None:
        self.polls += 1
        ctl = self.pages.get(0x1000)
        if ctl is None:
            return
        if m.guest.npt.harvest_dirty([MMIO_GPA + 0x1000]):
            seq = int.from_bytes(m.mem.read(ctl, 4), "little")
            self.commands.extend(range(self.last_seq + 1, seq + 1))
            self.last_seq = seq


@dataclass
class IoResult:
    mode: str
    exits: int                     # every #VMEXIT of the run
    by_code: dict[str, int] = field(default_factory=dict)
    commands: int = 0              # commands the device received
    status_reads: int = 0          # status reads the device saw (0 when they never trap)
    guest_ms: float | None = None  # guest time, when the run kept a guest clock (the timer does)
    seconds: float = 0.0
    reason: str = ""


def run_io_experiment(mode: str, reads: int = 1_000_000, writes: int = 30_000, *,
                      tick_ns: int = 1_000_000, timeout: float = 600.0) -> IoResult:
    """Run the workload in ``mode`` and count its exits."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    m = Machine(dram=16 << 20, ram=2 << 20)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"io_{mode}.S")
        with open(path, "w") as f:
            f.write(workload_source("port" if mode == "port" else "mmio", reads, writes))
        m.load(path)
    if mode == "port":
        dev = StatusControlDevice(STATUS_PORT)
        m.bus.attach(dev)
        for p in range(STATUS_PORT, STATUS_PORT + 8):
            m.guest.iopm.set(p, True)
    elif mode == "mmio-trap":
        dev = StatusControlDevice()
        m.map_mmio(MMIO_GPA, 0x2000, dev, MmioMode.TRAP)
    else:
        dev = PollingDevice()
        m.map_mmio(MMIO_GPA, 0x2000, dev, MmioMode.GRANT)
        m.set_timer(tick_ns, dev.poll)
    t0 = time.perf_counter()
    r = m.run(timeout=timeout)
    dt = time.perf_counter() - t0
    if isinstance(dev, PollingDevice):
        dev.poll(m)                  # the last commands, after the final tick
    return IoResult(mode=mode, exits=r.exits, by_code={exit_name(c): n for c, n in sorted(r.counts.items())},
                    commands=len(dev.commands), status_reads=dev.status_reads,
                    guest_ms=m.cpu.guest_time_ns / 1e6 if m.cpu.timer_period else None, seconds=dt,
                    reason=r.reason if r.reason != StopReason.GUEST_EXIT else "ok")
