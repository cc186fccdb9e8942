"""Paravirtual I/O: the same console payload through the emulated 16550
UART and through a virtio console (virtio-mmio version 2, split virtqueue).

Seed 002, "Putting It All Together": *"use highly optimized I/O paths like
paravirtualized virtio drivers ... By minimizing VM-Exits ... a guest can
run at near-native speed."*

``guest_images/virtio_console.S`` generates a payload in its memory and
sends it (a) byte by byte to COM1, polling the line status register first
-- two trapped port accesses per byte -- or (b) through
:class:`~sandbox.hypervisor.virtio.VirtioConsole`, an MMIO device whose
every register access is a VMEXIT_NPF but whose data path exits once per
notify: the driver queues buffers of 1 KiB and notifies once per buffer,
or once per batch of 64.  The device reads descriptors and data with
``Guest.read_phys``.

Expected (derived): the UART costs exactly 2 exits per byte (2,048 per
KiB); virtio costs its initialization's register accesses plus
ceil(buffers / batch) notifies; both deliver the same bytes, which equal
the guest's LCG recomputed here.
"""
from __future__ import annotations

import math
from typing import Any

from ..hypervisor.virtio import VirtioConsole
from ..svm.exitcodes import ExitCode
from .base import Comparison, Context, Experiment, Outcome, fmt
from .common import machine, results, run, split_exits
from .plotting import AFTER, BEFORE, THIRD, pyplot, save, subtitle

IMAGE = "virtio_console.S"
MMIO_GPA = 0x1F0000
BUFFER = 1024
#: (series, guest's "how" parameter, buffers per notify)
SERIES = (("uart", 1, 0), ("virtio, notify per buffer", 2, 1), ("virtio, batched (64 per notify)", 2, 64))
SIZES_FULL = (4096, 8192, 16384, 32768, 65536)
SIZES_QUICK = (1024, 4096)
SEED = 0x12345678


def payload(n: int) -> bytes:
    """The guest's payload, computed independently of the guest: its LCG."""
    x, out = SEED, bytearray()
    for _ in range(n):
        x = (x * 1103515245 + 12345) & 0xFFFF_FFFF
        out.append(0x30 + ((x >> 16) & 0x3F))
    return bytes(out)


def _sizes(quick: bool) -> tuple[int, ...]:
    return SIZES_QUICK if quick else SIZES_FULL


def _steps(quick: bool) -> int:
    return len(_sizes(quick)) * len(SERIES)


def measure(size: int, how: int, batch: int) -> dict[str, Any]:
    """Send ``size`` bytes one way; the exits and what the device received."""
    m = machine(IMAGE, [size, how, BUFFER, batch], ram=4 << 20)
    dev = VirtioConsole(m.guest)
    m.map_mmio(MMIO_GPA, 0x1000, dev)
    r = run(m)
    sent, notifies, buffers = results(m, 3)
    received = bytes(m.serial.output) if how != 2 else bytes(dev.output)
    cpu, io = split_exits(r.result.counts)
    return {"bytes": size, "sent": sent, "exits": r.exits, "io_exits": io,
            "ioio": r.result.counts.get(ExitCode.IOIO, 0), "npf": r.result.counts.get(ExitCode.NPF, 0),
            "notifies": dev.stats.notifies, "guest_notifies": notifies, "buffers": buffers,
            "register_accesses": dev.stats.register_reads + dev.stats.register_writes,
            "exits_per_kib": io / (size / 1024), "received_ok": received == payload(size),
            "received": len(received), "guest_ns": r.guest_ns, "wall_s": round(r.wall_s, 4), "by_code": r.by_code}


def run_experiment(ctx: Context) -> Outcome:
    sizes = _sizes(ctx.quick)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in SERIES}
    for size in sizes:
        for name, how, batch in SERIES:
            runs[name].append(measure(size, how, batch))
            ctx.step(f"{size // 1024} KiB {name}")
    uart, single, batched = (runs[name] for name, _, _ in SERIES)
    rows = []
    for u, s, b in zip(uart, single, batched):
        rows.append([f"{u['bytes'] // 1024} KiB", fmt(u["io_exits"]), fmt(s["io_exits"]), fmt(b["io_exits"]),
                     fmt(u["exits_per_kib"], 1), fmt(s["exits_per_kib"], 2), fmt(b["exits_per_kib"], 2),
                     f"{b['notifies']} of {b['register_accesses']}"])
    setup = batched[0]["register_accesses"] - batched[0]["notifies"]
    checks = {
        "UART: exactly 2 port exits per byte (LSR poll, THR write)": all(u["ioio"] == 2 * u["bytes"] for u in uart),
        "every way delivers the guest's payload, byte for byte": all(
            x["received_ok"] and x["sent"] == x["bytes"] for xs in runs.values() for x in xs),
        "virtio: one notify per batch": all(
            x["notifies"] == x["guest_notifies"] == math.ceil(math.ceil(x["bytes"] / BUFFER) / bt)
            for (_, _, bt), xs in zip(SERIES[1:], (single, batched)) for x in xs),
        "virtio: each MMIO register access is one NPF exit": all(
            x["npf"] == x["register_accesses"] for xs in (single, batched) for x in xs),
        "virtio: fewer exits per KiB than the UART": all(
            b["exits_per_kib"] <= s["exits_per_kib"] < u["exits_per_kib"] for u, s, b in zip(uart, single, batched)),
    }
    big_u, big_b = uart[-1], batched[-1]
    comps = [
        Comparison(f"exits to send {big_u['bytes'] // 1024} KiB: emulated UART / virtio (batched)",
                   "virtio minimizes VM-exits (no figure)",
                   f"{fmt(big_u['io_exits'])} / {fmt(big_b['io_exits'])}  "
                   f"({fmt(big_u['io_exits'] / big_b['io_exits'])}x fewer)",
                   f"virtio's count is {setup} initialization register accesses + {big_b['notifies']} notifies"),
        Comparison("exits per KiB, data path only", "",
                   f"UART {fmt(2048)}; virtio {fmt(1024 / BUFFER, 2)} (notify per buffer), "
                   f"{fmt(1024 / BUFFER / 64, 3)} (batched)",
                   "derived: 2 per byte; one notify per buffer or per 64 buffers of 1 KiB"),
    ]
    return Outcome(
        comparisons=comps,
        columns=["payload", "UART exits", "virtio exits (per buffer)", "virtio exits (batched)",
                 "UART exits/KiB", "virtio/KiB (per buffer)", "virtio/KiB (batched)", "notifies of register exits"],
        rows=rows,
        data={"buffer_bytes": BUFFER, "mmio_gpa": MMIO_GPA, "series": runs},
        checks=checks,
        notes=["Exits counted are the I/O exits (IOIO for the UART, NPF for the virtio-mmio registers); each run "
               "also ends with one EXIT hypercall.",
               "The virtio device raises no interrupt (it is not wired to the PC platform's APIC): the driver "
               "polls the used ring, which costs no exit."])


def plot(data: dict[str, Any], path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, _, _), colour, mark in zip(SERIES, (BEFORE, THIRD, AFTER), "o^s"):
        xs = data["series"][name]
        ax.plot([x["bytes"] / 1024 for x in xs], [x["exits_per_kib"] for x in xs], mark + "-", color=colour,
                label=name)
    sizes = [x["bytes"] / 1024 for x in data["series"][SERIES[0][0]]]
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("payload (KiB)")
    ax.set_ylabel("#VMEXITs per KiB sent")
    ax.set_title("Console output: emulated 16550 vs virtio-mmio" + subtitle(data))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save(fig, path)


EXPERIMENT = Experiment(
    name="virtio",
    title="Paravirtual I/O: the same payload through an emulated 16550 and a virtio console",
    source="seed 002, Putting It All Together",
    claim="paravirtualized virtio drivers minimize VM-exits on the I/O path",
    steps=_steps, run=run_experiment, plot=plot)
