"""Flushing one ASID (TLB_CONTROL 3/7, APM §15.16.2 Table 15-11) acts on that ASID's
entries only, keeps its global ones for 7, and stays consistent with FIFO eviction and
INVLPGA -- the per-ASID index makes it cost that ASID's entries, not the whole TLB's."""
from sandbox.memory.tlb import Tlb, TlbEntry


def _e(g: bool = False) -> TlbEntry:
    return TlbEntry(0x1000, True, True, True, g)


def test_flush_asid_leaves_other_asids_and_keeps_globals_when_asked():
    t = Tlb(capacity=64)
    for asid in (1, 2):
        for p in range(4):
            t.insert(asid, False, p << 12, _e(g=(p == 0)))
    t.flush_asid(1, keep_global=True)
    assert sorted((a, p) for a, p, _ in t.entries()) == [(1, 0)] + [(2, p << 12) for p in range(4)]
    t.flush_asid(1)
    assert [a for a, _, _ in t.entries()] == [2] * 4
    t.flush_asid(3)                                   # an ASID with no entries
    assert len(t) == 4


def test_eviction_and_invlpga_keep_the_index_consistent():
    t = Tlb(capacity=3)
    t.insert(1, False, 0x1000, _e())
    t.insert(2, False, 0x2000, _e())
    t.insert(2, True, 0x3000, _e())
    t.insert(2, False, 0x4000, _e())                  # evicts ASID 1's entry, the oldest
    t.flush_page(2, 0x3000)                           # user and supervisor entries of the page
    assert t.lookup(1, False, 0x1000) is None and t.lookup(2, True, 0x3000) is None
    t.flush_asid(2)
    assert len(t) == 0
    t.insert(1, False, 0x1000, _e())                  # ASID 1 again after its entry was evicted
    t.flush_asid(1)
    assert len(t) == 0
