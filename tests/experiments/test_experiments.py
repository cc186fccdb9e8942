"""Every experiment in --quick mode: its files, and its key relation checked
against values derived here -- from the guest's parameters, the seed's
arithmetic, the virtio spec or a recomputation of the guest's own
arithmetic -- never from the experiment's own checks.  Each experiment runs
once per test session (a module-scoped fixture)."""
from __future__ import annotations

import json
import struct

import matplotlib
import pytest

from sandbox.experiments.common import machine, run
from sandbox.experiments.registry import EXPERIMENTS, execute
from sandbox.hypervisor.virtio import VirtioConsole

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402  (after choosing the backend)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"        # PNG spec §5.2
M64 = (1 << 64) - 1


@pytest.fixture
def report(tmp_path):
    """``report(name)``: run one experiment in --quick mode, check its files, return its data."""
    def get(name: str) -> dict:
        rep = execute(EXPERIMENTS[name], True, tmp_path / name)
        check_files(rep, name)
        return rep.outcome.data
    return get


def lcg_payload(n: int) -> bytes:
    """virtio_console.S / mixed_workload.S's payload, from the formula in their header."""
    x, out = 0x12345678, bytearray()
    for _ in range(n):
        x = (x * 1103515245 + 12345) % 2**32
        out.append(0x30 + ((x >> 16) & 0x3F))
    return bytes(out)


# ------------------------------------------------------------------ files, for every experiment
def check_files(rep, name: str) -> None:
    """A valid PNG that matplotlib reads back, and the JSON document (each
    experiment's test calls this, so every experiment runs once)."""
    assert rep.outcome.ok, {k: v for k, v in rep.outcome.checks.items() if not v}
    png = rep.png_path.read_bytes()
    assert png[:8] == PNG_SIGNATURE
    # the IHDR chunk comes first: 13 bytes, width and height big-endian (PNG spec §11.2.2)
    length, kind, width, height = struct.unpack(">I4sII", png[8:24])
    assert (length, kind) == (13, b"IHDR") and width > 200 and height > 200
    img = mpimg.imread(rep.png_path)
    assert img.shape[:2] == (height, width)
    doc = json.loads(rep.json_path.read_text())
    assert doc["experiment"] == name and doc["quick"] is True and doc["ok"] is True
    assert doc["comparisons"] and doc["table"]["rows"] and doc["data"]
    assert not list(rep.json_path.parent.glob(".*partial*"))


def test_every_experiment_has_a_test():
    tested = {"msr-bitmap", "virtio", "io-dirty", "walk-refs", "asid-flush", "shadow-nested", "exit-model",
              "popek-goldberg", "nested-tsc", "avic"}
    assert set(EXPERIMENTS) <= tested


# ------------------------------------------------------------------ key relations
def test_msr_bitmap_intercepted_n_exits_passthrough_none(report):
    data = report("msr-bitmap")
    n = data["calls_per_run"]
    for p in data["points"]:
        i, t = p["intercepted"], p["passthrough"]
        assert i["tsc_aux_write_exits"] == n and i["calls"] == n        # one per system call
        assert t["tsc_aux_write_exits"] == 0
        # the guest's checksum recomputed from msr_syscalls.S: r = r*31 + k for k = W..1, per call,
        # then + TSC_AUX read back = the last value written, (N - 1) & 0xFFF
        w, r = i["work"], 0
        for _ in range(n):
            for k in range(w, 0, -1):
                r = (r * 31 + k) & M64
        want = (r + ((n - 1) & 0xFFF)) & M64
        assert int(i["checksum"], 16) == int(t["checksum"], 16) == want
        # exits per second of guest time: intercepted about the system-call rate, passthrough none
        assert i["exit_rate"] >= i["syscall_rate"] and t["exit_rate"] == 0


def test_virtio_fewer_exits_per_kib_than_the_uart_same_bytes(report):
    series = report("virtio")["series"]
    uart, single, batched = series["uart"], series["virtio, notify per buffer"], \
        series["virtio, batched (64 per notify)"]
    for u, s, b in zip(uart, single, batched):
        n = u["bytes"]
        assert u["ioio"] == 2 * n                     # LSR poll + THR write per byte; LSR always ready
        assert u["received_ok"] and s["received_ok"] and b["received_ok"]
        assert u["received"] == s["received"] == b["received"] == n
        buffers = -(-n // 1024)
        assert s["notifies"] == buffers and b["notifies"] == -(-buffers // 64)
        assert b["exits_per_kib"] <= s["exits_per_kib"] < u["exits_per_kib"] == 2048


def test_virtio_device_output_is_the_guest_payload():
    """One small run, the device's bytes against this file's own LCG."""
    m = machine("virtio_console.S", [3000, 2, 512, 4], ram=4 << 20)
    dev = VirtioConsole(m.guest)
    m.map_mmio(0x1F0000, 0x1000, dev)
    r = run(m)
    assert bytes(dev.output) == lcg_payload(3000)
    assert dev.stats.notifies == 2                    # 6 buffers of 512 bytes (the last 440), 4 per notify
    assert r.result.counts[0x400] == dev.stats.register_reads + dev.stats.register_writes


def test_io_dirty_trap_vs_poll(report):
    data = report("io-dirty")
    reads = data["reads"]
    writes = reads * 3 // 100                          # the seed's 1,000,000 : 30,000
    assert data["commands"] == writes
    assert data["trap"]["exits"] == reads + writes     # the seed's 1,000,000 + 30,000, scaled
    for p in data["poll"]:
        ticks = p["guest_ns"] // int(p["period_ms"] * 1e6)
        assert p["npf"] == 2 and p["ticks"] == ticks   # the seed's 2 + 1,000 for one second at 1 ms
        assert p["commands_seen"] == writes
        if p["ticks"] >= 2:
            # issue times are estimated from the iteration number: within 1 us (100 instructions)
            assert -1_000 <= p["notice_min_ns"] and p["notice_max_ns"] <= p["period_ms"] * 1e6 + 1_000
    exits = [p["exits"] for p in data["poll"]]
    assert exits == sorted(exits, reverse=True)        # a longer period, fewer exits


EXPECTED_REFS = {("4K", "4K"): 24, ("4K", "2M"): 19, ("4K", "1G"): 14, ("2M", "4K"): 19, ("2M", "2M"): 15,
                 ("2M", "1G"): 11, ("1G", "4K"): 14, ("1G", "2M"): 11, ("1G", "1G"): 8}


def test_walk_refs_match_the_derived_counts(report):
    """n(m+1) + m references for n guest and m nested levels (4/3/2 levels for 4K/2M/1G)."""
    cells = report("walk-refs")["cells"]
    assert {(c["guest"], c["nested"]) for c in cells} == set(EXPECTED_REFS)
    for c in cells:
        want = EXPECTED_REFS[(c["guest"], c["nested"])]
        assert c["walker"]["refs_per_walk"] == want
        if c["nested"] != "1G":
            assert c["run"]["refs_per_walk"] == want and c["run"]["walks"] == 16


def test_asid_flush_walks_per_exit(report):
    for pt in report("asid-flush")["points"]:
        f, t = pt["flush"], pt["tagged"]
        p, rounds = f["pages"], f["rounds"]
        assert f["exits"] == t["exits"] == rounds + 1                 # CPUID per round + EXIT
        assert f["walks"] >= rounds * (p + 1)                          # code page + P pages, every round
        assert t["walks"] < p + 16                                     # once each, plus start-up pages


def test_shadow_vs_nested_on_kernel(report):
    runs = report("shadow-nested")["runs"]
    n, s = runs["nested"], runs["shadow"]
    assert n["console"] == s["console"] and "kernel" in n["console"].lower()
    assert s["by_code"].get("EXCP_PF", 0) > 0 and "EXCP_PF" not in n["by_code"]
    assert n["by_code"]["IOIO"] == s["by_code"]["IOIO"]               # the same console traffic
    assert n["walk"]["nested_pte_refs"] > 0 and s["walk"]["nested_pte_refs"] == 0


def test_exit_model_io_reduction_at_least_60_percent(report):
    """Derived from mixed_workload.S's parameters: R rounds of S system calls
    (a WRMSR each, CPUID every 8th), B console bytes (UART: an LSR read and a
    THR write each; virtio: one notify per round) and I device interrupts
    per round, plus one port read that starts the device.  Pre-2008 injects
    each interrupt (an INTR exit, one EVENTINJ) and traps its EOI (a shadow
    #PF at the xAPIC's EOI register, SDM Table 11-1: 0xFEE000B0, the guest
    mapping the page at its own address); AVIC delivers and completes it
    without an exit."""
    data = report("exit-model")
    p, old, new = data["params"], data["runs"]["pre-2008"], data["runs"]["modern"]
    calls = p["rounds"] * p["syscalls"]
    irqs = p["rounds"] * p["irqs_per_round"]
    assert irqs > 0
    assert old["by_code"]["MSR"] == calls and "MSR" not in new["by_code"]      # TSC_AUX per call
    assert old["by_code"]["CPUID"] == new["by_code"]["CPUID"] == calls // 8    # every 8th call
    assert old["by_code"]["IOIO"] == 2 * p["rounds"] * p["bytes"] + 1          # UART: 2 per byte; device start
    assert new["notifies"] == p["rounds"] and new["by_code"]["IOIO"] == 1      # virtio; device start
    # the same interrupts handled (and EOI'd) by the guest under both feature sets
    for run_ in (old, new):
        assert run_["irqs_raised"] == run_["irqs_handled"] == run_["eois_written"] == irqs
    # pre-2008: an INTR exit, an injected event and a trapped EOI per interrupt
    assert old["by_code"]["INTR"] >= irqs and old["injected"] == irqs and old["eoi_exits"] == irqs
    assert old["by_code"]["EXCP_PF (MMIO)"] >= irqs                            # the EOIs, TPR and SVR
    # AVIC: no exit per interrupt -- no INTR, no EOI exit, nothing injected; at most set-up exits
    assert "INTR" not in new["by_code"] and "VINTR" not in new["by_code"]
    assert new["eoi_exits"] == 0 and new["injected"] == 0 and new["avic_delivered"] == irqs
    assert new["by_code"].get("AVIC_NOACCEL", 0) <= 1                          # the SVR write that enables it
    # each round's address-space switch, and the reload after mapping the APIC
    assert old["by_code"]["CR3_WRITE"] == p["rounds"] + 1 and "CR3_WRITE" not in new["by_code"]
    assert old["checksum"] == new["checksum"] and old["console_ok"] and new["console_ok"]
    reduction = 1 - (new["io_exits"] / new["guest_ns"]) / (old["io_exits"] / old["guest_ns"])
    assert reduction >= 0.60                                                   # the seed's claim
    assert abs(100 * reduction - data["reduction_io_pct"]) < 1e-6


def test_popek_goldberg_classic_breaks_svm_holds(report):
    """The values a ring-0 kernel sees after pg_probe.S's set-up, from its own constants:
    GDTR (0x60000, 0x37), IDTR (0x61000, 0xFFF), LDTR 0x18, TR 0x28, MSW = the
    loader's CR0 0x80010033 with TS (bit 3), IF 0 after CLI and 1 after POPF of
    0x202, LAR of 0x00AF9B000000FFFF = bits 55:40 of it masked 0x00F0FF00, the
    TSS limit 0x67, CS 0x08 and SS 0x10 with RPL 0."""
    rows = {r["instruction"]: r for r in report("popek-goldberg")["rows"]}
    want = {"SGDT": "base 0x60000, limit 0x37", "SIDT": "base 0x61000, limit 0xfff", "SLDT": "0x18",
            "STR": "0x28", "SMSW": f"{(0x80010033 | 8) & 0xFFFF:#06x}", "PUSHF after CLI (IF)": "IF=0",
            "POPF of IF=1 (the VM's IF)": "IF=1", "LAR 0x08": "ZF=1, 0x00a09b00", "LSL 0x28": "ZF=1, 0x67",
            "VERR 0x08": "ZF=1", "VERW 0x10": "ZF=1", "MOV from CS (RPL)": "0x8 (RPL 0)",
            "MOV from SS (RPL)": "0x10 (RPL 0)"}
    svm_exits = {"SGDT": "GDTR_READ", "SIDT": "IDTR_READ", "SLDT": "LDTR_READ", "STR": "TR_READ",
                 "SMSW": "CR0_READ", "PUSHF after CLI (IF)": "PUSHF", "POPF of IF=1 (the VM's IF)": "POPF"}
    for name, real in want.items():
        r = rows[name]
        assert r["svm_saw"] == real, name                          # SVM: what ring 0 sees
        assert r["classic_trap"] == "" and r["classic_saw"] != real and r["breaks"], name
        assert r["svm_exit"] == svm_exits.get(name, ""), name      # the APM's intercept, or none exists
    # classic: the kernel saw the monitor's tables and its ring-3 selectors
    assert rows["SGDT"]["classic_saw"] == "base 0xff000, limit 0xfff"
    assert rows["MOV from CS (RPL)"]["classic_saw"].endswith("(RPL 3)")
    for name in ("LGDT", "LIDT", "LLDT", "LTR", "MOV to CR0", "CLI"):
        assert rows[name]["classic_trap"] == "EXCP_GP", name


def test_nested_tsc_each_level_adds_its_offset(report):
    """APM §15.30.4: RDTSC returns TSC + TSC_OFFSET; L0 runs L2 on L1's offset
    plus L2's.  Recomputed here from the raw readings and the configured
    offsets: the host TSC is monotonic, so h0 <= a - d1 <= b - d1 - d2 <=
    c - d1 <= h1 exactly, and leaving out either offset breaks it."""
    data = report("nested-tsc")
    assert len(data["runs"]) >= 2
    for p in data["runs"]:
        d1, d2 = p["d1"], p["d2"]
        assert p["rounds"] == len(p["records"]) >= 3 and p["vmcb12_tsc_offset"] == d2
        assert p["by_code"]["VMRUN"] == p["rounds"]                 # one L1 VMRUN per round
        for r in p["records"]:
            h0, a, b, c, h1 = r["h0"], r["l1_a"], r["l2"], r["l1_c"], r["h1"]
            rel = [(x - h0) & M64 for x in (a - d1, b - d1 - d2, c - d1, h1)]
            assert rel == sorted(rel) and rel[-1] < 1 << 40
            # without d2 (L1's offset not applied to L2) or without d1, L2's reading leaves the bracket
            assert not 0 <= (b - d1 - h0) & M64 <= rel[-1]
            assert not 0 <= (b - d2 - h0) & M64 <= rel[-1]


def test_avic_fewer_exits_same_handled_count(report):
    """Seeds 000/002: AVIC delivers interrupts without exits.  Derived: the device
    raises N; injection costs an INTR exit and a trapped EOI (NPF at the xAPIC's
    EOI register, SDM Table 11-1: 0xFEE000B0) per interrupt; AVIC neither."""
    data = report("avic")
    n = data["interrupts"]
    inj, av = data["runs"]["injection"], data["runs"]["avic"]
    assert inj["handled"] == av["handled"] == n and inj["eois"] == av["eois"] == n
    assert av["exits"] < inj["exits"]
    assert inj["by_code"]["INTR"] >= n and inj["eoi_exits"] == n
    assert inj["exits"] >= 2 * n
    assert "INTR" not in av["by_code"] and av["eoi_exits"] == 0 and "NPF" not in av["by_code"]
    assert av["exits"] <= 3                    # SVR's trapped write, the device start, the guest's exit
    assert av["ppr_end"] == 0 == inj["ppr_end"]  # every in-service vector EOI'd
