#!/usr/bin/env python3
"""Benchmark: the sandbox against bare Unicorn, measured side by side in one run.

    python scripts/bench.py            # full run
    python scripts/bench.py --quick    # a smaller run (smoke test)
    python scripts/bench.py --json     # machine-readable results

1. Hot loop: the same ALU loop on bare Unicorn (no hooks) and in the sandbox
   with every intercept armed (``--intercept all``).  Rounds are interleaved
   and the best of each side is kept, so the ratio is not at the mercy of a
   noisy neighbour.  Target: sandbox >= 50% of bare Unicorn.
2. Intercepted CPUID round trip: exit, the default Python CPUID handler,
   resume.  Time stamps are taken at each handler entry; one loop iteration
   is one round trip.  After a warm-up run, the round with the lowest median
   is reported.  Target: median <= 10 us.
3. For scale: bare Unicorn with the cheapest possible Python CPUID hook.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, Uc
from unicorn import x86_const as X

from sandbox import ExitCode, Machine
from sandbox.hypervisor import handle_cpuid
from sandbox.loader import LOAD_BASE, assemble

VMMCALL = ".byte 0x0f, 0x01, 0xd9"
HOT = """
    mov rcx, {n}
hot:
    add rax, rcx
    xor rdx, rax
    dec rcx
    jnz hot
done:
    xor eax, eax
    xor edi, edi
    """ + VMMCALL
CPUID_LOOP = """
    mov r12, {n}
again:
    xor eax, eax
    cpuid
    dec r12
    jnz again
done:
    xor eax, eax
    xor edi, edi
    """ + VMMCALL


class BenchError(Exception):
    pass


def _image(tmp: Path, name: str, src: str) -> Path:
    p = tmp / name
    p.write_text(src)
    return p


def bare_hot(code: bytes) -> float:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(LOAD_BASE, 0x10000)
    uc.mem_write(LOAD_BASE, code)
    end = LOAD_BASE + code.index(bytes.fromhex("31c031ff"))    # the "done" label
    t = time.perf_counter()
    uc.emu_start(LOAD_BASE, end)
    return time.perf_counter() - t


def sandbox_hot(path: Path) -> float:
    m = Machine()
    m.load(str(path))
    m.intercept("all")
    t = time.perf_counter()
    r = m.run(timeout=600)
    dt = time.perf_counter() - t
    if r.reason != "guest-exit":
        raise BenchError(f"hot loop in the sandbox ended with {r.reason}: {r.detail}")
    return dt


def sandbox_cpuid(path: Path) -> tuple[list[float], float, int]:
    m = Machine()
    m.load(str(path))
    stamps: list[int] = []
    now = time.perf_counter_ns

    def timed(m, e):
        stamps.append(now())
        return handle_cpuid(m, e)
    m.handlers[ExitCode.CPUID] = timed
    t = time.perf_counter()
    r = m.run(timeout=600)
    total = time.perf_counter() - t
    if r.reason != "guest-exit":
        raise BenchError(f"CPUID loop ended with {r.reason}: {r.detail}")
    deltas = [(b - a) / 1000 for a, b in zip(stamps, stamps[1:])]
    return deltas, total, r.counts.get(ExitCode.CPUID, 0)


def bare_cpuid_hook(code: bytes, n: int) -> float:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(LOAD_BASE, 0x10000)
    uc.mem_write(LOAD_BASE, code)
    at = LOAD_BASE + code.index(b"\x0f\xa2")
    end = LOAD_BASE + code.index(bytes.fromhex("31c031ff"))

    def hook(u, addr, size, ud):
        u.reg_write(X.UC_X86_REG_RAX, 0xD)
        u.reg_write(X.UC_X86_REG_RIP, addr + 2)
    uc.hook_add(UC_HOOK_CODE, hook, None, at, at)
    t = time.perf_counter()
    uc.emu_start(LOAD_BASE, end)
    return (time.perf_counter() - t) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20_000_000, help="hot-loop iterations")
    ap.add_argument("--cpuids", type=int, default=100_000, help="CPUID round trips")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.iters, a.cpuids, a.rounds = 2_000_000, 10_000, 2
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        hot_src = HOT.format(n=a.iters)
        hot = _image(tmp, "hot.S", hot_src)
        hot_code = assemble(hot_src)
        cpuid_src = CPUID_LOOP.format(n=a.cpuids)
        cpuid = _image(tmp, "cpuid.S", cpuid_src)
        bare_t, sb_t = [], []
        for _ in range(a.rounds):
            bare_t.append(bare_hot(hot_code))
            sb_t.append(sandbox_hot(hot))
        # CPUID: a warm-up run, then the round with the lowest median
        sandbox_cpuid(cpuid)
        best = None
        for _ in range(a.rounds):
            run = sandbox_cpuid(cpuid)
            if best is None or statistics.median(run[0]) < statistics.median(best[0]):
                best = run
        deltas, total, n = best
        floor = min(bare_cpuid_hook(assemble(cpuid_src), a.cpuids) for _ in range(a.rounds))
    bare_best, sb_best = min(bare_t), min(sb_t)
    deltas.sort()
    res = {
        "hot_loop_iters": a.iters,
        "bare_unicorn_s": bare_best,
        "sandbox_all_intercepts_s": sb_best,
        "bare_mips": 4 * a.iters / bare_best / 1e6,
        "sandbox_mips": 4 * a.iters / sb_best / 1e6,
        "hot_loop_ratio": bare_best / sb_best,
        "cpuid_round_trips": n,
        "cpuid_median_us": statistics.median(deltas),
        "cpuid_p90_us": deltas[int(0.9 * len(deltas))],
        "cpuid_mean_us": total / n * 1e6,
        "bare_unicorn_python_hook_us": floor,
    }
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table
        t = Table(title="sandbox vs bare Unicorn (one run)")
        t.add_column("measure")
        t.add_column("value", justify="right")
        t.add_column("target", justify="right")
        t.add_row("hot loop, bare Unicorn", f"{res['bare_mips']:.0f} MIPS", "")
        t.add_row("hot loop, sandbox, every intercept armed", f"{res['sandbox_mips']:.0f} MIPS", "")
        t.add_row("ratio sandbox / bare", f"{res['hot_loop_ratio']:.2f}", ">= 0.50")
        t.add_row("intercepted CPUID round trip, median", f"{res['cpuid_median_us']:.2f} us", "<= 10 us")
        t.add_row("  p90 / mean", f"{res['cpuid_p90_us']:.2f} / {res['cpuid_mean_us']:.2f} us", "")
        t.add_row("bare Unicorn + Python CPUID hook (floor)", f"{floor:.2f} us", "")
        Console().print(t)
    ok = res["hot_loop_ratio"] >= 0.5 and res["cpuid_median_us"] <= 10
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(2)
