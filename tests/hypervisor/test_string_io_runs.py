"""INS/OUTS move a page run of elements at a time; the result is the element loop's.

The reference here is written out in the test: one element at a time, as the
instruction is defined (APM vol. 3 "INS", "OUTS"; REP: RCX counts down per
element, rSI/rDI advance by the element size, backwards with DF=1, within
the address size).  An INS element reads the port before its store; a
fault leaves every earlier element done and the registers showing it.

``string_io`` runs on a small model of the machine: guest-virtual addresses
are host addresses over a flat memory, some pages fault, and the devices log
every element they see.  Each case runs the reference and ``string_io`` with
a device that takes runs (``read_string``/``write_string``) and one that
takes elements, and all three must agree on memory, registers, the fault and
the device's log.  A last part checks :class:`Serial16550`'s run methods
against its element ones, and a REP OUTS/INS through a real guest against
the same UART behind an element-only wrapper and the bytes the guest wrote.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from conftest import DATA, SMALL_RAM, hc_exit
from sandbox.hypervisor.devices import COM1, DeviceBus, Serial16550
from sandbox.hypervisor.string_io import string_io
from sandbox.memory.mmu import GuestPageFault
from sandbox.svm.iopm import IoioInfo

PORT = 0x2F0
MEM = 0x22000                  # the model's memory: 64 KiB of 16-bit addresses, and room past them
PF_ERR = 0x6


class ElementDevice:
    """Logs each element; reads return a counter (so their order shows in memory)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int]] = []
        self.next = 0x5A

    def owns(self, port: int) -> bool:
        return port == PORT

    def read(self, port: int, size: int) -> int:
        v = self.next
        self.next = (self.next * 0x10001 + 0x3B) & 0xFFFF_FFFF
        self.log.append(("in", port, size, v & ((1 << 8 * size) - 1)))
        return v | 1 << 40                       # bits beyond the size: the caller masks them

    def write(self, port: int, size: int, value: int) -> None:
        self.log.append(("out", port, size, value))


class RunDevice(ElementDevice):
    """The same device, taking whole runs (and logging them as their elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def read_string(self, port: int, size: int, count: int) -> bytes:
        self.calls += 1
        return b"".join((self.read(port, size) & ((1 << 8 * size) - 1)).to_bytes(size, "little")
                        for _ in range(count))

    def write_string(self, port: int, size: int, data: bytes) -> None:
        self.calls += 1
        assert len(data) % size == 0
        for i in range(0, len(data), size):
            self.write(port, size, int.from_bytes(data[i:i + size], "little"))


class ModelMachine:
    """What ``string_io`` uses of a Machine: the bus, the registers, host
    memory and the guest's virtual memory (identity, with faulting pages)."""

    def __init__(self, dev, faulting: set[int], regs: dict[str, int], fill: bytes) -> None:
        self.bus = DeviceBus()
        if dev is not None:
            self.bus.attach(dev)
        self.regs = SimpleNamespace(**regs)
        self.ram = bytearray(fill)
        self.faulting = faulting
        self.mem = SimpleNamespace(read=lambda h, n: bytes(self.ram[h:h + n]), write=self._host_write)

    def _host_write(self, h: int, data: bytes) -> None:
        assert 0 <= h and h + len(data) <= len(self.ram)
        self.ram[h:h + len(data)] = data

    def _check(self, gva: int, n: int) -> None:
        for a in range(gva, gva + n):
            if a >> 12 in self.faulting or a >= MEM:          # past the model's memory: not present
                raise GuestPageFault(PF_ERR, a)

    def virt_to_host(self, gva: int, access, set_ad: bool = False) -> int:
        self._check(gva, 1)
        return gva

    def read_virt(self, gva: int, n: int) -> bytes:
        self._check(gva, n)
        return bytes(self.ram[gva:gva + n])

    def write_virt(self, gva: int, data: bytes) -> None:
        self._check(gva, len(data))
        self.ram[gva:gva + len(data)] = data


def reference(m: ModelMachine, dev, is_in: bool, rep: bool, size: int, count: int, amask: int, step: int) -> None:
    """The instruction, element by element.  With 16-bit addressing it uses and
    updates SI, DI and CX: the upper bits of RSI, RDI and RCX stay (APM vol. 3,
    INS/OUTS and REP; "the address-size attribute determines ... rCX")."""
    regs, mask = m.regs, (1 << 8 * size) - 1

    def upd(old: int, new: int) -> int:
        return (old & ~0xFFFF) | (new & 0xFFFF) if amask == 0xFFFF else new & amask
    for _ in range(count):
        if is_in:
            v = dev.read(PORT, size) & mask if dev is not None else mask
            m.write_virt(regs.rdi & amask, v.to_bytes(size, "little"))
            regs.rdi = upd(regs.rdi, regs.rdi + step)
        else:
            v = int.from_bytes(m.read_virt(regs.rsi & amask, size), "little")
            if dev is not None:
                dev.write(PORT, size, v)
            regs.rsi = upd(regs.rsi, regs.rsi + step)
        if rep:
            regs.rcx = upd(regs.rcx, regs.rcx - 1)


def _case(rng: random.Random) -> dict:
    size = rng.choice((1, 2, 4))
    asz = rng.choice((16, 32, 64))
    amask = (1 << asz) - 1
    # a start near a page edge, the 64 KiB wrap, or anywhere; possibly misaligned
    base = rng.choice((0, 0x3000, 0x7000, 0xF000, 0x10000 - 0x800, rng.randrange(0x1000, 0xF000)))
    start = base + rng.choice((0, 1, 2, 3, 0xFFD, 0xFFE, 0xFFF, rng.randrange(0x1000)))
    if asz == 16:
        start &= 0xFFFF
    count = rng.choice((1, 2, 7, 1023, 1024, rng.randrange(1, 1025)))
    step = rng.choice((size, -size))
    lo, hi = (start, start + count * size) if step > 0 else (start - count * size, start + size)
    pages = [p for p in range(max(lo, 0) >> 12, (hi >> 12) + 1)]
    faulting = set() if rng.random() < 0.4 else {rng.choice(pages)}
    if asz == 16 and rng.random() < 0.3:
        faulting = set()
    return dict(size=size, amask=amask, start=start, count=count, step=step, faulting=faulting,
                is_in=rng.random() < 0.5, rep=count > 1 or rng.random() < 0.5, asz=asz,
                high=rng.choice((0, 0xABCD_0000_0000_0000)))


def _run(case: dict, dev, impl) -> tuple:
    rng = random.Random(case["start"] * 31 + case["count"])
    fill = rng.randbytes(MEM)
    start = case["start"]
    regs = dict(rdi=case["high"] | start if case["is_in"] else 0x1111,
                rsi=case["high"] | start if not case["is_in"] else 0x2222,
                rcx=case["high"] | case["count"] if case["rep"] else 0x77)
    m = ModelMachine(dev, case["faulting"], regs, fill)
    fault = None
    try:
        impl(m, case)
    except GuestPageFault as f:
        fault = (f.error_code, f.address)
    log = None if dev is None else dev.log
    return fault, vars(m.regs), bytes(m.ram), log


def _impl(m: ModelMachine, c: dict) -> None:
    info = (IoioInfo.TYPE_IN if c["is_in"] else 0) | IoioInfo.STR | (IoioInfo.REP if c["rep"] else 0)
    string_io(m, info, PORT, c["size"], c["count"], c["amask"], c["step"])


def _ref(m: ModelMachine, c: dict) -> None:
    reference(m, m.bus.port_owner(PORT), c["is_in"], c["rep"], c["size"], c["count"], c["amask"], c["step"])


def _edge(size: int, asz: int, start: int, count: int, step: int, faulting: set[int], is_in: bool) -> dict:
    return dict(size=size, amask=(1 << asz) - 1, start=start, count=count, step=step, faulting=faulting,
                is_in=is_in, rep=True, asz=asz, high=0xABCD_0000_0000_0000)


CASES = [_case(random.Random(i)) for i in range(160)] + [
    # the 16-bit wrap, both ways, with and without a fault after it
    _edge(4, 16, 0xFC02, 1024, 4, set(), True), _edge(2, 16, 0xFF01, 1000, 2, {0x1}, False),
    _edge(1, 16, 0x0100, 1024, -1, set(), False), _edge(4, 16, 0x0402, 700, -4, {0xE}, True),
    # 32-bit: backwards below 0 leaves the model's memory (not present)
    _edge(2, 32, 0x0203, 600, -2, set(), False),
]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_page_runs_match_the_element_loop(i):
    c = CASES[i]
    want = _run(c, ElementDevice(), _ref)
    runs = RunDevice()
    assert _run(c, runs, _impl) == want
    assert _run(c, ElementDevice(), _impl) == want
    assert _run(c, None, _impl)[:3] == _run(c, None, _ref)[:3]      # an unclaimed port
    # one device call per page run: a chunk of at most 4 KiB is at most two runs and an
    # element straddling them, and a faulting INS reads one more element
    assert runs.calls <= 4


def test_16_bit_addressing_keeps_the_upper_bits():
    """REP OUTSB with a 67h-less 16-bit address size: SI and CX move, bits 16-63 of
    RSI and RCX stay; the wrap at 64 KiB stays inside SI."""
    c = _edge(1, 16, 0xFFFE, 4, 1, set(), False)
    fault, regs, _, _ = _run(c, ElementDevice(), _impl)
    assert fault is None
    assert regs["rsi"] == 0xABCD_0000_0000_0002 and regs["rcx"] == 0xABCD_0000_0000_0000


def test_the_cases_cover_the_edges():
    """The random cases include what must be exact: faults part-way, DF=1,
    elements straddling pages, the 16-bit wrap, and both directions of I/O."""
    def faults_mid_run(c: dict) -> bool:
        fault, regs, _, _ = _run(c, ElementDevice(), _ref)
        return fault is not None and c["rep"] and 0 < c["count"] - (regs["rcx"] & 0xFFFF) < c["count"]
    assert sum(map(faults_mid_run, CASES)) >= 5, "too few cases fault after moving some elements"
    assert any(c["step"] < 0 and c["faulting"] for c in CASES)
    assert any(c["size"] > 1 and (c["start"] & 0xFFF) > 0x1000 - c["size"] for c in CASES)
    assert any(c["asz"] == 16 and c["step"] > 0 and c["start"] + c["count"] * c["size"] > 0x10000 for c in CASES)
    assert any(c["asz"] == 16 and c["step"] < 0 and c["start"] < c["count"] * c["size"] for c in CASES)


def test_a_fault_mid_run_leaves_the_earlier_elements_done():
    """OUTSB from 0x2F80 up, the page at 0x3000 not present: 0x80 bytes reach
    the device, then #PF at 0x3000 with RSI = 0x3000 and RCX = count - 0x80."""
    c = dict(size=1, amask=(1 << 64) - 1, start=0x2F80, count=0x200, step=1, faulting={3}, is_in=False,
             rep=True, asz=64, high=0)
    dev = RunDevice()
    fault, regs, ram, log = _run(c, dev, _impl)
    assert fault == (PF_ERR, 0x3000)
    assert regs["rsi"] == 0x3000 and regs["rcx"] == 0x200 - 0x80
    assert [v for _, _, _, v in log] == list(ram[0x2F80:0x3000])


def test_backwards_insw_stores_the_first_element_highest():
    """REP INSW with DF=1 from 0x5002: the first word read lands at 0x5002, the
    next at 0x5000, then 0x4FFE (APM vol. 3 "INS": rDI decrements by 2)."""
    c = dict(size=2, amask=(1 << 64) - 1, start=0x5002, count=3, step=-2, faulting=set(), is_in=True,
             rep=True, asz=64, high=0)
    dev = RunDevice()
    fault, regs, ram, log = _run(c, dev, _impl)
    words = [v for _, _, _, v in log]
    assert fault is None and regs["rdi"] == 0x4FFC and regs["rcx"] == 0
    assert [int.from_bytes(ram[a:a + 2], "little") for a in (0x5002, 0x5000, 0x4FFE)] == words


# ------------------------------------------------------------------ the UART's run methods
def _uart_state(u: Serial16550) -> dict:
    return {k: (bytes(v) if isinstance(v, bytearray) else (list(v) if isinstance(v, list) else v))
            for k, v in vars(u).items() if k != "sink"}


@pytest.mark.parametrize("size", (1, 2, 4))
@pytest.mark.parametrize("off", range(8))
@pytest.mark.parametrize("dlab", (False, True))
def test_uart_write_string_is_its_writes_in_order(size, off, dlab):
    rng = random.Random(size * 100 + off * 2 + dlab)
    data = bytes(rng.randrange(256) for _ in range(size * 37))
    seen: list[list[bytes]] = [[], []]
    a, b = (Serial16550(COM1, sink=seen[i].append) for i in range(2))
    for u in (a, b):
        u.write(COM1 + 3, 1, 0x83 if dlab else 0x03)
        u.write(COM1 + 7, 1, 0x11)
    a.write_string(COM1 + off, size, data)
    for i in range(0, len(data), size):
        b.write(COM1 + off, size, int.from_bytes(data[i:i + size], "little"))
    assert _uart_state(a) == _uart_state(b)
    assert b"".join(seen[0]) == b"".join(seen[1])
    if off == 0 and not dlab:                      # THR: each element's low byte is sent
        assert bytes(a.output) == data[::size]
    else:
        assert bytes(a.output) == b""
    assert [a.read(COM1 + k, 1) for k in range(8)] == [b.read(COM1 + k, 1) for k in range(8)]


@pytest.mark.parametrize("size", (1, 2, 4))
@pytest.mark.parametrize("off", range(8))
def test_uart_read_string_is_its_reads_in_order(size, off):
    u = Serial16550(COM1)
    u.write(COM1 + 1, 1, 0x0F)
    want = b"".join(u.read(COM1 + off, size).to_bytes(size, "little") for _ in range(5))
    assert u.read_string(COM1 + off, size, 5) == want
    if off == 5:
        assert want == b"\x60".ljust(size, b"\0") * 5       # LSR: THRE and TEMT set


# ------------------------------------------------------------------ through a guest
class ElementUart:
    """COM1 behind a device with no run methods: the per-element path."""

    def __init__(self, uart: Serial16550) -> None:
        self.uart = uart

    def owns(self, port: int) -> bool:
        return self.uart.owns(port)

    def read(self, port: int, size: int) -> int:
        return self.uart.read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        self.uart.write(port, size, value)


LSR = COM1 + 5
GUEST = {
    # (instruction, pointer register, start, count, DF, port)
    "outsb-across-pages": ("rep outsb", "rsi", DATA - 0x123, 0x2345, 0, COM1),
    "outsw-straddling": ("rep outsw", "rsi", DATA - 0x1001, 0x1801, 0, COM1),
    "outsd-backwards": ("rep outsd", "rsi", DATA + 0x1FFE, 0x901, 1, COM1),
    "outsb-into-the-end-of-ram": ("rep outsb", "rsi", SMALL_RAM - 0x1801, 0x3000, 0, COM1),
    "outsb-to-the-divisor-latch": ("rep outsb", "rsi", DATA - 0x10, 0x40, 0, COM1),
    "insb-backwards-from-lsr": ("rep insb", "rdi", DATA + 0x1003, 0x1800, 1, LSR),
}


def _guest_run(guest, src: str, element: bool):
    m = guest(src)
    if element:
        m.bus = DeviceBus()
        m.bus.attach(ElementUart(m.serial))
    m.set_ports([COM1, COM1 + 3, LSR])
    pattern = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(0x6000))
    m.guest.write_phys(DATA - 0x3000, pattern)
    r = m.run(timeout=30)
    return r, bytes(m.serial.output), m.guest.read_phys(DATA - 0x3000, 0x6000), pattern


@pytest.mark.parametrize("name", list(GUEST))
def test_guest_rep_string_io_on_the_uart(guest, name):
    insn, reg, start, count, df, port = GUEST[name]
    dlab = "divisor" in name                   # LCR.DLAB set: COM1+0 is the divisor latch, not THR
    src = ((f"mov dx, {COM1 + 3:#x}\nmov al, 0x80\nout dx, al\n" if dlab else "")
           + f"mov {reg}, {start:#x}\nmov rcx, {count:#x}\nmov dx, {port:#x}\n" + ("std\n" if df else "")
           + insn + "\ncld\nmov r12, rcx\nmov r13, rsi\nmov r14, rdi\n" + hc_exit(0x55))
    bulk, out, mem, pattern = _guest_run(guest, src, element=False)
    ref, ref_out, ref_mem, _ = _guest_run(guest, src, element=True)
    assert (bulk.reason, bulk.detail, bulk.rip, bulk.rflags) == (ref.reason, ref.detail, ref.rip, ref.rflags)
    for r in ("rcx", "rsi", "rdi", "r12", "r13", "r14"):
        assert bulk.regs[r] == ref.regs[r], r
    assert (out, mem) == (ref_out, ref_mem)
    size = {"b": 1, "w": 2, "d": 4}[insn[-1]]
    done = count - bulk.regs["rcx"]
    if "end-of-ram" in name:
        assert bulk.reason == "shutdown" and done == SMALL_RAM - start   # every byte before the fault
    else:
        assert bulk.reason == "guest-exit" and bulk.regs["r12"] == 0
    if dlab:
        assert out == b""
    elif insn.startswith("rep outs"):
        # the UART sent each element's low byte, in the order the guest's memory gave them
        def byte_at(a: int) -> int:
            return pattern[a - (DATA - 0x3000)] if DATA - 0x3000 <= a < DATA + 0x3000 else 0
        step = -size if df else size
        want = bytes(byte_at(start + k * step) for k in range(done))
        if "end-of-ram" not in name:
            assert out == want
        else:
            assert len(out) == done
    else:
        # every byte of the run reads LSR: THRE and TEMT (0x60), stored from start downwards
        lo = start - (count - 1) - (DATA - 0x3000)
        assert out == b"" and mem[lo:lo + count] == b"\x60" * count and mem[lo - 1] != 0x60
