"""Issue 13 section 4: the edges a new user hit on the ``sandbox`` command line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMG = ROOT / "guest_images"


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def one_line_error(p):
    assert p.returncode == 2, (p.returncode, p.stderr[-500:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sandbox: error: "), p.stderr[-500:]
    assert "Traceback" not in p.stderr
    return lines[0]


# 1. console on stdout, a line at a time; trace on stderr
def test_console_is_on_stdout_in_whole_lines_and_trace_on_stderr():
    p = run_cli("run", IMG / "hello.S")
    assert p.returncode == 0, p.stderr
    assert "Hello from the guest!\n" in p.stdout
    assert "IOIO" not in p.stdout and "IOIO" in p.stderr


def test_console_partial_line_waits_for_newline_or_trace(tmp_path):
    from sandbox.cli.run import ConsoleLines
    out = []

    class W:
        def write(self, s): out.append(s)
        def flush(self): pass

    c = ConsoleLines(W(), lambda: None)
    for ch in b"ab":
        c.write(bytes([ch]))
    assert out == []                      # no newline, no trace line yet: kept
    c.write(b"c\nd")
    assert out == ["abc\n"]
    c.flush()                             # the trace is about to print a line
    assert out == ["abc\n", "d"]


def test_console_lines_stay_whole_when_console_and_trace_share_a_stream():
    """stdout and stderr on one destination (a terminal, 2>&1): each console line
    is written whole, not broken up by the trace lines of the exits that wrote it."""
    p = subprocess.run([sys.executable, "-m", "sandbox.cli", "run", str(IMG / "hello.S")], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout[-500:]
    lines = p.stdout.splitlines()
    assert "Hello from the guest!" in lines and "hypercall print works" in lines
    assert any(" IOIO " in ln for ln in lines)


# 2. rich markup in the disassembly is escaped
def test_trace_shows_brackets_of_memory_operands():
    p = run_cli("run", IMG / "popek_goldberg.S", "--intercept", "gdtr_read", "--ports", "0x80")
    assert "sgdt [rip + " in p.stderr


# 3. sizes
@pytest.mark.parametrize("args", [("--dram", "0"), ("--dram", "-5"), ("--dram", "3"), ("--dram", "100000"),
                                  ("--ram", "128", "--dram", "64"), ("--ram", "1"), ("--ram", "256", "--dram", "260")])
def test_bad_sizes_are_one_line_errors(args):
    one_line_error(run_cli("run", IMG / "hello.S", "--quiet", *args))


def test_size_limits_are_in_help():
    h = run_cli("run", "--help").stdout
    assert "4-16384 MiB" in h and "at least 2 MiB" in h


# 4. Ctrl-C
@pytest.mark.parametrize("timeout", ["0", "30"])
def test_ctrl_c_stops_a_spinning_guest_prints_summary_exits_130(timeout, tmp_path):
    # the guest says "ready" on its console (PRINT hypercall), then spins without exiting: the
    # line on stdout is the readiness signal, so the test does not guess how long start-up takes
    spin = tmp_path / "ready_spin.S"
    spin.write_text("lea rdi, [rip + msg]\nmov esi, 6\nmov eax, 1\n.byte 0x0f, 0x01, 0xd9\n"
                    "spin:\n    jmp spin\nmsg:\n    .ascii \"ready\\n\"\n")
    p = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "run", str(spin), "--timeout", timeout,
                          "--max-insns", "0", "--quiet"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    time.sleep(0.2)                       # past the hypercall: the guest is in its loop
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert time.monotonic() - t0 < 2.0
    assert p.returncode == 130, err
    assert "run ended: stopped - interrupted" in err and "Traceback" not in err and "internal" not in err


def test_ctrl_c_during_a_run_that_exits_is_no_internal_error():
    p = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "run", str(IMG / "popek_goldberg.S"),
                          "--intercept", "all", "--timeout", "0", "--max-exits", "100000000"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline()            # the guest's first console line: the run is under way
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert "internal error" not in err and "KeyboardInterrupt" not in err
    assert p.returncode in (0, 1, 130)


# 5. budgets
@pytest.mark.parametrize("args", [("--timeout", "-1"), ("--timeout", "nan"), ("--timeout", "inf"),
                                  ("--max-exits", "-1"), ("--max-insns", "-3")])
def test_bad_budgets_are_refused(args):
    one_line_error(run_cli("run", IMG / "hello.S", *args))


@pytest.mark.parametrize("n", [0, 1, 5])
def test_max_exits_records_count_and_message_agree(n):
    p = run_cli("run", IMG / "hello.S", "--json", "--max-exits", n)
    recs = [json.loads(x) for x in p.stdout.splitlines()]
    final = recs[-1]
    assert final["reason"] == "exit-budget"
    assert len(recs) - 1 == final["exits"] == n
    assert final["detail"] == f"exit budget of {n} reached"


def test_timeout_zero_is_documented():
    assert "0 = no limit" in run_cli("run", "--help").stdout


# 7. closed pipe
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_closed_stdout_pipe_ends_quietly(json_flag):
    cmd = f"{sys.executable} -m sandbox.cli run guest_images/kernel.S {' '.join(json_flag)} 2>err.txt | head -1"
    p = subprocess.run(["bash", "-c", "cd " + str(ROOT) + " && " + cmd.replace("err.txt", os.devnull)
                        + f"; echo rc=${{PIPESTATUS[0]}}"], capture_output=True, text=True, timeout=120)
    assert p.stdout.count("\n") == 2, p.stdout
    assert p.stdout.strip().splitlines()[-1] in ("rc=0", "rc=141")
    q = subprocess.run(["bash", "-c", f"cd {ROOT} && {cmd.replace(' 2>err.txt', '')} >/dev/null"],
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in q.stderr and "BrokenPipe" not in q.stderr and "handler-error" not in q.stderr


# 8. fuzz numbers
@pytest.mark.parametrize("args", [("--cases", "5", "--insns", "100000"), ("--seconds", "nan"), ("--seconds", "inf"),
                                  ("--seconds", "-1"), ("--cases", "0"), ("--cases", "2", "--insns", "0"),
                                  ("--cases", "2", "--audit-every", "-1"), ("--cases", "2", "--jobs", "0"),
                                  ("--cases", "2", "--seed", "-1")])
def test_bad_fuzz_numbers_are_one_line_errors(args):
    one_line_error(run_cli("fuzz", "--no-status", *args))


# 9. messages that say what is wrong
def test_corpus_file_says_it_is_a_file(tmp_path):
    f = tmp_path / "corpus"
    f.write_text("")
    assert "a file, not a directory" in one_line_error(run_cli("fuzz", "--cases", "1", "--corpus", f))


def test_negative_port_says_negative():
    assert "negative" in one_line_error(run_cli("run", IMG / "hello.S", "--ports", "-1"))


def test_hooks_directory_says_directory():
    assert "directory" in one_line_error(run_cli("run", IMG / "hello.S", "--hooks", "hooks"))


def test_pie_elf_says_only_static_non_pie(tmp_path):
    elf = bytearray((IMG / "cguest.elf").read_bytes())
    elf[16:18] = (3).to_bytes(2, "little")            # e_type = ET_DYN (a PIE)
    p = tmp_path / "pie.elf"
    p.write_bytes(bytes(elf))
    assert "only static, non-PIE ELF64" in one_line_error(run_cli("run", p))


# 10. a saved case refuses the machine flags it would ignore (--hooks replays a handler finding)
@pytest.mark.parametrize("flag", [("--intercept", "cpuid"), ("--ports", "0x80"), ("--msrs", "r:0x10"),
                                  ("--timeout", "3"), ("--sev",), ("--nested",), ("--trace-limit", "1")])
def test_case_replay_refuses_machine_flags(tmp_path, flag):
    case = tmp_path / "x.case"
    case.write_text("{}")
    assert "only --audit, --hooks, --json and --quiet" in one_line_error(run_cli("run", case, *flag))


# 13. disarming intercepts
def test_intercept_minus_disarms_a_default():
    p = run_cli("run", IMG / "hello.S", "--json", "--intercept=-cpuid")
    final = json.loads(p.stdout.splitlines()[-1])
    assert "CPUID" not in final["counts"] and final["counts"]


def test_no_default_intercepts_and_help_names_the_defaults():
    p = run_cli("run", IMG / "hello.S", "--json", "--no-default-intercepts", "--intercept", "vmmcall")
    final = json.loads(p.stdout.splitlines()[-1])
    assert set(final["counts"]) == {"VMMCALL"}, final["counts"]
    h = run_cli("run", "--help").stdout
    assert "Armed by default" in h and "cpuid" in h and "--no-default-intercepts" in h


# 14. defaults in --help
def test_help_shows_defaults():
    h = run_cli("run", "--help").stdout
    assert "(default: 10.0)" in h and "(default: 10000000)" in h and "(default: nested)" in h
    assert "(default: 64)" in run_cli("fuzz", "--help").stdout
