"""PAUSE intercept filtering (APM vol. 2 §15.14.4): the count lets that many
intercepted PAUSEs run, and the (count+1)th exits -- the reading Bochs takes of
the manual's two statements; the threshold restarts the count after a wait
longer than it, in guest time (one cycle per retired instruction).

Expected values are counted from the guest's own code: RCX holds how many
PAUSEs are left when one exits, so the exit's PAUSE number is computed here
from the loop, not read from the model."""
from __future__ import annotations

import pytest

from conftest import capture, hc_exit

PAUSE, DONE = 0x77, 0x55


def spin(pauses: int, wait: int = 0, again: int = 0) -> str:
    """``pauses`` PAUSEs; then (when ``again``) a loop of ``wait`` iterations (two
    instructions each) and ``again`` PAUSEs more; then the EXIT hypercall."""
    src = f"""
    mov ecx, {pauses}
spin1:
    pause
    dec ecx
    jnz spin1
"""
    if again:
        src += f"""
    mov edx, {max(wait, 1)}
wait:
    dec edx
    jnz wait
    mov ecx, {again}
spin2:
    pause
    dec ecx
    jnz spin2
"""
    return src + hc_exit(DONE)


def run(guest, src: str, count: int, threshold: int = 0, intercept: bool = True):
    m = guest(src)
    if intercept:
        m.intercept("pause")
    v = m.guest.vmcb
    v.PAUSE_FILTER_COUNT, v.PAUSE_FILTER_THRESHOLD = count, threshold
    exits = capture(m, PAUSE)
    r = m.run(timeout=30)
    if not exits:                                  # no PAUSE exit: the guest ran to its EXIT hypercall
        assert r.reason == "guest-exit" and r.exit_code == DONE, (r.reason, r.detail)
        return m, None
    assert len(exits) == 1 and exits[0].code == PAUSE
    return m, exits[0]


@pytest.mark.parametrize("pauses,count", [(10, 9), (10, 10), (5, 0), (1, 0), (20, 21), (30, 7)])
def test_the_pause_after_count_of_them_exits(guest, pauses, count):
    m, e = run(guest, spin(pauses), count)
    if pauses > count:
        assert e is not None
        left = m.regs.rcx                        # the exiting PAUSE has not run: RCX counts it
        assert pauses - left + 1 == count + 1    # it is PAUSE number count+1
    else:
        assert e is None                          # the filter let every one of them run


def test_count_is_ignored_without_the_intercept(guest):
    _, e = run(guest, spin(10), 3, intercept=False)
    assert e is None


def test_every_vmrun_starts_the_count_again(guest):
    """The handler resumes the guest after each PAUSE exit: each VMRUN reloads
    the counter, so every (count+1)th PAUSE exits."""
    m = guest(spin(40))
    m.intercept("pause")
    m.guest.vmcb.PAUSE_FILTER_COUNT = 4
    at = []

    @m.on(PAUSE)
    def h(m, e):
        at.append(m.regs.rcx)
        m.advance(e)

    m.run(timeout=30)
    # PAUSE numbers 5, 10, 15 ... exit: RCX is 40 - n + 1 at PAUSE number n
    assert at == [40 - n + 1 for n in range(5, 41, 5)]


@pytest.mark.parametrize("wait,threshold,exits", [
    (1000, 10, False),      # ~2,000 instructions between the runs of PAUSEs: the count starts again
    (10, 1000, True),       # ~20 instructions: under the threshold, the count goes on
    (1000, 0, True),        # no threshold: nothing restarts the count
])
def test_threshold_restarts_the_count_after_a_wait(guest, wait, threshold, exits):
    # kvm-unit-tests' pause_filter_run_test(20, 21, wait, threshold): 20 + 20 PAUSEs, count 21
    m, e = run(guest, spin(20, wait, 20), 21, threshold)
    assert (e is not None) is exits
    if exits:
        assert m.regs.rcx == 20 - (21 - 20)      # the second run's second PAUSE is number 22 of the count


def test_close_pauses_in_one_loop_never_reset(guest):
    """Consecutive PAUSEs three instructions apart are within any threshold >= 3."""
    m, e = run(guest, spin(50), 30, threshold=3)
    assert e is not None and 50 - m.regs.rcx + 1 == 31


def test_pauses_farther_apart_than_the_threshold_never_exit(guest):
    """PAUSE, DEC, JNZ: three instructions from one PAUSE to the next, more than a threshold of 2."""
    _, e = run(guest, spin(50), 30, threshold=2)
    assert e is None
