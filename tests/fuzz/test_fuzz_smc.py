"""The self-modifying-code generator reaches issue 10's stale-code escape: an
armed instruction stored ahead of the running translated block (after a decoy
store that, before the fix, turned Unicorn's self-modifying-code check off for
the page) and run without a branch.

Measured on the code before the fix with this generator (seed, cases, seconds
to the first "missed" finding, one worker, every case audited): seed 2 -- 21
cases, 0.3 s; seed 3 -- 74 cases, 1.4 s; seed 1 -- 595 cases, 12 s. The same
seeds run 3,000 cases each on the fixed code with no finding.
"""
from __future__ import annotations

import random

from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from sandbox.fuzz import campaign as C
from sandbox.fuzz.generate import SLED, _smc_patch, gen_smc

SEED, CASES = 2, 200


def test_seeded_smc_campaign_finds_no_escape():
    opts = C.Options(seed=SEED, cases=CASES, audit=True, minimize=False, differential_every=0)
    w = C.Worker(opts, 0)
    found = []
    for _ in range(CASES):
        found += w.step()
    assert not found, [str(f) for f in found]
    assert w.stats.execs == CASES


def test_smc_patch_runs_into_its_sled_without_a_branch():
    """The patch sequence decodes to straight-line code: jmp over the decoy's 8
    bytes, LEA, stores, (sometimes a jmp to the next byte), then the NOP sled."""
    cs = Cs(CS_ARCH_X86, CS_MODE_64)
    rng = random.Random(0)
    seen_widths = set()
    for _ in range(300):
        b = _smc_patch(rng)
        assert b[:2] == b"\xeb\x08" and b[-SLED:] == b"\x90" * SLED
        insns = list(cs.disasm(b[10:len(b) - SLED], 0))
        assert sum(i.size for i in insns) == len(b) - SLED - 10
        assert insns[0].mnemonic == "lea"
        seen_widths |= {i.op_str.split(" ptr")[0] for i in insns if "ptr [rdi" in i.op_str and i.mnemonic != "lea"}
        seen_widths |= {"rep movsb" for i in insns if i.mnemonic == "rep movsb"}
    assert {"byte", "word", "dword", "qword", "xmmword", "rep movsb"} <= seen_widths


def test_gen_smc_fits_the_code_window():
    rng = random.Random(1)
    for _ in range(200):
        c = gen_smc(rng)
        assert c.offset + len(c.code) <= 0x2000
