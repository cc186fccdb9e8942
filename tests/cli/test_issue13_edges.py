"""The rough edges of issue 13 section 4 that needed more than the earlier
fixes: items 6 (handler returns, livelock), 11 (the Python API as the README
shows it), 12 (the MSR table: IA32_TSC writes move TSC_OFFSET, #GP for the
rest), 14 (scripts' --help does no work) and 15 (progress only in a terminal)."""
from __future__ import annotations

import os
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import ExitCode, Machine, RESUME

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def guest(tmp_path: Path, body: str) -> Machine:
    src = tmp_path / "g.S"
    src.write_text(body)
    m = Machine()
    m.load(str(src))
    return m


# -- item 6 ------------------------------------------------------------------------------------
def test_handler_returning_something_else_is_named(tmp_path):
    m = guest(tmp_path, "cpuid\nhlt\n")
    m.on(ExitCode.CPUID)(lambda m, e: 42)
    r = m.run(timeout=5)
    assert r.reason == "handler-error"
    assert "handler for CPUID returned 42; expected RESUME, STOP or None" in r.detail


def test_handler_that_never_advances_rip_is_a_livelock_not_a_timeout(tmp_path):
    m = guest(tmp_path, "cpuid\nhlt\n")
    m.on(ExitCode.CPUID)(lambda m, e: RESUME)                   # forgets m.advance(e)
    r = m.run(timeout=60)
    assert r.reason == "handler-error" and r.detail.startswith("livelock: the CPUID handler resumed the guest at")
    assert "did it forget m.advance(exit)?" in r.detail
    assert r.exits == 1000                                      # Machine.LIVELOCK_LIMIT, long before 60 s


def test_cli_end_message_names_the_livelock(tmp_path):
    hooks = tmp_path / "h.py"
    hooks.write_text("from sandbox import ExitCode, RESUME\nHANDLERS = {ExitCode.CPUID: lambda m, e: RESUME}\n")
    p = subprocess.run([sys.executable, "-m", "sandbox.cli", "run", str(ROOT / "guest_images" / "hello.S"),
                        "--hooks", str(hooks), "--quiet"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and "livelock" in p.stderr and "forget m.advance" in p.stderr


# -- item 11 -----------------------------------------------------------------------------------
def test_exit_record_has_the_apm_names_the_readme_uses(tmp_path):
    m = guest(tmp_path, "mov eax, 0x40000000\ncpuid\nhlt\n")
    seen = []

    @m.on(ExitCode.CPUID)
    def h(m, e):
        seen.append((e.EXITCODE, e.EXITINFO1, e.EXITINFO2, e.RIP, e.NRIP, e.exitcode, e.nrip))
        m.advance(e)
        return RESUME
    m.run(timeout=5)
    # CPUID: EXITCODE 72h, no EXITINFO (APM Appendix C); mov eax, imm32 is 5 bytes, CPUID 2
    assert seen == [(0x72, 0, 0, 0x100005, 0x100007, 0x72, 0x100007)]


def test_regs_names_show_in_dir_and_help():
    m = Machine()
    names = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *(f"r{i}" for i in range(8, 16)),
             "rip", "rflags"}
    assert names <= set(dir(m.regs))
    text = pydoc.render_doc(m.regs, renderer=pydoc.plaintext)
    assert all(n in text for n in names) and "guest RAX" in text and "guest R12" in text


def test_cpuid_overrides_and_on_are_documented(tmp_path):
    src = (ROOT / "sandbox" / "hypervisor" / "machine.py").read_text()
    assert "#: CPUID answers that replace the default handler's" in src
    assert "returns :data:`RESUME`" in Machine.on.__doc__ and ":data:`STOP`" in Machine.on.__doc__
    m = guest(tmp_path, "mov eax, 1\ncpuid\nhlt\n")
    m.cpuid_overrides[(1, -1)] = (0x00A00F11, 1, 2, 3)
    m.run(timeout=5)
    assert (m.regs.rax, m.regs.rbx, m.regs.rcx, m.regs.rdx) == (0x00A00F11, 1, 2, 3)


# -- item 12 -----------------------------------------------------------------------------------
MSR_GUEST = """
    mov ecx, 0x10
    xor eax, eax
    mov edx, 0x100
    wrmsr                       # IA32_TSC := 0x100_0000_0000
    rdtsc                       # not intercepted: runs natively with the new TSC_OFFSET
    mov r8, rdx
    mov ecx, 0xc0000082
    mov eax, 0x12345678
    xor edx, edx
    wrmsr                       # LSTAR: the processor's own MSR
    rdmsr
    mov r9, rax
    mov ecx, {msr:#x}
    wrmsr                       # not in the table: #GP(0) -> no IDT -> #DF -> shutdown
    hlt
"""


@pytest.mark.parametrize("msr", [0xC000_1234, 0xC001_1FFF, 0x0000_0ABC])
def test_msr_table_tsc_write_and_gp_for_the_rest(tmp_path, msr):
    m = guest(tmp_path, MSR_GUEST.format(msr=msr))
    m.intercept("msr")
    r = m.run(timeout=10)
    # KVM: a WRMSR to IA32_TSC sets the guest TSC (the offset moves); RDTSC then reads about 0x100 << 32
    assert m.regs.r8 == 0x100
    assert m.regs.r9 == 0x12345678
    assert r.reason == "shutdown" and r.counts.get(ExitCode.SHUTDOWN) == 1    # the #GP of the unknown MSR
    assert r.counts.get(ExitCode.MSR) == 4


# -- item 14 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [
    [sys.executable, "scripts/bench_sev.py", "--help"],
    ["bash", "scripts/build_images.sh", "--help"],
    [sys.executable, "scripts/io_experiment.py", "--help"],
    [sys.executable, "scripts/bench_memory.py", "--help"],
])
def test_scripts_help_does_no_work(cmd):
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "guest_images").iterdir()}
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "usage" in p.stdout.lower(), p.stdout + p.stderr
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "guest_images").iterdir()} == before


def test_readme_says_how_to_run_hooks_and_the_popek_goldberg_exits():
    readme = (ROOT / "README.md").read_text()
    assert "--hooks hooks/cpuid_spoofer.py" in readme
    assert "--ports 0x80" in readme and "one exit per step" not in readme.replace(
        "--ports 0x80` for one exit per step", "")


# -- item 15 -----------------------------------------------------------------------------------
def test_progress_only_in_a_terminal():
    from sandbox.progress import progress
    import io
    out = io.StringIO()
    with progress("working", total=3, file=out) as tick:
        for _ in range(3):
            tick()
    assert out.getvalue() == ""                       # not a terminal: nothing extra
    tty = io.StringIO()
    tty.isatty = lambda: True
    with progress("working", total=3, file=tty) as tick:
        for _ in range(3):
            tick()
    assert "working" in tty.getvalue()
