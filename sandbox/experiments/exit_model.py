"""The exit-rate model: one mixed guest under the pre-2008 feature set and
under the modern one, its exit rate split into a CPU and an I/O component.

Seed 000, "The Art of Fine-Tuning": *"The rate of VM exits can be seen as
a sum of a baseline rate for CPU-bound work and an additional rate for
I/O-bound work. Modern hardware features attack both components, but they
are especially effective at crushing the I/O-related overhead, reducing
that component of the exit rate by 60% or more in typical scenarios."*

``guest_images/mixed_workload.S`` alternates a CPU phase (system calls
that write TSC_AUX, an occasional CPUID, a working set of pages, an
address-space switch by MOV CR3) and an I/O phase (console output, then
the round's device interrupts: a device on another host processor raises
a vector every :data:`PERIOD_NS` of guest time, the guest's handler counts
it and writes the xAPIC's EOI, and the round waits until its share is
handled).  Both sets run on the PC platform (its local APIC).  The two
:class:`FeatureSet` s:

``pre-2008``
    shadow paging (#PF, CR3 and INVLPG intercepts, write-protected guest
    tables), the TLB flushed on every world switch, every MSR and every
    port intercepted, the console an emulated 16550 UART, interrupts
    injected: the device's IPI is a #VMEXIT(INTR), the hypervisor injects
    the vector (EVENTINJ), and the EOI -- a write to the APIC page, which
    shadow paging never maps -- is a #PF exit emulated against the
    hypervisor's xAPIC (what KVM's in-kernel APIC and Xen's vlapic did
    in 2007 under shadow paging);
``modern``
    nested paging with hardware A/D bits, ASID-tagged TLB, the MSR bitmap
    passing TSC_AUX through, the I/O bitmap trapping only the platform's
    ports, the console a virtio device (one notify per write), AVIC: the
    device's interrupt is a doorbell, delivered and EOI'd without an exit.

Exits are classified by what they serve: port I/O (IOIO), MMIO (NPF, and
the shadow #PF exits that were device accesses), interrupt delivery
(INTR, VINTR) and the APIC's own exits (AVIC_NOACCEL,
AVIC_INCOMPLETE_IPI) are lambda_io; everything else lambda_cpu (the run's
end -- the EXIT hypercall and the isa-debug-exit write -- is not counted).
Rates are per second of guest time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..arch import MSR_TSC_AUX
from ..hypervisor.platform.apic import EOI as EOI_OFFSET
from ..hypervisor.platform.apic import XAPIC_BASE
from ..hypervisor.virtio import VirtioConsole
from ..memory.tlb import TlbMode
from ..svm.exitcodes import ExitCode
from ..svm.stop import StopReason
from .avic_irq import MODES as DELIVERY
from .avic_irq import connect
from .base import Comparison, Context, Experiment, Outcome, fmt
from .common import IO_EXITS, machine, results, run
from .plotting import AFTER, BEFORE, pyplot, save, subtitle
from .virtio_io import payload

IMAGE = "mixed_workload.S"
MMIO_GPA = 0x1F0000
SEED_REDUCTION = 60.0
VECTOR = 0x41
#: the device raises an interrupt every 20 us of guest time (as in the ``avic`` experiment)
PERIOD_NS = 20_000
#: exits that deliver or complete an interrupt: part of lambda_io
INTERRUPT_EXITS = frozenset({ExitCode.INTR, ExitCode.VINTR, ExitCode.AVIC_NOACCEL, ExitCode.AVIC_INCOMPLETE_IPI})
#: the name of the shadow #PF exits that were device accesses, in the by-code tables
PF_MMIO = "EXCP_PF (MMIO)"


@dataclass(frozen=True)
class FeatureSet:
    name: str
    paging: str                 # "shadow" or "nested"
    tlb: TlbMode
    trap_all_msrs: bool         # MSRPM all ones, or TSC_AUX passed through
    trap_all_ports: bool        # IOPM all ones, or the platform's ports only
    console: str                # "uart" or "virtio"
    interrupts: str             # "injection" (INTR exit, EVENTINJ, trapped EOI) or "avic"


PRE_2008 = FeatureSet("pre-2008", "shadow", TlbMode.FLUSH_ON_SWITCH, True, True, "uart", "injection")
MODERN = FeatureSet("modern", "nested", TlbMode.TAGGED, False, False, "virtio", "avic")
SETS = (PRE_2008, MODERN)


def _params(quick: bool) -> dict[str, int]:
    return {"rounds": 20 if quick else 200, "syscalls": 32, "work": 50, "bytes": 64, "pages": 16,
            "irqs_per_round": 4}


def _steps(quick: bool) -> int:
    return len(SETS)


def _ended(r) -> bool:
    return r.reason == StopReason.GUEST_EXIT and r.exit_code == 0


def measure(fs: FeatureSet, p: dict[str, int]) -> dict[str, Any]:
    if fs.interrupts not in DELIVERY:
        raise ValueError(f"interrupts must be one of {', '.join(DELIVERY)}, not {fs.interrupts!r}")
    irqs = p["rounds"] * p["irqs_per_round"]
    m = machine(IMAGE, [p["rounds"], p["syscalls"], p["work"], p["bytes"], 2 if fs.console == "virtio" else 1,
                        MMIO_GPA, p["pages"], p["irqs_per_round"], VECTOR],
                ram=4 << 20, paging=fs.paging, tlb_mode=fs.tlb, platform="pc")
    if fs.trap_all_msrs:
        m.intercept("msr")
    else:
        m.guest.msrpm.set(MSR_TSC_AUX, read=False, write=False)      # the platform traps the rest
    if fs.trap_all_ports:
        m.intercept("ioio")
    dev = VirtioConsole(m.guest)
    if fs.console == "virtio":
        m.map_mmio(MMIO_GPA, 0x1000, dev)
    irq, av = connect(m, fs.interrupts, VECTOR, irqs, PERIOD_NS)
    eoi_exits = [0]

    def count_eoi(rec) -> None:
        # a trapped EOI: NPF at its GPA, or (shadow paging) #PF at the GVA the guest
        # maps to it -- mixed_workload.S maps the APIC page at its own address
        if rec.exitcode in (ExitCode.NPF, ExitCode.EXCP_PF) and rec.exitinfo2 == XAPIC_BASE + EOI_OFFSET:
            eoi_exits[0] += 1
        elif rec.exitcode == ExitCode.AVIC_NOACCEL and rec.exitinfo1 & 0xFF0 == EOI_OFFSET:
            eoi_exits[0] += 1
    m.on_exit_record = count_eoi
    r = run(m, ok=_ended)
    checksum, sent, rounds, notifies, handled, eois = results(m, 6)
    counts = dict(r.result.counts)
    counts[ExitCode.VMMCALL] = counts.get(ExitCode.VMMCALL, 0) - 1   # the EXIT hypercall and the
    counts[ExitCode.IOIO] = counts.get(ExitCode.IOIO, 0) - 1         # isa-debug-exit write end the run
    by_code = {k: v for k, v in r.by_code.items()}
    by_code["VMMCALL"] -= 1
    by_code["IOIO"] -= 1
    mmio_pf = m.shadow.stats.mmio_faults if m.shadow is not None else 0
    if mmio_pf:
        by_code["EXCP_PF"] -= mmio_pf
        by_code[PF_MMIO] = mmio_pf
    by_code = {k: v for k, v in by_code.items() if v}
    io = sum(n for c, n in counts.items() if c in IO_EXITS or c in INTERRUPT_EXITS) + mmio_pf
    cpu = sum(counts.values()) - io
    intr = counts.get(ExitCode.INTR, 0) + counts.get(ExitCode.VINTR, 0)
    received = bytes(dev.output) if fs.console == "virtio" else bytes(m.serial.output)
    out = {"set": fs.name, "paging": fs.paging, "tlb": fs.tlb.value, "console": fs.console,
           "trap_all_msrs": fs.trap_all_msrs, "trap_all_ports": fs.trap_all_ports, "interrupts": fs.interrupts,
           "guest_ns": r.guest_ns, "wall_s": round(r.wall_s, 3), "exits": cpu + io, "cpu_exits": cpu,
           "io_exits": io, "lambda": r.rate(cpu + io), "lambda_cpu": r.rate(cpu), "lambda_io": r.rate(io),
           "by_code": by_code, "walks": r.result.walk["walks"], "table_refs": r.result.walk["table_refs"],
           "checksum": f"{checksum:#018x}", "bytes_sent": sent, "rounds": rounds, "notifies": notifies,
           "console_ok": received == payload(p["rounds"] * p["bytes"]),
           "irqs_raised": irq.raised, "irqs_handled": handled, "eois_written": eois, "eoi_exits": eoi_exits[0],
           "interrupt_exits": intr, "injected": m.platform.injected["intr"], "shadow_mmio_faults": mmio_pf,
           "avic_delivered": m.cpu.avic.stats.snapshot()["delivered"] if av is not None else 0,
           "doorbells": av.stats["doorbells"] if av is not None else 0}
    return out


def _irq_exits(x: dict[str, Any]) -> int:
    """Exits that deliver or complete an interrupt (part of lambda_io)."""
    return x["interrupt_exits"] + x["eoi_exits"] + x["by_code"].get("AVIC_NOACCEL", 0) + \
        x["by_code"].get("AVIC_INCOMPLETE_IPI", 0)


def run_experiment(ctx: Context) -> Outcome:
    p = _params(ctx.quick)
    res = {}
    for fs in SETS:
        res[fs.name] = measure(fs, p)
        ctx.step(fs.name)
    old, new = res[PRE_2008.name], res[MODERN.name]
    irqs = p["rounds"] * p["irqs_per_round"]
    for x in res.values():
        x["irq_exits"] = _irq_exits(x)
        x["lambda_io_irq"] = x["lambda_io"] * x["irq_exits"] / x["io_exits"] if x["io_exits"] else 0.0
    red_io = 100 * (1 - new["lambda_io"] / old["lambda_io"])
    red_cpu = 100 * (1 - new["lambda_cpu"] / old["lambda_cpu"])
    red_all = 100 * (1 - new["lambda"] / old["lambda"])
    rows = []
    for key, label in (("lambda_cpu", "lambda_cpu (exits/s)"), ("lambda_io", "lambda_io (exits/s)"),
                       ("lambda", "lambda = lambda_cpu + lambda_io")):
        rows.append([label, fmt(old[key]), fmt(new[key]), f"{100 * (1 - new[key] / old[key]):.1f} %"])
    rows.append(["exits (CPU + I/O)", f"{fmt(old['cpu_exits'])} + {fmt(old['io_exits'])}",
                 f"{fmt(new['cpu_exits'])} + {fmt(new['io_exits'])}", ""])
    codes = sorted(set(old["by_code"]) | set(new["by_code"]))
    for c in codes:
        rows.append([f"  {c}", fmt(old["by_code"].get(c, 0)), fmt(new["by_code"].get(c, 0)), ""])
    rows += [
        ["interrupts raised / handled", f"{fmt(old['irqs_raised'])} / {fmt(old['irqs_handled'])}",
         f"{fmt(new['irqs_raised'])} / {fmt(new['irqs_handled'])}", ""],
        ["  INTR exits / injected (EVENTINJ)", f"{fmt(old['interrupt_exits'])} / {fmt(old['injected'])}",
         f"{fmt(new['interrupt_exits'])} / {fmt(new['injected'])}", ""],
        ["  EOIs written / trapped", f"{fmt(old['eois_written'])} / {fmt(old['eoi_exits'])}",
         f"{fmt(new['eois_written'])} / {fmt(new['eoi_exits'])}", ""],
        ["  delivered by AVIC from the IRR (doorbells)", "-",
         f"{fmt(new['avic_delivered'])} ({fmt(new['doorbells'])})", ""],
        ["  exits per interrupt (delivery + EOI)", f"{old['irq_exits'] / irqs:.2f}", f"{new['irq_exits'] / irqs:.4f}",
         ""],
        ["2-D / shadow walks", fmt(old["walks"]), fmt(new["walks"]), ""],
        ["guest time (ms)", f"{old['guest_ns'] / 1e6:.2f}", f"{new['guest_ns'] / 1e6:.2f}", ""],
    ]
    checks = {
        "same checksum under both feature sets": old["checksum"] == new["checksum"],
        "same console bytes (the guest's payload) both ways": old["console_ok"] and new["console_ok"],
        "lambda = lambda_cpu + lambda_io": all(
            abs(x["lambda"] - x["lambda_cpu"] - x["lambda_io"]) < 1e-6 * x["lambda"] for x in res.values()),
        f"I/O component reduced by at least the seed's {SEED_REDUCTION:g} %": red_io >= SEED_REDUCTION,
        "pre-2008: 2 port exits per console byte (and the device's start)":
            old["by_code"].get("IOIO", 0) == 2 * old["bytes_sent"] + 1,
        "modern: one notify per round": new["notifies"] == new["rounds"] == p["rounds"],
        "both handled every interrupt raised": all(
            x["irqs_raised"] == x["irqs_handled"] == x["eois_written"] == irqs for x in res.values()),
        "pre-2008: an INTR exit, an injected event and a trapped EOI per interrupt":
            old["interrupt_exits"] >= irqs and old["injected"] == irqs and old["eoi_exits"] == irqs,
        "modern (AVIC): no INTR exit, no EOI exit, every interrupt delivered from the IRR":
            new["interrupt_exits"] == 0 and new["eoi_exits"] == 0 and new["avic_delivered"] == irqs,
    }
    comps = [
        Comparison("reduction of the I/O component lambda_io", ">= 60 %", f"{red_io:.1f} %",
                   "UART: 2 exits per byte, virtio: one notify per write; injection: an INTR exit and a trapped "
                   "EOI per interrupt, AVIC: none"),
        Comparison("reduction of the CPU component lambda_cpu", "(attacked too, no figure)", f"{red_cpu:.1f} %",
                   "MSR bitmap, NPT (no #PF/CR3 exits); CPUID still exits both ways"),
        Comparison("reduction of lambda", "", f"{red_all:.1f} %"),
        Comparison("interrupts handled: pre-2008 / modern", "(the same work)",
                   f"{fmt(old['irqs_handled'])} / {fmt(new['irqs_handled'])}",
                   f"exits per interrupt {old['irq_exits'] / irqs:.2f} / {new['irq_exits'] / irqs:.4f} "
                   f"(AVIC's: the SVR write that enables the APIC)"),
    ]
    return Outcome(
        comparisons=comps,
        columns=["exits", PRE_2008.name, MODERN.name, "reduction"],
        rows=rows,
        data={"params": p, "interrupts": irqs, "period_ns": PERIOD_NS, "vector": VECTOR, "runs": res,
              "reduction_io_pct": red_io, "reduction_cpu_pct": red_cpu, "reduction_pct": red_all},
        checks=checks,
        notes=[f"pre-2008: shadow paging, TLB flush on every world switch, every MSR and port trapped, 16550 UART, "
               f"injected interrupts (INTR exit, EVENTINJ, the EOI a shadow #PF emulated against the xAPIC); "
               f"modern: NPT with A/D bits, ASIDs, TSC_AUX passed by the MSRPM, IOPM on the platform's ports, "
               f"virtio console, AVIC. {p['rounds']} rounds of {p['syscalls']} system calls, {p['pages']} pages, "
               f"{p['bytes']} console bytes and {p['irqs_per_round']} device interrupts (one every "
               f"{PERIOD_NS // 1000} us of guest time)."])


def plot(data: dict[str, Any], path) -> None:
    plt = pyplot()
    runs = data["runs"]
    names = [fs.name for fs in SETS]
    cpu = [runs[n]["lambda_cpu"] / 1e3 for n in names]
    irq = [runs[n]["lambda_io_irq"] / 1e3 for n in names]
    dev = [runs[n]["lambda_io"] / 1e3 - i for n, i in zip(names, irq)]
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    ax.bar(names, cpu, 0.55, color=AFTER, label="lambda_cpu (instructions, paging)")
    ax.bar(names, dev, 0.55, bottom=cpu, color=BEFORE, label="lambda_io: device access (port I/O, MMIO)")
    ax.bar(names, irq, 0.55, bottom=[c + d for c, d in zip(cpu, dev)], color=BEFORE, hatch="//",
           edgecolor="white", label="lambda_io: interrupt delivery + EOI")
    for i in range(len(names)):
        ax.text(i, cpu[i] + dev[i] + irq[i], f"{cpu[i] + dev[i] + irq[i]:,.0f}k/s", ha="center", va="bottom",
                fontsize=9)
    ax.set_ylabel("#VMEXITs per second of guest time (thousands)")
    ax.set_title("lambda = lambda_cpu + lambda_io" + subtitle(data))
    ax.text(0.98, 0.55, f"I/O component: -{data['reduction_io_pct']:.1f} %\n(seed: >= 60 %)\n"
            f"CPU component: -{data['reduction_cpu_pct']:.1f} %\n"
            f"{data['interrupts']:,} interrupts handled in each", transform=ax.transAxes, ha="right", fontsize=9,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"})
    ax.legend(fontsize=8, loc="upper right")
    save(fig, path)


EXPERIMENT = Experiment(
    name="exit-model",
    title="The exit-rate model: lambda = lambda_cpu + lambda_io, pre-2008 vs modern features",
    source="seed 000, The Art of Fine-Tuning (the exit-rate model)",
    claim="modern features reduce the I/O component of the exit rate by 60 % or more",
    steps=_steps, run=run_experiment, plot=plot)
