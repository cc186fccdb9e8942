"""`sandbox fuzz`: case files, the snapshot harness, the oracles, planted bugs, the CLI.

Independent checks: the snapshot is verified against a full copy of DRAM
taken by the test; planted bugs are defects whose APM-correct behaviour the
audit model must contradict; CLI errors are checked by exit status and text.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sandbox.cli import main
from sandbox.fuzz import campaign as C
from sandbox.fuzz.case import CODE_BASE, DATA_BASE, Case, CaseError, VmcbConfig
from sandbox.fuzz.generate import TERMINATOR, gen_grammar, gen_random_bytes, gen_smc, mutate, random_config
from sandbox.fuzz.oracle import coverage, findings, minimize
from sandbox.fuzz.planted import plant, unplant
from sandbox.fuzz.snapshot import Harness

import random

CPUID = b"\x0f\xa2"
POPF16 = b"\x66\x9d"
VMMCALL_BIT = (4, 1)


def words(*codes: int) -> list[int]:
    w = [0] * 6
    w[4] |= 1                                  # VMRUN (a VMRUN consistency requirement)
    for c in codes:
        w[c >> 5] |= 1 << (c & 31)
    return w


@pytest.fixture(scope="module")
def harness():
    return Harness()


@pytest.fixture(scope="module")
def auditing():
    return Harness(audit=True)


def test_case_roundtrip(tmp_path):
    c = Case(b"\x90" + TERMINATOR, 0xFFE, VmcbConfig(words(0x72), [0x80, 0x10002], [(0x10, True, False)],
                                                      [(DATA_BASE, True, False, True)]), {"rcx": 5}, "t")
    p = tmp_path / "x.case"
    c.save(p)
    d = Case.load(p)
    assert d == c


#: a well-formed case with one field added (``%s``)
_CASE = '{"format": "sandbox-fuzz-case", "version": 1, "code": "90", "intercepts": ["0","0","0","0","0","0"], %s}'


def test_the_case_template_itself_loads(tmp_path):
    p = tmp_path / "ok.case"
    p.write_text(_CASE % '"npt": [["0x1c0000", true, false, true]], "msrpm": [["0xc0000080", 1, 0]]')
    c = Case.load(p)
    assert c.config.npt == [(0x1C0000, True, False, True)] and c.config.msrpm == [(0xC0000080, True, False)]


@pytest.mark.parametrize("text,msg", [
    ("not json", "not JSON"),
    ('{"format": "other"}', "not a sandbox-fuzz-case"),
    ('{"format": "sandbox-fuzz-case", "version": 1, "code": "zz", "intercepts": []}', "malformed"),
    ('{"format": "sandbox-fuzz-case", "version": 1, "code": "90", "offset": 9000, "intercepts": []}', "does not fit"),
    ('{"format": "sandbox-fuzz-case", "version": 1, "code": "90", "intercepts": ["0x1"]}', "six 32-bit"),
    ('{"format": "sandbox-fuzz-case", "version": 1, "code": "90", "intercepts": ["0","0","0","0","0","0"], '
     '"paging": "shadow", "sev": true}', "SEV with nested paging only"),
    (_CASE % '"offset": 1.5', "whole number of bytes"),
    (_CASE % '"offset": true', "whole number of bytes"),
    (_CASE % '"msrpm": [["-1", true, true]]', "MSR outside 0-0xffffffff"),
    (_CASE % '"msrpm": [["0x100000000", true, false]]', "MSR outside 0-0xffffffff"),
    (_CASE % '"msrpm": [["0x10", "yes", false]]', "expected true or false"),
    (_CASE % '"npt": [["0x100123", true, true, true]]', "not a 4 KiB page"),
    (_CASE % '"npt": [["-0x1000", true, true, true]]', "not a 4 KiB page"),
    (_CASE % '"npt": [["0x10000000000000", true, true, true]]', "not a 4 KiB page"),
    (_CASE % '"origin": ["grammar"]', "'origin' must be a string"),
])
def test_corrupt_case_files(tmp_path, text, msg):
    p = tmp_path / "bad.case"
    p.write_text(text)
    with pytest.raises(CaseError, match=msg):
        Case.load(p)


def test_generators_fit_and_are_seeded():
    a = [gen_grammar(random.Random(5)) for _ in range(3)]
    b = [gen_grammar(random.Random(5)) for _ in range(3)]
    assert a == b
    rng = random.Random(1)
    for _ in range(200):
        for g in (gen_grammar, gen_random_bytes, gen_smc):
            c = g(rng)
            assert 0 <= c.offset and c.offset + len(c.code) <= 0x2000
            m = mutate(rng, c)
            assert 0 <= m.offset and m.offset + len(m.code) <= 0x2000
    # page straddling happens
    rng = random.Random(2)
    assert any(c.offset < 0x1000 < c.offset + len(c.code) for c in (gen_grammar(rng) for _ in range(50)))
    cfg = random_config(random.Random(3))
    assert len(cfg.intercepts) == 6


@pytest.fixture(scope="module")
def shadow_harness():
    return Harness(paging="shadow")


@pytest.fixture(scope="module")
def sev_harness():
    return Harness(sev=True)


@pytest.mark.parametrize("gen", [gen_smc, gen_grammar, gen_random_bytes])
@pytest.mark.parametrize("paging", ["nested", "shadow", "sev"])
def test_snapshot_restores_every_byte(request, gen, paging):
    """After cases that write data, stack, page tables (A/D bits) and their own
    code -- and, under shadow paging, the hypervisor's shadow tables -- host
    DRAM equals the snapshot byte for byte (a full comparison here), with the
    tracked restore alone: the periodic full comparison is off."""
    harness = request.getfixturevalue({"nested": "harness", "shadow": "shadow_harness", "sev": "sev_harness"}[paging])
    dram = harness.m.mem.size      # above DRAM: the processor's plaintext cache of SEV pages, not memory
    base = bytes(harness.mm[:dram])
    rng = random.Random(7)
    harness.check_free_every = 0
    try:
        for _ in range(40):
            out = harness.run(gen(rng))
            assert out.dirty_pages > 0
            assert bytes(harness.mm[:dram]) == base
    finally:
        harness.check_free_every = 16


def test_full_comparison_restores_what_tracking_missed(harness):
    """A write no tracked path reports (straight into the buffer) is found and
    restored by the periodic full comparison, and counted."""
    base = bytes(harness.mm)
    page = harness.m.guest.ram[0x1F0000]          # RAM no case touches
    before = harness.untracked
    harness.check_free_every = 1
    try:
        harness.mm[page + 5] ^= 0xFF
        harness.run(Case(TERMINATOR, 0, VmcbConfig(words())))
    finally:
        harness.check_free_every = 16
    assert harness.untracked == before + 1
    assert bytes(harness.mm) == base


def _missed_write(h: Harness, victim: int, at: int, times: int = 1 << 30):
    """Make the CPUID handler store straight into DRAM (no tracked path sees it)
    at ``victim`` when the CPUID is at ``at`` -- up to ``times`` times.  Returns
    a function that takes the handler back."""
    old = h.m.handlers[0x72]
    left = [times]

    def leaky(m, e):
        if e.rip == at and left[0] > 0:
            left[0] -= 1
            h.mm[victim] = 0x5A
        return old(m, e)
    h.m.handlers[0x72] = leaky
    return lambda: h.m.handlers.__setitem__(0x72, old)


def _cpuid_at(offset: int) -> Case:
    return Case(CPUID + TERMINATOR, offset, VmcbConfig(words(0x72, 0x81)))


@pytest.mark.parametrize("culprit", [1, 3])
def test_replay_pins_a_missed_write_on_its_case(harness, culprit):
    """With the full comparison every 4th case, a write no tracked path reports,
    made by the 2nd (or the 4th) case of the window into a page the guest does
    not own, is found at the 4th case and pinned on the case that made it by
    replaying the window one case at a time: exact blame, DRAM restored."""
    base = bytes(harness.mm)
    victim = harness.free_ranges[0][0] + 0x123
    cases = [_cpuid_at(0x40 if i == culprit else 8 * i) for i in range(4)]
    undo = _missed_write(harness, victim, CODE_BASE + 0x40)
    try:
        harness.run(cases[0], full=True)              # an empty window to start from
        harness.check_free_every = 4
        before = harness.untracked
        outs = [harness.run(c) for c in cases]
    finally:
        undo()
        harness.check_free_every = 16
    assert all(not o.isolation and not o.earlier for o in outs[:3]), [o.isolation for o in outs]
    if culprit == 3:
        assert outs[3].earlier == [] and outs[3].isolation == [f"host page {victim & ~0xFFF:#x} outside the guest's "
                                                               "memory, VMCB and tables changed"]
    else:
        assert outs[3].isolation == []
        assert [(c, [m[:len("host page 0x")] for m in ms]) for c, ms in outs[3].earlier] == [(cases[1], ["host page 0x"])]
        assert f"{victim & ~0xFFF:#x}" in outs[3].earlier[0][1][0]
    assert harness.untracked == before + 1
    assert bytes(harness.mm) == base


def test_replay_that_does_not_reproduce_names_the_window(harness):
    """A missed write the replay does not make again (here: made once only) is
    still reported, on the case whose comparison found it, naming the cases."""
    base = bytes(harness.mm)
    victim = harness.free_ranges[0][0] + 0x321
    undo = _missed_write(harness, victim, CODE_BASE + 0x40, times=1)
    try:
        harness.run(_cpuid_at(0), full=True)
        harness.check_free_every = 3
        first = harness.cases_run + 1
        outs = [harness.run(_cpuid_at(o)) for o in (0x40, 0, 8)]
    finally:
        undo()
        harness.check_free_every = 16
    assert [o.isolation for o in outs[:2]] == [[], []] and outs[2].earlier == []
    msg, = outs[2].isolation
    assert f"{victim & ~0xFFF:#x}" in msg and f"cases {first}-{first + 2}" in msg and "did not change it" in msg
    assert bytes(harness.mm) == base


def test_a_missed_write_to_guest_memory_is_counted_not_replayed(harness, monkeypatch):
    """A missed write into the guest's own RAM is no isolation finding: the full
    comparison restores and counts it, and replays nothing (there is no one to blame)."""
    base = bytes(harness.mm)
    undo = _missed_write(harness, harness.m.guest.ram[0x1F0000] + 9, CODE_BASE + 0x40)
    runs = []
    real = harness.run
    try:
        harness.run(_cpuid_at(0), full=True)
        harness.check_free_every = 3
        before = harness.untracked
        monkeypatch.setattr(harness, "run", lambda c, full=None: runs.append(c) or real(c, full))
        outs = [harness.run(_cpuid_at(o)) for o in (0x40, 0, 8)]
    finally:
        monkeypatch.undo()
        undo()
        harness.check_free_every = 16
    assert len(runs) == 3 and all(not o.isolation and not o.earlier for o in outs)
    assert harness.untracked == before + 1 and bytes(harness.mm) == base


def test_campaign_saves_the_replayed_culprit(tmp_path, monkeypatch):
    """The campaign saves a finding the replay pinned on an earlier case with
    that case as its reproducer (minimized with a full comparison per run)."""
    cases = iter([_cpuid_at(0), _cpuid_at(0x40), _cpuid_at(8), _cpuid_at(16)])
    monkeypatch.setattr(C, "next_case", lambda rng, corpus, n: next(cases))
    w = C.Worker(C.Options(seed=1, cases=4, audit=True, differential_every=0, crashes=tmp_path, arcs=False))
    h = w.auditing
    h.check_free_every = 4
    undo = _missed_write(h, h.free_ranges[0][0] + 7, CODE_BASE + 0x40)
    try:
        fresh = [f for _ in range(4) for f in w.step()]
    finally:
        undo()
    assert [f.kind for f in fresh] == ["isolation"]
    saved, = tmp_path.glob("isolation-*.case")
    assert Case.load(saved).offset == 0x40 and Case.load(saved).code.startswith(CPUID)


def test_case_file_carries_its_machine(tmp_path):
    """A case saved from a shadow-paging or SEV campaign replays on that machine."""
    for paging, sev in (("shadow", False), ("nested", True)):
        c = Case(b"\x31\xc0" + CPUID + TERMINATOR, 0, VmcbConfig(words(0x72, 0x81)), paging=paging, sev=sev)
        p = tmp_path / f"{paging}-{sev}.case"
        c.save(p)
        assert Case.load(p) == c
        rc, text = run_cli("run", str(p), "--audit", "--json")
        assert rc == 0, text
        exits = [json.loads(line)["exitcode"] for line in text.splitlines() if line.startswith('{"exitcode"')]
        assert 0x72 in exits and (0x4E in exits) == (paging == "shadow"), exits    # the shadow MMU's #PF exits


def test_shadow_campaign_keeps_the_shadow_mmu_armed(shadow_harness):
    """Under shadow paging a case that arms nothing still runs on the shadow
    MMU: its #PF exits are the hypervisor's (hidden from the differential), and
    a CPUID it does not arm does not exit."""
    c = Case(b"\x48\x89\x04\x25\x00\x00\x1c\x00" + CPUID + TERMINATOR, 0, VmcbConfig(words(0x81)))   # mov [0x1c0000], rax
    out = shadow_harness.run(c)
    codes = [e.exitcode for e in out.exits]
    assert 0x4E in codes and 0x72 not in codes and codes[-1] == 0x81, codes     # APM Table C-1: #PF 4Eh
    assert not findings(out)
    assert shadow_harness.hypervisor_exits(c) >= {0x4E, 0x03, 0x13, 0x79}       # #PF, CR3 read/write, INVLPG
    assert Harness().hypervisor_exits(c) == frozenset()


def test_sev_case_code_is_ciphertext_in_dram(sev_harness):
    """An SEV case's code sits in DRAM encrypted (the bytes are not there in
    the clear), yet the guest runs it: CPUID exits at its address."""
    code = b"\x31\xc0" + CPUID + TERMINATOR
    c = Case(code, 0, VmcbConfig(words(0x72, 0x81)))
    sev_harness.apply(c)
    hpa = sev_harness.m.guest.ram[CODE_BASE]
    assert code not in bytes(sev_harness.mm[hpa:hpa + 0x1000])
    sev_harness.restore()
    out = sev_harness.run(c)
    vmmcall = CODE_BASE + 4 + TERMINATOR.index(b"\x0f\x01\xd9")      # the terminator's hypercall
    assert [(e.exitcode, e.rip) for e in out.exits] == [(0x72, CODE_BASE + 2), (0x81, vmmcall)]
    assert not findings(out)


def test_cpuid_case_exits_and_resumes(harness):
    c = Case(b"\x31\xc0" + CPUID + TERMINATOR, 0, VmcbConfig(words(0x72, 0x81)))
    out = harness.run(c)
    assert [e.exitcode for e in out.exits] == [0x72, 0x81]
    assert out.exits[0].rip == CODE_BASE + 2 and out.exits[0].nrip == CODE_BASE + 4
    assert out.result.reason == "guest-exit" and not findings(out)
    assert (0x72, 0, "handle_cpuid") in coverage(out)


def test_robustness_oracle_reports_a_raising_handler(harness):
    c = Case(CPUID + TERMINATOR, 0, VmcbConfig(words(0x72, 0x81)))

    def bad(m, e):
        raise RuntimeError("boom")
    old = harness.m.handlers[0x72]
    harness.m.handlers[0x72] = bad
    try:
        fs = findings(harness.run(c))
    finally:
        harness.m.handlers[0x72] = old
    assert [f.kind for f in fs] == ["crash"] and "boom" in fs[0].message


def test_isolation_oracle_reports_a_host_write(harness):
    """A (deliberately broken) handler writes into a host page the guest does not own."""
    c = Case(CPUID + TERMINATOR, 0, VmcbConfig(words(0x72, 0x81)))
    victim = harness.free_ranges[0][0]
    old = harness.m.handlers[0x72]

    def leaky(m, e):
        m.mem.write(victim, b"\x01")
        return old(m, e)
    harness.m.handlers[0x72] = leaky
    harness.check_free_every = 1
    try:
        fs = findings(harness.run(c))
    finally:
        harness.m.handlers[0x72] = old
        harness.check_free_every = 16
    assert any(f.kind == "isolation" and f"{victim:#x}" in f.message for f in fs)
    assert harness.mm[victim] == 0           # restored


def test_audit_clean_on_correct_cases(auditing):
    c = Case(b"\x31\xc0" + CPUID + b"\x9c\x9d" + POPF16 + TERMINATOR, 0, VmcbConfig(words(0x72, 0x71, 0x81)),
             {"rsp": 0x90000})
    out = auditing.run(c)
    assert not out.audit, [str(a) for a in out.audit]
    assert [e.exitcode for e in out.exits][:2] == [0x72, 0x71]


def test_audit_catches_planted_popf_bug(auditing):
    c = Case(b"\x66\x6a\x02" + POPF16 + TERMINATOR, 0, VmcbConfig(words(0x71, 0x81)))    # push word 2; popf (16-bit)
    plant("popf-66")()
    try:
        out = auditing.run(c)
    finally:
        unplant()
    assert [a.kind for a in out.audit] == ["missed"]
    assert "popf" in out.audit[0].insn and out.audit[0].rip == CODE_BASE + 3
    assert not auditing.run(c).audit          # the real decision is right


def test_audit_checks_every_iteration_of_a_rep_string_io(auditing):
    """REP OUTSB/OUTSW to port 80h with the IOIO intercept armed: with only port
    81h's IOPM bit set, the byte form runs its 3 iterations with no exit and the
    audit is clean; with the IOPM check planted to ignore a word access's second
    byte, the word form exits on none of its 3 iterations although each touches
    port 81h (APM §15.10.2), and the audit names each of them."""
    regs = {"rsi": DATA_BASE, "rcx": 3, "rdx": 0x80}
    cfg = VmcbConfig(words(0x7B, 0x81), [0x81])
    clean = auditing.run(Case(b"\xf3\x6e" + TERMINATOR, 0, cfg, dict(regs)))
    assert not clean.audit and not clean.exits[:-1], [str(a) for a in clean.audit]
    assert auditing.auditor.steps >= 3 + 3                         # 3 iterations, then the terminator
    plant("iopm-2nd-byte")()
    try:
        out = auditing.run(Case(b"\x66\xf3\x6f" + TERMINATOR, 0, cfg, dict(regs)))
    finally:
        unplant()
    # (Unicorn steps a REP instruction once more with rCX = 0, and the audit counts that step too)
    assert len(out.audit) >= 3 and {(a.kind, a.rip) for a in out.audit} == {("missed", CODE_BASE)}, \
        [str(a) for a in out.audit]


@pytest.mark.parametrize("split", [1, 2])
def test_audit_reads_an_instruction_across_a_page_boundary(auditing, split):
    """A 16-bit POPF (push word 2; 66 9D) whose bytes straddle the code window's
    page boundary, after `split` of its bytes: with POPF-66h planted the audit
    still names the missed intercept at its first byte."""
    popf = b"\x66\x66\x9d"                       # a redundant 66h keeps it a 16-bit POPF
    pre = b"\x66\x6a\x02"
    offset = 0x1000 - len(pre) - split
    c = Case(pre + popf + TERMINATOR, offset, VmcbConfig(words(0x71, 0x81)))
    plant("popf-66")()
    try:
        out = auditing.run(c)
    finally:
        unplant()
    assert [a.kind for a in out.audit] == ["missed"], [str(a) for a in out.audit]
    assert out.audit[0].rip == CODE_BASE + 0x1000 - split and "popf" in out.audit[0].insn
    assert not auditing.run(c).audit


def test_audit_reports_a_spurious_exit_on_an_opcode_no_intercept_names(auditing, monkeypatch):
    """A decision that (wrongly) exits with CPUID's EXITCODE on INTO (CE, #UD in
    64-bit mode, named by no instruction intercept): the audit, which settles
    that opcode without a decode, still calls the exit spurious."""
    from sandbox.fuzz import planted
    from sandbox.svm.decision import ExitInfo, decide
    from sandbox.svm.decode import Kind

    def wrong(insn, v, rip, code):
        return ExitInfo(0x72) if insn.kind == Kind.INTO else decide(insn, v, rip, code)
    monkeypatch.setattr(planted, "decision", lambda: wrong)
    c = Case(b"\x90\xce" + TERMINATOR, 0, VmcbConfig(words(0x72, 0x81)))
    out = auditing.run(c)
    assert [(a.kind, a.rip) for a in out.audit] == [("spurious", CODE_BASE + 1)], [str(a) for a in out.audit]
    assert "0x72" in out.audit[0].detail
    monkeypatch.undo()
    assert not auditing.run(c).audit


def test_minimizer_keeps_the_finding(auditing):
    pre = b"\x90" * 6 + b"\x48\xc7\xc0\x01\x00\x00\x00" * 4 + b"\x0f\xa2"      # NOPs, mov rax, 1, CPUID
    c = Case(pre + b"\x66\x6a\x02" + POPF16 + TERMINATOR, 0,
             VmcbConfig(words(0x72, 0x71, 0x81, 0x7B), [0x80, 0x81], [(0x10, True, True)]), {"rbx": DATA_BASE})
    plant("popf-66")()
    try:
        sig = lambda case: any(f.kind == "missed" for f in findings(auditing.run(case)))
        assert sig(c)
        small = minimize(c, sig)
        assert sig(small)
    finally:
        unplant()
    assert len(small.code) < len(c.code) and small.config.iopm == [] and small.config.msrpm == []


@pytest.mark.parametrize("bug,seed,paging,sev", [("popf-66", 2, "nested", False), ("iopm-2nd-byte", 1, "nested", False),
                                                  ("popf-66", 2, "shadow", False), ("iopm-2nd-byte", 1, "shadow", False),
                                                  ("popf-66", 2, "nested", True)])
def test_seeded_campaign_finds_planted_bug(bug, seed, paging, sev):
    """A short seeded audit campaign finds each planted decision bug, under
    nested and shadow paging and in an SEV guest (the measured seeds find them
    within a few hundred cases: a few seconds)."""
    opts = C.Options(seed=seed, cases=2000, audit=True, minimize=False, differential_every=0, paging=paging, sev=sev)
    found = []

    class Stop(Exception):
        pass

    patch = plant(bug)
    w = C.Worker(opts, 0, patch)
    try:
        for _ in range(opts.cases):
            fresh = w.step()
            found += [f for f in fresh if f.kind == "missed"]
            if found:
                break
    finally:
        unplant()
    assert found, f"{bug} not found in {w.stats.execs} cases"
    assert ("popf" if bug == "popf-66" else "") in found[0].message


def run_cli(*args: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "sandbox.cli", *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr


def test_cli_campaign_is_reproducible(tmp_path):
    out = []
    for i in range(2):
        rc, text = run_cli("fuzz", "--cases", "150", "--seed", "4", "--json", "--no-minimize",
                           "--differential-every", "50",
                           "--crashes", str(tmp_path / f"c{i}"), "--corpus", str(tmp_path / f"k{i}"))
        assert rc in (0, 1), text
        d = json.loads(text.strip().splitlines()[-1])
        out.append((d["execs"], d["exits"], d["ends"], d["coverage"]))
    assert out[0] == out[1] and out[0][0] == 150
    assert sorted(os.listdir(tmp_path / "k0")) == sorted(os.listdir(tmp_path / "k1"))


def test_cli_bad_input(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "x.case").write_text("{broken")
    rc, text = run_cli("fuzz", "--cases", "5", "--corpus", str(tmp_path / "corpus"))
    assert rc == 2 and "corrupt case file" in text and "Traceback" not in text
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        rc, text = run_cli("fuzz", "--cases", "5", "--crashes", str(ro))
        assert rc == 2 and "not writable" in text and "Traceback" not in text
    finally:
        ro.chmod(0o700)
    rc, text = run_cli("fuzz", "--cases", "5", "--jobs", str((os.cpu_count() or 1) + 1))
    assert rc == 2 and "cores" in text
    rc, text = run_cli("fuzz")
    assert rc == 2 and "--seconds or --cases" in text


def test_cli_unwritable_crash_dir_as_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    rc, text = run_cli("fuzz", "--cases", "5", "--crashes", str(f))
    assert rc == 2 and "a file, not a directory" in text and "Traceback" not in text


def test_replay_saved_case_with_sandbox_run(tmp_path, capsys):
    c = Case(b"\x31\xc0" + CPUID + TERMINATOR, 0, VmcbConfig(words(0x72, 0x81)))
    p = tmp_path / "r.case"
    c.save(p)
    assert main(["run", str(p), "--audit", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["exitcode"] for x in lines[:-1]] == [0x72, 0x81]
    assert lines[-1]["final"] and lines[-1]["findings"] == []
    (tmp_path / "bad.case").write_text("nope")
    assert main(["run", str(tmp_path / "bad.case")]) == 2


def test_jobs_two_workers_share_the_corpus(tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    opts = C.Options(seed=1, cases=120, jobs=2, corpus=tmp_path / "k", crashes=tmp_path / "c", audit_every=0,
                     minimize=False, differential_every=0)
    stats, secs, interrupted = C.run(opts)
    assert stats.execs == 120 and not interrupted
    names = os.listdir(tmp_path / "k")
    assert any(n.startswith("w0-") for n in names) and any(n.startswith("w1-") for n in names)


def test_ctrl_c_keeps_corpus_and_prints_summary(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "fuzz", "--seconds", "60", "--seed", "2",
                          "--corpus", str(tmp_path / "k"), "--no-status"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list((tmp_path / "k").glob("*.case")):
        time.sleep(0.2)          # (not just any file: the directory check writes a probe file first)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err                 # as `sandbox run` after Ctrl-C
    assert "interrupted;" in err and "cases in" in err and "Traceback" not in err
    assert any((tmp_path / "k").iterdir())
    for f in (tmp_path / "k").iterdir():
        Case.load(f)                         # every kept corpus file is whole


# -- the differential reference: Unicorn's bundled QEMU SVM ------------------------------
def test_qemu_reference_agrees_on_cpuid_and_pushf():
    from sandbox.fuzz.differential import QemuSvm
    q = QemuSvm()
    c = Case(b"\x31\xc0" + CPUID + b"\x9c" + TERMINATOR, 0, VmcbConfig(words(0x72, 0x70, 0x81)))
    e = q.first_exit(c)
    assert (e.exitcode, e.rip) == (0x72, CODE_BASE + 2)          # APM Table C-1: CPUID 0x72
    c = Case(b"\x31\xc0" + CPUID + b"\x9c" + TERMINATOR, 0, VmcbConfig(words(0x70, 0x81)))
    e = q.first_exit(c)
    assert (e.exitcode, e.rip) == (0x70, CODE_BASE + 4)          # CPUID not armed: PUSHF is first


def test_differential_flags_a_planted_bug(harness):
    """With POPF-66h planted, the sandbox runs past the 16-bit POPF that QEMU intercepts."""
    from sandbox.fuzz.differential import differential
    c = Case(b"\x66\x6a\x02" + POPF16 + TERMINATOR, 0, VmcbConfig(words(0x71, 0x81)))
    assert differential(c, harness.run(c).exits) == []
    plant("popf-66")()
    try:
        d = differential(c, harness.run(c).exits)
    finally:
        unplant()
    assert len(d) == 1 and "sandbox 0x81" in d[0] and "QEMU 0x71" in d[0]


def test_audit_models_mwaitx_as_mwait(auditing):
    """MONITORX/MWAITX hit the MONITOR(X)/MWAIT(X) intercepts (APM Table B-1, misc2
    bits 10-11); the audit once called the sandbox's exit spurious."""
    c = Case(b"\x31\xc9\x31\xc0\x0f\x01\xfb" + TERMINATOR, 0, VmcbConfig(words(0x8B, 0x81)))
    out = auditing.run(c)
    assert out.exits[0].exitcode == 0x8B and not out.audit, [str(a) for a in out.audit]


def test_differential_allows_qemu_rdtscp_as_rdtsc_after_self_modification(harness):
    """QEMU checks the RDTSC bit for RDTSCP (allow-list 'rdtscp'); the bytes are only
    written at run time, so the check must look at memory at the exit, not the case."""
    from sandbox.fuzz.differential import QemuSvm, differential
    code = bytes.fromhex("b80f01f9488d3d05000000890790909090909090eb00") + TERMINATOR
    c = Case(code, 0x581, VmcbConfig(words(0x6E, 0x81)))          # RDTSC armed, RDTSCP not
    q = QemuSvm().first_exit(c)
    assert q.exitcode == 0x6E and q.insn.startswith(b"\x0f\x01\xf9")
    assert differential(c, harness.run(c).exits) == []
    c = Case(b"\x67\x36\x66\x4c\x0f\x01\xf9" + TERMINATOR, 0, VmcbConfig(words(0x6E, 0x81)))   # with prefixes
    assert differential(c, harness.run(c).exits) == []


def test_audit_ignores_crdr_opcode_bytes_inside_an_immediate(auditing):
    """mov edx, 0xe3200f95 ends in the bytes of MOV rbx, CR4 (0F 20 E3): not a CR read."""
    c = Case(bytes.fromhex("c7c2950f20e3") + TERMINATOR, 0, VmcbConfig(words(0x04, 0x81)))
    out = auditing.run(c)
    assert not out.audit, [str(a) for a in out.audit]
    c = Case(bytes.fromhex("0f20e3") + TERMINATOR, 0, VmcbConfig(words(0x04, 0x81)))   # the real one
    out = auditing.run(c)
    assert out.exits[0].exitcode == 0x04 and out.exits[0].exitinfo1 == (1 << 63) | 3 and not out.audit


def test_differential_allows_qemu_intercepting_sev_status(harness):
    """APM §15.34.10: SEV_STATUS (C001_0131h) is never intercepted; QEMU applies the MSRPM."""
    from sandbox.fuzz.differential import QemuSvm, differential
    c = Case(b"\x0f\x32\xf4", 0, VmcbConfig(words(0x7C, 0x78), msrpm=[(0xC001_0131, True, True)]),
             {"rcx": 0xC001_0131})
    q = QemuSvm().first_exit(c)
    assert q.exitcode == 0x7C and q.ecx == 0xC001_0131
    out = harness.run(c)
    assert out.exits[0].exitcode == 0x78                   # the sandbox runs RDMSR, then exits on HLT
    assert differential(c, out.exits) == []


def test_differential_allows_qemu_exiting_on_a_locked_instruction(harness):
    """LOCK RDTSC is #UD at decode (APM vol. 3 §1.2.5), before the RDTSC intercept:
    the sandbox raises it; QEMU ignores the prefix and exits (allow-list 'lock-ud').
    The sandbox's run ends in a shutdown (no IDT), which is never compared, so its
    first exit is stood in for by the next instruction's, as a guest with a #UD
    handler would reach it."""
    from types import SimpleNamespace

    from sandbox.fuzz.differential import QemuSvm, differential
    c = Case(b"\xf0\x0f\x31\xf4", 0, VmcbConfig(words(0x6E, 0x78)))
    q = QemuSvm().first_exit(c)
    assert (q.exitcode, q.rip) == (0x6E, CODE_BASE)             # QEMU: the RDTSC exit
    out = harness.run(c)
    assert out.exits == [] and out.result.reason == "shutdown"   # the sandbox: #UD, #GP, #DF, shutdown
    hlt = SimpleNamespace(exitcode=0x78, rip=CODE_BASE + 3, exitinfo1=0)
    assert differential(c, [hlt]) == []
    c = Case(b"\x0f\x31\xf4", 0, VmcbConfig(words(0x6E, 0x78)))  # without LOCK it is compared
    assert differential(c, [hlt]) != []


def test_differential_allows_cpuid_values_of_another_cpu_model(harness):
    """Seed 107's finding: CPUID (not intercepted) with EAX = FFFFFFFFh left a
    model-specific ECX, which RDMSR then used as the MSR number -- one processor's
    value fell in the MSRPM's ranges, the EPYC reference's did not (allow-list
    'cpuid-model').  With CPUID armed both stop on it, and it is compared."""
    from sandbox.fuzz.differential import QemuSvm, differential
    code = bytes.fromhex("e5488b15faffffff0fa20f320f31eb")          # in eax,48h; mov edx,[rip-6]; cpuid; rdmsr; rdtsc
    npt = [(0x101000, True, False, False)]
    msrpm = [(0xC000_0081, False, True), (0xC000_0101, True, True)]
    regs = {"rax": 1, "rcx": 0xC000_0103, "rdx": 0xFBC7_24DE_1A71_2919}
    c = Case(code, 4026, VmcbConfig(words(0x6E, 0x7C, 0x80), msrpm=msrpm, npt=npt), regs)
    s, q = harness.run(c).exits[0], QemuSvm().first_exit(c)
    assert (s.exitcode, q.exitcode) == (0x6E, 0x7C)           # the two models did diverge after CPUID
    assert differential(c, harness.run(c).exits) == []
    armed = Case(code, 4026, VmcbConfig(words(0x72, 0x6E, 0x7C, 0x80), msrpm=msrpm, npt=npt), regs)
    out = harness.run(armed)
    assert out.exits[0].exitcode == 0x72 and QemuSvm().first_exit(armed).exitcode == 0x72
    assert differential(armed, out.exits) == []


def test_cases_do_not_inherit_translations():
    """A case that rewrites a guest PTE leaves translations in the ASID-tagged
    TLB; the snapshot restores the PTE, so the next case must walk again and
    see the restored mapping (found when the tagged TLB met the fuzzer)."""
    from conftest import assemble
    pte = 0x5000 + ((DATA_BASE >> 12) & 0x1FF) * 8       # the loader's identity PT for the first 2 MiB
    remap = assemble(f"mov rdi, {pte:#x}\nmov qword ptr [rdi], {DATA_BASE + 0x1000 | 3:#x}\n"
                     f"mov rbx, {DATA_BASE:#x}\nmov rax, [rbx]\n", CODE_BASE) + TERMINATOR
    probe = assemble(f"mov rbx, {DATA_BASE:#x}\nmov qword ptr [rbx + 0x1000], 0x77\nmov rsi, [rbx]\n",
                     CODE_BASE) + TERMINATOR
    cfg = VmcbConfig(words(0x81))
    fresh = Harness().run(Case(probe, 0, cfg)).result.regs["rsi"]
    h = Harness()
    h.run(Case(remap, 0, cfg))
    assert h.run(Case(probe, 0, cfg)).result.regs["rsi"] == fresh == 0


def test_reused_qemu_reference_matches_a_fresh_one():
    """One QEMU Unicorn reused case after case reports the same first exit (and
    the same guest exception) as a new Unicorn per case."""
    from sandbox.fuzz.differential import QemuSvm
    reused = QemuSvm()
    rng = random.Random(11)
    seen = set()
    for i in range(40):
        c = (gen_smc, gen_grammar, gen_random_bytes)[i % 3](rng)
        fresh = QemuSvm()
        want, got = fresh.first_exit(c), reused.first_exit(c)
        assert got == want and reused.last_event == fresh.last_event, c
        seen.add(want.exitcode if want else None)
    assert len(seen) > 3                  # the cases exit in different ways


def test_cli_sev_needs_nested_paging():
    rc, text = run_cli("fuzz", "--cases", "5", "--sev", "--paging", "shadow")
    assert rc == 2 and "--sev needs nested paging" in text and "Traceback" not in text


def test_sev_case_code_is_not_shadowed_by_stale_plaintext(sev_harness):
    """Regression (seed 303 SEV campaign, 'first exit: sandbox 0x74, QEMU 0x7c'):
    Unicorn resolves the pages of the hooks being shed through the TLB fill,
    outside any run, so the memory controller could cache a code page's old
    plaintext just before the next case's code was written to DRAM; the guest
    then ran the old bytes and its WRMSR completed with no #VMEXIT."""
    h = sev_harness
    code = b"\x31\xc0" + CPUID + TERMINATOR
    c = Case(code, 0, VmcbConfig(words(0x72, 0x81)))
    h.run(Case(TERMINATOR, 0, VmcbConfig(words(0x81))))
    page = h.m.guest.ram[CODE_BASE]
    h.m.sev.memctl.cpu_paddr(page, True, False)        # as a fill outside a run caches it
    out = h.run(c)
    assert [e.exitcode for e in out.exits][:1] == [0x72], [hex(e.exitcode) for e in out.exits]


def test_sampled_audit_runs_on_the_campaign_machine_with_its_hook_off_between():
    """The CLI's default campaign (one case in 8 audited) runs every case on one
    machine: the audit's per-instruction hook is on only for audited cases, and
    it is switched on ahead of the candidate hooks the unaudited cases left
    (Unicorn calls code hooks in the order they were added; an audit hook
    added after them saw each intercepted instruction only after its #VMEXIT
    and reported armed intercepts as missed, seed 1 cases 16, 64 and 88)."""
    w = C.Worker(C.Options(seed=1, cases=120, minimize=False, differential_every=0))
    assert w.fast is w.auditing
    h = w.fast
    for i in range(120):
        assert w.step() == [], f"case {i}"
        assert h.auditor.hooked == (i % 8 == 0)
    assert w.stats.audited == 15 and not w.stats.findings
    # an unaudited case on the audit machine: no audit, and no hook left on
    steps = h.auditor.steps
    out = h.run(Case(TERMINATOR), audit=False)
    assert out.audit == [] and not h.auditor.hooked and h.auditor.steps == steps


# rdtsc; mov r8, rax; mov r9, rdx; 10 x nop; rdtsc; mov r10, rax; mov r11, rdx; rdtscp; mov r12, rcx
_TSC_READS = (b"\x0f\x31\x49\x89\xc0\x49\x89\xd1" + b"\x90" * 10 + b"\x0f\x31\x49\x89\xc2\x49\x89\xd3"
              + b"\x0f\x01\xf9\x49\x89\xcc" + TERMINATOR)


@pytest.mark.parametrize("intercepts", [(), (0x6E, 0x87)])
def test_a_case_reads_a_tsc_of_its_own(harness, intercepts):
    """A case's time-stamp counter is a function of the case (a native RDTSC would
    read the host's clock, and a seeded campaign would not reproduce): the same
    in every run, intercepted or not, starting at CASE_TSC_BASE and advancing
    CASE_TSC_PER_NS ticks per ns of guest time, which is 1e9 / GUEST_IPS ns an
    instruction -- 13 instructions from one RDTSC to the next."""
    from sandbox.fuzz.snapshot import CASE_TSC_BASE, CASE_TSC_PER_NS
    from sandbox.svm.run import GUEST_IPS
    cfg = VmcbConfig(words(0x7F, 0x81, *intercepts), [], [], [])
    seen = []
    for _ in range(2):
        r = harness.run(Case(_TSC_READS, 0x10, cfg, {}, "t")).result
        assert r.reason == "guest-exit", r.detail
        seen.append((r.regs["r9"] << 32 | r.regs["r8"], r.regs["r11"] << 32 | r.regs["r10"], r.regs["r12"]))
    assert seen[0] == seen[1]
    first, second, aux = seen[0]
    assert CASE_TSC_BASE <= first < CASE_TSC_BASE + 100 * CASE_TSC_PER_NS * 1_000_000_000 // GUEST_IPS
    assert second - first == 13 * CASE_TSC_PER_NS * 1_000_000_000 // GUEST_IPS
    assert aux == 0


@pytest.mark.parametrize("prefixes,sz", [("66", 1 << 5), ("6648", 1 << 6), ("4866", 1 << 5), ("", 1 << 6)])
def test_outs_with_66_and_rex_w_is_four_bytes(auditing, prefixes, sz):
    """REX.W takes precedence over 66h when it immediately precedes the opcode
    (APM vol. 3 §1.2.7, §1.8); OUTS has no 64-bit form, so 66 REX.W 6F moves
    four bytes: SZ32 in EXITINFO1 (APM §15.10.2).  A REX before 66h is ignored.
    Capstone names 66 REX.W 6F "outsw", and the audit took it for SZ16 (seed 1,
    case ~11,000).  QEMU's decoder agrees (REX.W gives MO_64, which mo_b_d32
    narrows to MO_32), but its IOIO exits do not surface under Unicorn."""
    code = bytes.fromhex("baf8030000" + prefixes + "6f") + TERMINATOR
    c = Case(code, 0, VmcbConfig(words(0x7B, 0x81)))
    out = auditing.run(c)
    assert out.exits[0].exitcode == 0x7B and not out.audit, [str(a) for a in out.audit]
    assert out.exits[0].exitinfo1 & 0x70 == sz
