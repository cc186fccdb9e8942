"""RFLAGS across a restart inside an instruction a code hook covers, counted or not.

Unicorn 2.1.4's prologue before a hooked instruction turns the lazy flags
into their computed form after the hook's call, while the instruction's
restart record keeps the lazy operation from before it (see
``tests/fuzz/test_fault_flags.py``).  Any restart inside such an instruction
restores that operation beside the computed cc_src.  The run loop repaired
it for a fault in a counted slice only.  Two more restarts of the same kind
reached the guest (seeds 27 and 28, ``--uncounted-every 1``):

- a fault in an *uncounted* slice inside an instruction the processor hooks
  itself -- a candidate, such as INSB -- (seed 28, ``--paging shadow``: a
  shadow miss on INSB's store, the #PF exit saved RFLAGS with OF and CF set);
- QEMU giving up a store into the block that runs it (precise self-modifying
  code: the instruction runs again as a block of its own) in a *counted*
  slice (seed 27: ``ADD EAX, EAX`` then ``MOV [RIP+0], ECX`` writing the
  next instruction, which then saw CF = 1).

The architecture: a fault leaves the state as before the faulting
instruction (APM vol. 2 §8.1) and the #VMEXIT saves that RFLAGS (§15.6);
a store into the instruction stream is seen by the instructions after it,
and changes no flag (APM vol. 2 §7.6.1; vol. 3 MOV).
"""
from __future__ import annotations

import pytest

from sandbox.fuzz.case import Case, VmcbConfig
from sandbox.fuzz.snapshot import Harness
from sandbox.fuzz.uncounted import UncountedReference
from tests.fuzz.test_fault_flags import exits_with_rflags

EXCP_PF, VMMCALL = 0x4E, 0x81                          # APM vol. 2 Appendix C exit codes
PF_FETCH, PF_WRITE = 0x10, 0x2
IOIO = 1 << 27                                         # misc1 bit 27
INTERCEPTS = [0, 0, 0, 1 << 31, 0b11, 0]              # SHUTDOWN, VMRUN, VMMCALL
DATA = 0x1C0000

BOTH_MODES = pytest.mark.parametrize("max_insns", [1024, 0], ids=["counted", "uncounted"])


def _run(case: Case, max_insns: int) -> list[tuple[int, int, int, int]]:
    """The exits (EXITCODE, RIP, EXITINFO1), each with the RFLAGS the #VMEXIT saved."""
    return [(code, rip, info1, rflags) for code, rip, info1, _, rflags in exits_with_rflags(case, max_insns)]


@BOTH_MODES
@pytest.mark.parametrize("ioio", [False, True], ids=["ioio-off", "ioio-on"])
def test_a_shadow_miss_on_insb_keeps_the_carry_of_the_sub_before_it(max_insns, ioio):
    """SUB AL, F0h with AL = 0: CF = 1, the others 0 (RFLAGS 3).  INSB (port
    1F0h, not in the IOPM) stores to [RDI], a page the shadow does not map
    yet: a #PF exit saving RFLAGS 3; resumed, JB is taken to the VMMCALL at
    +8, not the one at +5."""
    code = bytes.fromhex("2cf0" "6c" "7203" "0f01d9" "0f01d9")
    words = list(INTERCEPTS)
    if ioio:
        words[3] |= IOIO
    case = Case(code, 0x800, VmcbConfig(intercepts=words), {"rax": 0, "rdi": DATA, "rdx": 0x1F0}, "hand",
                paging="shadow")
    e = 0x100800
    assert _run(case, max_insns)[:3] == [(EXCP_PF, e, PF_FETCH, 0x2),
                                         (EXCP_PF, e + 2, PF_WRITE, 0x3),
                                         (VMMCALL, e + 8, 0, 0x3)]


#: the bytes MOV [RIP+0], RCX writes over the instruction after it:
#: JB +3; VMMCALL; VMMCALL
PATCH = int.from_bytes(bytes.fromhex("7203" "0f01d9" "0f01d9"), "little")


@BOTH_MODES
def test_a_store_into_the_next_instruction_keeps_the_flags_of_the_add_before_it(max_insns):
    """ADD EAX, EAX with EAX = 0: CF = OF = SF = AF = 0, ZF = PF = 1 (RFLAGS
    46h).  MOV [RIP+0], RCX then writes JB +3 and two VMMCALLs over the
    instruction after it, in the block that is running: the JB is not taken,
    the first VMMCALL exits, with RFLAGS 46h."""
    code = bytes.fromhex("01c0" "48890d00000000")
    case = Case(code, 0x800, VmcbConfig(intercepts=INTERCEPTS), {"rax": 0, "rcx": PATCH}, "hand")
    e = 0x100800 + len(code)
    assert _run(case, max_insns)[:1] == [(VMMCALL, e + 2, 0, 0x46)]


#: the two findings, minimized by hand
SEED27 = Case(bytes.fromhex("01c0890d"), 7461, VmcbConfig([0, 0, 0x100, 0x80000000, 0x1, 0]), {"rcx": 0x1B},
              "grammar, minimized")
SEED28 = Case(bytes.fromhex("66ed0dbab386fe2c066ce462882e716a84c0b02e2c3d63f8b15056da8398911c20db2fd8c006"),
              7470, VmcbConfig([0, 0, 0, 0x80000000, 0x1, 0]),
              {"rsi": 0x1C07E0, "rdi": 0x1C0148, "rax": 0x40000000, "rdx": 0x1F0}, "mutation, minimized",
              paging="shadow")


@pytest.mark.parametrize("case", [SEED27, SEED28], ids=["seed27", "seed28"])
def test_seed27_and_seed28_findings_end_alike_counted_and_uncounted(case):
    out = Harness(paging=case.paging).run(case, audit=False)
    assert out.result is not None, out.crash
    assert UncountedReference(case.paging).compare(case, out) == []
