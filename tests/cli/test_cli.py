"""End-to-end checks of the ``sandbox`` command line on bundled images."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "guest_images" / "hello.S"


def run_cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_hello_prints_and_exits_zero():
    p = run_cli("run", str(HELLO))
    assert p.returncode == 0, p.stderr
    assert "Hello from the guest!" in p.stdout
    # the vendor leaf 0x40000000 answered by the default CPUID handler
    assert "hypervisor vendor: AMDVSandbox" in p.stdout
    assert "VMMCALL" in p.stderr and "IOIO" in p.stderr


def test_json_records_and_final_record():
    p = run_cli("run", str(HELLO), "--json")
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    exits, final = lines[:-1], lines[-1]
    assert final["final"] is True and final["reason"] == "guest-exit"
    assert set(final["regs"]) == {"rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"}
    # APM exit codes: IOIO 0x7B, CPUID 0x72, VMMCALL 0x81
    codes = {e["exitcode"] for e in exits}
    assert codes == {0x7B, 0x72, 0x81}
    for e in exits:
        assert {"exitcode", "exit", "rip", "nrip", "exitinfo1", "exitinfo2"} <= set(e)
        if e["exitcode"] == 0x7B:
            # OUT to COM1 / IN from its LSR: PORT in EXITINFO1[31:16], EXITINFO2 = next RIP
            assert e["exitinfo1"] >> 16 in (0x3F8, 0x3FD)
            assert e["exitinfo2"] == e["nrip"]
    assert final["counts"]["VMMCALL"] == 2


def test_quiet_json_prints_only_final_record():
    p = run_cli("run", str(HELLO), "--json", "--quiet")
    assert p.returncode == 0
    lines = [x for x in p.stdout.splitlines() if x.strip()]
    assert len(lines) == 1 and json.loads(lines[0])["final"] is True


def test_unknown_intercept_is_a_clear_error():
    p = run_cli("run", str(HELLO), "--intercept", "cpuidd")
    assert p.returncode == 2
    assert "unknown intercept name 'cpuidd'" in p.stderr and "cpuid" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("args, says", [
    (("run", "--bogus", "HELLO"), "sandbox: error: unrecognized arguments: --bogus (see 'sandbox --help')"),
    ((), "sandbox: error: the following arguments are required: COMMAND (see 'sandbox --help')"),
    (("run",), "sandbox run: error: the following arguments are required: image (see 'sandbox run --help')"),
    (("run", "HELLO", "--tlb", "nope"), "sandbox run: error: argument --tlb: invalid choice: 'nope'"),
    (("fuzz", "--jobs", "x"), "sandbox fuzz: error: argument --jobs: invalid int value: 'x'"),
])
def test_a_bad_flag_is_one_line_with_status_2(args, says):
    """argparse's own errors too: one line naming the command and its --help, no usage block."""
    p = run_cli(*(str(HELLO) if a == "HELLO" else a for a in args))
    assert p.returncode == 2
    assert p.stderr.startswith(says) and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stdout == ""


def test_bad_ports_and_missing_image_are_clear_errors(tmp_path):
    p = run_cli("run", str(HELLO), "--ports", "0x10-0x5")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    p = run_cli("run", str(tmp_path / "nope.S"))
    assert p.returncode == 2 and "no such file" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "bad.S"
    bad.write_text("this is not x86\n")
    p = run_cli("run", str(bad))
    assert p.returncode == 2 and "keystone" in p.stderr and "Traceback" not in p.stderr


def test_guest_that_runs_forever_hits_the_timeout(tmp_path):
    spin = tmp_path / "spin.S"
    spin.write_text("spin:\n    jmp spin\n")
    p = run_cli("run", str(spin), "--timeout", "0.5")
    assert p.returncode == 1
    assert "timeout" in p.stderr and "Traceback" not in p.stderr


def test_instruction_budget(tmp_path):
    spin = tmp_path / "spin.S"
    spin.write_text("spin:\n    inc rax\n    jmp spin\n")
    p = run_cli("run", str(spin), "--max-insns", "1000", "--json", "--quiet")
    assert p.returncode == 1
    final = json.loads(p.stdout.strip().splitlines()[-1])
    assert final["reason"] == "insn-budget"
    # 1000 instructions of a 2-instruction loop starting with RAX = 0: RAX = 500
    assert final["regs"]["rax"] == 500


def test_triple_fault_is_reported(tmp_path):
    g = tmp_path / "tf.S"
    g.write_text("    ud2\n")          # no IDT: #UD -> #GP -> #DF -> shutdown
    p = run_cli("run", str(g), "--json", "--quiet")
    assert p.returncode == 1
    final = json.loads(p.stdout.strip().splitlines()[-1])
    assert final["reason"] == "shutdown"
    assert final["counts"] == {"SHUTDOWN": 1}


def test_instruction_count_with_a_budget(tmp_path):
    g = tmp_path / "count.S"
    g.write_text("    mov ecx, 100\nl:\n    dec ecx\n    jnz l\n    xor eax, eax\n    xor edi, edi\n"
                 "    .byte 0x0f, 0x01, 0xd9\n")
    p = run_cli("run", str(g), "--max-insns", "100000", "--json", "--quiet")
    assert p.returncode == 0
    final = json.loads(p.stdout.strip().splitlines()[-1])
    # mov + 100 x (dec, jnz) + xor + xor + the intercepted VMMCALL
    assert final["insns"] == 1 + 200 + 3


# -- memory virtualization options -------------------------------------------------
def _final(p):
    return [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")][-1]


def test_paging_modes_report_their_walks():
    nested = _final(run_cli("run", str(ROOT / "guest_images" / "kernel.S"), "--json", "--quiet"))
    shadow = _final(run_cli("run", str(ROOT / "guest_images" / "kernel.S"), "--json", "--quiet",
                            "--paging", "shadow"))
    assert nested["ok"] and shadow["ok"] and nested["console"] == shadow["console"]
    assert nested["walks"]["nested_pte_refs"] > 0 and shadow["walks"]["nested_pte_refs"] == 0
    assert shadow["counts"].get("EXCP_PF", 0) > 0 and "EXCP_PF" not in nested["counts"]
    assert shadow["shadow"]["shadow_faults"] > 0 and nested["shadow"] is None


def test_memory_summary_table():
    p = run_cli("run", str(HELLO), "--quiet", "--npt-page", "2m")
    assert p.returncode == 0, p.stderr
    assert "memory (nested paging)" in p.stderr and "nested page-table references" in p.stderr


def test_bad_memory_options_are_usage_errors():
    p = run_cli("run", str(HELLO), "--npt-page", "1g")
    assert p.returncode == 2 and "nested page size" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("run", str(HELLO), "--paging", "shadow", "--npt-page", "2m")
    assert p.returncode == 2 and "shadow" in p.stderr
    p = run_cli("run", str(HELLO), "--tlb", "sometimes")
    assert p.returncode == 2
