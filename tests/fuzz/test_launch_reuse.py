"""VMRUN from the restored snapshot reuses its last full guest-state load.

Every fuzz case VMRUNs the same VMCB state from the same restored host
context, so the world switch keeps the processor state its last full load
produced and, for the same VMCB fields onto the same prior state, copies it in
at once (with the case's RAX and RSP).  The reused load must leave exactly
what the field-by-field load leaves: a harness that ran another case first (and
reuses) ends each case in the same processor state as a fresh harness running
that case alone (which loads field by field).
"""
from __future__ import annotations

from sandbox.fuzz.case import Case, VmcbConfig
from sandbox.fuzz.generate import TERMINATOR
from sandbox.fuzz.snapshot import Harness
from sandbox.svm import world_switch as W

#: intercepts: the exception vector (#UD, #GP, #PF) and VMRUN, SHUTDOWN and VMMCALL
_CFG = VmcbConfig([0, 0, (1 << 6) | (1 << 13) | (1 << 14), 1 << 31, 3, 0], [], [], [])
# mov rbx, rax; add rbx, rsp; pushfq; pop rcx; then the terminator (VMMCALL)
_BODY = bytes.fromhex("4889c3" "4801e3" "9c" "59")


def _case(rax: int, rsp: int, code: bytes = _BODY) -> Case:
    return Case(code + TERMINATOR, 0, _CFG, {"rax": rax, "rsp": rsp, "rdx": 0x1234}, "test")


def _end_state(h: Harness, case: Case) -> tuple:
    """The run's result and the processor's whole context when it ended."""
    out = h.run(case)
    st = h.cpu.st
    r = out.result
    return (str(r.reason), r.regs, r.rip, r.rflags, [(e.exitcode, e.rip) for e in out.exits],
            st.data.tobytes())


def _count_full_loads(monkeypatch) -> list[int]:
    n = [0]
    orig = W.WorldSwitch._full_load

    def counted(self, v):
        n[0] += 1
        return orig(self, v)
    monkeypatch.setattr(W.WorldSwitch, "_full_load", counted)
    return n


def test_reused_load_ends_cases_as_a_fresh_load(monkeypatch):
    loads = _count_full_loads(monkeypatch)
    warm = Harness()
    _end_state(warm, _case(1, 0x7000))
    first = loads[0]
    assert first >= 1
    cases = [_case(0x1111, 0x6FF8), _case(0xFFFF_FFFF_FFFF_FFF0, 0x5008),
             _case(7, 0x6000, bytes.fromhex("0f0b"))]          # UD2: #UD intercepted, reflected
    for c in cases:
        reused = _end_state(warm, c)
        fresh = _end_state(Harness(), c)
        assert reused == fresh
    # each fresh harness loaded field by field; the warm one did not load again
    assert loads[0] == first + len(cases)

