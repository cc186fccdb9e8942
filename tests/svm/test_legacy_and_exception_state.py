"""Processor-model fixes found by booting kvm-unit-tests (multiboot kernels).

* QEMU keeps a "contributory exception in flight" (env->old_exception) that
  it resets only when it delivers an event itself; the model delivers, so
  after one #DE the guest handled, QEMU turned the next #DE into #DF (SDM
  vol. 3A Table 6-5 combines exceptions only while one is being delivered).
* UMIP (APM vol. 2 §3.1.3, CR4 bit 11): SGDT/SIDT/SLDT/STR at CPL > 0 raise
  #GP; Unicorn does not implement it, the model does for instructions that
  reach it (their intercept armed).
"""
from __future__ import annotations

from sandbox import ExitCode

from conftest import IDT_BASE, asm_set_gate, hc_exit, install_reporting_idt, user_guest


def test_second_de_after_a_handled_de_is_de_not_df(guest):
    src = f"""
        {asm_set_gate(IDT_BASE, 0, 'de_handler')}
        xor edx, edx
        xor ecx, ecx
        mov eax, 1
        div ecx
        {asm_set_gate(IDT_BASE, 0, 'de_stub')}
        xor edx, edx
        mov eax, 1
        div ecx
        {hc_exit(0x55)}
    de_handler:
        add qword ptr [rsp], 2
        iretq
    de_stub:
        {hc_exit(0x100)}
    """
    m = guest(src)
    install_reporting_idt(m, vectors=[8])
    r = m.run()
    assert r.exit_code == 0x100, hex(r.exit_code or 0)       # #DE again, not #DF (0x108)


def test_umip_gp_at_cpl3_when_the_instruction_reaches_the_model(guest):
    m = user_guest(guest, "sgdt [0x1C0000]")
    m.guest.vmcb.CR4 = m.guest.vmcb.CR4 | (1 << 11)
    m.guest.vmcb.set_intercept(ExitCode.GDTR_READ)
    r = m.run()
    assert r.exit_code == 0x100 + 13 and r.counts.get(ExitCode.GDTR_READ, 0) == 0   # #GP, no exit


def test_umip_off_sgdt_at_cpl3_exits_on_its_intercept(guest):
    m = user_guest(guest, "sgdt [0x1C0000]")
    m.guest.vmcb.set_intercept(ExitCode.GDTR_READ)
    seen = []
    m.on(ExitCode.GDTR_READ)(lambda m, e: seen.append(e.rip) or m.stop("seen"))
    m.run()
    assert len(seen) == 1
