"""Nested TSC: the time-stamp counter an L2 guest reads is the host's plus
the offset of each level, T_L2 = T_H + d1 + d2.

Seed 000, "Virtualizing the Unseen": *"When a guest deep inside a nested
virtual machine ... reads the CPU's Time Stamp Counter (TSC), the value it
sees is a clean composition of the real hardware time plus the offsets
applied by each layer of virtualization: T_L2 = T_H + d1 + d2."*

``guest_images/nested_tsc.S`` is an L1 hypervisor (``Machine(nested=True)``)
that gives its L2 a TSC_OFFSET of d2 in the VMCB it builds; L0 (the
sandbox's hypervisor) gives L1 d1.  Neither level intercepts RDTSC, so each
RDTSC is the processor's: TSC + TSC_OFFSET (APM §15.30.4), with L0 running
L2 on TSC_OFFSET = d1 + d2 (the nested VMCB02, as KVM's nested code sums
them).  Each round reads, in this order, the host TSC (L0, at a hypercall
exit), L1's TSC, L2's TSC, L1's TSC and the host TSC again.  The host TSC
never goes backwards, so for every round, exactly (mod 2^64):

    h0 <= T_L1(a) - d1 <= T_L2(b) - d1 - d2 <= T_L1(c) - d1 <= h1

No tolerance: the host readings bracket each level's reading, and the
bracket's width (the host time between the readings) is reported.
"""
from __future__ import annotations

import statistics
from typing import Any

from ..hypervisor.handlers import RESUME
from ..svm.cpu import TSC_HZ
from ..svm.exitcodes import ExitCode
from .base import Comparison, Context, Experiment, Outcome, fmt
from .common import machine, results, run
from .plotting import AFTER, BEFORE, THIRD, pyplot, save, subtitle

IMAGE = "nested_tsc.S"
#: the hypercall number nested_tsc.S uses to ask L0 for the host TSC ("HTSC")
HOST_TSC_CALL = 0x5453_4348
M64 = (1 << 64) - 1
RECORD = 5                     # h0, a (L1), b (L2), c (L1), h1

#: (d1, d2) pairs: L0's offset for L1 and L1's for L2 (negative ones wrap, as 64-bit adds do;
#: d2 = 0 would be nested_tsc.S's default, so no pair uses it)
PAIRS_FULL = ((0, 1 << 36), (1 << 40, 1 << 44), (-(1 << 36) & M64, 1 << 32), (1 << 50, -(1 << 50) & M64),
              (0x1234_5678_9ABC, 0x0FED_CBA9_8765))
#: the quick pairs move every term by 2^36 or more when an offset is left out: about half a
#: minute of host TSC, beyond any bracket a loaded machine stretches one round to (the full
#: run's 2^32, under two seconds, is kept for its table)
PAIRS_QUICK = ((1 << 40, 1 << 44), (-(1 << 36) & M64, 1 << 37))


def _sizes(quick: bool) -> tuple[tuple[tuple[int, int], ...], int]:
    return (PAIRS_QUICK, 3) if quick else (PAIRS_FULL, 16)


def _steps(quick: bool) -> int:
    return len(_sizes(quick)[0])


def _signed(v: int) -> int:
    v &= M64
    return v - (1 << 64) if v >> 63 else v


def measure(d1: int, d2: int, rounds: int) -> dict[str, Any]:
    """One L1/L2 run with L1's TSC_OFFSET ``d1`` (set by L0) and L2's ``d2`` (set by L1)."""
    m = machine(IMAGE, [rounds, d2], ram=4 << 20, nested=True)
    m.guest.vmcb.TSC_OFFSET = d1
    hypercall = m.handlers[ExitCode.VMMCALL]

    def host_tsc(m, e):
        if m.regs.rax & 0xFFFF_FFFF == HOST_TSC_CALL:
            m.regs.rax = m.cpu.host_tsc()            # L0 reads its own TSC at the exit: T_H
            m.advance(e)
            return RESUME
        return hypercall(m, e)
    m.handlers[ExitCode.VMMCALL] = host_tsc
    r = run(m)
    vals = results(m, 2 + RECORD * rounds)
    recs = []
    for i in range(vals[0]):
        h0, a, b, c, h1 = vals[2 + RECORD * i:2 + RECORD * (i + 1)]
        # every reading as host time after h0, with its level's offsets taken off
        rel = [(x - h0) & M64 for x in ((a - d1), (b - d1 - d2), (c - d1), h1)]
        recs.append({"h0": h0, "l1_a": a, "l2": b, "l1_c": c, "h1": h1,
                     "l1_a_minus_d1": rel[0], "l2_minus_d1_d2": rel[1], "l1_c_minus_d1": rel[2], "window": rel[3]})
    return {"d1": d1, "d2": d2, "rounds": vals[0], "records": recs, "by_code": r.by_code,
            "vmcb12_tsc_offset": vals[1], "wall_s": round(r.wall_s, 4)}


def _ordered(rec: dict[str, int]) -> bool:
    """0 <= a-d1 <= b-d1-d2 <= c-d1 <= h1 (all relative to h0); a wrong offset
    at any level moves its term by about 2^32 or more and breaks the chain."""
    return 0 <= rec["l1_a_minus_d1"] <= rec["l2_minus_d1_d2"] <= rec["l1_c_minus_d1"] <= rec["window"] < 1 << 62


def run_experiment(ctx: Context) -> Outcome:
    pairs, rounds = _sizes(ctx.quick)
    runs = []
    for d1, d2 in pairs:
        runs.append(measure(d1, d2, rounds))
        ctx.step(f"d1={d1:#x} d2={d2:#x}")
    us = 1e6 / TSC_HZ
    rows = []
    for p in runs:
        recs = p["records"]
        win = statistics.median(r["window"] for r in recs)
        l2_off = statistics.median(_signed(r["l2"] - r["h0"]) for r in recs)
        rows.append([f"{_signed(p['d1']):#x}", f"{_signed(p['d2']):#x}", f"{_signed(p['d1'] + p['d2']):#x}",
                     f"{int(l2_off):#x}", fmt(p["rounds"]), f"{sum(map(_ordered, recs))} of {len(recs)}",
                     f"{win * us:.0f}"])
    total = sum(len(p["records"]) for p in runs)
    ok = sum(_ordered(r) for p in runs for r in p["records"])
    checks = {
        "every round: h0 <= T_L1 - d1 <= T_L2 - d1 - d2 <= T_L1' - d1 <= h1": ok == total and total > 0,
        "every run made its rounds, each with one L2 VMMCALL exit reflected to L1":
            all(p["rounds"] == rounds for p in runs),
        "L1 wrote the requested d2 into its VMCB": all(p["vmcb12_tsc_offset"] == p["d2"] for p in runs),
    }
    win_us = statistics.median(r["window"] for p in runs for r in p["records"]) * us
    comps = [
        Comparison("T_L2 read by an L2 guest (no RDTSC intercepts)", "T_L2 = T_H + d1 + d2",
                   f"T_H + d1 + d2 in {ok} of {total} rounds over {len(runs)} (d1, d2) pairs",
                   "exact: T_L2 - d1 - d2 lies between the host TSC read before and after it, and between "
                   "L1's own readings minus d1"),
        Comparison("T_L1 read by the L1 hypervisor", "T_H + d1", f"T_H + d1 in {ok} of {total} rounds"),
        Comparison("host time between the bracketing readings (median)", "(not given)",
                   f"{win_us:.0f} us", "hypercall exits, a VMRUN and a reflected #VMEXIT in Python; it bounds "
                   "when each reading was taken, not the relation"),
    ]
    return Outcome(
        comparisons=comps,
        columns=["d1 (L0 for L1)", "d2 (L1 for L2)", "d1 + d2", "T_L2 - T_H measured (median)", "rounds",
                 "chain exact", "bracket us (median)"],
        rows=rows,
        data={"tsc_hz": TSC_HZ, "runs": runs},
        checks=checks,
        notes=["T_L2 - T_H is measured against h0, the host TSC read just before the round: it exceeds d1 + d2 "
               "by the host time elapsed until L2's RDTSC, which the bracket column bounds."])


def plot(data: dict[str, Any], path) -> None:
    plt = pyplot()
    runs, us = data["runs"], 1e6 / data["tsc_hz"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    x = range(len(runs))
    labels = [f"d1={_signed(p['d1']) / 2**40:+.3g}\nd2={_signed(p['d2']) / 2**40:+.3g}" for p in runs]
    meas1 = [statistics.median(_signed(r["l1_a"] - r["h0"]) for r in p["records"]) / 2**40 for p in runs]
    meas2 = [statistics.median(_signed(r["l2"] - r["h0"]) for r in p["records"]) / 2**40 for p in runs]
    ax1.bar([i - 0.2 for i in x], [_signed(p["d1"]) / 2**40 for p in runs], 0.2, color=BEFORE, alpha=0.5,
            label="d1 (configured)")
    ax1.plot([i - 0.2 for i in x], meas1, "o", color=BEFORE, label="T_L1 - T_H (measured)")
    ax1.bar([i + 0.2 for i in x], [_signed(p["d1"] + p["d2"]) / 2**40 for p in runs], 0.2, color=AFTER,
            alpha=0.5, label="d1 + d2 (configured)")
    ax1.plot([i + 0.2 for i in x], meas2, "s", color=AFTER, label="T_L2 - T_H (measured)")
    ax1.set_xticks(list(x), labels, fontsize=7)
    ax1.set_yscale("symlog", linthresh=1e-3)
    ax1.set_ylabel("offset (units of 2^40 TSC ticks, symlog)")
    ax1.set_title("each level's TSC offset")
    ax1.axhline(0, color="black", linewidth=0.5)
    ax1.legend(fontsize=7)
    flat = [r for p in runs for r in p["records"]]
    n = range(len(flat))
    ax2.plot(n, [r["l1_a_minus_d1"] * us for r in flat], ".", color=BEFORE, label="T_L1 - d1 (before VMRUN)")
    ax2.plot(n, [r["l2_minus_d1_d2"] * us for r in flat], "o", color=AFTER, mfc="none", label="T_L2 - d1 - d2")
    ax2.plot(n, [r["l1_c_minus_d1"] * us for r in flat], ".", color=THIRD, label="T_L1' - d1 (after #VMEXIT)")
    ax2.plot(n, [r["window"] * us for r in flat], "_", color="black", markersize=12, label="h1 (host, after)")
    ax2.set_xlabel("round (all pairs)")
    ax2.set_ylabel("host time after h0 (us)")
    ax2.set_title("offsets removed: every reading falls between the host's")
    ax2.legend(fontsize=7)
    fig.suptitle("Nested TSC: T_L2 = T_H + d1 + d2" + subtitle(data))
    save(fig, path)


EXPERIMENT = Experiment(
    name="nested-tsc",
    title="Nested TSC: T_L2 = T_H + d1 + d2 read at each level of an L1/L2 pair",
    source="seed 000, Virtualizing the Unseen",
    claim="a nested guest's TSC is the host's plus each level's offset, T_L2 = T_H + d1 + d2",
    steps=_steps, run=run_experiment, plot=plot)
