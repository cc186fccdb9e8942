"""The counting oracle (``--uncounted-every``): a case ends alike with and without counting.

The bug it is for is put back by hand here: the hook on the first byte of the
page after each code page scanned (``svm/scanner.py``), without which a
candidate there is translated unhooked.  A counted run often still exits there
(the counting hook's call before every instruction finds the late hook when
the code runs); the uncounted run then differs, and the oracle must say so.
"""
import json
import subprocess
import sys

from sandbox.fuzz import campaign as C
from sandbox.fuzz.case import Case, VmcbConfig
from sandbox.fuzz.generate import TERMINATOR
from sandbox.fuzz.snapshot import Harness
from sandbox.fuzz.uncounted import UncountedReference, comparable
from sandbox.svm import engine as E

CPUID_BIT = 0x72 - 0x60            # misc1 word: CPUID intercept (exit code 0x72)


def _cpuid_at_the_page_start() -> Case:
    """Twelve NOPs on the code window's first page, CPUID at the second's first byte."""
    code = b"\x90" * 12 + b"\x0f\xa2" + TERMINATOR
    cfg = VmcbConfig(intercepts=[0, 0, 0, 1 << CPUID_BIT | 1 << 31, 0b11, 0])   # + SHUTDOWN; VMRUN, VMMCALL
    return Case(code, 0x1000 - 12, cfg, {}, "hand")


def _without_page_head_hooks(monkeypatch):
    """Put the bug back: no hook is added on a page's first byte through ``add``
    (the scanner's page-head hooks; candidates go through ``add_new``)."""
    real = E.CodeHooks.add

    def add(self, addr):
        if addr & 0xFFF:
            real(self, addr)
    monkeypatch.setattr(E.CodeHooks, "add", add)


def test_the_counted_run_exits_at_the_page_start():
    out = Harness().run(_cpuid_at_the_page_start(), audit=False)
    assert [(int(e.exitcode), e.rip) for e in out.exits][:1] == [(0x72, 0x101000)]
    assert comparable(out)


def test_a_candidate_hooked_too_late_is_a_finding(monkeypatch):
    case = _cpuid_at_the_page_start()
    out = Harness().run(case, audit=False)          # counted, and hooked in time: CPUID exits
    _without_page_head_hooks(monkeypatch)           # the reference machine is built without them
    msgs = UncountedReference().compare(case, out)
    assert len(msgs) == 1 and msgs[0][0] == "uncounted" and "CPUID at 0x101000" in msgs[0][1], msgs


def test_with_the_hook_the_runs_end_alike():
    case = _cpuid_at_the_page_start()
    out = Harness().run(case, audit=False)
    assert UncountedReference().compare(case, out) == []


def test_a_campaign_comparing_every_case_finds_nothing():
    w = C.Worker(C.Options(seed=3, cases=300, uncounted_every=1, differential_every=0, minimize=False))
    found = [f for _ in range(300) for f in w.step()]
    assert w.stats.uncounted == 300
    assert not [f for f in found if f.kind == "uncounted"], found[:2]


def test_the_campaign_finds_the_bug(monkeypatch):
    """Seed 1's campaign, the bug put back: the oracle reports it within 3,000 cases."""
    _without_page_head_hooks(monkeypatch)
    w = C.Worker(C.Options(seed=1, cases=3000, uncounted_every=1, differential_every=0, audit_every=0,
                           minimize=False))
    for _ in range(3000):
        if any(f.kind == "uncounted" for f in w.step()):
            return
    raise AssertionError("no uncounted finding in 3,000 cases with the page-head hooks gone")


def _cli(*args: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "sandbox.cli", *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr


def test_cli_flag():
    rc, text = _cli("fuzz", "--cases", "40", "--seed", "2", "--json", "--uncounted-every", "2",
                    "--differential-every", "0", "--no-status")
    assert rc == 0, text
    assert json.loads(text.strip().splitlines()[-1])["uncounted"] == 20
    rc, text = _cli("fuzz", "--cases", "5", "--uncounted-every", "-1")
    assert rc == 2 and len(text.strip().splitlines()) == 1 and "--uncounted-every" in text, text


def _flags_case() -> Case:
    """ADD RCX, RAX; PUSHF (16-bit); MOV RCX, 0xABD; MOV RAX, [RSI+RCX+0Ah];
    ADD RAX, RBP; SLDT SI; then the terminator.  With the SLDT and #DB intercepts."""
    code = bytes.fromhex("4801c1" "669c" "48c7c1bd0a0000" "488b440e0a" "4801e8" "660f00c6") + TERMINATOR
    ldtr_read, db = 0x68 - 0x60, 1
    cfg = VmcbConfig(intercepts=[0, 0, 1 << db, 1 << ldtr_read | 1 << 31, 0b11, 0])
    return Case(code, 0x100, cfg, {"rax": 0x1C0000, "rbp": 0x1C01C0, "rsi": 0x1C0400}, "hand")


def _pushf_hooked(h: Harness) -> None:
    """A case that intercepts PUSHF first: the scanner hooks PUSHF from then on."""
    pushf = 0x70 - 0x60
    h.run(Case(b"\x9c\x58" + TERMINATOR, 0, VmcbConfig(intercepts=[0, 0, 0, 1 << pushf | 1 << 31, 0b11, 0])),
          audit=False)


def test_rflags_at_an_exit_in_the_middle_of_a_block_without_a_budget():
    """The SLDT exit saves RFLAGS as ADD RAX, RBP left it (APM §15.6), and the
    guest resumes with it: TF stays clear, so no #DB follows, as in a counted run.
    Unicorn did not sync its lazy flags before the SLDT hook (the PUSHF hook before
    it in the block saw the same ADD operation) and RFLAGS read RBP as flags."""
    ends = []
    for budget in (1024, 0):
        h = Harness(max_insns=budget)
        _pushf_hooked(h)
        out = h.run(_flags_case(), audit=False)
        ends.append([(int(e.exitcode), e.rip) for e in out.exits])
    entry = 0x100100
    assert ends[0][:1] == [(0x68, entry + 20)] and 0x41 not in [c for c, _ in ends[0]]
    assert ends[1] == ends[0], ends
