"""MOV and POP of a null selector into FS or GS in 64-bit mode keep the segment's
hidden base on the modelled processor (an AMD family 17h part: Zen 3 reports the
clearing as CPUID Fn8000_0021_EAX[6] NullSelectorClearsBase; Linux's
detect_null_seg_behavior probes for it exactly this way: write FS_BASE, load a null
selector, read FS_BASE back).  QEMU's TCG clears the base.

The expected bases are the values the guest wrote itself; a non-null selector still
loads its descriptor's base (0 for the flat data segment), and an operand read that
faults raises its fault with nothing loaded."""
from __future__ import annotations

import pytest

from conftest import BASE, assemble, hc_exit, install_reporting_idt

GP, PF = 13, 14
FS_BASE, GS_BASE = 0xC000_0100, 0xC000_0101
MARK = 0x0000_7F12_3456_7000          # canonical (WRMSR of a non-canonical base is #GP)


def _set_base(msr: int, value: int = MARK) -> str:
    return f"mov ecx, {msr:#x}\nmov eax, {value & 0xFFFFFFFF:#x}\nmov edx, {value >> 32:#x}\nwrmsr\n"


def _read_base(msr: int, into: str) -> str:
    return f"mov ecx, {msr:#x}\nrdmsr\nshl rdx, 32\nor rax, rdx\nmov {into}, rax\n"


def _run(guest, body: str):
    m = guest(body + hc_exit(0x55))
    install_reporting_idt(m)
    r = m.run(timeout=20)
    return m, r


@pytest.mark.parametrize("msr,sreg,selector", [(FS_BASE, "fs", 0), (GS_BASE, "gs", 3)])
def test_mov_from_a_register_keeps_the_base(guest, msr, sreg, selector):
    """Selector 0, and 3 (index 0 with RPL 3: null too), moved into FS or GS."""
    src = _set_base(msr) + f"mov eax, {selector}\nmov {sreg}, ax\n" + _read_base(msr, "r8") + f"mov r9w, {sreg}\n"
    m, r = _run(guest, src)
    assert r.exit_code == 0x55, (r.reason, r.detail, r.exit_code)
    assert r.regs["r8"] == MARK
    assert r.regs["r9"] & 0xFFFF == selector


def test_pop_gs_keeps_the_base_and_pops_eight_bytes(guest):
    src = _set_base(GS_BASE) + "mov r10, rsp\npush 0\npop gs\nsub r10, rsp\n" + _read_base(GS_BASE, "r8")
    m, r = _run(guest, src)
    assert r.exit_code == 0x55, (r.reason, r.detail, r.exit_code)
    assert r.regs["r8"] == MARK
    assert r.regs["r10"] == 0                       # the POP took back what the PUSH stored


def test_pop_fs_with_a_16_bit_operand_pops_two_bytes(guest):
    # 66 6A 00: PUSH imm8 with a 16-bit operand (2 bytes); 66 0F A1: POP FS with a 16-bit operand
    src = (_set_base(FS_BASE) + "mov r10, rsp\n.byte 0x66, 0x6a, 0x00\n.byte 0x66, 0x0f, 0xa1\n"
           + _read_base(FS_BASE, "r8") + "sub r10, rsp\n")
    m, r = _run(guest, src)
    assert r.exit_code == 0x55, (r.reason, r.detail, r.exit_code)
    assert r.regs["r8"] == MARK
    assert r.regs["r10"] == 0


def test_mov_fs_from_memory_keeps_the_base(guest):
    src = (_set_base(FS_BASE) + "lea rbx, [rip + zero]\nmov fs, word ptr [rbx]\n" + _read_base(FS_BASE, "r8")
           + hc_exit(0x55) + "zero:\n.word 0\n")
    m = guest(src)
    install_reporting_idt(m)
    r = m.run(timeout=20)
    assert r.exit_code == 0x55, (r.reason, r.detail, r.exit_code)
    assert r.regs["r8"] == MARK


def test_a_non_null_selector_loads_its_descriptor(guest):
    """The image's flat data segment (the loader's GDT) has base 0: the load is QEMU's."""
    m = guest("nop\n")
    data_sel = m.guest.vmcb.seg("DS").selector
    assert data_sel & 0xFFFC
    src = _set_base(FS_BASE) + f"mov eax, {data_sel:#x}\nmov fs, ax\n" + _read_base(FS_BASE, "r8")
    m, r = _run(guest, src)
    assert r.exit_code == 0x55, (r.reason, r.detail, r.exit_code)
    assert r.regs["r8"] == 0


def test_a_faulting_operand_raises_its_fault_and_loads_nothing(guest):
    bad = 0x8000_0000_0000_0000                     # non-canonical: #GP(0)
    head = _set_base(FS_BASE) + f"mov rbx, {bad:#x}\n"
    m, r = _run(guest, head + "mov fs, word ptr [rbx]\n")
    assert r.exit_code == 0x100 + GP, (r.reason, r.detail, r.exit_code)
    assert m.regs.rsi == 0                                          # #GP(0): the error code, then
    assert m.regs.rdx == BASE + len(assemble(head))                 # the frame's RIP: at the MOV


def test_the_decoder_and_the_scan_take_only_the_fs_and_gs_loads():
    """8E /4 and /5 (MOV FS, MOV GS), 0F A1 and 0F A9 (POP FS, POP GS) -- APM vol. 3
    opcode map; 8E /3 is MOV DS and 8E /0 MOV ES."""
    from sandbox.svm import decode as D
    mov_fs = bytes.fromhex("8ee0")                      # mov fs, eax (ModRM 11 100 000)
    mov_gs_mem = bytes.fromhex("668e2b")                # mov gs, word [rbx] (ModRM 00 101 011)
    mov_ds = bytes.fromhex("8ed8")                      # mov ds, eax (reg 3)
    for code, reg, mod, length in ((mov_fs, 4, 3, 2), (mov_gs_mem, 5, 0, 3)):
        ins = D.decode(code + b"\x90" * 8)
        assert (ins.kind, ins.reg, ins.mod, ins.length) == (D.Kind.LOAD_FS_GS, reg, mod, length)
    assert D.decode(mov_ds + b"\x90" * 8) is None
    pop = D.decode(bytes.fromhex("0fa9") + b"\x90" * 8)
    assert (pop.kind, pop.reg, pop.opsize, pop.length) == (D.Kind.LOAD_FS_GS, 5, 64, 2)
    pop16 = D.decode(bytes.fromhex("660fa1") + b"\x90" * 8)
    assert (pop16.reg, pop16.opsize, pop16.length) == (4, 16, 3)
    one, two = D.opcode_starts({D.Kind.LOAD_FS_GS})
    page = bytearray(64)
    page[8:10] = mov_fs
    page[20:22] = mov_ds
    page[30:32] = bytes.fromhex("0fa1")
    assert D.scan(bytes(page), len(page), one, two) == [8, 30]


# -- what the model must still raise when it carries the load out -------------------------------
AC, UD = 17, 6
RFLAGS_AC = CR0_AM = 1 << 18


def _user(guest, body: str):
    from conftest import user_guest
    m = user_guest(guest, body, rflags=0x2 | RFLAGS_AC)
    m.guest.vmcb.CR0 |= CR0_AM
    return m.run(timeout=20)


def test_a_misaligned_pop_fs_at_cpl_3_is_ac(guest):
    """CPL 3, CR0.AM, RFLAGS.AC: POP FS from an RSP that is 4 mod 8 is #AC(0) (APM vol. 2
    §8.2.18), not a completed load; a POP RAX from the same slot is the control."""
    for pop in ("pop fs", "pop rax"):
        r = _user(guest, f"push 0\nsub rsp, 4\nmov dword ptr [rsp], 0\n{pop}")
        assert r.exit_code == 0x100 + AC, (pop, r.reason, r.detail, r.exit_code)


def test_a_misaligned_mov_fs_operand_at_cpl_3_is_ac(guest):
    from conftest import DATA
    r = _user(guest, f"mov rbx, {DATA + 1:#x}\nmov fs, word ptr [rbx]")
    assert r.exit_code == 0x100 + AC, (r.reason, r.detail, r.exit_code)


def test_lock_on_mov_fs_or_pop_fs_is_ud(guest):
    """APM vol. 3 §1.2.5: LOCK on an instruction that is not lockable is #UD."""
    for body in ("xor eax, eax\n.byte 0xf0, 0x8e, 0xe0\n", "push 0\n.byte 0xf0, 0x0f, 0xa1\n"):
        m, r = _run(guest, body)
        assert r.exit_code == 0x100 + UD, (body, r.reason, r.detail, r.exit_code)
