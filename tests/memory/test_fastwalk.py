"""The TLB fill's fast 2-D walk against the general walker.

Two copies of one randomly built machine state -- nested tables with 4 KiB
and 2 MiB leaves, guest tables with 4 KiB, 2 MiB and 1 GiB leaves, random
R/W, U/S, NX, G, A and D bits, now and then a reserved bit or an entry not
present -- take the same accesses: one through the general walker only, the
other through :func:`~sandbox.memory.fastwalk.fast_translator` first and the
general walker when the fast path declines (what the fill does).  Between
accesses both copies get the same edits of their table entries, so the fast
path's caches of upper levels meet entries that changed under them.  After
every access the outcome (translation or fault), the reference counts and
the table pages must be identical; after each sequence, all of DRAM.
A quarter of the accesses set no Accessed or Dirty bit (``set_ad=False``), so
the caches made by one kind of walk meet the other kind.
"""
from __future__ import annotations

import random

import pytest

from sandbox.memory.fastwalk import fast_translator
from sandbox.memory.hostmem import HostMemory
from sandbox.memory.mmu import GuestException, GuestGP, GuestLayer, GuestPageFault, IdentityNested, NestedFault, \
    NestedLayer, TwoDimWalker, WalkStats
from sandbox.memory.npt import NestedPageTable
from sandbox.memory.paging import PTE, Access, TableBuilder

KIB4, MIB2, GIB1 = 1 << 12, 1 << 21, 1 << 30
DRAM = 16 << 20
RAM = 8 << 20               # guest-physical RAM, at HPA RAM + GPA
TABLES_GPA = 0x10_0000      # where the guest's own table pages go
BITS = (PTE.A, PTE.D, PTE.RW, PTE.US, PTE.NX, PTE.P, PTE.G, PTE.PS, 1 << 51, 1 << 47)


class World:
    """One machine state: DRAM, the nested tables, the guest tables."""

    def __init__(self, seed: int, identity: bool) -> None:
        rng = random.Random(seed)
        self.mem = mem = HostMemory(DRAM)
        self.identity = identity
        self.npt = npt = NestedPageTable(mem)
        off = 0 if identity else RAM

        def perms() -> dict:
            r = rng.random()
            return dict(write=r > 0.1, user=r > 0.05 or r < 0.02, execute=rng.random() > 0.15)
        if not identity:
            for base in range(0, RAM, MIB2):
                if rng.random() < 0.3 and base != TABLES_GPA & ~(MIB2 - 1):
                    npt.map(base, base + off, size=MIB2, **perms())
                else:
                    for gpa in range(base, base + MIB2, KIB4):
                        if gpa & ~(MIB2 - 1) == TABLES_GPA & ~(MIB2 - 1):
                            npt.map(gpa, gpa + off)            # the guest's tables stay reachable
                        elif rng.random() < 0.97:
                            npt.map(gpa, gpa + off, **perms())
        self.off = off
        nxt = [TABLES_GPA]

        def alloc() -> int:
            nxt[0] += KIB4
            return nxt[0]
        rd = lambda gpa: mem.read_u64(gpa + off)
        wr = lambda gpa, v: mem.write_u64(gpa + off, v)
        self.cr3 = TABLES_GPA
        tb = TableBuilder(TABLES_GPA, alloc, rd, wr)
        self.gvas: list[int] = []
        regions = [0x40_0000, 0x7F80_0000_0000, 0xFFFF_8000_0000_0000, 0xFFFF_FF80_0020_0000]
        for _ in range(200):
            size = rng.choices((KIB4, MIB2, GIB1), (20, 3, 1))[0]
            base = rng.choice(regions) + rng.randrange(0, 1 << 24) // size * size
            gpa = 0 if size == GIB1 else rng.randrange(0, RAM + (RAM >> 3)) // size * size
            extra = rng.choice((0, 0, PTE.A, PTE.A | PTE.D, PTE.G | PTE.A))
            try:
                tb.map(base, gpa, write=rng.random() > 0.2, user=rng.random() > 0.3,
                       execute=rng.random() > 0.2, extra=int(extra), size=size)
            except ValueError:
                continue                      # overlaps a mapping of another size
            self.gvas.append(base + (rng.randrange(size) & ~0xFFF) if size > KIB4 else base)
        self.table_gpas = list(range(TABLES_GPA, nxt[0] + KIB4, KIB4))

    def walker(self, cr0: int, cr4: int, efer: int) -> TwoDimWalker:
        stats = WalkStats()
        nested = IdentityNested(self.mem, stats) if self.identity else NestedLayer(self.mem, self.npt.n_cr3, stats)
        guest = GuestLayer(nested, cr0, self.cr3, cr4, efer, stats)
        return TwoDimWalker(guest, nested, stats)

    def table_pages(self) -> bytes:
        pages = sorted(set(self.npt.tables) | {g + self.off for g in self.table_gpas})
        return b"".join(bytes(self.mem.view[p:p + KIB4]) for p in pages)


def general(w: TwoDimWalker, gva: int, access: int, user: bool, set_ad: bool = True):
    try:
        t = w.translate(gva, access, user, set_ad)
    except (GuestPageFault, NestedFault, GuestGP, GuestException) as f:
        return f
    return t.hpa & ~0xFFF, t.writable, t.executable, t.dirty, t.global_, t.user


def edit(rng: random.Random, worlds: list[World], active: list[tuple[int, int]]) -> None:
    """The same random bit flip in one table entry of every world; with three
    flips in force, the oldest is flipped back instead."""
    if len(active) >= 3:
        ea, bit = active.pop(0)
        for w in worlds:
            w.mem.write_u64(ea, w.mem.read_u64(ea) ^ bit)
        return
    a = worlds[0]
    if rng.random() < 0.5 and not a.identity:
        page = rng.choice(sorted(a.npt.tables))
    else:
        page = rng.choice(a.table_gpas) + a.off
    slots = [i for i in range(512) if a.mem.read_u64(page + 8 * i) & 1] or [0]
    ea = page + 8 * rng.choice(slots)
    bit = int(rng.choice(BITS))
    active.append((ea, bit))
    for w in worlds:
        w.mem.write_u64(ea, w.mem.read_u64(ea) ^ bit)


@pytest.mark.parametrize("identity", [False, True], ids=["nested", "np-off"])
@pytest.mark.parametrize("seed", range(12))
def test_fast_walk_matches_the_general_walker(seed, identity):
    rng = random.Random(1000 + seed)
    ref, dut = World(seed, identity), World(seed, identity)
    cr0 = 0x8000_0011 | (0x1_0000 if rng.random() < 0.7 else 0)          # PG PE ET, WP mostly
    cr4 = 0x20 | (1 << 20 if rng.random() < 0.5 else 0) | (0x80 if rng.random() < 0.5 else 0)   # SMEP, PGE
    efer = 0x500 | (0x800 if rng.random() < 0.8 else 0)                   # LME LMA, NXE mostly
    wr, wd = ref.walker(cr0, cr4, efer), dut.walker(cr0, cr4, efer)
    fast = fast_translator(wd)
    assert fast is not None
    taken = declined = 0
    active: list[tuple[int, int]] = []
    for step in range(600):
        if rng.random() < 0.05:
            edit(rng, [ref, dut], active)
        r = rng.random()
        if r < 0.9:
            gva = rng.choice(ref.gvas) + rng.randrange(KIB4)
        elif r < 0.95:
            gva = rng.randrange(1 << 48)                                   # mostly unmapped
        else:
            gva = (1 << 47) + rng.randrange(1 << 40)                       # not canonical
        access = rng.choice((Access.READ, Access.READ, Access.WRITE, Access.FETCH))
        user = rng.random() < 0.3
        ad = rng.random() < 0.75         # else a walk that sets no A/D bit (the bytes of an instruction)
        want = general(wr, gva, access, user, ad)
        got = fast(gva, access, user, ad)
        if got is None:
            declined += 1
            got = general(wd, gva, access, user, ad)
        else:
            taken += 1
        assert got == want, (step, hex(gva), access, user)
        assert wd.stats == wr.stats, (step, hex(gva))
        assert dut.table_pages() == ref.table_pages(), (step, hex(gva))
    assert bytes(dut.mem.view[:DRAM]) == bytes(ref.mem.view[:DRAM])
    assert taken > 50 and declined > 10, (taken, declined)      # both paths were exercised


def test_not_the_common_case_has_no_fast_path():
    """Paging off, legacy paging, encrypted memory: the general walker only."""
    w = World(0, False)
    assert fast_translator(w.walker(0x11, 0x20, 0x500)) is None                # CR0.PG clear
    assert fast_translator(w.walker(0x8000_0011, 0x20, 0)) is None             # PAE paging, not long mode
    assert fast_translator(w.walker(0x8000_0011, 0x20, 0x500)) is not None


def test_counts_are_the_architectural_24():
    """A walk the fast path makes counts Figure 15-13's 24 references for 4 KiB
    pages at both levels, as the general walk does (APM §15.25.5)."""
    mem = HostMemory(DRAM)
    npt = NestedPageTable(mem)
    for gpa in range(0, RAM, KIB4):
        npt.map(gpa, gpa + RAM)
    nxt = [TABLES_GPA]

    def alloc() -> int:
        nxt[0] += KIB4
        return nxt[0]
    tb = TableBuilder(TABLES_GPA, alloc, lambda g: mem.read_u64(g + RAM), lambda g, v: mem.write_u64(g + RAM, v))
    for i in range(4):
        tb.map(0x40_0000 + i * KIB4, 0x30_0000 + i * KIB4)
    stats = WalkStats()
    nested = NestedLayer(mem, npt.n_cr3, stats)
    w = TwoDimWalker(GuestLayer(nested, 0x8001_0011, TABLES_GPA, 0x20, 0xD00, stats), nested, stats)
    w.translate(0x40_0000, Access.READ, False)          # the general walk learns the table pages
    fast = fast_translator(w)
    before = stats.table_refs
    for i in range(1, 4):
        assert fast(0x40_0000 + i * KIB4, Access.WRITE, False) == (0x30_0000 + RAM + i * KIB4, True, True, True,
                                                                   False, True)
    assert stats.walks == 4 and stats.data_refs == 4
    assert stats.table_refs - before == 3 * 24
    assert stats.guest_entries - 1 * 4 == 3 * 4
