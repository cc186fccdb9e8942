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


def _churn_cost(capacity: int) -> float:
    """Best-of-3 seconds per insert once a full TLB of ``capacity`` evicts on every insert."""
    best = float("inf")
    for _ in range(3):
        t = Tlb(capacity=capacity)
        for i in range(capacity):
            t.insert(1, False, i << 12, _e(i))
        n = 1 << 14
        t0 = time.perf_counter()
        for i in range(capacity, capacity + n):
            t.insert(1, False, i << 12, _e(i))
        best = min(best, (time.perf_counter() - t0) / n)
        assert len(t) == capacity and t.stats.evictions == n
    return best


def test_eviction_stays_cheap_under_churn():
    # O(1) eviction: the cost per insert does not grow with the capacity.  A scan
    # (or a FIFO whose head search skips deleted slots) would make the 2^16-entry
    # TLB hundreds of times dearer than the 2^8 one; compared in one run, so the
    # machine's load cancels.
    small, large = _churn_cost(1 << 8), _churn_cost(1 << 16)
    assert large < 4 * small, (small, large)


def test_entries_and_keys_leave_the_garbage_collector_alone():
    """A large TLB must not lengthen the collector's full passes: the entries it
    stores are plain tuples of plain values, untracked after one collection."""
    import gc
    t = Tlb()
    t.insert(1, False, 0x1000, _e(1))
    t.insert_key((1, True, 0x2000), (0x5000, True, False, True, False, True))
    gc.collect()
    for key in ((1, False, 0x1000), (1, True, 0x2000)):
        stored = t.find(key)
        assert stored is not None and not gc.is_tracked(stored)
    assert t.lookup(1, True, 0x2000) == TlbEntry(0x5000, True, False, True, False, True)
    assert t.lookup(1, True, 0x2000).dirty and not t.lookup(1, True, 0x2000).executable
