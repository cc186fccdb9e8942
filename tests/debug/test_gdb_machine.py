"""The real gdb (batch mode) against the real Machine: MachineTarget in-process,
and ``sandbox run --gdb`` as a user starts it. Expected values come from the
guests' sources (addresses of their instructions, the vendor string), the
APM's 24-reference 2-D walk and the NPT's own lookup, never from the stub."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from debug_fakes import GDB, TIMEOUT_S, run_gdb
from sandbox import Machine
from sandbox.debug.gdbstub import BreakpointType
from sandbox.debug.target import MachineTarget
from sandbox.hypervisor.sev_launch import launch_sev

pytestmark = pytest.mark.skipif(GDB is None, reason="gdb is not installed (Debian package: gdb)")

ROOT = Path(__file__).resolve().parents[2]
HELLO = str(ROOT / "guest_images" / "hello.S")
# hello.S: 0x100013 is its CPUID (mov eax 5 bytes at 0x10000c, xor ecx 2 bytes), 0x10005d the PRINT
# VMMCALL, 0x100067 the EXIT VMMCALL after "mov eax, 0; xor edi, edi"
CPUID_AT, EXIT_VMMCALL_AT = 0x100013, 0x100067
VENDOR_EBX = int.from_bytes(b"AMDV", "little")          # "AMDVSandbox" in EBX:ECX:EDX


def machine(image: str = HELLO) -> Machine:
    m = Machine()
    m.load(image)
    return m


def test_breakpoint_step_over_an_intercepted_cpuid_and_registers():
    m = machine()
    t = MachineTarget(m)
    out, result = run_gdb(t, ["info registers rip", "x/2i $pc", f"break *{CPUID_AT:#x}", "continue",
                              "x/i $pc", "stepi", "p/x $rbx", "info registers rip", "p $cr3", "p/x $efer",
                              "info registers cs", "kill"])
    assert re.search(r"^rip\s+0x100000\s", out, re.M)
    assert "lea    0x89(%rip),%rsi" in out                 # the first instruction of hello.S
    assert re.search(rf"Breakpoint 1, 0x0+{CPUID_AT:x} in", out)
    assert f"=> {CPUID_AT:#x}:\tcpuid" in out
    assert f"$1 = {VENDOR_EBX:#x}" in out                   # the CPUID handler ran within the step
    assert re.search(r"^rip\s+0x100015\s", out, re.M)       # CPUID is 2 bytes
    assert "$2 = 8192" in out                               # the loader's CR3 = 0x2000
    assert re.search(r"\$3 = 0x1d00", out)                  # LME|LMA|NXE|SVME (the VMCB's EFER)
    assert re.search(r"^cs\s+0x8\s", out, re.M)
    assert t.counts[0x72] == 1 and result.reason == "killed"


def test_breakpoints_are_invisible_to_the_guest_and_the_intercept_scan():
    plain = machine()
    r0 = plain.run()
    m = machine()
    t = MachineTarget(m)
    hpa = m.guest.npt.lookup(CPUID_AT)                 # the loader maps GVA = GPA
    assert t.add_breakpoint(BreakpointType.SOFTWARE, CPUID_AT, 1)
    assert t.add_breakpoint(BreakpointType.HARDWARE, EXIT_VMMCALL_AT, 1)
    assert m.mem.read(hpa, 2) == b"\x0f\xa2"               # no int3 in guest memory
    assert t.read_memory(CPUID_AT, 2) == b"\x0f\xa2"
    ev = t.resume(False)
    assert ev.kind.value == "breakpoint" and m.guest.vmcb.RIP == CPUID_AT
    ev = t.resume(False)
    assert ev.kind.value == "hw-breakpoint" and m.guest.vmcb.RIP == EXIT_VMMCALL_AT
    ev = t.resume(False)
    assert ev.kind.value == "ended" and ev.exit_code == 0
    r = t.result()
    # the CPUID still exited (the scan saw its bytes), and the run is the undebugged one
    assert r.counts == r0.counts and r.console == r0.console and r.regs == r0.regs
    assert bytes(m.mem.dump()) == bytes(plain.mem.dump())


def test_register_write_changes_the_guest_exit_code():
    t = MachineTarget(machine())
    out, result = run_gdb(t, [f"break *{EXIT_VMMCALL_AT:#x}", "continue", "set var $rdi = 7", "continue"])
    assert "[Inferior 1 (Remote target) exited with code 07]" in out
    assert result.reason == "ended" and t.last.exit_code == 7


def test_monitor_walk_npt_vmcb_exits_and_break_exit():
    m = machine()
    t = MachineTarget(m)
    out, _ = run_gdb(t, ["monitor walk 0x100000", "monitor npt 0x100000", "monitor break-exit CPUID",
                         "continue", "info registers rip", "monitor exits", "monitor vmcb",
                         "monitor break-exit NOSUCH", "kill"])
    # 4 guest entries, each a GPA taking a 4-level nested walk, plus the final nested walk (README)
    assert "4 guest entries + 20 nested entries read = 24 table references" in out
    hpa = m.guest.npt.lookup(0x100000)
    assert f"-> GVA 0x100000 = GPA 0x100000 = HPA {hpa:#x}" in out
    assert out.count(f"-> HPA {hpa:#x}") >= 2                  # walk's final step and the npt command
    assert f"#VMEXIT CPUID at {CPUID_AT:#x}" in out
    assert re.search(r"^rip\s+0x100015\s", out, re.M)          # stopped after the handler
    assert re.search(r"0x0072 CPUID\s+1", out)
    assert "EXITCODE              0x72" in out and "N_CR3" in out
    assert "unknown exit 'NOSUCH'" in out


def test_ctrl_c_stops_a_guest_that_never_exits():
    t = MachineTarget(machine(str(ROOT / "guest_images" / "spin.S")))
    out, result = run_gdb(t, ["continue", "info registers rip", "kill"], interrupt=True)
    assert "Program received signal SIGINT" in out
    assert re.search(r"^rip\s+0x1000", out, re.M)
    assert result.reason == "killed"


def test_sev_gdb_gets_the_hypervisor_view():
    """SEV (launch policy NODBG): gdb reads what the hypervisor can -- a shared page's
    plaintext, a private page's ciphertext -- and cannot write a private page."""
    m = machine(str(ROOT / "guest_images" / "sev_secrets.S"))
    launch_sev(m)
    t = MachineTarget(m)
    ev = t.resume(False)
    assert ev.kind.value == "ended" and "FORTRESS-PRIVATE-7f3a9c5e" in t.console   # the guest saw both
    private, shared = t.read_memory(0x1C0000, 25), t.read_memory(0x1C1000, 18)
    assert shared == b"SHARED-BOUNCE-1b2e"
    assert private != b"FORTRESS-PRIVATE-7f3a9c5e" and b"FORTRESS" not in private
    out, _ = run_gdb(MachineTarget(m), ["x/s 0x1c1000", "set {char}0x1c0000 = 65"])
    assert '"SHARED-BOUNCE-1b2e"' in out
    assert "Cannot access memory at address 0x1c0000" in out


def test_cli_waits_for_gdb_and_finishes_the_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "run", HELLO, "--gdb", "127.0.0.1:0", "--quiet"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()                    # the readiness signal: the stub listens
        m = re.search(r"waiting for gdb on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        g = subprocess.run([GDB, "-batch", "-nx", "-ex", "set architecture i386:x86-64",
                            "-ex", f"target remote 127.0.0.1:{m.group(1)}", "-ex", "info registers rip",
                            "-ex", f"break *{CPUID_AT:#x}", "-ex", "continue", "-ex", "detach"],
                           capture_output=True, text=True, timeout=TIMEOUT_S)
        out, err = p.communicate(timeout=TIMEOUT_S)
    finally:
        if p.poll() is None:
            p.kill()
    assert re.search(r"^rip\s+0x100000\s", g.stdout, re.M), g.stdout + g.stderr
    assert re.search(rf"Breakpoint 1, 0x0+{CPUID_AT:x}", g.stdout)
    assert p.returncode == 0, err
    assert out.startswith("Hello from the guest!\nhypervisor vendor: AMDVSandbox")   # detached: ran on
    assert "run ended: guest-exit" in err and "109 exits" in err


@pytest.mark.parametrize("spec, message", [("localhost:x", "give [HOST:]PORT"), ("70000", "outside 0-65535")])
def test_cli_bad_gdb_address(spec, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "sandbox.cli", "run", HELLO, "--gdb", spec], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
