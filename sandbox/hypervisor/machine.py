"""The root-mode hypervisor: the machine, its guests' registers, the run loop.

:class:`Machine` is the public entry point.  It owns host DRAM and the SVM
processor, creates a :class:`~sandbox.hypervisor.guest.Guest` (VMCB, nested
page tables, IOPM, MSRPM, guest RAM), and runs the loop of a real
hypervisor: VMRUN, take the #VMEXIT, dispatch on EXITCODE through
:attr:`Machine.handlers` (a copy of
:data:`~sandbox.hypervisor.handlers.DEFAULT_HANDLERS`), VMRUN again.
"""
from __future__ import annotations

import collections
import operator
import struct
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

from unicorn import x86_const as X

from ..arch import EFER_SVME, M64
from ..memory.hostmem import PAGE_SIZE, HostMemory, page_spans
from ..memory.mmu import WalkStats
from ..memory.paging import Access
from ..memory.tlb import TlbMode, TlbStats
from ..svm import intercepts as I
from ..svm.cpu import ExitRecord, RunLimits, StopInfo, SvmCpu, VmrunError
from ..svm.cpustate import GPR_NAMES, OFF_REGS
from ..svm.exitcodes import ExitCode, exit_name
from ..svm.features import absent_msrs, cpuid_masks, parse_without
from ..svm.stop import StopReason
from ..svm.vmcb import OFF_EVENTINJ, OFF_RAX, OFF_RIP, OFF_RSP, Event, EventType, TlbControl
from .devices import COM1, DeviceBus, MmioMode, MmioRegion, Serial16550
from .guest import Guest
from .handlers import DEFAULT_HANDLERS, RESUME, STOP, Action, Handler
from .handlers import handle_cpuid  # noqa: F401  (scripts/bench.py imports it from here)
from .hooks_loader import load_hooks
from .image import Image, ImageError
from .loader import load_image
from .multiboot import boot as boot_multiboot
from .platform import PcPlatform
from .platform import install as install_platform
from .mmio import AccessForm
from .nested import NestedSvm
from .shadow import ShadowPager

if TYPE_CHECKING:
    from .sev_launch import SevGuest

#: exits a handler may resume with nothing changed this many times in a row before the run ends (livelock)
LIVELOCK_LIMIT = 1000
#: asynchronous exits: the guest did not ask for them, so resuming one in place is no livelock
_ASYNC_EXITS = frozenset({ExitCode.INTR, ExitCode.NMI, ExitCode.SMI, ExitCode.INIT, ExitCode.VINTR})
#: stops from outside the guest, with no #VMEXIT: the guest state goes to the VMCB so run() can continue
_RESUMABLE_STOPS = frozenset({StopReason.INSN_BUDGET, StopReason.TIMEOUT, StopReason.STOPPED})
#: RunResult.counts keys: the ExitCode member (an IntEnum: equal to its int) where the code is known
_EXIT_KEYS = {int(c): c for c in ExitCode}

_Q = struct.Struct("<Q")

#: how guest memory is virtualized: the processor's nested paging, or the hypervisor's shadow tables
PAGING_MODES = ("nested", "shadow")


class RegisterView(Protocol):
    """What ``m.regs`` is: the guest's registers as the current exit exposes
    them -- :class:`GuestRegs` (VMCB and processor), :class:`SealedRegs`
    (SEV-ES: in the encrypted VMSA), or, while a VMGEXIT request is served,
    :class:`~sandbox.hypervisor.ghcb.GhcbRegs` (the GHCB's fields) -- and
    how that exit completes."""

    def __getattr__(self, name: str) -> int: ...

    def as_dict(self) -> dict[str, int]: ...

    def set_abcd(self, values: tuple[int, int, int, int], next_rip: int | None = None) -> None:
        """RAX, RBX, RCX, RDX = ``values`` at once (a CPUID result, in CPUID's order);
        with ``next_rip``, then :meth:`complete` (``next_rip``)."""

    def complete(self, next_rip: int) -> None:
        """The intercepted instruction is done; the guest goes on at ``next_rip``."""

    def inject(self, event: Event) -> None:
        """Raise ``event`` in the guest."""


def _vmcb_reg(field_name: str) -> property:
    """A guest register kept in the current guest's VMCB state-save area (through the VMCB accessor)."""
    read = operator.attrgetter(field_name)

    def get(regs: "GuestRegs") -> int:
        return read(regs.machine.guest.vmcb)

    def put(regs: "GuestRegs", value: int) -> None:
        setattr(regs.machine.guest.vmcb, field_name, value)
    return property(get, put, doc=f"guest {field_name} (the VMCB's state-save area); read and write")


def _eager_reg(offset: int, name: str) -> property:
    """RAX, RSP or RIP: a never-cached VMCB field (APM §15.15.3) that #VMEXIT
    writes at once, so it is always current in the VMCB page and the
    world switch needs no notice of an access: read and written in place,
    with no per-field round trip through the VMCB accessor.

    A ``property`` (not a descriptor class): CPython calls a property's
    getter without the generic descriptor protocol's extra frame, which
    halves the cost of a register access on the exit path."""
    i = offset >> 3

    def get(regs: "GuestRegs") -> int:
        return regs.machine.guest.vmcb_q[i]

    def put(regs: "GuestRegs", value: int) -> None:
        try:
            regs.machine.guest.vmcb_q[i] = value
        except (ValueError, TypeError):       # outside 0..2**64-1: kept modulo 2**64, as a register holds it
            regs.machine.guest.vmcb_q[i] = value & M64
    return property(get, put, doc=f"guest {name} (the VMCB's state-save area, current at every exit); read and write")


def _cpu_reg(index: int) -> property:
    """A guest GPR the processor keeps (a real hypervisor saves these itself):
    read and written in the processor's state directly."""
    def get(regs: "GuestRegs") -> int:
        return regs.cpu_state.q[index]

    def put(regs: "GuestRegs", value: int) -> None:
        try:
            regs.cpu_state.q[index] = value
        except (ValueError, TypeError):       # outside 0..2**64-1: modulo 2**64
            regs.cpu_state.q[index] = value & M64
    return property(get, put, doc=f"guest {GPR_NAMES[index].upper()} (kept by the processor); read and write")


_RBX_I, _RCX_I, _RDX_I = (GPR_NAMES.index(n) for n in ("rbx", "rcx", "rdx"))
#: RCX, RDX, RBX: adjacent in the processor's state (QEMU order rax rcx rdx rbx), one pack
_RCX_RDX_RBX = struct.Struct("<3Q")
_OFF_RCX = OFF_REGS + 8 * _RCX_I
#: qword indices of the never-cached fields in the VMCB page (``Guest.vmcb_q``)
_QRAX, _QRIP, _QEVENTINJ = OFF_RAX >> 3, OFF_RIP >> 3, OFF_EVENTINJ >> 3
assert (_RDX_I, _RBX_I) == (_RCX_I + 1, _RCX_I + 2)


class GuestRegs:
    """``m.regs``: guest registers as a hypervisor sees them after #VMEXIT:
    ``rax rbx rcx rdx rsi rdi rbp rsp r8``-``r15 rip rflags`` (each an attribute,
    read and write; :meth:`as_dict` gives the GPRs).

    RAX, RSP, RIP and RFLAGS live in the VMCB state-save area; the other
    GPRs stay in the processor (a real hypervisor saves them itself).  The
    view also decides how an exit completes (:meth:`complete`, :meth:`inject`).
    """

    __slots__ = ("machine", "cpu_state")
    rax, rsp, rip = _eager_reg(OFF_RAX, "RAX"), _eager_reg(OFF_RSP, "RSP"), _eager_reg(OFF_RIP, "RIP")
    rflags = _vmcb_reg("RFLAGS")
    rcx, rdx, rbx, rbp, rsi, rdi = (_cpu_reg(GPR_NAMES.index(n)) for n in ("rcx", "rdx", "rbx", "rbp", "rsi", "rdi"))
    r8, r9, r10, r11, r12, r13, r14, r15 = (_cpu_reg(GPR_NAMES.index(f"r{i}")) for i in range(8, 16))

    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        # what every access needs, bound once: the processor's state
        self.cpu_state = machine.cpu.st

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in GPR_NAMES}

    def set_abcd(self, values: tuple[int, int, int, int], next_rip: int | None = None) -> None:
        """RAX, RBX, RCX, RDX = ``values`` in one call: RAX into the VMCB page,
        the others into the processor (what four attribute writes do);
        with ``next_rip``, :meth:`complete` too."""
        a, b, c, d = values
        vq = self.machine.guest.vmcb_q
        # values in 0..2**64-1 are stored as they are; others modulo 2**64 (the masks cost
        # an allocation each, so only the rare value outside the range pays them)
        try:
            vq[_QRAX] = a
            if next_rip is not None:
                vq[_QRIP] = next_rip
        except (ValueError, TypeError):
            vq[_QRAX] = a & M64
            if next_rip is not None:
                vq[_QRIP] = next_rip & M64
        data = self.cpu_state.data
        try:
            _RCX_RDX_RBX.pack_into(data, _OFF_RCX, c, d, b)
        except struct.error:
            _RCX_RDX_RBX.pack_into(data, _OFF_RCX, c & M64, d & M64, b & M64)

    # No ``__getattr__`` here: a class that defines one has every attribute
    # lookup go through CPython's slower hook (and unspecialized), which the
    # exit path pays a dozen times per exit.  ``getattr(regs, name)`` reads a
    # register by name.

    def complete(self, next_rip: int) -> None:
        """The intercepted instruction is done: the guest resumes at ``next_rip``."""
        try:
            self.machine.guest.vmcb_q[_QRIP] = next_rip
        except (ValueError, TypeError):       # outside 0..2**64-1: modulo 2**64
            self.machine.guest.vmcb_q[_QRIP] = next_rip & M64

    def inject(self, event: Event) -> None:
        """Deliver ``event`` at the next VMRUN (EVENTINJ)."""
        self.machine.guest.vmcb.inject(event)


class SevEsRegisterError(Exception):
    """The hypervisor asked for an SEV-ES guest's registers: they are in the encrypted VMSA."""


class SealedRegs:
    """``m.regs`` of an SEV-ES guest: its registers are in the encrypted VMSA,
    so reading or writing one raises :class:`SevEsRegisterError`.  The guest
    moves its own RIP; events are still injected through the VMCB."""

    __slots__ = ("machine",)

    def __init__(self, machine: "Machine") -> None:
        object.__setattr__(self, "machine", machine)

    def __getattr__(self, name: str) -> int:
        raise SevEsRegisterError(f"guest register {name} is in the encrypted VMSA (SEV-ES); use the GHCB")

    def __setattr__(self, name: str, value: int) -> None:
        raise SevEsRegisterError(f"guest register {name} is in the encrypted VMSA (SEV-ES); use the GHCB")

    def as_dict(self) -> dict[str, int]:
        raise SevEsRegisterError("the guest's registers are in the encrypted VMSA (SEV-ES)")

    def set_abcd(self, values: tuple[int, int, int, int], next_rip: int | None = None) -> None:
        raise SevEsRegisterError("guest registers rax..rdx are in the encrypted VMSA (SEV-ES); use the GHCB")

    def complete(self, next_rip: int) -> None:
        """Nothing: RIP is in the VMSA (KVM's svm_skip_emulated_instruction skips SEV-ES guests)."""

    def inject(self, event: Event) -> None:
        self.machine.guest.vmcb.inject(event)


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


class Machine:
    """A host with SVM, one guest, and the hypervisor loop.

    >>> m = Machine()
    >>> m.load("guest_images/hello.S")
    >>> result = m.run()
    """

    def __init__(self, dram: int = 64 << 20, ram: int = 16 << 20, *, npt_page: int = PAGE_SIZE,
                 tlb_mode: TlbMode = TlbMode.TAGGED, paging: str = "nested",
                 platform: str | None = None, nested: bool = False, mem: HostMemory | None = None,
                 without: Iterable[str] = ()) -> None:
        """``mem``: host DRAM to use (a HostMemory of ``dram`` bytes is made when None).
        ``without``: processor features to take away, by QEMU's names (``["rdtscp", "xsave"]``
        or ``"rdtscp,xsave"``: :mod:`sandbox.svm.features`); CPUID stops reporting them."""
        if paging not in PAGING_MODES:
            raise ValueError(f"paging must be one of {', '.join(PAGING_MODES)}, not {paging!r}")
        removed = parse_without(without if isinstance(without, str) else ",".join(without))
        self.mem = mem if mem is not None else HostMemory(dram)
        self.cpu = SvmCpu(self.mem)
        if removed:
            self.cpu.remove_features(removed)
        #: leaf -> AND masks of EAX..EDX for every CPUID answer: the features taken away
        self.cpuid_masks: dict[int, tuple[int, int, int, int]] = cpuid_masks(removed)
        self.cpu.tlb.mode = tlb_mode
        # the hypervisor enables SVM: EFER.SVME and VM_HSAVE_PA (as KVM's svm_hardware_enable)
        self.cpu.host_efer |= EFER_SVME
        self.cpu.vm_hsave_pa = self.mem.alloc_page()
        self.guest = Guest(self.mem, ram, npt_page=npt_page)
        self.guests: list[Guest] = [self.guest]
        #: the guest's registers as the current exit exposes them (see :class:`RegisterView`)
        self.regs: RegisterView = GuestRegs(self)
        self.bus = DeviceBus()
        self.serial = Serial16550(COM1)
        self.bus.attach(self.serial)
        self.cpu.io_passthrough = self.bus.io
        self.msrs: dict[int, int] = {0xC000_0103: 0, 0x1B: 0xFEE0_0900, 0x277: 0x0007040600070406}
        for msr in absent_msrs(removed):       # the MSR of a feature taken away: #GP, as on that processor
            self.msrs.pop(msr, None)
        self.handlers: dict[int, Handler] = dict(DEFAULT_HANDLERS)
        self.counts: dict[int, int] = {}
        self.trace: collections.deque[ExitRecord] = collections.deque(maxlen=10_000)
        self.on_exit_record: Callable[[ExitRecord], None] | None = None
        self._console_sink: Callable[[bytes], None] | None = None
        self.guest_exit_code: int | None = None
        self._stop_reason: tuple[str, str] | None = None
        self._interrupted = False
        self._last_fp: tuple | None = None
        self._same_fp = 0
        self._console_start = 0
        #: CPUID answers that replace the default handler's: ``{(leaf, subleaf): (eax, ebx, ecx, edx)}``,
        #: subleaf -1 for every subleaf of the leaf, e.g. ``m.cpuid_overrides[(1, -1)] = (0x00A00F11, 0, 0, 0)``
        self.cpuid_overrides: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self.timer_callback: Callable[["Machine"], None] | None = None
        #: decoded MMIO instructions by (RIP, instruction bytes)
        self.mmio_forms: dict[tuple[int, bytes], AccessForm] = {}
        #: SEV: the secure processor and the encrypted guest (None until a launch attaches it)
        self.sev: SevGuest | None = None
        #: ``hook(machine, exit)`` run after every handler that resumes the guest (STOP ends the run)
        self.resume_hooks: list[Callable[["Machine", ExitRecord], Action | None]] = []
        self.default_intercepts()
        #: the shadow MMU when the guest runs without nested paging
        self.shadow: ShadowPager | None = ShadowPager(self) if paging == "shadow" else None
        #: devices and interrupt plumbing beyond COM1 (``platform="pc"``: see sandbox.hypervisor.platform)
        self.platform: PcPlatform | None = install_platform(self, platform) if platform is not None else None
        #: nested SVM for the guest (opt-in, as KVM's ``nested=1``): see :mod:`sandbox.hypervisor.nested`
        if nested and paging != "nested":
            raise ValueError("nested SVM needs nested paging for its guest (as KVM's nested=1 with npt=1)")
        self.nested: NestedSvm | None = NestedSvm(self) if nested else None

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

    def switch_to(self, guest: Guest) -> Action:
        """From a handler: resume into ``guest`` instead (the processor takes
        the other VMCB at once, inside the same run and the same hook)."""
        self.use(guest)
        self.cpu.switch_vmcb(guest.vmcb_hpa)
        return RESUME

    # -- devices ---------------------------------------------------------------
    def map_mmio(self, gpa: int, size: int, device: object, mode: MmioMode = MmioMode.TRAP) -> MmioRegion:
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
        """Decorator: register ``fn(machine, exit)`` for exit code ``code``.

        ``exit`` is the :class:`~sandbox.svm.cpu.ExitRecord` (``exit.exitcode``,
        ``exit.exitinfo1``/``EXITINFO1`` ..., ``exit.rip``, ``exit.nrip``).  The
        handler returns :data:`RESUME` (or None) to VMRUN again -- having
        completed the instruction with :meth:`advance`, or RIP stays on it and
        the guest re-executes it -- or :data:`STOP` / ``m.stop(reason, detail)``
        to end the run.  Any other return value ends the run with
        ``handler-error``; a handler that resumes the same instruction with no
        change of state :data:`LIVELOCK_LIMIT` times in a row ends it with
        ``livelock``.
        """
        def deco(fn: Handler) -> Handler:
            self.handlers[int(code)] = fn
            return fn
        return deco

    def load(self, path: str, append: str | None = None) -> Image:
        """Load a guest image; ``append`` is a multiboot kernel's command line."""
        img = load_image(path, self.guest.ram_size)
        if img.kind == "multiboot":
            boot_multiboot(self, img, append or "")
        elif append:
            raise ImageError(f"{path}: a command line (append) applies to multiboot kernels only")
        else:
            self.guest.load(img)
        if self.shadow is not None:
            self.shadow.attach_cr3(self.guest.vmcb.CR3)
        return img

    def invlpga(self, va: int, asid: int) -> None:
        """The hypervisor executes INVLPGA (drop one page of one ASID's TLB)."""
        self.cpu.invlpga(va, asid)

    def load_hooks(self, path: str) -> None:
        """Load user handlers from a Python file (see ``hooks/``)."""
        load_hooks(self, path)

    # -- guest access for handlers ---------------------------------------------
    def read_virt(self, gva: int, n: int) -> bytes:
        """Read guest-virtual memory through the guest's page tables (no A/D side effects)."""
        return b"".join(self.mem.read(self.virt_to_host(a, Access.READ), c) for a, _, c in page_spans(gva, n))

    def write_virt(self, gva: int, data: bytes) -> None:
        view = memoryview(data).cast("B")
        for a, at, c in page_spans(gva, len(view)):
            self.mem.write(self.virt_to_host(a, Access.WRITE, set_ad=True), view[at:at + c])

    def virt_to_host(self, gva: int, access: int, set_ad: bool = False) -> int:
        """GVA -> HPA through the guest's own tables (and the NPT or the RAM
        map) on the guest's behalf: A/D bits only with ``set_ad`` (a write the
        hypervisor emulates for the guest), never the processor's counters."""
        if self.shadow is not None:
            return self.shadow.translate(gva, access, set_ad)
        page = self.cpu.hypervisor_page(gva, access, set_ad)
        if page is not None:
            return page | (gva & 0xFFF)
        t = self.cpu.walker(WalkStats()).translate(gva, access, False, set_ad=set_ad)
        return t.hpa if t.dram is None else t.dram          # SEV: the DRAM page, i.e. ciphertext

    def inject(self, vector: int, type: EventType = EventType.EXCEPTION, error_code: int | None = None) -> None:
        """Raise an event in the guest (EVENTINJ; for a request served through
        the GHCB, the GHCB's exception report).  While a nested guest (L2) runs, an
        exception its hypervisor (L1) intercepts becomes L1's #VMEXIT instead."""
        if self.nested is not None and type == EventType.EXCEPTION \
                and self.nested.exception_for_l1(vector, error_code):
            return
        self.regs.inject(Event(vector, type, error_code))

    def advance(self, exit: ExitRecord, next_rip: int | None = None) -> None:
        """Complete the intercepted instruction: RIP = nRIP (or ``next_rip``)."""
        self.regs.complete(exit.nrip if next_rip is None else next_rip)

    def stop(self, reason: str, detail: str = "") -> Action:
        self._stop_reason = (reason, detail)
        return STOP

    def console_write(self, data: bytes) -> None:
        """Guest console output that does not come through the UART (the PRINT hypercall)."""
        self.serial.output += data
        self._console(data)

    def _console(self, b: bytes) -> None:
        if self._console_sink:
            self._console_sink(b)

    @property
    def console_sink(self) -> Callable[[bytes], None] | None:
        """``fn(data)`` called with the guest's console output as it is written (None: kept only)."""
        return self._console_sink

    @console_sink.setter
    def console_sink(self, fn: Callable[[bytes], None] | None) -> None:
        # the UART calls the sink itself: no call per byte while there is none
        self._console_sink = fn
        self.serial.sink = fn

    # -- the hypervisor loop ---------------------------------------------------
    def _dispatch(self, rec: ExitRecord) -> bool:
        if self.cpu.tlb_control_done:
            # the flush requested through TLB_CONTROL happened at the last VMRUN
            self.cpu.tlb_control_done = False
            self.guest.vmcb.TLB_CONTROL = TlbControl.DO_NOTHING
        code = rec.exitcode
        counts = self.counts
        n = counts.get(code)          # an int finds the ExitCode key it equals: the key stays the member
        if n is None:
            counts[_EXIT_KEYS.get(code, code)] = 1
        else:
            counts[code] = n + 1
        nested = self.nested
        if nested_l2 := nested is not None and nested.guest_mode:
            rec.level = "L2"
        self.trace.append(rec)
        if self.on_exit_record is not None:
            self.on_exit_record(rec)
        h = self.handlers.get(code)
        if nested_l2:
            h = nested.handler_for(rec, h)
        if h is None:
            self._stop_reason = (StopReason.UNHANDLED_EXIT, f"no handler for {exit_name(code)} at {rec.rip:#x}")
            return False
        try:
            act = h(self, rec)
            if act is None or act is RESUME:
                # the livelock check's common case inline: the handler moved RIP
                if self.guest.vmcb_q[_QRIP] != rec.rip:
                    if self._last_fp is not None:
                        self._last_fp, self._same_fp = None, 0
                elif self._livelocked(rec):
                    return False
                if self.resume_hooks:
                    # before the next VMRUN: e.g. the platform's interrupt controller
                    # queues an interrupt (EVENTINJ, or V_IRQ for a window)
                    for hook in self.resume_hooks:
                        if hook(self, rec) == STOP:
                            return False
                return True
            if act is not STOP:
                self._stop_reason = (StopReason.HANDLER_ERROR, f"handler for {exit_name(code)} returned {act!r}; "
                                     "expected RESUME, STOP or None")
            return False
        except KeyboardInterrupt:    # Ctrl-C inside a handler: the run stops, as request_stop() does
            self._stop_reason = (StopReason.STOPPED, "interrupted")
            return False
        except Exception as e:       # a handler crash ends the run with a clear message
            tb = traceback.extract_tb(e.__traceback__)[-1]
            self._stop_reason = (StopReason.HANDLER_ERROR, f"{exit_name(code)} handler raised "
                                 f"{type(e).__name__}: {e} ({tb.filename}:{tb.lineno})")
            return False

    def _livelocked(self, rec: ExitRecord) -> bool:
        """True (and the run's stop reason set) when a handler has resumed the
        same synchronous exit at the same RIP, with no change of state, for
        :data:`LIVELOCK_LIMIT` exits in a row -- a handler that forgot to
        advance RIP.  The fingerprint is cheap: exit code, EXITINFO1/2, RIP
        before and after the handler, a pending EVENTINJ, RAX..RBX.  The
        common case -- the handler moved RIP -- costs one read of the VMCB's
        RIP (a never-cached field, current in the VMCB page)."""
        if _Q.unpack_from(self.mem.raw, self.guest.vmcb_hpa + OFF_RIP)[0] != rec.rip:
            if self._last_fp is not None:
                self._last_fp, self._same_fp = None, 0
            return False
        if rec.exitcode in _ASYNC_EXITS or (self.sev is not None and self.sev.es is not None):
            self._last_fp, self._same_fp = None, 0
            return False
        vq = self.guest.vmcb_q        # EVENTINJ (control area) and RAX (never cached): current in place
        cpu = self.cpu
        fp = (rec.exitcode, rec.rip, rec.exitinfo1, rec.exitinfo2, vq[_QEVENTINJ], vq[_QRAX],
              cpu.guest_gpr(1), cpu.guest_gpr(2), cpu.guest_gpr(3))
        if fp != self._last_fp:
            self._last_fp, self._same_fp = fp, 1
            return False
        self._same_fp += 1
        if self._same_fp < LIVELOCK_LIMIT:
            return False
        self._stop_reason = (StopReason.HANDLER_ERROR, f"livelock: the {exit_name(rec.exitcode)} handler resumed "
                             f"the guest at {rec.rip:#x} {self._same_fp} times with no change of state "
                             "(did it forget m.advance(exit)?)")
        return True

    def request_stop(self) -> None:
        """End the current run as soon as possible (reason ``stopped``, detail
        ``interrupted``); any thread or a signal handler may call it.  The
        CLI's Ctrl-C handler does."""
        self._interrupted = True
        self.cpu.expire_timeout()

    def run(self, max_insns: int = 0, timeout: float = 10.0, max_exits: int = 10_000_000) -> RunResult:
        """VMRUN until a handler stops the guest or a limit is reached.

        ``timeout`` is wall-clock seconds (0: no limit); ``max_exits`` the
        number of exits handled before the run stops (at the next one);
        ``max_insns`` an instruction budget (0: not counted).  The result's
        exits, counts, console, walk and TLB figures are this run's alone.
        """
        if not (timeout >= 0) or timeout == float("inf"):
            raise ValueError(f"timeout must be a finite number of seconds >= 0 (0: no limit), not {timeout!r}")
        if max_exits < 0 or max_insns < 0:
            raise ValueError("max_exits and max_insns must be >= 0")
        self._stop_reason = None
        self._interrupted = False
        self._last_fp, self._same_fp = None, 0
        self.guest_exit_code = None
        self.counts = {}                      # per run, as the walk and TLB figures
        self._console_start = len(self.serial.output)
        self.cpu.stats = WalkStats()          # walk and TLB figures are per run
        self.cpu.tlb.stats = TlbStats()
        # the processor stops when it takes exit number max_exits + 1 of this run, undispatched
        limits = RunLimits(max_insns=max_insns, timeout_s=timeout,
                           max_exits=self.cpu.exit_count + max_exits + 1)
        try:
            stop = self.cpu.vmrun(self.guest.vmcb_hpa, self._dispatch, limits)
        except VmrunError as e:
            stop = StopInfo(StopReason.ERROR, str(e))
        if stop.reason in _RESUMABLE_STOPS and not (self.sev is not None and self.sev.es is not None):
            self.cpu.save_stopped_state()          # a later run() continues where this one stopped
        if self._stop_reason is not None and stop.reason == StopReason.EXIT:
            reason, detail = self._stop_reason
        else:
            reason, detail = stop.reason, stop.detail
        if reason == StopReason.EXIT and stop.detail.startswith("VMEXIT_INVALID"):
            reason, detail = StopReason.INVALID_VMCB, stop.detail
        if reason == StopReason.EXIT_BUDGET:
            detail = f"exit budget of {max_exits} reached"
        error = stop.error
        if self._interrupted and reason in (StopReason.TIMEOUT, StopReason.STOPPED):
            reason, detail = StopReason.STOPPED, "interrupted"
        elif reason == StopReason.ERROR and isinstance(error, KeyboardInterrupt):
            # Ctrl-C (no signal handler) landed inside one of the processor's hooks
            reason, detail, error = StopReason.STOPPED, "interrupted", None
        result = self._result(reason, detail)
        result.error = error
        return result

    def _result(self, reason: str, detail: str) -> RunResult:
        st = self.cpu.st
        if self.sev is not None and self.sev.es is not None:
            # SEV-ES: the guest's registers are in its encrypted VMSA; the
            # hypervisor's result has none of them (regs empty, RIP/RFLAGS 0)
            regs, rip, rflags = {}, 0, 0
        else:
            # the GPRs and RIP from the processor's state (RFLAGS is computed: read it)
            regs = dict(zip(GPR_NAMES, st.gprs()))
            rip, rflags = st.rip, st.reg_read(X.UC_X86_REG_RFLAGS)
        return RunResult(reason=reason, detail=detail, exit_code=self.guest_exit_code, insns=self.cpu.insns,
                         exits=sum(self.counts.values()), counts=dict(self.counts), regs=regs,
                         rip=rip, rflags=rflags,
                         console=self.serial.output[self._console_start:].decode("utf-8", "replace"), walk=self.cpu.stats.snapshot(),
                         tlb=self.cpu.tlb.stats.snapshot())
