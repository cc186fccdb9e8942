"""The hypervisor's side of AVIC (``enable_avic`` on the PC platform): trapped
writes replayed into the APIC model, faulting accesses emulated, incomplete
IPIs sent by the APIC model, the APIC timer's interrupts delivered through
the backing page.

Expected values: the SDM's xAPIC (SVR software enable bit 8, §11.4.7.2; LDR
bits 31:24 and the flat model, §11.6.2.2; the timer's one-shot mode, §11.5.4;
NMI delivery mode 4, §11.6.1) and the APM's AVIC (the SVR write traps, the
current count read faults, an NMI IPI is AVIC_INCOMPLETE_IPI cause 0; the
logical table's entry for a flat logical ID bit b is index b, holding the
guest physical APIC ID with bit 31 valid).
"""
from __future__ import annotations

import struct

from sandbox import Machine
from sandbox.hypervisor.avic import enable_avic
from sandbox.svm.exitcodes import ExitCode
from sandbox.svm.stop import StopReason

DATA = 0x1C0000
VEC = 0x41
TIMER_VEC = 0x42

# the guest maps the xAPIC page (PDPT[3] -> a PD with a 2 MiB PCD/PWT page), installs
# IDT gates for VEC and TIMER_VEC (each handler counts into DATA + 8 / + 16 and writes EOI)
PRELUDE = f"""
    mov rdi, 0x70000
    xor eax, eax
    mov ecx, 512
clear_pd:
    mov qword ptr [rdi], rax
    add rdi, 8
    dec ecx
    jnz clear_pd
    mov rax, 0xFEE0009B
    mov rdi, 0x70000 + 0x1F7 * 8
    mov qword ptr [rdi], rax
    mov rax, cr3
    and rax, -4096
    mov rax, qword ptr [rax]
    and rax, -4096
    mov rdx, 0x70003
    mov qword ptr [rax + 24], rdx
    mov rax, cr3
    mov cr3, rax
    lea rax, [rip + h1]
    mov rdi, 0x60000 + {VEC} * 16
    call gate
    lea rax, [rip + h2]
    mov rdi, 0x60000 + {TIMER_VEC} * 16
    call gate
    sub rsp, 16
    mov word ptr [rsp], 4095
    mov qword ptr [rsp + 2], 0x60000
    lidt [rsp]
    add rsp, 16
    mov rbx, 0xFEE00000
    mov rsi, {DATA:#x}
    jmp body
gate:
    mov word ptr [rdi], ax
    mov word ptr [rdi + 2], 0x08
    mov word ptr [rdi + 4], 0x8E00
    shr rax, 16
    mov word ptr [rdi + 6], ax
    shr rax, 16
    mov dword ptr [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    ret
h1:
    inc qword ptr [rsi + 8]
    mov dword ptr [rbx + 0xB0], 0
    iretq
h2:
    inc qword ptr [rsi + 16]
    mov dword ptr [rbx + 0xB0], 0
    iretq
body:
"""
DONE = "xor eax, eax\nout 0xF4, al\nhlt\n"


def pc_guest(tmp_path, body: str):
    m = Machine(dram=32 << 20, ram=4 << 20, platform="pc")
    p = tmp_path / "avic_guest.S"
    p.write_text(PRELUDE + body + "\n" + DONE)
    m.load(str(p))
    return m, enable_avic(m)


def q(m, i):
    return struct.unpack("<Q", m.guest.read_phys(DATA + 8 * i, 8))[0]


def test_svr_write_traps_and_enables_the_apic_model(tmp_path):
    m, av = pc_guest(tmp_path, "mov dword ptr [rbx + 0xF0], 0x1FF")
    assert not m.platform.apic.software_enabled
    r = m.run(timeout=30)
    assert r.reason == StopReason.GUEST_EXIT and r.exit_code == 0
    assert r.counts.get(ExitCode.AVIC_NOACCEL) == 1 and av.stats["noaccel_trap"] == 1
    assert m.platform.apic.software_enabled and m.platform.apic.svr == 0x1FF
    assert ExitCode.NPF not in r.counts


def test_ldr_write_fills_the_logical_table(tmp_path):
    m, av = pc_guest(tmp_path, "mov dword ptr [rbx + 0xD0], 0x04000000")     # logical ID bit 2, flat model
    r = m.run(timeout=30)
    assert r.exit_code == 0
    entry = struct.unpack("<I", bytes(m.mem.view[av.logical_hpa + 8:av.logical_hpa + 12]))[0]
    assert entry == (1 << 31) | m.platform.apic.apic_id


def test_current_count_read_faults_and_is_served_by_the_apic_model(tmp_path):
    """One-shot timer with a huge count: the current count read is nonzero and at most the initial count."""
    m, av = pc_guest(tmp_path, """
    mov dword ptr [rbx + 0xF0], 0x1FF
    mov dword ptr [rbx + 0x320], 0x10042
    mov dword ptr [rbx + 0x3E0], 0xB
    mov dword ptr [rbx + 0x380], 0x7FFFFFFF
    mov eax, dword ptr [rbx + 0x390]
    mov qword ptr [rsi], rax
    """)
    r = m.run(max_insns=1 << 40, timeout=30)
    assert r.exit_code == 0
    assert 0 < q(m, 0) <= 0x7FFFFFFF
    assert av.stats["noaccel_fault"] == 1


def test_apic_timer_interrupt_reaches_the_guest_through_the_backing_page(tmp_path):
    m, av = pc_guest(tmp_path, f"""
    mov dword ptr [rbx + 0xF0], 0x1FF
    mov dword ptr [rbx + 0x3E0], 0xB
    mov dword ptr [rbx + 0x320], {TIMER_VEC:#x}
    mov dword ptr [rbx + 0x380], 20000
    sti
wait:
    pause
    cmp qword ptr [rsi + 16], 1
    jb wait
    cli
    """)
    r = m.run(max_insns=1 << 40, timeout=30)
    assert r.exit_code == 0 and q(m, 2) == 1
    assert m.platform.injected["intr"] == 0                     # not through EVENTINJ
    assert m.cpu.avic.stats.delivered == 1


def test_nmi_ipi_is_sent_by_the_apic_model(tmp_path):
    m, av = pc_guest(tmp_path, "mov dword ptr [rbx + 0xF0], 0x1FF\nmov dword ptr [rbx + 0x300], 0x40400")
    r = m.run(timeout=30)          # (the guest has no NMI handler: how the run ends does not matter)
    assert r.counts.get(ExitCode.AVIC_INCOMPLETE_IPI) == 1 and av.stats["incomplete_ipi"] == 1
    assert m.platform.injected["nmi"] == 1
