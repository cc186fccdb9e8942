"""`sandbox fuzz --target vmrun`: the VMCB-state generator, the rule model, the
VMRUN harness and its oracles, the QEMU differential, planted VMRUN-check bugs.

Expected values come from the APM (§15.5.1, §15.20) as kvm-unit-tests'
svm_guest_state_test spells them (its masks and boundary values), and from
QEMU's SVM under Unicorn (an independent implementation), never from
``svm/consistency.py``.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from sandbox.fuzz.planted import plant, unplant
from sandbox.fuzz.vmrun_campaign import VmrunOptions, VmrunWorker, run
from sandbox.fuzz.vmrun_model import verdict
from sandbox.fuzz.vmrun_qemu import compare, qemu_first
from sandbox.fuzz.vmrun_state import (ENTRY, HANDLERS, MUTATIONS, VmrunState, base_state, generate,
                                      is_state_file, set_bit)
from sandbox.fuzz.vmrun_target import VmrunHarness, judge

DRAM = 4 << 20


@pytest.fixture(scope="module")
def h():
    return VmrunHarness()


def st(**kw) -> VmrunState:
    return replace(base_state(), **kw)


# -- the rule model, against the APM's rules with kvm-unit-tests' boundary values ----------------
ILLEGAL = {
    "EFER.SVME=0": st(efer=0x0D00),
    "CD=0 NW=1": st(cr0=0x8001_0033 | 1 << 29),
    "CR0 bit 32": st(cr0=0x8001_0033 | 1 << 32),
    "CR3 bit 52 in long mode": st(cr3=0x2000 | 1 << 52),
    "CR4 bit 13 (KUT 0xfffffffffe08e000)": st(cr4=0x620 | 1 << 13),
    "CR4 bit 63": st(cr4=0x620 | 1 << 63),
    "DR6 bit 32": st(dr6=1 << 32),
    "DR7 bit 63": st(dr7=1 << 63),
    "EFER bit 9 (KUT 0xffffffffffff0200)": st(efer=0x1D00 | 1 << 9),
    "EFER bit 16": st(efer=0x1D00 | 1 << 16),
    "LME PG without PAE": st(cr4=0x600),
    "LME PG without PE": st(cr0=0x8001_0032),
    "LME PG PAE CS.L CS.D": st(cs_attr=0x29B | 1 << 10),
    "ASID 0": st(asid=0),
    "VMRUN intercept clear": st(intercepts=set_bit(base_state().intercepts, 0x80, False)),
    "IOPM crosses 2^48": st(iopm_base=(1 << 48) - 0x2000),
    "MSRPM crosses 2^48": st(msrpm_base=(1 << 48) - 0x1000),
    "EVENTINJ TYPE 5": st(eventinj=1 << 31 | 5 << 8 | 0x20),
    "EVENTINJ exception vector 2": st(eventinj=1 << 31 | 3 << 8 | 2),
    "EVENTINJ exception vector 32": st(eventinj=1 << 31 | 3 << 8 | 32),
    "N_CR3 bit 63": st(n_cr3=1 << 63),
}
LEGAL = {
    "base": st(),
    "CD=1 NW=1 (KUT test_cr0)": st(cr0=0x8001_0033 | 3 << 29),
    "CR3 bit 63 outside long mode": st(cr3=1 << 63, efer=0x1000, cr0=0x11, cr4=0),
    "DR6 31:0 set": st(dr6=0xFFFF_FFFF),
    "PE=0 PG=1 without LME (paged real mode, §15.19)": st(efer=0x1000, cr0=0x8000_0010, cr4=0),
    "CS L=0 D=1": st(cs_attr=0x49B),
    "EVENTINJ V=0, TYPE 7": st(eventinj=7 << 8 | 2),
    "NMI": st(eventinj=1 << 31 | 2 << 8 | 2),
    "exception 31": st(eventinj=1 << 31 | 3 << 8 | 31),
    "MSRPM bits 11:0": st(msrpm_base=0x7FF),
}


@pytest.mark.parametrize("name", list(ILLEGAL))
def test_model_illegal(name):
    assert verdict(ILLEGAL[name], DRAM).expect_invalid is True


@pytest.mark.parametrize("name", list(LEGAL))
def test_model_legal(name):
    assert verdict(LEGAL[name], DRAM).expect_invalid is False


def test_model_leaves_implementation_choices_open():
    assert verdict(st(cr4=0x620 | 1 << 12), DRAM).expect_invalid is None           # LA57 not offered
    assert verdict(st(iopm_base=(1 << 48) - 0x3000), DRAM).expect_invalid is None  # legal, past DRAM
    assert verdict(st(iopm_base=(1 << 48) - 0x2000), DRAM).expect_invalid is True
    # CR3 bits 51:MAXPHYADDR of a paging guest: reserved in the figures, refused by KVM and
    # kvm-unit-tests' svm_pae/svm_pse tests, not named by §15.5.1
    assert verdict(st(cr3=0x2000 | 1 << 51), DRAM).expect_invalid is None


# -- the generator ------------------------------------------------------------------------------
def test_generator_reaches_every_field_and_class():
    rng = random.Random(5)
    seen = set()
    for _ in range(3000):
        for lbl in generate(rng).labels:
            f, cls, _ = lbl.split(":", 2)
            seen.add((f, cls))
    assert {f for f, _ in seen} == set(MUTATIONS)
    for cls in ("valid", "edge", "invalid"):
        assert sum(1 for _, c in seen if c == cls) >= 8


def test_state_roundtrip(tmp_path):
    s = generate(random.Random(3))
    p = tmp_path / "s.case"
    s.save(p)
    assert VmrunState.load(p) == s and is_state_file(p)
    p.write_text(json.dumps({"format": "sandbox-fuzz-case"}))
    assert not is_state_file(p)


# -- the harness and its oracles ----------------------------------------------------------------
def test_base_state_enters_and_round_trips(h):
    s = h.resolve(base_state())
    out = h.run(s)
    assert not out.invalid and out.first.exitcode == 0x78 and out.first.rip == ENTRY
    assert judge(s, out, h.dram) == [] and out.isolation == []


@pytest.mark.parametrize("name", list(ILLEGAL))
def test_sandbox_agrees_on_the_core_rules(h, name):
    s = h.resolve(ILLEGAL[name])
    out = h.run(s)
    assert out.invalid, name
    assert judge(s, out, h.dram) == []


@pytest.mark.parametrize("vec,err", [(13, 0x1234), (14, 0xFFFF_FFFF), (0, None), (0x80, None)])
def test_event_delivered_through_the_described_vector(h, vec, err):
    ty = 3 if vec < 32 else 0
    ev = 1 << 31 | ty << 8 | vec | ((1 << 11 | err << 32) if err is not None else 0)
    s = h.resolve(st(eventinj=ev))
    out = h.run(s)
    assert out.first.exitcode == 0x78 and out.first.rip == HANDLERS + vec
    assert judge(s, out, h.dram) == []


def test_event_oracle_flags_a_wrong_vector(h):
    s = h.resolve(st(eventinj=1 << 31 | 3 << 8 | 13))
    out = h.run(s)
    out.first.rip = HANDLERS + 14                      # as if delivered through #PF's gate
    assert [f.kind for f in judge(s, out, h.dram)] == ["vmrun-event"]


def test_state_oracle_flags_a_changed_register(h):
    s = h.resolve(st())
    out = h.run(s)
    out.saved["CR4"] ^= 1 << 7
    assert [f.kind for f in judge(s, out, h.dram)] == ["vmrun-state"]


# -- QEMU ------------------------------------------------------------------------------------
def test_qemu_enters_the_base_state_and_agrees(h):
    s = h.resolve(base_state())
    q = qemu_first(s)
    assert q.exitcode == 0x78 and q.rip == ENTRY and q.regs["CR0"] == 0x8001_0033
    assert compare(s, h.run(s), h.dram, q) == []


def test_qemu_ignores_the_vector_of_an_injected_nmi(h):
    """APM §15.20: "if TYPE is 2 (NMI), the VECTOR field is ignored"; QEMU agrees."""
    q = qemu_first(h.resolve(st(eventinj=1 << 31 | 2 << 8 | 0x40)))
    assert q.vector == 2


def test_differential_flags_a_loaded_state_mismatch(h):
    s = h.resolve(base_state())
    out = h.run(s)
    out.saved["CR4"] |= 1 << 7
    assert [f.message.split(" ")[0] for f in compare(s, out, h.dram)] == ["CR4"]


# -- planted bugs: one VMRUN check dropped, found by a seeded campaign ------------------------
@pytest.mark.parametrize("bug,rule", [("vmrun-cd-nw", "CR0.CD is zero and CR0.NW"),
                                      ("vmrun-cs-l-d", "CS.L and CS.D")])
def test_seeded_campaign_finds_planted_vmrun_bug(bug, rule):
    w = VmrunWorker(VmrunOptions(seed=1, minimize=False, differential_every=0), plant(bug))
    found = []
    try:
        for _ in range(1500):
            found += [f for f in w.step() if rule in f.message]
            if found:
                break
    finally:
        unplant()
    assert found and found[0].kind == "vmrun-model", f"{bug} not found in {w.stats.execs} states"


def test_unplanted_campaign_does_not_report_the_planted_rules():
    st_, _, _ = run(VmrunOptions(seed=1, cases=400, minimize=False, differential_every=0))
    msgs = [f.message for f, _ in st_.findings.values()]
    assert not any("CR0.NW" in m or "CS.L and CS.D" in m for m in msgs)
    assert st_.execs == 400 and st_.invalid and st_.entered


# -- the CLI ---------------------------------------------------------------------------------
def cli(*args):
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,msg", [(["--target", "bogus"], "unknown target"),
                                      (["--target", "vmrun", "--jobs", "2"], "--jobs 1")])
def test_cli_bad_target_input(args, msg):
    r = cli("fuzz", "--cases", "5", *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_campaign_saves_and_replays(tmp_path):
    r = cli("fuzz", "--target", "vmrun", "--cases", "40", "--seed", "3", "--json", "--crashes", str(tmp_path))
    d = json.loads(r.stdout)
    assert d["target"] == "vmrun" and d["execs"] == 40 and r.returncode == (1 if d["findings"] else 0)
    legal = tmp_path / "legal.case"
    base_state().save(legal)
    r = cli("run", str(legal), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["vmrun"].startswith("entered")
    bad = tmp_path / "bad.case"
    st(asid=0).save(bad)
    r = cli("run", str(bad), "--json")
    assert r.returncode == 0 and "ASID" in json.loads(r.stdout)["vmrun"]


# -- the same states as VMCB12 of an L1 guest hypervisor (nested SVM) ---------------------------
@pytest.fixture(scope="module")
def nh():
    from sandbox.fuzz.vmrun_nested import NestedVmrunHarness
    return NestedVmrunHarness()


@pytest.mark.parametrize("name,state", [("base", st()), ("NMI event", st(eventinj=1 << 31 | 2 << 8 | 2)),
                                        ("#GP event", st(eventinj=1 << 31 | 3 << 8 | 13 | 1 << 11 | 7 << 32))])
def test_nested_legal_state_enters_l2_and_reflects(nh, name, state):
    s = nh.resolve(state)
    out = nh.run(s)
    assert not out.invalid and out.first is not None and out.first.exitcode == 0x78, (name, out.crash)
    assert judge(s, out, nh.dram) == []


@pytest.mark.parametrize("name", ["ASID 0", "CD=0 NW=1", "VMRUN intercept clear", "EVENTINJ TYPE 5"])
def test_nested_illegal_state_is_vmexit_invalid_in_vmcb12(nh, name):
    s = nh.resolve(ILLEGAL[name])
    out = nh.run(s)
    assert out.invalid and judge(s, out, nh.dram) == []


def test_nested_vmcb12_with_sev_enable_is_invalid(nh):
    """Found by --target vmrun-nested: L0 accepted a VMCB12 with SEV enabled although
    L1's processor has no SEV, and dropped the bit (APM §15.34.3: VMEXIT_INVALID)."""
    s = nh.resolve(st(np_control=1 | 2))
    out = nh.run(s)
    assert out.invalid and "SEV" in out.reason
