"""A translated block that runs on into the next page raises no fault for it.

QEMU 5.0 (Unicorn 2.1) fetches every instruction of a block when it translates
it, before the block's first instruction runs, and lets a block run on across
a page boundary.  When the next page's fetch fails, the fault came at the
block's start -- RIP there, CR2 (or the #NPF's GPA) on the next page -- with
none of the block's instructions run.  Seed 3's ``--paging shadow`` campaign
with ``--uncounted-every 1`` reported it three times as ``uncounted``: the
shadow starts every case empty, so the next code page's fetch is a shadow
miss, and the uncounted run (whose blocks, with no counting hook's calls, are
long enough to reach the page) took one #PF exit more than the counted one.
A counted run's blocks reach the next page too when they start near it.

The processor raises an instruction-fetch fault only for the instruction
whose bytes are missing, every earlier instruction completed (APM vol. 2
§8.1: exceptions are precise, the saved rIP is the faulting instruction's;
§8.2.15: CR2 is the linear address that faulted); a #NPF reports the GPA in
EXITINFO2 and, for a fetch of a not-present page, EXITINFO1 = bit 32 (final
translation) | I/D (bit 4) | U (bit 2, nested walks are user accesses)
(APM vol. 2 §15.25.6).  Expected values below are those.
"""
from __future__ import annotations

import pytest

from sandbox.fuzz.case import Case, VmcbConfig
from sandbox.fuzz.snapshot import Harness
from sandbox.fuzz.uncounted import UncountedReference

NPF, EXCP_PF, SHUTDOWN = 0x400, 0x4E, 0x7F          # APM vol. 2 Appendix C exit codes
NPF_FETCH_NOT_PRESENT = 1 << 32 | 0x10 | 0x4
PF_FETCH, PF_READ = 0x10, 0x0                        # #PF error codes, page not present

#: the intercepts: SHUTDOWN (misc1 bit 31), VMRUN and VMMCALL (misc2 bits 0-1)
INTERCEPTS = [0, 0, 0, 1 << 31, 0b11, 0]

BOTH_MODES = pytest.mark.parametrize("max_insns", [1024, 0], ids=["counted", "uncounted"])


def _exits(case: Case, max_insns: int) -> list[tuple[int, int, int, int]]:
    out = Harness(paging=case.paging, max_insns=max_insns).run(case, audit=False)
    assert out.result is not None, out.crash
    return [(int(e.exitcode), e.rip, e.exitinfo1, e.exitinfo2) for e in out.exits]


@BOTH_MODES
def test_a_block_running_on_into_an_absent_page_faults_at_that_page(max_insns):
    """A store and ten NOPs end at 0x101000, which the nested tables leave
    not present: they all complete, then the fetch at 0x101000 is the #NPF."""
    code = bytes.fromhex("c70734120000") + b"\x90" * 10      # mov dword [rdi], 0x1234; nop x10
    case = Case(code, 0x1000 - len(code), VmcbConfig(intercepts=INTERCEPTS, npt=[(0x101000, False, True, True)]),
                {"rdi": 0x1C0000}, "hand")
    assert _exits(case, max_insns) == [(NPF, 0x101000, NPF_FETCH_NOT_PRESENT, 0x101000)]


@BOTH_MODES
def test_an_instruction_crossing_into_an_absent_page_faults_at_its_start(max_insns):
    """Six NOPs, then MOV EAX, imm32 from 0x100ffe into 0x101000 (not present):
    the NOPs complete and the MOV, whose bytes are missing, takes the #NPF."""
    code = b"\x90" * 6 + bytes.fromhex("b878563412")
    case = Case(code, 0x1000 - 8, VmcbConfig(intercepts=INTERCEPTS, npt=[(0x101000, False, True, True)]), {}, "hand")
    assert _exits(case, max_insns) == [(NPF, 0x100ffe, NPF_FETCH_NOT_PRESENT, 0x101000)]


@BOTH_MODES
def test_shadow_the_first_instruction_faults_before_the_next_page_is_fetched(max_insns):
    """Shadow paging, XOR [RAX], EAX 32 bytes before the page end (zeros after
    it) with RAX unmapped in the guest's tables: the shadow miss on the code
    page, then the instruction's read #PF -- reflected into a guest with no
    IDT (limit 0: #GP, then #DF, then shutdown, APM vol. 2 §8.2.9).  No #PF
    names 0x101000, which no instruction that ran reached."""
    case = Case(bytes.fromhex("3100"), 0xFE0, VmcbConfig(intercepts=INTERCEPTS), {"rax": 0x40000000}, "hand",
                paging="shadow")
    assert _exits(case, max_insns) == [(EXCP_PF, 0x100FE0, PF_FETCH, 0x100FE0),
                                       (EXCP_PF, 0x100FE0, PF_READ, 0x40000000),
                                       (SHUTDOWN, 0x100FE0, 0, 0)]


#: seed 3's three ``uncounted`` findings (``--paging shadow --uncounted-every 1``, 3,505 cases), minimized
SEED3 = [
    Case(bytes.fromhex("8906ed0f0096"), 3533, VmcbConfig([0, 0, 0, 0x88001000, 1, 0], [129]), {"rdx": 0x7F},
         "mutation, minimized", paging="shadow"),
    Case(bytes.fromhex("31"), 7843, VmcbConfig([0, 0, 0, 0x80000000, 1, 0]), {"rax": 0x40000000},
         "mutation, minimized", paging="shadow"),
    Case(bytes.fromhex("8b4f4801e801f89d"), 7657, VmcbConfig([0, 0, 0, 0x80020000, 1, 0]),
         {"rdi": 0x1C0140, "rbp": 0x1C04E8}, "mutation, minimized", paging="shadow"),
]


@pytest.mark.parametrize("case", SEED3, ids=["0136488d7c54", "8ae464b5a77e", "e97bd97a7b86"])
def test_seed3_shadow_findings_end_alike_counted_and_uncounted(case):
    """Each case runs straight on from its entry to its last exit without
    leaving its first code page: no fetch #PF may name the page after it."""
    out = Harness(paging="shadow").run(case, audit=False)
    page = case.entry & ~0xFFF
    fetches = [e.exitinfo2 & ~0xFFF for e in out.exits if e.exitcode == EXCP_PF and e.exitinfo1 & PF_FETCH]
    assert fetches == [page], fetches
    assert UncountedReference("shadow").compare(case, out) == []


@pytest.mark.parametrize("code,mode,expected", [
    (bytes(4), 64, 2),                                 # ADD [RAX], AL twice (00 /r, ModRM 00)
    (bytes(5), 64, 2),                                 # the fifth byte begins a cut-off ADD
    (b"\x90" + bytes.fromhex("b8785634"), 64, 1),      # NOP, then MOV EAX, imm32 missing its last byte
    (bytes.fromhex("66b87856") + b"\x90", 64, 2),      # MOV AX, imm16 (66h), then NOP
    (bytes.fromhex("66b87856") + b"\x90", 16, 0),      # in a 16-bit segment 66h makes it imm32: cut off
    (b"\x90" * 600, 64, 511),                          # at most a block's worth (QEMU's CF_COUNT_MASK)
])
def test_instructions_wholly_on_a_page_are_counted_by_their_encodings(code, mode, expected):
    """The shortened block's count: instructions that decode back to back and
    end within the bytes given (lengths from the encodings, APM vol. 3 §1.1)."""
    from sandbox.svm.decode import whole_insns
    assert whole_insns(code, mode, 511) == expected


def test_a_block_whose_first_instruction_capstone_does_not_decode_is_cut_too():
    """Seed 11's ``--paging shadow`` finding: LOCK PUSH RDI (F0 57; #UD on the
    processor, APM vol. 3 §1.2.5, a PUSH to QEMU) and zeros to the page end.
    Capstone decodes no instruction there, and the cut once took that for the
    first instruction reaching the next page: the uncounted run's fetch #PF for
    0x102000 came at the block's start.  No instruction that ran reached it."""
    case = Case(bytes.fromhex("f057"), 7801, VmcbConfig([0, 0, 0, 0x80000000, 1, 0]),
                {"rax": 0xD305EAC5267702E}, "mutation, minimized", paging="shadow")
    page = case.entry & ~0xFFF
    for max_insns in (1024, 0):
        out = Harness(paging="shadow", max_insns=max_insns).run(case, audit=False)
        fetches = [e.exitinfo2 & ~0xFFF for e in out.exits if e.exitcode == EXCP_PF and e.exitinfo1 & PF_FETCH]
        assert fetches == [page], (max_insns, fetches)
