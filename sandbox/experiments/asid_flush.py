"""ASIDs against a TLB flush on every world switch: walks per exit and time
per exit, against the number of pages the guest touches between exits.

Seed 000, "The Art of Fine-Tuning": *"Switching between the hypervisor and
a guest used to require flushing the TLB ... ASIDs solve this by tagging
TLB entries, allowing the hypervisor's and multiple guests' translations to
coexist peacefully in the cache, dramatically improving performance."*
(seed 002, "Taming the Labyrinth", says the same.)

``guest_images/tlb_switch.S`` reads one qword from each of P pages, then
executes CPUID (an exit and a VMRUN), round after round.  It runs with the
ASID-tagged TLB (``TlbMode.TAGGED``) and with a flush on every world
switch (``TlbMode.FLUSH_ON_SWITCH``), as ``scripts/bench_memory.py`` does
for P = 32.

Expected (derived): flushed, every round walks the code page and the P
data pages again: P + 1 walks per exit; tagged, only the first round
walks: (P + 1) / rounds per exit, plus the start-up pages.
"""
from __future__ import annotations

from typing import Any

from ..memory.tlb import TlbMode
from .base import Comparison, Context, Experiment, Outcome, fmt
from .common import machine, run
from .plotting import AFTER, BEFORE, pyplot, save, subtitle

IMAGE = "tlb_switch.S"
PAGES_FULL = (1, 4, 16, 64, 256)
PAGES_QUICK = (1, 16, 64)
MODES = (TlbMode.TAGGED, TlbMode.FLUSH_ON_SWITCH)


def _plan(quick: bool) -> list[tuple[int, int]]:
    """(pages, rounds): rounds shrink for large P so a flushed run stays under ~64k walks."""
    if quick:
        return [(p, min(200, 4096 // p)) for p in PAGES_QUICK]
    return [(p, min(1000, 65536 // p)) for p in PAGES_FULL]


def _steps(quick: bool) -> int:
    return len(_plan(quick)) * len(MODES)


def measure(pages: int, rounds: int, mode: TlbMode) -> dict[str, Any]:
    m = machine(IMAGE, [pages, rounds], ram=4 << 20, tlb_mode=mode)
    r = run(m)
    exits = r.exits
    w = r.result.walk
    return {"mode": mode.value, "pages": pages, "rounds": rounds, "exits": exits, "walks": w["walks"],
            "table_refs": w["table_refs"], "walks_per_exit": w["walks"] / exits,
            "refs_per_exit": w["table_refs"] / exits, "us_per_exit": r.wall_s / exits * 1e6,
            "tlb": r.result.tlb, "wall_s": round(r.wall_s, 3)}


def run_experiment(ctx: Context) -> Outcome:
    points = []
    for pages, rounds in _plan(ctx.quick):
        pt = {}
        for mode in MODES:
            pt[mode.value] = measure(pages, rounds, mode)
            ctx.step(f"P={pages} {mode.value}")
        points.append(pt)
    rows = []
    for pt in points:
        t, f = pt["tagged"], pt["flush"]
        rows.append([str(t["pages"]), fmt(t["exits"]), f"{t['walks_per_exit']:.2f}", f"{f['walks_per_exit']:.2f}",
                     f"{t['us_per_exit']:.1f}", f"{f['us_per_exit']:.1f}", f"{f['us_per_exit'] / t['us_per_exit']:.1f}x"])
    checks = {
        "flushed: every round walks the code page and the P pages again (P+1 walks per round)": all(
            pt["flush"]["walks"] >= pt["flush"]["rounds"] * (pt["flush"]["pages"] + 1) for pt in points),
        "tagged: each page is walked about once in the whole run": all(
            pt["tagged"]["walks"] <= pt["tagged"]["pages"] + 16 for pt in points),
    }
    p32 = min(points, key=lambda pt: abs(pt["tagged"]["pages"] - 32))
    comps = [
        Comparison(f"2-D walks per exit, {p32['tagged']['pages']} pages touched between exits: "
                   "flush on switch / ASID-tagged", "\"dramatically improving performance\" (no figure)",
                   f"{p32['flush']['walks_per_exit']:.2f} / {p32['tagged']['walks_per_exit']:.2f}"),
        Comparison("time per exit, same run: flush / tagged", "",
                   f"{p32['flush']['us_per_exit']:.0f} / {p32['tagged']['us_per_exit']:.0f} us",
                   "wall-clock in the sandbox, where a walk is Python code (~tens of us): the ratio, "
                   "not the microseconds, is the point"),
    ]
    return Outcome(
        comparisons=comps,
        columns=["pages between exits", "exits", "walks/exit, tagged", "walks/exit, flush",
                 "us/exit, tagged", "us/exit, flush", "flush / tagged time"],
        rows=rows,
        data={"points": points},
        checks=checks,
        notes=["Times are wall-clock per exit on a shared machine; walks are counted, so they are exact."])


def plot(data: dict[str, Any], path) -> None:
    plt = pyplot()
    pts = data["points"]
    x = [pt["tagged"]["pages"] for pt in pts]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for mode, colour, mark, label in (("flush", BEFORE, "o", "TLB flushed on every world switch"),
                                      ("tagged", AFTER, "s", "ASID-tagged TLB")):
        ax1.plot(x, [max(pt[mode]["walks_per_exit"], 1e-3) for pt in pts], mark + "-", color=colour, label=label)
        ax2.plot(x, [pt[mode]["us_per_exit"] for pt in pts], mark + "-", color=colour, label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("pages touched between two exits")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("2-D walks per exit")
    ax1.set_title("walks per exit")
    ax2.set_yscale("log")
    ax2.set_ylabel("wall-clock per exit (us, sandbox)")
    ax2.set_title("time per exit")
    fig.suptitle("ASID-tagged TLB vs flush on world switch" + subtitle(data))
    save(fig, path)


EXPERIMENT = Experiment(
    name="asid-flush",
    title="ASIDs vs a TLB flush on every world switch: walks and time per exit",
    source="seed 000, The Art of Fine-Tuning (Reducing Cache-Flush Penalties)",
    claim="tagging TLB entries with ASIDs keeps translations across world switches",
    steps=_steps, run=run_experiment, plot=plot)
