"""Nested SVM: small L1 hypervisors that run an L2 under the sandbox's L0.

Expected values come from the APM vol. 2: exit codes (Appendix C), nRIP
(§15.7.1: the address of the next sequential instruction), IOIO EXITINFO1/2
(§15.10.2), #VMEXIT clearing GIF (§15.17), VMEXIT_INVALID = -1 for an illegal
VMCB (§15.5.1), the TSC offset of each level adding up (§15.30.4) -- and
instruction lengths from capstone, never from the implementation.
"""
from __future__ import annotations

import struct

import pytest

from sandbox import Machine
from sandbox.hypervisor.image import CS_ATTRIB, CS_SEL, DS_ATTRIB, DS_SEL, GDT, GDT_BASE, PT_BASE
from sandbox.memory.paging import TableBuilder
from sandbox.svm.exitcodes import ExitCode
from sandbox.svm.intercepts import INTERCEPT_BITS
from sandbox.svm.vmcb import VMCB, NpControl, Segment
from tests.conftest import OP, assemble, db, insn_length

VMCB12 = 0x1A0000
HSAVE = 0x1A1000
L2_CODE = 0x140000
L2_STACK = 0x1B0000
NPT12 = 0x1D0000              # L1's nested page table for L2 (identity over 2 MiB)
EXITCODE = VMCB12 + 0x70      # APM Table B-1
M64 = (1 << 64) - 1

L1_ENABLE = f"""
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x1000
    wrmsr
    mov ecx, 0xC0010117
    mov eax, {HSAVE:#x}
    xor edx, edx
    wrmsr
"""
L1_VMRUN = f"mov rax, {VMCB12:#x}\n{db(OP['vmrun'])}\n"
# (keystone assembles "[imm]" RIP-relative: addresses go through a register)
L1_EXIT_WITH_EXITCODE = f"mov rdi, {EXITCODE:#x}\nmov rdi, [rdi]\nxor eax, eax\n{db(OP['vmmcall'])}\n"


def machine(tmp_path, l1_src: str, l2_src: str, intercepts=("vmrun",), np: bool = False,
            nested: bool = True, platform: str | None = None) -> tuple[Machine, VMCB]:
    m = Machine(dram=16 << 20, ram=2 << 20, nested=nested, platform=platform)
    p = tmp_path / "l1.S"
    p.write_text(l1_src)
    m.load(str(p))
    g = m.guest
    g.write_phys(L2_CODE, assemble(l2_src, L2_CODE))
    v = VMCB(m.mem, g.gpa_to_hpa(VMCB12))       # L1's VMCB12, as L1's own loader would place it
    for name in intercepts:
        v.set_intercept(INTERCEPT_BITS[name])
    v.GUEST_ASID = 1
    v.set_seg("CS", Segment(CS_SEL, CS_ATTRIB, 0xFFFFFFFF, 0))
    for s in ("SS", "DS", "ES"):
        v.set_seg(s, Segment(DS_SEL, DS_ATTRIB, 0xFFFFFFFF, 0))
    v.set_seg("GDTR", Segment(0, 0, len(GDT) * 8 - 1, GDT_BASE))
    v.CR0, v.CR3, v.CR4, v.EFER = 0x8001_0033, PT_BASE, 0x620, 0x1D00
    v.RFLAGS, v.RIP, v.RSP = 0x2, L2_CODE, L2_STACK
    v.DR6, v.DR7, v.G_PAT = 0xFFFF0FF0, 0x400, 0x0007040600070406
    if np:
        nxt = [NPT12]
        g.write_phys(NPT12, bytes(4096))

        def alloc() -> int:
            nxt[0] += 4096
            g.write_phys(nxt[0], bytes(4096))
            return nxt[0]
        rd = lambda a: struct.unpack("<Q", g.read_phys(a, 8))[0]
        wr = lambda a, val: g.write_phys(a, struct.pack("<Q", val))
        tb = TableBuilder(NPT12, alloc, rd, wr)
        for gpa in range(0, 2 << 20, 4096):
            if not NPT12 <= gpa < NPT12 + 0x10000:
                tb.map(gpa, gpa, write=True, user=True, execute=True)
        v.NP_CONTROL, v.N_CR3 = NpControl.NP_ENABLE, NPT12
    return m, v


@pytest.mark.parametrize("l2, names, code, length", [
    ("cpuid", ("vmrun", "cpuid"), ExitCode.CPUID, None),
    ("hlt", ("vmrun", "hlt"), ExitCode.HLT, None),
    (db(OP["vmmcall"]), ("vmrun", "vmmcall"), ExitCode.VMMCALL, 3),
])
@pytest.mark.parametrize("np", [False, True])
def test_l2_exit_is_reflected_to_l1(tmp_path, l2, names, code, length, np):
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE, f"nop\n{l2}\n", names, np=np)
    r = m.run(timeout=20)
    assert r.exit_code == code, r.detail
    n = length or insn_length(assemble(l2, L2_CODE + 1))
    assert v.EXITCODE == code and v.RIP == L2_CODE + 1 and v.NRIP == L2_CODE + 1 + n
    assert not m.nested.gif                   # #VMEXIT cleared L1's GIF (APM §15.17)
    # the exit trace names the level: L1's VMRUN, L2's exit, L1's EXIT hypercall (NPFs of the shadow aside)
    levels = [(e.level, e.exitcode) for e in m.trace if e.exitcode != ExitCode.NPF][-3:]
    assert levels == [("L1", ExitCode.VMRUN), ("L2", code), ("L1", ExitCode.VMMCALL)]
    assert any(e.exitcode == ExitCode.NPF for e in m.trace) == np


def test_ioio_reflected_with_exitinfo(tmp_path):
    l1 = L1_ENABLE + f"""
    mov rdi, {VMCB12 + 0x40:#x}
    mov qword ptr [rdi], 0x1C0000
    mov rdi, 0x1C0010
    mov byte ptr [rdi], 1
    """ + L1_VMRUN + L1_EXIT_WITH_EXITCODE
    m, v = machine(tmp_path, l1, "mov al, 0x5a\nout 0x80, al\n", ("vmrun", "ioio"))
    r = m.run(timeout=20)
    assert r.exit_code == ExitCode.IOIO, r.detail
    out_rip = L2_CODE + 2
    # §15.10.2: port 80h in 31:16, SZ8 (bit 4), A64 (bit 9), OUT (TYPE = 0); EXITINFO2 = next RIP
    assert v.EXITINFO1 == (0x80 << 16) | (1 << 4) | (1 << 9)
    assert v.EXITINFO2 == out_rip + 2 and v.RIP == out_rip


def test_l0_handles_what_l1_does_not_intercept(tmp_path):
    """L2's CPUID is not intercepted by L1: L0 answers it and L2 goes on to a HLT L1 does intercept."""
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE,
                   "mov eax, 0x40000000\ncpuid\nmov rdi, 0x1C0100\nmov [rdi], ebx\nhlt\n", ("vmrun", "hlt"))
    r = m.run(timeout=20)
    assert r.exit_code == ExitCode.HLT
    assert m.guest.read_phys(0x1C0100, 4) == b"AMDV"
    assert [e.level for e in m.trace if e.exitcode == ExitCode.CPUID] == ["L2"]


def test_malformed_vmcb12_is_vmexit_invalid(tmp_path):
    """ASID 0 is illegal (§15.5.1): VMRUN ends at once with EXITCODE = -1 in VMCB12."""
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + "mov rdi, 0x1A0070\nmov rdi, [rdi]\ncmp rdi, -1\nsete dil\n"
                   "movzx edi, dil\nxor eax, eax\n" + db(OP["vmmcall"]), "hlt\n", ("vmrun", "hlt"))
    v.GUEST_ASID = 0
    r = m.run(timeout=20)
    assert r.exit_code == 1 and v.EXITCODE == M64


def _gp_probe(body: str) -> str:
    """L1 with a #GP handler that exits with code 13, running ``body`` then exiting with 0."""
    from tests.conftest import asm_set_gate
    return f"""
    {asm_set_gate(0x60000, 13, "gp")}
    {asm_set_gate(0x60000, 6, "ud")}
    mov rax, 0x60000
    push rax
    mov ax, 0xfff
    push ax
    lidt [rsp]
    {body}
    xor edi, edi
    xor eax, eax
    {db(OP['vmmcall'])}
gp:
    mov edi, 13
    xor eax, eax
    {db(OP['vmmcall'])}
ud:
    mov edi, 6
    xor eax, eax
    {db(OP['vmmcall'])}
"""


def test_vmcb12_outside_l1_memory_is_gp(tmp_path):
    m, _ = machine(tmp_path, _gp_probe(L1_ENABLE + f"mov rax, {4 << 20:#x}\n{db(OP['vmrun'])}"), "hlt\n")
    assert m.run(timeout=20).exit_code == 13


def test_vmrun_without_svme_is_ud(tmp_path):
    m, _ = machine(tmp_path, _gp_probe(L1_VMRUN), "hlt\n")
    assert m.run(timeout=20).exit_code == 6


def test_svme_without_nested_is_gp(tmp_path):
    m, _ = machine(tmp_path, _gp_probe("mov ecx, 0xC0000080\nrdmsr\nor eax, 0x1000\nwrmsr\n"), "hlt\n",
                   nested=False)
    m.intercept("msr")
    assert m.run(timeout=20).exit_code == 13


def test_cpuid_shows_svm_only_with_nested(tmp_path):
    src = "mov eax, 0x80000001\ncpuid\nmov edi, ecx\nand edi, 4\nxor eax, eax\n" + db(OP["vmmcall"])
    for nested, bit in ((True, 4), (False, 0)):
        m, _ = machine(tmp_path, src, "hlt\n", nested=nested)
        assert m.run(timeout=20).exit_code == bit


def test_tsc_offsets_stack(tmp_path):
    """§15.30.4: RDTSC returns TSC + TSC_OFFSET.  L0 gives L1 δ1, L1 gives L2 δ2:
    L2 reads T_H + δ1 + δ2, L1 reads T_H + δ1 (neither level intercepts RDTSC)."""
    d1, d2 = 1 << 40, 1 << 44
    l2 = "rdtsc\nshl rdx, 32\nor rax, rdx\nmov rdi, 0x1C0200\nmov [rdi], rax\nhlt\n"
    l1 = L1_ENABLE + L1_VMRUN + "rdtsc\nshl rdx, 32\nor rax, rdx\nmov rdi, 0x1C0208\nmov [rdi], rax\n" \
        + L1_EXIT_WITH_EXITCODE
    m, v = machine(tmp_path, l1, l2, ("vmrun", "hlt"))
    m.guest.vmcb.TSC_OFFSET = d1
    v.TSC_OFFSET = d2
    t0 = m.cpu.host_tsc()
    r = m.run(timeout=20)
    t1 = m.cpu.host_tsc()
    assert r.exit_code == ExitCode.HLT
    t_l2, t_l1 = struct.unpack("<QQ", m.guest.read_phys(0x1C0200, 16))
    assert t0 + d1 + d2 <= t_l2 <= t1 + d1 + d2
    assert t0 + d1 <= t_l1 <= t1 + d1


def test_ioio_l1_map_written_while_l2_runs(tmp_path):
    """The processor reads the IOPM at each IN/OUT (APM §15.10.1), so a bit L1's map
    gains while L2 runs counts: here L2 itself sets port 80h's bit (as svm.flat's ioio
    test does) and its OUT must reach L1 as IOIO -- L0's own map leaves the port alone."""
    l1 = L1_ENABLE + f"""
    mov rdi, {VMCB12 + 0x40:#x}
    mov qword ptr [rdi], 0x1C0000
    """ + L1_VMRUN + L1_EXIT_WITH_EXITCODE
    l2 = "mov rdi, 0x1C0010\nmov byte ptr [rdi], 1\nmov al, 0x5a\nout 0x80, al\nhlt\n"
    m, v = machine(tmp_path, l1, l2, ("vmrun", "ioio", "hlt"))
    m.guest.iopm.set(0x80, False)
    r = m.run(timeout=20)
    assert r.exit_code == ExitCode.IOIO, r.detail
    assert v.EXITINFO1 >> 16 == 0x80


def test_shadow_npt_follows_l1_npt_changes_between_vmruns(tmp_path):
    """L1 remaps one L2 page in its NPT between two VMRUNs: the second run must read
    the new L1 page (L0's shadow of L1's NPT may outlive a VMRUN only while the L1
    pages it was built from are unchanged)."""
    page, a, b = 0x180000, 0x1C1000, 0x1C2000
    pte = NPT12 + 3 * 0x1000 + ((page >> 12) & 0x1FF) * 8     # root, PDPT, PD, then the first PT
    flags = 0x7                                                # P, RW, US (TableBuilder's leaf)
    l2 = f"mov rdi, {page:#x}\nmov rax, [rdi]\nmov rdi, 0x1C0300\nmov [rdi], rax\n{db(OP['vmmcall'])}\n"
    l1 = L1_ENABLE + L1_VMRUN + f"""
    mov rdi, 0x1C0300
    mov rax, [rdi]
    mov rdi, 0x1C0308
    mov [rdi], rax
    mov rdi, {pte:#x}
    mov rax, [rdi]
    and rax, 0xfff
    mov rcx, {b:#x}
    or rax, rcx
    mov [rdi], rax
    mov rdi, {VMCB12 + 0x578:#x}
    mov qword ptr [rdi], {L2_CODE:#x}
    """ + L1_VMRUN + L1_EXIT_WITH_EXITCODE          # VMCB12.RIP at 578h (APM Table B-2): L2 from its start
    m, v = machine(tmp_path, l1, l2, ("vmrun", "vmmcall"), np=True)
    g = m.guest
    e = struct.unpack("<Q", g.read_phys(pte, 8))[0]
    assert e & ~0xFFF & 0x000F_FFFF_FFFF_F000 == page and e & flags == flags   # the leaf is where we think
    g.write_phys(a, struct.pack("<Q", 0xAAAA))
    g.write_phys(b, struct.pack("<Q", 0xBBBB))
    g.write_phys(pte, struct.pack("<Q", a | (e & 0xFFF)))
    r = m.run(timeout=20)
    assert r.exit_code == ExitCode.VMMCALL, r.detail
    second, first = struct.unpack("<QQ", g.read_phys(0x1C0300, 16))
    assert (first, second) == (0xAAAA, 0xBBBB)


def test_gif_holds_l1_interrupts_until_stgi(tmp_path):
    """#VMEXIT clears GIF and only STGI sets it (APM §15.17): until then every
    interrupt for L1, NMI included, is held."""
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE, "hlt\n", ("vmrun", "hlt"))
    assert m.run(timeout=20).exit_code == ExitCode.HLT
    n = m.nested
    assert not n.gif and n.holds_interrupt() and n.holds_interrupt(nmi=True)
    m2, _ = machine(tmp_path, L1_ENABLE + L1_VMRUN + db(OP["stgi"]) + "\n" + L1_EXIT_WITH_EXITCODE, "hlt\n",
                    ("vmrun", "hlt"))
    assert m2.run(timeout=20).exit_code == ExitCode.HLT
    assert m2.nested.gif and not m2.nested.holds_interrupt()


# L1's NPT as TableBuilder lays it out: root, PDPT, PD, then the PT of the first 2 MiB
NPT12_PML4E = NPT12
NPT12_L2_CODE_PTE = NPT12 + 3 * 0x1000 + ((L2_CODE >> 12) & 0x1FF) * 8


def _l1_efer(nxe: bool) -> str:
    return L1_ENABLE + ("" if nxe else "mov ecx, 0xC0000080\nrdmsr\nand eax, 0xFFFFF7FF\nwrmsr\n")


@pytest.mark.parametrize("nxe,smep", [(False, False), (True, False), (False, True), (True, True)])
def test_l1_npt_fetch_fault_reports_id_with_l1_nxe_or_smep(tmp_path, nxe, smep):
    """L2's fetch through a leaf of L1's NPT with a reserved address bit is L1's NPF with
    P|U|RSV|final (APM §15.25.6); I/D is reported only with the host's (L1's) EFER.NXE or
    CR4.SMEP set (APM vol. 2 §8.4.2; kvm-unit-tests svm_npt_rsvd_bits_test wants
    0x10000001d for NX or SMEP, 0x10000000d for neither)."""
    m, v = machine(tmp_path, _l1_efer(nxe) + L1_VMRUN + L1_EXIT_WITH_EXITCODE, "nop\nhlt\n",
                   ("vmrun", "hlt"), np=True)
    g = m.guest
    if smep:        # L1's own pages are supervisor leaves: SMEP does not stop L1 itself
        g.vmcb.CR4 |= 1 << 20
    e = struct.unpack("<Q", g.read_phys(NPT12_L2_CODE_PTE, 8))[0]
    assert e & 0x000F_FFFF_FFFF_F000 == L2_CODE          # the leaf is where we think
    g.write_phys(NPT12_L2_CODE_PTE, struct.pack("<Q", e | (1 << 50)))   # above MAXPHYADDR (48)
    r = m.run(timeout=20)
    assert r.exit_code == ExitCode.NPF, r.detail
    want = 0x10000000D | (0x10 if nxe or smep else 0)
    assert (v.EXITINFO1, v.EXITINFO2) == (want, L2_CODE)


def test_l1_npt_pml4e_bit_8_is_reserved(tmp_path):
    """Bit 8 of a PML4E is MBZ on AMD (APM vol. 2 Figure 5-18; KVM reserves it for AMD
    guests): L2's first walk of its own page tables through it is L1's NPF with
    P|W|U|RSV and the guest-page-table bit 33 (kvm-unit-tests wants 0x20000000f)."""
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE, "nop\nhlt\n",
                   ("vmrun", "hlt"), np=True)
    g = m.guest
    e = struct.unpack("<Q", g.read_phys(NPT12_PML4E, 8))[0]
    g.write_phys(NPT12_PML4E, struct.pack("<Q", e | (1 << 8)))
    r = m.run(timeout=20)
    assert r.exit_code == ExitCode.NPF, r.detail
    assert v.EXITINFO1 == 0x20000000F and v.EXITINFO2 & ~0xFFF == PT_BASE


def _db_idt() -> str:
    """L1's IDT at 0x60000 with its #DB gate on ``db_handler``, loaded."""
    from tests.conftest import asm_set_gate
    return f"""{asm_set_gate(0x60000, 1, "db_handler")}
    mov rax, 0x60000
    push rax
    mov ax, 0xfff
    push ax
    lidt [rsp]
    add rsp, 10"""


def test_l1_single_step_over_vmrun_traps_after_the_vmexit(tmp_path):
    """L1 sets RFLAGS.TF just before VMRUN: the #DB trap is taken in L1 after the #VMEXIT,
    at the instruction after VMRUN, before it runs (kvm-unit-tests host_rflags, quoting the
    APM: "Setting host EFLAGS.TF causes a #DB trap after the VMRUN completes on the host
    side"; KVM's nested_svm_vmexit queues it), once, with DR6.BS (§13.1.1.3)."""
    rec = 0x1C0400
    l1 = f"""
    {_db_idt()}
    {L1_ENABLE}
    mov rax, {VMCB12:#x}
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    {db(OP['vmrun'])}
after:
    nop
    nop
    xor edi, edi
    xor eax, eax
    {db(OP['vmmcall'])}
db_handler:
    mov rdi, {rec:#x}
    mov rax, [rsp]
    mov [rdi], rax
    mov rax, dr6
    mov [rdi + 8], rax
    inc qword ptr [rdi + 16]
    and qword ptr [rsp + 16], -0x101
    iretq
    """
    m, v = machine(tmp_path, l1, db(OP["vmmcall"]) + "\n", ("vmrun", "vmmcall"))
    r = m.run(timeout=20)
    assert r.exit_code == 0, r.detail
    assert v.EXITCODE == ExitCode.VMMCALL
    rip, dr6, count = struct.unpack("<3Q", m.guest.read_phys(rec, 24))
    after = next(e.rip for e in m.trace if e.exitcode == ExitCode.VMRUN) + 3
    assert (rip, count) == (after, 1)
    assert dr6 & (1 << 14)


def test_l1_breakpoint_on_vmrun_rf_and_dr7_after_vmexit(tmp_path):
    """L1 arms an instruction breakpoint on its VMRUN (DR0, DR7 = 403h): the #DB fault comes
    once; its handler sets RF, which lets VMRUN run, and VMRUN clears RF (kvm-unit-tests
    host_rflags, quoting the APM: "completion of the VMRUN instruction clears the host
    EFLAGS.RF bit"). The #VMEXIT disables L1's breakpoints (DR7 = 400h, APM §15.6; KVM's
    nested_svm_vmexit), so the second VMRUN at the same address runs without a #DB."""
    rec = 0x1C0400
    again = f"mov rdi, {VMCB12 + 0x578:#x}\nmov rax, {L2_CODE:#x}\nmov [rdi], rax\n"   # VMCB12.RIP
    l1 = f"""
    {_db_idt()}
    {L1_ENABLE}
    mov rax, target
    mov dr0, rax
    mov rax, 0x403
    mov dr7, rax
    xor ebx, ebx
run:
    mov rax, {VMCB12:#x}
target:
    {db(OP['vmrun'])}
    pushfq
    pop rax
    mov rdi, {rec:#x}
    mov [rdi + 24 + rbx * 8], rax
    mov rax, dr7
    mov [rdi + 40 + rbx * 8], rax
    {again}
    inc ebx
    cmp ebx, 2
    jb run
    xor edi, edi
    xor eax, eax
    {db(OP['vmmcall'])}
db_handler:
    push rax
    push rdi
    mov rdi, {rec:#x}
    mov rax, [rsp + 16]
    mov [rdi], rax
    inc qword ptr [rdi + 16]
    or qword ptr [rsp + 32], 0x10000
    pop rdi
    pop rax
    iretq
    """
    m, v = machine(tmp_path, l1, db(OP["vmmcall"]) + "\n", ("vmrun", "vmmcall"))
    r = m.run(timeout=20)
    assert r.exit_code == 0, r.detail
    rip, _, count, fl1, fl2, dr7_1, dr7_2 = struct.unpack("<7Q", m.guest.read_phys(rec, 56))
    vmruns = [e.rip for e in m.trace if e.exitcode == ExitCode.VMRUN]
    assert len(vmruns) == 2 and rip == vmruns[0] and count == 1
    assert not fl1 & (1 << 16) and not fl2 & (1 << 16)          # RF cleared by each VMRUN
    assert dr7_1 == dr7_2 == 0x400


def test_l1_virq_waits_out_the_interrupt_shadow_of_vmrun(tmp_path):
    """VMCB12 queues a V_IRQ (highest priority, V_INTR_MASKING) with INTERRUPT_SHADOW set and
    L2's RFLAGS.IF set: the shadow holds the interrupt for one instruction (APM §15.21.5), so
    L2 takes it after its first NOP, with RIP = the second one on the handler's stack
    (kvm-unit-tests virq_inject_within_shadow); V_IRQ is cleared as it is taken (§15.21.4)."""
    from sandbox.svm.vmcb import VIntr
    rec, idt, vector = 0x1C0400, 0x61000, 0xF1
    handler = L2_CODE + 0x100
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE,
                   f"nop\nnop\n{db(OP['vmmcall'])}\n", ("vmrun", "vmmcall"))
    g = m.guest
    g.write_phys(handler, assemble(f"mov rdi, {rec:#x}\nmov rax, [rsp]\nmov [rdi], rax\niretq\n", handler))
    gate = (handler & 0xFFFF) | (CS_SEL << 16) | (0x8E << 40) | ((handler >> 16 & 0xFFFF) << 48)
    g.write_phys(idt + vector * 16, struct.pack("<QQ", gate, handler >> 32))
    v.set_seg("IDTR", Segment(0, 0, 0xFFF, idt))
    v.V_INTR = VIntr.V_IRQ | VIntr.V_INTR_MASKING | (0xF << 16)
    v.V_INTR_VECTOR = vector
    v.INTERRUPT_SHADOW = 1
    v.RFLAGS = 0x202
    g.write_phys(rec, struct.pack("<Q", M64))
    r = m.run(timeout=20)
    assert r.exit_code == ExitCode.VMMCALL, r.detail
    assert struct.unpack("<Q", g.read_phys(rec, 8))[0] == L2_CODE + 1
    assert not v.V_INTR & VIntr.V_IRQ and not v.INTERRUPT_SHADOW & 1


@pytest.mark.parametrize("iopm, ok", [((1 << 48) - 3 * 4096, True), ((1 << 48) - 2 * 4096, False)])
def test_vmcb12_iopm_is_checked_against_maxphyaddr_not_l1_memory(tmp_path, iopm, ok):
    """The IOPM (12 KiB) may lie anywhere below MAXPHYADDR (48): VMRUN fails only when it
    extends to 2^48 or beyond (APM §15.5.1; kvm-unit-tests "Test IOPM address")."""
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE, db(OP["vmmcall"]) + "\n",
                   ("vmrun", "vmmcall", "ioio"))
    v.IOPM_BASE_PA = iopm
    r = m.run(timeout=20)
    assert v.EXITCODE == (ExitCode.VMMCALL if ok else M64), r.detail


def test_l1_vmload_makes_segment_bases_canonical(tmp_path):
    """VMLOAD of a non-canonical FS/GS/TR/LDTR base or KERNEL_GS_BASE, then VMSAVE: the saved
    values are canonical, sign-extended from bit 47 (kvm-unit-tests test_canonicalization)."""
    bad = 0xAAAA_0000_0123_4000
    l1 = L1_ENABLE + f"mov rax, {VMCB12:#x}\n{db(OP['vmload'])}\n{db(OP['vmsave'])}\n" + L1_EXIT_WITH_EXITCODE
    m, v = machine(tmp_path, l1, "hlt\n")
    for name in ("FS", "GS", "TR", "LDTR"):
        s = v.seg(name)
        v.set_seg(name, Segment(s.selector, s.attrib, s.limit, bad))
    v.KERNEL_GS_BASE = bad
    m.run(timeout=20)
    want = 0x0000_0000_0123_4000                  # bit 47 of 0xAAAA_0000_0123_4000 is 0
    assert [v.seg(n).base for n in ("FS", "GS", "TR", "LDTR")] == [want] * 4 and v.KERNEL_GS_BASE == want


def test_l2_in_64_bit_mode_ignores_a_noncanonical_cs_base(tmp_path):
    """In 64-bit mode the CS (ES, SS, DS) base is ignored (APM vol. 2 §4.12): VMRUN with a
    non-canonical CS.base runs L2 to its VMMCALL, and VMCB12 keeps the value it had
    (kvm-unit-tests "Successful VMRUN with noncanonical CS.base")."""
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE, db(OP["vmmcall"]) + "\n",
                   ("vmrun", "vmmcall"))
    s = v.seg("CS")
    bad = 0xAAAA_0000_0000_0000
    v.set_seg("CS", Segment(s.selector, s.attrib, s.limit, bad))
    r = m.run(timeout=20)
    assert v.EXITCODE == ExitCode.VMMCALL, r.detail
    assert v.seg("CS").base == bad


@pytest.mark.parametrize("intercepted", [False, True])
def test_l2_vmload_runs_in_l2_unless_l1_intercepts_it(tmp_path, intercepted):
    """L2's VMLOAD/VMSAVE exits to L1 only when VMCB12 intercepts it (APM §15.9); otherwise it
    completes and L2 goes on to its VMMCALL (kvm-unit-tests svm_vmload_vmsave)."""
    l2 = f"mov rax, {VMCB12:#x}\n{db(OP['vmload'])}\n{db(OP['vmsave'])}\n{db(OP['vmmcall'])}\n"
    names = ("vmrun", "vmmcall") + (("vmload",) if intercepted else ())
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE, l2, names)
    r = m.run(timeout=20)
    assert v.EXITCODE == (ExitCode.VMLOAD if intercepted else ExitCode.VMMCALL), r.detail


def test_l2_clgi_stgi_not_intercepted_by_l1_act_on_l2s_gif(tmp_path):
    """CLGI/STGI in L2 that L1 does not intercept are not L1's business: L0 runs them
    for L2 (APM §15.17: GIF = 0 holds every interrupt and NMI), as KVM does --
    kvm-unit-tests' svm_intr_intercept_mix_gif.  Seen from L0's CPUID handler, which
    L2 reaches between them."""
    seen = []
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE,
                   f"{db(OP['clgi'])}\ncpuid\n{db(OP['stgi'])}\ncpuid\nhlt\n", ("vmrun", "hlt"))
    l0_cpuid = m.handlers[ExitCode.CPUID]

    def cpuid(m, e):
        n = m.nested
        seen.append((n.guest_mode, n.gif, n.holds_interrupt(), n.holds_interrupt(nmi=True)))
        return l0_cpuid(m, e)
    m.handlers[ExitCode.CPUID] = cpuid
    r = m.run(timeout=20)
    assert r.exit_code == ExitCode.HLT, r.detail           # neither CLGI nor STGI reached L1
    # after STGI an NMI is no longer held; an INTR still is, by L2's RFLAGS.IF = 0 (no V_INTR_MASKING)
    assert seen == [(True, False, True, True), (True, True, True, False)]
    assert [e.level for e in m.trace if e.exitcode in (ExitCode.CLGI, ExitCode.STGI)] == ["L2", "L2"]


def test_l2_clgi_intercepted_by_l1_is_reflected(tmp_path):
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE, f"nop\n{db(OP['clgi'])}\nhlt\n",
                   ("vmrun", "clgi", "hlt"))
    r = m.run(timeout=20)
    assert r.exit_code == ExitCode.CLGI and v.RIP == L2_CODE + 1 and v.NRIP == L2_CODE + 4


def test_l2_shutdown_intercepted_by_l1_is_reflected_and_l1_goes_on(tmp_path):
    """L2 triple-faults (an IDT limit of 0: #UD, then #GP delivering it, then #DF, then
    shutdown) with L1 intercepting SHUTDOWN: #VMEXIT(SHUTDOWN) goes to L1, which
    continues after its VMRUN (kvm-unit-tests' svm_shutdown_intercept_test)."""
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE, "ud2\n", ("vmrun", "shutdown"))
    v.set_seg("IDTR", Segment(0, 0, 0, 0))
    r = m.run(timeout=20)
    assert r.reason == "guest-exit" and r.exit_code == ExitCode.SHUTDOWN, (r.reason, r.detail)
    assert [(e.level, e.exitcode) for e in m.trace][-2:] == [("L2", ExitCode.SHUTDOWN), ("L1", ExitCode.VMMCALL)]


def test_l2_shutdown_not_intercepted_by_l1_stops_the_machine(tmp_path):
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE, "ud2\n", ("vmrun",))
    v.set_seg("IDTR", Segment(0, 0, 0, 0))
    r = m.run(timeout=20)
    assert r.reason == "shutdown", (r.reason, r.detail)



# -- the PC platform's interrupts around L2's GIF ---------------------------------------------------
L1_EXIT_TO_DEBUG_PORT = f"mov rdi, {EXITCODE:#x}\nmov eax, [rdi]\nout 0xf4, eax\nhlt\n"


def _before(m, code, fn):
    """Run ``fn(m, e)`` before L0's handler of exit ``code``."""
    orig = m.handlers[code]

    def h(m, e):
        fn(m, e)
        return orig(m, e)
    m.handlers[code] = h


@pytest.mark.parametrize("with_intr", [False, True])
def test_smi_nobody_intercepts_is_taken_at_once_even_with_a_masked_intr(tmp_path, with_intr):
    """An SMI arriving while L2 runs with GIF = 1 and L1 not intercepting SMI is taken then
    (SMM, a firmware handler that returns): RFLAGS.IF does not hold an SMI, so an INTR that
    L2's IF = 0 masks must not keep it pending -- L1 re-entering L2 with the SMI intercept set
    later gets L2's HLT, not an SMI exit for the earlier SMI."""
    from sandbox.hypervisor.platform.apic import SVR_ENABLE
    l1 = L1_ENABLE + L1_VMRUN + f"mov rdi, {VMCB12 + 0xC:#x}\nor dword ptr [rdi], 4\n" + L1_VMRUN \
        + L1_EXIT_TO_DEBUG_PORT
    m, v = machine(tmp_path, l1, "cpuid\ncpuid\nhlt\n", ("vmrun", "hlt"), platform="pc")
    apic = m.platform.apic
    apic.svr |= SVR_ENABLE
    pending = []

    def fire(m, e):
        if not pending:
            apic.smi_pending = True
            if with_intr:
                apic.set_irr(0x40)
        pending.append(apic.smi_pending)
    _before(m, ExitCode.CPUID, fire)
    m.run(timeout=20)
    assert pending == [True, False] and v.EXITCODE == ExitCode.HLT
    assert m.platform.injected["smi"] == 1


def test_nmi_held_by_l2s_gif_does_not_wake_its_hlt(tmp_path):
    """GIF = 0 (L2's own CLGI) holds an NMI: it cannot be taken, so it does not wake L2's HLT
    (the processor stays halted; here the run ends as a halt) -- KVM's nmi_allowed is false."""
    l2 = f"{db(OP['clgi'])}\ncpuid\nhlt\nmov r10, 0x99\n{db(OP['stgi'])}\nnop\nhlt\n"
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_TO_DEBUG_PORT, l2, ("vmrun", "nmi"), platform="pc")
    _before(m, ExitCode.CPUID, lambda m, e: setattr(m.platform.apic, "nmi_pending", True))
    r = m.run(timeout=20)
    assert r.reason == "halt" and m.regs.r10 == 0, (r.reason, r.detail)


def test_l2_that_cleared_efer_svme_gets_ud_for_clgi_and_l1_intercepting_ud_sees_it(tmp_path):
    """L2's EFER.SVME is its own (L1 does not intercept EFER): it reads as VMCB12 set it,
    L2 may clear it, and then its CLGI is #UD (APM vol. 3 CLGI) -- which L1, intercepting #UD,
    gets as its #VMEXIT (an exception L0 raises in L2 that L1 intercepts is L1's, as KVM)."""
    l2 = f"""
    mov ecx, 0xC0000080
    rdmsr
    mov r8, rax
    and eax, 0xffffefff
    wrmsr
    rdmsr
    mov r9, rax
    {db(OP['clgi'])}
    mov r10, 1
    hlt
    """
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE, l2, ("vmrun", "hlt", "excp6"))
    r = m.run(timeout=20)
    assert m.regs.r8 >> 12 & 1 == 1 and m.regs.r9 >> 12 & 1 == 0
    assert r.exit_code == v.EXITCODE == ExitCode.EXCP_UD and m.regs.r10 == 0
    assert v.EFER >> 12 & 1 == 0               # VMCB12 shows L2's EFER as L2 left it


def test_l2_reads_l1s_vm_hsave_pa_and_vm_cr_when_l1_does_not_intercept_them(tmp_path):
    """VM_HSAVE_PA and VM_CR are one register each on the processor L1 and L2 share: an
    RDMSR by L2 that L1 does not intercept (VMCB12 has no MSR intercept) reads what L1
    wrote (L1_ENABLE: HSAVE), as kvm-unit-tests' msr_intercept_check expects of L1 and L2."""
    l2 = ("mov ecx, 0xC0010117\nrdmsr\nmov rdi, 0x1C0200\nmov [rdi], eax\nmov [rdi + 4], edx\n"
          "mov ecx, 0xC0010114\nrdmsr\nmov [rdi + 8], eax\nhlt\n")
    m, v = machine(tmp_path, L1_ENABLE + L1_VMRUN + L1_EXIT_WITH_EXITCODE, l2, ("vmrun", "hlt"))
    r = m.run(timeout=20)
    assert r.exit_code == ExitCode.HLT, r.detail
    hsave, vm_cr = struct.unpack("<QI", m.guest.read_phys(0x1C0200, 12))
    assert hsave == HSAVE
    assert vm_cr == 0                 # L1 left VM_CR as reset (SVMDIS clear)


@pytest.mark.parametrize("body,gp", [
    ("mov ecx, 0xC0010114\nmov eax, 0x20\nxor edx, edx\nwrmsr\n", True),              # VM_CR bit 5: reserved
    ("mov ecx, 0xC0010114\nmov eax, 0x10\nxor edx, edx\nwrmsr\n", True),              # SVMDIS with EFER.SVME
    ("mov ecx, 0xC0010114\nmov eax, 0x1\nxor edx, edx\nwrmsr\n", False),              # DPD: defined
    ("mov ecx, 0xC0010117\nxor eax, eax\nmov edx, 0x10000\nwrmsr\n", True),           # HSAVE_PA >= 2^48
    ("mov ecx, 0xC0010117\nmov eax, 0x1A2000\nxor edx, edx\nwrmsr\n", False),
])
def test_l1_vm_cr_and_vm_hsave_pa_writes_follow_their_gp_rules(tmp_path, body, gp):
    """APM §15.30.1: VM_CR's bits above 4 are reserved and SVMDIS may not be set while
    EFER.SVME is 1 (#GP(0)); §15.30.4: VM_HSAVE_PA is a page-aligned address below
    MAXPHYADDR (48 on this processor)."""
    m, _ = machine(tmp_path, _gp_probe(L1_ENABLE + body), "hlt\n")
    assert m.run(timeout=20).exit_code == (13 if gp else 0)
