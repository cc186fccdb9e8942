"""A run's outcome does not depend on whether its instructions are counted.

With an instruction budget, Unicorn calls its counting hook before every
instruction; without one it calls only the hooks on candidate instructions.
Translated blocks differ (the counting hook's call before each instruction),
the model's hooks must not: a case that neither reaches its budget nor reads
the time (RDTSC/RDTSCP read a clock counted in instructions) ends the same
way -- reason, final RIP, every #VMEXIT with its RIP -- in both.  This once
failed on an intercepted instruction at the first byte of a page a block ran
into, which only the counting hook's calls had hidden.
"""
import dataclasses
import random

from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from sandbox.fuzz import snapshot as S
from sandbox.fuzz.case import CODE_WINDOW
from sandbox.fuzz.generate import next_case

N_CASES = 900
#: a case that loops for ever without a budget ends at this wall-clock limit instead
LIMIT_S = 0.2
_TIME_READS = (b"\x0f\x31", b"\x0f\x01\xf9")         # RDTSC, RDTSCP
_MD = Cs(CS_ARCH_X86, CS_MODE_64)


def _across_a_page(case, rng: random.Random):
    """``case`` placed so that one of its instructions (after the first) begins
    exactly at the code window's second page: the block from its entry runs on
    into that page (half of the cases), or as generated."""
    starts = [i.address for i in _MD.disasm(case.code, 0)][1:]
    if not starts or rng.random() < 0.5:
        return case
    off = 0x1000 - rng.choice(starts)
    if not 0 <= off <= CODE_WINDOW - len(case.code):
        return case
    return dataclasses.replace(case, offset=off)


def _outcome(out):
    r = out.result
    return (str(r.reason), r.rip, [(int(e.exitcode), e.rip) for e in out.exits]) if r else (out.crash,)


def test_counted_and_uncounted_runs_end_alike(monkeypatch):
    rng = random.Random(20261202)
    cases = [_across_a_page(c, rng) for c in (next_case(rng, []) for _ in range(N_CASES))
             if not any(t in c.code for t in _TIME_READS)]
    counted, uncounted = S.Harness(), S.Harness()
    uncounted.max_insns = 0
    compared, differ = 0, []
    for c in cases:
        a = counted.run(c, audit=False)
        monkeypatch.setattr(S, "DEFAULT_TIMEOUT_S", LIMIT_S)
        try:
            b = uncounted.run(c, audit=False)
        finally:
            monkeypatch.setattr(S, "DEFAULT_TIMEOUT_S", 5.0)
        if a.result is not None and a.result.reason == "insn-budget":
            continue
        if b.result is not None and b.result.reason == "timeout":
            continue
        compared += 1
        if _outcome(a) != _outcome(b):
            differ.append((hex(c.entry), c.code.hex(), _outcome(a), _outcome(b)))
    assert compared > N_CASES // 2
    assert not differ, differ[:3]
