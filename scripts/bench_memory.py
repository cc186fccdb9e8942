#!/usr/bin/env python3
"""Memory-virtualization benchmark, measured side by side in one run.

    python scripts/bench_memory.py            # full run (under a minute)
    python scripts/bench_memory.py --quick    # smoke run (a few seconds)
    python scripts/bench_memory.py --json out.json

1. **TLB miss cost.**  A guest touches P distinct pages once (P misses,
   each a full 2-D walk in Python: 24 table references) and, as a control,
   the same page P times (one miss).  Cost per miss = the difference / P-1.
   The same for shadow paging (a miss there is a #PF exit plus the
   hypervisor's walk of the guest tables).
2. **Memory-heavy loop vs bare Unicorn.**  Read-modify-write passes over a
   1 MiB buffer; bare Unicorn maps flat memory with no hooks (the data not
   executable), the sandbox runs the same code under nested paging.  Both
   must compute the same sum.
3. **Working sets beyond the soft TLB's first size.**  A warm pass of
   read-modify-writes over 4 MiB at stride 4096 (1,024 pages, one access
   each) and at stride 64, and over 64 MiB at stride 4096 (16,384 pages:
   the ASID-tagged TLB must hold them, no 2-D walk per access), beside
   bare Unicorn with the data mapped without execute (bare Unicorn sends
   stores to RWX pages down a slow path), timed between two hypercalls
   after a cold pass; the 2-D walks the warm passes made are counted.
4. **TLB flush on world switch.**  A guest that touches 32 pages between
   consecutive CPUID exits, run with the ASID-tagged TLB and with a flush
   on every world switch (pre-ASID hardware): 2-D walks per exit and time
   per exit.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, UC_PROT_READ, UC_PROT_WRITE, Uc  # noqa: E402
from unicorn import x86_const as X  # noqa: E402

from sandbox import Machine  # noqa: E402
from sandbox.cli.helpfmt import Parser  # noqa: E402
from sandbox.hypervisor.loader import LOAD_BASE, assemble  # noqa: E402
from sandbox.memory.tlb import TlbMode  # noqa: E402
from sandbox.progress import progress  # noqa: E402
from sandbox.svm.stop import StopReason  # noqa: E402

EXIT = "    xor eax, eax\n    xor edi, edi\n    .byte 0x0f, 0x01, 0xd9\n"
BUF = 0x400000


def touch_src(pages: int, stride: int) -> str:
    return f"""
    mov rbx, {BUF:#x}
    mov rcx, {pages}
t:
    mov rax, [rbx]
    add rbx, {stride}
    dec rcx
    jnz t
""" + EXIT


STREAM = """
    mov r8, {passes}
    xor rdx, rdx
p:
    mov rbx, {buf:#x}
    mov rcx, {qwords}
s:
    add rdx, [rbx]
    add qword ptr [rbx], rcx
    add rbx, 8
    dec rcx
    jnz s
    dec r8
    jnz p
"""

STRIDE = """
    mov r8, {passes}
p{tag}:
    mov rbx, {buf:#x}
    mov rcx, {count}
s{tag}:
    add qword ptr [rbx], 1
    add rbx, {stride}
    dec rcx
    jnz s{tag}
    dec r8
    jnz p{tag}
"""
MARK = "    mov eax, {n}\n    .byte 0x0f, 0x01, 0xd9\n"       # a timing hypercall
BIG = 4 << 20

SWITCH = f"""
    mov r12, {{n}}
again:
    mov rbx, {BUF:#x}
    mov rcx, 32
t:
    mov rax, [rbx]
    add rbx, 0x1000
    dec rcx
    jnz t
    xor eax, eax
    cpuid
    dec r12
    jnz again
""" + EXIT


def _run(tmp: Path, name: str, src: str, **kw) -> tuple[float, object, Machine]:
    p = tmp / f"{name}.S"
    p.write_text(src)
    m = Machine(**kw)
    m.load(str(p))
    t = time.perf_counter()
    r = m.run(timeout=300)
    dt = time.perf_counter() - t
    if r.reason != StopReason.GUEST_EXIT:
        raise SystemExit(f"bench_memory: {name} ended with {r.reason}: {r.detail}")
    return dt, r, m


def tlb_miss_cost(tmp: Path, pages: int, rounds: int, paging: str) -> dict:
    """Cost of a guest's first touch of a page: one TLB miss and 2-D walk
    under nested paging; a #PF exit, the hypervisor's walk of the guest
    tables and a shadow install, then the processor's walk, under shadow."""
    best_many = best_one = float("inf")
    _run(tmp, "warm", touch_src(8, 0x1000), paging=paging)
    for _ in range(rounds):
        dt_many, r_many, _ = _run(tmp, "many", touch_src(pages, 0x1000), paging=paging)
        dt_one, r_one, _ = _run(tmp, "one", touch_src(pages, 0), paging=paging)
        best_many, best_one = min(best_many, dt_many), min(best_one, dt_one)
    return {"pages": pages, "misses": r_many.tlb["misses"] - r_one.tlb["misses"],
            "us_per_miss": (best_many - best_one) / (pages - 1) * 1e6, "many_s": best_many, "one_s": best_one,
            "table_refs_per_walk": r_many.walk["table_refs"] / max(1, r_many.walk["walks"]),
            "exits": r_many.exits}


def stream_ratio(tmp: Path, passes: int, rounds: int) -> dict:
    qwords = (1 << 20) // 8
    head = STREAM.format(passes=passes, buf=BUF, qwords=qwords)
    code = assemble(head + "    mov rsi, rdx\n" + EXIT, LOAD_BASE, "stream")
    loop_end = LOAD_BASE + len(assemble(head, LOAD_BASE, "stream"))
    bare = sb = float("inf")
    for _ in range(rounds):
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        # the data not executable: bare Unicorn sends every store to a page
        # mapped executable down its self-modifying-code slow path
        uc.mem_map(0, BUF, UC_PROT_ALL)
        uc.mem_map(BUF, (16 << 20) - BUF, UC_PROT_READ | UC_PROT_WRITE)
        uc.mem_write(LOAD_BASE, code)
        t = time.perf_counter()
        uc.emu_start(LOAD_BASE, loop_end)
        bare = min(bare, time.perf_counter() - t)
        want = uc.reg_read(X.UC_X86_REG_RDX)
        dt, r, _ = _run(tmp, "stream", head + "    mov rsi, rdx\n" + EXIT)
        if r.regs["rsi"] != want:
            raise SystemExit(f"bench_memory: stream sums differ: sandbox {r.regs['rsi']:#x}, bare {want:#x}")
        sb = min(sb, dt)
    insns = passes * qwords * 5
    return {"passes": passes, "bare_s": bare, "sandbox_s": sb, "ratio": bare / sb,
            "bare_mips": insns / bare / 1e6, "sandbox_mips": insns / sb / 1e6}


def stride_ratio(tmp: Path, stride: int, warm: int, rounds: int, size: int = BIG) -> dict:
    """A warm pass over ``size`` bytes at ``stride``, in the sandbox and in bare
    Unicorn with the data not executable: one cold pass, then ``warm`` passes
    timed (between two hypercalls in the sandbox, by one ``emu_start`` bare),
    and the 2-D walks and tagged-TLB misses the warm passes cost."""
    fmt = dict(buf=BUF, count=size // stride, stride=stride)
    cold = STRIDE.format(passes=1, tag="c", **fmt)
    hot = STRIDE.format(passes=warm, tag="w", **fmt)
    check = f"    mov rbx, {BUF + size - stride:#x}\n    mov rsi, [rbx]\n"
    src = cold + MARK.format(n=0x5001) + hot + MARK.format(n=0x5002) + check + EXIT
    code = assemble(src, LOAD_BASE, "stride")
    at_warm = LOAD_BASE + len(assemble(cold + MARK.format(n=0x5001), LOAD_BASE, "stride"))
    at_end = at_warm + len(assemble(hot, at_warm, "stride"))

    def bare() -> tuple[float, int]:
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0, BUF, UC_PROT_ALL)
        uc.mem_map(BUF, size, UC_PROT_READ | UC_PROT_WRITE)
        uc.mem_write(LOAD_BASE, code)
        uc.emu_start(LOAD_BASE, at_warm - 3 - 5)                  # the cold pass, up to the hypercall
        t = time.perf_counter()
        uc.emu_start(at_warm, at_end)
        dt = time.perf_counter() - t
        return dt, int.from_bytes(uc.mem_read(BUF + size - stride, 8), "little")

    def sandbox() -> tuple[float, int]:
        p = tmp / f"stride{stride}.S"
        p.write_text(src)
        ram = max(16 << 20, BUF + size + (1 << 20))
        m = Machine(ram=ram, dram=ram + (32 << 20))
        m.load(str(p))
        stamps: list[tuple[float, int, int]] = []
        default = m.handlers[0x81]

        def h(m, e):
            if m.regs.rax in (0x5001, 0x5002):
                stamps.append((time.perf_counter(), m.cpu.stats.walks, m.cpu.tlb.stats.misses))
                m.advance(e)
                return None
            return default(m, e)
        m.on(0x81)(h)
        r = m.run(timeout=600)
        if r.reason != StopReason.GUEST_EXIT or len(stamps) != 2:
            raise SystemExit(f"bench_memory: stride {stride} ended with {r.reason}: {r.detail}")
        (t0, w0, m0), (t1, w1, m1) = stamps
        return t1 - t0, r.regs["rsi"], w1 - w0, m1 - m0

    bare_s = sb_s = float("inf")
    walks = misses = 0
    for _ in range(rounds):
        b, want = bare()
        sb, got, walks, misses = sandbox()
        if got != want or want != 1 + warm:
            raise SystemExit(f"bench_memory: stride {stride}: sandbox read {got:#x}, bare {want:#x}")
        bare_s, sb_s = min(bare_s, b), min(sb_s, sb)
    accesses = warm * (size // stride)
    return {"stride": stride, "bytes": size, "bare_pass_ms": bare_s / warm * 1e3,
            "sandbox_pass_ms": sb_s / warm * 1e3, "ratio": bare_s / sb_s,
            "warm_walks_per_access": walks / accesses, "warm_tlb_misses_per_access": misses / accesses}


def switch_cost(tmp: Path, n: int) -> dict:
    out = {}
    for mode in (TlbMode.TAGGED, TlbMode.FLUSH_ON_SWITCH):
        dt, r, _ = _run(tmp, f"switch_{mode.value}", SWITCH.format(n=n), tlb_mode=mode)
        out[mode.value] = {"exits": r.exits, "walks": r.walk["walks"], "walks_per_exit": r.walk["walks"] / r.exits,
                           "table_refs_per_exit": r.walk["table_refs"] / r.exits, "us_per_exit": dt / r.exits * 1e6}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = ap.parse_args(argv)
    q = a.quick
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-mem-") as d:
        tmp = Path(d)
        steps = {
            "tlb_miss_nested": lambda: tlb_miss_cost(tmp, 256 if q else 2048, 1 if q else 3, "nested"),
            "tlb_miss_shadow": lambda: tlb_miss_cost(tmp, 256 if q else 2048, 1 if q else 3, "shadow"),
            "stream": lambda: stream_ratio(tmp, 4 if q else 40, 1 if q else 3),
            "stride4096": lambda: stride_ratio(tmp, 4096, 20 if q else 200, 1 if q else 3),
            "stride64": lambda: stride_ratio(tmp, 64, 2 if q else 10, 1 if q else 3),
            "stride4096_64m": lambda: stride_ratio(tmp, 4096, 2 if q else 10, 1, size=64 << 20),
            "world_switch": lambda: switch_cost(tmp, 200 if q else 5000),
        }
        res = {}
        with progress("memory benchmark", total=len(steps)) as tick:
            for name, step in steps.items():
                tick(0, f"memory benchmark: {name}")
                res[name] = step()
                tick()
    t = Table(title="memory virtualization, one run")
    t.add_column("measure")
    t.add_column("result", justify="right")
    for k, label in (("tlb_miss_nested", "nested"), ("tlb_miss_shadow", "shadow")):
        m = res[k]
        t.add_row(f"first touch of a page (TLB miss), {label} paging",
                  f"{m['us_per_miss']:.1f} us ({m['table_refs_per_walk']:.1f} refs/walk)")
    s = res["stream"]
    t.add_row("1 MiB read-modify-write loop: bare Unicorn / sandbox",
              f"{s['bare_mips']:.0f} / {s['sandbox_mips']:.0f} MIPS")
    t.add_row("[bold]memory-heavy loop ratio sandbox / bare[/]", f"[bold]{s['ratio']:.2f}[/]")
    for k in ("stride4096", "stride64", "stride4096_64m"):
        w = res[k]
        t.add_row(f"warm {w['bytes'] >> 20} MiB pass, stride {w['stride']}: bare (data not exec) / sandbox",
                  f"{w['bare_pass_ms']:.3f} / {w['sandbox_pass_ms']:.3f} ms, ratio [bold]{w['ratio']:.2f}[/]; "
                  f"{w['warm_walks_per_access']:.4f} 2-D walks per access")
    for mode, label in (("tagged", "ASID-tagged TLB"), ("flush", "flush on every world switch")):
        w = res["world_switch"][mode]
        t.add_row(f"32-page loop per CPUID exit, {label}",
                  f"{w['walks_per_exit']:.2f} walks/exit, {w['us_per_exit']:.1f} us/exit")
    con = Console()
    if not con.is_terminal:
        con = Console(width=132)       # a pipe or a file: do not wrap the table at 80 columns
    con.print(t)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
