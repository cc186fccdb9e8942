"""The root-mode hypervisor: guests, the exit-handler table, default handlers.

:class:`Machine` is the public entry point.  It owns host DRAM and the SVM
processor, creates a :class:`Guest` (VMCB, nested page tables, IOPM, MSRPM,
guest RAM), and runs the loop of a real hypervisor: VMRUN, take the
#VMEXIT, dispatch on EXITCODE through :attr:`Machine.handlers` (one small
function per exit code, as in KVM's ``svm_exit_handlers``), VMRUN again.
"""
from __future__ import annotations

import collections
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable

from unicorn import x86_const as X

from ..svm import intercepts as I
from ..arch import EFER_SVME
from ..svm.cpu import RunLimits, StopInfo, SvmCpu, ExitRecord, VmrunError
from ..svm.cpustate import GPR_IDS, GPR_NAMES
from .devices import COM1, DeviceBus, MmioRegion, Serial16550
from .mmio import AccessForm, MmioDecodeError, complete, decode_access, decode_form
from ..svm.exitcodes import ExitCode, exit_name
from ..memory.hostmem import PAGE_SIZE, HostMemory, HostMemoryError
from ..svm.iopm import IOPM, IOPM_PAGES, IoioInfo
from .loader import (CS_ATTRIB, CS_SEL, DS_ATTRIB, DS_SEL, GDT, GDT_BASE, PT_BASE, STACK_TOP, Image,
                     load_image)
from ..svm.msrpm import MSRPM, MSRPM_PAGES
from ..memory.mmu import GuestGP, GuestPageFault, NestedFault
from ..memory.npt import NestedPageTable
from ..memory.mmu import WalkStats
from ..memory.paging import Access, TableBuilder
from .shadow import ShadowPager
from ..memory.tlb import TlbMode, TlbStats
from ..svm.vmcb import VMCB, Event, EventType, NpControl, Segment, TlbControl
from ..svm.stop import StopReason


class MmioMode(Enum):
    """How a hypervisor serves an MMIO window (see :meth:`Machine.map_mmio`)."""
    TRAP = "trap"        # every access exits and is emulated
    GRANT = "grant"      # the first access maps a register page; writes are found by Dirty-bit polling


class Action(Enum):
    RESUME = "resume"
    STOP = "stop"


RESUME, STOP = Action.RESUME, Action.STOP

#: leaf sizes the nested page table can back guest RAM with
NPT_PAGE_SIZES = (4 << 10, 2 << 20, 1 << 30)
#: how guest memory is virtualized: the processor's nested paging, or the hypervisor's shadow tables
PAGING_MODES = ("nested", "shadow")
HC_EXIT = 0
HC_PRINT = 1
HYPERVISOR_VENDOR = b"AMDVSandbox\x00"
KVM_ENOSYS = 1000
KVM_EFAULT = 14
#: REP INS/OUTS elements emulated per exit; the rest re-executes (bounds one handler call)
STRING_IO_CHUNK = 1024


_GPR_INDEX = {n: i for i, n in enumerate(GPR_NAMES)}


class GuestRegs:
    """Guest general registers as a hypervisor sees them after #VMEXIT.

    RAX, RSP, RIP and RFLAGS live in the VMCB state-save area; the other
    GPRs stay in the processor (a real hypervisor saves them itself).
    """

    _VMCB = {"rax": "RAX", "rsp": "RSP", "rip": "RIP", "rflags": "RFLAGS"}

    def __init__(self, machine: "Machine") -> None:
        object.__setattr__(self, "_m", machine)

    def __getattr__(self, name: str) -> int:
        m = self._m
        if getattr(m, "sev_es", None) is not None:
            from ..sev.vmsa import SevEsRegisterError
            raise SevEsRegisterError(f"guest register {name} is in the encrypted VMSA (SEV-ES); use the GHCB")
        if name in self._VMCB:
            return getattr(m.guest.vmcb, self._VMCB[name])
        i = _GPR_INDEX.get(name)
        if i is not None:
            return m.cpu.guest_gpr(i)
        raise AttributeError(name)

    def __setattr__(self, name: str, value: int) -> None:
        m = self._m
        if getattr(m, "sev_es", None) is not None:
            from ..sev.vmsa import SevEsRegisterError
            raise SevEsRegisterError(f"guest register {name} is in the encrypted VMSA (SEV-ES); use the GHCB")
        if name in self._VMCB:
            setattr(m.guest.vmcb, self._VMCB[name], value)
        elif name in _GPR_INDEX:
            m.cpu.set_guest_gpr(_GPR_INDEX[name], value)
        else:
            raise AttributeError(name)

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in GPR_NAMES}


class Guest:
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
        self.vmcb_hpa = mem.alloc_page()
        self.vmcb = VMCB(mem, self.vmcb_hpa)
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

    # -- guest-physical memory --------------------------------------------------
    def gpa_to_hpa(self, gpa: int) -> int:
        hpa = self.npt.lookup(gpa)
        if hpa is None:
            raise KeyError(f"GPA {gpa:#x} is not mapped in the nested page table")
        return hpa

    def read_phys(self, gpa: int, n: int) -> bytes:
        out = b""
        while n > 0:
            chunk = min(n, PAGE_SIZE - (gpa & 0xFFF))
            out += self.mem.read(self.gpa_to_hpa(gpa), chunk)
            gpa, n = gpa + chunk, n - chunk
        return out

    def write_phys(self, gpa: int, data: bytes) -> None:
        while data:
            chunk = min(len(data), PAGE_SIZE - (gpa & 0xFFF))
            self.mem.write(self.gpa_to_hpa(gpa), data[:chunk])
            gpa, data = gpa + chunk, data[chunk:]

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
        for gpa in range(0, self.ram_size, PAGE_SIZE):
            tb.map(gpa, gpa, write=True, user=False, execute=True)
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


@dataclass
class RunResult:
    """How a run ended, for the CLI and the API."""
    reason: str
    detail: str
    exit_code: int | None              # the guest's EXIT hypercall code
    exits: int
    counts: dict[int, int]
    regs: dict[str, int]
    rip: int
    rflags: int
    console: str
    insns: int | None = None
    #: memory references of the processor's 2-D walks (see :class:`sandbox.memory.mmu.WalkStats`)
    walk: dict[str, int] = field(default_factory=dict)
    #: TLB hits, misses and flushes (see :class:`sandbox.memory.tlb.TlbStats`)
    tlb: dict[str, int] = field(default_factory=dict)
    #: the original exception when the processor model failed internally (reason "error")
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.reason == StopReason.GUEST_EXIT and (self.exit_code or 0) == 0 or self.reason == StopReason.HALT


Handler = Callable[["Machine", ExitRecord], Action | None]


class Machine:
    """A host with SVM, one guest, and the hypervisor loop.

    >>> m = Machine()
    >>> m.load("guest_images/hello.S")
    >>> result = m.run()
    """

    def __init__(self, dram: int = 64 << 20, ram: int = 16 << 20, *, npt_page: int = PAGE_SIZE,
                 tlb_mode: TlbMode = TlbMode.TAGGED, paging: str = "nested") -> None:
        if paging not in PAGING_MODES:
            raise ValueError(f"paging must be one of {', '.join(PAGING_MODES)}, not {paging!r}")
        self.mem = HostMemory(dram)
        self.cpu = SvmCpu(self.mem)
        self.cpu.tlb.mode = tlb_mode
        # the hypervisor enables SVM: EFER.SVME and VM_HSAVE_PA (as KVM's svm_hardware_enable)
        self.cpu.host_efer |= EFER_SVME
        self.cpu.vm_hsave_pa = self.mem.alloc_page()
        self.guest = Guest(self.mem, ram, npt_page=npt_page)
        self.guests: list[Guest] = [self.guest]
        self.regs = GuestRegs(self)
        self.bus = DeviceBus()
        self.serial = Serial16550(COM1)
        self.bus.attach(self.serial)
        self.cpu.io_passthrough = self.bus.io
        self.msrs: dict[int, int] = {0xC000_0103: 0, 0x1B: 0xFEE0_0900, 0x277: 0x0007040600070406}
        self.handlers: dict[int, Handler] = dict(DEFAULT_HANDLERS)
        self.counts: dict[int, int] = {}
        self.trace: collections.deque[ExitRecord] = collections.deque(maxlen=10_000)
        self.on_exit_record: Callable[[ExitRecord], None] | None = None
        self.console_sink: Callable[[bytes], None] | None = None
        self.serial.sink = self._console
        self.guest_exit_code: int | None = None
        self._stop_reason: tuple[str, str] | None = None
        self.cpuid_overrides: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self.timer_callback: Callable[["Machine"], None] | None = None
        self._mmio_forms: dict[tuple[int, bytes], AccessForm] = {}
        self.default_intercepts()
        #: the shadow MMU when the guest runs without nested paging
        self.shadow: ShadowPager | None = ShadowPager(self) if paging == "shadow" else None

    # -- more guests -----------------------------------------------------------
    def add_guest(self, asid: int, ram: int | None = None, npt_page: int | None = None) -> Guest:
        """A further guest with its own VMCB, NPT, RAM and ASID, armed with the
        default intercepts; :meth:`use` makes it the one :meth:`run` enters."""
        if any(g.vmcb.GUEST_ASID == asid for g in self.guests):
            raise ValueError(f"ASID {asid} is already in use by another guest")
        g = Guest(self.mem, ram or self.guest.ram_size, asid=asid, npt_page=npt_page or self.guest.npt_page)
        self.guests.append(g)
        cur, self.guest = self.guest, g
        try:
            self.default_intercepts()
        finally:
            self.guest = cur
        return g

    def use(self, guest: Guest) -> None:
        """Make ``guest`` the current guest (the next :meth:`run` is a world
        switch into it; handlers see it as ``m.guest``)."""
        if guest not in self.guests:
            raise ValueError("not a guest of this machine")
        self.guest = guest

    # -- devices ---------------------------------------------------------------
    def map_mmio(self, gpa: int, size: int, device, mode: MmioMode = MmioMode.TRAP) -> MmioRegion:
        """Give ``device`` the guest-physical window [gpa, gpa + size).

        The window's pages leave the nested page table, so a guest access
        exits with VMEXIT_NPF.  In ``TRAP`` mode every access is decoded and
        emulated against the device (:mod:`sandbox.hypervisor.mmio`); in ``GRANT`` mode
        the first access to a page maps a host page there (the device's
        register page) and later accesses run at full speed -- the device
        then learns about writes from the nested Dirty bits
        (:meth:`NestedPageTable.harvest_dirty`), typically on a timer.
        """
        region = self.bus.attach_mmio(gpa, size, device, MmioMode(mode))
        for page in range(gpa, gpa + size, PAGE_SIZE):
            self.guest.npt.unmap(page)
        return region

    def set_timer(self, period_ns: int, callback: Callable[["Machine"], None] | None = None) -> None:
        """A periodic interrupt every ``period_ns`` of guest time, taken as a
        #VMEXIT(INTR); ``callback(machine)`` runs on each (0 disarms)."""
        self.timer_callback = callback
        self.cpu.arm_timer(period_ns)
        self.guest.vmcb.set_intercept(ExitCode.INTR, bool(period_ns))

    # -- configuration ---------------------------------------------------------
    def default_intercepts(self) -> None:
        """What a small real hypervisor arms: the SVM instructions, HLT,
        shutdown, CPUID (virtualized leaves), and port I/O to COM1."""
        v = self.guest.vmcb
        for name in ("vmrun", "vmmcall", "vmload", "vmsave", "stgi", "clgi", "skinit", "invlpga",
                     "hlt", "shutdown", "cpuid", "ioio"):
            v.set_intercept(I.INTERCEPT_BITS[name])
        self.guest.iopm.set(COM1, True, 8)

    def intercept(self, names: str | Iterable[str], on: bool = True) -> None:
        """Arm (or disarm) intercepts by APM name or group (``all``, ``sensitive``)."""
        bits = I.resolve(list(names) if not isinstance(names, str) else names)
        for b in bits:
            self.guest.vmcb.set_intercept(b, on)
        if on and I.INTERCEPT_BITS["ioio"] in bits:
            self.guest.iopm.set_all(True)
        if on and I.INTERCEPT_BITS["msr"] in bits:
            self.guest.msrpm.set_all(True)

    def set_ports(self, ports: Iterable[int]) -> None:
        """Intercept exactly these ports (IOPM), arming IOIO_PROT."""
        self.guest.iopm.set_all(False)
        for p in ports:
            self.guest.iopm.set(p)
        self.guest.vmcb.set_intercept(ExitCode.IOIO)

    def set_msrs(self, spec: Iterable[tuple[int, bool, bool]]) -> None:
        """Intercept exactly these MSR accesses ((msr, read, write) tuples)."""
        self.guest.msrpm.set_all(False)
        for msr, r, w in spec:
            self.guest.msrpm.set(msr, read=r or None, write=w or None)
        self.guest.vmcb.set_intercept(ExitCode.MSR)

    def on(self, code: int) -> Callable[[Handler], Handler]:
        """Decorator: register ``fn(machine, exit)`` for exit code ``code``."""
        def deco(fn: Handler) -> Handler:
            self.handlers[int(code)] = fn
            return fn
        return deco

    def load(self, path: str) -> Image:
        img = load_image(path, self.guest.ram_size)
        self.guest.load(img)
        if self.shadow is not None:
            self.shadow.attach_cr3(self.guest.vmcb.CR3)
        return img

    def invlpga(self, va: int, asid: int) -> None:
        """The hypervisor executes INVLPGA (drop one page of one ASID's TLB)."""
        self.cpu.invlpga(va, asid)

    def load_hooks(self, path: str) -> None:
        """Load user handlers from a Python file (see ``hooks/``)."""
        from .hooks_loader import load_hooks
        load_hooks(self, path)

    # -- guest access for handlers ---------------------------------------------
    def read_virt(self, gva: int, n: int) -> bytes:
        """Read guest-virtual memory through the guest's page tables (no A/D side effects)."""
        out = b""
        while n > 0:
            chunk = min(n, PAGE_SIZE - (gva & 0xFFF))
            out += self.mem.read(self._virt_to_host(gva, Access.READ), chunk)
            gva, n = gva + chunk, n - chunk
        return out

    def write_virt(self, gva: int, data: bytes) -> None:
        while data:
            chunk = min(len(data), PAGE_SIZE - (gva & 0xFFF))
            self.mem.write(self._virt_to_host(gva, Access.WRITE, set_ad=True), data[:chunk])
            gva, data = gva + chunk, data[chunk:]

    def _virt_to_host(self, gva: int, access: int, set_ad: bool = False) -> int:
        """GVA -> HPA through the guest's own tables (and the NPT or the RAM
        map) on the guest's behalf: A/D bits only with ``set_ad`` (a write the
        hypervisor emulates for the guest), never the processor's counters."""
        if self.shadow is not None:
            return self.shadow.translate(gva, access, set_ad)
        t = self.cpu.walker(WalkStats()).translate(gva, access, False, set_ad=set_ad)
        return t.hpa if t.dram is None else t.dram          # SEV: the DRAM page, i.e. ciphertext

    def inject(self, vector: int, type: EventType = EventType.EXCEPTION, error_code: int | None = None) -> None:
        self.guest.vmcb.inject(Event(vector, type, error_code))

    def advance(self, exit: ExitRecord) -> None:
        """Skip the intercepted instruction (RIP = nRIP)."""
        self.guest.vmcb.RIP = exit.nrip

    def stop(self, reason: str, detail: str = "") -> Action:
        self._stop_reason = (reason, detail)
        return STOP

    def _console(self, b: bytes) -> None:
        if self.console_sink:
            self.console_sink(b)

    # -- the hypervisor loop ---------------------------------------------------
    def _dispatch(self, rec: ExitRecord) -> bool:
        if self.cpu.tlb_control_done:
            # the flush requested through TLB_CONTROL happened at the last VMRUN
            self.cpu.tlb_control_done = False
            self.guest.vmcb.TLB_CONTROL = TlbControl.DO_NOTHING
        counts = self.counts
        counts[rec.exitcode] = counts.get(rec.exitcode, 0) + 1
        self.trace.append(rec)
        if self.on_exit_record is not None:
            self.on_exit_record(rec)
        h = self.handlers.get(rec.exitcode)
        if h is None:
            self._stop_reason = (StopReason.UNHANDLED_EXIT, f"no handler for {exit_name(rec.exitcode)} at {rec.rip:#x}")
            return False
        try:
            act = h(self, rec)
        except Exception as e:       # a handler crash ends the run with a clear message
            import traceback
            tb = traceback.extract_tb(e.__traceback__)[-1]
            self._stop_reason = (StopReason.HANDLER_ERROR, f"{exit_name(rec.exitcode)} handler raised "
                                 f"{type(e).__name__}: {e} ({tb.filename}:{tb.lineno})")
            return False
        return act is None or act == RESUME

    def run(self, max_insns: int = 0, timeout: float = 10.0, max_exits: int = 10_000_000) -> RunResult:
        """VMRUN until a handler stops the guest or a limit is reached."""
        self._stop_reason = None
        self.guest_exit_code = None
        self.cpu.stats = WalkStats()          # walk and TLB figures are per run
        self.cpu.tlb.stats = TlbStats()
        limits = RunLimits(max_insns=max_insns, timeout_s=timeout, max_exits=max_exits)
        try:
            stop = self.cpu.vmrun(self.guest.vmcb_hpa, self._dispatch, limits)
        except VmrunError as e:
            stop = StopInfo(StopReason.ERROR, str(e))
        if self._stop_reason is not None and stop.reason == StopReason.EXIT:
            reason, detail = self._stop_reason
        else:
            reason, detail = stop.reason, stop.detail
        if reason == StopReason.EXIT and stop.detail.startswith("VMEXIT_INVALID"):
            reason, detail = StopReason.INVALID_VMCB, stop.detail
        result = self._result(reason, detail)
        result.error = stop.error
        return result

    def _result(self, reason: str, detail: str) -> RunResult:
        st = self.cpu.st
        if getattr(self, "sev_es", None) is not None:
            # SEV-ES: the guest's registers are in its encrypted VMSA; the
            # hypervisor's result has none of them (regs empty, RIP/RFLAGS 0)
            regs, rip, rflags = {}, 0, 0
        else:
            regs = {n: st.reg_read(GPR_IDS[i]) for i, n in enumerate(GPR_NAMES)}
            rip, rflags = st.reg_read(X.UC_X86_REG_RIP), st.reg_read(X.UC_X86_REG_RFLAGS)
        return RunResult(reason=reason, detail=detail, exit_code=self.guest_exit_code, insns=self.cpu.insns,
                         exits=sum(self.counts.values()), counts=dict(self.counts), regs=regs,
                         rip=rip, rflags=rflags,
                         console=self.serial.text, walk=self.cpu.stats.snapshot(),
                         tlb=self.cpu.tlb.stats.snapshot())


# ============================================================ default handlers
def _cpuid_leaf(m: Machine, leaf: int, sub: int) -> tuple[int, int, int, int]:
    if (leaf, sub) in m.cpuid_overrides:
        return m.cpuid_overrides[(leaf, sub)]
    if (leaf, -1) in m.cpuid_overrides:
        return m.cpuid_overrides[(leaf, -1)]
    vendor = b"AuthenticAMD"
    if leaf == 0:
        return 0xD, *struct.unpack("<III", vendor[0:4] + vendor[8:12] + vendor[4:8])
    if leaf == 1:
        eax = 0x00800F12                      # family 17h (Zen), model 1, stepping 2
        ebx = 0x00010800                      # CLFLUSH 8 qwords, 1 logical processor
        ecx = (1 << 0) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 23) | (1 << 26) | (1 << 31)
        if m.guest.vmcb.CR4 & (1 << 18):
            ecx |= 1 << 27                    # OSXSAVE mirrors CR4
        edx = 0x178BFBFF
        return eax, ebx, ecx, edx
    if leaf == 0x4000_0000:
        return 0x4000_0001, *struct.unpack("<III", HYPERVISOR_VENDOR)
    if leaf == 0x4000_0001:
        return 0, 0, 0, 0
    sev = getattr(m, "sp", None) is not None      # a secure processor: memory encryption is offered
    if leaf == 0x8000_0000:
        return 0x8000_001F if sev else 0x8000_0008, *struct.unpack("<III", vendor[0:4] + vendor[8:12] + vendor[4:8])
    if leaf == 0x8000_001F and sev:
        from ..sev.firmware import cpuid_8000_001f
        return cpuid_8000_001f()
    if leaf == 0x8000_0001:
        return 0x00800F12, 0, (1 << 0), (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29) | 0x0183F3FF
    if 0x8000_0002 <= leaf <= 0x8000_0004:
        brand = b"AMD-V Sandbox Virtual CPU".ljust(48, b"\x00")
        i = (leaf - 0x8000_0002) * 16
        return struct.unpack("<IIII", brand[i:i + 16])
    if leaf == 0x8000_0008:
        return 0x3030, 0, 0, 0                # 48 physical, 48 linear address bits
    return 0, 0, 0, 0


def handle_cpuid(m: Machine, e: ExitRecord) -> Action:
    """CPUID: virtualized leaves, hypervisor-present bit, vendor leaf 0x40000000."""
    vmcb, cpu = m.guest.vmcb, m.cpu
    a, b, c, d = _cpuid_leaf(m, vmcb.RAX & 0xFFFFFFFF, cpu.guest_gpr(1) & 0xFFFFFFFF)
    vmcb.RAX = a                       # RAX lives in the VMCB ...
    cpu.set_guest_gpr(3, b)            # ... RBX, RCX, RDX in the processor
    cpu.set_guest_gpr(1, c)
    cpu.set_guest_gpr(2, d)
    vmcb.RIP = e.nrip
    return RESUME


def handle_rdtsc(m: Machine, e: ExitRecord) -> Action:
    tsc = (m.cpu.host_tsc() + m.guest.vmcb.TSC_OFFSET) & 0xFFFF_FFFF_FFFF_FFFF
    m.regs.rax, m.regs.rdx = tsc & 0xFFFFFFFF, tsc >> 32
    if e.exitcode == ExitCode.RDTSCP:
        m.regs.rcx = m.msrs.get(0xC000_0103, 0) & 0xFFFFFFFF
    m.advance(e)
    return RESUME


def handle_ioio(m: Machine, e: ExitRecord) -> Action:
    """IN/OUT/INS/OUTS against the port bus (APM §15.10.2 EXITINFO1)."""
    info = e.exitinfo1
    port = info >> 16
    size = 1 if info & IoioInfo.SZ8 else (2 if info & IoioInfo.SZ16 else 4)
    is_in = bool(info & IoioInfo.TYPE_IN)
    if info & IoioInfo.STR:
        count = (m.regs.rcx if info & IoioInfo.REP else 1)
        asz = 64 if info & IoioInfo.A64 else (32 if info & IoioInfo.A32 else 16)
        amask = (1 << asz) - 1
        step = -size if m.guest.vmcb.RFLAGS & (1 << 10) else size
        try:
            _string_io(m, info, port, size, is_in, min(count & amask, STRING_IO_CHUNK), amask, step)
        except GuestPageFault as f:
            # the guest's memory operand faults: #PF into the guest, the
            # instruction restarts with RCX/RSI/RDI showing the progress made
            m.guest.vmcb.CR2 = f.address
            m.inject(14, EventType.EXCEPTION, f.error_code)
            return RESUME
        except GuestGP:
            m.inject(13, EventType.EXCEPTION, 0)
            return RESUME
        except NestedFault as f:
            return m.stop(StopReason.NPF, f"string I/O at {e.rip:#x} touched GPA {f.gpa:#x} outside the nested mappings")
        if info & IoioInfo.REP and m.regs.rcx & amask:
            return RESUME                     # more to do: re-execute (RIP unchanged), as KVM does
    elif is_in:
        v = m.bus.io(port, size, True)
        rax = m.regs.rax
        if size == 4:
            m.regs.rax = v                    # 32-bit results zero-extend
        else:
            mask = (1 << (8 * size)) - 1
            m.regs.rax = (rax & ~mask) | v
    else:
        m.bus.io(port, size, False, m.regs.rax & ((1 << (8 * size)) - 1))
    m.guest.vmcb.RIP = e.exitinfo2            # EXITINFO2 = next RIP
    return RESUME


def _string_io(m: Machine, info: int, port: int, size: int, is_in: bool, count: int, amask: int,
               step: int) -> None:
    """INS/OUTS, one element at a time; RCX counts down as each completes.
    Each guest page is translated once per call (not once per element)."""
    rep = bool(info & IoioInfo.REP)
    w = m.cpu.walker()
    pages: dict[tuple[int, bool], int] = {}

    def hpa(gva: int, write: bool) -> int | None:
        if (gva & 0xFFF) + size > PAGE_SIZE:
            return None                       # straddles a page: the general path
        key = (gva >> 12, write)
        base = pages.get(key)
        if base is None:
            try:
                base = w.translate(gva & ~0xFFF, Access.WRITE if write else Access.READ, False, set_ad=write).hpa
            except GuestPageFault as f:
                raise GuestPageFault(f.error_code, gva) from None
            pages[key] = base
        return base | (gva & 0xFFF)

    regs = m.regs
    rdi, rsi, rcx = regs.rdi, regs.rsi, regs.rcx
    try:
        for _ in range(count):
            if is_in:
                v = m.bus.io(port, size, True).to_bytes(size, "little")
                h = hpa(rdi & amask, True)
                if h is None:
                    m.write_virt(rdi & amask, v)
                else:
                    m.mem.write(h, v)
                rdi = (rdi + step) & amask
            else:
                h = hpa(rsi & amask, False)
                data = m.read_virt(rsi & amask, size) if h is None else m.mem.read(h, size)
                m.bus.io(port, size, False, int.from_bytes(data, "little"))
                rsi = (rsi + step) & amask
            if rep:
                rcx = (rcx - 1) & amask
    finally:
        if is_in:
            regs.rdi = rdi
        else:
            regs.rsi = rsi
        if rep:
            regs.rcx = rcx


def handle_msr(m: Machine, e: ExitRecord) -> Action:
    """RDMSR/WRMSR against the emulated MSR file; unknown MSRs raise #GP."""
    msr = m.regs.rcx & 0xFFFFFFFF
    if e.exitinfo1 == 0:
        if msr == 0x10:
            v = (m.cpu.host_tsc() + m.guest.vmcb.TSC_OFFSET) & 0xFFFF_FFFF_FFFF_FFFF
        elif msr == 0xC000_0080:
            v = m.guest.vmcb.EFER & ~EFER_SVME
        elif msr in m.msrs:
            v = m.msrs[msr]
        else:
            m.inject(13, EventType.EXCEPTION, 0)
            return RESUME
        m.regs.rax, m.regs.rdx = v & 0xFFFFFFFF, v >> 32
    else:
        v = (m.regs.rax & 0xFFFFFFFF) | ((m.regs.rdx & 0xFFFFFFFF) << 32)
        if msr == 0xC000_0080:
            m.guest.vmcb.EFER = v | EFER_SVME
        elif msr in m.msrs or msr >= 0xC000_0000:
            m.msrs[msr] = v
        else:
            m.inject(13, EventType.EXCEPTION, 0)
            return RESUME
    m.advance(e)
    return RESUME


def handle_hlt(m: Machine, e: ExitRecord) -> Action:
    """HLT ends the run unless a virtual interrupt is pending."""
    from ..svm.vmcb import VIntr
    if m.guest.vmcb.V_INTR & VIntr.V_IRQ and m.guest.vmcb.RFLAGS & (1 << 9):
        m.advance(e)
        return RESUME
    m.advance(e)
    return m.stop(StopReason.HALT, f"guest executed HLT at {e.rip:#x}")


def handle_vmmcall(m: Machine, e: ExitRecord) -> Action:
    """Hypercalls: RAX = 0 EXIT(RDI = code), RAX = 1 PRINT(RDI = GVA, RSI = length)."""
    nr = m.regs.rax
    if nr == HC_EXIT:
        m.guest_exit_code = m.regs.rdi & 0xFFFFFFFF
        m.advance(e)
        return m.stop(StopReason.GUEST_EXIT, f"EXIT hypercall with code {m.guest_exit_code}")
    if nr == HC_PRINT:
        n = min(m.regs.rsi, 1 << 16)
        try:
            data = m.read_virt(m.regs.rdi, n)
        except (GuestPageFault, GuestGP, NestedFault):
            m.regs.rax = (-KVM_EFAULT) & 0xFFFF_FFFF_FFFF_FFFF
            m.advance(e)
            return RESUME
        m.serial.output += data
        m._console(data)
        m.regs.rax = 0
    else:
        m.regs.rax = (-KVM_ENOSYS) & 0xFFFF_FFFF_FFFF_FFFF
    m.advance(e)
    return RESUME


def handle_shutdown(m: Machine, e: ExitRecord) -> Action:
    return m.stop(StopReason.SHUTDOWN, f"guest triple-faulted at {e.rip:#x}")


def handle_npf(m: Machine, e: ExitRecord) -> Action:
    """VMEXIT_NPF: an MMIO window's access goes to its device; any other
    nested fault ends the run (this hypervisor never pages guest memory)."""
    region = m.bus.region(e.exitinfo2) if e.exitinfo1 & (1 << 32) else None
    if region is not None:
        return handle_mmio(m, e, region)
    return m.stop(StopReason.NPF, f"nested page fault at GPA {e.exitinfo2:#x} (EXITINFO1 {e.exitinfo1:#x}) "
                         f"from RIP {e.rip:#x}")


def handle_mmio(m: Machine, e: ExitRecord, region: MmioRegion) -> Action:
    """A guest access to a device window (NPF with EXITINFO2 = the GPA)."""
    gpa = e.exitinfo2
    if region.mode is MmioMode.GRANT:
        page = gpa & ~(PAGE_SIZE - 1)
        hpa = region.backing.get(page)
        if hpa is None:
            hpa = region.backing[page] = m.mem.alloc_page()
            grant = getattr(region.device, "granted", None)
            if grant is not None:
                grant(m, page - region.gpa, hpa)
        m.guest.npt.map(page, hpa)          # the instruction re-executes against RAM
        return RESUME
    code = e.insn or m.read_virt(e.rip, 15)
    key = (e.rip, code)
    form = m._mmio_forms.get(key)
    try:
        if form is None:
            form = m._mmio_forms[key] = decode_form(code)
        acc = decode_access(code, gpa, m.regs, form)
    except MmioDecodeError as err:
        return m.stop(StopReason.MMIO_ERROR, f"at RIP {e.rip:#x}, GPA {gpa:#x}: {err}")
    if acc.is_write:
        m.bus.mmio(gpa, acc.size, True, acc.value)
    else:
        complete(acc, m.bus.mmio(gpa, acc.size, False), m.regs)
    m.guest.vmcb.RIP = e.rip + form.length
    return RESUME


def handle_intr(m: Machine, e: ExitRecord) -> Action:
    """A physical interrupt: the virtual timer's tick."""
    if m.timer_callback is not None:
        m.timer_callback(m)
    return RESUME


def handle_svm_insn(m: Machine, e: ExitRecord) -> Action:
    """VMRUN/VMLOAD/VMSAVE/STGI/CLGI/SKINIT/INVLPGA from the guest: no nested
    virtualization here, so the guest gets #UD, as KVM does with nested=0."""
    m.inject(6)
    return RESUME


def handle_invalid(m: Machine, e: ExitRecord) -> Action:
    return m.stop(StopReason.INVALID_VMCB, getattr(m.cpu, "_invalid_reason", "VMEXIT_INVALID"))


def handle_exception(m: Machine, e: ExitRecord) -> Action:
    """An intercepted exception: reflect it into the guest (as KVM does for #PF/#UD).

    When it was raised while the processor delivered another exception
    (EXITINTINFO valid, TYPE 3), the hypervisor applies the double-fault
    rules itself (APM §8.2.9, as KVM's exception queue does): the pair
    becomes #DF, or a shutdown -- otherwise a guest with a broken IDT would
    bounce the same exception between the intercept and delivery forever."""
    vec = e.exitcode - 0x40
    from ..svm.events import HAS_ERROR_CODE, combine
    err = (e.exitinfo1 & 0xFFFFFFFF) if vec in HAS_ERROR_CODE else None
    ii = e.exitintinfo
    if ii & (1 << 31) and (ii >> 8) & 7 == EventType.EXCEPTION:
        nxt = combine(ii & 0xFF, vec)
        if nxt is None:
            return m.stop(StopReason.SHUTDOWN, f"exception {vec} while delivering exception {ii & 0xFF} "
                                      f"at {e.rip:#x}: triple fault")
        if nxt != vec:
            m.inject(nxt, EventType.EXCEPTION, 0)
            return RESUME
    if vec == 14:
        m.guest.vmcb.CR2 = e.exitinfo2
    if vec in (3, 4):
        m.guest.vmcb.RIP = e.nrip if e.nrip else e.rip
        m.inject(vec, EventType.EXCEPTION)
        return RESUME
    m.inject(vec, EventType.EXCEPTION, err)
    return RESUME


def handle_rdpmc(m: Machine, e: ExitRecord) -> Action:
    """RDPMC: the virtual CPU has no running performance counters; they read 0."""
    m.regs.rax = 0
    m.regs.rdx = 0
    m.advance(e)
    return RESUME


def reexecute(m: Machine, e: ExitRecord) -> Action:
    """Let the intercepted instruction run once on the processor, unintercepted:
    the hypervisor "emulates" it with the real instruction (descriptor-table
    accesses, PUSHF/POPF/IRET, INT n, MOV CR/DR, RDPMC, XSETBV ...)."""
    m.cpu.pass_once(e.rip)
    return RESUME


def _advance_only(m: Machine, e: ExitRecord) -> Action:
    """Instructions a hypervisor can complete by skipping them (PAUSE, WBINVD,
    INVD, MONITOR, MWAIT, INVLPG, descriptor-table and CR/DR reads ...)."""
    m.advance(e)
    return RESUME


DEFAULT_HANDLERS: dict[int, Handler] = {
    ExitCode.CPUID: handle_cpuid,
    ExitCode.RDTSC: handle_rdtsc,
    ExitCode.RDTSCP: handle_rdtsc,
    ExitCode.IOIO: handle_ioio,
    ExitCode.MSR: handle_msr,
    ExitCode.HLT: handle_hlt,
    ExitCode.VMMCALL: handle_vmmcall,
    ExitCode.SHUTDOWN: handle_shutdown,
    ExitCode.NPF: handle_npf,
    ExitCode.INTR: handle_intr,
    ExitCode.INVALID: handle_invalid,
    ExitCode.RDPMC: handle_rdpmc,
    ExitCode.PAUSE: _advance_only,
    ExitCode.WBINVD: _advance_only,
    ExitCode.INVD: _advance_only,
    ExitCode.MONITOR: _advance_only,
    ExitCode.MWAIT: _advance_only,
}
for _c in (ExitCode.VMRUN, ExitCode.VMLOAD, ExitCode.VMSAVE, ExitCode.STGI, ExitCode.CLGI, ExitCode.SKINIT,
           ExitCode.INVLPGA):
    DEFAULT_HANDLERS[_c] = handle_svm_insn
for _v in range(32):
    DEFAULT_HANDLERS[0x40 + _v] = handle_exception
for _c in (*range(0x00, 0x40), ExitCode.CR0_SEL_WRITE, ExitCode.IDTR_READ, ExitCode.GDTR_READ,
           ExitCode.LDTR_READ, ExitCode.TR_READ, ExitCode.IDTR_WRITE, ExitCode.GDTR_WRITE,
           ExitCode.LDTR_WRITE, ExitCode.TR_WRITE, ExitCode.RDPMC, ExitCode.PUSHF, ExitCode.POPF,
           ExitCode.IRET, ExitCode.SWINT, ExitCode.INVLPG, ExitCode.XSETBV, ExitCode.ICEBP, ExitCode.RDPRU):
    DEFAULT_HANDLERS.setdefault(int(_c), reexecute)
