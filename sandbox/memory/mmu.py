"""The two-dimensional walk: GVA -> GPA -> HPA (APM vol. 2 §15.25).

Two stacked layers, each with one job, in the style of layered address
spaces:

* :class:`NestedLayer` -- GPA -> HPA through the hypervisor's nested page
  tables rooted at N_CR3.  Every access is a user access; a failure is a
  :class:`NestedFault` that becomes VMEXIT_NPF.
* :class:`GuestLayer` -- GVA -> GPA through the guest's own 4-level tables
  while CR0.PG is set.  Every guest page-table entry is itself read through
  the nested layer (as a user *write*, so nested A/D bits are set); a
  failure is a :class:`GuestPageFault` injected into the guest as #PF.

The walk order follows §15.25.6: nested walk of each guest PTE, guest PTE
check, guest permission check, nested walk of the final GPA.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Callable

from ..arch import CR4_PAE, CR4_PSE, EFER_LMA
from .legacy_paging import walk_legacy
from .paging import ADDR_MASK, Access, PFErr, WalkResult, canonical, walk

if TYPE_CHECKING:
    from .encryption import EncryptionLayer, MemoryEncryption
    from .hostmem import HostMemory

_Q = struct.Struct("<Q")
_L = struct.Struct("<L")


@dataclass
class NestedFault(Exception):
    """A nested translation failed: VMEXIT_NPF with these EXITINFO1/2."""
    exitinfo1: int
    gpa: int


@dataclass
class GuestPageFault(Exception):
    """The guest's own walk failed: #PF with ``error_code``, CR2 = ``address``."""
    error_code: int
    address: int


@dataclass
class GuestGP(Exception):
    """A non-canonical guest address: #GP(0) (or #SS for stack accesses)."""
    address: int


@dataclass
class GuestException(Exception):
    """An exception the memory system raises in the guest itself (SEV-SNP's
    #VC PAGE_NOT_VALIDATED): vector and error code."""
    vector: int
    error_code: int


@dataclass
class WalkStats:
    """Memory references made by 2-D walks (APM §15.25.5, Figure 15-13).

    ``guest_entries`` counts guest page-table entries read, ``nested_entries``
    every nested page-table entry read -- those of the nested walks of each
    guest table *and* of the final GPA.  ``data_refs`` counts the final
    data/code accesses the completed walks were made for: one per walk,
    kept apart from the table references.
    """
    guest_entries: int = 0
    nested_entries: int = 0
    walks: int = 0
    data_refs: int = 0

    @property
    def table_refs(self) -> int:
        return self.guest_entries + self.nested_entries

    def snapshot(self) -> dict[str, int]:
        return {"walks": self.walks, "guest_pte_refs": self.guest_entries,
                "nested_pte_refs": self.nested_entries, "table_refs": self.table_refs,
                "data_refs": self.data_refs}


class NestedLayer:
    """GPA -> HPA through 4-level nested page tables in host memory."""

    def __init__(self, mem: "HostMemory", n_cr3: int, stats: WalkStats) -> None:
        self.mem, self.n_cr3, self.stats = mem, n_cr3 & ADDR_MASK, stats
        self._view = mem.view
        self._size = mem.size

    def _read(self, a: int) -> int:
        if a + 8 > self._size:
            raise LookupError(a)
        return _Q.unpack_from(self._view, a)[0]

    def _write(self, a: int, v: int) -> None:
        _Q.pack_into(self._view, a, v)

    def translate(self, gpa: int, access: int, *, final: bool = True, set_ad: bool = True) -> WalkResult:
        """Walk for ``gpa``; raises :class:`NestedFault` on failure.

        ``final`` says whether this is the guest's final data/code address
        (EXITINFO1 bit 32) or a guest page-table access (bit 33).
        """
        try:
            r = walk(self.n_cr3, gpa, access, True, None, None, wp=True, nxe=True, set_ad=set_ad,
                     table_mem=self._view, table_limit=self._size)
        except LookupError:
            r = WalkResult(fault=int(PFErr.P | PFErr.RSVD | PFErr.U |
                                     (PFErr.W if access == Access.WRITE else 0) |
                                     (PFErr.ID if access == Access.FETCH else 0)))
        self.stats.nested_entries += r.entries
        if r.fault is not None:
            bits = PFErr.FINAL if final else PFErr.PT_WALK
            raise NestedFault(r.fault | int(bits), gpa)
        if r.phys + 1 > self._size:
            raise NestedFault(int(PFErr.P | PFErr.RSVD | PFErr.U | (PFErr.FINAL if final else PFErr.PT_WALK)), gpa)
        return r

    def path(self, gpa: int, levels: int) -> list[tuple[int, int]]:
        """The first ``levels`` entries a walk for ``gpa`` reads, as (host address,
        value) pairs, read with no side effect: after a walk that succeeded, what
        its result rests on (the same entries give the same walk)."""
        out = []
        table = self.n_cr3
        for shift in (39, 30, 21, 12)[:levels]:
            a = table | ((gpa >> shift) & 0x1FF) << 3
            e = self._read(a)
            out.append((a, e))
            table = e & ADDR_MASK
        return out


class IdentityNested(NestedLayer):
    """NP_ENABLE = 0: guest-physical is host-physical (no nested translation)."""

    def __init__(self, mem: "HostMemory", stats: WalkStats) -> None:
        super().__init__(mem, 0, stats)

    def translate(self, gpa: int, access: int, *, final: bool = True, set_ad: bool = True) -> WalkResult:
        if gpa + 1 > self._size:
            raise NestedFault(int(PFErr.U | (PFErr.FINAL if final else PFErr.PT_WALK)), gpa)
        return WalkResult(phys=gpa, writable=True, user=True, executable=True, dirty=True)

    def path(self, gpa: int, levels: int) -> list[tuple[int, int]]:
        return []

def _always() -> bool:
    return True


class GuestLayer:
    """GVA -> GPA through the guest's own page tables, reading them via ``nested``."""

    def __init__(self, nested: NestedLayer, cr0: int, cr3: int, cr4: int, efer: int, stats: WalkStats,
                 enc: "MemoryEncryption | None" = None) -> None:
        self.nested, self.stats = nested, stats
        #: the memory controller when the guest is encrypted: page-table reads are private
        self.enc = enc
        self._nocbit = ~enc.cbit_mask if enc is not None else -1
        self.paging = bool(cr0 & (1 << 31))
        self.wp = bool(cr0 & (1 << 16))
        self.cr3 = cr3
        self.nxe = bool(efer & (1 << 11))
        self.smep = bool(cr4 & (1 << 20))
        self.pge = bool(cr4 & (1 << 7))
        self.long_mode = bool(efer & EFER_LMA)
        self.pae = bool(cr4 & CR4_PAE)
        self.pse = bool(cr4 & CR4_PSE)
        self._mem = nested.mem
        self._view = nested.mem.view
        self._last: tuple[int, int] | None = None
        #: guest table page (GPA) -> (HPA page, nested entries its walk read), filled by
        #: :meth:`_entry_addr` (see there) and read in place by the walks that find a page here
        self.table_pages: dict[int, tuple[int, int]] = {}
        #: what :attr:`table_pages` rests on: the nested entries their walks read, as
        #: DRAM word index -> value (see :meth:`tables_current`)
        self.table_deps: dict[int, int] = {}
        #: False once two walks read one nested entry with different values: a
        #: cache made of both is no walk's, and :meth:`tables_current` never holds
        self._deps_consistent = True
        self._deps_check: Callable[[], bool] | None = None

    def _read(self, gpa: int) -> int:
        """One 8-byte guest page-table entry, read through the nested layer (:meth:`_entry_addr`)."""
        return _Q.unpack_from(self._view, self._entry_addr(gpa))[0]

    def _read4(self, gpa: int) -> int:
        """One 4-byte entry of 32-bit paging."""
        return _L.unpack_from(self._view, self._entry_addr(gpa))[0]

    def _entry_addr(self, gpa: int) -> int:
        """The host address of the guest page-table entry at ``gpa``.

        A guest page-table read is a user write at the nested level (APM
        §15.25.6).  The nested translation of each table page is remembered
        for this walker's life, as the processor's nested TLB would: within a
        VMRUN (the hypervisor, the only one who changes the nested tables, runs
        only between them), and past one only while :meth:`tables_current`
        holds; the references are counted all the same -- they are the
        architectural walk's, not the model's work -- and the nested A/D bits
        were set by the walk that filled the entry."""
        gpa &= self._nocbit
        page = gpa & ~0xFFF
        hit = self.table_pages.get(page)
        if hit is None:
            r = self.nested.translate(gpa, Access.WRITE, final=False)
            phys = r.phys
            self.table_pages[page] = (phys & ~0xFFF, r.entries)
            deps = self.table_deps
            for a, v in self.nested.path(gpa, r.entries):
                if deps.setdefault(a >> 3, v) != v:
                    self._deps_consistent = False
            self._deps_check = None
        else:
            phys = hit[0] | (gpa & 0xFFF)
            self.stats.nested_entries += hit[1]
        self.stats.guest_entries += 1
        self._last = (gpa, phys)
        return phys if self.enc is None else self.enc.pt_paddr(phys, gpa)   # SEV: PT walks are private

    def tables_current(self) -> bool:
        """Whether :attr:`table_pages` is what a new walker would make: every
        nested entry the walks that filled it read still holds the value they
        left (their Accessed and Dirty bits included).  The same entries give
        the same nested walk -- the same host page, the same references
        counted, no bit to set -- so a walker whose guest controls are unchanged
        can be kept past a VMRUN, or from one fuzz case to the next, exactly as
        if it were built anew: a restored or edited nested table, a remapped
        table page, a cleared A/D bit all fail this check."""
        check = self._deps_check
        if check is None:
            if not self._deps_consistent:
                return False
            deps = self.table_deps
            if not deps:
                check = _always
            else:
                # one C call reads every entry: itemgetter over the DRAM's 64-bit words
                q, keys, vals = self._mem.qwords, tuple(deps), tuple(deps.values())
                get = itemgetter(*keys) if len(keys) > 1 else itemgetter(keys[0], keys[0])
                if len(keys) == 1:
                    vals = vals * 2
                check = lambda: get(q) == vals      # noqa: E731
            self._deps_check = check
        return check()

    def _written_addr(self, gpa: int) -> int:
        # setting A/D is a locked update of the entry just read: same host address, no new walk
        gpa &= self._nocbit
        last = self._last
        phys = last[1] if last is not None and last[0] == gpa else \
            self.nested.translate(gpa, Access.WRITE, final=False).phys
        return phys if self.enc is None else self.enc.pt_paddr(phys, gpa)

    def _write(self, gpa: int, v: int) -> None:
        _Q.pack_into(self._view, self._written_addr(gpa), v)

    def _write4(self, gpa: int, v: int) -> None:
        _L.pack_into(self._view, self._written_addr(gpa), v)

    def translate(self, gva: int, access: int, user: bool, set_ad: bool = True) -> WalkResult:
        if not self.paging:
            return WalkResult(phys=gva & 0xFFFF_FFFF_FFFF, writable=True, user=True, executable=True, dirty=True)
        if not self.long_mode:
            # legacy paging (APM vol. 2 §5.2-5.3): PAE with 8-byte entries, else 32-bit
            r = walk_legacy(self.cr3, gva, access, user, self._read if self.pae else self._read4,
                            self._write if self.pae else self._write4, pae=self.pae, wp=self.wp,
                            nxe=self.nxe, pse=self.pse, smep=self.smep, set_ad=set_ad)
            if r.fault is not None:
                raise GuestPageFault(r.fault, gva & 0xFFFF_FFFF)
            return r
        if not canonical(gva):
            raise GuestGP(gva)
        if self.enc is None:
            # the table pages whose nested translation is known are read in place (see walk)
            r = walk(self.cr3, gva, access, user, self._read, self._write, wp=self.wp, nxe=self.nxe,
                     set_ad=set_ad, smep=self.smep, table_mem=self._view, table_pages=self.table_pages,
                     stats=self.stats)
        else:
            r = walk(self.cr3, gva, access, user, self._read, self._write, wp=self.wp, nxe=self.nxe,
                     set_ad=set_ad, smep=self.smep)
        if r.fault is not None:
            raise GuestPageFault(r.fault, gva)
        return r


@dataclass
class Translation:
    """A completed 2-D translation of one page."""
    gva: int
    gpa: int
    hpa: int
    writable: bool
    executable: bool
    dirty: bool
    user: bool = True
    global_: bool = False
    #: SEV: the access is private (guest C-bit, or a fetch); ``hpa`` is then the
    #: processor's plaintext-cache address and ``dram`` the page's real HPA
    private: bool = False
    dram: int | None = None


@dataclass
class TwoDimWalker:
    """The stack: :class:`GuestLayer` over :class:`NestedLayer`, and with
    memory encryption an :class:`~sandbox.memory.encryption.EncryptionLayer`
    making the final step."""
    guest: GuestLayer
    nested: NestedLayer
    stats: WalkStats = field(default_factory=WalkStats)
    #: the final step when guest memory is encrypted (``final(gva, g, access, set_ad)``)
    encryption: "EncryptionLayer | None" = None

    def count_into(self, stats: WalkStats) -> None:
        """Count this walker's memory references into ``stats`` from now on (every layer's)."""
        self.stats = self.guest.stats = self.nested.stats = stats
        if self.encryption is not None:
            self.encryption.stats = stats

    def translate(self, gva: int, access: int, user: bool, set_ad: bool = True) -> Translation:
        self.stats.walks += 1
        g = self.guest.translate(gva, access, user, set_ad)
        if self.encryption is not None:
            return self.encryption.final(gva, g, access, set_ad)
        n = self.nested.translate(g.phys, access, final=True, set_ad=set_ad)
        self.stats.data_refs += 1
        return Translation(gva=gva, gpa=g.phys, hpa=n.phys, writable=g.writable and n.writable,
                           executable=g.executable and n.executable, dirty=g.dirty and n.dirty, user=g.user,
                           global_=g.global_ and self.guest.pge)
