"""The real gdb (Debian package ``gdb``), in batch mode, against the stub and
the fake target: the target description is accepted, and the commands a user
types work end to end. Skipped when gdb is not installed; every gdb run is
bounded (debug_fakes.TIMEOUT_S) and talks to a free loopback port."""
from __future__ import annotations

import re

import pytest

from debug_fakes import GDB, FakeCpu, Step, run_gdb

pytestmark = pytest.mark.skipif(GDB is None, reason="gdb is not installed (Debian package: gdb)")

SCRIPT = [Step(0x100000), Step(0x100004), Step(0x100008, exit="CPUID"), Step(0x100010),
          Step(0x100014, writes=[(0x100800, b"\x05\x00\x00\x00")]), Step(0x100018)]


def reg_line(out: str, name: str) -> str:
    m = re.search(rf"^{name}\s+(\S+)\s+(.*)$", out, re.M)
    assert m, f"no '{name}' line in gdb's output:\n{out}"
    return m.group(1) + " " + m.group(2).strip()


def test_registers_memory_and_system_registers():
    cpu = FakeCpu(list(SCRIPT))
    out, result = run_gdb(cpu, ["info registers rip", "info registers", "p $cr3", "p/x $cr3",
                                "info registers cr0", "info registers efer", "p $xmm0",
                                "x/4xb 0x100000", "x/2xb 0x300000",
                                "set var $rbx = 0x1234", "p/x $rbx",
                                "set {unsigned char}0x100001 = 0x7d", "x/2xb 0x100000"])
    assert reg_line(out, "rip") == "0x100000 0x100000"
    assert reg_line(out, "rax") == "0x1122334455667788 1234605616436508552"
    assert reg_line(out, "rsp").startswith("0x90000")
    assert reg_line(out, "eflags") == "0x2 [ ]"
    assert reg_line(out, "cs") == "0x8 8"
    assert reg_line(out, "cr0") == "0x80010001 [ PE WP PG ]"
    assert reg_line(out, "cr4") == "0x20 [ PAE ]"
    assert reg_line(out, "efer") == "0xd00 [ LME LMA NXE ]"
    assert reg_line(out, "fs_base") == "0x0 0"
    assert "$1 = 8192" in out and "$2 = 0x2000" in out
    assert "$3 = <unavailable>" in out                       # the fake has no SSE state
    assert "0x100000:\t0x00\t0x01\t0x02\t0x03" in out
    assert "Cannot access memory at address 0x300000" in out
    assert "$4 = 0x1234" in out and cpu.regs["rbx"] == 0x1234
    assert "0x100000:\t0x00\t0x7d" in out                    # an X packet with an escaped byte
    assert cpu.mem[0x100000][1] == 0x7D
    assert result.reason == "detached"                       # quitting gdb detaches (qAttached = 1)


def test_break_continue_stepi_monitor_and_exit_code():
    cpu = FakeCpu(list(SCRIPT), exit_code=3)
    out, result = run_gdb(cpu, ["break *0x100010", "continue", "info registers rip", "stepi",
                                "info registers rip", "monitor exits", "continue"])
    assert "Breakpoint 1 at 0x100010" in out
    assert re.search(r"Breakpoint 1, 0x0+100010 in", out)
    assert "0x0000000000100014 in ??" in out                 # after stepi
    assert "CPUID 1" in out                                  # monitor output (O packets)
    assert "[Inferior 1 (Remote target) exited with code 03]" in out
    assert result.reason == "ended" and result.last_stop.exit_code == 3


def test_hardware_breakpoint_and_watchpoint():
    cpu = FakeCpu(list(SCRIPT))
    out, _ = run_gdb(cpu, ["hbreak *0x100008", "continue", "delete 1",
                           "watch *(int*)0x100800", "continue", "info registers rip"])
    assert "Hardware assisted breakpoint 1 at 0x100008" in out
    assert re.search(r"Breakpoint 1, 0x0+100008 in", out)
    assert "Hardware watchpoint 2: *(int*)0x100800" in out
    assert "Old value = 50462976" in out and "New value = 5" in out    # 0x03020100 -> 5
    assert reg_line(out, "rip") == "0x100018 0x100018"


def test_monitor_break_exit_stops_at_the_exit_with_its_message():
    cpu = FakeCpu(list(SCRIPT))
    out, _ = run_gdb(cpu, ["monitor help", "monitor break-exit CPUID", "continue", "info registers rip",
                           "monitor vmcb", "monitor nonsense"])
    assert "npt GPA" in out and "walk GVA" in out
    assert "will stop at #VMEXIT CPUID" in out
    assert "#VMEXIT CPUID at 0x100008" in out
    assert "Program received signal SIGTRAP" in out
    assert reg_line(out, "rip") == "0x100010 0x100010"
    assert "monitor vmcb: not available on this target" in out
    assert "unknown monitor command 'nonsense'" in out


def test_ctrl_c_interrupts_a_running_guest():
    cpu = FakeCpu([Step(0x100000), Step(0x100004), Step(0x100008)], loop_to=1, slow=0.0005)
    out, result = run_gdb(cpu, ["continue", "info registers rip", "kill"], interrupt=True)
    assert "Program received signal SIGINT, Interrupt." in out
    assert re.search(r"^rip\s+0x10000[48]", out, re.M)
    assert result.reason == "killed"


def test_guest_ending_abnormally():
    cpu = FakeCpu(list(SCRIPT), exit_code=None)
    out, result = run_gdb(cpu, ["continue"])
    assert "guest shutdown" in out
    assert "Program terminated with signal SIGKILL" in out
    assert result.reason == "ended"
