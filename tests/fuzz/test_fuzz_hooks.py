"""`sandbox fuzz --hooks FILE`: oracles for users' exit handlers, the checked mode
of the hypervisor API, the buggy example in hooks/, replay and bad input.

Each oracle is shown to fire on a handler written to break exactly its rule,
and to stay quiet on the well-behaved example handlers.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sandbox import Machine
from sandbox.fuzz import campaign as C
from sandbox.fuzz.case import Case, VmcbConfig
from sandbox.fuzz.generate import TERMINATOR
from sandbox.fuzz.hooks_fuzz import HookGuard
from sandbox.fuzz.snapshot import Harness
from sandbox.hypervisor.checked import CheckedMemory, HostAccessViolation

ROOT = Path(__file__).resolve().parents[2]
BUGGY = ROOT / "hooks" / "buggy_handlers.py"
CPUID = b"\x0f\xa2"


def words(*codes: int) -> list[int]:
    w = [0] * 6
    w[4] |= 1                                  # VMRUN (a VMRUN consistency requirement)
    for c in codes:
        w[c >> 5] |= 1 << (c & 31)
    return w


def cpuid_case(rax: int = 0) -> Case:
    return Case(CPUID + TERMINATOR, 0, VmcbConfig(words(0x72)), {"rax": rax})


def hooks_file(tmp_path, body: str) -> str:
    p = tmp_path / "h.py"
    p.write_text("from sandbox import ExitCode, RESUME, handlers\n" + textwrap.dedent(body))
    return str(p)


def guarded(tmp_path, body: str) -> tuple[Harness, HookGuard]:
    h = Harness()
    return h, HookGuard(h.m, hooks_file(tmp_path, body))


def test_buggy_example_all_three_found_by_a_seeded_campaign():
    """The three planted bugs of hooks/buggy_handlers.py, each of a different kind,
    in one seeded campaign (467 cases, about 7 s on a loaded 2-vCPU machine)."""
    w = C.Worker(C.Options(seed=1, audit_every=0, differential_every=0, minimize=False, hooks=BUGGY))
    found = {}
    for _ in range(1500):
        for f in w.step():
            found.setdefault(f.kind, f.message)
        if {"hook-raised", "hook-livelock", "hook-host-access"} <= set(found):
            break
    assert "cpuid_from_table" in found["hook-raised"] and "IndexError" in found["hook-raised"]
    assert "io_ports" in found["hook-livelock"] and "IOIO" in found["hook-livelock"]
    assert "msr_logger" in found["hook-host-access"] and "MSR" in found["hook-host-access"]


def test_hung_handler_is_stopped_within_its_budget(tmp_path):
    h, g = guarded(tmp_path, """
        def spin(m, e):
            while True:
                pass
        HANDLERS = {ExitCode.CPUID: spin}
    """)
    h.run(cpuid_case())
    fs = g.take()
    assert [f.kind for f in fs] == ["hook-hung"] and "spin" in fs[0].message and "CPUID" in fs[0].message


def test_handler_leaving_invalid_state_is_blamed_at_the_next_vmrun(tmp_path):
    """APM §15.5.1: CR0[63:32] must be zero at VMRUN; the handler wrote bit 32."""
    h, g = guarded(tmp_path, """
        def bad_cr0(m, e):
            m.guest.vmcb.CR0 = m.guest.vmcb.CR0 | 1 << 32
            m.advance(e)
            return RESUME
        HANDLERS = {ExitCode.CPUID: bad_cr0}
    """)
    out = h.run(cpuid_case())
    fs = g.take()
    assert out.result.reason == "invalid-vmcb"
    assert [f.kind for f in fs] == ["hook-invalid-state"] and "bad_cr0" in fs[0].message


def test_host_access_seen_even_when_the_handler_swallows_it(tmp_path):
    h, g = guarded(tmp_path, """
        def peek(m, e):
            try:
                m.mem.read(m.cpu.vm_hsave_pa, 8)      # the host save area: not the guest's
            except Exception:
                pass
            return handlers.handle_cpuid(m, e)
        HANDLERS = {ExitCode.CPUID: peek}
    """)
    h.run(cpuid_case())
    fs = g.take()
    assert [f.kind for f in fs] == ["hook-host-access"] and "read of host memory" in fs[0].message


def test_livelock_needs_unchanged_state(tmp_path):
    h, g = guarded(tmp_path, """
        def stuck(m, e):
            return RESUME
        HANDLERS = {ExitCode.CPUID: stuck}
    """)
    h.run(cpuid_case())
    assert [f.kind for f in g.take()] == ["hook-livelock"]


@pytest.mark.parametrize("name", ["cpuid_spoofer.py", "io_logger.py", "msr_auditor.py"])
def test_well_behaved_examples_give_no_findings(name):
    w = C.Worker(C.Options(seed=3, audit_every=0, differential_every=0, minimize=False,
                           hooks=ROOT / "hooks" / name))
    fs = []
    for _ in range(600):                       # until the handlers have run a few times
        fs += [f for f in w.step() if f.kind.startswith("hook-")]
        if sum(g.calls for g in w.guards.values()) >= 5:
            break
    assert fs == [] and sum(g.calls for g in w.guards.values()) >= 5


def test_checked_memory_bounds_accesses_to_the_guest():
    m = Machine(dram=4 << 20, ram=2 << 20)
    g = m.guest
    with CheckedMemory(m) as c:
        g.read_phys(0x1000, 16)
        m.mem.read(g.vmcb_hpa, 8)
        m.mem.read(g.msrpm.hpa, 8)
        m.mem.read(min(g.npt.tables), 8)
        with pytest.raises(HostAccessViolation):
            m.mem.read(m.cpu.vm_hsave_pa, 8)
        with pytest.raises(HostAccessViolation):
            m.mem.write(g.ram[max(g.ram)] + 0xFF8, bytes(16))      # straddles out of RAM
    assert len(c.violations) == 2
    m.mem.read(m.cpu.vm_hsave_pa, 8)                              # unchecked again


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)


@pytest.mark.parametrize("body,msg", [("x = 1\n", "defines neither"), ("def f(:\n", "error while loading"),
                                      ("HANDLERS = {'NOSUCH': print}\n", "unknown exit")])
def test_cli_unloadable_hooks_file(tmp_path, body, msg):
    p = tmp_path / "bad.py"
    p.write_text(body)
    r = cli("fuzz", "--cases", "5", "--hooks", str(p))
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("fuzz", "--cases", "5", "--hooks", str(tmp_path / "missing.py"))
    assert r.returncode == 2 and "no such hooks file" in r.stderr


def test_cli_finding_replays_with_hooks(tmp_path):
    c = tmp_path / "c.case"
    cpuid_case(rax=5).save(c)
    r = cli("run", str(c), "--hooks", str(BUGGY), "--quiet")
    assert r.returncode == 1 and "hook-raised" in r.stderr and "cpuid_from_table" in r.stderr
    r = cli("run", str(c), "--quiet")
    assert r.returncode == 0


def test_cli_replay_with_unloadable_hooks_file(tmp_path):
    c = tmp_path / "c.case"
    cpuid_case().save(c)
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    r = cli("run", str(c), "--hooks", str(bad))
    assert r.returncode == 2 and "boom" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("fuzz", "--cases", "5", "--target", "vmrun", "--hooks", str(BUGGY))
    assert r.returncode == 2 and "--hooks applies to --target intercepts" in r.stderr


def test_a_hooks_finding_names_its_hooks_file_and_will_not_replay_without_it(tmp_path):
    """A finding saved by a --hooks campaign records the hooks file; replayed
    without --hooks it is refused with that name (it used to say 'no oracle
    findings', exit 0), and the case file never loads the handlers itself."""
    (tmp_path / "crashes").mkdir()
    w = C.Worker(C.Options(seed=1, audit_every=0, differential_every=0, minimize=False, hooks=BUGGY,
                           crashes=tmp_path / "crashes"))
    for _ in range(1500):
        if any(f.kind == "hook-raised" for f in w.step()):
            break
    saved = sorted((tmp_path / "crashes").glob("hook-raised-*.case"))
    assert saved
    d = json.loads(saved[0].read_text())
    assert d["hooks"] == str(BUGGY) and Case.load(saved[0]).hooks == str(BUGGY)
    r = cli("run", str(saved[0]), "--quiet")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-500:]
    assert f"replay it with --hooks {BUGGY}" in r.stderr
    r = cli("run", str(saved[0]), "--hooks", str(BUGGY), "--quiet")
    assert r.returncode == 1 and "hook-raised" in r.stderr
    plain = tmp_path / "plain.case"
    cpuid_case(rax=5).save(plain)
    assert "hooks" not in json.loads(plain.read_text())          # a case from no --hooks campaign: as before
