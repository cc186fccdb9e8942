#!/usr/bin/env python3
"""Benchmark: the sandbox against bare Unicorn, measured side by side in one run.

    python scripts/bench.py                 # full run (about three minutes)
    python scripts/bench.py --quick         # smoke run for CI (a few seconds)
    python scripts/bench.py --json          # JSON on stdout instead of the table
    python scripts/bench.py --json out.json # the table, and JSON written to out.json
    python scripts/bench.py --strict        # exit 1 when a target is missed

What is measured (the machine is noisy, so every comparison is taken in the
same process, interleaved; ratios are medians of per-round pairs, with the best
round of each side shown beside them):

1. Hot loop throughput.  One ALU loop (``add/xor/dec/jnz``, --iters
   iterations) on bare Unicorn -- ``Uc(UC_ARCH_X86, UC_MODE_64)``, mem_map,
   emu_start to the end of the loop, no hooks -- and in the sandbox with every
   intercept armed (``Machine(); load(); intercept("all"); run()``).  Both
   runs must compute the same RAX/RDX.  The ratio is the median over
   --paired-rounds interleaved rounds (short, like the exit rounds below, so
   both sides of a round see the same phase of a shared machine) of each
   round's bare time over its sandbox time.  Target: sandbox/bare >=
   0.9 (issue 11's no-regression bar; the first target was 0.5).
2. Intercepted CPUID round trip.  A guest loop of --cpuids CPUIDs with the
   CPUID intercept armed and the default handler, wrapped to time-stamp each
   handler entry: one round trip (exit, Python handler, VMRUN, guest
   ``dec/jnz/xor/xor``, next CPUID) is the gap between consecutive entries.
   Median and p90 of those gaps, and mean = run time / exits.  The same for
   a loop of OUTs to COM1 (an intercepted OUT to a device port, IOIO).
3. The floor beside them (issue 11): a raw ctypes UC_HOOK_CODE hook on the
   CPUID doing what a Python world switch must -- save the CPU context into a
   preallocated one, patch RAX..RDX in it, restore it, write RIP past the
   instruction -- timed the same way.  Targets: CPUID median <= 2x that floor
   (goal 1.5x), OUT median <= 2.5x.  The ratios are paired: each round's
   median over the same round's floor median, then the median over
   --exit-rounds short rounds (a shared machine's slow phases last seconds:
   short interleaved rounds see the same phase on both sides).  For scale: a raw hook that only writes
   the registers, a hook through the binding's API, and the loop with no hook
   at all (Unicorn's own CPUID).
4. SEV (scripts/bench_sev.py): a memory-heavy guest loop exiting every
   ~10,000 instructions with and without SEV, the cost per #VMEXIT of keeping
   DRAM encrypted, and the memory controller's AES throughput.  The ratio is
   the median over --paired-rounds rounds of each round's SEV time over its
   plain time.  Target: SEV within 1.5x of the plain run.
5. Cold first touch of a page: a guest touching P pages once against one
   page P times (bench_memory's TLB-miss measure: one miss, one 24-reference
   2-D walk), beside bare Unicorn in UC_TLB_VIRTUAL mode with a Python
   TLB-fill hook mapping 1:1 (the floor of a miss answered in Python).
   Target: <= 15 us.
6. Fuzzing (``sandbox fuzz``).  --fuzz-cases grammar cases of 64 instructions
   (seeded, generated up front) run on one core from the snapshot harness:
   restore of the changed pages + CPU context, the case, and the fast oracles
   (robustness, isolation) with coverage keys -- execs/s; the same cases
   with the soundness audit (every instruction checked against the
   independent APM model).  Then the whole campaign loop as ``sandbox fuzz
   --seconds 20 --seed 1 --jobs 1`` runs it (generation, corpus, one case in 8
   audited, one in 16 compared with QEMU; --fuzz-seconds per round), target
   >= 1,500/s, and as ``sandbox fuzz --audit`` runs it (every case audited,
   --fuzz-cases / 2 cases), target >= 600/s, beside bare Unicorn running the
   same cases' code.  When the machine has two cores, each round also runs
   the campaign with ``--jobs 2`` right after ``--jobs 1``: the scaling is the
   median of those pairs, target >= 1.8x (not with --quick).
7.-9. ``bench_extra``: RDTSC not intercepted beside bare Unicorn, the warm 4 MiB
   and 64 MiB working sets (bench_memory's passes), and the human trace's cost
   per exit line.

Exit status: 0 when every run succeeded (targets are reported, not enforced,
unless --strict: then 1 when a target is missed); 2 when a run failed or the
arguments are bad.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

# use the working copy of the package even when it is not installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, Uc, UcError  # noqa: E402
from unicorn import __version__ as UNICORN_VERSION  # noqa: E402
from unicorn import x86_const as X  # noqa: E402

import sandbox  # noqa: E402
from sandbox.cli.helpfmt import Parser  # noqa: E402
from sandbox import ExitCode, Machine  # noqa: E402
from sandbox.svm.cpu import VmrunError  # noqa: E402
from sandbox.hypervisor.machine import handle_cpuid  # noqa: E402
from sandbox.hypervisor.loader import LOAD_BASE, ImageError, assemble  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_extra  # noqa: E402
import bench_sev  # noqa: E402

M64 = (1 << 64) - 1
VMMCALL = ".byte 0x0f, 0x01, 0xd9"
# EXIT hypercall: RAX = 0 (EXIT), RDI = 0 (exit code)
EXIT = f"""
    xor eax, eax
    xor edi, edi
    {VMMCALL}
"""

# the hot loop; HEAD ends at the loop's end (where bare Unicorn stops)
HOT_HEAD = """
    xor eax, eax
    xor edx, edx
    mov rcx, {n}
hot:
    add rax, rcx
    xor rdx, rax
    dec rcx
    jnz hot
"""
HOT_TAIL = "    mov rbx, rax\n" + EXIT      # keep the sum: EXIT needs RAX = 0

CPUID_HEAD = """
    mov r12, {n}
again:
    xor eax, eax
    xor ecx, ecx
    cpuid
    dec r12
    jnz again
"""
CPUID_TAIL = EXIT
CPUID_AT = bytes.fromhex("31c031c90fa2")        # xor eax, eax; xor ecx, ecx; cpuid

# an intercepted OUT to a device port: COM1's THR (the default IOPM traps 0x3F8-0x3FF)
OUT_HEAD = """
    mov r12, {n}
    mov edx, 0x3f8
again:
    mov al, 0x2e
    out dx, al
    dec r12
    jnz again
"""

# CPUID leaf 0 as the default handler answers it: max leaf 0xD, "AuthenticAMD"
LEAF0 = {"rax": 0xD, "rbx": 0x68747541, "rdx": 0x69746E65, "rcx": 0x444D4163}   # Auth enti cAMD

TARGET_RATIO = 0.9
#: issue 11: an intercepted CPUID (default handler) at most 2x the raw-hook world switch (goal 1.5x),
#: an intercepted OUT to a device port at most 2.5x, a cold first touch at most 15 us
TARGET_CPUID_FLOOR_RATIO = 2.0
GOAL_CPUID_FLOOR_RATIO = 1.5
TARGET_OUT_FLOOR_RATIO = 2.5
TARGET_COLD_TOUCH_US = 15.0
TARGET_FUZZ_EXECS = 1500.0          # the campaign loop, as `sandbox fuzz --seed 1 --jobs 1` runs it (goal 2,000)
TARGET_FUZZ_AUDIT_EXECS = 600.0
TARGET_JOBS2_SCALING = 1.8          # `--jobs 2` on two free cores against `--jobs 1`


class BenchError(Exception):
    """A run failed or produced a wrong result."""


# ---------------------------------------------------------------- guest images
@dataclass
class Guest:
    path: Path              # the .S file the sandbox loads
    code: bytes             # the same source assembled at LOAD_BASE (bare Unicorn runs this)
    end: int                # address of the end of the loop (bare Unicorn's ``until``)
    at: int = 0             # address of the CPUID instruction (0: none)


def make_guest(tmp: Path, name: str, head: str, tail: str, n: int) -> Guest:
    src_head = head.format(n=n)
    src = f"# generated by scripts/bench.py\n{src_head}{tail}"
    path = tmp / f"{name}.S"
    path.write_text(src)
    code = assemble(src, LOAD_BASE, str(path))
    loop = assemble(src_head, LOAD_BASE, f"{path} (loop)")
    if not code.startswith(loop) or len(loop) >= len(code):
        raise BenchError(f"{name}: cannot locate the end of the loop in the assembled image")
    # the CPUID is found by its context (xor eax,eax; xor ecx,ecx; cpuid), never
    # inside the loop count's immediate
    at = code.find(CPUID_AT)
    return Guest(path, code, LOAD_BASE + len(loop), LOAD_BASE + at + 4 if at >= 0 else 0)


def _bare_uc(code: bytes) -> Uc:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(LOAD_BASE, (len(code) + 0xFFFF) & ~0xFFFF)
    uc.mem_write(LOAD_BASE, code)
    return uc


def _machine(path: Path, intercepts: str) -> Machine:
    m = Machine()
    m.load(str(path))
    m.intercept(intercepts)
    return m


def _check_run(r, what: str) -> None:
    if r.reason != "guest-exit":
        raise BenchError(f"{what}: the sandbox run ended with {r.reason!r} ({r.detail}), "
                         f"not the guest's EXIT hypercall; RIP={r.rip:#x}, exits={r.counts}")
    if r.exit_code != 0:
        raise BenchError(f"{what}: the guest exited with code {r.exit_code}")


def _pct(sorted_xs: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_xs:
        return float("nan")
    k = min(len(sorted_xs) - 1, max(0, round(q * (len(sorted_xs) - 1))))
    return sorted_xs[k]


# ------------------------------------------------------------------ hot loop
def bare_hot(g: Guest, n: int) -> tuple[float, int, int]:
    """(seconds, the sum, RDX) of the loop on bare Unicorn."""
    uc = _bare_uc(g.code)
    gc.collect()
    t = time.perf_counter()
    uc.emu_start(LOAD_BASE, g.end)
    dt = time.perf_counter() - t
    rip = uc.reg_read(X.UC_X86_REG_RIP)
    if rip != g.end:
        raise BenchError(f"bare Unicorn stopped at {rip:#x}, not at the loop end {g.end:#x}")
    return dt, uc.reg_read(X.UC_X86_REG_RAX), uc.reg_read(X.UC_X86_REG_RDX)


def sandbox_hot(g: Guest, n: int, timeout: float) -> tuple[float, int, int]:
    """(seconds of ``run()``, the sum, RDX) of the loop in the sandbox, every intercept armed."""
    m = _machine(g.path, "all")
    gc.collect()
    t = time.perf_counter()
    r = m.run(timeout=timeout)
    dt = time.perf_counter() - t
    _check_run(r, f"hot loop ({n:,} iteration{'s' if n != 1 else ''}, every intercept armed)")
    return dt, r.regs["rbx"], r.regs["rdx"]


# ------------------------------------------------------------------- CPUID
@dataclass
class Trips:
    """Per-round-trip times of one CPUID run, in microseconds."""
    n: int
    total_s: float
    median: float
    p90: float
    p99: float
    mean_gap: float         # mean of the gaps between handler entries
    mean: float             # run time / round trips
    deltas: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, stamps: list[int], total_s: float, n: int) -> "Trips":
        d = sorted((b - a) / 1000 for a, b in zip(stamps, stamps[1:]))
        if not d:
            raise BenchError("CPUID loop: fewer than two round trips were timed (use --cpuids >= 2)")
        return cls(n, total_s, statistics.median(d), _pct(d, 0.9), _pct(d, 0.99), statistics.fmean(d),
                   total_s / n * 1e6, d)


def sandbox_cpuid(g: Guest, n: int, timeout: float) -> Trips:
    m = _machine(g.path, "cpuid")
    stamps: list[int] = []
    stamp, now = stamps.append, time.perf_counter_ns

    def timed_cpuid(m, e):
        stamp(now())
        return handle_cpuid(m, e)

    m.handlers[ExitCode.CPUID] = timed_cpuid
    gc.collect()
    t = time.perf_counter()
    r = m.run(timeout=timeout, max_exits=n + 10)
    total = time.perf_counter() - t
    _check_run(r, f"CPUID loop ({n} CPUIDs)")
    got = r.counts.get(ExitCode.CPUID, 0)
    if got != n or len(stamps) != n:
        raise BenchError(f"CPUID loop: expected {n} CPUID exits, counted {got}, handler ran {len(stamps)} times")
    bad = {k: hex(r.regs[k]) for k in ("rbx", "rcx", "rdx") if r.regs[k] != LEAF0[k]}
    if bad or r.regs["r12"] != 0:
        raise BenchError(f"CPUID loop: wrong final registers {bad or ''} r12={r.regs['r12']:#x}: "
                         "the handler's results did not reach the guest")
    return Trips.of(stamps, total, n)


def sandbox_out(g: Guest, n: int, timeout: float) -> Trips:
    """The OUT loop in the sandbox: every OUT to COM1 exits (IOIO) and the
    default handler writes the byte to the UART; timed at handler entry."""
    m = Machine()
    m.load(str(g.path))
    stamps: list[int] = []
    stamp, now = stamps.append, time.perf_counter_ns
    default = m.handlers[ExitCode.IOIO]

    def timed_ioio(m, e):
        stamp(now())
        return default(m, e)

    m.handlers[ExitCode.IOIO] = timed_ioio
    gc.collect()
    t = time.perf_counter()
    r = m.run(timeout=timeout, max_exits=n + 10)
    total = time.perf_counter() - t
    _check_run(r, f"OUT loop ({n} OUTs)")
    got = r.counts.get(ExitCode.IOIO, 0)
    if got != n or len(stamps) != n or r.console != "." * n:
        raise BenchError(f"OUT loop: expected {n} IOIO exits and {n} console bytes, counted {got} exits, "
                         f"{len(r.console)} bytes")
    return Trips.of(stamps, total, n)


def bare_world_switch(g: Guest, n: int, keep_gil: bool = False) -> Trips | None:
    """The floor of a Python world switch (issue 11): a raw ctypes code hook
    that saves the CPU context into a preallocated one (``uc_context_save``),
    patches RAX/RBX/RCX/RDX in it, restores it (``uc_context_restore``) and
    writes RIP past the CPUID (``uc_reg_write``).  None if the binding's
    internals differ."""
    try:
        import ctypes
        from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC, uc_hook_h, uclib
        from sandbox.svm.cpustate import CONTEXT_DATA, OFF_REGS
        save, restore, write = uclib.uc_context_save, uclib.uc_context_restore, uclib.uc_reg_write
        if keep_gil:
            # the stricter floor: the three calls as the processor makes them from
            # its hooks (GIL kept, no argument conversion: engine.in_hook_fn)
            from sandbox.svm.engine import in_hook_fn
            save, restore, write = (in_hook_fn(f) for f in ("uc_context_save", "uc_context_restore",
                                                           "uc_reg_write"))
    except (ImportError, AttributeError):
        return None
    import struct
    uc = _bare_uc(g.code)
    h = uc._uch
    ctx = uc.context_save()
    cp = ctx.context
    addr = ctypes.cast(cp, ctypes.c_void_p).value
    data = memoryview((ctypes.c_char * (ctx.size - CONTEXT_DATA)).from_address(addr + CONTEXT_DATA)).cast("B")
    four = struct.Struct("<QQQQ")                    # QEMU order: RAX RCX RDX RBX
    vals = (LEAF0["rax"], LEAF0["rcx"], LEAF0["rdx"], LEAF0["rbx"])
    stamps: list[int] = []
    stamp, now = stamps.append, time.perf_counter_ns
    RIP, next_rip = X.UC_X86_REG_RIP, ctypes.byref(ctypes.c_uint64(g.at + 2))

    def hook(uch, a, size, ud):
        stamp(now())
        save(h, cp)
        four.pack_into(data, OFF_REGS, *vals)
        restore(h, cp)
        write(h, RIP, next_rip)

    cb = HOOK_CODE_CFUNC(hook)
    hh = uc_hook_h()
    err = uclib.uc_hook_add(h, ctypes.byref(hh), UC_HOOK_CODE, cb, None, ctypes.c_uint64(g.at),
                            ctypes.c_uint64(g.at))
    if err:
        raise UcError(err)
    trips = _timed_hook_run(uc, g, n, stamps, "bare Unicorn world-switch hook")
    del cb, ctx       # the callback and the context must outlive the run
    return trips


def bare_cpuid_hook(g: Guest, n: int) -> Trips:
    """Bare Unicorn through its Python API: ``hook_add(UC_HOOK_CODE)`` on the
    CPUID, ``reg_write`` of the leaf-0 results and the RIP skip."""
    uc = _bare_uc(g.code)
    stamps: list[int] = []
    stamp, now = stamps.append, time.perf_counter_ns
    RAX, RBX, RCX, RDX, RIP = (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX,
                               X.UC_X86_REG_RIP)
    a, b, c, d = LEAF0["rax"], LEAF0["rbx"], LEAF0["rcx"], LEAF0["rdx"]

    def hook(u, addr, size, ud):
        stamp(now())
        u.reg_write(RAX, a)
        u.reg_write(RBX, b)
        u.reg_write(RCX, c)
        u.reg_write(RDX, d)
        u.reg_write(RIP, addr + 2)

    uc.hook_add(UC_HOOK_CODE, hook, None, g.at, g.at)
    return _timed_hook_run(uc, g, n, stamps, "bare Unicorn CPUID hook")


def _timed_hook_run(uc: Uc, g: Guest, n: int, stamps: list[int], what: str) -> Trips:
    """Run the CPUID loop on a hooked bare Unicorn; check the hook ran n times
    and left the leaf-0 results."""
    gc.collect()
    t = time.perf_counter()
    uc.emu_start(LOAD_BASE, g.end)
    total = time.perf_counter() - t
    if len(stamps) != n or uc.reg_read(X.UC_X86_REG_RBX) != LEAF0["rbx"]:
        raise BenchError(f"{what}: ran {len(stamps)} times (expected {n}) "
                         f"or left wrong results (RBX={uc.reg_read(X.UC_X86_REG_RBX):#x})")
    return Trips.of(stamps, total, n)


def bare_cpuid_raw(g: Guest, n: int) -> Trips | None:
    """The cheapest Python intercept on bare Unicorn: a raw ctypes code-hook
    callback (no binding wrapper) doing one ``uc_reg_write_batch`` of
    RAX/RBX/RCX/RDX and one ``uc_reg_write`` of the skipped RIP (a RIP written
    through the batch call is lost when Unicorn restarts the block in 2.1.4).
    None if the binding's internals differ."""
    try:
        import ctypes
        from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC, uc_hook_h, uclib
        write_batch, write = uclib.uc_reg_write_batch, uclib.uc_reg_write
    except (ImportError, AttributeError):
        return None
    uc = _bare_uc(g.code)
    h = uc._uch
    stamps: list[int] = []
    stamp, now = stamps.append, time.perf_counter_ns
    regs = (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX)
    vals = [ctypes.c_uint64(v) for v in (LEAF0["rax"], LEAF0["rbx"], LEAF0["rcx"], LEAF0["rdx"])]
    ids = (ctypes.c_int * 4)(*regs)
    ptrs = (ctypes.c_void_p * 4)(*[ctypes.addressof(v) for v in vals])
    RIP, next_rip = X.UC_X86_REG_RIP, ctypes.byref(ctypes.c_uint64(g.at + 2))

    def hook(uch, addr, size, ud):
        stamp(now())
        write_batch(h, ids, ptrs, 4)
        write(h, RIP, next_rip)

    cb = HOOK_CODE_CFUNC(hook)
    hh = uc_hook_h()
    err = uclib.uc_hook_add(h, ctypes.byref(hh), UC_HOOK_CODE, cb, None, ctypes.c_uint64(g.at),
                            ctypes.c_uint64(g.at))
    if err:
        raise UcError(err)
    trips = _timed_hook_run(uc, g, n, stamps, "bare Unicorn raw CPUID hook")
    del cb            # the callback must outlive the run
    return trips


def bare_cpuid_native(g: Guest, n: int) -> float:
    """Bare Unicorn, no hook: ns per loop iteration with Unicorn's own CPUID."""
    uc = _bare_uc(g.code)
    gc.collect()
    t = time.perf_counter()
    uc.emu_start(LOAD_BASE, g.end)
    return (time.perf_counter() - t) / n * 1e9


# ------------------------------------------------------------ cold touch
def bare_fill_cost(pages: int) -> float:
    """The floor of a TLB miss handled in Python: bare Unicorn in
    UC_TLB_VIRTUAL mode with a Python TLB-fill hook mapping every page 1:1,
    the guest touching ``pages`` pages once vs one page ``pages`` times;
    microseconds per miss."""
    from unicorn import UC_HOOK_TLB_FILL, UC_PROT_ALL, UC_TLB_VIRTUAL
    from bench_memory import BUF, touch_src

    def one(stride: int) -> float:
        head = touch_src(pages, stride).split("    xor eax, eax")[0]
        code = assemble(head, LOAD_BASE, "touch")
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        uc.mem_map(0, BUF + (pages + 1) * 0x1000)
        uc.mem_write(LOAD_BASE, code)

        def fill(u, vaddr, access, entry, ud):
            entry.paddr = vaddr & ~0xFFF
            entry.perms = UC_PROT_ALL
            return True
        uc.hook_add(UC_HOOK_TLB_FILL, fill)
        gc.collect()
        t = time.perf_counter()
        uc.emu_start(LOAD_BASE, LOAD_BASE + len(code))
        return time.perf_counter() - t
    return (one(0x1000) - one(0)) / (pages - 1) * 1e6


def cold_touch(pages: int, rounds: int, log) -> dict:
    """A guest's first touch of a page (one TLB miss, a 24-reference 2-D walk)
    beside the Python fill-hook floor, interleaved; best of the rounds."""
    from bench_memory import tlb_miss_cost
    log(f"cold touch: {pages:,} pages x {rounds} rounds (sandbox nested paging / bare Unicorn + Python fill hook)")
    sb, floor, refs = [], [], 0.0
    many, one = [], []
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-touch-") as d:
        for i in range(rounds):
            for side in _rotate(("sandbox", "floor"), i):
                if side == "sandbox":
                    r = tlb_miss_cost(Path(d), pages, 1, "nested")
                    sb.append(r["us_per_miss"])
                    many.append(r["many_s"])
                    one.append(r["one_s"])
                    refs = r["table_refs_per_walk"]
                else:
                    floor.append(bare_fill_cost(pages))
            log(f"  round {i + 1}: sandbox {sb[-1]:6.2f} us   bare + Python fill hook {floor[-1]:6.2f} us")
    # the best run of each kind, then their difference: the least of the rounds'
    # differences would be biased low (a slow one-page run makes it negative)
    best = (min(many) - min(one)) / (pages - 1) * 1e6
    return {"pages": pages, "sandbox_us": best, "floor_us": min(floor), "table_refs_per_walk": refs,
            "rounds": {"sandbox_us": sb, "floor_us": floor}}


# -------------------------------------------------------------------- main
def fuzz_rate(n: int, audit: bool, seed: int = 1) -> dict:
    """execs/s of the snapshot harness on ``n`` pre-generated 64-instruction grammar cases."""
    import random as _random
    from sandbox.fuzz.generate import gen_grammar
    from sandbox.fuzz.oracle import coverage, findings
    from sandbox.fuzz.snapshot import Harness
    rng = _random.Random(seed)
    cases = [gen_grammar(rng, 64) for _ in range(n)]
    h = Harness(audit=audit)
    for c in cases[:20]:                     # warm-up: first scans, hooks, translated blocks
        h.run(c)
    nfind = dirty = insns = 0
    t0 = time.perf_counter()
    for c in cases:
        out = h.run(c)
        nfind += len(findings(out))
        coverage(out)
        dirty += out.dirty_pages
        if h.auditor is not None:
            insns += h.auditor.steps
    dt = time.perf_counter() - t0
    r = {"cases": n, "seconds": dt, "execs_per_s": n / dt, "findings": nfind, "mean_dirty_pages": dirty / n}
    if audit:
        r["audited_insns_per_case"] = insns / n
    return r


def fuzz_campaign_rate(seconds: float, seed: int = 1, jobs: int = 1) -> dict:
    """The issue's measure itself: ``sandbox fuzz --seconds S --seed 1 --jobs 1``
    (the CLI's campaign with its defaults, in this process, as the CLI runs
    it): cases over the campaign's own wall clock, which starts with the first
    case, so the early cases' cold caches count as they do for a user.  With
    ``jobs`` > 1 the workers are processes of their own (CPU time: this
    process's, the driver's, only)."""
    from sandbox.fuzz import campaign as FC
    c0 = time.process_time()
    stats, dt, _ = FC.run(FC.Options(seed=seed, seconds=seconds, jobs=jobs))
    cpu = max(time.process_time() - c0, 1e-9)
    return {"cases": stats.execs, "seconds": dt, "execs_per_s": stats.execs / dt, "cpu_seconds": cpu,
            "execs_per_cpu_s": stats.execs / cpu, "coverage": len(stats.coverage), "findings": len(stats.findings)}


def fuzz_loop_rate(n: int, seed: int = 1, audit: bool = False) -> dict:
    """The campaign loop with the CLI's defaults (generation, corpus, one case in
    8 audited, one in 16 compared with QEMU): what `sandbox fuzz --jobs 1` does;
    with ``audit``, every case audited: what `sandbox fuzz --audit` does."""
    from sandbox.fuzz import campaign as FC
    w = FC.Worker(FC.Options(seed=seed, cases=n, minimize=False, audit=audit))
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        w.step()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"cases": n, "seconds": dt, "execs_per_s": n / dt, "cpu_seconds": cpu, "execs_per_cpu_s": n / cpu,
            "coverage": len(w.stats.coverage)}


def fuzz_floor_rate(n: int, seed: int = 1, max_insns: int = 1024) -> dict:
    """The floor beside the fuzz figures: bare Unicorn (no virtualization, no
    hooks, no oracles) running the same pre-generated cases' code from the same
    place, with its CPU context restored before each case."""
    import random as _random
    from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
    from unicorn import x86_const as X
    from sandbox.fuzz.case import CODE_BASE
    from sandbox.fuzz.generate import gen_grammar
    rng = _random.Random(seed)
    cases = [gen_grammar(rng, 64) for _ in range(n)]
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 4 << 20, UC_PROT_ALL)
    uc.reg_write(X.UC_X86_REG_RSP, 0x90000)
    ctx = uc.context_save()
    t0, c0 = time.perf_counter(), time.process_time()
    for c in cases:
        uc.mem_write(c.entry, c.code)
        uc.context_restore(ctx)
        try:
            uc.emu_start(c.entry, CODE_BASE + 0x2000, count=max_insns)
        except UcError:
            pass                                  # a fault ends the case, as a #VMEXIT or shutdown would
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"cases": n, "seconds": dt, "execs_per_s": n / dt, "execs_per_cpu_s": n / cpu}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = Parser(prog="bench.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=None, help="hot-loop iterations (default 20,000,000; quick 2,000,000)")
    ap.add_argument("--cpuids", type=int, default=None, help="CPUIDs per CPUID run (default 30,000; quick 10,000)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds, best kept (default 3; quick 2)")
    ap.add_argument("--paired-rounds", type=int, default=None,
                    help="interleaved rounds of the hot loop and the SEV loop (default 9; quick 2)")
    ap.add_argument("--exit-rounds", type=int, default=None,
                    help="interleaved rounds of the CPUID and OUT round trips (default 9; quick 2)")
    ap.add_argument("--fuzz-cases", type=int, default=None, help="fuzz cases per mode (default 3000; quick 300)")
    ap.add_argument("--fuzz-seconds", type=float, default=None,
                    help="each round of the campaign loop, `sandbox fuzz --seconds S --seed 1 --jobs 1` (default 20; quick 2)")
    ap.add_argument("--timeout", type=float, default=120.0, help="wall-clock limit of each sandbox run, s (120)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run (well under 20 s)")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="write the results as JSON to FILE, or to stdout (instead of the table) if no FILE")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    a = ap.parse_args(argv)
    q = a.quick
    a.iters = a.iters if a.iters is not None else (2_000_000 if q else 20_000_000)
    a.cpuids = a.cpuids if a.cpuids is not None else (10_000 if q else 30_000)
    a.rounds = a.rounds if a.rounds is not None else (2 if q else 3)
    a.exit_rounds = a.exit_rounds if a.exit_rounds is not None else (2 if q else 9)
    a.paired_rounds = a.paired_rounds if a.paired_rounds is not None else (2 if q else 9)
    a.fuzz_cases = a.fuzz_cases if a.fuzz_cases is not None else (300 if q else 3000)
    a.fuzz_seconds = a.fuzz_seconds if a.fuzz_seconds is not None else (2.0 if q else 20.0)
    if a.fuzz_seconds <= 0:
        ap.error("--fuzz-seconds must be positive")
    if a.fuzz_cases < 1:
        ap.error("--fuzz-cases must be at least 1")
    if a.iters < 1 or a.iters >= 1 << 31:
        ap.error("--iters must be in [1, 2**31)")
    if a.cpuids < 2 or a.cpuids >= 1 << 31:
        ap.error("--cpuids must be in [2, 2**31)")
    if a.rounds < 1 or a.exit_rounds < 1 or a.paired_rounds < 1:
        ap.error("--rounds, --paired-rounds and --exit-rounds must be at least 1")
    if a.timeout <= 0:
        ap.error("--timeout must be positive")
    return a


def _rotate(sides: tuple[str, ...], i: int) -> tuple[str, ...]:
    """Round i's order: each side goes first in turn (cancels order effects)."""
    k = i % len(sides)
    return sides[k:] + sides[:k]


def run(a: argparse.Namespace, log) -> dict:
    n, nc, rounds = a.iters, a.cpuids, a.rounds
    nw = min(nc, 2000)
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as d:
        tmp = Path(d)
        hot = make_guest(tmp, "hot_loop", HOT_HEAD, HOT_TAIL, n)
        hot1 = make_guest(tmp, "hot_loop_1", HOT_HEAD, HOT_TAIL, 1)
        cp = make_guest(tmp, "cpuid_loop", CPUID_HEAD, CPUID_TAIL, nc)
        warm = make_guest(tmp, "cpuid_warm", CPUID_HEAD, CPUID_TAIL, nw)
        outg = make_guest(tmp, "out_loop", OUT_HEAD, CPUID_TAIL, nc)
        outw = make_guest(tmp, "out_warm", OUT_HEAD, CPUID_TAIL, nw)
        if not cp.at or not warm.at:
            raise BenchError("CPUID loop: no CPUID instruction in the assembled image")

        # -- 1. hot loop: a warm-up, then interleaved rounds
        log(f"hot loop: {n:,} iterations x {a.paired_rounds} rounds (bare Unicorn / sandbox, interleaved)")
        bare_hot(hot1, 1)
        sandbox_hot(hot1, 1, a.timeout)
        want_rax = n * (n + 1) // 2 & M64
        bare_t: list[float] = []
        sb_t: list[float] = []
        fixed_t: list[float] = []
        for i in range(a.paired_rounds):
            rdx = {}
            for side in _rotate(("bare", "sandbox"), i):
                if side == "bare":
                    dt, total, rdx[side] = bare_hot(hot, n)
                    bare_t.append(dt)
                else:
                    dt, total, rdx[side] = sandbox_hot(hot, n, a.timeout)
                    sb_t.append(dt)
                if total != want_rax:
                    raise BenchError(f"hot loop on {side}: sum {total:#x}, expected {want_rax:#x}")
            if rdx["sandbox"] != rdx["bare"]:
                raise BenchError(f"hot loop: the sandbox computed RDX={rdx['sandbox']:#x}, "
                                 f"bare Unicorn {rdx['bare']:#x}")
            # the sandbox's fixed cost per run (VMRUN, first fills and scans, EXIT): a 1-iteration loop
            fixed_t.append(sandbox_hot(hot1, 1, a.timeout)[0])
            log(f"  round {i + 1}: bare {bare_t[-1] * 1e3:8.1f} ms   sandbox {sb_t[-1] * 1e3:8.1f} ms   "
                f"(sandbox fixed cost {fixed_t[-1] * 1e3:.1f} ms)")

        # -- 2./3. CPUID round trips: a warm-up, then interleaved rounds
        log(f"CPUID and OUT: {nc:,} round trips x {a.exit_rounds} rounds (sandbox / bare Unicorn + Python hooks, "
            "interleaved)")
        sandbox_cpuid(warm, nw, a.timeout)
        sandbox_out(outw, nw, a.timeout)
        bare_cpuid_hook(warm, nw)
        have_raw = bare_cpuid_raw(warm, nw) is not None and bare_world_switch(warm, nw) is not None
        sides = ("sandbox", "out", "api", "raw", "switch", "switch_gil") if have_raw else ("sandbox", "out", "api")
        runs: dict[str, list[Trips]] = {k: [] for k in sides}
        native: list[float] = []
        for i in range(a.exit_rounds):
            for side in _rotate(sides, i):
                if side == "sandbox":
                    runs[side].append(sandbox_cpuid(cp, nc, a.timeout))
                elif side == "out":
                    runs[side].append(sandbox_out(outg, nc, a.timeout))
                elif side == "api":
                    runs[side].append(bare_cpuid_hook(cp, nc))
                elif side == "raw":
                    runs[side].append(bare_cpuid_raw(cp, nc))
                elif side == "switch":
                    runs[side].append(bare_world_switch(cp, nc))
                else:
                    runs[side].append(bare_world_switch(cp, nc, keep_gil=True))
            native.append(bare_cpuid_native(cp, nc))
            log(f"  round {i + 1}: median sandbox CPUID {runs['sandbox'][-1].median:6.2f} us   "
                f"OUT {runs['out'][-1].median:6.2f} us   bare+API hook {runs['api'][-1].median:6.2f} us"
                + (f"   bare+raw hook {runs['raw'][-1].median:6.2f} us   "
                   f"raw world switch {runs['switch'][-1].median:6.2f} us" if have_raw else ""))

        # -- 4. SEV
        sev = bench_sev.run_sev(300 if a.quick else 2000, a.paired_rounds, a.timeout, log)
    # -- cold first touch of a page, beside a Python fill hook
    touch = cold_touch(1024 if a.quick else 2048, rounds, log)
    # -- 5. fuzzing: the snapshot harness, fast and audit modes, best of the rounds
    nf = a.fuzz_cases
    log(f"fuzz: {nf:,} 64-instruction cases x {rounds} rounds, fast oracles and audited (interleaved)")
    # the same cases in both modes: the harness's cost per case grows with the candidate
    # hooks it has collected (shed at 300), so runs of different lengths do not compare
    fasts, auds = [], []
    for _ in range(rounds):
        fasts.append(fuzz_rate(nf, False))
        auds.append(fuzz_rate(nf, True))
    fast = max(fasts, key=lambda r: r["execs_per_s"])
    aud = max(auds, key=lambda r: r["execs_per_s"])
    loops, aloops, floors, twos = [], [], [], []
    nl = max(1, nf // 2)
    # (not in --quick: a worker process's start-up would weigh as much as its seconds of cases)
    two_cores = (os.cpu_count() or 1) >= 2 and not a.quick
    for _ in range(rounds):                       # the campaign loops and their floor, interleaved
        loops.append(fuzz_campaign_rate(a.fuzz_seconds))
        if two_cores:                             # --jobs 2 right after --jobs 1: a pair shares the host's phase
            twos.append(fuzz_campaign_rate(a.fuzz_seconds, jobs=2))
        aloops.append(fuzz_loop_rate(nl, audit=True))
        floors.append(fuzz_floor_rate(nl))
    scaling = statistics.median(t["execs_per_s"] / o["execs_per_s"] for t, o in zip(twos, loops)) if twos else None
    loop = max(loops, key=lambda r: r["execs_per_s"])
    aloop = max(aloops, key=lambda r: r["execs_per_s"])
    floor_f = max(floors, key=lambda r: r["execs_per_s"])
    log(f"  harness: fast {fast['execs_per_s']:.0f}/s   audit {aud['execs_per_s']:.0f}/s   campaign loop "
        f"{loop['execs_per_s']:.0f}/s   --audit {aloop['execs_per_s']:.0f}/s   "
        f"bare-Unicorn floor {floor_f['execs_per_s']:.0f}/s"
        + (f"   --jobs 2 / --jobs 1 {scaling:.2f}x" if scaling is not None else ""))
    tsc = bench_extra.rdtsc_row(200_000 if a.quick else 2_000_000, a.paired_rounds, a.timeout, log)
    mem = bench_extra.memory_rows(a.quick, log)
    trace = bench_extra.trace_row(1 if a.quick else rounds, log)

    bare_best, sb_best = min(bare_t), min(sb_t)
    best = {k: min(v, key=lambda t: t.median) for k, v in runs.items()}
    sb = best["sandbox"]
    out = best["out"]
    floor = best.get("raw") or best["api"]
    # the floor: a raw hook doing what a world switch must (save, patch, restore, RIP)
    switch = best.get("switch") or floor
    # the ratios are paired: each round's sandbox median over the floor median of the
    # same round, then the median over rounds.  This machine's floor is bimodal from
    # one process phase to the next, so best-against-best would pair a fast-phase
    # sandbox round with a slow-phase floor round
    floor_runs = runs.get("switch") or runs.get("raw") or runs["api"]
    paired = lambda xs: statistics.median(t.median / f.median for t, f in zip(xs, floor_runs))  # noqa: E731
    cpuid_x, out_x = paired(runs["sandbox"]), paired(runs["out"])
    best_x = (sb.median / switch.median, out.median / switch.median)
    strict = runs.get("switch_gil") or floor_runs
    strict_x = tuple(statistics.median(t.median / f.median for t, f in zip(runs[k], strict))
                     for k in ("sandbox", "out"))
    # paired like the exit ratios: each round's bare time over the same round's sandbox
    # time (= sandbox iterations/s over bare iterations/s), then the median over rounds;
    # best-against-best let one unusually fast bare round (89 ms among 105-116) read 0.80
    ratio = statistics.median(b / s for b, s in zip(bare_t, sb_t))
    ratio_best = bare_best / sb_best
    trip = lambda t: {k: v for k, v in asdict(t).items() if k != "deltas"}   # noqa: E731
    return {
        "config": {"iters": n, "cpuids": nc, "rounds": rounds, "paired_rounds": a.paired_rounds,
                   "exit_rounds": a.exit_rounds, "quick": a.quick,
                   "timeout_s": a.timeout,
                   "fuzz_cases": nf, "fuzz_seconds": a.fuzz_seconds},
        "environment": {"python": platform.python_version(), "unicorn": UNICORN_VERSION,
                        "sandbox": sandbox.__version__, "machine": platform.machine(),
                        "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "hot_loop": {
            "bare_s": bare_best, "sandbox_s": sb_best,
            "bare_iters_per_s": n / bare_best, "sandbox_iters_per_s": n / sb_best,
            "bare_mips": 4 * n / bare_best / 1e6, "sandbox_mips": 4 * n / sb_best / 1e6,
            "ratio": ratio,
            "ratio_best_of_rounds": ratio_best,
            "sandbox_fixed_cost_s": min(fixed_t),
            "rounds": {"bare_s": bare_t, "sandbox_s": sb_t, "sandbox_fixed_cost_s": fixed_t},
        },
        "cpuid": {
            "sandbox": trip(sb),
            "bare_api_hook": trip(best["api"]),
            "bare_raw_hook": trip(best["raw"]) if have_raw else None,
            "bare_no_hook_ns_per_iter": min(native),
            "world_switch_overhead_us": sb.median - floor.median,
            "bare_world_switch": trip(best["switch"]) if have_raw else None,
            "floor_ratio": cpuid_x,
            "floor_ratio_best_of_rounds": best_x[0],
            "strict_floor_ratio": strict_x[0],
            "bare_world_switch_gil_kept_median_us": [t.median for t in runs.get("switch_gil", [])],
            "rounds": {"sandbox_median_us": [t.median for t in runs["sandbox"]],
                       "bare_world_switch_median_us": [t.median for t in runs.get("switch", [])],
                       "bare_api_hook_median_us": [t.median for t in runs["api"]],
                       "bare_raw_hook_median_us": [t.median for t in runs.get("raw", [])],
                       "bare_no_hook_ns_per_iter": native},
        },
        "out": {"sandbox": trip(out), "floor_ratio": out_x, "floor_ratio_best_of_rounds": best_x[1],
                "strict_floor_ratio": strict_x[1],
                "rounds": {"sandbox_median_us": [t.median for t in runs["out"]]}},
        "cold_touch": touch,
        "load_average": os.getloadavg(),
        "fuzz": {"fast": fast, "audit": aud, "campaign_loop": loop, "campaign_loop_audit": aloop, "floor": floor_f,
                 "ratio_to_floor": loop["execs_per_s"] / floor_f["execs_per_s"],
                 "campaign_rounds": loops, "jobs2_rounds": twos, "jobs2_scaling": scaling},
        "sev": sev,
        "rdtsc": tsc,
        "memory": mem,
        "trace": trace,
        "targets": {
            **({"fuzz_jobs2_scaling": {"value": scaling, "target": f">= {TARGET_JOBS2_SCALING:g}x --jobs 1",
                                       "met": scaling >= TARGET_JOBS2_SCALING}} if scaling is not None else {}),
            "rdtsc_ratio": tsc["target"],
            **mem["targets"],
            **trace["targets"],
            "fuzz_execs_per_s": {"value": loop["execs_per_s"], "target": f">= {TARGET_FUZZ_EXECS:g}/s",
                                 "met": loop["execs_per_s"] >= TARGET_FUZZ_EXECS},
            # "audit mode": `sandbox fuzz --audit`, the whole loop with every case audited
            "fuzz_audit_execs_per_s": {"value": aloop["execs_per_s"], "target": f">= {TARGET_FUZZ_AUDIT_EXECS:g}/s",
                                       "met": aloop["execs_per_s"] >= TARGET_FUZZ_AUDIT_EXECS},
            "sev_ratio": sev["target"],
            "hot_loop_ratio": {"value": ratio, "target": f">= {TARGET_RATIO}", "met": ratio >= TARGET_RATIO},
            "cpuid_floor_ratio": {"value": cpuid_x,
                                  "target": f"<= {TARGET_CPUID_FLOOR_RATIO:g}x floor (goal {GOAL_CPUID_FLOOR_RATIO:g}x)",
                                  "met": cpuid_x <= TARGET_CPUID_FLOOR_RATIO},
            "out_floor_ratio": {"value": out_x, "target": f"<= {TARGET_OUT_FLOOR_RATIO:g}x floor",
                                "met": out_x <= TARGET_OUT_FLOOR_RATIO},
            "cold_touch_us": {"value": touch["sandbox_us"], "target": f"<= {TARGET_COLD_TOUCH_US:g} us",
                              "met": touch["sandbox_us"] <= TARGET_COLD_TOUCH_US},
        },
    }


def show(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    h, c, tg, cfg, env = res["hot_loop"], res["cpuid"], res["targets"], res["config"], res["environment"]
    ok = lambda m: "[green]met[/]" if m else "[bold red]MISSED[/]"   # noqa: E731
    ms = lambda xs: " / ".join(f"{x * 1e3:.0f}" for x in xs) + " ms"   # noqa: E731
    us = lambda xs: " / ".join(f"{x:.2f}" for x in xs) + " us"         # noqa: E731
    la = res["load_average"]
    t = Table(title=f"sandbox vs bare Unicorn, one run: interleaved rounds (ratios paired over "
                    f"{cfg['paired_rounds']} / {cfg['exit_rounds']}, best of {cfg['rounds']} elsewhere)",
              caption=f"load average at the end {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}; "
                      f"Python {env['python']}, Unicorn {env['unicorn']}, {env['cpus']} CPUs; "
                      f"{cfg['iters']:,} loop iterations, {cfg['paired_rounds']} rounds; "
                      f"{cfg['cpuids']:,} CPUIDs per round, {cfg['exit_rounds']} rounds")
    t.add_column("measure")
    t.add_column("best", justify="right")
    t.add_column("every round", justify="right")
    t.add_column("target", justify="right")
    t.add_column("")
    t.add_row("hot loop, bare Unicorn (no hooks)",
              f"{h['bare_iters_per_s'] / 1e6:.0f} M iter/s", ms(h["rounds"]["bare_s"]), "", "")
    t.add_row("hot loop, sandbox, every intercept armed",
              f"{h['sandbox_iters_per_s'] / 1e6:.0f} M iter/s", ms(h["rounds"]["sandbox_s"]), "", "")
    t.add_row("  (guest MIPS, 4 insns/iter: bare / sandbox)",
              f"{h['bare_mips']:.0f} / {h['sandbox_mips']:.0f}", "", "", "")
    t.add_row("  sandbox fixed cost per run (1-iteration loop)",
              f"{h['sandbox_fixed_cost_s'] * 1e3:.1f} ms",
              " / ".join(f"{x * 1e3:.1f}" for x in h["rounds"]["sandbox_fixed_cost_s"]) + " ms", "", "")
    t.add_row("[bold]ratio sandbox / bare, median of paired rounds[/]", f"[bold]{h['ratio']:.2f}[/]",
              f"best/best {h['ratio_best_of_rounds']:.2f}",
              tg["hot_loop_ratio"]["target"], ok(tg["hot_loop_ratio"]["met"]))
    t.add_section()
    s = c["sandbox"]
    w = c["bare_world_switch"]
    if w is not None:
        t.add_row("[bold]floor: raw ctypes world switch (context save, patch, restore, RIP), median[/]",
                  f"[bold]{w['median']:.2f} us[/]", us(c["rounds"]["bare_world_switch_median_us"]), "", "")
    t.add_row("[bold]intercepted CPUID round trip, default handler, median[/]", f"[bold]{s['median']:.2f} us[/]",
              us(c["rounds"]["sandbox_median_us"]), "", "")
    t.add_row("[bold]  CPUID / floor, median of paired rounds[/]", f"[bold]{c['floor_ratio']:.2f}x[/]", f"best/best {c['floor_ratio_best_of_rounds']:.2f}x; vs GIL-kept floor {c['strict_floor_ratio']:.2f}x",
              tg["cpuid_floor_ratio"]["target"], ok(tg["cpuid_floor_ratio"]["met"]))
    t.add_row("  p90 / p99", f"{s['p90']:.2f} / {s['p99']:.2f} us", "", "", "")
    t.add_row("  mean = run time / exits", f"{s['mean']:.2f} us", "", "", "")
    o = res["out"]
    t.add_row("[bold]intercepted OUT to COM1, default handler, median[/]", f"[bold]{o['sandbox']['median']:.2f} us[/]",
              us(o["rounds"]["sandbox_median_us"]), "", "")
    t.add_row("[bold]  OUT / floor, median of paired rounds[/]", f"[bold]{o['floor_ratio']:.2f}x[/]", f"best/best {o['floor_ratio_best_of_rounds']:.2f}x; vs GIL-kept floor {o['strict_floor_ratio']:.2f}x",
              tg["out_floor_ratio"]["target"], ok(tg["out_floor_ratio"]["met"]))
    t.add_section()
    k = c["bare_api_hook"]
    t.add_row("bare Unicorn, Python API hook (hook_add + 5 reg_write), median", f"{k['median']:.2f} us",
              us(c["rounds"]["bare_api_hook_median_us"]), "", "")
    t.add_row("  p90 / mean", f"{k['p90']:.2f} / {k['mean']:.2f} us", "", "", "")
    r = c["bare_raw_hook"]
    if r is not None:
        t.add_row("bare Unicorn, raw ctypes hook (reg_write_batch + RIP), median", f"{r['median']:.2f} us",
                  us(c["rounds"]["bare_raw_hook_median_us"]), "", "")
        t.add_row("  p90 / mean", f"{r['p90']:.2f} / {r['mean']:.2f} us", "", "", "")
    t.add_row("sandbox minus the cheapest hook (world switch), median",
              f"{c['world_switch_overhead_us']:+.2f} us", "", "", "")
    t.add_row("bare Unicorn, no hook (Unicorn's own CPUID)", f"{c['bare_no_hook_ns_per_iter']:.0f} ns/iter",
              " / ".join(f"{x:.0f}" for x in c["rounds"]["bare_no_hook_ns_per_iter"]) + " ns", "", "")
    sv = res["sev"]
    t.add_section()
    t.add_row(f"SEV memory loop ({sv['exits']:,} exits, one per ~{sv['insns_per_exit']:,} insns): plain / SEV",
              f"{sv['plain_s'] * 1e3:.0f} / {sv['sev_s'] * 1e3:.0f} ms",
              ms(sv["rounds"]["plain_s"]) + " | " + ms(sv["rounds"]["sev_s"]), "", "")
    t.add_row("[bold]ratio SEV / plain, median of paired rounds[/]", f"[bold]{sv['ratio']:.2f}x[/]",
              f"best/best {sv['ratio_best_of_rounds']:.2f}x" if "ratio_best_of_rounds" in sv else "",
              tg["sev_ratio"]["target"],
              ok(tg["sev_ratio"]["met"]))
    t.add_row("  cost per #VMEXIT of keeping DRAM encrypted", f"{sv['per_exit_cost_us']:.1f} us",
              f"{sv['pages_encrypted_per_exit']:.1f} pages re-encrypted per exit", "", "")
    t.add_row("  memory controller AES-128-XEX, encrypt (16-page batch) / decrypt (page)",
              f"{sv['aes']['encrypt_MB_s']:.0f} / {sv['aes']['decrypt_MB_s']:.0f} MB/s",
              f"{sv['aes']['cold_page_us']:.1f} us per page with tweaks not cached", "", "")
    ct = res["cold_touch"]
    t.add_section()
    t.add_row("floor: bare Unicorn TLB miss through a Python fill hook (1:1)", f"{ct['floor_us']:.2f} us",
              us(ct["rounds"]["floor_us"]), "", "")
    t.add_row(f"[bold]cold first touch of a page, nested paging ({ct['table_refs_per_walk']:.0f}-reference 2-D walk)[/]",
              f"[bold]{ct['sandbox_us']:.2f} us[/]", us(ct["rounds"]["sandbox_us"]), tg["cold_touch_us"]["target"],
              ok(tg["cold_touch_us"]["met"]))
    f = res["fuzz"]
    t.add_section()
    cl, fl = f["campaign_loop"], f["floor"]
    t.add_row(f"[bold]fuzz campaign, one core: `sandbox fuzz --seconds {cl['seconds']:.0f} --seed 1 --jobs 1` "
              "(1 in 8 audited, 1 in 16 vs QEMU)[/]",
              f"[bold]{cl['execs_per_s']:.0f}/s[/] ({cl['execs_per_cpu_s']:.0f}/s of CPU)",
              f"bare Unicorn, same cases' code, context restore: {fl['execs_per_s']:.0f}/s "
              f"({fl['execs_per_cpu_s']:.0f}/s of CPU); ratio {f['ratio_to_floor']:.3f}",
              tg["fuzz_execs_per_s"]["target"], ok(tg["fuzz_execs_per_s"]["met"]))
    t.add_row("fuzz harness alone, fast oracles (pre-generated cases)", f"{f['fast']['execs_per_s']:.0f}/s",
              f"{f['fast']['cases']:,} cases, {f['fast']['mean_dirty_pages']:.1f} pages restored each", "", "")
    t.add_row("fuzz harness, soundness audit of every instruction", f"{f['audit']['execs_per_s']:.0f}/s",
              f"the same {f['audit']['cases']:,} cases, {f['audit']['audited_insns_per_case']:.0f} insns each",
              "", "")
    al = f["campaign_loop_audit"]
    t.add_row("[bold]fuzz campaign loop, every case audited (`sandbox fuzz --audit`)[/]",
              f"[bold]{al['execs_per_s']:.0f}/s[/] ({al['execs_per_cpu_s']:.0f}/s of CPU)",
              "the same floor", tg["fuzz_audit_execs_per_s"]["target"], ok(tg["fuzz_audit_execs_per_s"]["met"]))
    bench_extra.add_rows(t, res, ok)
    con = Console()
    if not con.is_terminal:
        con = Console(width=132)
    con.print(t)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from rich.console import Console
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    t0 = time.perf_counter()
    try:
        res = run(a, lambda msg: err.print(f"[dim]{msg}[/]"))
    except (BenchError, ImageError, VmrunError, UcError) as e:
        err.print(f"[bold red]bench: FAILED:[/] {type(e).__name__}: {e}", markup=True)
        return 2
    except Exception as e:           # a bug, or an unexpected failure inside the sandbox: say where
        err.print(f"[bold red]bench: FAILED with an unexpected {type(e).__name__}: {e}[/]")
        traceback.print_exc()
        return 2
    res["wall_s"] = time.perf_counter() - t0
    if a.json == "-":
        print(json.dumps(res, indent=2))
    else:
        show(res)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
            err.print(f"[dim]results written to {a.json}[/]")
    missed = [k for k, v in res["targets"].items() if not v["met"]]
    if missed:
        err.print(f"[yellow]target missed: {', '.join(missed)}[/]")
        return 1 if a.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
