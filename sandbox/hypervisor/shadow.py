"""Shadow paging: memory virtualization without nested paging (APM §15.25
describes what NPT replaced; KVM's ``mmu`` shadow mode is the model).

With NP_ENABLE = 0 the processor walks whatever CR3 the VMCB holds as
host-physical tables.  The hypervisor therefore hands it *shadow* tables
that map each guest-virtual page straight to its host page (GVA -> HPA),
built lazily from the guest's own tables (GVA -> GPA) and its RAM map
(GPA -> HPA), and keeps them in sync by intercepting:

* **#PF** (exception 14): a shadow miss.  The hypervisor walks the guest's
  tables itself -- setting the guest's Accessed/Dirty bits as the hardware
  would -- and either installs the shadow entry or reflects the guest's own
  #PF with the guest's error code.  A shadow entry is writable only once the
  guest entry is Dirty, so the first write faults and sets D.
* **MOV to CR3** / **MOV from CR3**: the guest's CR3 is virtual; a write
  switches (and resynchronizes) the shadow, a read returns the guest's value.
* **INVLPG**: the guest drops one translation; so does the shadow.
* **MMIO**: a guest page that maps a device window (:meth:`Machine.map_mmio`,
  ``TRAP`` mode) never gets a shadow entry, so every access to it is a #PF
  exit; the hypervisor finds the GPA by the guest walk and emulates the
  instruction against the device, as the shadow MMUs of 2007 did (KVM's
  ``kvm_mmu_page_fault`` handing a fault on a GFN outside every memory slot to
  its instruction emulator, Xen's ``sh_page_fault`` to ``handle_mmio``).
  There is no #PF-free way to reach a device without nested paging.
* **writes to guest page-table pages**: every page the walker has seen used
  as a guest table is mapped read-only in the shadow.  A write to one faults;
  the hypervisor then drops the shadow (it was derived from that table) and
  lets the page be written until the guest's next CR3 write or INVLPG, the
  points where the architecture makes the guest's own TLB coherent again.

Guest RAM must be backed by 4 KiB pages; the shadow uses 4 KiB leaves even
where the guest uses large pages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..memory.hostmem import PAGE_SIZE
from ..memory.mmu import GuestGP, GuestPageFault, NestedFault
from ..memory.paging import ADDR_MASK, Access, PFErr, TableBuilder, canonical, walk
from ..svm.cpu import ExitRecord
from ..svm.events import Vec
from ..svm.exitcodes import ExitCode
from ..svm.stop import StopReason
from ..svm.vmcb import EventType, NpControl, TlbControl
from .devices import MmioMode
from .handlers import Action, handle_mmio

if TYPE_CHECKING:
    from .machine import Machine

CR_VALID = 1 << 63
PF_VEC = Vec.PF


@dataclass
class ShadowStats:
    shadow_faults: int = 0        # #PF exits fixed by installing a shadow entry
    guest_faults: int = 0         # #PF exits reflected into the guest
    pt_write_faults: int = 0      # writes to write-protected guest page tables
    cr3_writes: int = 0
    invlpg: int = 0
    zaps: int = 0                 # whole-shadow rebuilds
    guest_entries: int = 0        # guest page-table entries the hypervisor read
    mmio_faults: int = 0          # #PF exits that were device (MMIO) accesses, emulated

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


class ShadowPager:
    """The hypervisor's shadow MMU for the machine's current guest."""

    def __init__(self, m: "Machine") -> None:
        g = m.guest
        if g.npt_page != PAGE_SIZE:
            raise ValueError("shadow paging needs guest RAM backed by 4 KiB pages")
        self.m, self.guest, self.mem = m, g, m.mem
        self.stats = ShadowStats()
        self.guest_cr3 = g.vmcb.CR3
        self._seen: list[int] = []
        self._tables: set[int] = set()          # host pages of the shadow tables
        self.protected: set[int] = set()        # GPAs of guest page-table pages (write-protected)
        self._writable: set[int] = set()        # GPAs some shadow entry maps writable
        self._unsynced: set[int] = set()        # table pages the guest may write until it resyncs
        self._root = 0
        self._new_root()
        v = g.vmcb
        v.NP_CONTROL = v.NP_CONTROL & ~NpControl.NP_ENABLE
        v.N_CR3 = 0
        for code in (ExitCode.CR3_READ, ExitCode.CR3_WRITE, ExitCode.INVLPG, ExitCode.EXCP_PF):
            v.set_intercept(code)
        m.on(ExitCode.CR3_READ)(self.on_cr3_read)
        m.on(ExitCode.CR3_WRITE)(self.on_cr3_write)
        m.on(ExitCode.INVLPG)(self.on_invlpg)
        m.on(ExitCode.EXCP_PF)(self.on_page_fault)

    # -- the shadow tables ----------------------------------------------------
    def _alloc(self) -> int:
        t = self.mem.alloc_page()
        self._tables.add(t)
        return t

    def _new_root(self) -> None:
        for t in self._tables:
            self.mem.free_page(t)
        self._tables.clear()
        self._writable.clear()
        self._root = self._alloc()
        self._builder = TableBuilder(self._root, self._alloc, self.mem.read_u64, self.mem.write_u64)
        self.guest.vmcb.CR3 = self._root
        self.guest.vmcb.TLB_CONTROL = TlbControl.FLUSH_ASID

    def zap(self) -> None:
        """Drop every shadow translation (rebuilt lazily on the next faults)."""
        self.stats.zaps += 1
        self._unsynced.clear()
        self._new_root()

    def attach_cr3(self, cr3: int) -> None:
        """Take ``cr3`` (a GPA) as the guest's CR3, as loaded into the VMCB by
        the loader, and run the guest on an empty shadow."""
        self.guest_cr3 = cr3
        self.protected.clear()
        self.zap()

    @property
    def shadow_root(self) -> int:
        return self._root

    # -- the guest's own tables, walked by the hypervisor -----------------------
    def _gpa_to_hpa(self, gpa: int) -> int:
        hpa = self.guest.ram.get(gpa & ~(PAGE_SIZE - 1))
        if hpa is None:
            raise LookupError(gpa)
        return hpa | (gpa & (PAGE_SIZE - 1))

    def _read(self, gpa: int) -> int:
        self.stats.guest_entries += 1
        self._seen.append(gpa & ~(PAGE_SIZE - 1))
        return self.mem.read_u64(self._gpa_to_hpa(gpa))

    def _write(self, gpa: int, v: int) -> None:
        self.mem.write_u64(self._gpa_to_hpa(gpa), v)

    def guest_walk(self, gva: int, access: int, user: bool, set_ad: bool = True):
        """The guest's GVA -> GPA walk as the processor would do it."""
        v = self.guest.vmcb
        self._seen: list[int] = []
        return walk(self.guest_cr3, gva, access, user, self._read, self._write, wp=bool(v.CR0 & (1 << 16)),
                    nxe=bool(v.EFER & (1 << 11)), set_ad=set_ad, smep=bool(v.CR4 & (1 << 20)))

    def translate(self, gva: int, access: int = Access.READ, set_ad: bool = False) -> int:
        """GVA -> HPA through the guest's tables, for the hypervisor's own use.

        Fails the way the nested-paging walk does, so a handler behaves the same
        in both modes: GuestGP for a non-canonical address, GuestPageFault with
        the guest's error code, NestedFault for a guest table or page outside
        guest RAM (which nested paging would find unmapped in the NPT)."""
        if not canonical(gva):
            raise GuestGP(gva)
        try:
            r = self.guest_walk(gva, access, False, set_ad=set_ad)
        except LookupError as e:
            raise NestedFault(int(PFErr.U | PFErr.PT_WALK), e.args[0]) from None
        if r.fault is not None:
            raise GuestPageFault(r.fault, gva)
        try:
            return self._gpa_to_hpa(r.phys)
        except LookupError:
            raise NestedFault(int(PFErr.U | PFErr.FINAL), r.phys) from None

    # -- exit handlers --------------------------------------------------------
    def on_page_fault(self, m: "Machine", e: ExitRecord) -> Action | None:
        gva, err = e.exitinfo2, e.exitinfo1 & 0xFFFF_FFFF
        access = Access.FETCH if err & 0x10 else (Access.WRITE if err & 0x2 else Access.READ)
        user = bool(err & 0x4)
        if not canonical(gva):
            return self._reflect(e, err)
        try:
            r = self.guest_walk(gva, access, user)
        except LookupError:
            return m.stop(StopReason.SHADOW_ERROR, f"guest table at a GPA outside RAM while walking {gva:#x}")
        if r.fault is not None:
            self.stats.guest_faults += 1
            return self._reflect(e, r.fault)
        gpa = r.phys & ~(PAGE_SIZE - 1)
        fresh = [t for t in self._seen if t not in self.protected]
        self.protected.update(self._seen)
        region = m.bus.region(r.phys) if m.bus.regions else None
        if region is not None or gpa not in self.guest.ram:
            return self._mmio(m, e, gva, r.phys, region)
        if access == Access.WRITE and gpa in self.protected:
            # a write to a guest page table: the shadow derived from it goes,
            # and the table is writable until the guest resynchronizes
            self.stats.pt_write_faults += 1
            self.zap()
            self._unsynced.add(gpa)
        elif any(t in self._writable for t in fresh):
            self.zap()                       # a page just found to be a table was mapped writable
        else:
            self.stats.shadow_faults += 1
        self._install(gva, gpa, r)
        self._reinject(e)
        return None

    def _mmio(self, m: "Machine", e: ExitRecord, gva: int, gpa: int, region) -> Action | None:
        """A #PF on a page that maps a device: emulate the access, leave the page unshadowed."""
        if region is None:
            return m.stop(StopReason.SHADOW_ERROR, f"GVA {gva:#x} maps GPA {gpa:#x}, which is not guest RAM")
        if region.mode is not MmioMode.TRAP:
            return m.stop(StopReason.SHADOW_ERROR, f"GVA {gva:#x} maps GPA {gpa:#x}, a GRANT-mode device window: "
                                                   f"granting a page needs nested paging")
        if e.exitintinfo & (1 << 31):
            return m.stop(StopReason.SHADOW_ERROR, f"event delivery touched the device window at GPA {gpa:#x}")
        self.stats.mmio_faults += 1
        return handle_mmio(m, e, region, gpa)

    def _install(self, gva: int, gpa: int, r) -> None:
        writable = r.writable and r.dirty and (gpa not in self.protected or gpa in self._unsynced)
        self._builder.map(gva & ~(PAGE_SIZE - 1) & ((1 << 64) - 1), self.guest.ram[gpa], write=writable,
                          user=r.user, execute=r.executable)
        if writable:
            self._writable.add(gpa)
        # no flush: the TLB holds no not-present entries, and a read-only
        # entry is walked again on the write that needs more (§5.5)

    def _reflect(self, e: ExitRecord, err: int) -> Action | None:
        """The guest's own #PF: CR2 and the error code its tables produced."""
        v = self.guest.vmcb
        v.CR2 = e.exitinfo2
        self.m.inject(PF_VEC, EventType.EXCEPTION, err)
        return None

    def _reinject(self, e: ExitRecord) -> None:
        """A shadow fault hit while the processor was delivering an event: that
        event (EXITINTINFO, APM §15.7.2) is injected again."""
        info = e.exitintinfo
        if info & (1 << 31):
            self.guest.vmcb.EVENTINJ = info

    def on_cr3_write(self, m: "Machine", e: ExitRecord) -> Action | None:
        if not e.exitinfo1 & CR_VALID:
            return m.stop(StopReason.SHADOW_ERROR, "MOV to CR3 without decode assists")
        self.stats.cr3_writes += 1
        self.attach_cr3(m.cpu.guest_gpr(e.exitinfo1 & 0xF) & (ADDR_MASK | 0x18))
        m.advance(e)
        return None

    def on_cr3_read(self, m: "Machine", e: ExitRecord) -> Action | None:
        if not e.exitinfo1 & CR_VALID:
            return m.stop(StopReason.SHADOW_ERROR, "MOV from CR3 without decode assists")
        m.cpu.set_guest_gpr(e.exitinfo1 & 0xF, self.guest_cr3)
        m.advance(e)
        return None

    def on_invlpg(self, m: "Machine", e: ExitRecord) -> Action | None:
        self.stats.invlpg += 1
        if self._unsynced:
            self.zap()              # tables the guest wrote freely: resynchronize everything
        else:
            slot = self._builder.entry_addr(e.exitinfo1 & ~(PAGE_SIZE - 1))
            if slot is not None:
                self.mem.write_u64(slot, 0)
            m.invlpga(e.exitinfo1, self.guest.vmcb.GUEST_ASID)
        m.advance(e)
        return None
