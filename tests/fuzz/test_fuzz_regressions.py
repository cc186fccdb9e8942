"""Defects `sandbox fuzz` found, each pinned by the smallest guest that shows it.

Expected values come from the APM -- never from the code under test.
"""
from __future__ import annotations

import pytest

from conftest import BASE, DATA, OP, assemble, capture, db, hc_exit, install_reporting_idt

GP_EXIT = 0x40 + 13


@pytest.mark.parametrize("name,code", [("vmrun", 0x80), ("vmload", 0x82), ("vmsave", 0x83)])
@pytest.mark.parametrize("rax", [0x100123, 1 << 48])
def test_svm_insn_rax_gp_precedes_intercept(guest, name, code, rax):
    """VMRUN/VMLOAD/VMSAVE raise #GP when rAX is not page-aligned or is at or
    beyond MAXPHYADDR, before the intercept check (APM §15.5.1
    "Checks done before the intercept").  Found by the soundness audit."""
    pre = f"mov rax, {rax:#x}"
    m = guest(pre + "\n" + db(OP[name]) + "\n" + hc_exit(0x55))
    m.intercept([name, "excp13"])
    rec = capture(m, GP_EXIT, code)
    r = m.run(timeout=5)
    assert r.reason == "captured", (r.reason, r.detail)
    assert rec[0].code == GP_EXIT and rec[0].rip == BASE + len(assemble(pre))


@pytest.mark.parametrize("name,code", [("vmrun", 0x80), ("vmload", 0x82), ("vmsave", 0x83)])
def test_svm_insn_aligned_rax_still_exits(guest, name, code):
    m = guest("mov rax, 0x100000\n" + db(OP[name]) + "\n" + hc_exit(0x55))
    m.intercept([name, "excp13"])
    rec = capture(m, GP_EXIT, code)
    assert m.run(timeout=5).reason == "captured" and rec[0].code == code


def test_noncanonical_idt_base_escalates_instead_of_crashing(guest):
    """LIDT with a non-canonical base, then #UD: reading the gate faults with
    #GP(0); #UD is benign, so the #GP is delivered, and faults the same way:
    #GP during #GP is a double fault (APM vol. 2 §8.2.9).  The model raised
    an internal error instead.  Found by `sandbox fuzz` (robustness oracle)."""
    src = f"""
    mov rax, {DATA:#x}
    mov word ptr [rax], 0xfff
    mov rcx, 0x8000000000001000
    mov [rax+2], rcx
    lidt [rax]
    ud2
    """ + hc_exit(0x55)
    m = guest(src)
    m.intercept("excp8")
    rec = capture(m, 0x48)
    r = m.run(timeout=5)
    assert r.reason == "captured", (r.reason, r.detail)
    assert rec[0].code == 0x48 and rec[0].exitintinfo & 0xFF == 13   # #DF while delivering #GP


def test_noncanonical_stack_during_delivery_is_ss(guest):
    """Delivering #UD onto a non-canonical RSP faults with #SS(0); with the
    #SS intercept the exit carries the #UD in EXITINTINFO (APM §15.7.2)."""
    m = guest("mov rsp, 0x8000000000000000\nud2\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.intercept("excp12")
    rec = capture(m, 0x4C)
    r = m.run(timeout=5)
    assert r.reason == "captured", (r.reason, r.detail)
    assert rec[0].info1 == 0 and rec[0].exitintinfo & 0xFF == 6 and rec[0].exitintinfo >> 31 & 1


def test_string_io_to_unmapped_memory_injects_pf(guest):
    """An intercepted OUTSB whose source is not mapped by the guest's page
    tables: the IOIO handler raised GuestPageFault out of the handler
    (handler-error).  It now injects #PF with CR2 = the address (APM vol. 2
    §8.4.2), as a hypervisor emulating the instruction must.  Found by
    `sandbox fuzz` (robustness oracle)."""
    m = guest("mov rsi, 0x40000000\nmov dx, 0x80\noutsb\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.set_ports([0x80])
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 0x10E, (r.reason, r.detail)
    assert r.regs["r8"] == 0x40000000          # CR2 as the #PF handler saw it


def test_rep_string_io_with_huge_count_is_chunked(guest):
    """REP OUTSB with RCX = 2^32: the handler emulates a bounded chunk per exit and
    re-executes the instruction, so one handler call cannot run for minutes."""
    m = guest(f"mov rsi, {DATA:#x}\nmov rcx, 0x100000000\nmov dx, 0x80\nrep outsb\n" + hc_exit(0x55))
    m.set_ports([0x80])
    r = m.run(timeout=20, max_exits=2)
    assert r.reason == "exit-budget", (r.reason, r.detail)
    assert r.counts.get(0x7B) == 2              # two exits handled; the third hit the budget before its handler
    from sandbox.hypervisor.string_io import STRING_IO_CHUNK
    assert r.regs["rcx"] == 0x100000000 - 2 * STRING_IO_CHUNK


def test_rep_string_io_data_and_page_straddle(guest):
    """REP OUTSB copies guest memory to the port in order, across a page
    boundary; REP INSW stores each element (per-page translation cache)."""
    src_at = DATA + 0xFFE                     # "hello" straddles DATA+0x1000
    dst_at = DATA + 0x1FFF                    # 3 words straddle DATA+0x2000
    m = guest(f"""
    mov rsi, {src_at:#x}
    mov rcx, 5
    mov dx, 0x3f8
    rep outsb
    mov rdi, {dst_at:#x}
    mov rcx, 3
    mov dx, 0x1234
    rep insw
    """ + hc_exit(0x55))
    m.guest.write_phys(src_at, b"hello")
    m.set_ports([0x3F8, 0x1234, 0x1235])
    r = m.run(timeout=5)
    assert r.reason == "guest-exit", (r.reason, r.detail)
    assert r.console == "hello"
    assert r.regs["rsi"] == src_at + 5 and r.regs["rcx"] == 0      # (RDI is the EXIT code by now)
    assert m.guest.read_phys(dst_at, 6) == b"\xff" * 6          # no device at 0x1234: all ones
    assert m.guest.read_phys(dst_at - 1, 1) == b"\x00" and m.guest.read_phys(dst_at + 6, 1) == b"\x00"


@pytest.mark.parametrize("insn,pre", [
    ("mov cr4, rax", "mov rax, cr4\nbts rax, 13"),          # CR4 bit 13 (VMXE) is MBZ on AMD
    ("mov cr4, rax", "mov rax, cr4\nbts rax, 40"),
    ("mov cr0, rax", "mov rax, cr0\nbts rax, 32"),          # CR0[63:32] MBZ
    ("mov cr0, rax", "mov rax, cr0\nbts rax, 29\nbtr rax, 30"),   # NW without CD
    ("mov cr8, rax", "mov eax, 16"),                         # CR8[63:4] MBZ
], ids=["cr4-vmxe", "cr4-bit40", "cr0-high", "cr0-nw", "cr8-16"])
def test_mov_to_cr_with_reserved_bits_is_gp(guest, insn, pre):
    """MOV to CRn with a reserved bit set raises #GP(0) (APM vol. 2 §3.1, §3.7.1).
    Unicorn loaded the value, and the next VMRUN failed its consistency check
    (VMEXIT_INVALID, "CR4 MBZ bits set").  Found by `sandbox fuzz`."""
    m = guest(pre + "\n" + insn + "\n" + hc_exit(0x55))
    m.intercept("excp13")
    rec = capture(m, GP_EXIT)
    r = m.run(timeout=5)
    assert r.reason == "captured", (r.reason, r.detail)
    assert rec[0].rip == BASE + len(assemble(pre)) and rec[0].info1 == 0


def test_mov_to_cr4_legal_value_still_runs(guest):
    m = guest("mov rax, cr4\nbts rax, 9\nmov cr4, rax\nmov rbx, cr4\n" + hc_exit(0x55))
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.regs["rbx"] >> 9 & 1


@pytest.mark.parametrize("insn,arm,code", [(b"\x0f\x01\xfa", "monitor", 0x8A), (b"\x0f\x01\xfb", "mwait", 0x8B)],
                         ids=["monitorx", "mwaitx"])
def test_monitorx_mwaitx_at_cpl3_exit(guest, insn, arm, code):
    """MONITORX/MWAITX are legal at CPL 3 and hit the MONITOR(X)/MWAIT(X) intercepts
    (APM Table B-1, misc2 bits 10-11); the decision applied MONITOR's CPL-0 rule to them.
    Found while triaging a fuzz finding (the audit model lacked the X forms)."""
    from conftest import user_code_addr, user_guest
    m = user_guest(guest, "xor ecx, ecx\nxor eax, eax\n" + db(insn))
    m.intercept(arm)
    rec = capture(m, code)
    r = m.run(timeout=5)
    assert r.reason == "captured", (r.reason, r.detail)
    at = user_code_addr("xor ecx, ecx\nxor eax, eax")
    assert rec[0].rip == at and rec[0].nrip == at + 3


# -- found by `sandbox fuzz --target vmrun` ------------------------------------------------------
INVALID_EXIT = 0xFFFF_FFFF_FFFF_FFFF


@pytest.mark.parametrize("field,base,size", [("IOPM_BASE_PA", (1 << 48) - 0x2000, 0x3000),
                                             ("MSRPM_BASE_PA", 1 << 52, 0x2000)])
def test_vmrun_checks_the_tables_with_their_intercepts_off(guest, field, base, size):
    """APM §15.5.1: VMRUN fails when "the MSR or IOIO intercept tables extend to a
    physical address that is greater than or equal to the maximum supported physical
    address" -- the rule names the tables, not the intercept bits (KVM checks both
    bases unconditionally too).  The model checked each only with its intercept armed."""
    m = guest(hc_exit(0x55))
    m.intercept(["ioio", "msr"], on=False)
    setattr(m.guest.vmcb, field, base)
    r = m.run(timeout=5)
    assert r.reason == "invalid-vmcb" and m.guest.vmcb.EXITCODE == INVALID_EXIT


def test_vmrun_cr3_mbz_in_long_mode_is_lme_and_pg(guest):
    """Long mode at VMRUN is EFER.LME with CR0.PG (vol. 2 §14.6.1: the processor sets
    LMA from them), so CR3[63:52] are MBZ even when the VMCB's EFER.LMA is clear.
    The model keyed the rule on the VMCB's LMA bit."""
    m = guest(hc_exit(0x55))
    v = m.guest.vmcb
    v.EFER = v.EFER & ~(1 << 10)
    v.CR3 = v.CR3 | 1 << 63
    assert m.run(timeout=5).reason == "invalid-vmcb"


def test_injected_nmi_ignores_the_vector_field(guest):
    """APM §15.20: "if TYPE is 2 (NMI), the VECTOR field is ignored" -- an injected NMI
    is delivered through IDT vector 2 (QEMU's SVM agrees).  The model delivered it
    through the VECTOR field."""
    from sandbox import Event, EventType
    m = guest("hlt")
    m.intercept(["excp13", "excp14", "excp8"])
    v = m.guest.vmcb
    v.EVENTINJ = Event(0x40, EventType.NMI).encode()
    seen = []
    m.on_exit_record = seen.append
    m.run(timeout=5)
    # no IDT (limit 0): gate 2 lies beyond the limit -> #GP with the selector error code
    # vector*8 + IDT (2) + EXT (1, an external event: vol. 2 §8.4.1), and EXITINTINFO
    # holds the NMI being delivered (valid, TYPE 2, vector 2; §15.7.2)
    assert seen and seen[0].exitcode == 0x40 + 13 and seen[0].exitinfo1 == 2 * 8 + 2 + 1
    assert seen[0].exitintinfo == 1 << 31 | 2 << 8 | 2


def test_shedding_hooks_survives_fills_that_add_hooks(monkeypatch):
    """Regression (seed 304 SEV campaign: 'RuntimeError: dictionary changed size
    during iteration'): deleting a hook makes Unicorn drop its page's translated
    blocks, which it finds through the TLB fill, and a fill may scan the page and
    add hooks while the others are being deleted."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from sandbox.svm import engine
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    hooks = engine.CodeHooks(uc, lambda *a: None)
    for a in range(8):
        hooks.add(0x1000 + a)
    real = hooks._del

    def del_and_fill(h, hh):
        hooks.add(0x9000 + len(hooks))           # what a scanning fill does
        return real(h, hh)
    monkeypatch.setattr(hooks, "_del", del_and_fill)
    monkeypatch.setattr(hooks, "DELETE_EVERY", 1)   # a shed that deletes (the others only park)
    assert hooks.shed() == 8
    assert len(hooks) == 8 and all(a >= 0x9000 for a in hooks.handles)   # the new hooks stay


# (bytes, intercept word, bit) -- each a sensitive legacy opcode behind a VEX prefix, which
# bare Unicorn executes as the legacy instruction (checked in the first test below)
VEX_FORMS = [
    ("c5ba31", 3, 14),          # VEX.0F 31: RDTSC's opcode (seed 202 shadow-paging campaign)
    ("c5f8a2", 3, 18),          # CPUID
    ("c4e17831", 3, 14),        # 3-byte VEX, map 0F: RDTSC
    ("c4e178a2", 3, 18),        # 3-byte VEX: CPUID
    ("c5f830", 3, 28),          # WRMSR (MSR intercept, bit 28 of word 3)
    ("c5f822d8", 0, 16 + 3),    # MOV CR3, RAX
    ("c5f820c0", 0, 0),         # MOV RAX, CR0
    ("c5f806", 0, 16),          # CLTS (CR0 write)
    ("c5f801f9", 4, 7),         # RDTSCP (word 4 bit 7)
    ("c5f800c8", 3, 9),         # STR (TR_READ, 69h)
    ("c5f801e0", 0, 0),         # SMSW (CR0 read)
    ("c5f80138", 3, 25),        # INVLPG [rax]
    ("66c5f8a2", 3, 18),        # a legacy prefix before VEX: #UD too
]


@pytest.mark.parametrize("hexcode,word,bit", VEX_FORMS)
def test_unicorn_runs_the_vex_form_as_the_legacy_instruction(hexcode, word, bit):
    """The premise, on bare Unicorn: the VEX form executes (no exception) -- so
    without the processor's check the armed intercept would be escaped."""
    from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, Uc, UcError
    from unicorn.x86_const import UC_X86_REG_RIP, UC_X86_REG_RSP
    if hexcode.startswith("66"):
        pytest.skip("Unicorn raises #UD for a prefix before VEX by itself")
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x2000)
    code = bytes.fromhex(hexcode)
    uc.mem_write(0x1000, code + b"\x90")
    uc.reg_write(UC_X86_REG_RSP, 0x2800)
    raised = []
    uc.hook_add(UC_HOOK_INTR, lambda u, n, d: (raised.append(n), u.emu_stop()))
    try:
        uc.emu_start(0x1000, 0x1000 + len(code), count=1)
    except UcError:
        pytest.skip("this Unicorn refuses the form itself")
    assert not raised and uc.reg_read(UC_X86_REG_RIP) == 0x1000 + len(code)


@pytest.mark.parametrize("hexcode,word,bit", VEX_FORMS)
def test_vex_prefixed_legacy_opcode_is_ud_not_the_instruction(hexcode, word, bit):
    """A VEX prefix on a legacy 0F-map opcode is #UD (SDM vol. 2 §2.3.2, APM vol. 3
    §1.2.7: no VEX instruction has these opcodes), and #UD is a simple exception,
    taken before any instruction intercept (APM vol. 2 §15.9).  With the legacy
    instruction's intercept armed and #UD intercepted, the first exit is EXCP_UD --
    never the counter, the MSR or the control register reached without an exit."""
    from sandbox.fuzz.case import Case, VmcbConfig
    from sandbox.fuzz.generate import TERMINATOR
    from sandbox.fuzz.snapshot import Harness
    w = [0] * 6
    w[2] |= 1 << 6                    # #UD intercept (exception 6)
    w[word] |= 1 << bit               # the legacy instruction's intercept
    w[4] |= 0b11                      # VMRUN, VMMCALL
    for offset in (0, 1, 4094, 4095):  # any alignment, and across the code window's page boundary
        out = Harness().run(Case(bytes.fromhex(hexcode) + TERMINATOR, offset, VmcbConfig(w)))
        assert out.exits and out.exits[0].exitcode == 0x46, (offset, [hex(e.exitcode) for e in out.exits])
    # unarmed, it is #UD all the same (not the legacy instruction run natively)
    w[word] &= ~(1 << bit)
    for offset in (0, 4095):       # any alignment, and across the code window's page boundary
        out = Harness().run(Case(bytes.fromhex(hexcode) + TERMINATOR, offset, VmcbConfig(w)))
        assert out.exits and out.exits[0].exitcode == 0x46, (offset, [hex(e.exitcode) for e in out.exits])


@pytest.mark.parametrize("insn,code", [("440f22f1", 0x1E), ("440f20c8", 0x09), ("0f22e8", 0x15)])
def test_mov_to_or_from_a_missing_cr_is_ud_not_an_exit(insn, code):
    """Regression (seed 202 campaign, 'spurious: mov: #VMEXIT 0x1e'): MOV CR14, RCX
    (and MOV RAX, CR9; MOV CR5, RAX) names no control register: #UD (APM vol. 3,
    MOV CRn), and instruction intercepts are checked after such simple
    exceptions (APM vol. 2 §15.9), so the armed CRn intercept does not exit."""
    from sandbox.fuzz.case import Case, VmcbConfig
    from sandbox.fuzz.generate import TERMINATOR
    from sandbox.fuzz.snapshot import Harness
    w = [0] * 6
    w[0] |= 1 << code                 # the CRn read/write intercept (bits 0-31 of word 0)
    w[2] |= 1 << 6                    # #UD
    w[4] |= 0b11                      # VMRUN, VMMCALL
    out = Harness().run(Case(bytes.fromhex(insn) + TERMINATOR, 0, VmcbConfig(w)))
    assert [e.exitcode for e in out.exits][:1] == [0x46], [hex(e.exitcode) for e in out.exits]


SELF_OVERWRITE = bytes.fromhex("488915f5ffffff")          # mov [rip - 11], rdx: 8 bytes from 2 before itself
PUSHF_RDX = 0xC5CBCD9CA89F284B                           # its byte 4 (9C, PUSHF) lands on the MOV's first byte


def test_a_store_rewriting_itself_into_pushf_is_not_taken_for_a_pushf(guest):
    """A MOV that rewrites its own first byte into 9C (PUSHF) must not be taken
    for a PUSHF.  When stores to code pages were single-stepped (smc.py), the
    model cleared its own TF from a stepped PUSHF's image, decided from memory
    after the step: it cleared bit 8 of the guest's word at [RSP] (under shadow
    paging, where RSP was unmapped, the read crashed the run).  Found by
    `sandbox fuzz --paging shadow --seed 204`; the guest's word stays as it was."""
    word = 0x1234_5F00                                    # bit 8 (TF's position) set
    src = f"""
    mov rax, {word:#x}
    push rax
    mov rdx, {PUSHF_RDX:#x}
    nop
    nop
    mov qword ptr [rip - 11], rdx
    pop rsi
    """ + hc_exit(0x55)
    assert SELF_OVERWRITE in assemble(src)
    m = guest(src)
    r = m.run(timeout=10)
    assert r.reason == "guest-exit", (r.reason, r.detail)
    assert r.regs["rsi"] == word                          # the guest's stack word, untouched


def test_the_shadow_paging_finding_replays_without_a_crash():
    from sandbox.fuzz.case import Case, VmcbConfig
    from sandbox.fuzz.snapshot import Harness
    case = Case(bytes.fromhex("ff07") + SELF_OVERWRITE, 2502, VmcbConfig([0, 0, 0, 0, 1, 0]), {"rdx": PUSHF_RDX})
    out = Harness(paging="shadow").run(case)
    assert not out.crash, out.crash
    assert out.result is not None and out.result.reason != "error"


def test_reference_guest_runs_with_the_vmcb_cr0():
    """The differential reference's guest must run with the VMCB's CR0 (paging on,
    long mode).  QEMU's VMRUN loads CR0 before CR4 and ignores a CR0 that turns
    paging on under EFER.LME while CR4.PAE is clear; the reference host had
    CR4.PAE clear, so its guests ran with the host's CR0 (11h).  Found as a
    differential finding: SMSW ECX; WRMSR under MSR_PROT.  SMSW r32 stores
    CR0[31:0] (APM vol. 3, SMSW); an MSR outside the MSRPM's ranges is always
    intercepted under MSR_PROT (APM vol. 2 §15.11), with EXITINFO1 = 1 for WRMSR."""
    from sandbox.fuzz.case import Case, VmcbConfig
    from sandbox.fuzz.differential import QemuSvm
    code = bytes.fromhex("0f01e1" "66baff65" "0f30" "0f01d9")      # smsw ecx; mov dx, 65ffh; wrmsr; vmmcall
    case = Case(code=code, offset=0x1AE4, config=VmcbConfig(intercepts=[0, 0, 0, 1 << 28, 3, 0]))
    q = QemuSvm().first_exit(case)
    assert q is not None and q.ecx == 0x8001_0033                   # the CR0 the reference's VMCB holds
    assert (q.exitcode, q.rip, q.exitinfo1) == (0x7C, case.entry + 7, 1)
