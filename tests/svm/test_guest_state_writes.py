"""Every path by which the guest writes processor state either loads a value
VMRUN would accept or raises the architectural exception -- with the path's
intercept clear (the processor model and Unicorn execute it) and armed (the
default hypervisor handles the exit: it re-executes the instruction, or
emulates it as for WRMSR, as KVM does).

Each row of TABLE is one path and one value: the instruction, the expected
outcome from the manual (AMD APM vol. 2/3, section cited; KVM's behaviour
where the APM leaves a choice) and, for a value that loads, what the state
must hold afterwards.  After the write the guest makes a hypercall whose
handler touches the VMCB, which forces the next VMRUN to take every
consistency check of APM §15.5.1 on the state the guest left: a value that
should have faulted but loaded ends the run as invalid-vmcb.

Exceptions are reported by the conftest stubs: the run ends with EXIT(0x100 +
vector), RDX = the pushed RIP for vectors with an error code, RSI otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from conftest import BASE, VMMCALL, assemble, hc_exit, install_reporting_idt

DONE = 0x55
FULL_VMRUN = 0x77          # hypercall number whose handler dirties the VMCB
GP, UD = "gp", "ud"


@dataclass
class Row:
    id: str
    pre: str                  # setup
    insn: str                 # the state write under test
    arm: str                  # the intercept of the path ("" if none)
    exit: int | None          # its exit code (APM Table C-1)
    expect: str               # GP, UD, or "ok"
    apm: str                  # where the manual says so
    check: Callable | None = None     # for "ok": (machine) -> None, on the state after the run


def vmcb(field: str, value: int) -> Callable:
    def check(m):
        assert getattr(m.guest.vmcb, field) == value, f"{field} = {getattr(m.guest.vmcb, field):#x}, want {value:#x}"
    return check


def reg(name: str, value: int) -> Callable:
    def check(m):
        got = m.regs.__getattr__(name)
        assert got == value, f"{name} = {got:#x}, want {value:#x}"
    return check


TABLE = [
    # -- MOV DRn (APM vol. 3 "MOV DRn"; vol. 2 §13.1.1: DR6/DR7 bits 63:32 MBZ) -----------------
    Row("mov-dr6-bit32", "mov rax, 0x100000000", "mov dr6, rax", "dr6_write", 0x36, GP, "vol. 3 MOV DRn; vol. 2 §13.1.1"),
    Row("mov-dr6-bit63", "mov rax, 0x8000000000000000", "mov dr6, rax", "dr6_write", 0x36, GP, "vol. 2 §13.1.1"),
    Row("mov-dr4-alias-bit32", "mov rax, 0x100000000", "mov dr4, rax", "dr4_write", 0x34, GP,
        "vol. 2 §13.1.1: DR4 is DR6 while CR4.DE = 0"),
    Row("mov-dr7-bit32", "mov rax, 0x100000400", "mov dr7, rax", "dr7_write", 0x37, GP, "vol. 3 MOV DRn; vol. 2 §13.1.1"),
    Row("mov-dr5-alias-bit63", "mov rax, 0x8000000000000400", "mov dr5, rax", "dr5_write", 0x35, GP,
        "vol. 2 §13.1.1: DR5 is DR7 while CR4.DE = 0"),
    Row("mov-dr7-low-bits", "mov rax, 0xffffffff", "mov dr7, rax", "dr7_write", 0x37, "ok",
        "vol. 2 §13.1.1: bits 31:0 load; VMRUN checks 63:32 only", check=lambda m: _dr_upper_clear(m)),
    Row("mov-dr6-low-bits", "mov rax, 0xffffffff", "mov dr6, rax", "dr6_write", 0x36, "ok",
        "vol. 2 §13.1.1", check=lambda m: _dr_upper_clear(m)),
    Row("mov-dr0-any", "mov rax, 0x8000000000000000", "mov dr0, rax", "dr0_write", 0x30, "ok",
        "vol. 2 §13.1.1: DR0-DR3 hold any 64-bit address"),
    Row("mov-dr4-with-cr4-de", "mov rax, cr4\nor rax, 8\nmov cr4, rax\nxor eax, eax", "mov dr4, rax",
        "dr4_write", 0x34, UD, "vol. 3 MOV DRn: DR4/DR5 are #UD while CR4.DE = 1"),
]


def _dr_upper_clear(m):
    assert m.guest.vmcb.DR6 >> 32 == 0 and m.guest.vmcb.DR7 >> 32 == 0


def build(guest, row: Row, armed: bool):
    pre = row.pre
    rip = BASE + len(assemble(pre)) if pre else BASE
    src = (pre + "\n" if pre else "") + row.insn + f"\nmov eax, {FULL_VMRUN}\n{VMMCALL}\n" + hc_exit(DONE)
    m = guest(src)
    install_reporting_idt(m)
    if armed and row.arm:
        m.intercept(row.arm)
    default = m.handlers[0x81]

    def vmmcall(m, e):
        if m.regs.rax == FULL_VMRUN:
            m.guest.vmcb.CR2 = m.guest.vmcb.CR2     # the VMCB was written: the next VMRUN checks it all
            m.advance(e)
            return None
        return default(m, e)
    m.on(0x81)(vmmcall)
    return m, rip


@pytest.mark.parametrize("armed", [False, True], ids=["native", "intercepted"])
@pytest.mark.parametrize("row", TABLE, ids=[r.id for r in TABLE])
def test_guest_state_write(guest, row: Row, armed: bool):
    if armed and not row.arm:
        pytest.skip("no intercept for this path")
    m, rip = build(guest, row, armed)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit", (row.apm, r.reason, r.detail)
    if armed and row.exit is not None:
        assert m.counts.get(row.exit), f"the {row.arm} intercept did not exit"
    if row.expect == GP:
        assert (r.exit_code, r.regs["rdx"], r.regs["rsi"]) == (0x10D, rip, 0), \
            (row.apm, hex(r.exit_code), hex(r.regs["rdx"]))
    elif row.expect == UD:
        assert (r.exit_code, r.regs["rsi"]) == (0x106, rip), (row.apm, hex(r.exit_code))
    else:
        assert r.exit_code == DONE, (row.apm, hex(r.exit_code))
        if row.check is not None:
            row.check(m)
