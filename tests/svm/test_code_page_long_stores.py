"""A code page the guest keeps storing to (data beside code, as kvm-unit-tests' boot
code shares a page with its test table) is writable while the guest stores to it;
running it again must scan it anew, so an armed instruction written into it in a
long run of stores still exits (the intercept soundness rule)."""
from __future__ import annotations

from conftest import BASE, assemble, capture, hc_exit

from sandbox.svm.exitcodes import ExitCode


COUNTER, SLOT = BASE + 0x800, BASE + 0x900      # both on the code's own page


def test_armed_instruction_written_after_a_long_run_of_stores_exits(guest):
    src = f"""
    mov rbx, {COUNTER:#x}
    mov ecx, 500
again:
    inc qword ptr [rbx]
    dec ecx
    jnz again
    mov rdi, {SLOT:#x}
    mov word ptr [rdi], 0xa20f
    mov rax, {SLOT:#x}
    jmp rax
    """
    m = guest(src)
    m.guest.write_phys(SLOT, bytes([0x90, 0x90]) + assemble(hc_exit(0x77), SLOT + 2))
    recs = capture(m, ExitCode.CPUID)
    r = m.run(timeout=30)
    assert recs, (r.reason, r.detail, r.exit_code)
    assert recs[0].rip == SLOT                    # the CPUID written while the page was data
    assert int.from_bytes(m.guest.read_phys(COUNTER, 8), "little") == 500
