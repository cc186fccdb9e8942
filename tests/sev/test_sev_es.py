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

from sandbox import Machine
from sandbox.hypervisor.machine import SevEsRegisterError
from sandbox.hypervisor.sev_launch import launch_sev, launch_sev_es

from conftest import hc_exit
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

