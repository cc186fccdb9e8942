"""SEV-ES: register state in the encrypted VMSA, #VC for non-automatic exits, the GHCB protocol.

GHCB offsets are the GHCB specification's (Linux struct ghcb_save_area):
RAX 1F8h, RCX 308h, RDX 310h, RBX 318h, SW_EXITCODE 390h, SW_EXITINFO1 398h,
SW_EXITINFO2 3A0h, valid bitmap 3F0h (bit = offset / 8).  Error codes from
Linux GHCB_ERR_*: MISSING_INPUT 4, INVALID_EVENT 6.  Automatic vs
non-automatic exits from APM §15.35.5.
"""
from __future__ import annotations

import sys

import pytest
from pathlib import Path

from sandbox import RESUME, ExitCode, Machine, handlers
from sandbox.hypervisor.machine import SevEsRegisterError
from sandbox.hypervisor.sev_launch import launch_sev, launch_sev_es

from conftest import hc_exit, install_reporting_idt
from test_sev import MAKE_SHARED

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "guest_images" / "sev_es_vc.S"
EXPECTED = "SEV-ES guest: #VC handler ready\ncbit=000000000000002f\napicbase=00000000fee00900\n"
GHCB = 0x1C3000
MAGIC = 0x1122_3344_5566_7788
VMGEXIT = ".byte 0xf3,0x0f,0x01,0xd9"


def machine(launch) -> Machine:
    m = Machine(dram=8 << 20, ram=2 << 20)
    m.load(str(IMAGE))
    launch(m)
    return m


def test_es_guest_runs_through_vc_and_ghcb():
    m = machine(launch_sev_es)
    codes = []
    m.on_exit_record = lambda rec: codes.append(rec.exitcode)
    r = m.run()
    assert r.reason == "guest-exit" and r.exit_code == 0, r.detail
    assert r.console == EXPECTED
    assert set(codes) == {0x403}                    # every exit is a VMGEXIT: CPUID/IOIO/MSR/VMMCALL are #VC
    requests = {c for c, _, _ in m.sev.ghcb_log}
    assert requests == {0x72, 0x7B, 0x7C, 0x81}
    assert m.sev.es.vc_count == len(m.sev.ghcb_log)
    # an OUT to COM1 as the guest described it: port 0x3F8 in SW_EXITINFO1[31:16], SZ8, A64, TYPE = OUT
    assert (0x7B, (0x3F8 << 16) | 0x210, 0) in m.sev.ghcb_log


def test_exit_trace_with_and_without_es():
    """The same image, same run of the test: what the hypervisor's exit records and VMCB hold."""
    plain = machine(launch_sev)
    plain.set_msrs([(0x1B, True, False)])           # the hypervisor answers RDMSR 0x1B in both runs
    seen_plain = []

    def rec_plain(rec):
        v = plain.guest.vmcb
        seen_plain.append((rec.exitcode, rec.rip, v.RAX, v.CR3))
    plain.on_exit_record = rec_plain
    assert plain.run().console == EXPECTED
    cpuid = [s for s in seen_plain if s[0] == 0x72]
    assert cpuid and cpuid[0][1] != 0 and cpuid[0][2] == 0x8000001F and cpuid[0][3] != 0

    es = machine(launch_sev_es)
    seen_es = []
    refused = []

    def rec_es(rec):
        seen_es.append((rec.exitcode, rec.rip, rec.nrip, es.mem.read(es.guest.vmcb_hpa + 0x400, 0x300)))
        try:
            es.regs.rbx
        except SevEsRegisterError as e:
            refused.append(str(e))
    es.on_exit_record = rec_es
    assert es.run().console == EXPECTED
    assert all(code == 0x403 and rip == 0 and nrip == 0 and save == bytes(0x300) for code, rip, nrip, save in seen_es)
    assert len(refused) == len(seen_es) and "encrypted VMSA" in refused[0]


def test_guest_registers_never_reach_dram_or_the_hypervisor(guest):
    body = f"mov r15, {MAGIC:#x}\nmov rdi, {GHCB:#x}\n{MAKE_SHARED}\nmov ecx, 0xc0010130\nmov eax, {GHCB:#x}\n" \
           f"xor edx, edx\nwrmsr\nmov rsi, {GHCB:#x}\nmov qword ptr [rsi + 0x390], 0x12345\n" \
           f"mov qword ptr [rsi + 0x3f0], 0\nmov rax, 0x001c000000000000\nmov [rsi + 0x3f8], rax\n{VMGEXIT}\n" \
           f"mov rax, r15\nmov rbx, {MAGIC:#x}\ncmp rax, rbx\njne bad\nhlt\nbad:\nud2\n"
    m = guest(body)
    launch_sev_es(m)
    leaks = []
    m.on_exit_record = lambda rec: leaks.append(MAGIC.to_bytes(8, "little") in m.mem.dump())
    r = m.run()
    assert r.reason == "halt", r.detail        # r15 survived the world switch (ud2 would triple-fault)
    assert leaks and not any(leaks)
    ghcb = m.guest.read_phys(GHCB, 4096)
    assert int.from_bytes(ghcb[0x398:0x3A0], "little") == 2       # unknown SW_EXITCODE: error ...
    assert int.from_bytes(ghcb[0x3A0:0x3A8], "little") == 6       # ... GHCB_ERR_INVALID_EVENT


def test_ghcb_missing_input(guest):
    # a CPUID request without RAX/RCX marked valid
    body = f"mov rdi, {GHCB:#x}\n{MAKE_SHARED}\nmov ecx, 0xc0010130\nmov eax, {GHCB:#x}\nxor edx, edx\nwrmsr\n" \
           f"mov rsi, {GHCB:#x}\nmov qword ptr [rsi + 0x390], 0x72\nmov qword ptr [rsi + 0x398], 0\n" \
           f"mov qword ptr [rsi + 0x3a0], 0\nmov qword ptr [rsi + 0x3f0], 0\nmov rax, 0x001c000000000000\n" \
           f"mov [rsi + 0x3f8], rax\n{VMGEXIT}\nhlt\n"
    m = guest(body)
    launch_sev_es(m)
    r = m.run()
    assert r.reason == "halt"
    ghcb = m.guest.read_phys(GHCB, 4096)
    assert int.from_bytes(ghcb[0x398:0x3A0], "little") == 2
    assert int.from_bytes(ghcb[0x3A0:0x3A8], "little") == 4


def test_ghcb_gpa_not_mapped(guest):
    body = f"mov ecx, 0xc0010130\nmov eax, 0x7fff0000\nxor edx, edx\nwrmsr\n{VMGEXIT}\nhlt\n"
    m = guest(body)
    launch_sev_es(m)
    r = m.run()
    assert r.reason == "ghcb-error" and "0x7fff0000" in r.detail and not r.ok


def test_ghcb_in_a_private_page_is_garbage_not_a_crash(guest):
    # the guest forgets to share its GHCB: the hypervisor reads ciphertext
    body = f"mov ecx, 0xc0010130\nmov eax, {GHCB:#x}\nxor edx, edx\nwrmsr\nmov rsi, {GHCB:#x}\n" \
           f"mov qword ptr [rsi + 0x390], 0x72\n{VMGEXIT}\nhlt\n"
    m = guest(body)
    launch_sev_es(m)
    r = m.run()
    assert r.reason == "halt"
    assert m.sev.ghcb_log and m.sev.ghcb_log[0][0] != 0x72          # what the hypervisor saw was not the request


def test_plain_vmmcall_in_es_guest_is_a_vc_not_an_exit(guest):
    m = guest("mov eax, 0x8000001f\ncpuid\n" + hc_exit(0))   # no #VC handler: #VC -> #DF -> shutdown
    launch_sev_es(m)
    codes = []
    m.on_exit_record = lambda rec: codes.append(rec.exitcode)
    r = m.run()
    assert r.reason == "shutdown" and codes == [0x7F]       # the intercepted CPUID never exited


def test_es_bit_without_vmsa_is_invalid(guest):
    m = guest(hc_exit(0))
    launch_sev(m)
    m.guest.vmcb.NP_CONTROL = m.guest.vmcb.NP_CONTROL | 4
    r = m.run()
    assert r.reason == "invalid-vmcb" and "VMSA" in r.detail


def test_cli_sev_es_and_snp(capsys):
    from sandbox.cli import main
    for extra in (["--sev-es"], ["--sev-es", "--snp"]):
        code = main(["run", str(IMAGE), *extra, "--ram", "4", "--dram", "16"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert out.out == EXPECTED
        assert "VMGEXIT" in out.err and "(encrypted)" in out.err


def test_trace_script_runs(capsys, monkeypatch):
    import runpy
    monkeypatch.setattr(sys, "argv", ["sev_es_trace.py"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "scripts" / "sev_es_trace.py"), run_name="__main__")
    assert e.value.code == 0
    plain, es = capsys.readouterr().out.split("SEV-ES (")
    assert "CPUID" in plain and "vmcb.RAX=0x8000001f" in plain
    assert "regs.rbx=(refused)" in es and "SW_EXITCODE=0x72" in es and "rip=0x00000000" in es


def test_hypervisor_tampering_with_the_vmsa_fails_vmrun():
    m = machine(launch_sev_es)
    from sandbox.hypervisor.ghcb import handle_vmgexit

    def tamper(m, e):
        act = handle_vmgexit(m, e)
        if len(m.sev.ghcb_log) == 3:
            hpa = m.sev.es.vmsa_hpa
            b = m.mem.read(hpa + 0x178, 1)[0]
            m.mem.write(hpa + 0x178, bytes([b ^ 0x40]))          # one bit of the encrypted RIP
        return act
    m.on(0x403)(tamper)
    r = m.run()
    assert r.reason == "invalid-vmcb" and "VMSA integrity" in r.detail
    assert len(m.sev.ghcb_log) == 3                                  # the guest never ran again


def test_run_result_holds_no_sev_es_registers():
    """The Python API's result, like the CLI's, has no register of an SEV-ES
    guest: they are in the encrypted VMSA."""
    from sandbox import Machine
    from sandbox.cli.sev import launch_from_cli
    m = Machine()
    m.load("guest_images/sev_es_vc.S")
    launch_from_cli(m, es=True, snp=False)
    r = m.run(timeout=10)
    assert r.reason == "guest-exit", r.detail
    assert r.regs == {} and r.rip == 0 and r.rflags == 0


# ------------------------------------------------- one handler table, with and without SEV-ES
# The GHCB's exception report (GHCB specification, AMD pub. 56421; KVM's
# svm_complete_emulated_msr): SW_EXITINFO1 = 1, SW_EXITINFO2 = the event in
# EVENTINJ format (APM §15.20): vector 13, TYPE 3 (exception), EV (bit 11),
# V (bit 31), error code 0 in bits 63:32.
GP_EVENT = 13 | (3 << 8) | (1 << 11) | (1 << 31)
REFUSED_MSR = 0x123               # below C000_0000h and not in the MSR file: handle_msr raises #GP


@pytest.mark.parametrize("es", [False, True], ids=["plain", "sev-es"])
def test_one_cpuid_handler_serves_guests_with_and_without_es(es):
    """A handler registered with m.on(ExitCode.CPUID) answers the guest's CPUID
    whether it exits (no SEV-ES) or comes through the GHCB (SEV-ES #VC -> VMGEXIT)."""
    m = Machine(dram=8 << 20, ram=2 << 20)
    m.load(str(IMAGE))
    if es:
        launch_sev_es(m)
    else:
        m.set_msrs([(0x1B, True, False)])           # RDMSR 0x1B answered by the hypervisor here too
    calls = []

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        leaf = m.regs.rax & 0xFFFFFFFF
        calls.append((leaf, e.exitcode, e.rip))
        handlers.handle_cpuid(m, e)
        if leaf == 0x8000_001F:
            m.regs.rbx = 0x2A                       # C-bit position 42, as the user says
        return RESUME
    r = m.run()
    assert r.reason == "guest-exit" and r.exit_code == 0, r.detail
    assert r.console == EXPECTED.replace("cbit=000000000000002f", "cbit=000000000000002a")
    assert [(leaf, code) for leaf, code, _ in calls] == [(0x8000_001F, 0x72)]
    assert (calls[0][2] == 0) == es                 # SEV-ES: the exit record has no guest RIP
    assert r.counts.get(0x72, 0) == (0 if es else 1)          # SEV-ES: no CPUID exit, a VMGEXIT


def test_refused_msr_write_without_es_is_gp(guest):
    m = guest(f"mov ecx, {REFUSED_MSR:#x}\nmov eax, 0x1234\nxor edx, edx\nwrmsr\n" + hc_exit(0))
    install_reporting_idt(m)
    m.set_msrs([(REFUSED_MSR, False, True)])
    seen = []
    m.on(ExitCode.MSR)(lambda m, e: seen.append(e.exitinfo1) or handlers.handle_msr(m, e))
    r = m.run()
    assert seen == [1]                              # one WRMSR exit, through the table
    assert r.exit_code == 0x100 + 13 and r.regs["rsi"] == 0, r.detail   # #GP, error code 0
    assert REFUSED_MSR not in m.msrs


def test_refused_msr_write_through_the_ghcb_is_reported_as_gp(guest):
    """The same WRMSR request through the GHCB reaches the same handler, which
    refuses it the same way: the GHCB reports #GP for the guest to raise."""
    body = f"mov rdi, {GHCB:#x}\n{MAKE_SHARED}\nmov ecx, 0xc0010130\nmov eax, {GHCB:#x}\nxor edx, edx\nwrmsr\n" \
           f"mov rsi, {GHCB:#x}\nmov qword ptr [rsi + 0x390], 0x7c\nmov qword ptr [rsi + 0x398], 1\n" \
           f"mov qword ptr [rsi + 0x3a0], 0\nmov qword ptr [rsi + 0x308], {REFUSED_MSR:#x}\n" \
           f"mov qword ptr [rsi + 0x1f8], 0x1234\nmov qword ptr [rsi + 0x310], 0\n" \
           f"mov rax, 0x8000000000000000\nmov [rsi + 0x3f0], rax\n" \
           f"mov rax, 0x001c000600000000\nmov [rsi + 0x3f8], rax\n{VMGEXIT}\nhlt\n"
    m = guest(body)
    launch_sev_es(m)
    seen = []
    m.on(ExitCode.MSR)(lambda m, e: seen.append(e.exitinfo1) or handlers.handle_msr(m, e))
    r = m.run()
    assert r.reason == "halt", r.detail
    assert seen == [1] and m.sev.ghcb_log == [(0x7C, 1, 0)]
    ghcb = m.guest.read_phys(GHCB, 4096)
    assert int.from_bytes(ghcb[0x398:0x3A0], "little") == 1
    assert int.from_bytes(ghcb[0x3A0:0x3A8], "little") == GP_EVENT
    assert REFUSED_MSR not in m.msrs


def test_accepted_msr_write_through_the_ghcb(guest):
    """A write handle_msr accepts (an MSR at or above C000_0000h) lands in the MSR file,
    and the GHCB says no action (SW_EXITINFO1 = 0)."""
    body = f"mov rdi, {GHCB:#x}\n{MAKE_SHARED}\nmov ecx, 0xc0010130\nmov eax, {GHCB:#x}\nxor edx, edx\nwrmsr\n" \
           f"mov rsi, {GHCB:#x}\nmov qword ptr [rsi + 0x390], 0x7c\nmov qword ptr [rsi + 0x398], 1\n" \
           f"mov qword ptr [rsi + 0x3a0], 0\nmov eax, 0xc0000103\nmov [rsi + 0x308], rax\n" \
           f"mov qword ptr [rsi + 0x1f8], 0x1234\nmov qword ptr [rsi + 0x310], 5\n" \
           f"mov rax, 0x8000000000000000\nmov [rsi + 0x3f0], rax\n" \
           f"mov rax, 0x001c000600000000\nmov [rsi + 0x3f8], rax\n{VMGEXIT}\nhlt\n"
    m = guest(body)
    launch_sev_es(m)
    assert m.run().reason == "halt"
    assert m.msrs[0xC000_0103] == 0x1234          # TSC_AUX: AMD ignores bits 63:32
    ghcb = m.guest.read_phys(GHCB, 4096)
    assert int.from_bytes(ghcb[0x398:0x3A0], "little") == 0
