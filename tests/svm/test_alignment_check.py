"""Alignment checking (APM vol. 2 §8.2.18, SDM vol. 3 §6.15): #AC(0) for a 2-, 4- or
8-byte data access not aligned to its size, at CPL 3 with CR0.AM and RFLAGS.AC set,
before the instruction changes anything.  Unicorn (QEMU TCG) never raises it.

The guest runs its body at CPL 3 (conftest.user_guest); every vector has a reporting
stub that ends the run with EXIT(0x100 + vector), RSI = the error code and RDX = the
faulting RIP from the exception frame (R10 = the RFLAGS there).  The cases' outcomes follow from the rules
above, not from the model."""
from __future__ import annotations

import pytest

from conftest import DATA, assemble, user_code_addr, user_guest

AC, DONE = 17, 0x55
RFLAGS_AC = 1 << 18
CR0_AM = 1 << 18


def run(guest, body: str, am: bool = True, ac: bool = True):
    m = user_guest(guest, body, rflags=0x2 | (RFLAGS_AC if ac else 0))
    if am:
        m.guest.vmcb.CR0 |= CR0_AM
    r = m.run(timeout=20)
    return m, r


@pytest.mark.parametrize("body,faults", [
    (f"mov rbx, {DATA + 1:#x}\nmov rax, [rbx]", True),          # 8 bytes at an odd address
    (f"mov rbx, {DATA + 4:#x}\nmov rax, [rbx]", True),          # 8 bytes 4-aligned
    (f"mov rbx, {DATA + 8:#x}\nmov rax, [rbx]", False),
    (f"mov rbx, {DATA + 2:#x}\nmov eax, [rbx]", True),          # 4 bytes 2-aligned
    (f"mov rbx, {DATA + 1:#x}\nmov ax, [rbx]", True),           # a word at an odd address
    (f"mov rbx, {DATA + 2:#x}\nmov ax, [rbx]", False),
    (f"mov rbx, {DATA + 1:#x}\nmov al, [rbx]", False),          # a byte is always aligned
    (f"mov rbx, {DATA + 3:#x}\nmov dword ptr [rbx], 1", True),  # a store
    (f"mov rbx, {DATA:#x}\nmov rcx, 3\nadd qword ptr [rbx + rcx*2 + 2], 1", False),   # 8 = aligned
    (f"mov rbx, {DATA:#x}\nmov rcx, 3\nadd qword ptr [rbx + rcx*2 + 1], 1", True),    # 7
    (f"mov rbx, {DATA:#x}\nlea rax, [rbx + 1]", False),           # LEA reads no memory
    ("sub rsp, 4\npush rax", True),                               # the push's slot is RSP-12
    ("sub rsp, 8\npush rax\npop rax", False),
])
def test_misaligned_access_at_cpl3_is_ac(guest, body, faults):
    m, r = run(guest, body)
    if faults:
        assert r.reason == "guest-exit" and r.exit_code == 0x100 + AC, (r.reason, r.detail, r.exit_code)
        assert m.regs.rsi == 0                              # #AC's error code is 0
    else:
        assert r.exit_code == DONE, (r.reason, r.detail, r.exit_code)


def test_ac_frame_points_at_the_instruction_and_nothing_was_written(guest):
    body = f"mov rbx, {DATA + 1:#x}\nmov qword ptr [rbx], -1"
    m, r = run(guest, body)
    assert r.exit_code == 0x100 + AC
    # (user_code_addr assumes the IRETQ frame's RFLAGS pushed as 2: ours is longer to encode)
    longer = len(assemble(f"push {0x2 | RFLAGS_AC:#x}")) - len(assemble("push 0x2"))
    assert m.regs.rdx == user_code_addr(f"mov rbx, {DATA + 1:#x}") + longer   # a fault: RIP of the store
    assert m.regs.r10 & RFLAGS_AC
    assert m.guest.read_phys(DATA, 16) == bytes(16)                      # the store did not happen


@pytest.mark.parametrize("am,ac", [(False, True), (True, False)])
def test_no_ac_without_both_cr0_am_and_rflags_ac(guest, am, ac):
    _, r = run(guest, f"mov rbx, {DATA + 1:#x}\nmov rax, [rbx]", am=am, ac=ac)
    assert r.exit_code == DONE


def test_no_ac_at_cpl0(guest):
    m = guest(f"pushfq\nor qword ptr [rsp], {RFLAGS_AC:#x}\npopfq\nmov rbx, {DATA + 1:#x}\nmov rax, [rbx]\n"
              "mov edi, 0x55\nxor eax, eax\n.byte 0x0f, 0x01, 0xd9\n")
    m.guest.vmcb.CR0 |= CR0_AM
    assert m.run(timeout=20).exit_code == DONE


def test_ac_intercepted_is_an_exception_exit(guest):
    m = user_guest(guest, f"mov rbx, {DATA + 1:#x}\nmov rax, [rbx]", rflags=0x2 | RFLAGS_AC)
    m.guest.vmcb.CR0 |= CR0_AM
    m.intercept("excp17")
    r = m.run(timeout=20)
    assert r.counts.get(0x40 + AC) == 1 and m.guest.vmcb.EXITINFO1 == 0
