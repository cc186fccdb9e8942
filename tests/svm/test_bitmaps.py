"""IOPM and MSRPM (APM vol. 2 §15.10-15.11).

Unit tests of the bitmap classes against hand-computed bit positions, and
guests whose IN/OUT/RDMSR/WRMSR exit (or not) according to bits the test
writes straight into the maps in host memory at the VMCB's IOPM_BASE_PA /
MSRPM_BASE_PA -- the kvm-unit-tests ``ioio`` and ``msr intercept`` checks.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from sandbox.memory.hostmem import HostMemory
from sandbox.svm.iopm import IOPM, IoioInfo
from sandbox.svm.msrpm import MSRPM, msrpm_bit

from conftest import BASE, assemble, capture, hc_exit, insn_length, install_reporting_idt

IOIO, MSR = 0x7B, 0x7C
IOPM_BYTES = 12 * 1024           # §5: 12 KiB
MSRPM_BYTES = 8 * 1024           # §5: 8 KiB


# =============================================================== IOPM, unit
@pytest.fixture
def iopm():
    mem = HostMemory(1 << 20)
    hpa = mem.alloc_contiguous(3)
    return mem, hpa, IOPM(mem, hpa)


def raw_port_bit(mem, hpa, port):
    # §5: one bit per port, port p at byte p >> 3, bit p & 7
    return mem.read(hpa + (port >> 3), 1)[0] >> (port & 7) & 1


@pytest.mark.parametrize("port", [0, 1, 7, 8, 0x80, 0x3F8, 0x3FF, 0x4FFF, 0x5000, 0x7FFF, 0x8000, 0xFFFF])
def test_iopm_set_touches_exactly_one_bit(iopm, port):
    mem, hpa, m = iopm
    m.set(port)
    raw = mem.read(hpa, IOPM_BYTES)
    expect = bytearray(IOPM_BYTES)
    expect[port >> 3] = 1 << (port & 7)
    assert raw == bytes(expect)
    assert m.bit(port)
    m.set(port, False)
    assert mem.read(hpa, IOPM_BYTES) == bytes(IOPM_BYTES)


def test_iopm_set_count(iopm):
    mem, hpa, m = iopm
    m.set(0x3F8, True, 8)
    assert mem.read(hpa + 0x3F8 // 8, 1) == b"\xff"
    assert mem.read(hpa, 0x3F8 // 8) == bytes(0x3F8 // 8)
    assert mem.read(hpa + 0x3F8 // 8 + 1, 1) == b"\x00"


def test_iopm_port_ffff_size4_uses_bits_past_64k(iopm):
    """kvm-unit-tests ioio: io_bitmap[8192] alone makes inl(0xFFFF) exit;
    io_bitmap[0] alone does not (ports do not wrap)."""
    mem, hpa, m = iopm
    mem.write(hpa + 8192, b"\xff")
    assert m.intercepts(0xFFFF, 4)
    assert m.intercepts(0xFFFF, 2)
    assert not m.intercepts(0xFFFF, 1)
    mem.write(hpa + 8192, b"\x00")
    mem.write(hpa + 0, b"\xff")
    assert not m.intercepts(0xFFFF, 4)
    # bits 0x10000-0x10002 are the first three bits of byte 0x2000
    for b in range(3):
        mem.write(hpa, bytes(IOPM_BYTES))
        mem.write(hpa + 0x2000, bytes([1 << b]))
        assert m.intercepts(0xFFFF, 4), b
    mem.write(hpa, bytes(IOPM_BYTES))
    mem.write(hpa + 0x2000, bytes([1 << 3]))     # 0x10003 is beyond a 4-byte access at 0xFFFF
    assert not m.intercepts(0xFFFF, 4)


def test_iopm_set_all(iopm):
    mem, hpa, m = iopm
    m.set_all(True)
    assert mem.read(hpa, IOPM_BYTES) == b"\xff" * IOPM_BYTES
    m.set_all(False)
    assert mem.read(hpa, IOPM_BYTES) == bytes(IOPM_BYTES)


@settings(max_examples=200, deadline=None)
@given(ports=st.sets(st.integers(0, 0xFFFF), max_size=8), port=st.integers(0, 0xFFFF),
       size=st.sampled_from([1, 2, 4]))
def test_iopm_multibyte_checks_every_byte(ports, port, size):
    mem = HostMemory(1 << 20)
    hpa = mem.alloc_contiguous(3)
    m = IOPM(mem, hpa)
    buf = bytearray(IOPM_BYTES)
    for p in ports:
        buf[p >> 3] |= 1 << (p & 7)
    mem.write(hpa, bytes(buf))
    expected = any((buf[q >> 3] >> (q & 7)) & 1 for q in range(port, port + size))
    assert m.intercepts(port, size) == expected


# ------------------------------------------------------------ IOIO EXITINFO1
# Fig. 15-2: 0 TYPE(IN), 2 STR, 3 REP, 4 SZ8, 5 SZ16, 6 SZ32, 7 A16, 8 A32, 9 A64, 12:10 SEG, 31:16 PORT
@pytest.mark.parametrize("kw,expected", [
    (dict(port=0x3F8, size=1, is_in=True), (0x3F8 << 16) | 0x10 | 0x200 | 0x1),
    (dict(port=0x80, size=2, is_in=False), (0x80 << 16) | 0x20 | 0x200),
    (dict(port=0xFFFF, size=4, is_in=True), (0xFFFF << 16) | 0x40 | 0x200 | 0x1),
    (dict(port=0x80, size=1, is_in=False, string=True, rep=True, seg=3), (0x80 << 16) | 0x4 | 0x8 | 0x10 | 0x200 | (3 << 10)),
    (dict(port=0x60, size=1, is_in=True, string=True, seg=0), (0x60 << 16) | 0x1 | 0x4 | 0x10 | 0x200),
    (dict(port=0x70, size=4, is_in=False, string=True, addr_size=32, seg=4), (0x70 << 16) | 0x4 | 0x40 | 0x100 | (4 << 10)),
    (dict(port=0x1234, size=2, is_in=True, addr_size=16), (0x1234 << 16) | 0x1 | 0x20 | 0x80),
])
def test_ioioinfo_encode(kw, expected):
    assert IoioInfo.encode(**kw) == expected


# ======================================================== IOPM, in a guest
def set_iopm_raw(m, byte_values: dict[int, int]):
    base = m.guest.vmcb.IOPM_BASE_PA & ~0xFFF
    m.mem.write(base, bytes(IOPM_BYTES))
    for off, val in byte_values.items():
        m.mem.write(base + off, bytes([val]))


def io_guest(guest, insn: str, dx: int):
    pre = f"mov edx, {dx:#x}\nmov eax, 0x12345678\n"
    m = guest(pre + insn + "\n" + hc_exit(0x33))
    rip = BASE + len(assemble(pre))
    return m, rip


def bit(port):
    return {port >> 3: 1 << (port & 7)}


# (name, instruction, DX, IOPM bytes, exits?, port in EXITINFO1, size)
KUT_IOIO = [
    ("inb-0x5000", "in al, dx", 0x5000, bit(0x5000), True, 0x5000, 1),
    ("outw-0x9000", "out dx, ax", 0x9000, bit(0x9000), True, 0x9000, 2),
    ("inl-0x4fff-partial-overlap", "in eax, dx", 0x4FFF, bit(0x5000), True, 0x4FFF, 4),
    ("inl-0x4fff-beyond", "in eax, dx", 0x4FFF, bit(0x5003), False, None, 4),
    ("inl-0x7fff-cross-page", "in eax, dx", 0x7FFF, bit(0x8000), True, 0x7FFF, 4),
    ("outw-0x7fff-cross-page", "out dx, ax", 0x7FFF, bit(0x8000), True, 0x7FFF, 2),
    ("inb-0x7fff-own-bit-clear", "in al, dx", 0x7FFF, bit(0x8000), False, None, 1),
    ("inl-0xffff-byte-8192", "in eax, dx", 0xFFFF, {8192: 0xFF}, True, 0xFFFF, 4),
    ("inb-0xffff-byte-8192", "in al, dx", 0xFFFF, {8192: 0xFF}, False, None, 1),
    ("inl-0xffff-no-wrap", "in eax, dx", 0xFFFF, {0: 0xFF}, False, None, 4),
    ("outw-0x80-second-port-only", "out dx, ax", 0x80, bit(0x81), True, 0x80, 2),
    ("outl-0x80-last-port-only", "out dx, eax", 0x80, bit(0x83), True, 0x80, 4),
    ("outl-0x80-next-port-clear", "out dx, eax", 0x80, bit(0x84), False, None, 4),
]


@pytest.mark.parametrize("name,insn,dx,bits,exits,port,size", KUT_IOIO, ids=[c[0] for c in KUT_IOIO])
def test_kut_ioio(guest, name, insn, dx, bits, exits, port, size):
    m, rip = io_guest(guest, insn, dx)
    set_iopm_raw(m, bits)
    rec = capture(m, IOIO)
    r = m.run(timeout=5)
    if not exits:
        assert r.reason == "guest-exit" and r.exit_code == 0x33, r.detail
        assert IOIO not in r.counts
        return
    assert r.reason == "captured", r.detail
    (e,) = rec
    assert e.code == IOIO and e.rip == rip
    assert e.info1 >> 16 == port
    assert (e.info1 >> 4) & 7 == {1: 1, 2: 2, 4: 4}[size]          # SZ8/SZ16/SZ32 one-hot
    is_in = insn.startswith("in")
    assert e.info1 & 1 == int(is_in)
    nxt = rip + insn_length(m.guest.read_phys(rip, 15))
    assert e.info2 == nxt


def test_ioio_intercept_bit_clear_ignores_the_iopm(guest):
    m, _ = io_guest(guest, "in al, dx", 0x5000)
    set_iopm_raw(m, {0x5000 >> 3: 0xFF})
    m.guest.vmcb.set_intercept(IOIO, False)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 0x33 and IOIO not in r.counts


def test_iopm_is_read_at_the_vmcb_base(guest):
    """Move the IOPM: the processor must follow IOPM_BASE_PA."""
    m, rip = io_guest(guest, "in al, dx", 0x5000)
    new = m.mem.alloc_contiguous(3)
    set_iopm_raw(m, {})                           # the old map: nothing
    m.mem.write(new + (0x5000 >> 3), b"\x01")
    m.guest.vmcb.IOPM_BASE_PA = new
    rec = capture(m, IOIO)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].info1 >> 16 == 0x5000


# =============================================================== MSRPM, unit
def expected_msrpm_bit(msr: int, write: bool) -> int | None:
    # §5: bit = range * 16384 + (msr & 0x1FFF) * 2 (+1 for write)
    for rng, base in enumerate((0x0000_0000, 0xC000_0000, 0xC001_0000)):
        if base <= msr <= base + 0x1FFF:
            return rng * 16384 + (msr & 0x1FFF) * 2 + int(write)
    return None


@pytest.mark.parametrize("msr,write,bitno", [
    (0x0000_0000, False, 0), (0x0000_0000, True, 1), (0x0000_0010, False, 0x20), (0x0000_1FFF, True, 0x3FFF),
    (0xC000_0000, False, 0x800 * 8), (0xC000_0080, True, 0x4000 + 0x101), (0xC000_1FFF, True, 0x7FFF),
    (0xC001_0000, False, 0x1000 * 8), (0xC001_0117, True, 0x8000 + 0x22F), (0xC001_1FFF, True, 0xBFFF),
])
def test_msrpm_bit_hand_computed(msr, write, bitno):
    assert msrpm_bit(msr, write) == bitno


@settings(max_examples=300, deadline=None)
@given(msr=st.one_of(st.integers(0, 0x1FFF), st.integers(0xC000_0000, 0xC000_1FFF),
                     st.integers(0xC001_0000, 0xC001_1FFF), st.integers(0, 0xFFFF_FFFF)),
       write=st.booleans())
def test_msrpm_bit_formula(msr, write):
    assert msrpm_bit(msr, write) == expected_msrpm_bit(msr, write)


@pytest.fixture
def msrpm():
    mem = HostMemory(1 << 20)
    hpa = mem.alloc_contiguous(2)
    return mem, hpa, MSRPM(mem, hpa)


@pytest.mark.parametrize("msr", [0x10, 0x174, 0x1FFF, 0xC000_0080, 0xC000_0102, 0xC001_0117, 0xC001_1FFF])
@pytest.mark.parametrize("write", [False, True])
def test_msrpm_set_touches_one_raw_bit(msrpm, msr, write):
    mem, hpa, m = msrpm
    m.set(msr, read=None if write else True, write=True if write else None)
    n = expected_msrpm_bit(msr, write)
    expect = bytearray(MSRPM_BYTES)
    expect[n >> 3] = 1 << (n & 7)
    assert mem.read(hpa, MSRPM_BYTES) == bytes(expect)
    assert m.intercepts(msr, write) and not m.intercepts(msr, not write)


@pytest.mark.parametrize("msr", [0x2000, 0x4000_0000, 0xC000_2000, 0xC000_FFFF, 0xC001_2000, 0xC002_0000,
                                 0xFFFF_FFFF])
def test_msrs_outside_the_ranges_always_intercept(msrpm, msr):
    mem, hpa, m = msrpm
    assert msrpm_bit(msr, False) is None
    m.set_all(False)
    assert m.intercepts(msr, False) and m.intercepts(msr, True)
    with pytest.raises(ValueError):
        m.set(msr, read=False)


def test_sev_status_is_never_intercepted(msrpm):
    mem, hpa, m = msrpm
    m.set_all(True)
    assert mem.read(hpa, MSRPM_BYTES) == b"\xff" * MSRPM_BYTES
    assert not m.intercepts(0xC001_0131, False)
    assert not m.intercepts(0xC001_0131, True)
    assert m.intercepts(0xC001_0130, False) and m.intercepts(0xC001_0132, True)


# ======================================================= MSRPM, in a guest
def set_msrpm_raw(m, bits: list[int], fill: int = 0):
    base = m.guest.vmcb.MSRPM_BASE_PA & ~0xFFF
    m.mem.write(base, bytes([fill]) * MSRPM_BYTES)
    for n in bits:
        b = m.mem.read(base + (n >> 3), 1)[0]
        m.mem.write(base + (n >> 3), bytes([b | (1 << (n & 7))]))


def msr_guest(guest, insn: str, msr: int):
    pre = f"mov ecx, {msr:#x}\nxor eax, eax\nxor edx, edx\n"
    m = guest(pre + insn + "\n" + hc_exit(0x44))
    m.guest.vmcb.set_intercept(MSR)
    return m, BASE + len(assemble(pre))


@pytest.mark.parametrize("msr", [0x174, 0x1FFF, 0xC000_0081, 0xC000_0102, 0xC001_0117, 0xC001_1FFF])
@pytest.mark.parametrize("insn,write", [("rdmsr", False), ("wrmsr", True)])
def test_msr_exit_per_msrpm_bit(guest, msr, insn, write):
    m, rip = msr_guest(guest, insn, msr)
    set_msrpm_raw(m, [expected_msrpm_bit(msr, write)])
    rec = capture(m, MSR)
    r = m.run(timeout=5)
    assert r.reason == "captured", r.detail
    (e,) = rec
    assert (e.code, e.info1, e.rip) == (MSR, int(write), rip)     # §15.11: 0 = RDMSR, 1 = WRMSR
    assert e.nrip == rip + 2


@pytest.mark.parametrize("msr", [0x174, 0xC000_0102, 0xC001_0117])
@pytest.mark.parametrize("insn,write", [("rdmsr", False), ("wrmsr", True)])
def test_msr_other_direction_bit_does_not_exit(guest, msr, insn, write):
    m, _ = msr_guest(guest, insn, msr)
    set_msrpm_raw(m, [expected_msrpm_bit(msr, not write)])
    install_reporting_idt(m)
    r = m.run(timeout=5)
    assert MSR not in r.counts
    assert r.reason == "guest-exit" and r.exit_code == 0x44, (r.detail, r.exit_code)


@pytest.mark.parametrize("msr", [0x2000, 0x4000_0000, 0xC000_2000, 0xC001_2000, 0xFFFF_FFFF])
def test_out_of_range_msr_exits_with_an_empty_map(guest, msr):
    m, rip = msr_guest(guest, "rdmsr", msr)
    set_msrpm_raw(m, [])
    rec = capture(m, MSR)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].info1 == 0 and rec[0].rip == rip


def test_sev_status_rdmsr_does_not_exit_with_a_full_map(guest):
    m, _ = msr_guest(guest, "rdmsr", 0xC001_0131)
    set_msrpm_raw(m, [], fill=0xFF)
    install_reporting_idt(m)
    r = m.run(timeout=5)
    assert MSR not in r.counts
    assert r.reason == "guest-exit" and r.exit_code == 0x44, r.detail


def test_msr_prot_clear_means_no_msr_exit(guest):
    m, _ = msr_guest(guest, "rdmsr", 0x4000_0000)
    set_msrpm_raw(m, [], fill=0xFF)
    m.guest.vmcb.set_intercept(MSR, False)
    install_reporting_idt(m)
    r = m.run(timeout=5)
    assert MSR not in r.counts
    assert r.reason == "guest-exit" and r.exit_code == 0x44, r.detail
