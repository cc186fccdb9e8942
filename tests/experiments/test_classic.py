"""The classic trap-and-emulate monitor on small guests: privileged
instructions fault at CPL 3 and are emulated against the virtual CPU;
sensitive, unprivileged ones run natively and show the monitor's state."""
from __future__ import annotations

import struct

import pytest

from sandbox import Machine
from sandbox.hypervisor.classic import MONITOR_GDT, ClassicMonitor

from conftest import hc_exit

RES = 0x1C0000


def classic(guest_src: str, tmp_path) -> tuple[Machine, ClassicMonitor, object]:
    p = tmp_path / "g.S"
    p.write_text(guest_src)
    m = Machine(dram=16 << 20, ram=4 << 20, paging="shadow")
    m.load(str(p))
    mon = ClassicMonitor(m).attach()
    return m, mon, m.run(timeout=30)


def test_needs_shadow_paging():
    with pytest.raises(ValueError, match="shadow"):
        ClassicMonitor(Machine(dram=16 << 20, ram=2 << 20))


def test_guest_really_runs_at_cpl3_and_believes_it_is_ring0(tmp_path):
    src = f"""
    mov rbx, {RES:#x}
    cli                                  # privileged: #GP, emulated (virtual IF = 0)
    pushfq                               # not privileged: the real IF (1)
    pop rax
    mov [rbx], rax
    xor eax, eax
    mov ax, cs
    mov [rbx + 8], rax
    mov rax, cr0                         # privileged: the virtual CR0
    mov [rbx + 16], rax
    sgdt [rbx + 24]                      # not privileged: the monitor's GDTR
""" + hc_exit(0)
    m, mon, r = classic(src, tmp_path)
    assert r.reason == "guest-exit" and r.exit_code == 0, r.detail
    flags, cs, cr0 = struct.unpack("<3Q", m.guest.read_phys(RES, 24))
    limit, base = struct.unpack("<HQ", m.guest.read_phys(RES + 24, 10))
    assert mon.virtual.if_ is False and flags & (1 << 9)       # the guest's CLI only reached the virtual IF
    assert cs & 3 == 3                                          # CS.RPL = the real CPL
    assert cr0 == 0x80010033                                    # the loader's CR0, as the virtual CPU keeps it
    assert (base, limit) == (MONITOR_GDT, 0xFFF)
    assert mon.emulated == {"cli": 1, "mov": 1, "vmmcall": 1}
    assert m.guest.vmcb.CPL == 3


def test_port_io_and_hypercalls_go_to_the_ordinary_handlers(tmp_path):
    src = """
    mov dx, 0x3f8
    mov al, 0x4b
    out dx, al                           # #GP at CPL 3 with IOPL 0: emulated through the IOIO handler
""" + hc_exit(7)
    m, mon, r = classic(src, tmp_path)
    assert r.reason == "guest-exit" and r.exit_code == 7
    assert m.serial.output == b"K"
    assert mon.emulated == {"out": 1, "vmmcall": 1}


def test_the_guests_own_exception_stops_the_run(tmp_path):
    m, mon, r = classic("ud2\n" + hc_exit(0), tmp_path)
    assert r.reason == "unhandled-exit" and "exception 6" in r.detail


def test_consecutive_privileged_traps_stay_gp(tmp_path):
    """Five privileged instructions in a row: each is its own #GP, never a #DF
    (QEMU's exception in flight is cleared when the processor model takes one)."""
    src = """
    cli
    sti
    cli
    mov rax, cr4
    mov cr4, rax
""" + hc_exit(0)
    m, mon, r = classic(src, tmp_path)
    assert r.reason == "guest-exit", r.detail
    assert [vec for _, vec in mon.traps] == [13, 13, 13, 13, 13, 6]      # five #GP, then VMMCALL's #UD
    assert mon.emulated == {"cli": 2, "sti": 1, "mov": 2, "vmmcall": 1} and mon.virtual.if_ is False
