"""Issue 11 section 6: the human-readable exit trace is elided past a limit, the summary is not."""
import errno
import io
import re
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest

from sandbox import Machine
from sandbox.cli import main as cli_main
from sandbox.cli.trace import DEFAULT_TRACE_LIMIT, ExitTrace
from sandbox.svm.exitcodes import ExitCode

ROOT = Path(__file__).resolve().parents[2]
IMG = ROOT / "guest_images"
CPUIDS = 300
LOOP = f"""
    mov r12, {CPUIDS}
again:
    xor eax, eax
    xor ecx, ecx
    cpuid
    dec r12
    jnz again
    xor eax, eax
    xor edi, edi
    .byte 0x0f, 0x01, 0xd9
"""
TRACE_LINE = re.compile(r"^#(\d+)\s+0x[0-9a-f]{16}\s")


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture
def loop(tmp_path):
    p = tmp_path / "loop.S"
    p.write_text(LOOP)
    return p


def trace_lines(stderr: str) -> list[int]:
    return [int(m.group(1)) for m in map(TRACE_LINE.match, stderr.splitlines()) if m]


def summary_count(stderr: str, name: str) -> int:
    """The count column of the exits table's row for ``name``."""
    for line in stderr.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
        if len(cells) == 3 and cells[1] == name:
            return int(cells[2])
    raise AssertionError(f"no {name} row in the summary:\n{stderr[-2000:]}")


def test_trace_past_the_limit_is_one_more_exits_line_and_the_summary_is_complete(loop):
    p = run_cli("run", loop, "--trace-limit", "50")
    assert p.returncode == 0, p.stderr[-2000:]
    assert trace_lines(p.stderr) == list(range(1, 51))           # the first 50 exits, in order
    total = CPUIDS + 1                                             # and the EXIT hypercall
    assert f"... {total - 50:,} more exits not shown" in p.stderr
    # the summary counts every exit, shown or not
    assert summary_count(p.stderr, "CPUID") == CPUIDS and summary_count(p.stderr, "VMMCALL") == 1
    assert p.stderr.rstrip().endswith(f"; {total} exits")
    # the elision line comes after the last trace line and before the summary
    lines = p.stderr.splitlines()
    at = next(i for i, s in enumerate(lines) if s.startswith("... "))
    assert TRACE_LINE.match(lines[at - 1]) and "exits by code" in "\n".join(lines[at + 1:])


def test_trace_limit_0_shows_every_exit(loop):
    p = run_cli("run", loop, "--trace-limit", "0")
    assert p.returncode == 0, p.stderr[-2000:]
    assert trace_lines(p.stderr) == list(range(1, CPUIDS + 2))
    assert "more exit" not in p.stderr


def test_short_run_under_the_default_limit_is_not_elided():
    p = run_cli("run", IMG / "hello.S")
    assert p.returncode == 0, p.stderr
    n = len(trace_lines(p.stderr))
    assert 0 < n < DEFAULT_TRACE_LIMIT and "more exit" not in p.stderr


def test_json_trace_is_never_elided(loop):
    p = run_cli("run", loop, "--json", "--trace-limit", "5")
    assert p.returncode == 0, p.stderr[-2000:]
    assert len([x for x in p.stdout.splitlines() if '"exitcode"' in x and '"final"' not in x]) == CPUIDS + 1


def test_negative_trace_limit_is_a_one_line_error(loop):
    p = run_cli("run", loop, "--trace-limit", "-1")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "sandbox: error: --trace-limit -1: must be >= 0 (0: every exit)"]


def test_exit_trace_counts_what_it_elides(loop):
    m = Machine()
    m.load(str(loop))
    out = StringIO()
    t = ExitTrace(m, out, limit=7)
    m.on_exit_record = t
    r = m.run()
    t.finish()
    text = out.getvalue().splitlines()
    assert r.exits == CPUIDS + 1 and t.shown == 7 and t.elided == r.exits - 7
    assert len(text) == 8 and text[-1].startswith(f"... {r.exits - 7:,} more exits not shown")
    # a line names the exit as the APM does, with the disassembled instruction; CPUID is 2 bytes (0F A2)
    f = text[0].split()
    assert f[2] == "cpuid" and f[3] == "CPUID" and int(f[-1].split("=")[1], 16) == int(f[1], 16) + 2
    assert r.counts[ExitCode.CPUID] == CPUIDS


@pytest.mark.slow
def test_default_trace_of_cpuid_loop_is_elided_and_the_run_completes():
    """100,000 CPUID exits with the default trace: 1,000 lines, then one line
    for the rest.  (How long it takes is scripts/bench.py's business; the
    wall-clock limit is lifted so a loaded machine cannot fail the test.)"""
    p = run_cli("run", IMG / "cpuid_loop.S", "--timeout", "0", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "run ended: guest-exit" in p.stderr and "100001 exits" in p.stderr
    assert f"... {100_001 - DEFAULT_TRACE_LIMIT:,} more exits not shown" in p.stderr
    assert trace_lines(p.stderr) == list(range(1, DEFAULT_TRACE_LIMIT + 1))
    assert summary_count(p.stderr, "CPUID") == 100_000


def test_trace_reader_going_away_ends_the_run_quietly(tmp_path):
    """``sandbox run ... 2>&1 >/dev/null | head -1``: the run stops, no traceback, SIGPIPE's status.
    3,000 traced exits are far more than a pipe holds (64 KiB), so the run
    cannot finish before the reader goes away, however fast the machine."""
    big = tmp_path / "big.S"
    big.write_text(LOOP.replace(f"mov r12, {CPUIDS}", "mov r12, 3000"))
    p = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "run", str(big), "--trace-limit", "0"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = p.stderr.readline()
    p.stderr.close()
    assert p.wait(timeout=120) == 141
    assert TRACE_LINE.match(first.decode())


class ClosingReader(io.StringIO):
    """stderr whose reader goes away after ``keep`` characters: every later write is EPIPE."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep

    def write(self, text: str) -> int:
        room = self.keep - self.tell()
        if room < len(text):
            super().write(text[:max(room, 0)])
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        return super().write(text)


def test_reader_going_away_at_any_point_of_the_output_is_sigpipes_status(loop, monkeypatch):
    """Wherever the pipe closes -- in a trace line, the elision line, the exits
    table or the last line -- the run ends with 141 and no traceback (rich's
    own reaction to a closed pipe is ``SystemExit(1)`` from inside a print)."""
    full = ClosingReader(1 << 30)
    monkeypatch.setattr(sys, "stderr", full)
    assert cli_main(["run", str(loop), "--trace-limit", "3"]) == 0
    text = full.getvalue()
    assert "run ended: guest-exit" in text
    cuts = sorted({0, 1, len(text) - 1, *range(0, len(text), max(1, len(text) // 24)),
                   text.index("exits by code"), text.index("run ended")})
    for keep in cuts:
        closing = ClosingReader(keep)
        monkeypatch.setattr(sys, "stderr", closing)
        assert cli_main(["run", str(loop), "--trace-limit", "3"]) == 141, keep
        assert closing.getvalue() == text[:keep]


@pytest.mark.parametrize("size,text", [(64, "movabs rax, 0x9090909090909090"), (32, "dec eax"), (16, "dec ax")])
def test_exit_lines_disassemble_for_the_guest_code_segment_size(size, text):
    """48 B8 ... is MOV RAX, imm64 in 64-bit mode; outside it 48 is DEC eAX, of
    the code segment's operand size (APM vol. 3 §1.2.7, §1.2.2).  A 16-bit code
    segment was disassembled as 32-bit."""
    from types import SimpleNamespace
    from sandbox.cli.trace import Disassembler
    code = bytes.fromhex("48b8") + b"\x90" * 13
    cpu = SimpleNamespace(fetched_bytes=lambda rip: code, guest_code_size=lambda: size)
    assert Disassembler(SimpleNamespace(sev=None, cpu=cpu))(0x1000) == text
