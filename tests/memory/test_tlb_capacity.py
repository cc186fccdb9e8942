"""The ASID-tagged TLB's capacity and FIFO eviction."""
import time

from sandbox.memory.tlb import DEFAULT_CAPACITY, Tlb, TlbEntry


def _e(n: int) -> TlbEntry:
    return TlbEntry(n << 12, True, True, True, False)


def test_default_capacity_holds_a_64_mib_working_set():
    assert DEFAULT_CAPACITY >= (64 << 20) >> 12


def test_fifo_eviction_drops_the_oldest_and_counts():
    t = Tlb(capacity=4)
    for i in range(6):
        t.insert(1, False, i << 12, _e(i))
    assert len(t) == 4 and t.stats.evictions == 2
    assert t.lookup(1, False, 0) is None and t.lookup(1, False, 1 << 12) is None
    assert t.lookup(1, False, 5 << 12).hpa == 5 << 12
    t.flush_asid(1)
    t.insert(1, False, 9 << 12, _e(9))
    assert len(t) == 1


def test_eviction_stays_cheap_under_churn():
    t = Tlb(capacity=1 << 14)
    for i in range(1 << 14):
        t.insert(1, False, i << 12, _e(i))
    t0 = time.perf_counter()
    for i in range(1 << 14, 1 << 16):
        t.insert(1, False, i << 12, _e(i))
    per = (time.perf_counter() - t0) / (3 << 14)
    assert per < 20e-6 and len(t) == 1 << 14 and t.stats.evictions == 3 << 14
