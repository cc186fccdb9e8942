"""Processor-model fixes found by booting kvm-unit-tests (multiboot kernels).

* QEMU keeps a "contributory exception in flight" (env->old_exception) that
  it resets only when it delivers an event itself; the model delivers, so a
  #PF the guest handled made QEMU turn a later #DE into #DF (SDM vol. 3A
  Table 6-5: #DE after a *completed* #PF delivery is just #DE).
* UMIP (APM vol. 2 §3.1.3, CR4 bit 11): SGDT/SIDT/SLDT/STR at CPL > 0 raise
  #GP; Unicorn does not implement it, the model does for instructions that
  reach it (their intercept armed).
"""
from __future__ import annotations

from sandbox import ExitCode

from conftest import IDT_BASE, asm_set_gate, hc_exit, install_reporting_idt, user_guest


def test_de_after_a_handled_pf_is_de_not_df(guest):
    src = f"""
        {asm_set_gate(IDT_BASE, 14, 'pf_handler')}
        mov al, byte ptr [0x400000]
        xor edx, edx
        xor ecx, ecx
        mov eax, 1
        div ecx
        {hc_exit(0x55)}
    pf_handler:
        add qword ptr [rsp + 8], 7
        add rsp, 8
        iretq
    """
    m = guest(src)                              # 2 MiB of RAM: 0x400000 is not mapped
    install_reporting_idt(m)
    r = m.run()
    assert r.exit_code == 0x100 + 0, hex(r.exit_code or 0)     # #DE, not #DF (0x108)


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
