"""A memory fault leaves RFLAGS as the instructions before the faulting one set them.

Unicorn 2.1.4 puts a prologue before every instruction a code hook covers --
with an instruction budget, that is every instruction (its counting hook) --
which, after the hook's call, turns QEMU's lazy flags into their computed form
(``gen_compute_eflags``: cc_src = the flags, cc_op = CC_OP_EFLAGS).  The
instruction's restart record (``tcg_gen_insn_start``) was written before the
prologue, with the lazy operation the flags had there.  A fault inside the
instruction restores that operation (``restore_state_to_opc``) beside the
computed cc_src, and the flags read from the pair are garbage: after
``SUB AL, F0h`` (AL = 0, CF = 1) a faulting load read back CF = 0.  Seed 8's
``--paging shadow --uncounted-every 1`` campaign reported it three times as
``uncounted``: a shadow miss on the load is a #PF exit with the wrong RFLAGS in
the VMCB, the guest resumes with them, and a later Jcc goes the other way in
the counted run only.

The architecture: exceptions are precise, and a fault leaves the state as
it was before the faulting instruction, every earlier instruction completed
(APM vol. 2 §8.1); the #VMEXIT saves that RFLAGS in the VMCB (§15.6, §15.12).
The flags below follow from the instructions' definitions (APM vol. 3).
"""
from __future__ import annotations

import pytest

from sandbox.fuzz.case import Case, VmcbConfig
from sandbox.fuzz.snapshot import Harness
from sandbox.fuzz.uncounted import UncountedReference

EXCP_PF, VMMCALL, SHUTDOWN = 0x4E, 0x81, 0x7F        # APM vol. 2 Appendix C exit codes
PF_FETCH, PF_READ, PF_WRITE = 0x10, 0x0, 0x2          # #PF error codes, page not present
#: the intercepts: SHUTDOWN (misc1 bit 31), VMRUN and VMMCALL (misc2 bits 0-1)
INTERCEPTS = [0, 0, 0, 1 << 31, 0b11, 0]
DATA = 0x1C0000                                       # guest RAM the guest's tables map (not yet shadowed)

BOTH_MODES = pytest.mark.parametrize("max_insns", [1024, 0], ids=["counted", "uncounted"])


def exits_with_rflags(case: Case, max_insns: int) -> list[tuple[int, int, int, int, int]]:
    """The exits, each with the RFLAGS the #VMEXIT saved in the VMCB."""
    h = Harness(paging=case.paging, max_insns=max_insns)
    record, seen = h.m.on_exit_record, []

    def on_exit(rec):
        seen.append((int(rec.exitcode), rec.rip, rec.exitinfo1, rec.exitinfo2, h.m.guest.vmcb.RFLAGS))
        record(rec)
    h.m.on_exit_record = on_exit
    out = h.run(case, audit=False)
    assert out.result is not None, out.crash
    return seen


@BOTH_MODES
def test_a_shadow_miss_on_a_load_keeps_the_carry_of_the_sub_before_it(max_insns):
    """SUB AL, F0h with AL = 0: 10h with a borrow, CF = 1 and OF, SF, ZF, AF,
    PF = 0 (10h has one bit set), so RFLAGS = 3 (bit 1 is always 1).  MOV CL,
    [RBX] then misses the shadow (a #PF exit, the entry installed, the guest
    resumed) and JB is taken: VMMCALL at +9, not the one at +6."""
    code = bytes.fromhex("2cf0" "8a0b" "7203" "0f01d9" "0f01d9")
    case = Case(code, 0x800, VmcbConfig(intercepts=INTERCEPTS), {"rax": 0, "rbx": DATA}, "hand", paging="shadow")
    e = 0x100800
    assert exits_with_rflags(case, max_insns)[:3] == [(EXCP_PF, e, PF_FETCH, e, 0x2),
                                         (EXCP_PF, e + 2, PF_READ, DATA, 0x3),
                                         (VMMCALL, e + 9, 0, 0, 0x3)]


@BOTH_MODES
def test_a_fault_on_a_push_keeps_the_overflow_an_imul_cleared(max_insns):
    """IMUL EAX, EAX, 1 with EAX = 0: the product fits, CF = OF = 0 (SF, ZF,
    AF, PF undefined); after ADD EAX, 0 (ZF = PF = 1, CF = OF = SF = AF = 0) the
    flags are 46h.  IMUL EAX, ECX, 1 (ECX = 0) makes them QEMU's MUL form again
    with CF = OF = 0; PUSH RAX then misses the shadow on the stack (a write,
    not present), and JNO is taken.  OF and CF at the exit are those of the
    IMUL (0); the undefined ones are not compared."""
    code = bytes.fromhex("83c000" "6bc101" "50" "7103" "0f01d9" "0f01d9")
    case = Case(code, 0x800, VmcbConfig(intercepts=INTERCEPTS), {"rax": 0, "rcx": 0}, "hand", paging="shadow")
    e = 0x100800
    exits = exits_with_rflags(case, max_insns)
    push = [x for x in exits if x[0] == EXCP_PF and x[1] == e + 6]
    assert push and push[0][2] == PF_WRITE
    assert push[0][4] & 0x801 == 0                   # OF, CF
    assert exits[-1][:2] == (VMMCALL, e + 12)


#: seed 8's three ``uncounted`` findings (``--paging shadow --uncounted-every 1``), minimized
SEED8 = [
    Case(bytes.fromhex("6a041cb1d77662aadfc7107a471e"), 2993, VmcbConfig([0, 0, 0, 0x80000000, 1, 0]),
         {"rbx": 0x1C0720, "rdi": 0x1C0598, "rax": 0x40000000}, "random-bytes, minimized", paging="shadow"),
    Case(bytes.fromhex("89d16941eb0072eda7c89cdbef6d711336d2b9022dadba658dea77d9647f399ab999ceca"), 7547,
         VmcbConfig([0x100110, 0x20001, 0x3010020, 0xAF399E40, 0x4585, 0x4]),
         {"rbx": 0x1C0460, "rsi": 0x1C0140, "rdi": 0x1C0720, "rbp": 0x1C06E8, "rax": 0x248749EE10CC06AE,
          "rcx": 0x3, "rdx": 0xCF8}, "random-bytes, minimized", paging="shadow"),
    Case(bytes.fromhex("2cf0d7bae6810fab728d"), 6917, VmcbConfig([0, 0, 0, 0x80000000, 1, 0]),
         {"rax": 0x40000000}, "random-bytes, minimized", paging="shadow"),
]
#: where each ends: the Jcc after the faulting instruction is taken (CF = 1 after
#: SBB AL, B1h from 0 and SUB AL, F0h from 0; OF = 0 after an IMUL whose product fits)
SEED8_END = [0x100C1A, 0x101D9E, 0x101A9C]


@pytest.mark.parametrize("case,end", list(zip(SEED8, SEED8_END)), ids=["8993cd4ce08e", "b42aff3058f9", "bbe4e97a0e13"])
def test_seed8_shadow_findings_end_alike_counted_and_uncounted(case, end):
    out = Harness(paging="shadow").run(case, audit=False)
    assert out.result is not None and out.result.rip == end, out.result
    assert UncountedReference("shadow").compare(case, out) == []


#: the exception intercepts (word 2): #DE (vector 0) and #GP (13)
DE, GP = 0, 13
EXCP_DE, EXCP_GP = 0x40, 0x4D


@BOTH_MODES
def test_a_divide_error_keeps_the_carry_of_the_sub_before_it(max_insns):
    """SUB AL, F0h with AL = 0 (CF = 1, RFLAGS 3, as above), then DIV CL with
    CL = 0: #DE, a fault (APM vol. 3 DIV; vol. 2 §8.2.1), raised by QEMU's
    division helper inside the instruction -- intercepted, the #VMEXIT saves the
    flags the SUB left."""
    code = bytes.fromhex("2cf0" "f6f1" "0f01d9")
    cfg = VmcbConfig(intercepts=[0, 0, 1 << DE, 1 << 31, 0b11, 0])
    case = Case(code, 0x800, cfg, {"rax": 0, "rcx": 0}, "hand")
    exits = exits_with_rflags(case, max_insns)
    assert exits[0][0] == EXCP_DE and exits[0][1] == 0x100802 and exits[0][4] == 0x3, exits


@BOTH_MODES
def test_a_general_protection_fault_in_a_helper_keeps_the_flags(max_insns):
    """SUB AL, F0h (RFLAGS 3), then MOV SS, CX with CX = 13h: the selector's RPL
    (3) is not the CPL (0), #GP(selector) (APM vol. 3 MOV Sreg), raised by QEMU's
    segment-load helper inside the instruction: the #VMEXIT saves RFLAGS 3."""
    code = bytes.fromhex("2cf0" "8ed1" "0f01d9")
    cfg = VmcbConfig(intercepts=[0, 0, 1 << GP, 1 << 31, 0b11, 0])
    case = Case(code, 0x800, cfg, {"rax": 0, "rcx": 0x13}, "hand")
    exits = exits_with_rflags(case, max_insns)
    assert exits[0][0] == EXCP_GP and exits[0][1] == 0x100802 and exits[0][4] == 0x3, exits
