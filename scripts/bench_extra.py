"""The rest of issue 11's rows for ``scripts/bench.py``, each beside its floor or
peer measured in the same run.

7. RDTSC not intercepted: a loop of RDTSCs in the sandbox (TSC_OFFSET set, added by
   the emulator's own RDTSC helper, no hook) and on bare Unicorn.  Each side runs
   two loop lengths and the difference is divided by the extra iterations, so the
   sandbox's fixed cost per run (VMRUN, first fills, EXIT) is left out.  The ratio
   is the median of per-round pairs.  Target: native speed, read as at most 1.5x
   bare Unicorn's time per iteration.
8. Warm working sets (``bench_memory.stride_ratio``): a warm pass over 4 MiB at
   stride 4096 (1,024 pages, more than Unicorn's first 256-entry soft TLB) beside
   bare Unicorn with the data not executable, target >= 0.5 of bare; and a warm
   pass over 64 MiB (16,384 pages), target: no 2-D walk per access.
9. The human trace: ``sandbox run guest_images/cpuid_loop.S`` (100,001 exits) with
   every exit traced (``--trace-limit 0``) and with ``--quiet``, each a process of
   its own, interleaved; the difference per traced line.  Target: about 20 us per
   line or less.  Beside it, the default command's wall time against its 10 s
   timeout.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))          # the working copy of the package, as bench.py uses

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc  # noqa: E402

from sandbox import Machine  # noqa: E402
from sandbox.hypervisor.loader import LOAD_BASE, assemble  # noqa: E402

TARGET_RDTSC_RATIO = 1.5
TARGET_WARM_4M_RATIO = 0.5
TARGET_TRACE_US = 20.0
DEFAULT_RUN_TIMEOUT_S = 10.0
#: a TSC_OFFSET far from any host TSC, so the guest's reading shows it was added
TSC_OFFSET = 1 << 60

RDTSC_SRC = """
    mov r12, {n}
tsc:
    rdtsc
    dec r12
    jnz tsc
    mov rbx, rdx
    xor eax, eax
    xor edi, edi
    .byte 0x0f, 0x01, 0xd9
"""


class ExtraError(Exception):
    """A run of these rows failed or produced a wrong result."""


# ---------------------------------------------------------------- 7. RDTSC
def _sandbox_rdtsc(path: Path, timeout: float) -> float:
    m = Machine()
    m.load(str(path))
    m.intercept("rdtsc,rdtscp", on=False)
    m.guest.vmcb.TSC_OFFSET = TSC_OFFSET
    t = time.perf_counter()
    r = m.run(timeout=timeout)
    dt = time.perf_counter() - t
    if r.reason != "guest-exit":
        raise ExtraError(f"RDTSC loop: the sandbox run ended with {r.reason!r} ({r.detail})")
    if r.regs["rbx"] < TSC_OFFSET >> 32:
        raise ExtraError(f"RDTSC loop: EDX={r.regs['rbx']:#x}, TSC_OFFSET {TSC_OFFSET:#x} was not added")
    return dt


def _bare_rdtsc(code: bytes, end: int) -> float:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(LOAD_BASE, (len(code) + 0xFFFF) & ~0xFFFF)
    uc.mem_write(LOAD_BASE, code)
    t = time.perf_counter()
    uc.emu_start(LOAD_BASE, end)
    return time.perf_counter() - t


def rdtsc_row(n: int, rounds: int, timeout: float, log) -> dict:
    """ns per unintercepted RDTSC iteration, sandbox and bare, with the ratio."""
    small = max(1, n // 10)
    log(f"RDTSC not intercepted: {n:,} and {small:,} iterations x {rounds} rounds (sandbox / bare, interleaved)")
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-tsc-") as d:
        images = {}
        for k in (n, small):
            src = RDTSC_SRC.format(n=k)
            p = Path(d) / f"rdtsc_{k}.S"
            p.write_text(src)
            code = assemble(src, LOAD_BASE, str(p))
            loop = assemble(src.split("    mov rbx")[0], LOAD_BASE, str(p))
            images[k] = (p, code, LOAD_BASE + len(loop))
        sb, bare = [], []
        for i in range(rounds):
            for side in (("sandbox", "bare") if i % 2 == 0 else ("bare", "sandbox")):
                if side == "sandbox":
                    sb.append((_sandbox_rdtsc(images[n][0], timeout)
                               - _sandbox_rdtsc(images[small][0], timeout)) / (n - small) * 1e9)
                else:
                    bare.append((_bare_rdtsc(*images[n][1:]) - _bare_rdtsc(*images[small][1:])) / (n - small) * 1e9)
    ratio = statistics.median(s / b for s, b in zip(sb, bare))
    return {"iterations": n, "sandbox_ns": statistics.median(sb), "bare_ns": statistics.median(bare),
            "ratio": ratio, "rounds": {"sandbox_ns": sb, "bare_ns": bare},
            "target": {"value": ratio, "target": f"<= {TARGET_RDTSC_RATIO:g}x bare (native)",
                       "met": ratio <= TARGET_RDTSC_RATIO}}


# ------------------------------------------------------- 8. warm working sets
def memory_rows(quick: bool, log) -> dict:
    """The warm 4 MiB stride-4096 pass against bare Unicorn and the warm 64 MiB pass's walks."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_memory import stride_ratio
    log("warm working sets: 4 MiB and 64 MiB at stride 4096 (sandbox / bare Unicorn, data not executable)")
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-warm-") as d:
        w4 = stride_ratio(Path(d), 4096, 20 if quick else 200, 1 if quick else 3)
        w64 = stride_ratio(Path(d), 4096, 2 if quick else 10, 1, size=64 << 20)
    return {"warm_4m": w4, "warm_64m": w64,
            "targets": {
                "warm_4m_ratio": {"value": w4["ratio"], "target": f">= {TARGET_WARM_4M_RATIO:g} of bare",
                                  "met": w4["ratio"] >= TARGET_WARM_4M_RATIO},
                "warm_64m_walks_per_access": {"value": w64["warm_walks_per_access"], "target": "0 2-D walks",
                                              "met": w64["warm_walks_per_access"] == 0}}}


# ------------------------------------------------------------- 9. the trace
def _cli_run(*args: str) -> float:
    """Wall seconds of ``sandbox run guest_images/cpuid_loop.S ARGS``, its output read and dropped."""
    env = dict(os.environ, COLUMNS="120")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "sandbox.cli", "run", "guest_images/cpuid_loop.S", *args],
                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise ExtraError(f"sandbox run cpuid_loop.S {' '.join(args)}: exit status {p.returncode}: "
                         f"{p.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
    return dt


def trace_row(rounds: int, log) -> dict:
    """Cost per traced exit line, and the default command's wall time."""
    log(f"trace: cpuid_loop.S (100,001 exits) traced / --quiet / default, x {rounds} rounds")
    exits = 100_001
    full, quiet, default = [], [], []
    for _ in range(rounds):
        full.append(_cli_run("--trace-limit", "0"))
        quiet.append(_cli_run("--quiet"))
        default.append(_cli_run())
    per_line = statistics.median((f - q) / exits * 1e6 for f, q in zip(full, quiet))
    return {"exits": exits, "traced_s": full, "quiet_s": quiet, "default_s": default, "us_per_line": per_line,
            "targets": {
                "trace_us_per_line": {"value": per_line, "target": f"<= {TARGET_TRACE_US:g} us",
                                      "met": per_line <= TARGET_TRACE_US},
                "default_run_s": {"value": max(default), "target": f"well within {DEFAULT_RUN_TIMEOUT_S:g} s",
                                  "met": max(default) <= DEFAULT_RUN_TIMEOUT_S / 2}}}


# ------------------------------------------------------------- the table rows
def add_rows(t, res: dict, ok) -> None:
    """These rows (and the --jobs 2 row of bench.py's fuzz rounds) on bench.py's table."""
    tg, f = res["targets"], res["fuzz"]
    if f.get("jobs2_scaling") is not None:
        two = " / ".join(f"{r['execs_per_s']:.0f}" for r in f["jobs2_rounds"])
        one = " / ".join(f"{r['execs_per_s']:.0f}" for r in f["campaign_rounds"])
        t.add_row("[bold]fuzz campaign, `--jobs 2` / `--jobs 1`, median of paired rounds[/]",
                  f"[bold]{f['jobs2_scaling']:.2f}x[/]", f"--jobs 2 {two}/s against --jobs 1 {one}/s",
                  tg["fuzz_jobs2_scaling"]["target"], ok(tg["fuzz_jobs2_scaling"]["met"]))
    t.add_section()
    ts = res["rdtsc"]
    t.add_row("[bold]RDTSC not intercepted (TSC_OFFSET set), sandbox / bare Unicorn, median of paired rounds[/]",
              f"[bold]{ts['ratio']:.2f}x[/]",
              f"{ts['sandbox_ns']:.1f} / {ts['bare_ns']:.1f} ns an iteration (RDTSC, DEC, JNZ)",
              ts["target"]["target"], ok(ts["target"]["met"]))
    m = res["memory"]
    w4, w64 = m["warm_4m"], m["warm_64m"]
    t.add_row("[bold]warm 4 MiB pass, stride 4096: sandbox speed / bare Unicorn (data not executable)[/]",
              f"[bold]{w4['ratio']:.2f}[/]", f"bare {w4['bare_pass_ms']:.3f} ms / sandbox {w4['sandbox_pass_ms']:.3f} ms "
              "a pass", tg["warm_4m_ratio"]["target"], ok(tg["warm_4m_ratio"]["met"]))
    t.add_row("[bold]warm 64 MiB pass, stride 4096: 2-D walks per access[/]",
              f"[bold]{w64['warm_walks_per_access']:.4f}[/]",
              f"bare {w64['bare_pass_ms']:.2f} ms / sandbox {w64['sandbox_pass_ms']:.2f} ms a pass "
              f"(ratio {w64['ratio']:.2f})", tg["warm_64m_walks_per_access"]["target"],
              ok(tg["warm_64m_walks_per_access"]["met"]))
    tr = res["trace"]
    t.add_row("[bold]human trace, cost per exit line (cpuid_loop.S, every exit traced vs --quiet)[/]",
              f"[bold]{tr['us_per_line']:.1f} us[/]",
              "traced " + " / ".join(f"{x:.2f}" for x in tr["traced_s"]) + " s, quiet "
              + " / ".join(f"{x:.2f}" for x in tr["quiet_s"]) + " s",
              tg["trace_us_per_line"]["target"], ok(tg["trace_us_per_line"]["met"]))
    t.add_row("  `sandbox run guest_images/cpuid_loop.S` (default trace, 1,000 lines), wall time",
              " / ".join(f"{x:.2f}" for x in tr["default_s"]) + " s", "its timeout 10 s",
              tg["default_run_s"]["target"], ok(tg["default_run_s"]["met"]))
