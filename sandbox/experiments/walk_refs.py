"""Nested paging's price: page-table references of one 2-D walk, for every
pair of guest and nested page sizes.

Seed 000, "The Two-Body Problem of Memory" (and seed 002, "The Labyrinth of
Memory"): *"a single guest memory access could, in the worst case, require
w_g x w_h memory lookups just to navigate the page tables"*; the README's
memory section derives the exact count: each of the n guest table entries
is a GPA (a nested walk of m references, then the read) and the final GPA
costs one more nested walk, so n(m + 1) + m = (n + 1)(m + 1) - 1 -- 24 for
4 KiB pages at both levels, 19 and 14 with 2 MiB and 1 GiB nested pages.

**Guest runs** (``guest_images/walk_refs.S``): the guest builds its own
tables in which K virtual pages of the chosen size lead to one GPA, loads
CR3 and touches each once; nested paging backs guest RAM with 4 KiB or
2 MiB pages (``Machine(npt_page=...)``).  References per walk are taken
from the run's walk counters as the difference between K = 65 and K = 1
touches, so the code and stack pages' own walks cancel out.

**Walker**: a 1 GiB nested page needs host memory aligned to 1 GiB, more
DRAM than a sandbox machine has, so that column (and, for comparison,
every other pair) is also measured on the processor's 2-D walker alone,
as ``tests/memory/test_memvirt.py`` does: tables built in host memory, one
cold translation.
"""
from __future__ import annotations

from typing import Any

from ..memory.hostmem import HostMemory
from ..memory.mmu import GuestLayer, NestedLayer, TwoDimWalker, WalkStats
from ..memory.npt import NestedPageTable
from ..memory.paging import Access, TableBuilder
from .base import Comparison, Context, Experiment, Outcome
from .common import ExperimentError, machine, run
from .plotting import pyplot, save, subtitle

IMAGE = "walk_refs.S"
KIB4, MIB2, GIB1 = 1 << 12, 1 << 21, 1 << 30
SIZES = (KIB4, MIB2, GIB1)
NAMES = {KIB4: "4K", MIB2: "2M", GIB1: "1G"}
LEVELS = {KIB4: 4, MIB2: 3, GIB1: 2}                 # table levels down to a leaf of that size
SELECTOR = {KIB4: 1, MIB2: 2, GIB1: 3}               # walk_refs.S's parameter
GUEST_RUN_NESTED = (KIB4, MIB2)                      # what a Machine can back guest RAM with
DERIVED_FIGURES = {(KIB4, KIB4): 24, (KIB4, MIB2): 19, (KIB4, GIB1): 14}   # the README's figures


def derived(guest_page: int, nested_page: int) -> int:
    n, m = LEVELS[guest_page], LEVELS[nested_page]
    return (n + 1) * (m + 1) - 1


def _steps(quick: bool) -> int:
    return len(SIZES) * len(GUEST_RUN_NESTED) + 1


def guest_run(guest_page: int, nested_page: int, touches: int) -> dict[str, Any]:
    """References per walk in a real guest: runs with 1 and 1 + ``touches`` touches, differenced."""
    walks = []
    for k in (1, 1 + touches):
        m = machine(IMAGE, [SELECTOR[guest_page], k], ram=4 << 20, npt_page=nested_page)
        walks.append(run(m).result.walk)
    d = {key: walks[1][key] - walks[0][key] for key in walks[0]}
    return {"walks": d["walks"], "table_refs": d["table_refs"], "guest_refs": d["guest_pte_refs"],
            "nested_refs": d["nested_pte_refs"], "refs_per_walk": d["table_refs"] / d["walks"]}


def walker(guest_page: int, nested_page: int) -> dict[str, Any]:
    """One cold translation on the 2-D walker, with hand-built tables (the
    method of tests/memory/test_memvirt.py)."""
    mem = HostMemory(64 << 20)
    npt = NestedPageTable(mem)
    off = 0 if nested_page == GIB1 else 0x0200_0000          # HPA = GPA + off
    if nested_page == GIB1:
        npt.map(0, 0, size=GIB1)

    def nmap(gpa: int) -> None:
        if nested_page != GIB1:
            base = gpa & ~(nested_page - 1)
            if base not in npt.leaves:
                npt.map(base, base + off, size=nested_page)
    tables: list[int] = []

    def alloc() -> int:
        gpa = 0x0100_0000 + len(tables) * KIB4
        tables.append(gpa)
        nmap(gpa)
        return gpa
    tb = TableBuilder(alloc(), alloc, lambda gpa: mem.read_u64(gpa + off), lambda gpa, v: mem.write_u64(gpa + off, v))
    gva = 0x7F80_0000_0000
    data_gpa = 0 if guest_page == GIB1 else 0x0140_0000
    nmap(data_gpa)
    tb.map(gva, data_gpa, size=guest_page)
    stats = WalkStats()
    nested = NestedLayer(mem, npt.n_cr3, stats)
    guest = GuestLayer(nested, cr0=0x8001_0001, cr3=tables[0], cr4=0x20, efer=0xD00, stats=stats)
    t = TwoDimWalker(guest, nested, stats).translate(gva + 0x123, Access.READ, False)
    if t.gpa != data_gpa + 0x123:
        raise ExperimentError(f"walker translated to GPA {t.gpa:#x}, not {data_gpa + 0x123:#x}")
    return {"walks": stats.walks, "table_refs": stats.table_refs, "guest_refs": stats.guest_entries,
            "nested_refs": stats.nested_entries, "refs_per_walk": stats.table_refs / stats.walks}


def run_experiment(ctx: Context) -> Outcome:
    touches = 16 if ctx.quick else 64
    cells = []
    for g in SIZES:
        for n in GUEST_RUN_NESTED:
            cells.append({"guest": NAMES[g], "nested": NAMES[n], "derived": derived(g, n),
                          "run": guest_run(g, n, touches), "walker": None})
            ctx.step(f"guest {NAMES[g]} / nested {NAMES[n]}")
    for g in SIZES:
        for n in SIZES:
            cell = next((c for c in cells if c["guest"] == NAMES[g] and c["nested"] == NAMES[n]), None)
            if cell is None:
                cell = {"guest": NAMES[g], "nested": NAMES[n], "derived": derived(g, n), "run": None}
                cells.append(cell)
            cell["walker"] = walker(g, n)
    ctx.step("walker, every pair")
    order = {(NAMES[g], NAMES[n]): i for i, (g, n) in enumerate((g, n) for g in SIZES for n in SIZES)}
    cells.sort(key=lambda c: order[(c["guest"], c["nested"])])
    rows = []
    for c in cells:
        r = c["run"]
        rows.append([f"{c['guest']} / {c['nested']}", str(c["derived"]),
                     f"{r['refs_per_walk']:g} ({r['guest_refs'] // r['walks']} guest + "
                     f"{r['nested_refs'] // r['walks']} nested)" if r else "- (needs 1 GiB of aligned DRAM)",
                     f"{c['walker']['refs_per_walk']:g}"])
    checks = {
        "guest runs: references per walk = (n+1)(m+1)-1 for every pair": all(
            c["run"]["refs_per_walk"] == c["derived"] and c["run"]["walks"] == touches for c in cells if c["run"]),
        "walker: references per walk = (n+1)(m+1)-1 for every pair": all(
            c["walker"]["refs_per_walk"] == c["derived"] for c in cells),
    }
    get = {(c["guest"], c["nested"]): c for c in cells}
    comps = []
    for (g, n), fig in DERIVED_FIGURES.items():
        c = get[(NAMES[g], NAMES[n])]
        measured = c["run"]["refs_per_walk"] if c["run"] else c["walker"]["refs_per_walk"]
        seed = "w_g x w_h = 4 x 4 = 16 (\"in the worst case\")" if (g, n) == (KIB4, KIB4) else ""
        note = (f"derived: {fig}; w_g x w_h counts the nested walks of the guest entries only -- the guest "
                "entries themselves (4) and the final GPA's nested walk (4) come on top"
                if (g, n) == (KIB4, KIB4) else f"derived: {fig}")
        if not c["run"]:
            note += "; walker only: 1 GiB nested pages cannot back a sandbox machine's RAM"
        comps.append(Comparison(f"table references of one walk, {NAMES[g]} guest / {NAMES[n]} nested pages",
                                seed, f"{measured:g}", note))
    return Outcome(
        comparisons=comps,
        columns=["guest / nested page", "derived (n+1)(m+1)-1", "guest run: refs per walk", "walker: refs per walk"],
        rows=rows,
        data={"touches": touches, "cells": cells},
        checks=checks,
        notes=["There is no page-walk cache and no nested TLB in the model: every TLB miss pays the full walk. "
               "Real processors cache the upper levels, so their average is far below these counts."])


def plot(data: dict[str, Any], path) -> None:
    plt = pyplot()
    cells = data["cells"]
    names = [NAMES[s] for s in SIZES]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    width = 0.26
    colours = ("#2471a3", "#5dade2", "#aed6f1")
    for j, n in enumerate(names):
        vals, hatches = [], []
        for g in names:
            c = next(c for c in cells if c["guest"] == g and c["nested"] == n)
            vals.append(c["run"]["refs_per_walk"] if c["run"] else c["walker"]["refs_per_walk"])
            hatches.append("" if c["run"] else "//")
        xs = [i + (j - 1) * width for i in range(len(names))]
        bars = ax.bar(xs, vals, width, color=colours[j], edgecolor="black", label=f"nested {n} pages")
        for b, h, v in zip(bars, hatches, vals):
            b.set_hatch(h)
            ax.text(b.get_x() + b.get_width() / 2, v + 0.3, f"{v:g}", ha="center", fontsize=9)
    ax.set_xticks(range(len(names)), [f"guest {g} pages" for g in names])
    ax.set_ylabel("page-table references per TLB miss")
    ax.set_title("One 2-D walk: (n+1)(m+1)-1 references" + subtitle(data))
    ax.set_ylim(0, 27)
    ax.legend(loc="upper right", fontsize=8, title="hatched: walker only", title_fontsize=8)
    save(fig, path)


EXPERIMENT = Experiment(
    name="walk-refs",
    title="2-D page walks: table references for each pair of guest and nested page sizes",
    source="seed 000, The Two-Body Problem of Memory; seed 002, The Labyrinth of Memory",
    claim="a nested walk multiplies the guest's and the host's levels: 24 references with 4 KiB pages at both",
    steps=_steps, run=run_experiment, plot=plot)
