"""The default handlers that read or write guest memory behave the same under
nested paging and shadow paging.

Under nested paging the hypervisor reaches a guest-virtual buffer through the
guest's tables and the NPT; under shadow paging through the guest's tables and
its RAM map (the processor's CR3 then holds the shadow tables, which need not
map the buffer yet).  Either way a buffer the guest does not map must fail the
same way: the PRINT hypercall returns -EFAULT (Linux's -14, as KVM's
hypercalls do), string I/O raises the guest's own #PF (APM vol. 2 §8.4.2) with
CR2 = the address and the error code of the access.
"""
from __future__ import annotations

import pytest

from conftest import DATA, VMMCALL, assemble, hc_exit, install_reporting_idt
from sandbox import Machine

PAGING = ["nested", "shadow"]
EFAULT = (-14) & 0xFFFF_FFFF_FFFF_FFFF
RAM = 2 << 20
TEXT = b"paging-modes!\n"


@pytest.fixture
def machine(tmp_path):
    def make(paging: str, src: str) -> Machine:
        m = Machine(dram=16 << 20, ram=RAM, paging=paging)
        p = tmp_path / f"g-{paging}.S"
        p.write_text(src + "\n" + hc_exit(0x55))
        m.load(str(p))
        return m
    return make


def leaf_pte(m: Machine, va: int) -> int:
    """GPA of the guest's 4 KiB leaf entry for ``va`` (APM vol. 2 §5.3), from the
    guest's own CR3 (under shadow paging the VMCB holds the shadow root)."""
    table = (m.shadow.guest_cr3 if m.shadow is not None else m.guest.vmcb.CR3) & ~0xFFF
    for shift in (39, 30, 21):
        e = int.from_bytes(m.guest.read_phys(table + ((va >> shift) & 0x1FF) * 8, 8), "little")
        assert e & 1 and not e & 0x80
        table = e & 0x000F_FFFF_FFFF_F000
    return table + ((va >> 12) & 0x1FF) * 8


def print_call(addr: int, n: int) -> str:
    """PRINT(addr, n); the result (RAX) goes to R12."""
    return f"mov eax, 1\nmovabs rdi, {addr:#x}\nmov esi, {n}\n{VMMCALL}\nmov r12, rax"


@pytest.mark.parametrize("paging", PAGING)
def test_print_of_a_buffer_the_guest_never_touched(machine, paging):
    m = machine(paging, print_call(DATA, len(TEXT)))
    m.guest.write_phys(DATA, TEXT)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.console == TEXT.decode() and r.regs["r12"] == 0, (r.reason, r.detail)


@pytest.mark.parametrize("paging", PAGING)
@pytest.mark.parametrize("addr,n,why", [
    (0x4000_0000, 16, "not mapped by the guest's tables"),
    (RAM - 8, 16, "runs off the end of the guest's mappings"),
    (0x0000_8000_0000_0000, 16, "non-canonical"),
])
def test_print_of_an_unmapped_buffer_returns_efault(machine, paging, addr, n, why):
    m = machine(paging, print_call(addr, n))
    r = m.run(timeout=5)
    assert r.reason == "guest-exit", (why, r.reason, r.detail)
    assert r.regs["r12"] == EFAULT and r.console == "", why


@pytest.mark.parametrize("paging", PAGING)
def test_print_of_a_page_the_guest_maps_outside_its_ram_returns_efault(machine, paging):
    """The guest's PTE for 0x1F0000 points at GPA 1 GiB, beyond its RAM: there is
    no memory behind it in either mode (no NPT mapping; no RAM-map entry)."""
    m = machine(paging, print_call(0x1F0000, 16))
    a = leaf_pte(m, 0x1F0000)
    m.guest.write_phys(a, ((1 << 30) | 0x3).to_bytes(8, "little"))
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.regs["r12"] == EFAULT, (r.reason, r.detail)


@pytest.mark.parametrize("paging", PAGING)
def test_rep_outsb_from_a_buffer_the_guest_never_touched(machine, paging):
    m = machine(paging, f"movabs rsi, {DATA:#x}\nmov ecx, {len(TEXT)}\nmov edx, 0x3f8\nrep outsb")
    m.guest.write_phys(DATA, TEXT)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 0x55 and r.console == TEXT.decode(), (r.reason, r.detail)


@pytest.mark.parametrize("paging", PAGING)
def test_rep_insb_into_a_buffer_the_guest_never_touched(machine, paging):
    """Four reads of COM1's LSR (THR empty | transmitter empty = 60h, 16550 data sheet)."""
    m = machine(paging, f"movabs rdi, {DATA:#x}\nmov ecx, 4\nmov edx, 0x3fd\nrep insb")
    m.guest.iopm.set(0x3FD, True)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 0x55, (r.reason, r.detail)
    assert m.guest.read_phys(DATA, 5) == b"\x60\x60\x60\x60\x00"


@pytest.mark.parametrize("paging", PAGING)
@pytest.mark.parametrize("insn,reg,err", [
    ("rep outsb", "rsi", 0x0),        # a read of a not-present page: P = 0, W = 0
    ("rep insb", "rdi", 0x2),         # a write: W = 1
])
def test_string_io_on_an_unmapped_buffer_is_the_guests_page_fault(machine, paging, insn, reg, err):
    addr = 0x4000_0000
    m = machine(paging, f"movabs {reg}, {addr:#x}\nmov ecx, 4\nmov edx, 0x3f8\n{insn}")
    install_reporting_idt(m)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 0x10E, (r.reason, r.detail, r.exit_code)
    assert (r.regs["rsi"], r.regs["r8"]) == (err, addr)           # error code, CR2 (conftest stubs)


def test_both_modes_print_the_same(machine):
    """The same guest (PRINT of a buffer in its code page, then of one past its
    RAM) gives the same console and results in both modes."""
    src = print_call(0x100000, 8) + "\nmov r13, r12\n" + print_call(0x4000_0000, 8)
    out = []
    for paging in PAGING:
        m = machine(paging, src)
        r = m.run(timeout=5)
        out.append((r.reason, bytes(m.serial.output), r.regs["r12"], r.regs["r13"]))
    assert out[0] == out[1] and out[0][2:] == (EFAULT, 0)
    assert out[0][1] == assemble(src)[:8]
