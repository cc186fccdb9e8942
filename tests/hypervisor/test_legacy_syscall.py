"""SYSCALL and SYSENTER in legacy mode (32-bit protected mode, paging off), from a
multiboot kernel -- the other half of ``tests/svm/test_fast_syscall.py``.

APM vol. 3: in legacy mode SYSCALL saves the next EIP in ECX, clears
RFLAGS.VM, IF and RF, loads CS = STAR[47:32] and SS = STAR[47:32] + 8 as flat
32-bit segments of DPL 0 and jumps to STAR[31:0]; SYSENTER loads CS =
SYSENTER_CS, SS = SYSENTER_CS + 8, ESP = SYSENTER_ESP, EIP = SYSENTER_EIP and
clears VM, IF and RF, and is #GP(0) with a null SYSENTER_CS.
"""
from __future__ import annotations

from sandbox.svm.exitcodes import ExitCode, excp

from test_multiboot import LOAD, asm32, elf32, machine

ENTRY = LOAD + 0x400          # where the kernel's entry code is placed
CAPTURE = """
    mov ebx, ecx
    pushfd
    pop esi
    mov edi, cs
    mov ebp, ss
    mov edx, esp
    cpuid
"""


def _kernel(tmp_path, head: str) -> tuple[str, int]:
    """``head`` at the multiboot entry, CAPTURE at ENTRY; the address after ``head``."""
    code = asm32(head, LOAD + 12)
    body = code.ljust(ENTRY - LOAD - 12, b"\x90") + asm32(CAPTURE, ENTRY)
    p = tmp_path / "k.elf"
    p.write_bytes(elf32(body))
    return str(p), LOAD + 12 + len(code)


def _run(path: str) -> tuple:
    """A machine that stops at the entry's CPUID, and what it will have seen there."""
    m = machine()
    m.load(path)
    seen = {}

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        r = m.regs
        seen.update(ebx=r.rbx, esi=r.rsi, edi=r.rdi, ebp=r.rbp, edx=r.rdx, rip=e.rip)
        return m.stop("seen")
    return m, seen


def _entered(path: str) -> dict:
    """Run to the entry's CPUID: the registers CAPTURE kept, checked to have got there
    with IF clear and the flat kernel CS 08h and SS 10h loaded."""
    m, seen = _run(path)
    m.run()
    assert seen["rip"] == ENTRY + len(asm32(CAPTURE.replace("cpuid", ""), ENTRY))
    assert not seen["esi"] & (1 << 9)                 # IF cleared (STI had set it)
    assert (seen["edi"], seen["ebp"]) == (0x08, 0x10)
    return seen


def test_syscall_in_legacy_mode(tmp_path):
    head = f"""
        mov esp, 0x7000
        mov ecx, 0xc0000080
        rdmsr
        or eax, 1
        wrmsr
        mov ecx, 0xc0000081
        mov eax, {ENTRY}
        mov edx, 0x00180008
        wrmsr
        sti
        syscall
    """
    path, after = _kernel(tmp_path, head)
    seen = _entered(path)
    assert seen["ebx"] == after                       # ECX: the instruction after SYSCALL
    assert seen["edx"] == 0x7000                      # the stack is left alone


def test_sysenter_in_legacy_mode(tmp_path):
    head = f"""
        mov esp, 0x7000
        mov ecx, 0x174
        mov eax, 0x08
        xor edx, edx
        wrmsr
        mov ecx, 0x175
        mov eax, 0x6000
        wrmsr
        mov ecx, 0x176
        mov eax, {ENTRY}
        wrmsr
        sti
        sysenter
    """
    path, _ = _kernel(tmp_path, head)
    seen = _entered(path)
    assert seen["edx"] == 0x6000                      # ESP = SYSENTER_ESP


def test_sysenter_with_a_null_sysenter_cs_is_gp(tmp_path):
    path, after = _kernel(tmp_path, "mov esp, 0x7000\nsysenter\n")
    m, seen = _run(path)
    m.intercept("excp13")
    gp = []
    m.on(excp(13))(lambda m, e: (gp.append((e.rip, e.exitinfo1)), m.stop("gp"))[1])
    m.run()
    assert gp == [(after - 2, 0)]
