"""Instruction intercepts, one tiny guest per instruction class.

For each class: with the intercept armed the guest's first #VMEXIT is the
APM exit code (Table C-1) with RIP = the instruction,
NRIP = RIP + its length (capstone's decoding of the bytes in guest memory,
APM §15.7.1) and the EXITINFO1/2 of §3 where the APM defines them; with
the intercept clear the instruction runs in the guest and no such exit
happens.  Then soundness: prefixes, alignments, a page-straddling
instruction, instruction bytes hidden in an immediate, and code written at
run time must all still exit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest

from conftest import (BASE, DATA, KERNEL_STACK, OP, USER_CS, USER_SS, USER_STACK, VMMCALL, assemble, capture,
                      db, hc_exit, insn_length, install_reporting_idt, user_code_addr, user_guest)

DONE = 0x55          # the EXIT hypercall code every guest ends with
CR_VALID = 1 << 63   # §3 MOV CR decode assist: bit 63 = 1, 3:0 = GPR


@dataclass
class Case:
    id: str
    pre: str                     # setup code before the instruction (may use {next})
    insn: str                    # the instruction under test
    arm: list[str]               # intercepts to arm
    code: int                    # expected exit code (§3)
    info1: int | Callable | None = None    # expected EXITINFO1 (None: not defined by the APM)
    info2: int | Callable | None = None
    native: int | str | None = DONE        # clear-bit run: guest exit code, "halt", or None to skip
    native_arm: list[str] = field(default_factory=list)   # extra intercepts for the clear-bit run


CASES = [
    Case("cpuid", "xor eax, eax", "cpuid", ["cpuid"], 0x72),
    Case("rdtsc", "", "rdtsc", ["rdtsc"], 0x6E),
    Case("rdtscp", "", "rdtscp", ["rdtscp"], 0x87),
    # Unicorn raises #UD for RDPMC, so the clear-bit run is not meaningful
    Case("rdpmc", "xor ecx, ecx", "rdpmc", ["rdpmc"], 0x6F, native=None),
    Case("hlt", "", "hlt", ["hlt"], 0x78, native="halt"),
    Case("pause", "", "pause", ["pause"], 0x77),
    Case("invlpg", "mov rbx, 0x123000", "invlpg [rbx+0x10]", ["invlpg"], 0x79, info1=0x123010),
    Case("invlpg-sib", "mov rax, 0x1000000\nmov rcx, 0x40", "invlpg [rax+rcx*4+0x7f]", ["invlpg"], 0x79,
         info1=0x1000000 + 0x100 + 0x7F),
    Case("invlpg-r12-disp32", "mov r12, 0x7fff0000", "invlpg [r12-0x12345]", ["invlpg"], 0x79,
         info1=0x7FFF0000 - 0x12345),
    Case("invlpg-riprel", "", "invlpg [rip+0x1234]", ["invlpg"], 0x79,
         info1=lambda rip, nrip: nrip + 0x1234),
    Case("wbinvd", "", "wbinvd", ["wbinvd"], 0x89),
    Case("invd", "", "invd", ["invd"], 0x76),
    Case("xsetbv", "mov rax, cr4\nbts rax, 18\nmov cr4, rax\nxor ecx, ecx\nmov eax, 3\nxor edx, edx",
         "xsetbv", ["xsetbv"], 0x8D),
    Case("pushf", "", "pushfq", ["pushf"], 0x70),
    Case("popf", "push 2", "popfq", ["popf"], 0x71),
    Case("iret", "mov rax, rsp\npush 0x10\npush rax\npush 2\npush 8\nmov rcx, {next}\npush rcx",
         "iretq", ["iret"], 0x74),
    Case("intn", "", "int 0x80", ["intn"], 0x75, info1=0x80, native=0x180),
    Case("intn-0x21", "", "int 0x21", ["intn"], 0x75, info1=0x21, native=0x121),
    Case("icebp", "", "int1", ["icebp"], 0x88, native=0x101),
    Case("sgdt", f"mov rax, {DATA:#x}", "sgdt [rax]", ["gdtr_read"], 0x67),
    Case("sidt", f"mov rax, {DATA:#x}", "sidt [rax]", ["idtr_read"], 0x66),
    Case("sldt", "", "sldt ax", ["ldtr_read"], 0x68),
    Case("str", "", "str ax", ["tr_read"], 0x69),
    Case("lgdt", f"mov rax, {DATA:#x}\nsgdt [rax]", "lgdt [rax]", ["gdtr_write"], 0x6B),
    Case("lidt", f"mov rax, {DATA:#x}\nsidt [rax]", "lidt [rax]", ["idtr_write"], 0x6A),
    Case("lldt", "xor eax, eax", "lldt ax", ["ldtr_write"], 0x6C),
    Case("ltr", "xor eax, eax", "ltr ax", ["tr_write"], 0x6D, native=None),
    Case("mov-from-cr0", "", "mov rax, cr0", ["cr0_read"], 0x00, info1=CR_VALID | 0),
    Case("mov-from-cr3", "", "mov rbx, cr3", ["cr3_read"], 0x03, info1=0x8000000000000003),
    Case("mov-from-cr4-r9", "", "mov r9, cr4", ["cr4_read"], 0x04, info1=CR_VALID | 9),
    Case("mov-to-cr0", "mov rdx, cr0", "mov cr0, rdx", ["cr0_write"], 0x10, info1=CR_VALID | 2),
    Case("mov-to-cr3", "mov rbx, cr3", "mov cr3, rbx", ["cr3_write"], 0x13, info1=CR_VALID | 3),
    Case("mov-to-cr4-r10", "mov r10, cr4", "mov cr4, r10", ["cr4_write"], 0x14, info1=CR_VALID | 10),
    Case("mov-from-cr8", "", "mov rax, cr8", ["cr8_read"], 0x08, info1=CR_VALID | 0),
    Case("mov-to-cr8-rsi", "xor esi, esi", "mov cr8, rsi", ["cr8_write"], 0x18, info1=CR_VALID | 6),
    Case("smsw", "", "smsw eax", ["cr0_read"], 0x00, info1=0),
    Case("lmsw", "smsw eax", "lmsw ax", ["cr0_write"], 0x10, info1=0),
    Case("clts", "", "clts", ["cr0_write"], 0x10, info1=0),
    Case("mov-from-dr7", "", "mov rax, dr7", ["dr7_read"], 0x27, info1=0),
    Case("mov-from-dr7-r11", "", "mov r11, dr7", ["dr7_read"], 0x27, info1=11),
    Case("mov-to-dr7", "mov rdx, dr7", "mov dr7, rdx", ["dr7_write"], 0x37, info1=2),
    Case("mov-from-dr0", "", "mov rcx, dr0", ["dr0_read"], 0x20, info1=1),
    Case("mov-to-dr3", "xor esi, esi", "mov dr3, rsi", ["dr3_write"], 0x33, info1=6),
    *[Case(f"mov-from-dr{n}", "", f"mov rbx, dr{n}", [f"dr{n}_read"], 0x20 + n, info1=3, native=None)
      for n in (1, 2, 3, 4, 5, 6)],
    *[Case(f"mov-to-dr{n}", f"mov rax, dr{n}", f"mov dr{n}, rax", [f"dr{n}_write"], 0x30 + n, info1=0, native=None)
      for n in (0, 1, 2, 4, 5, 6)],
    Case("rsm", "", db(b"\x0f\xaa"), ["rsm"], 0x73, native=None),     # KUT rsm
    Case("rdmsr", "mov ecx, 0x174", "rdmsr", ["msr"], 0x7C, info1=0),
    Case("wrmsr", "mov ecx, 0x174\nxor eax, eax\nxor edx, edx", "wrmsr", ["msr"], 0x7C, info1=1),
    # VMMCALL without its intercept is #UD (APM §15.4); catch it with the #UD intercept
    Case("vmmcall", "mov eax, 7", VMMCALL, ["vmmcall"], 0x81, native=None),
    # VMRUN ... INVLPGA (APM §15.5, §15.16): exit codes 0x80-0x86, 0x7A
    Case("vmrun", "mov eax, 0x100000", db(OP["vmrun"]), ["vmrun"], 0x80, native=None),
    Case("vmload", "mov eax, 0x100000", db(OP["vmload"]), ["vmload"], 0x82, native=None),
    Case("vmsave", "mov eax, 0x100000", db(OP["vmsave"]), ["vmsave"], 0x83, native=None),
    Case("stgi", "", db(OP["stgi"]), ["stgi"], 0x84),
    Case("clgi", "", db(OP["clgi"]), ["clgi"], 0x85),
    Case("skinit", "mov eax, 0x100000", db(OP["skinit"]), ["skinit"], 0x86, native=0x106),
    Case("invlpga", "mov eax, 0x123000\nmov ecx, 1", db(OP["invlpga"]), ["invlpga"], 0x7A),
]
# default intercepts that the clear-bit run must switch off (hypervisor.default_intercepts)
DEFAULT_ON = {"cpuid", "hlt", "vmrun", "vmmcall", "vmload", "vmsave", "stgi", "clgi", "skinit", "invlpga"}


def build(guest, case: Case):
    pre = case.pre.format(next=0x100000)
    rip = BASE + len(assemble(pre))
    nrip = rip + insn_length(assemble(case.insn, rip), rip)
    pre = case.pre.format(next=nrip)
    assert BASE + len(assemble(pre)) == rip
    m = guest(pre + "\n" + case.insn + "\n" + hc_exit(DONE))
    # capstone on the bytes actually in guest memory
    assert insn_length(m.guest.read_phys(rip, 15), rip) == nrip - rip
    return m, rip, nrip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_intercepted(guest, case):
    m, rip, nrip = build(guest, case)
    m.intercept(case.arm)
    rec = capture(m, case.code)
    r = m.run(timeout=5)
    assert r.reason == "captured", (r.reason, r.detail)
    assert r.counts == {case.code: 1}, "the first #VMEXIT must be the instruction's"
    (e,) = rec
    assert e.code == case.code
    assert e.rip == rip
    assert e.nrip == nrip
    for got, want in ((e.info1, case.info1), (e.info2, case.info2)):
        if callable(want):
            want = want(rip, nrip)
        if want is not None:
            assert got == want, (hex(got), hex(want))


@pytest.mark.parametrize("case", [c for c in CASES if c.native is not None], ids=lambda c: c.id)
def test_not_intercepted(guest, case):
    m, rip, nrip = build(guest, case)
    m.intercept([a for a in case.arm if a in DEFAULT_ON], on=False)
    install_reporting_idt(m)
    r = m.run(timeout=5)
    assert case.code not in r.counts
    if case.native == "halt":
        assert r.reason == "halt", r.detail
    else:
        assert r.reason == "guest-exit" and r.exit_code == case.native, (r.reason, r.detail, r.exit_code)
        if case.native >= 0x100:
            # delivered through the guest IDT: INT n / INT1 / #UD frames hold the return RIP
            ret = rip if case.native == 0x106 else nrip
            assert r.regs["rsi"] == ret




@pytest.mark.parametrize("insn,pre,disarm", [
    (VMMCALL, "mov eax, 7", ["vmmcall"]),             # APM §15.4: VMMCALL not intercepted -> #UD
    (db(OP["skinit"]), "mov eax, 0x100000", ["skinit"]),
    ("into", "mov eax, 7", []),                      # INTO is #UD in 64-bit mode
], ids=["vmmcall", "skinit", "into"])
def test_ud_of_unintercepted_instruction_hits_the_ud_intercept(guest, insn, pre, disarm):
    if insn == "into":
        insn = db(b"\xce")
    m = guest(pre + "\n" + insn + "\n" + hc_exit(DONE))
    if disarm:
        m.intercept(disarm, on=False)
    m.intercept("excp6")
    rec = capture(m, 0x46)
    r = m.run(timeout=5)
    assert r.reason == "captured", r.reason
    assert rec[0].rip == BASE + len(assemble(pre)) and rec[0].nrip == 0


@pytest.mark.parametrize("insn,pre,disarm", [
    (db(OP["skinit"]), "mov eax, 0x100000", ["skinit"]),
    (db(b"\xce"), "mov eax, 7", []),
], ids=["skinit", "into"])
def test_ud_of_unintercepted_instruction_reaches_the_guest_idt(guest, insn, pre, disarm):
    m = guest(pre + "\n" + insn + "\n" + hc_exit(DONE))
    if disarm:
        m.intercept(disarm, on=False)
    install_reporting_idt(m)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 0x106
    assert r.regs["rsi"] == BASE + len(assemble(pre))      # #UD is a fault: RIP of the instruction


def test_rsm_without_intercept_is_ud(guest):
    """kvm-unit-tests rsm: without the RSM intercept, RSM outside SMM is #UD (0x46)."""
    m = guest(db(b"\x0f\xaa") + "\n" + hc_exit(DONE))
    m.intercept("excp6")
    rec = capture(m, 0x46)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].rip == BASE and rec[0].nrip == 0


# -- default handlers continue the guest after each exit ----------------------------
@pytest.mark.parametrize("case", [c for c in CASES if c.id in (
    "cpuid", "rdtsc", "rdtscp", "pause", "wbinvd", "invd", "pushf", "popf", "sgdt", "lgdt", "mov-from-cr3",
    "mov-to-cr3", "mov-from-dr7", "mov-to-dr7", "invlpg", "smsw", "clts")], ids=lambda c: c.id)
def test_default_handler_resumes_after_the_instruction(guest, case):
    m, rip, nrip = build(guest, case)
    m.intercept(case.arm)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == DONE, (r.reason, r.detail)
    assert r.counts.get(case.code) == 1


# ================================================================== CR0 selective write
def cr0_guest(guest, body: str):
    m = guest(body + "\n" + hc_exit(DONE))
    return m, BASE + len(assemble(body.rsplit("\n", 1)[0]))


SET_CD = "mov rax, cr0\nbts rax, 30\nmov cr0, rax"
FLIP_TS = "mov rax, cr0\nxor eax, 8\nmov cr0, rax"
FLIP_MP = "mov rax, cr0\nxor eax, 2\nmov cr0, rax"


def test_sel_cr0_write_setting_cd_exits_0x65(guest):
    """kvm-unit-tests "sel cr0 write intercept"."""
    m, rip = cr0_guest(guest, SET_CD)
    m.intercept("cr0_sel_write")
    rec = capture(m, 0x65)
    r = m.run(timeout=5)
    assert r.reason == "captured" and r.counts == {0x65: 1}
    assert (rec[0].rip, rec[0].nrip, rec[0].info1) == (rip, rip + 3, CR_VALID | 0)
    assert not m.guest.vmcb.CR0 & (1 << 30), "the intercepted write must not happen"


@pytest.mark.parametrize("body", [FLIP_TS, FLIP_MP], ids=["TS", "MP"])
def test_sel_cr0_write_of_ts_or_mp_only_does_not_exit(guest, body):
    """kvm-unit-tests "sel cr0 write nointercept": only TS/MP change -> no exit."""
    m, _ = cr0_guest(guest, body + "\nmov rbx, cr0")
    m.intercept("cr0_sel_write")
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == DONE and 0x65 not in r.counts


def test_cr0_write_wins_over_selective(guest):
    """kvm-unit-tests "sel cr0 write intercept priority": both armed -> 0x10."""
    m, rip = cr0_guest(guest, SET_CD)
    m.intercept(["cr0_sel_write", "cr0_write"])
    rec = capture(m, 0x10, 0x65)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].code == 0x10 and rec[0].rip == rip


def test_clts_does_not_trigger_the_selective_intercept(guest):
    """CLTS changes only TS."""
    m, _ = cr0_guest(guest, "clts\nnop")
    m.intercept("cr0_sel_write")
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == DONE and 0x65 not in r.counts


def test_lmsw_changing_em_exits_0x65(guest):
    m, rip = cr0_guest(guest, "smsw eax\nxor eax, 4\nlmsw ax")
    m.intercept("cr0_sel_write")
    rec = capture(m, 0x65)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].rip == rip and rec[0].nrip == rip + 3
    assert not rec[0].info1 >> 63, "LMSW gives no decode assist (§3)"




@pytest.mark.parametrize("body", ["smsw eax\nxor eax, 2\nlmsw ax",            # MP only (the KUT case)
                                  "smsw eax\nlmsw ax",                        # same value
                                  f"smsw word ptr [{DATA:#x}]\nlmsw word ptr [{DATA:#x}]"],   # memory operand
                         ids=["mp-only", "same-value", "memory-operand"])
def test_lmsw_always_exits_with_selective_intercept(guest, body):
    m, rip = cr0_guest(guest, body)
    m.intercept("cr0_sel_write")
    rec = capture(m, 0x65)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].rip == rip


# ================================================================== IN / OUT
def ioio_info(port, size, is_in, string=False, rep=False, seg=0):
    # Fig. 15-2: TYPE 0, STR 2, REP 3, SZ8/16/32 4-6, A64 9 (64-bit mode), SEG 12:10, PORT 31:16
    v = (port << 16) | {1: 1 << 4, 2: 1 << 5, 4: 1 << 6}[size] | (1 << 9)
    v |= int(is_in) | (int(string) << 2) | (int(rep) << 3)
    if string:
        v |= seg << 10
    return v


SEG_MASK = 7 << 10
IO_CASES = [
    ("in al, 0x80", 0x80, 1, True), ("in ax, 0x80", 0x80, 2, True), ("in eax, 0x80", 0x80, 4, True),
    ("out 0x80, al", 0x80, 1, False), ("out 0x80, ax", 0x80, 2, False), ("out 0x80, eax", 0x80, 4, False),
    ("in al, dx", 0x5678, 1, True), ("in ax, dx", 0x5678, 2, True), ("in eax, dx", 0x5678, 4, True),
    ("out dx, al", 0x5678, 1, False), ("out dx, ax", 0x5678, 2, False), ("out dx, eax", 0x5678, 4, False),
]


@pytest.mark.parametrize("insn,port,size,is_in", IO_CASES, ids=[c[0] for c in IO_CASES])
def test_io_exitinfo(guest, insn, port, size, is_in):
    pre = "mov edx, 0x5678\nmov eax, 0x11223344"
    rip = BASE + len(assemble(pre))
    m = guest(pre + "\n" + insn + "\n" + hc_exit(DONE))
    nrip = rip + insn_length(m.guest.read_phys(rip, 15), rip)
    m.set_ports([port])
    rec = capture(m, 0x7B)
    r = m.run(timeout=5)
    assert r.reason == "captured" and r.counts == {0x7B: 1}
    e = rec[0]
    assert (e.rip, e.nrip, e.info2) == (rip, nrip, nrip)          # EXITINFO2 = next RIP
    assert e.info1 & ~SEG_MASK == ioio_info(port, size, is_in)


@pytest.mark.parametrize("insn,port,size,is_in", IO_CASES, ids=[c[0] for c in IO_CASES])
def test_io_not_in_iopm_runs(guest, insn, port, size, is_in):
    m = guest("mov edx, 0x5678\n" + insn + "\n" + hc_exit(DONE))
    m.set_ports([port + size])                   # the neighbour just past the access
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == DONE and 0x7B not in r.counts


@pytest.mark.parametrize("insn,size", [("in ax, 0x80", 2), ("out 0x80, eax", 4), ("out dx, ax", 2)])
def test_io_multibyte_with_only_a_later_port_bit(guest, insn, size):
    m = guest("mov edx, 0x80\n" + insn + "\n" + hc_exit(DONE))
    m.set_ports([0x80 + size - 1])
    rec = capture(m, 0x7B)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].info1 >> 16 == 0x80


@pytest.mark.parametrize("insn,string_in,rep,seg", [
    ("rep outsb", False, True, 3),                                  # default DS
    ("outsb", False, False, 3),
    ("rep insb", True, True, 0),                                    # INS always uses ES
    ("outs dx, byte ptr fs:[rsi]", False, False, 4),
])
def test_string_io_exitinfo(guest, insn, string_in, rep, seg):
    pre = f"mov esi, {DATA:#x}\nmov edi, {DATA + 0x100:#x}\nmov ecx, 3\nmov edx, 0x80"
    rip = BASE + len(assemble(pre))
    m = guest(pre + "\n" + insn + "\n" + hc_exit(DONE))
    nrip = rip + insn_length(m.guest.read_phys(rip, 15), rip)
    m.set_ports([0x80])
    rec = capture(m, 0x7B)
    r = m.run(timeout=5)
    assert r.reason == "captured"
    e = rec[0]
    assert e.info1 == ioio_info(0x80, 1, string_in, string=True, rep=rep, seg=seg)
    assert (e.rip, e.nrip, e.info2) == (rip, nrip, nrip)


def test_rep_outsb_default_handler_sends_every_byte_to_com1(guest):
    m = guest(f"mov rax, {DATA:#x}\nmov dword ptr [rax], 0x216948\nmov rsi, rax\nmov ecx, 3\nmov edx, 0x3f8\n"
              "rep outsb\n" + hc_exit(DONE))
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.console == "Hi!" and r.counts[0x7B] == 1


# ================================================================== soundness
def run_expect_cpuid(guest, src: str, expect_rip: int | None = None, n: int = 1):
    return expect_cpuid(guest(src + "\n" + hc_exit(DONE)), expect_rip, n)


def expect_cpuid(m, expect_rip: int | None = None, n: int = 1):
    """Run ``m`` (a guest ending with EXIT(DONE)) and expect ``n`` CPUID exits."""
    rips = []

    @m.on(0x72)
    def h(m, e):
        rips.append(m.guest.vmcb.RIP)
        m.guest.vmcb.RIP = m.guest.vmcb.NRIP
        return None
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == DONE, (r.reason, r.detail)
    assert len(rips) == n, f"CPUID exits: {[hex(x) for x in rips]}"
    if expect_rip is not None:
        assert rips[0] == expect_rip
    return m, r


PREFIXED_CPUID = ["0fa2", "660fa2", "2e0fa2", "3e0fa2", "480fa2", "410fa2", "66480fa2", "f30fa2", "f20fa2",
                  "2e3e26640fa2", "6666666666666666666666660fa2"]


@pytest.mark.parametrize("hexbytes", PREFIXED_CPUID)
def test_cpuid_with_legal_prefixes_exits(guest, hexbytes):
    b = bytes.fromhex(hexbytes)
    assert insn_length(b) == len(b)                     # capstone: one CPUID instruction
    run_expect_cpuid(guest, db(b), BASE)




@pytest.mark.parametrize("hexbytes", ["48660fa2", "40480fa2", "4848480fa2"])
def test_cpuid_with_ignored_rex_prefixes_exits(guest, hexbytes):
    b = bytes.fromhex(hexbytes)
    assert insn_length(b) == len(b)
    run_expect_cpuid(guest, db(b), BASE)


@pytest.mark.parametrize("hexbytes", ["9c", "669c", "489c", "2e9c", "66489c"])
def test_pushf_with_prefixes_exits(guest, hexbytes):
    b = bytes.fromhex(hexbytes)
    assert insn_length(b) == len(b)
    m = guest(db(b) + "\n" + hc_exit(DONE))
    m.intercept("pushf")
    rec = capture(m, 0x70)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].rip == BASE and rec[0].nrip == BASE + len(b)


@pytest.mark.parametrize("align", range(16))
@pytest.mark.parametrize("hexbytes", ["0fa2", "662e480fa2"])
def test_cpuid_at_every_alignment(guest, align, hexbytes):
    src = (f".space {align}, 0x90\n" if align else "") + db(bytes.fromhex(hexbytes))
    run_expect_cpuid(guest, src, BASE + align)


@pytest.mark.parametrize("hexbytes,split", [
    ("0fa2", 1),                  # 0F | A2
    ("480fa2", 1),                # REX | 0F A2
    ("480fa2", 2),                # REX 0F | A2
    ("0f01f9", 1),                # RDTSCP: 0F | 01 F9
    ("0f01f9", 2),                # RDTSCP: 0F 01 | F9
])
def test_instruction_straddling_a_page_boundary_exits(guest, hexbytes, split):
    b = bytes.fromhex(hexbytes)
    start = BASE + 0x1000 - split
    src = f".space {start - BASE}, 0x90\n" + db(b)
    code = assemble(src)
    assert code[start - BASE:start - BASE + len(b)] == b
    m = guest(src + "\n" + hc_exit(DONE))
    m.intercept("rdtscp")
    code_ = 0x72 if b.endswith(b"\xa2") else 0x87
    rec = capture(m, code_)
    r = m.run(timeout=5)
    assert r.reason == "captured", r.detail
    assert rec[0].rip == start and rec[0].nrip == start + len(b)


@pytest.mark.parametrize("budget", [0, 1000])
@pytest.mark.parametrize("hexbytes,exitcode", [("0fa2", 0x72), ("0f01f9", 0x87), ("480fa2", 0x72)])
def test_intercepted_instruction_first_on_the_next_page_exits(guest, budget, hexbytes, exitcode):
    """A run of NOPs falls through into the next page, whose first byte begins an
    intercepted instruction: one translated block holds both pages' code, and
    QEMU asks whether a hook covers that instruction before it fetches it (the
    fill that scans the page).  It must exit (APM §15.9: the intercept is checked
    before the instruction executes), with or without an instruction budget
    (whose counting hook on every instruction once hid a missing hook)."""
    b = bytes.fromhex(hexbytes)
    start = BASE + 0x1000
    src = ".space 0x1000, 0x90\n" + db(b)
    m = guest(src + "\n" + hc_exit(DONE))
    m.intercept("rdtscp")
    rec = capture(m, exitcode)
    m.guest.vmcb.RIP = start - 40           # forty NOPs on the first page, then the page boundary
    r = m.run(timeout=5, max_insns=budget)
    assert r.reason == "captured", r.detail
    assert rec[0].rip == start and rec[0].nrip == start + len(b)


def test_plain_instruction_first_on_the_next_page_runs(guest):
    """The first instruction of a page is hooked whatever it is: one that is not
    intercepted (INC EBX) runs exactly once."""
    src = ".space 0x1000 - 40, 0x90\nmov ebx, 7\n.space 35, 0x90\ninc ebx\n" + hc_exit(DONE)
    assert assemble(src)[0x1000:0x1002] == bytes.fromhex("ffc3")
    m = guest(src)
    m.guest.vmcb.RIP = BASE + 0x1000 - 40
    r = m.run(timeout=5)
    assert r.reason == "guest-exit", r.detail
    assert r.regs["rbx"] == 8


def test_cpuid_hidden_in_an_immediate_exits(guest):
    # mov eax, 0x90a20f90 = b8 90 0f a2 90; jumping to its third byte executes 0F A2 = CPUID
    src = "mov rbx, {t}\njmp rbx\nmov eax, 0x90a20f90"
    probe = assemble(src.format(t=0x100000))
    imm_off = len(probe) - 5
    assert probe[imm_off:] == bytes.fromhex("b8900fa290")
    target = BASE + imm_off + 2
    run_expect_cpuid(guest, src.format(t=target) + "\nnop", target)


def test_cpuid_written_at_run_time_into_the_code_page(guest):
    """The buffer runs once as NOPs, is patched to 0F A2, and runs again."""
    src = ("mov rax, buf\ncall rax\nmov word ptr [rax], 0xa20f\ncall rax\n" + hc_exit(DONE) +
           "buf:\nnop\nnop\nret\n")
    body = assemble(src)
    buf = BASE + len(body) - 3
    assert body[-3:] == b"\x90\x90\xc3"
    expect_cpuid(guest(src), buf)


def test_cpuid_written_at_run_time_into_a_fresh_page(guest):
    src = (f"mov rax, {DATA:#x}\nmov dword ptr [rax], 0xc3a20f\ncall rax\n" + hc_exit(DONE))
    run_expect_cpuid(guest, src, DATA)


def test_cpuid_written_through_an_alias_mapping(guest):
    """The code page is also mapped at another GVA; the guest executes it, writes
    0F A2 through the alias and executes it again."""
    alias = 0x1F0000
    src = ("mov rax, buf\ncall rax\nmov rbx, rax\nand ebx, 0xfff\nadd rbx, {alias}\n"
           "mov word ptr [rbx], 0xa20f\ncall rax\n" + hc_exit(DONE) + "buf:\nnop\nnop\nret\n").format(alias=alias)
    body = assemble(src)
    buf = BASE + len(body) - 3
    m = guest(src)
    # guest PTE of the alias GVA -> the code page's GPA (identity tables at CR3 0x2000)
    pte = walk_to_pte(m, alias)
    page = buf & ~0xFFF
    old = int.from_bytes(m.guest.read_phys(pte, 8), "little")
    m.guest.write_phys(pte, ((old & ~0x000F_FFFF_FFFF_F000) | page).to_bytes(8, "little"))
    expect_cpuid(m, buf)


def walk_to_pte(m, va: int) -> int:
    """GPA of the 4 KiB leaf entry for ``va`` in the guest tables at CR3 (APM vol. 2 §5.3)."""
    table = m.guest.vmcb.CR3 & ~0xFFF
    for shift in (39, 30, 21):
        e = int.from_bytes(m.guest.read_phys(table + ((va >> shift) & 0x1FF) * 8, 8), "little")
        assert e & 1 and not e & 0x80
        table = e & 0x000F_FFFF_FFFF_F000
    return table + ((va >> 12) & 0x1FF) * 8


@pytest.mark.parametrize("n", [1, 5])
def test_every_cpuid_in_a_loop_exits(guest, n):
    run_expect_cpuid(guest, f"mov ecx, {n}\nloop_:\npush rcx\nxor eax, eax\ncpuid\npop rcx\ndec ecx\njnz loop_", n=n)


def test_instruction_straddling_into_a_non_adjacent_page(guest):
    """0F at the last byte of the code page; the next *virtual* page is mapped to a
    guest-physical page far away that holds A2 and the rest of the code."""
    far = DATA + 0x10000
    start = BASE + 0xFFF
    m = guest(f".space {start - BASE}, 0x90\n.byte 0x0f")
    m.guest.write_phys(far, b"\xa2" + assemble(hc_exit(DONE), start + 1))
    pte = walk_to_pte(m, BASE + 0x1000)
    old = int.from_bytes(m.guest.read_phys(pte, 8), "little")
    m.guest.write_phys(pte, ((old & ~0x000F_FFFF_FFFF_F000) | far).to_bytes(8, "little"))
    rec = capture(m, 0x72)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].rip == start and rec[0].nrip == start + 2


def test_cpuid_written_ahead_in_the_same_block(guest):
    src = "mov rax, tgt\nmov word ptr [rax], 0xa20f\ntgt:\nnop\nnop"
    target = BASE + len(assemble(src.split("tgt:")[0] + "tgt:\n"))
    run_expect_cpuid(guest, src, target)




def test_hypervisor_patch_of_executed_code_is_seen(guest):
    src = (f"mov rsi, {DATA:#x}\ncall rsi\nmov eax, 5\n{VMMCALL}\nmov rax, cr3\nmov cr3, rax\n"
           "call rsi\n" + hc_exit(DONE))
    m = guest(src)
    m.guest.write_phys(DATA, b"\x90\x90\xc3")
    default = m.handlers[0x81]
    cpuid_rips = []

    @m.on(0x81)
    def patch(m, e):
        if m.regs.rax == 5:
            m.guest.write_phys(DATA, b"\x0f\xa2")
            m.advance(e)
            return None
        return default(m, e)

    @m.on(0x72)
    def cpuid(m, e):
        cpuid_rips.append(e.rip)
        m.advance(e)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == DONE
    assert cpuid_rips == [DATA]


def test_hypervisor_patch_of_not_yet_executed_code_is_intercepted(guest):
    src = f"mov rsi, {DATA:#x}\nmov eax, 5\n{VMMCALL}\ncall rsi\n" + hc_exit(DONE)
    m = guest(src)
    m.guest.write_phys(DATA, b"\x90\x90\xc3")
    default = m.handlers[0x81]

    @m.on(0x81)
    def patch(m, e):
        if m.regs.rax == 5:
            m.guest.write_phys(DATA, b"\x0f\xa2")
            m.advance(e)
            return None
        return default(m, e)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.counts.get(0x72) == 1


# ================================================================== intercepts changed mid-run
def test_intercept_armed_by_a_handler_takes_effect(guest):
    m = guest("xor eax, eax\ncpuid\nrdtsc\n" + hc_exit(DONE))
    default = m.handlers[0x72]

    @m.on(0x72)
    def h(m, e):
        m.intercept("rdtsc")
        return default(m, e)
    r = m.run(timeout=5)
    assert r.counts.get(0x6E) == 1 and r.exit_code == DONE


def test_intercept_disarmed_by_a_handler_takes_effect(guest):
    m = guest("xor eax, eax\ncpuid\nxor eax, eax\ncpuid\n" + hc_exit(DONE))
    default = m.handlers[0x72]

    @m.on(0x72)
    def h(m, e):
        m.intercept("cpuid", on=False)
        return default(m, e)
    r = m.run(timeout=5)
    assert r.counts.get(0x72) == 1 and r.exit_code == DONE


def test_intercept_armed_by_a_raw_vmcb_write(guest):
    """The VMCB is plain memory: setting bit 14 of the dword at 00Ch (RDTSC) by a
    raw DRAM write, with VMCB_CLEAN = 0, must be honoured at the next VMRUN."""
    m = guest("xor eax, eax\ncpuid\nrdtsc\n" + hc_exit(DONE))
    default = m.handlers[0x72]

    @m.on(0x72)
    def h(m, e):
        a = m.guest.vmcb_hpa + 0x00C
        m.mem.write(a, (int.from_bytes(m.mem.read(a, 4), "little") | (1 << 14)).to_bytes(4, "little"))
        return default(m, e)
    r = m.run(timeout=5)
    assert r.counts.get(0x6E) == 1


def test_iopm_bit_set_by_a_handler_takes_effect(guest):
    m = guest("xor eax, eax\ncpuid\nmov edx, 0x5000\nin al, dx\n" + hc_exit(DONE))
    m.set_ports([])
    default = m.handlers[0x72]

    @m.on(0x72)
    def h(m, e):
        base = m.guest.vmcb.IOPM_BASE_PA
        m.mem.write(base + (0x5000 >> 3), b"\x01")
        return default(m, e)
    rec = capture(m, 0x7B)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].info1 >> 16 == 0x5000


# ================================================================== TSC offset
@pytest.mark.parametrize("intercepted", [False, True])
def test_tsc_offset_applies_to_rdtsc(guest, intercepted):
    """§1: TSC_OFFSET is added by RDTSC/RDTSCP (native or through the default handler)."""
    m = guest("rdtsc\nshl rdx, 32\nor rax, rdx\nmov rdi, rax\nshr rdi, 60\nxor eax, eax\n" + VMMCALL)
    m.guest.vmcb.TSC_OFFSET = 5 << 60
    if intercepted:
        m.intercept("rdtsc")
    r = m.run(timeout=5)
    assert r.exit_code == 5


_READ_TSC = "shl rdx, 32\nor rax, rdx\n"


def _r12_to_r14_at_hypercall_5(m) -> dict[str, int]:
    """R12-R14 as the guest's VMMCALL with EAX = 5 leaves them (filled by the run)."""
    seen: dict[str, int] = {}
    default = m.handlers[0x81]

    @m.on(0x81)
    def h(m, e):
        if m.regs.rax == 5:
            seen.update(r12=m.regs.r12, r13=m.regs.r13, r14=m.regs.r14)
            m.advance(e)
            return None
        return default(m, e)
    return seen


def test_native_and_intercepted_tsc_reads_are_one_clock(guest):
    """A native RDTSC (Unicorn adds env->tsc_offset), an intercepted RDTSCP (the
    handler adds TSC_OFFSET to the model's host TSC, calibrated to the same
    clock) and a native RDTSC again: monotonic, with the offset applied."""
    m = guest("rdtsc\n" + _READ_TSC + "mov r12, rax\n"
              "rdtscp\n" + _READ_TSC + "mov r13, rax\n"
              "rdtsc\n" + _READ_TSC + "mov r14, rax\n"
              "mov eax, 5\n" + VMMCALL + "\n" + hc_exit(DONE))
    m.guest.vmcb.TSC_OFFSET = 3 << 60
    m.intercept("rdtscp")
    seen = _r12_to_r14_at_hypercall_5(m)
    r = m.run(timeout=5)
    assert r.exit_code == DONE, r.detail
    a, b, c = seen["r12"], seen["r13"], seen["r14"]
    assert a >> 60 == b >> 60 == c >> 60 == 3
    assert a < b < c and c - a < 1 << 40


def test_native_rdtscp_reads_tsc_aux_and_the_offset(guest):
    m = guest("mov ecx, 0xC0000103\nmov eax, 0x4321\nxor edx, edx\nwrmsr\nxor ecx, ecx\nrdtscp\n"
              "shr edx, 28\nshl edx, 16\nor ecx, edx\nmov edi, ecx\nxor eax, eax\n" + VMMCALL)
    m.set_msrs([])
    m.guest.vmcb.TSC_OFFSET = 3 << 60
    r = m.run(timeout=5)
    assert r.exit_code == 0x3_4321, r.detail


def test_tsc_offset_written_by_a_handler_applies_to_the_next_native_rdtsc(guest):
    """A handler's write to TSC_OFFSET makes the next VMRUN a full one, which
    puts it where Unicorn's RDTSC adds it."""
    m = guest("xor eax, eax\ncpuid\nrdtsc\nmov rdi, rdx\nshr rdi, 28\nxor eax, eax\n" + VMMCALL)
    default = m.handlers[0x72]

    @m.on(0x72)
    def h(m, e):
        m.guest.vmcb.TSC_OFFSET = 6 << 60
        return default(m, e)
    r = m.run(timeout=5)
    assert r.exit_code == 6


# ================================================================== SVM instructions, not intercepted
def test_vmsave_virtualized_writes_the_guest_page(guest):
    """VMSAVE with VMSAVE/VMLOAD virtualization (VIRT_EXT bit 1, §7): rAX is a GPA;
    KernelGsBase lands at offset 620h of that page (§2)."""
    m = guest(f"mov ecx, 0xC0000102\nmov eax, 0x12345678\nmov edx, 0x1abc\nwrmsr\nmov eax, {DATA:#x}\n"
              + db(OP["vmsave"]) + "\n" + hc_exit(DONE))
    m.intercept("vmsave", on=False)
    m.guest.vmcb.VIRT_EXT |= 2
    r = m.run(timeout=5)
    assert r.exit_code == DONE
    assert m.guest.read_phys(DATA + 0x620, 8) == (0x1ABC_1234_5678).to_bytes(8, "little")


def test_vmload_virtualized_reads_the_guest_page(guest):
    m = guest(f"mov eax, {DATA:#x}\n" + db(OP["vmload"]) + "\nmov ecx, 0xC0000082\nrdmsr\nmov edi, eax\n"
              "xor eax, eax\n" + VMMCALL)
    m.guest.write_phys(DATA + 0x608, (0x4321).to_bytes(8, "little"))      # LSTAR at 608h (§2)
    m.intercept("vmload", on=False)
    m.guest.vmcb.VIRT_EXT |= 2
    r = m.run(timeout=5)
    assert r.exit_code == 0x4321


def test_vgif_stgi_clgi_toggle_v_gif(guest):
    """kvm-unit-tests vgif: with vGIF enabled (060h bit 25) STGI/CLGI toggle bit 9."""
    m = guest(db(OP["clgi"]) + f"\nmov eax, 5\n{VMMCALL}\n" + db(OP["stgi"]) + f"\nmov eax, 5\n{VMMCALL}\n"
              + hc_exit(DONE))
    m.intercept(["stgi", "clgi"], on=False)
    m.guest.vmcb.V_INTR |= (1 << 25) | (1 << 9)
    default = m.handlers[0x81]
    seen = []

    @m.on(0x81)
    def h(m, e):
        if m.regs.rax == 5:
            seen.append(m.guest.vmcb.V_INTR >> 9 & 1)
            m.advance(e)
            return None
        return default(m, e)
    r = m.run(timeout=5)
    assert seen == [0, 1] and r.exit_code == DONE


# ================================================================== CPL 3
def test_cpuid_at_cpl3_exits(guest):
    m = user_guest(guest, "xor eax, eax\ncpuid")
    rec = []

    @m.on(0x72)
    def h(m, e):
        rec.append((e.rip, e.nrip, m.guest.vmcb.CPL))
        m.advance(e)
    r = m.run(timeout=5)
    at = user_code_addr("xor eax, eax")
    assert rec == [(at, at + 2, 3)]
    assert r.reason == "guest-exit" and r.exit_code == DONE


def test_pushf_at_cpl3_exits(guest):
    m = user_guest(guest, "pushfq")
    m.intercept("pushf")
    rec = capture(m, 0x70)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].rip == user_code_addr()


PRIV = [
    # privileged instructions at CPL 3: #GP(0) comes before the intercept (APM §15.7)
    ("mov-from-cr3", "mov rax, cr3", "cr3_read", 0x03),
    ("mov-to-cr0", "mov cr0, rax", "cr0_write", 0x10),
    ("mov-from-dr7", "mov rax, dr7", "dr7_read", 0x27),
    ("wbinvd", "wbinvd", "wbinvd", 0x89),
    ("invd", "invd", "invd", 0x76),
    ("rdmsr", "rdmsr", "msr", 0x7C),
    ("lidt", f"lidt [{DATA:#x}]", "idtr_write", 0x6A),
    ("invlpg", "invlpg [rax]", "invlpg", 0x79),
    ("stgi", db(OP["stgi"]), "stgi", 0x84),
    ("clgi", db(OP["clgi"]), "clgi", 0x85),
]


@pytest.mark.parametrize("id_,insn,arm,code", PRIV, ids=[p[0] for p in PRIV])
def test_privileged_instruction_at_cpl3_is_gp_not_an_exit(guest, id_, insn, arm, code):
    m = user_guest(guest, insn)
    m.intercept(arm)
    r = m.run(timeout=5)
    assert code not in r.counts
    assert r.reason == "guest-exit" and r.exit_code == 0x10D, (r.reason, r.detail, r.exit_code)
    assert (r.regs["rsi"], r.regs["rdx"], r.regs["rcx"]) == (0, user_code_addr(), USER_CS)
    # CPL change: the frame is on RSP0 from the TSS and holds the user SS:RSP
    assert r.regs["r9"] == KERNEL_STACK - 48
    assert (r.regs["r11"], r.regs["r12"]) == (USER_STACK, USER_SS)




@pytest.mark.parametrize("armed", [True, False])
def test_hlt_at_cpl3_is_gp(guest, armed):
    m = user_guest(guest, "hlt")
    m.intercept("hlt", on=armed)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 0x10D and r.regs["rdx"] == user_code_addr()


def test_int_n_at_cpl3_through_a_dpl0_gate_is_gp(guest):
    m = user_guest(guest, "int 0x80")
    r = m.run(timeout=5)
    assert r.exit_code == 0x10D and r.regs["rsi"] == 0x80 * 8 + 2 and r.regs["rdx"] == user_code_addr()


def test_port_io_at_cpl3_with_iopl3_exits(guest):
    m = user_guest(guest, "mov edx, 0x3f8\nmov al, 0x58\nout dx, al", rflags=0x3002)
    rec = capture(m, 0x7B)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].info1 >> 16 == 0x3F8




@pytest.mark.parametrize("insn", ["out dx, al", "in al, dx"])
def test_port_io_at_cpl3_with_iopl0_is_gp(guest, insn):
    m = user_guest(guest, f"mov edx, 0x3f8\nmov al, 0x58\n{insn}")
    r = m.run(timeout=5)
    assert r.console == "" and 0x7B not in r.counts
    assert r.exit_code == 0x10D and r.regs["rsi"] == 0




def test_svm_instruction_gp_at_cpl3_hits_the_gp_intercept(guest):
    m = user_guest(guest, db(OP["stgi"]))
    m.intercept("excp13")
    rec = capture(m, 0x4D)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].rip == user_code_addr() and rec[0].info1 == 0


def test_mov_cr_gp_at_cpl3_hits_the_gp_intercept(guest):
    m = user_guest(guest, "mov rax, cr3")
    m.intercept(["excp13", "cr3_read"])
    rec = capture(m, 0x4D)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].rip == user_code_addr() and rec[0].info1 == 0


@pytest.mark.parametrize("intercepted", [False, True])
def test_a_virtual_tsc_is_what_rdtsc_and_rdtscp_read(guest, intercepted):
    """SvmCpu.virtualize_tsc: a RDTSC/RDTSCP the VMCB does not intercept reads the
    clock given plus TSC_OFFSET (the scanner hooks them; Unicorn would read the
    host's clock), RDTSCP's ECX is TSC_AUX; an intercepted one's default handler
    reads the same clock. One clock read per instruction."""
    m = guest("mov ecx, 0xC0000103\nmov eax, 0x4321\nxor edx, edx\nwrmsr\n"
              "rdtsc\n" + _READ_TSC + "mov r12, rax\n"
              "rdtscp\n" + _READ_TSC + "mov r13, rax\nmov r14, rcx\n"
              "mov eax, 5\n" + VMMCALL + "\n" + hc_exit(DONE))
    m.set_msrs([])
    m.guest.vmcb.TSC_OFFSET = 3 << 60
    ticks = iter(range(1000, 100_000, 1000))
    m.cpu.virtualize_tsc(lambda: next(ticks))
    if intercepted:
        m.intercept("rdtsc,rdtscp")
    seen = _r12_to_r14_at_hypercall_5(m)
    r = m.run(timeout=5)
    assert r.exit_code == DONE, r.detail
    assert (seen["r12"], seen["r13"]) == ((3 << 60) + 1000, (3 << 60) + 2000)
    assert r.counts.get(0x6E, 0) == r.counts.get(0x87, 0) == (1 if intercepted else 0)
    if not intercepted:
        assert seen["r14"] == 0x4321
    m.cpu.virtualize_tsc(None)
    assert m.cpu.host_tsc() != next(ticks)          # the host's clock again
