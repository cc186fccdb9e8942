"""The translation lookaside buffer, tagged by ASID (APM vol. 2 §15.16).

AMD tags every TLB entry with the ASID of the address space that created
it, so a world switch between the host and guests (or between guests with
different ASIDs) keeps everyone's translations: nothing is flushed unless
the hypervisor asks for it through the VMCB's TLB_CONTROL field or INVLPGA.

Unicorn keeps its own, untagged soft TLB in front of this one.  That soft
TLB is only a cache of this model: it is emptied on every ASID switch and
on every flush, and each of its misses is answered here -- by a hit (no
page-table reference at all) or by a miss that runs the 2-D walk.

Each entry holds the combined GVA -> HPA translation of one 4 KiB page and
the permissions the walk established for a given privilege level.  Entries
made from a guest PTE with G=1 while CR4.PGE=1 are *global*: a MOV CR3
keeps them, an explicit flush of the ASID does not (§5.5.2, §15.16.1).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Callable, NamedTuple

#: entries the model holds before it evicts the oldest: 2**18 pages (1 GiB
#: of 4 KiB pages), so a large working set does not cost a 2-D walk per access
DEFAULT_CAPACITY = 1 << 18


class TlbMode(Enum):
    """How world switches treat the TLB."""
    #: entries tagged by ASID survive VMRUN and #VMEXIT (AMD-V with ASIDs)
    TAGGED = "tagged"
    #: every VMRUN and #VMEXIT flushes the whole TLB (pre-ASID hardware)
    FLUSH_ON_SWITCH = "flush"


class TlbEntry(NamedTuple):
    """One translation, as :meth:`Tlb.lookup` and :meth:`Tlb.entries` show it."""
    hpa: int                 # host-physical page
    writable: bool
    executable: bool
    dirty: bool              # both levels' D bits were set when the entry was made
    global_: bool
    user_page: bool = True   # the guest leaf allows user access (for SMEP)


#: The TLB holds each entry as a plain tuple in :class:`TlbEntry`'s field
#: order, indexed by these: the garbage collector stops tracking a plain
#: tuple of ints at its first pass, so a TLB of a large working set adds
#: nothing to the collector's full passes (a tracked object per entry made
#: them, and so the misses that trigger them, several microseconds dearer).
HPA, WRITABLE, EXECUTABLE, DIRTY, GLOBAL, USER_PAGE = range(6)
#: an entry as stored: ``(hpa, writable, executable, dirty, global_, user_page)``
RawEntry = tuple[int, bool, bool, bool, bool, bool]


@dataclass
class TlbStats:
    hits: int = 0
    misses: int = 0
    flushes: int = 0          # flush operations of any scope
    evictions: int = 0

    def snapshot(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "flushes": self.flushes, "evictions": self.evictions}


class Tlb:
    """Translations keyed by (ASID, CPL-is-user, GVA page)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, mode: TlbMode = TlbMode.TAGGED) -> None:
        self.capacity = capacity
        self.mode = mode
        self.stats = TlbStats()
        #: FIFO order; OrderedDict's popitem(last=False) evicts in O(1)
        self._e: OrderedDict[tuple[int, bool, int], RawEntry] = OrderedDict()
        #: the keys of each ASID, so flushing one ASID costs its own entries only
        self._by_asid: dict[int, set[tuple[int, bool, int]]] = {}
        #: ``find((asid, user, gva_page))``: the stored entry (a :data:`RawEntry`) or
        #: None, with no Python frame (the TLB fill's hot path)
        self.find: Callable[[tuple[int, bool, int]], RawEntry | None] = self._e.get

    def __len__(self) -> int:
        return len(self._e)

    def lookup(self, asid: int, user: bool, gva_page: int) -> TlbEntry | None:
        e = self._e.get((asid, user, gva_page))
        return None if e is None else TlbEntry(*e)

    def insert(self, asid: int, user: bool, gva_page: int, entry: TlbEntry | RawEntry) -> None:
        self.insert_key((asid, user, gva_page), tuple(entry))

    def insert_key(self, key: tuple[int, bool, int], entry: RawEntry) -> None:
        """:meth:`insert` with the key (ASID, user, GVA page) built as :attr:`find`
        takes it, and the entry a plain tuple (:data:`RawEntry`)."""
        e = self._e
        if e.pop(key, None) is None and len(e) >= self.capacity:
            old, _ = e.popitem(last=False)         # oldest first
            self._by_asid[old[0]].discard(old)
            self.stats.evictions += 1
        e[key] = entry
        keys = self._by_asid.get(key[0])
        if keys is None:
            keys = self._by_asid[key[0]] = set()
        keys.add(key)

    # -- invalidation (each is one architectural operation) --------------------
    def flush_all(self) -> None:
        """TLB_CONTROL = 1: every entry of every ASID."""
        self.stats.flushes += 1
        self._e.clear()
        self._by_asid.clear()

    def flush_asid(self, asid: int, *, keep_global: bool = False) -> None:
        """TLB_CONTROL = 3 (all of ``asid``) or 7 (its non-global entries);
        ``keep_global`` is also what a guest MOV CR3 does to its own ASID."""
        self.stats.flushes += 1
        keys = self._by_asid.get(asid)
        if not keys:
            return
        e = self._e
        kept = set()
        for k in keys:
            if keep_global and e[k][GLOBAL]:
                kept.add(k)
            else:
                del e[k]
        self._by_asid[asid] = kept

    def flush_page(self, asid: int, gva_page: int) -> None:
        """INVLPG (in ``asid``) / INVLPGA(rAX = page, ECX = ``asid``): global entries too."""
        self.stats.flushes += 1
        keys = self._by_asid.get(asid)
        for user in (False, True):
            k = (asid, user, gva_page)
            if self._e.pop(k, None) is not None:
                keys.discard(k)

    def entries(self, asid: int | None = None) -> list[tuple[int, int, TlbEntry]]:
        """(ASID, GVA page, entry) for inspection."""
        return [(k[0], k[2], TlbEntry(*v)) for k, v in self._e.items() if asid is None or k[0] == asid]
