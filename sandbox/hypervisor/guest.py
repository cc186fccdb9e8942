"""One virtual machine as the hypervisor builds it: VMCB, nested page tables, IOPM, MSRPM and RAM."""
from __future__ import annotations

import struct

from ..memory.hostmem import PAGE_SIZE, HostMemory, HostMemoryError, page_spans
from ..memory.npt import NestedPageTable
from ..memory.paging import TableBuilder
from ..svm.exitcodes import ExitCode
from ..svm.iopm import IOPM, IOPM_PAGES
from ..svm.msrpm import MSRPM, MSRPM_PAGES
from ..svm.vmcb import VMCB, NpControl, Segment, TlbControl
from .image import CS_ATTRIB, CS_SEL, DS_ATTRIB, DS_SEL, GDT, GDT_BASE, PT_BASE, STACK_TOP, Image

#: the loader's identity tables use 4 KiB pages below this guest-physical address, 2 MiB pages above
SMALL_PAGE_LIMIT = 64 << 20

#: leaf sizes the nested page table can back guest RAM with
NPT_PAGE_SIZES = (4 << 10, 2 << 20, 1 << 30)


class GuestPhysicalMemory:
    """Guest-physical access through a nested page table (``self.npt``) into
    host memory (``self.mem``), as the hypervisor reads and writes a guest."""

    #: how an error names the address space
    SPACE = "GPA"
    mem: HostMemory
    npt: NestedPageTable
    vmcb_hpa: int
    vmcb: VMCB
    #: the VMCB page as qwords (``vmcb_q[OFF_RAX >> 3]`` is the guest's RAX): for the exit path,
    #: which reads the never-cached fields RAX/RSP/RIP in place (no HostMemory round trip)
    vmcb_q: memoryview

    def alloc_vmcb(self) -> None:
        """Give this context its VMCB: a zeroed host page, its accessor and its qword view."""
        self.vmcb_hpa = self.mem.alloc_page()
        self.vmcb = VMCB(self.mem, self.vmcb_hpa)
        self.vmcb_q = self.mem.qwords[self.vmcb_hpa >> 3:(self.vmcb_hpa + PAGE_SIZE) >> 3]

    def gpa_to_hpa(self, gpa: int) -> int:
        hpa = self.npt.lookup(gpa)
        if hpa is None:
            raise KeyError(f"{self.SPACE} {gpa:#x} is not mapped in the nested page table")
        return hpa

    def read_phys(self, gpa: int, n: int) -> bytes:
        """``n`` bytes from guest-physical ``gpa``, page by page through the nested mappings."""
        if n <= PAGE_SIZE - (gpa & 0xFFF):
            return self.mem.read(self.gpa_to_hpa(gpa), n) if n > 0 else b""
        return b"".join(self.mem.read(self.gpa_to_hpa(a), c) for a, _, c in page_spans(gpa, n))

    def write_phys(self, gpa: int, data: bytes) -> None:
        """Write ``data`` at guest-physical ``gpa``, page by page (a view of it: a
        kernel image of megabytes is not copied once per page)."""
        view = memoryview(data).cast("B")
        for a, at, c in page_spans(gpa, len(view)):
            self.mem.write(self.gpa_to_hpa(a), view[at:at + c])


class Guest(GuestPhysicalMemory):
    """One virtual machine: its VMCB, nested page tables and RAM.

    Guest RAM is ``ram_size`` bytes of guest-physical memory, each 4 KiB page
    backed by a host page and mapped in the nested page table.
    """

    def __init__(self, mem: HostMemory, ram_size: int = 16 << 20, asid: int = 1,
                 npt_page: int = PAGE_SIZE) -> None:
        if ram_size % PAGE_SIZE or ram_size < 0x200000:
            raise ValueError("guest RAM must be a multiple of 4 KiB and at least 2 MiB")
        if npt_page not in NPT_PAGE_SIZES:
            raise ValueError(f"nested page size must be 4 KiB, 2 MiB or 1 GiB, not {npt_page:#x}")
        if ram_size % npt_page:
            raise ValueError(f"guest RAM ({ram_size:#x}) is not a multiple of the nested page size {npt_page:#x}")
        self.mem, self.ram_size, self.npt_page = mem, ram_size, npt_page
        self.migrations = 0
        self.alloc_vmcb()
        self.iopm = IOPM(mem, mem.alloc_contiguous(IOPM_PAGES))
        self.msrpm = MSRPM(mem, mem.alloc_contiguous(MSRPM_PAGES))
        self.npt = NestedPageTable(mem, on_change=self._npt_changed)
        self.ram: dict[int, int] = {}
        if npt_page == PAGE_SIZE:
            for gpa in range(0, ram_size, PAGE_SIZE):
                hpa = mem.alloc_page()
                self.ram[gpa] = hpa
                self.npt.map(gpa, hpa)
        else:
            # large nested pages need host memory contiguous and aligned to their size
            try:
                base = mem.alloc_contiguous(ram_size // PAGE_SIZE, align=npt_page)
            except HostMemoryError as e:
                raise ValueError(f"cannot back guest RAM with {npt_page >> 20} MiB nested pages: {e}") from None
            for gpa in range(0, ram_size, npt_page):
                self.npt.map(gpa, base + gpa, size=npt_page)
            self.ram = {gpa: base + gpa for gpa in range(0, ram_size, PAGE_SIZE)}
        v = self.vmcb
        v.IOPM_BASE_PA = self.iopm.hpa
        v.MSRPM_BASE_PA = self.msrpm.hpa
        v.GUEST_ASID = asid
        v.NP_CONTROL = NpControl.NP_ENABLE
        v.N_CR3 = self.npt.n_cr3
        v.G_PAT = 0x0007040600070406
        v.set_intercept(ExitCode.VMRUN)

    def _npt_changed(self) -> None:
        # a mapping changed under a possibly cached translation: flush this
        # guest's TLB entries at the next VMRUN (what KVM does after NPT edits)
        self.vmcb.TLB_CONTROL = TlbControl.FLUSH_ASID

    # -- moving guest memory ---------------------------------------------------
    def migrate_page(self, gpa: int, new_hpa: int | None = None) -> int:
        """Move one 4 KiB guest page to another host page while the guest
        lives: copy it, point the nested entry at the copy, and have the next
        VMRUN flush this guest's ASID (``on_change``), so no stale
        translation reaches the old page.  The old page is scrubbed and
        freed.  Returns the new HPA."""
        if gpa % PAGE_SIZE or gpa not in self.ram:
            raise ValueError(f"GPA {gpa:#x} is not a page of guest RAM")
        if self.npt_page != PAGE_SIZE:
            raise ValueError("pages can only be migrated when guest RAM uses 4 KiB nested pages")
        old = self.ram[gpa]
        new = self.mem.alloc_page(zero=False) if new_hpa is None else new_hpa
        if new == old:
            return old
        self.mem.write(new, self.mem.read(old, PAGE_SIZE))
        self.npt.map(gpa, new)
        self.ram[gpa] = new
        self.mem.write(old, bytes(PAGE_SIZE))       # nothing of the guest stays behind
        self.mem.free_page(old)
        self.migrations += 1
        return new

    def fragmentation(self) -> int:
        """How many guest pages do not follow their GPA predecessor in host memory."""
        gpas = sorted(self.ram)
        return sum(1 for a, b in zip(gpas, gpas[1:]) if self.ram[b] != self.ram[a] + PAGE_SIZE)

    def compact(self) -> int:
        """Move all of guest RAM into one contiguous, GPA-ordered run of host
        pages (as a memory-compaction pass would); returns its base HPA."""
        gpas = sorted(self.ram)
        base = self.mem.alloc_contiguous(len(gpas), zero=False)
        for i, gpa in enumerate(gpas):
            self.migrate_page(gpa, base + i * PAGE_SIZE)
        return base

    # -- entry state -----------------------------------------------------------
    def setup_long_mode(self, entry: int, rsp: int = STACK_TOP) -> None:
        """Build the loader's GDT and identity page tables; set the VMCB's
        state-save area to the documented entry state (see :mod:`sandbox.hypervisor.loader`)."""
        self.write_phys(GDT_BASE, struct.pack("<3Q", *GDT))
        nxt = [PT_BASE]

        def alloc() -> int:
            nxt[0] += PAGE_SIZE
            self.write_phys(nxt[0], bytes(PAGE_SIZE))
            return nxt[0]
        self.write_phys(PT_BASE, bytes(PAGE_SIZE))
        rd = lambda a: struct.unpack("<Q", self.read_phys(a, 8))[0]
        wr = lambda a, val: self.write_phys(a, struct.pack("<Q", val))
        tb = TableBuilder(PT_BASE, alloc, rd, wr)
        # 4 KiB pages over the first 64 MiB; beyond, 2 MiB pages, so the tables of
        # a large guest still fit the loader's area below 0x80000
        small = min(self.ram_size, SMALL_PAGE_LIMIT)
        for gpa in range(0, small, PAGE_SIZE):
            tb.map(gpa, gpa, write=True, user=False, execute=True)
        big = 2 << 20
        for gpa in range(small, self.ram_size, big):
            if gpa + big <= self.ram_size:
                tb.map(gpa, gpa, write=True, user=False, execute=True, size=big)
            else:                             # a tail shorter than 2 MiB
                for g in range(gpa, self.ram_size, PAGE_SIZE):
                    tb.map(g, g, write=True, user=False, execute=True)
        if nxt[0] >= 0x80000:
            raise ValueError("guest RAM too large for the loader's page-table area")
        v = self.vmcb
        v.set_seg("CS", Segment(CS_SEL, CS_ATTRIB, 0xFFFFFFFF, 0))
        for s in ("SS", "DS", "ES"):
            v.set_seg(s, Segment(DS_SEL, DS_ATTRIB, 0xFFFFFFFF, 0))
        v.set_seg("GDTR", Segment(0, 0, len(GDT) * 8 - 1, GDT_BASE))
        v.set_seg("IDTR", Segment(0, 0, 0, 0))
        v.CR0 = 0x8001_0033          # PG WP NE ET MP PE
        v.CR3 = PT_BASE
        v.CR4 = 0x0000_0620          # OSXMMEXCPT OSFXSR PAE
        v.EFER = 0x1D00              # NXE LMA LME SVME
        v.RFLAGS = 0x2
        v.RIP = entry
        v.RSP = rsp
        v.CPL = 0
        v.DR6 = 0xFFFF0FF0
        v.DR7 = 0x400

    def load(self, image: Image) -> None:
        for gpa, data in image.segments:
            self.write_phys(gpa, data)
        self.setup_long_mode(image.entry)
