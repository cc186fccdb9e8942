"""Interrupts without exits: a device raising interrupts, injected by the
hypervisor vs delivered by AVIC.

Seed 000, "Virtualizing the Unseen": *"Advanced features like APICv and AVIC
do the same for hardware interrupts, delivering them directly to guests
without exits in many cases."*  Seed 002: *"Delivering an interrupt to a
guest used to require a VM-Exit. AMD's Advanced Virtual Interrupt Controller
(AVIC) ... allow[s] the hardware to inject many interrupts directly into the
guest without any hypervisor involvement."*

``guest_images/avic_irq.S`` enables its local APIC (xAPIC MMIO), starts the
device and spins with interrupts enabled until it has handled N; its handler
counts and writes EOI.  The device runs on another host processor
(:meth:`~sandbox.svm.cpu.SvmCpu.schedule_remote`) and raises its vector every
:data:`PERIOD_NS` of guest time, two ways:

``injection``
    the classic path: the device sets the vector in the hypervisor's APIC
    model and kicks the vCPU's processor with an IPI -- #VMEXIT(INTR); the PC
    platform injects the vector through the VMCB (EVENTINJ, or V_IRQ with a
    VINTR window while RFLAGS.IF = 0), and the handler's EOI write is a
    trapped MMIO access (VMEXIT_NPF): two exits per interrupt;
``avic``
    AVIC (APM §15.29): the device sets the vector in the backing page's IRR
    and rings the doorbell of the processor the vCPU runs on; the processor
    delivers it through the guest IDT and completes the EOI itself.

Expected (derived): the same N handled both ways; N INTR exits and N EOI
exits with injection, none of either with AVIC (whose only exit is the
trapped SVR write that enables the APIC, APM Table 15-22).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..hypervisor.avic import AvicApic, enable_avic
from ..hypervisor.platform.apic import EOI as EOI_OFFSET
from ..hypervisor.platform.apic import XAPIC_BASE
from ..svm.exitcodes import ExitCode
from ..svm.stop import StopReason
from .base import Comparison, Context, Experiment, Outcome, fmt
from .common import machine, results, run
from .plotting import AFTER, BEFORE, pyplot, save, subtitle

if TYPE_CHECKING:
    from ..hypervisor.machine import Machine

IMAGE = "avic_irq.S"
MODES = ("injection", "avic")
VECTOR = 0x41
#: the device's port: a read starts it (the guest is ready for interrupts)
DEVICE_PORT = 0xE0
#: the device raises an interrupt every 20 us of guest time (2,000 guest instructions)
PERIOD_NS = 20_000


def _n(quick: bool) -> int:
    return 300 if quick else 10_000


def _steps(quick: bool) -> int:
    return len(MODES)


class IrqDevice:
    """A device on another host processor: started by a port read, it raises
    ``count`` interrupts, one every ``period_ns`` of guest time, by ``raise_irq``."""

    def __init__(self, m, count: int, raise_irq: Callable[[], None], period_ns: int = PERIOD_NS) -> None:
        self.m, self.count, self.raise_irq, self.period_ns = m, count, raise_irq, period_ns
        self.raised = 0

    def owns(self, port: int) -> bool:
        return port == DEVICE_PORT

    def read(self, port: int, size: int) -> int:
        if not self.raised:
            self.m.cpu.schedule_remote(self.period_ns, self._tick)
        return 0

    def write(self, port: int, size: int, value: int) -> None:
        pass

    def _tick(self) -> None:
        if self.raised >= self.count:
            self.m.cpu.schedule_remote(0, None)
            return
        self.raised += 1
        self.raise_irq()


def connect(m: "Machine", mode: str, vector: int, count: int, period_ns: int = PERIOD_NS
            ) -> tuple[IrqDevice, AvicApic | None]:
    """Attach an :class:`IrqDevice` raising ``vector`` to ``m`` (PC platform,
    after ``m.load``), delivered as ``mode`` says: ``"injection"`` (the APIC
    model's IRR and an IPI, #VMEXIT(INTR); the platform injects) or ``"avic"``
    (the backing page's IRR and a doorbell).  Returns the device and the AVIC
    state (None for injection)."""
    if mode not in MODES:
        raise ValueError(f"interrupt delivery must be one of {', '.join(MODES)}, not {mode!r}")
    m.intercept("intr")
    av = None
    if mode == "avic":
        av = enable_avic(m)
        raise_irq = lambda: av.post(vector)           # noqa: E731  IRR + doorbell
    else:
        apic = m.platform.apic

        def raise_irq() -> None:
            apic.set_irr(vector)                      # the hypervisor's APIC model
            m.cpu.kick()                              # an IPI to the vCPU's processor: #VMEXIT(INTR)
    dev = IrqDevice(m, count, raise_irq, period_ns)
    m.bus.attach(dev)
    m.guest.iopm.set(DEVICE_PORT, True)
    return dev, av


def measure(mode: str, n: int) -> dict[str, Any]:
    m = machine(IMAGE, [n, VECTOR], ram=4 << 20, platform="pc")
    dev, av = connect(m, mode, VECTOR, n)
    eoi = [0]

    def count(rec) -> None:
        if rec.exitcode == ExitCode.NPF and rec.exitinfo2 == XAPIC_BASE + EOI_OFFSET:
            eoi[0] += 1
    m.on_exit_record = count
    r = run(m, ok=lambda r: r.reason == StopReason.GUEST_EXIT and r.exit_code == 0)
    handled, eois, spins, ppr = results(m, 4)
    eoi_exits = eoi[0]
    out = {"mode": mode, "raised": dev.raised, "handled": handled, "eois": eois, "spins": spins, "ppr_end": ppr,
           "exits": r.exits, "by_code": r.by_code, "eoi_exits": eoi_exits, "guest_ns": r.guest_ns,
           "wall_s": round(r.wall_s, 4), "injected": dict(m.platform.injected)}
    if mode == "avic":
        out["avic"] = m.cpu.avic.stats.snapshot()
        out["avic_hypervisor"] = dict(av.stats)
    return out


def run_experiment(ctx: Context) -> Outcome:
    n = _n(ctx.quick)
    res = {}
    for mode in MODES:
        res[mode] = measure(mode, n)
        ctx.step(mode)
    inj, av = res["injection"], res["avic"]
    codes = sorted(set(inj["by_code"]) | set(av["by_code"]))
    rows = [[c, fmt(inj["by_code"].get(c, 0)), fmt(av["by_code"].get(c, 0))] for c in codes]
    rows += [["all exits", fmt(inj["exits"]), fmt(av["exits"])],
             ["exits per interrupt", f"{inj['exits'] / n:.2f}", f"{av['exits'] / n:.4f}"],
             ["interrupts raised / handled", f"{fmt(inj['raised'])} / {fmt(inj['handled'])}",
              f"{fmt(av['raised'])} / {fmt(av['handled'])}"],
             ["EOIs written / trapped", f"{fmt(inj['eois'])} / {fmt(inj['eoi_exits'])}",
              f"{fmt(av['eois'])} / {fmt(av['eoi_exits'])}"],
             ["delivered by the processor from the virtual IRR", "-", fmt(av["avic"]["delivered"])],
             ["doorbells received", "-", fmt(av["avic"]["doorbells_received"])],
             ["wall s", f"{inj['wall_s']:.2f}", f"{av['wall_s']:.2f}"]]
    checks = {
        "both handled every interrupt raised": inj["handled"] == av["handled"] == n == inj["raised"] == av["raised"],
        "AVIC: fewer exits than injection": av["exits"] < inj["exits"],
        "injection: an INTR exit per interrupt and a trapped EOI per interrupt":
            inj["by_code"].get("INTR", 0) >= n and inj["eoi_exits"] == n,
        "AVIC: no INTR exit, no EOI exit, every interrupt delivered from the IRR":
            "INTR" not in av["by_code"] and av["eoi_exits"] == 0 and av["avic"]["delivered"] == n,
    }
    comps = [
        Comparison("exits to deliver and complete an interrupt: injection / AVIC",
                   "\"delivering them directly to guests without exits in many cases\"",
                   f"{inj['exits'] / n:.2f} / {av['exits'] / n:.4f}  ({fmt(inj['exits'])} / {fmt(av['exits'])} "
                   f"exits for {fmt(n)} interrupts)",
                   "AVIC's exits are set-up, not per interrupt: the SVR write that enables the APIC traps "
                   "(AVIC_NOACCEL), and two port accesses (device start, guest exit)"),
        Comparison("interrupts handled by the guest: injection / AVIC", "the same", f"{fmt(inj['handled'])} / "
                   f"{fmt(av['handled'])}"),
    ]
    return Outcome(
        comparisons=comps, columns=["exit / measure", "injection (INTR + EVENTINJ, trapped EOI)", "AVIC"],
        rows=rows, data={"interrupts": n, "period_ns": PERIOD_NS, "vector": VECTOR, "runs": res}, checks=checks,
        notes=["The device runs on another host processor: its interrupts reach the vCPU as an IPI (#VMEXIT(INTR)) "
               "without AVIC, as a doorbell with it.  Guest time is retired instructions at 100 MIPS."])


def plot(data: dict[str, Any], path) -> None:
    plt = pyplot()
    runs = data["runs"]
    inj, av = runs["injection"], runs["avic"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    codes = sorted(set(inj["by_code"]) | set(av["by_code"]))
    x = range(len(codes))
    ax1.bar([i - 0.2 for i in x], [max(inj["by_code"].get(c, 0), 0.8) for c in codes], 0.4, color=BEFORE,
            label="injection (INTR exit + EVENTINJ, trapped EOI)")
    ax1.bar([i + 0.2 for i in x], [max(av["by_code"].get(c, 0), 0.8) for c in codes], 0.4, color=AFTER,
            label="AVIC (doorbell, accelerated EOI)")
    ax1.set_xticks(list(x), codes, fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("#VMEXITs (0 drawn at 0.8)")
    ax1.set_title(f"exits by code, {data['interrupts']:,} device interrupts")
    ax1.legend(fontsize=8)
    ax2.bar([0, 1], [inj["handled"], av["handled"]], color=[BEFORE, AFTER])
    ax2.set_xticks([0, 1], ["injection", "AVIC"])
    ax2.set_ylabel("interrupts handled by the guest")
    ax2.set_title("the guest's count: equal")
    for i, v in enumerate((inj["handled"], av["handled"])):
        ax2.text(i, v, f"{v:,}", ha="center", va="bottom", fontsize=9)
    fig.suptitle("Interrupts without exits: AVIC vs injection" + subtitle(data))
    save(fig, path)


EXPERIMENT = Experiment(
    name="avic",
    title="AVIC: a device's interrupts delivered without exits, against injection with an exit per interrupt and EOI",
    source="seed 000, Virtualizing the Unseen; seed 002, Advanced Interrupt Handling",
    claim="AVIC delivers interrupts directly to the guest without exits",
    steps=_steps, run=run_experiment, plot=plot)
