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
from functools import partial
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
    """One translation, immutable.  A tuple of plain values is one the garbage
    collector stops tracking: a TLB of a large working set adds nothing to
    the collector's full passes (a tracked object per entry cost microseconds
    per miss in them)."""
    hpa: int                 # host-physical page
    writable: bool
    executable: bool
    dirty: bool              # both levels' D bits were set when the entry was made
    global_: bool
    user_page: bool = True   # the guest leaf allows user access (for SMEP)


#: ``make_entry((hpa, writable, executable, dirty, global_, user_page))``: a
#: :class:`TlbEntry` from a tuple in field order, with no Python frame (hot paths)
make_entry: Callable[[tuple], TlbEntry] = partial(tuple.__new__, TlbEntry)


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
        self._e: OrderedDict[tuple[int, bool, int], TlbEntry] = OrderedDict()
        #: the keys of each ASID, so flushing one ASID costs its own entries only
        self._by_asid: dict[int, set[tuple[int, bool, int]]] = {}

    def __len__(self) -> int:
        return len(self._e)

    def lookup(self, asid: int, user: bool, gva_page: int) -> TlbEntry | None:
        return self._e.get((asid, user, gva_page))

    def insert(self, asid: int, user: bool, gva_page: int, entry: TlbEntry) -> None:
        key = (asid, user, gva_page)
        e = self._e
        if e.pop(key, None) is None and len(e) >= self.capacity:
            old, _ = e.popitem(last=False)         # oldest first
            self._by_asid[old[0]].discard(old)
            self.stats.evictions += 1
        e[key] = entry
        keys = self._by_asid.get(asid)
        if keys is None:
            keys = self._by_asid[asid] = set()
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
            if keep_global and e[k].global_:
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
        return [(k[0], k[2], v) for k, v in self._e.items() if asid is None or k[0] == asid]
