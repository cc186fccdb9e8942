"""Candidate hooks parked and reused in place, and the order of the audit's hook before them.

Unicorn calls code hooks in the order they sit in its list; a hook whose range
excludes the instruction is not called.  The expected calls are what Unicorn's
documented semantics give for each set of ranges, checked by running code.
"""
import pytest
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc

from sandbox.svm import engine as E

NOPS = 8                     # eight one-byte NOPs at 0x1000..0x1007, then HLT


def _uc() -> Uc:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    uc.mem_write(0x1000, b"\x90" * NOPS + b"\xf4")
    return uc


def _run(uc: Uc, count: int = 0) -> None:
    uc.ctl_flush_tb()           # blocks compile the hooks present when translated
    uc.emu_start(0x1000, 0x1000 + NOPS, count=count)


@pytest.fixture
def parking():
    if E._HOOK_RANGE_AT is None:
        pytest.skip("struct hook's range not located in this Unicorn build")


@pytest.mark.parametrize("count", [0, 100])
def test_shed_hooks_are_parked_and_reused_at_new_addresses(parking, count):
    uc = _uc()
    calls = []
    hooks = E.CodeHooks(uc, lambda h, a, s, u: calls.append(a))
    hooks.add_new([0x1001, 0x1003])
    _run(uc, count)
    assert calls == [0x1001, 0x1003]
    assert hooks.shed() == 2 and len(hooks) == 0 and hooks.parked == 2
    calls.clear()
    _run(uc, count)
    assert calls == []                      # parked: nothing fires
    hooks.add_new([0x1005, 0x1002, 0x1006])
    assert hooks.parked == 0 and len(hooks) == 3
    calls.clear()
    _run(uc, count)
    assert calls == [0x1002, 0x1005, 0x1006]


def test_every_hook_is_deleted_at_the_periodic_full_shed(parking):
    uc = _uc()
    hooks = E.CodeHooks(uc, lambda h, a, s, u: None)
    for i in range(1, hooks.DELETE_EVERY + 1):
        hooks.add_new([0x1000 + i % NOPS])
        hooks.shed()
        assert hooks.parked == (0 if i == hooks.DELETE_EVERY else 1)


def test_the_audit_hook_keeps_its_place_ahead_of_candidates_while_parked(parking):
    uc = _uc()
    calls = []
    hooks = E.CodeHooks(uc, lambda h, a, s, u: calls.append(("candidate", a)))
    hooks.add_new([0x1002])
    hooks.shed()                            # parked ahead of the audit hook to come
    audit = E.RawCodeHook(uc, lambda h, a, s, u: calls.append(("audit", a)))
    audit.on()
    assert audit.active and audit.placed
    hooks.add_new([0x1004])                 # must not reuse the hook ahead of the audit's
    _run(uc)
    assert [c for c in calls if c[0] == "candidate"] == [("candidate", 0x1004)]
    assert calls.index(("audit", 0x1004)) + 1 == calls.index(("candidate", 0x1004))
    audit.off()
    assert not audit.active and audit.placed
    hooks.shed()
    assert hooks.parked == 1                # the stale one deleted, the other parked
    hooks.add_new([0x1001])                 # reuses the hook placed after the audit's
    calls.clear()
    _run(uc)
    assert calls == [("candidate", 0x1001)]
    audit.on()
    calls.clear()
    _run(uc)
    assert calls == [("audit", 0x1000 + i) for i in range(2)] + [("candidate", 0x1001)] + \
        [("audit", 0x1000 + i) for i in range(2, NOPS)]


def test_hooks_are_deleted_where_the_range_is_unknown(monkeypatch):
    monkeypatch.setattr(E, "_HOOK_RANGE_AT", None)
    uc = _uc()
    calls = []
    hooks = E.CodeHooks(uc, lambda h, a, s, u: calls.append(a))
    hooks.add_new([0x1001])
    assert hooks.shed() == 1 and hooks.parked == 0
    audit = E.RawCodeHook(uc, lambda h, a, s, u: None)
    audit.on()
    audit.off()
    assert not audit.placed
    hooks.add_new([0x1003])
    _run(uc)
    assert calls == [0x1003]
