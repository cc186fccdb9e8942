"""The snapshot's page compare finds exactly the pages that differ, whether the
copy's chunk is all zero (compared against a zero buffer) or not."""
import ctypes
import random

from sandbox.fuzz.snapshot import _Snapshot
from sandbox.memory.hostmem import PAGE_SIZE

SIZE = 1 << 20


def _brute(live: int, copy: bytes, ranges) -> list[int]:
    return [p for lo, hi in ranges for p in range(lo, hi, PAGE_SIZE)
            if ctypes.string_at(live + p, PAGE_SIZE) != copy[p:p + PAGE_SIZE]]


def test_changed_pages_match_a_byte_by_byte_compare():
    rng = random.Random(3)
    buf = ctypes.create_string_buffer(SIZE)
    a = ctypes.addressof(buf)
    for p in rng.sample(range(SIZE // PAGE_SIZE), 20):
        ctypes.memmove(a + p * PAGE_SIZE, rng.randbytes(PAGE_SIZE), PAGE_SIZE)
    snap = _Snapshot(a, SIZE)
    copy = ctypes.string_at(a, SIZE)
    ranges = [(0, SIZE // 2), (SIZE // 2 + 3 * PAGE_SIZE, SIZE)]
    assert snap.changed(ranges) == []
    nonzero = [p for p in range(0, SIZE, PAGE_SIZE) if any(copy[p:p + PAGE_SIZE])]
    for _ in range(50):
        edits = []
        for _ in range(rng.randrange(1, 4)):
            kind = rng.random()
            if kind < 0.4:          # a byte of a page that is zero in the copy
                off = rng.randrange(SIZE)
                ctypes.memset(a + off, rng.randrange(1, 256), 1)
            elif kind < 0.8:        # a byte of a non-zero page
                off = rng.choice(nonzero) + rng.randrange(PAGE_SIZE)
                ctypes.memset(a + off, (copy[off] + 1) & 0xFF, 1)
            else:                   # a non-zero page cleared to zero
                off = rng.choice(nonzero)
                ctypes.memset(a + off, 0, PAGE_SIZE)
            edits.append(off & ~(PAGE_SIZE - 1))
        want = _brute(a, copy, ranges)
        assert snap.changed(ranges) == want
        assert set(want) <= set(edits)
        for p in edits:
            snap.put_back(p)
        assert ctypes.string_at(a, SIZE) == copy
