"""MSR bitmaps: a guest that writes IA32_TSC_AUX on every system call,
with the write intercepted and passed through by the MSRPM.

Seed 000, "The Art of Fine-Tuning": *"Using MSR bitmaps, a hypervisor can
tell the CPU, 'Trap on writes to most control registers, but ignore writes
to this specific one, IA32_TSC_AUX, because I know the guest uses it on
every system call.' This simple tuning can eliminate millions of exits per
second in a busy system."*

``guest_images/msr_syscalls.S`` makes N simulated system calls, each some
user work (W iterations) and a WRMSR to TSC_AUX, then reads TSC_AUX back
and folds it into a checksum.  For several amounts of work per call (so
several system-call rates in guest time) it runs twice:

``intercepted``
    MSR_PROT armed, the MSRPM's read and write bits for C000_0103h set:
    every WRMSR is a #VMEXIT(MSR) the default handler emulates
    (``m.msrs``), and so is the final RDMSR;
``passthrough``
    MSR_PROT armed, both bits clear: the processor writes the real MSR.

Expected (derived, not taken from the run): N TSC_AUX write exits when
intercepted, 0 when passed through, the same checksum either way.
"""
from __future__ import annotations

from typing import Any

from ..arch import MSR_TSC_AUX
from ..svm.cpu import GUEST_IPS
from ..svm.exitcodes import ExitCode
from .base import Comparison, Context, Experiment, Outcome, fmt
from .common import machine, results, run
from .plotting import AFTER, BEFORE, pyplot, save, subtitle

IMAGE = "msr_syscalls.S"
CONFIGS = ("intercepted", "passthrough")
#: work iterations per system call (4 instructions each): about 12k ... 7.7M calls per second of guest time
WORK_FULL = (2000, 500, 100, 24, 5, 1)
WORK_QUICK = (500, 24, 1)


def _sizes(quick: bool) -> tuple[tuple[int, ...], int]:
    return (WORK_QUICK, 1000) if quick else (WORK_FULL, 20_000)


def _steps(quick: bool) -> int:
    return len(_sizes(quick)[0]) * len(CONFIGS)


def measure(work: int, calls: int, config: str) -> dict[str, Any]:
    """One run of the workload: ``calls`` system calls of ``work`` iterations each."""
    m = machine(IMAGE, [calls, work], ram=2 << 20)
    m.set_msrs([(MSR_TSC_AUX, True, True)] if config == "intercepted" else [])
    writes = [0]

    def count(rec) -> None:
        if rec.exitcode == ExitCode.MSR and rec.exitinfo1 == 1:
            writes[0] += 1
    m.on_exit_record = count
    r = run(m)
    checksum, aux, made = results(m, 3)
    return {"config": config, "work": work, "calls": made, "guest_ns": r.guest_ns, "wall_s": round(r.wall_s, 4),
            "syscall_rate": r.rate(made), "tsc_aux_write_exits": writes[0], "exits": r.exits,
            "exit_rate": r.rate(r.exits - 1),              # the final EXIT hypercall is not the workload's
            "checksum": f"{checksum:#018x}", "tsc_aux": aux, "by_code": r.by_code}


def run_experiment(ctx: Context) -> Outcome:
    work_sizes, calls = _sizes(ctx.quick)
    points = []
    for w in work_sizes:
        pair = {}
        for config in CONFIGS:
            pair[config] = measure(w, calls, config)
            ctx.step(f"W={w} {config}")
        points.append(pair)
    rows, checks = [], {}
    for p in points:
        i, t = p["intercepted"], p["passthrough"]
        rows.append([fmt(i["syscall_rate"]), fmt(i["tsc_aux_write_exits"]), fmt(t["tsc_aux_write_exits"]),
                     fmt(i["exit_rate"]), fmt(t["exit_rate"]), "yes" if i["checksum"] == t["checksum"] else "NO",
                     f"{i['wall_s']:.2f} / {t['wall_s']:.2f}"])
    checks["intercepted: one TSC_AUX write exit per system call"] = all(
        p["intercepted"]["tsc_aux_write_exits"] == calls == p["intercepted"]["calls"] for p in points)
    checks["passthrough: no TSC_AUX exit"] = all(p["passthrough"]["tsc_aux_write_exits"] == 0 for p in points)
    checks["the guest's checksum is the same both ways"] = all(
        p["intercepted"]["checksum"] == p["passthrough"]["checksum"] for p in points)
    checks["TSC_AUX read back = the last value written"] = all(
        p[c]["tsc_aux"] == (calls - 1) & 0xFFF for p in points for c in CONFIGS)
    top = max(points, key=lambda p: p["intercepted"]["syscall_rate"])
    comps = [
        Comparison("exits per second removed by one MSRPM bit, busiest guest",
                   "\"millions of exits per second\"",
                   f"{fmt(top['intercepted']['exit_rate'] - top['passthrough']['exit_rate'])} "
                   f"(at {fmt(top['intercepted']['syscall_rate'] / 1e6, 1)} M system calls/s)",
                   "exit rate = system-call rate when intercepted; the seed gives no rate, the sandbox sweeps it"),
        Comparison("TSC_AUX exits, intercepted / passthrough", "N / 0",
                   f"{fmt(calls)} / 0 per run of N = {fmt(calls)} calls"),
    ]
    return Outcome(
        comparisons=comps,
        columns=["system calls/s (guest time)", "TSC_AUX exits, intercepted", "passthrough",
                 "exits/s, intercepted", "exits/s, passthrough", "same checksum", "wall s (int./pass.)"],
        rows=rows,
        data={"calls_per_run": calls, "guest_ips": GUEST_IPS, "points": points},
        checks=checks,
        notes=["Guest time counts retired guest instructions at a nominal 100 MIPS; the time the hypervisor "
               "spends on an exit is not guest time, so the exit rates are per second of guest execution."])


def plot(data: dict[str, Any], path) -> None:
    plt = pyplot()
    pts = data["points"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [p["intercepted"]["syscall_rate"] for p in pts]
    ax.plot(x, [p["intercepted"]["exit_rate"] for p in pts], "o-", color=BEFORE,
            label="TSC_AUX write intercepted (MSRPM bit set)")
    ax.plot(x, [max(p["passthrough"]["exit_rate"], 1.0) for p in pts], "s-", color=AFTER,
            label="passed through (MSRPM bit clear): 0 exits, drawn at 1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("system calls per second of guest time")
    ax.set_ylabel("#VMEXITs per second of guest time")
    ax.set_title("MSR bitmap: WRMSR IA32_TSC_AUX on every system call" + subtitle(data))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save(fig, path)


EXPERIMENT = Experiment(
    name="msr-bitmap",
    title="MSR bitmaps: TSC_AUX written on every system call, intercepted vs passed through",
    source="seed 000, The Art of Fine-Tuning (Selective Interception)",
    claim="an MSRPM bit that passes IA32_TSC_AUX writes through can eliminate millions of exits per second",
    steps=_steps, run=run_experiment, plot=plot)
