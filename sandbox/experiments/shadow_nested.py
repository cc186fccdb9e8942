"""Shadow paging against nested paging on the bundled kernel: exits by
code, walks and table references.

Seed 002, "The Labyrinth of Memory": *"The early software solution, shadow
page tables, was a nightmare of complexity ... Any change the guest made to
its page tables had to be trapped and mirrored in the shadow tables,
causing a flood of costly VM-Exits."*  Seed 000: nested paging *"eliminates
one of the biggest sources of virtualization overhead"*, at the price of
the longer 2-D walk.

``guest_images/kernel.S`` (its own GDT, IDT, TSS and 4-level page tables;
it handles a #PF by mapping the page and retrying, plus #GP, #UD, #BP and
#DE in its own handlers) runs unchanged under both: ``Machine(paging=
"nested")`` and ``Machine(paging="shadow")``, where the hypervisor keeps
GVA->HPA shadow tables in sync through #PF, MOV CR3 and INVLPG intercepts
and write-protected guest tables (:mod:`sandbox.hypervisor.shadow`).

Expected: the same console output both ways; the shadow run has #PF exits
(and CR3/INVLPG exits) the nested run does not; the nested run's walks
cost 24 references each, the shadow's at most 4.
"""
from __future__ import annotations

from typing import Any

from .base import Comparison, Context, Experiment, Outcome, fmt
from .common import machine, run
from .plotting import AFTER, BEFORE, pyplot, save, subtitle

IMAGE = "kernel.S"
MODES = ("nested", "shadow")


def _steps(quick: bool) -> int:
    return len(MODES)


def measure(paging: str) -> dict[str, Any]:
    m = machine(IMAGE, ram=16 << 20, dram=64 << 20, paging=paging)
    r = run(m)
    out = {"paging": paging, "exits": r.exits, "by_code": r.by_code, "walk": r.result.walk, "tlb": r.result.tlb,
           "console": r.result.console, "guest_ns": r.guest_ns, "wall_s": round(r.wall_s, 4)}
    if m.shadow is not None:
        out["shadow"] = m.shadow.stats.snapshot()
    return out


def run_experiment(ctx: Context) -> Outcome:
    res = {}
    for p in MODES:
        res[p] = measure(p)
        ctx.step(p)
    n, s = res["nested"], res["shadow"]
    codes = sorted(set(n["by_code"]) | set(s["by_code"]))
    rows = [[c, fmt(n["by_code"].get(c, 0)), fmt(s["by_code"].get(c, 0))] for c in codes]
    rows.append(["all exits", fmt(n["exits"]), fmt(s["exits"])])
    rows.append(["walks", fmt(n["walk"]["walks"]), fmt(s["walk"]["walks"])])
    rows.append(["table references", fmt(n["walk"]["table_refs"]), fmt(s["walk"]["table_refs"])])
    rows.append(["references per walk", f"{n['walk']['table_refs'] / n['walk']['walks']:.1f}",
                 f"{s['walk']['table_refs'] / s['walk']['walks']:.1f}"])
    sh = s["shadow"]
    rows.append(["shadow: faults fixed / reflected", "-", f"{sh['shadow_faults']} / {sh['guest_faults']}"])
    rows.append(["shadow: guest entries the hypervisor read", "-", fmt(sh["guest_entries"])])
    rows.append(["shadow: page-table writes trapped / rebuilds", "-", f"{sh['pt_write_faults']} / {sh['zaps']}"])
    pf = s["by_code"].get("EXCP_PF", 0)
    checks = {
        "the kernel prints the same console output both ways": n["console"] == s["console"] and bool(n["console"]),
        "shadow paging adds #PF exits that nested paging does not have": pf > 0 and "EXCP_PF" not in n["by_code"],
        "nested walks cost 24 references (or fewer when they fault), shadow walks at most 4": (
            24 * n["walk"]["data_refs"] <= n["walk"]["table_refs"] <= 24 * n["walk"]["walks"]
            and s["walk"]["nested_pte_refs"] == 0 and s["walk"]["table_refs"] <= 4 * s["walk"]["walks"]),
    }
    comps = [
        Comparison("exits running kernel.S: nested / shadow paging", "shadow: \"a flood of costly VM-Exits\"",
                   f"{fmt(n['exits'])} / {fmt(s['exits'])} ({fmt(pf)} of them #PF)",
                   "a small kernel that touches few pages: the flood grows with every page and every CR3 switch"),
        Comparison("page-table references per walk: nested / shadow", "nested: up to w_g x w_h",
                   f"{n['walk']['table_refs'] / n['walk']['walks']:.1f} / "
                   f"{s['walk']['table_refs'] / s['walk']['walks']:.1f}",
                   "what nested paging pays instead of the exits"),
    ]
    return Outcome(
        comparisons=comps,
        columns=["exit / measure", "nested paging", "shadow paging"],
        rows=rows,
        data={"runs": res},
        checks=checks)


def plot(data: dict[str, Any], path) -> None:
    plt = pyplot()
    n, s = data["runs"]["nested"], data["runs"]["shadow"]
    codes = sorted(set(n["by_code"]) | set(s["by_code"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    w = 0.4
    xs = range(len(codes))
    ax1.bar([x - w / 2 for x in xs], [n["by_code"].get(c, 0) for c in codes], w, color=AFTER, label="nested paging")
    ax1.bar([x + w / 2 for x in xs], [s["by_code"].get(c, 0) for c in codes], w, color=BEFORE, label="shadow paging")
    ax1.set_xticks(list(xs), codes, rotation=30, ha="right", fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("#VMEXITs")
    ax1.set_title("exits by code, guest_images/kernel.S")
    ax1.legend(fontsize=8)
    labels = ["walks", "table refs"]
    nv = [n["walk"]["walks"], n["walk"]["table_refs"]]
    sv = [s["walk"]["walks"], s["walk"]["table_refs"]]
    ax2.bar([x - w / 2 for x in range(2)], nv, w, color=AFTER, label="nested (2-D walks)")
    ax2.bar([x + w / 2 for x in range(2)], sv, w, color=BEFORE, label="shadow (1-D walks)")
    ax2.set_xticks(range(2), labels)
    ax2.set_title("processor page walks")
    ax2.legend(fontsize=8)
    fig.suptitle("Shadow vs nested paging" + subtitle(data))
    save(fig, path)


EXPERIMENT = Experiment(
    name="shadow-nested",
    title="Shadow paging vs nested paging on guest_images/kernel.S: exits by code, walks",
    source="seed 002, The Labyrinth of Memory; seed 000, The Two-Body Problem of Memory",
    claim="shadow tables cost a flood of exits; nested paging trades them for longer walks",
    steps=_steps, run=run_experiment, plot=plot)
