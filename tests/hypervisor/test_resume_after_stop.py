"""A run that stops without a #VMEXIT -- its instruction budget, the wall
clock, a debugger -- leaves the guest state in the VMCB, so the next run()
continues the guest where it stopped: run in slices, a guest does exactly what
it does in one run (same exits, console, registers, DRAM). The reference is
the same image run once."""
from __future__ import annotations

from pathlib import Path

import pytest

from sandbox import Machine

IMAGES = Path(__file__).resolve().parents[2] / "guest_images"


def sliced(image: str, step: int) -> tuple[Machine, list, dict, str, int]:
    m = Machine()
    m.load(str(IMAGES / image))
    counts: dict = {}
    console, runs = "", 0
    while True:
        r = m.run(max_insns=step, timeout=30)
        runs += 1
        console += r.console
        for k, v in r.counts.items():
            counts[k] = counts.get(k, 0) + v
        if r.reason != "insn-budget":
            return m, r, counts, console, runs
        assert runs < 100_000


@pytest.mark.parametrize("image, step", [("hello.S", 1), ("hello.S", 7), ("kernel.S", 97)])
def test_a_guest_run_in_budget_slices_is_the_same_run(image, step):
    ref = Machine()
    ref.load(str(IMAGES / image))
    r0 = ref.run(timeout=30)
    m, r, counts, console, runs = sliced(image, step)
    assert runs > 10
    assert (r.reason, r.exit_code) == (r0.reason, r0.exit_code)
    assert counts == r0.counts and console == r0.console
    assert r.regs == r0.regs and r.rip == r0.rip
    # hello.S stores into its own (scanned) code page: each such store is one instruction, not zero
    assert bytes(m.mem.dump()) == bytes(ref.mem.dump())


def test_the_vmcb_holds_the_stopped_guest():
    m = Machine()
    m.load(str(IMAGES / "hello.S"))
    r = m.run(max_insns=1)
    assert r.reason == "insn-budget"
    # hello.S starts with lea rsi, [rip + msg] (7 bytes): the VMCB's RIP is the next instruction
    assert m.guest.vmcb.RIP == r.rip == 0x100007
