"""The common 2-D walk in one function: the TLB fill's fast path.

A soft-TLB miss of a long-mode guest under nested paging is almost always
the same walk: four guest levels whose table pages' nested translations
the walker already knows (:attr:`GuestLayer.table_pages`), then four nested
levels for the final GPA, no fault.  :func:`fast_translator` builds, once
per walker (kept while :meth:`~.mmu.GuestLayer.tables_current` holds), a
function doing exactly that walk with everything it needs bound as locals,
reading entries as 64-bit words of host memory.

It makes the same architectural walk as :class:`~.mmu.TwoDimWalker`: the
same entries read, the same Accessed/Dirty updates in the same order (APM
vol. 2 §5.4.2, §15.25.4), the same references counted in the walker's
:class:`~.mmu.WalkStats` (24 for 4 KiB pages at both levels, APM §15.25.5).
Whatever is unusual it does not decide: an entry not present, a reserved
bit, a denied access, a table page whose nested translation is not known
yet, an address outside DRAM.  It then returns None *before counting
anything*, and the caller walks again with the general walker, which
raises the fault or fills the caches.  What it wrote before giving up is
only Accessed bits of levels the general walk also crosses (it sets them
at the same points, after the entry's checks), and the guest leaf's A/D
when the nested walk of the final GPA gives up: the general walk repeats
the same path, finds those bits set, and ends in the same state.
"""
from __future__ import annotations

from typing import Callable

from .mmu import IdentityNested, TwoDimWalker
from .paging import ADDR_MASK, PTE, RSVD_HIGH
from .tlb import RawEntry

#: ``fast(gva, access, user[, ad[, counted]])`` -> the TLB entry, a :data:`~.tlb.RawEntry`
#: (HPA page, writable, executable, dirty, global, user page), or None: use the general
#: walker.  ``ad=False`` is the general walker's ``set_ad=False``: no Accessed or
#: Dirty bit written (it gives up where one is clear above the leaf).
#: ``counted=False``: a walk made on the hypervisor's behalf, not a memory
#: reference of the processor's, so the walker's counters are left alone
FastTranslate = Callable[..., "RawEntry | None"]

_P, _RW, _US, _A, _D, _PS, _G, _NX = (int(f) for f in (PTE.P, PTE.RW, PTE.US, PTE.A, PTE.D, PTE.PS, PTE.G, PTE.NX))
_1G, _2M = (1 << 30) - 1, (1 << 21) - 1


#: the upper-level caches are emptied when they reach this many 2 MiB regions
CACHE_LIMIT = 1 << 14


_RULES: dict[tuple[bool, bool, bool], tuple[tuple, ...]] = {}


def _rules(wp: bool, nxe: bool, smep: bool) -> tuple[tuple, ...]:
    """What each (access, user) needs, indexed by ``access * 2 + user``: the
    guest rights that must all be granted (U/S for a user, R/W for a write by
    a user or with CR0.WP), the bits that must not be set at any level (NX on
    a fetch with EFER.NXE), a right whose grant denies (U/S on a supervisor
    fetch with SMEP) -- :func:`~.paging.denied`, APM vol. 2 §5.6 --; the same
    for the nested walk (a user access with NXE, APM §15.25.5); the A/D bits
    the leaves get; and whether the guest page counts as writable whatever
    its R/W (a supervisor access with CR0.WP clear).  Made once per setting."""
    key = (wp, nxe, smep)
    r = _RULES.get(key)
    if r is None:
        rules = []
        for access in (0, 1, 2):
            for user in (False, True):
                write, fetch = access == 1, access == 2
                rules.append(((_US if user else 0) | (_RW if write and (user or wp) else 0),
                              _NX if fetch and nxe else 0,
                              _US if fetch and smep and not user else 0,
                              _US | (_RW if write else 0), _NX if fetch else 0,
                              _A | (_D if write else 0), not user and not wp))
        r = _RULES[key] = tuple(rules)
    return r


def _guest_walker(q: memoryview, table_page: Callable, cr3: int, g_bad: int, g_bad4: int,
                  cache: dict[int, tuple]) -> Callable[[int], tuple | None]:
    """``g_walk(gva, ad)``: the guest's levels above the leaf walked in full (their
    Accessed bits set; without ``ad``, an entry whose bit is clear gives up),
    the region's entries kept in ``cache`` when the leaf is a 4 KiB one, and
    the leaf read and checked: (leaf word index, leaf, levels read, page mask,
    nested references, AND and OR of the levels above the leaf), or None."""

    def g_walk(gva: int, ad: bool) -> tuple | None:
        """The guest levels above the leaf, walked; and the leaf read and checked."""
        hit = table_page(cr3)
        if hit is None:
            return None
        a4 = (hit[0] | ((gva >> 36) & 0xFF8)) >> 3
        e = q[a4]
        if (e ^ _P) & g_bad4:
            return None
        if not e & _A:
            if not ad:
                return None
            e |= _A
            q[a4] = e
        v4 = e
        nrefs = hit[1]
        hit = table_page(e & ADDR_MASK)
        if hit is None:
            return None
        a3 = (hit[0] | ((gva >> 27) & 0xFF8)) >> 3
        e = q[a3]
        if (e ^ _P) & g_bad:
            return None
        nrefs += hit[1]
        if e & _PS:                                        # a 1 GiB page
            if e & ADDR_MASK & _1G & ~0x1000:
                return None
            return a3, e, 2, _1G, nrefs, v4, v4
        if not e & _A:
            if not ad:
                return None
            e |= _A
            q[a3] = e
        v3 = e
        hit = table_page(e & ADDR_MASK)
        if hit is None:
            return None
        a2 = (hit[0] | ((gva >> 18) & 0xFF8)) >> 3
        e = q[a2]
        if (e ^ _P) & g_bad:
            return None
        nrefs += hit[1]
        if e & _PS:                                        # a 2 MiB page
            if e & ADDR_MASK & _2M & ~0x1000:
                return None
            return a2, e, 3, _2M, nrefs, v4 & v3, v4 | v3
        if not e & _A:
            if not ad:
                return None
            e |= _A
            q[a2] = e
        hit = table_page(e & ADDR_MASK)
        if hit is None:
            return None
        nrefs += hit[1]
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[gva >> 21] = c = (a4, v4, a3, v3, a2, e, hit[0] >> 3, nrefs, v4 & v3 & e, v4 | v3 | e)
        at = c[6] | ((gva >> 12) & 0x1FF)
        e = q[at]
        if (e ^ _P) & g_bad:
            return None
        return at, e, 4, 0xFFF, nrefs, c[8], c[9]
    return g_walk


def _nested_walker(q: memoryview, size: int, n_root: int, n_bad: int, n_bad4: int,
                   cache: dict[int, tuple]) -> Callable[[int], tuple | None]:
    """``n_walk(gpa, ad)``: the same for the nested levels of a final GPA, in host
    memory: (leaf word index, leaf, levels read, page mask, AND and OR of the
    levels above the leaf), or None."""

    def n_walk(gpa: int, ad: bool) -> tuple | None:
        """The nested levels above the leaf for the final GPA; and the leaf read and checked."""
        a4 = n_root | ((gpa >> 36) & 0xFF8)
        if a4 + 8 > size:
            return None
        a4 >>= 3
        e = q[a4]
        if (e ^ _P) & n_bad4:
            return None
        if not e & _A:
            if not ad:
                return None
            e |= _A
            q[a4] = e
        v4 = e
        a3 = (e & ADDR_MASK) | ((gpa >> 27) & 0xFF8)
        if a3 + 8 > size:
            return None
        a3 >>= 3
        e = q[a3]
        if (e ^ _P) & n_bad:
            return None
        if e & _PS:
            if e & ADDR_MASK & _1G & ~0x1000:
                return None
            return a3, e, 2, _1G, v4, v4
        if not e & _A:
            if not ad:
                return None
            e |= _A
            q[a3] = e
        v3 = e
        a2 = (e & ADDR_MASK) | ((gpa >> 18) & 0xFF8)
        if a2 + 8 > size:
            return None
        a2 >>= 3
        e = q[a2]
        if (e ^ _P) & n_bad:
            return None
        if e & _PS:
            if e & ADDR_MASK & _2M & ~0x1000:
                return None
            return a2, e, 3, _2M, v4 & v3, v4 | v3
        if not e & _A:
            if not ad:
                return None
            e |= _A
            q[a2] = e
        pt = e & ADDR_MASK
        if pt + 0x1000 > size:
            return None
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[gpa >> 21] = c = (a4, v4, a3, v3, a2, e, pt >> 3, v4 & v3 & e, v4 | v3 | e)
        at = c[6] | ((gpa >> 12) & 0x1FF)
        e = q[at]
        if (e ^ _P) & n_bad:
            return None
        return at, e, 4, 0xFFF, c[7], c[8]
    return n_walk


def fast_translator(walker: TwoDimWalker) -> FastTranslate | None:
    """The fast path for ``walker``'s guest context, or None when that
    context is not the common case (paging off, legacy paging, encrypted
    memory): every walk then takes the general walker.

    For each 2 MiB region it walked with 4 KiB leaves at a level, it keeps
    the host addresses and the values of the entries above the leaf (and
    what they allow).  A later walk in the region still reads every one of
    those entries; when each holds the value kept, their checks, their
    Accessed bits and the address of the leaf's table are what they were,
    and only the leaf is decided anew.  The guest's cache is only as good as
    the walker's :attr:`~.mmu.GuestLayer.table_pages`, so it lives and dies
    with the walker."""
    guest, nested = walker.guest, walker.nested
    if walker.encryption is not None or guest.enc is not None or not guest.paging or not guest.long_mode:
        return None
    mem = nested.mem
    q = mem.qwords
    size = mem.size
    table_page = guest.table_pages.get
    cr3 = guest.cr3 & ADDR_MASK
    wp, nxe, smep, pge = guest.wp, guest.nxe, guest.smep, guest.pge
    identity = isinstance(nested, IdentityNested)
    n_root = nested.n_cr3
    # entries with one of these set fault with RSVD (paging.walk): bits above
    # MAXPHYADDR, NX without EFER.NXE, a PML4E's PS or bit 8 (AMD: MBZ); with
    # P added, ``(e ^ P) & mask`` is nonzero for an entry not present too
    g_bad = _P | RSVD_HIGH | (0 if nxe else _NX)
    g_bad4 = g_bad | _PS | _G
    n_bad = _P | RSVD_HIGH                   # nested walks run with NXE (APM §15.25.5)
    n_bad4 = n_bad | _PS | _G
    g_upper: dict[int, tuple] = {}
    n_upper: dict[int, tuple] = {}
    g_cached, n_cached = g_upper.get, n_upper.get

    g_walk = _guest_walker(q, table_page, cr3, g_bad, g_bad4, g_upper)
    n_walk = _nested_walker(q, size, n_root, n_bad, n_bad4, n_upper)

    rule = _rules(wp, nxe, smep)
    g_nx = _NX if nxe else 0
    g_global = _G if pge else 0
    all_rights = _RW | _US

    def fast(gva: int, access: int, user: bool, ad: bool = True, counted: bool = True) -> RawEntry | None:
        g_need, g_forbid, g_deny, n_need, n_forbid, set_ad, wp_off = rule[access * 2 + user]
        # ---- the guest's levels, each read in its table page's known host page
        c = g_cached(gva >> 21)
        if c is not None:
            a4, v4, a3, v3, a2, v2, pt, nrefs, g_and, g_or = c
            if q[a4] != v4 or q[a3] != v3 or q[a2] != v2:
                c = None
            else:
                at = pt | ((gva >> 12) & 0x1FF)
                e = q[at]
                if (e ^ _P) & g_bad:
                    return None
                gpa = (e & ADDR_MASK) | (gva & 0xFFF)
                levels = 4
                g_and &= e
                g_or |= e
        if c is None:
            # (a cached region's key holds bits 63:21, so a hit was canonical)
            top = gva >> 47
            if top and top != 0x1FFFF:
                return None                               # non-canonical: #GP
            r = g_walk(gva, ad)
            if r is None:
                return None
            at, e, levels, mask, nrefs, g_and, g_or = r
            g_and &= e
            g_or |= e
            gpa = (e & ADDR_MASK & ~mask) | (gva & mask)
        # the leaf's protection check, on the rights of every level
        if g_and & g_need != g_need or g_or & g_forbid or g_and & g_deny:
            return None
        ne = e | set_ad
        if ne != e and ad:
            q[at] = ne
        # ---- the nested walk of the final GPA
        if identity:
            if gpa >= size:
                return None
            hpa, n_levels, n_and, n_or, f = gpa, 0, all_rights, 0, _D
        else:
            c = n_cached(gpa >> 21)
            if c is not None:
                a4, v4, a3, v3, a2, v2, pt, n_and, n_or = c
                if q[a4] != v4 or q[a3] != v3 or q[a2] != v2:
                    c = None
                else:
                    at = pt | ((gpa >> 12) & 0x1FF)
                    f = q[at]
                    if (f ^ _P) & n_bad:
                        return None
                    hpa = (f & ADDR_MASK) | (gpa & 0xFFF)
                    n_levels = 4
                    n_and &= f
                    n_or |= f
            if c is None:
                r = n_walk(gpa, ad)
                if r is None:
                    return None
                at, f, n_levels, mask, n_and, n_or = r
                n_and &= f
                n_or |= f
                hpa = (f & ADDR_MASK & ~mask) | (gpa & mask)
            if n_and & n_need != n_need or n_or & n_forbid or hpa >= size:
                return None
            nf = f | set_ad
            if nf != f and ad:
                q[at] = nf
        if counted:
            stats = walker.stats             # (the walker's, as :meth:`TwoDimWalker.count_into` sets it)
            stats.walks += 1
            stats.guest_entries += levels
            stats.nested_entries += nrefs + n_levels
            stats.data_refs += 1
        return (hpa & ~0xFFF, n_and & _RW != 0 and (wp_off or g_and & _RW != 0),
                g_or & g_nx == 0 and n_or & _NX == 0, set_ad & _D != 0 or e & f & _D != 0, e & g_global != 0,
                g_and & _US != 0)
    return fast
