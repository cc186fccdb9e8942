"""The walker's cache of nested translations of guest table pages, past one VMRUN.

:attr:`GuestLayer.table_pages` remembers, for each guest page-table page, the
host page its nested walk found (APM vol. 2 §15.25.6: every guest table read
is itself nested-translated).  A walker is only kept past a VMRUN when
:meth:`GuestLayer.tables_current` holds: every nested entry those walks read
still holds the value they left.  Each test changes one thing a new walker
would see differently and checks the cache is refused, or changes nothing
that matters and checks it is kept; the expected outcome of a walk comes from
a walker built anew on the same memory.
"""
from __future__ import annotations

import pytest

from sandbox.memory.hostmem import HostMemory
from sandbox.memory.mmu import GuestLayer, GuestPageFault, IdentityNested, NestedFault, NestedLayer, TwoDimWalker, \
    WalkStats
from sandbox.memory.npt import NestedPageTable
from sandbox.memory.paging import ADDR_MASK, PTE, Access, TableBuilder

RAM = 4 << 20              # guest-physical RAM, at HPA RAM + GPA
TABLES = 0x10_0000         # the guest's table pages
GVA = 0x7F80_0020_3000
DATA_GPA = 0x20_0000


class World:
    """Nested tables mapping guest RAM at HPA RAM + GPA, guest tables mapping GVA -> DATA_GPA."""

    def __init__(self, identity: bool = False) -> None:
        self.mem = mem = HostMemory(16 << 20)
        self.off = 0 if identity else RAM
        self.npt = npt = NestedPageTable(mem)
        if not identity:
            for gpa in range(0, RAM, 0x1000):
                npt.map(gpa, gpa + RAM)
        nxt = [TABLES]

        def alloc() -> int:
            nxt[0] += 0x1000
            return nxt[0] - 0x1000
        self.root = alloc()
        self.tb = TableBuilder(self.root, alloc, lambda a: mem.read_u64(a + self.off),
                               lambda a, v: mem.write_u64(a + self.off, v))
        self.tb.map(GVA, DATA_GPA)
        self.identity = identity

    def walker(self) -> TwoDimWalker:
        stats = WalkStats()
        nested = IdentityNested(self.mem, stats) if self.identity else NestedLayer(self.mem, self.npt.n_cr3, stats)
        guest = GuestLayer(nested, cr0=0x8001_0001, cr3=self.root, cr4=0x20, efer=0xD00, stats=stats)
        return TwoDimWalker(guest, nested, stats)

    def table_gpa(self, level: int) -> int:
        """GPA of the guest table page of ``level`` on GVA's path (4: the PML4)."""
        table = self.root
        for lv in range(4, level, -1):
            table = self.mem.read_u64(table + self.off + ((GVA >> (3 + 9 * lv)) & 0x1FF) * 8) & ADDR_MASK
        return table

    def table_page_entry(self, level: int) -> int:
        """HPA of the nested leaf entry mapping the guest table page of ``level``."""
        return self.npt.entry_addr(self.table_gpa(level))


def _outcome(w: TwoDimWalker, gva: int = GVA):
    try:
        t = w.translate(gva, Access.READ, False)
        return t.hpa, w.stats.snapshot()
    except (GuestPageFault, NestedFault) as f:
        return f, w.stats.snapshot()


def test_unchanged_nested_tables_keep_the_cache():
    world = World()
    w = world.walker()
    _outcome(w)
    assert len(w.guest.table_pages) == 4 and w.guest.tables_current()
    world.mem.write_u64(world.npt.entry_addr(DATA_GPA), world.npt.entry(DATA_GPA) & ~int(PTE.A))
    assert w.guest.tables_current()          # the data page's own entry is no table page's
    world.mem.write_u64(world.tb.entry_addr(GVA) + world.off, 0)
    assert w.guest.tables_current()          # nor is a guest entry (every walk reads those anew)


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_a_remapped_table_page_refuses_the_cache(level):
    """The hypervisor moves one guest table page to another host page (a copy):
    the kept cache would read the old page, which is then scrubbed."""
    world = World()
    w = world.walker()
    before = _outcome(w)[0]
    slot = world.table_page_entry(level)
    e = world.mem.read_u64(slot)
    old = e & 0x000F_FFFF_FFFF_F000
    new = world.mem.alloc_page()
    world.mem.write(new, world.mem.read(old, 0x1000))
    world.mem.write_u64(slot, (e & ~0x000F_FFFF_FFFF_F000) | new)
    world.mem.write(old, bytes(0x1000))
    assert not w.guest.tables_current()
    assert _outcome(world.walker())[0] == before      # a new walker reads the copy
    with pytest.raises(GuestPageFault):               # the kept cache reads the scrubbed page
        w.translate(GVA, Access.READ, False)


def test_a_write_protected_table_page_refuses_the_cache():
    """A guest table read is a nested user write (APM §15.25.6): once the table
    page's nested entry is read-only, a new walk takes #NPF with EXITINFO1 bit
    33 (a guest table access) and P|W|U."""
    world = World()
    w = world.walker()
    _outcome(w)
    world.npt.protect(world.table_gpa(1), write=False)
    assert not w.guest.tables_current()
    f, _ = _outcome(world.walker())
    assert isinstance(f, NestedFault) and f.exitinfo1 == (1 << 33) | 0b111


@pytest.mark.parametrize("bit", [PTE.A, PTE.D])
def test_cleared_accessed_or_dirty_refuses_the_cache(bit):
    """A restore that puts back a nested table page from before the walk clears
    the A/D bits the walk set (§15.25.4): a new walk sets them again, so the
    kept cache, which would not, is refused."""
    world = World()
    w = world.walker()
    _outcome(w)
    slot = world.table_page_entry(1)
    e = world.mem.read_u64(slot)
    assert e & PTE.A and e & PTE.D                     # the table read is a write at the nested level
    world.mem.write_u64(slot, e & ~int(bit))
    assert not w.guest.tables_current()
    _outcome(world.walker())
    assert world.mem.read_u64(slot) == e               # the new walk set it again


def _top_nested_entry(world) -> tuple[int, int]:
    """The nested PML4 entry above the guest's table pages: its host address and value."""
    slot = world.npt.n_cr3 + ((TABLES >> 39) & 0x1FF) * 8
    return slot, world.mem.read_u64(slot)


def test_an_upper_nested_entry_refuses_the_cache():
    world = World()
    w = world.walker()
    _outcome(w)
    slot, e = _top_nested_entry(world)
    world.mem.write_u64(slot, e | int(PTE.PWT))
    assert not w.guest.tables_current()
    world.mem.write_u64(slot, e)
    assert w.guest.tables_current()


def test_counts_from_a_kept_cache_are_a_new_walkers():
    """The same walk through a kept cache counts what a new walker counts (the
    24 references of APM §15.25.5, 4 KiB pages at both levels)."""
    world = World()
    w = world.walker()
    _outcome(w)
    assert w.guest.tables_current()
    w.count_into(WalkStats())
    kept = _outcome(w)
    fresh = _outcome(world.walker())
    assert kept == fresh and kept[1]["table_refs"] == 24


def test_one_entry_read_with_two_values_never_holds():
    """Two walks of one walker that read a nested entry with different values
    made a cache no single walk would make: it is never kept."""
    world = World()
    w = world.walker()
    _outcome(w)
    slot, e = _top_nested_entry(world)
    world.mem.write_u64(slot, e | int(PTE.PWT))
    # a mapping with table pages of its own, walked with the entry changed
    far = 0x0000_1230_0000_0000
    world.tb.map(far, DATA_GPA)
    _outcome(w, far)
    world.mem.write_u64(slot, e)            # the value the first walk read
    assert not w.guest.tables_current()


def test_identity_nested_has_nothing_to_check():
    world = World(identity=True)
    w = world.walker()
    _outcome(w)
    assert w.guest.table_pages and not w.guest.table_deps and w.guest.tables_current()
