"""Defects `sandbox fuzz` found, each pinned by the smallest guest that shows it.

Expected values come from the APM (amdv-facts.md §6) -- never from the code under test.
"""
from __future__ import annotations

import pytest

from conftest import BASE, OP, assemble, capture, db, hc_exit

GP_EXIT = 0x40 + 13


@pytest.mark.parametrize("name,code", [("vmrun", 0x80), ("vmload", 0x82), ("vmsave", 0x83)])
@pytest.mark.parametrize("rax", [0x100123, 1 << 48])
def test_svm_insn_rax_gp_precedes_intercept(guest, name, code, rax):
    """VMRUN/VMLOAD/VMSAVE raise #GP when rAX is not page-aligned or is at or
    beyond MAXPHYADDR, before the intercept check (APM §15.5.1; amdv-facts §6
    "Checks done before the intercept").  Found by the soundness audit."""
    pre = f"mov rax, {rax:#x}"
    m = guest(pre + "\n" + db(OP[name]) + "\n" + hc_exit(0x55))
    m.intercept([name, "excp13"])
    rec = capture(m, GP_EXIT, code)
    r = m.run(timeout=5)
    assert r.reason == "captured", (r.reason, r.detail)
    assert rec[0].code == GP_EXIT and rec[0].rip == BASE + len(assemble(pre))


@pytest.mark.parametrize("name,code", [("vmrun", 0x80), ("vmload", 0x82), ("vmsave", 0x83)])
def test_svm_insn_aligned_rax_still_exits(guest, name, code):
    m = guest("mov rax, 0x100000\n" + db(OP[name]) + "\n" + hc_exit(0x55))
    m.intercept([name, "excp13"])
    rec = capture(m, GP_EXIT, code)
    assert m.run(timeout=5).reason == "captured" and rec[0].code == code
