"""Multiboot kernels (ELF32) and the PC platform's interrupt path, end to end.

A multiboot kernel is entered as the Multiboot Specification 0.6.96 §3.2
says: 32-bit protected mode, paging off, EAX = 0x2BADB002, EBX = the
information structure (§3.3).  The kernels here are assembled by keystone
in 32-bit mode and wrapped in a minimal ELF32 file built by the test.
"""
from __future__ import annotations

import struct

import pytest
from keystone import KS_ARCH_X86, KS_MODE_32, KS_MODE_64, Ks

from sandbox import Machine
from sandbox.hypervisor.loader import ImageError
from sandbox.svm.exitcodes import ExitCode
from sandbox.svm.stop import StopReason

from conftest import asm_set_gate

LOAD = 0x200000
MB_FLAGS = 0x3                               # page-align modules, memory info


def elf32(code: bytes, entry: int = LOAD, header: bool = True, flags: int = MB_FLAGS,
          machine: int = 3) -> bytes:
    """An ELF32 executable with one PT_LOAD at LOAD holding [multiboot header] + code."""
    mb = struct.pack("<III", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF) if header else b""
    body = mb + code
    ehdr = struct.pack("<16sHHIIIIIHHHHHH", b"\x7fELF\x01\x01\x01" + bytes(9), 2, machine, 1,
                       entry + len(mb), 52, 0, 0, 52, 32, 1, 0, 0, 0)
    phdr = struct.pack("<IIIIIIII", 1, 0x1000, LOAD, LOAD, len(body), len(body) + 0x1000, 7, 0x1000)
    return (ehdr + phdr).ljust(0x1000, b"\x00") + body


def asm32(src: str, base: int) -> bytes:
    enc, _ = Ks(KS_ARCH_X86, KS_MODE_32).asm(src, base)
    return bytes(enc)


def kernel(tmp_path, src32: str, name: str = "k.elf") -> str:
    code = asm32(src32, LOAD + 12)
    p = tmp_path / name
    p.write_bytes(elf32(code))
    return str(p)


def machine(**kw) -> Machine:
    return Machine(dram=48 << 20, ram=32 << 20, **kw)


# ------------------------------------------------------------------- entry state
def test_entry_state_is_the_multiboot_machine_state(tmp_path):
    m = machine()
    m.load(kernel(tmp_path, "cpuid\nhlt"), append="a b")
    seen = {}

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        v = m.guest.vmcb
        seen.update(eax=v.RAX, ebx=m.regs.rbx, cr0=v.CR0, efer=v.EFER, cs=v.seg("CS"), ds=v.seg("DS"),
                    rflags=v.RFLAGS)
        return m.stop("seen")
    m.run()
    assert seen["eax"] == 0x2BADB002
    assert seen["cr0"] & 1 and not seen["cr0"] & (1 << 31)          # PE = 1, PG = 0
    assert not seen["efer"] & (1 << 8) and not seen["efer"] & (1 << 10)   # LME = LMA = 0
    cs, ds = seen["cs"], seen["ds"]
    assert cs.base == 0 and cs.limit == 0xFFFFFFFF and cs.attrib & 0x400 and not cs.attrib & 0x200  # D=1, L=0
    assert cs.attrib & 0x8                                          # code segment
    assert ds.base == 0 and ds.limit == 0xFFFFFFFF and not ds.attrib & 0x8
    assert not seen["rflags"] & (1 << 9)                            # IF = 0
    mbi = m.guest.read_phys(seen["ebx"], 0x48)
    flags, mem_lower, mem_upper, _, cmdline = struct.unpack_from("<IIIII", mbi)
    assert flags & 1 and flags & (1 << 2) and flags & (1 << 6)
    assert mem_lower == 639 and mem_upper == (32 << 20) // 1024 - 1024   # KiB above 1 MiB
    text = m.guest.read_phys(cmdline, 256).split(b"\0")[0]
    assert text.endswith(b"k.elf a b")                              # kernel path first, as QEMU
    mmap_len, mmap_addr = struct.unpack_from("<II", mbi, 44)
    entries = [struct.unpack_from("<IQQI", m.guest.read_phys(mmap_addr + i, 24)) for i in range(0, mmap_len, 24)]
    assert (20, 0x100000, (32 << 20) - 0x100000, 1) in entries      # all of RAM above 1 MiB is usable


def test_32bit_code_runs_and_enters_long_mode_itself(tmp_path):
    """The kernel builds 4-level tables, sets PAE, EFER.LME and CR0.PG and
    far-jumps to a 64-bit code segment, all under the VMCB and NPT."""
    pml4, pdpt, pd = 0x300000, 0x301000, 0x302000
    code64_at = LOAD + 0x800
    far = b"\xea" + struct.pack("<IH", code64_at, 0x18)          # jmp far 0x18:code64_at
    far_jmp = ".byte " + ",".join(str(b) for b in far)
    src = f"""
        mov esp, 0x7000
        lgdt [{LOAD + 0x700}]
        mov dword ptr [{pml4}], {pdpt | 3}
        mov dword ptr [{pdpt}], {pd | 3}
        mov dword ptr [{pd}], 0x83
        mov dword ptr [{pd + 8}], 0x200083
        mov eax, cr4
        or eax, 0x20
        mov cr4, eax
        mov eax, {pml4}
        mov cr3, eax
        mov ecx, 0xc0000080
        rdmsr
        or eax, 0x100
        wrmsr
        mov eax, cr0
        or eax, 0x80000001
        mov cr0, eax
        {far_jmp}
    """
    code = asm32(src, LOAD + 12).ljust(0x700 - 12, b"\x90")
    gdt_at = LOAD + 0x710
    code += struct.pack("<HI", 31, gdt_at).ljust(0x10, b"\0")
    code += struct.pack("<4Q", 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x00AF9B000000FFFF)
    code = code.ljust(0x800 - 12, b"\x90")
    enc, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm("mov rax, 0x123456789\ncpuid\nhlt", code64_at)
    code += bytes(enc)
    p = tmp_path / "lm.elf"
    p.write_bytes(elf32(code))
    m = machine()
    m.load(str(p))
    seen = {}

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        seen.update(efer=m.guest.vmcb.EFER, cs=m.guest.vmcb.seg("CS"), rip=e.rip)
        return m.stop("seen")
    m.run()
    assert seen["efer"] & (1 << 10)                 # LMA
    assert seen["cs"].attrib & 0x200                # 64-bit code segment
    assert seen["rip"] == code64_at + 10            # after the 10-byte movabs


# ------------------------------------------------------------------ bad input
def test_elf32_without_multiboot_header_is_an_image_error(tmp_path):
    p = tmp_path / "plain.elf"
    p.write_bytes(elf32(asm32("hlt", LOAD), header=False))
    with pytest.raises(ImageError, match="multiboot header"):
        machine().load(str(p))


def test_multiboot_image_larger_than_ram_is_an_image_error(tmp_path):
    p = kernel(tmp_path, "hlt")
    with pytest.raises(ImageError, match="does not fit"):
        Machine(dram=8 << 20, ram=2 << 20).load(p)


def test_video_mode_flag_is_refused(tmp_path):
    p = tmp_path / "video.elf"
    p.write_bytes(elf32(asm32("hlt", LOAD + 12), flags=MB_FLAGS | 4))
    with pytest.raises(ImageError, match="video"):
        machine().load(str(p))


def test_cli_bad_multiboot_input_exits_2(tmp_path, capsys):
    from sandbox.cli import main
    p = tmp_path / "plain.elf"
    p.write_bytes(elf32(asm32("hlt", LOAD), header=False))
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multiboot header" in err[0]


# ------------------------------------------------------------- PC platform
def test_debug_exit_ends_the_run_with_the_written_code(tmp_path):
    m = machine(platform="pc")
    m.load(kernel(tmp_path, "mov eax, 3\nout 0xf4, eax\nhlt"))
    r = m.run()
    assert r.reason == StopReason.GUEST_EXIT and r.exit_code == 3
    assert m.platform.debug_exit.status == 7          # QEMU: (3 << 1) | 1


def test_cli_exit_status_follows_debug_exit(tmp_path):
    from sandbox.cli import main
    ok = kernel(tmp_path, "xor eax, eax\nout 0xf4, eax\nhlt", "ok.elf")
    bad = kernel(tmp_path, "mov eax, 1\nout 0xf4, eax\nhlt", "bad.elf")
    assert main(["run", ok, "--quiet", "--ram", "32"]) == 0      # wrote 0: QEMU status 1, success
    assert main(["run", bad, "--quiet", "--ram", "32"]) == 1


def test_fw_cfg_reports_ram_and_cmdline(tmp_path):
    # select FW_CFG_RAM_SIZE (3) with a 16-bit OUT, read 4 bytes, exit with bits 27:20 of it
    src = """
        mov dx, 0x510
        mov ax, 3
        out dx, ax
        mov dx, 0x511
        xor ebx, ebx
        in al, dx
        in al, dx
        in al, dx
        movzx ebx, al
        in al, dx
        movzx eax, al
        shl eax, 8
        or eax, ebx
        shr eax, 4
        out 0xf4, eax
    """
    m = machine(platform="pc")
    m.load(kernel(tmp_path, src))
    assert m.run().exit_code == (32 << 20) >> 20      # 32 MiB in MiB
    assert m.platform.fw_cfg.items[0x15] == b"\x00"   # no -append: empty command line


IDT = 0x60000
IDTR = 0x70000
APIC_PT = 0x7A000                                   # page tables the test adds for the xAPIC page


def lm_guest(tmp_path, body: str, handler: str, vector: int = 0x40, map_apic: bool = False):
    """A long-mode .S guest (the loader's entry state) on the PC platform, with
    an IDT gate for ``vector``; it ends by writing R12 to isa-debug-exit."""
    src = f"""
        {asm_set_gate(IDT, vector, 'handler')}
        mov word ptr [{IDTR}], 0xfff
        mov qword ptr [{IDTR + 2}], {IDT}
        lidt [{IDTR}]
        xor r12, r12
        {body}
        mov eax, r12d
        out 0xf4, eax
        hlt
    handler:
        {handler}
        iretq
    """
    p = tmp_path / "g.S"
    p.write_text(src)
    m = Machine(platform="pc")
    m.load(str(p))
    if map_apic:
        # identity-map the xAPIC page in the loader's tables (PML4 at 0x2000), as a kernel would
        from sandbox.memory.paging import TableBuilder
        nxt = [APIC_PT]

        def alloc():
            a = nxt[0]
            nxt[0] += 0x1000
            m.guest.write_phys(a, bytes(0x1000))
            return a
        rd = lambda a: struct.unpack("<Q", m.guest.read_phys(a, 8))[0]
        wr = lambda a, v: m.guest.write_phys(a, struct.pack("<Q", v))
        TableBuilder(0x2000, alloc, rd, wr).map(0xFEE00000, 0xFEE00000, user=False, execute=False)
    return m


X2APIC_ON = """
        mov ecx, 0x1b
        rdmsr
        or eax, 0xc00
        wrmsr
        mov ecx, 0x80f
        mov eax, 0x1ff
        xor edx, edx
        wrmsr
"""
X2_EOI = "inc r12\nmov ecx, 0x80b\nxor eax, eax\nxor edx, edx\nwrmsr"


def test_self_ipi_with_interrupts_off_waits_for_the_window(tmp_path):
    """IF = 0 at the IPI: the hypervisor asks for an interrupt window (V_IRQ +
    VINTR intercept, APM §15.21.4); STI's shadow covers the NOP, so VMEXIT_VINTR
    comes after it and the vector is injected with EVENTINJ there."""
    body = X2APIC_ON + """
        cli
        mov ecx, 0x83f
        mov eax, 0x40
        xor edx, edx
        wrmsr
        sti
        nop
        cli
    """
    m = lm_guest(tmp_path, body, X2_EOI)
    r = m.run()
    assert r.exit_code == 1, r.detail
    assert r.counts.get(ExitCode.VINTR) == 1
    assert m.platform.injected["intr"] == 1 and m.platform.apic.isr == 0


def test_self_ipi_blocked_by_tpr_until_cr8_lowers_it(tmp_path):
    body = X2APIC_ON + """
        mov eax, 15
        mov cr8, rax
        mov ecx, 0x83f
        mov eax, 0x40
        xor edx, edx
        sti
        wrmsr
        nop
        mov r13, r12
        xor eax, eax
        mov cr8, rax
        nop
        add r12, r13
        add r12, r13
    """
    m = lm_guest(tmp_path, body, X2_EOI)
    r = m.run()
    assert r.exit_code == 1                          # not taken under TPR 15 (r13 = 0), taken after
    assert r.counts.get(ExitCode.CR8_WRITE) == 2


def test_nmi_ipi_is_injected_as_nmi(tmp_path):
    body = X2APIC_ON + """
        mov ecx, 0x830
        mov eax, 0x40400
        xor edx, edx
        wrmsr
        nop
    """
    m = lm_guest(tmp_path, body, "inc r12", vector=2)
    r = m.run()
    assert r.exit_code == 1 and m.platform.injected["nmi"] == 1
    assert r.counts.get(ExitCode.IRET) == 1          # the NMI handler's IRET ends NMI blocking


def test_smi_ipi_is_taken_without_a_trace_in_the_guest(tmp_path):
    """An SMI to self (ICR delivery mode 010b): the processor takes it -- SMM, which
    the model does not enter, as a firmware handler that returns at once -- and the
    guest goes on; nothing is injected into it (no vector, no NMI)."""
    body = X2APIC_ON + """
        mov ecx, 0x830
        mov eax, 0x40200
        xor edx, edx
        wrmsr
        nop
        mov r12, 5
    """
    m = lm_guest(tmp_path, body, "inc r12", vector=2)
    r = m.run()
    assert r.exit_code == 5, r.detail
    assert m.platform.injected["smi"] == 1 and m.platform.injected["nmi"] == 0
    assert not m.platform.apic.smi_pending and r.counts.get(ExitCode.IRET) is None


def test_xapic_one_shot_timer_wakes_hlt(tmp_path):
    """The one-shot timer through the xAPIC MMIO window (VMEXIT_NPF, emulated):
    HLT with IF = 1 lets guest time run to the deadline."""
    body = """
        mov rbx, 0xfee00000
        mov dword ptr [rbx + 0xf0], 0x1ff
        mov dword ptr [rbx + 0x3e0], 0xb
        mov dword ptr [rbx + 0x320], 0x40
        mov dword ptr [rbx + 0x380], 100000
        sti
    wait:
        hlt
        test r12, r12
        jz wait
    """
    m = lm_guest(tmp_path, body, "inc r12\nmov dword ptr [rbx + 0xb0], 0", map_apic=True)
    r = m.run()
    assert r.exit_code == 1, r.detail
    assert m.cpu.guest_time_ns >= 100_000            # 100000 ticks of the 1 GHz APIC clock
    assert r.counts.get(ExitCode.NPF, 0) >= 5


def test_x2apic_periodic_timer_counts_while_the_guest_spins(tmp_path):
    body = X2APIC_ON + """
        mov ecx, 0x83e
        mov eax, 0xb
        wrmsr
        mov ecx, 0x832
        mov eax, 0x20040
        wrmsr
        mov ecx, 0x838
        mov eax, 20000
        wrmsr
        sti
    spin:
        cmp r12, 3
        jb spin
        cli
    """
    m = lm_guest(tmp_path, body, X2_EOI)
    r = m.run()
    assert r.exit_code == 3
    assert r.counts.get(ExitCode.INTR, 0) >= 3       # each period is a #VMEXIT(INTR) in guest time


def test_tsc_deadline_timer(tmp_path):
    body = X2APIC_ON + """
        mov ecx, 0x832
        mov eax, 0x40040
        wrmsr
        rdtsc
        shl rdx, 32
        or rax, rdx
        add rax, 3000
        mov rdx, rax
        shr rdx, 32
        mov ecx, 0x6e0
        wrmsr
        sti
    spin:
        test r12, r12
        jz spin
        cli
    """
    m = lm_guest(tmp_path, body, X2_EOI)
    r = m.run()
    assert r.exit_code == 1, r.detail
    assert m.platform.apic.tsc_deadline == 0          # reads 0 once it fired


def test_cpuid_advertises_x2apic_and_tsc_deadline(tmp_path):
    m = lm_guest(tmp_path, "mov eax, 1\ncpuid\nmov r12d, ecx\nshr r12d, 21", "nop")
    r = m.run()
    assert r.exit_code & 1 and r.exit_code & 8       # ECX bits 21 and 24


def test_inc_dec_before_an_intercepted_instruction_in_32bit_code(tmp_path):
    """In 32-bit code 48h is DEC EAX, not REX.W: 'dec eax; cpuid' is two
    instructions, and the CPUID exit is at the second (nRIP after it)."""
    m = machine()
    m.load(kernel(tmp_path, "mov eax, 5\ndec eax\ncpuid\nhlt"))
    seen = []

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        seen.append((e.rip, e.nrip, m.guest.vmcb.RAX))
        return m.stop("seen")
    m.run()
    start = LOAD + 12
    assert seen == [(start + 6, start + 8, 4)]          # mov eax, imm32 is 5 bytes, dec eax 1


def test_shadow_paging_refuses_a_multiboot_kernel(tmp_path):
    with pytest.raises(ImageError, match="paging off"):
        Machine(dram=48 << 20, ram=32 << 20, paging="shadow").load(kernel(tmp_path, "hlt"))
