"""The :class:`~.gdbstub.DebugTarget` over a real :class:`~sandbox.Machine`.

:class:`MachineTarget` lets gdb drive the sandbox's guest while it stays under
its intercepts, its nested paging and its handlers:

* **Registers** are the hypervisor's view after the last stop: RAX, RSP, RIP,
  RFLAGS, the segments, CR0/2/3/4, EFER and FS/GS base from the VMCB state-save
  area, the other GPRs from the processor. A write goes where a handler's
  would, so the next VMRUN loads it (with its consistency checks, APM §15.5.1).
  The x87/SSE state is not offered (gdb shows ``<unavailable>``). An SEV-ES
  guest's registers are in its encrypted VMSA: all unavailable.
* **Memory** is read by guest-virtual address, translated through the guest's
  own page tables and the nested page table by the processor's 2-D walk
  (:meth:`Machine.virt_to_host`), without setting A/D bits. **SEV**: gdb gets
  the *hypervisor's* view -- a page the guest shares (C-bit clear) reads as its
  plaintext, a private page as the ciphertext in DRAM, as a host debugger sees
  it when the guest's launch policy forbids debugging (NODBG, the default, under
  which the firmware refuses DBG_DECRYPT). Writes to a private page are refused.
* **Breakpoints** (``Z0`` and ``Z1``, both modelled as debug registers would be)
  are Unicorn code hooks on the guest-virtual address: no byte of guest memory
  changes, so neither the guest's reads nor the processor's intercept scan see
  them. Watchpoints are not modelled (gdb falls back to single-stepping).
* **Single-step** runs the guest with an instruction budget of one; an
  intercepted instruction completes through its #VMEXIT and handler in that
  step. **Continue** runs until a breakpoint, a ``monitor break-exit`` exit, the
  end of the guest, or gdb's Ctrl-C (:meth:`request_stop`).

The monitor commands (:data:`~.gdbstub.STANDARD_MONITOR_COMMANDS`) are bound to
the machine in :mod:`.monitor`.
"""
from __future__ import annotations

import threading
import time
from collections import Counter

from unicorn import UC_HOOK_CODE

from ..hypervisor.handlers import STOP
from ..hypervisor.machine import Machine, RunResult
from ..memory.hostmem import page_spans
from ..memory.encryption import EncryptionLayer
from ..memory.mmu import GuestLayer, IdentityNested, NestedLayer, TwoDimWalker, WalkStats
from ..memory.paging import Access
from ..svm.cpu import ExitRecord
from ..svm.cpustate import GPR_NAMES
from ..svm.exitcodes import exit_name
from ..svm.stop import StopReason
from .gdbstub import (SIGKILL, BreakpointType, MemoryFault, StopEvent, StopKind, UnavailableRegister)
from .monitor import bind_monitor

_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_VMCB_REGS = {"rip": "RIP", "eflags": "RFLAGS", "cr0": "CR0", "cr2": "CR2", "cr3": "CR3", "cr4": "CR4",
              "efer": "EFER", "rax": "RAX", "rsp": "RSP"}
#: how often a Ctrl-C from gdb is repeated until the run has stopped (it may land before run() starts)
_STOP_RETRY_S = 0.05


class MachineTarget:
    """gdb's view of ``machine``'s current guest (see the module docstring).

    ``run_kwargs`` are passed to every :meth:`Machine.run` (e.g. ``max_exits``);
    the wall-clock limit is off while debugging. :attr:`results` collects every
    run's :class:`RunResult`; :attr:`last` is the one that ended the guest.
    """

    def __init__(self, machine: Machine, *, max_exits: int = 10_000_000) -> None:
        self.m = machine
        self.max_exits = max_exits
        self.exits = 0
        self.counts: Counter[int] = Counter()
        self.walk: Counter[str] = Counter()
        self.tlb: Counter[str] = Counter()
        self.console = ""
        self.last: RunResult | None = None
        self.ended = False
        #: resume() calls so far
        self.resumes = 0
        self._breaks: dict[tuple[BreakpointType, int], int] = {}
        self._hit: tuple[BreakpointType, int] | None = None
        self._skip: int | None = None
        self._break_exits: set[int] = set()
        self._exit_hit: ExitRecord | None = None
        self._stop = threading.Event()
        self._running = threading.Event()
        self.monitor_table = bind_monitor(self)
        machine.resume_hooks.append(self._after_handler)

    # -- registers --------------------------------------------------------------------
    def _sev_es(self) -> bool:
        return self.m.sev is not None and self.m.sev.es is not None

    def read_register(self, name: str) -> int:
        if self._sev_es():
            raise UnavailableRegister(f"{name}: in the encrypted VMSA (SEV-ES)")
        v = self.m.guest.vmcb
        if name in _VMCB_REGS:
            return getattr(v, _VMCB_REGS[name])
        if name in GPR_NAMES:
            return self.m.cpu.guest_gpr(GPR_NAMES.index(name))
        if name in _SEGMENTS:
            return v.seg(name.upper()).selector
        if name in ("fs_base", "gs_base"):
            return v.seg(name[:2].upper()).base
        if name == "cr8":
            return v.V_TPR & 0xF
        raise UnavailableRegister(name)

    def write_register(self, name: str, value: int) -> None:
        if self._sev_es():
            raise UnavailableRegister(f"{name}: in the encrypted VMSA (SEV-ES)")
        v = self.m.guest.vmcb
        if name in _VMCB_REGS:
            if name == "efer":
                value |= v.EFER & (1 << 12)          # EFER.SVME stays as VMRUN requires
            setattr(v, _VMCB_REGS[name], value)
        elif name in GPR_NAMES:
            self.m.cpu.set_guest_gpr(GPR_NAMES.index(name), value)
        elif name in _SEGMENTS:
            s = v.seg(name.upper())
            s.selector = value & 0xFFFF
            v.set_seg(name.upper(), s)
        elif name in ("fs_base", "gs_base"):
            s = v.seg(name[:2].upper())
            s.base = value
            v.set_seg(name[:2].upper(), s)
        else:
            raise UnavailableRegister(name)

    # -- memory -----------------------------------------------------------------------
    def _page(self, gva: int, write: bool) -> int:
        """The host address of ``gva`` in the hypervisor's view (see the module docstring)."""
        access = Access.WRITE if write else Access.READ
        try:
            if self.m.shadow is not None:
                return self.m.virt_to_host(gva, access)
            t = self._walker().translate(gva, access, False, set_ad=False)
        except Exception:                       # a guest #PF or a nested fault: not mapped
            raise MemoryFault(gva) from None
        if t.dram is None:
            return t.hpa
        if write and t.private:
            raise MemoryFault(gva, f"{gva:#x} is in a private SEV page: the hypervisor cannot write its plaintext")
        return t.dram                            # SEV: DRAM, i.e. ciphertext for a private page

    def _walker(self) -> TwoDimWalker:
        """The processor's 2-D walk for the guest context the VMCB holds (valid before
        the first VMRUN, and after gdb changed CR3), with the SEV memory controller
        stacked as the processor stacks it; counted nowhere."""
        m, stats = self.m, WalkStats()
        v = m.guest.vmcb
        nested = NestedLayer(m.mem, v.N_CR3, stats) if v.NP_CONTROL & 1 else IdentityNested(m.mem, stats)
        enc = m.cpu.ext.encryption()
        guest = GuestLayer(nested, v.CR0, v.CR3, v.CR4, v.EFER, stats, enc)
        return TwoDimWalker(guest, nested, stats,
                            EncryptionLayer(enc, guest, nested, stats) if enc is not None else None)

    def read_memory(self, addr: int, size: int) -> bytes:
        return b"".join(self.m.mem.read(self._page(a, False), n) for a, _, n in page_spans(addr, size))

    def write_memory(self, addr: int, data: bytes) -> None:
        # all or nothing: translate every page first
        pages = [(self._page(a, True), off, n) for a, off, n in page_spans(addr, len(data))]
        for hpa, off, n in pages:
            self.m.mem.write(hpa, data[off:off + n])   # the processor drops a changed code page's scan

    # -- breakpoints ------------------------------------------------------------------
    def add_breakpoint(self, type: BreakpointType, addr: int, length: int) -> bool:
        if type not in (BreakpointType.SOFTWARE, BreakpointType.HARDWARE):
            return False
        key = (type, addr)
        if key not in self._breaks:
            self._breaks[key] = self.m.cpu.uc.hook_add(UC_HOOK_CODE, self._on_break, key, addr, addr)
            # drop translated code and the scanner's hooks: the blocks are translated again with this
            # hook in them, and it runs before the intercept check at the same address
            self.m.cpu.shed_candidate_hooks()
        return True

    def remove_breakpoint(self, type: BreakpointType, addr: int, length: int) -> bool:
        if type not in (BreakpointType.SOFTWARE, BreakpointType.HARDWARE):
            return False
        h = self._breaks.pop((type, addr), None)
        if h is not None:
            self.m.cpu.uc.hook_del(h)
            self.m.cpu.shed_candidate_hooks()
        return True

    def _on_break(self, uc, address: int, size: int, key: tuple[BreakpointType, int]) -> None:
        if self._skip == address:
            self._skip = None                   # the instruction resume() starts from runs first
            return
        self._skip = None
        if self._hit is None:
            self._hit = key
            self.m.cpu.stop_guest()

    # -- break-exit ---------------------------------------------------------------------
    def break_on_exit(self, code: int, on: bool = True) -> None:
        (self._break_exits.add if on else self._break_exits.discard)(int(code))

    @property
    def break_exits(self) -> set[int]:
        return set(self._break_exits)

    def _after_handler(self, m: Machine, rec: ExitRecord):
        """A resume hook: the exit's handler is done; stop here if gdb asked for this exit."""
        self._skip = None
        if rec.exitcode in self._break_exits:
            self._exit_hit = rec
            return STOP
        return None

    # -- running ------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()
        threading.Thread(target=self._stopper, daemon=True, name="gdb-stop").start()

    def _stopper(self) -> None:
        # request_stop() may land between resume()'s check and Machine.run() starting: repeat it
        while self._stop.is_set():
            if self._running.is_set():
                self.m.request_stop()
            time.sleep(_STOP_RETRY_S)

    def resume(self, step: bool) -> StopEvent:
        self.resumes += 1
        try:
            if self.ended:
                return self._ended_event()
            if self._stop.is_set():
                return StopEvent(StopKind.INTERRUPTED)
            return self._run(step)
        finally:
            self._stop.clear()

    def _run(self, step: bool) -> StopEvent:
        m = self.m
        self._hit = self._exit_hit = None
        self._skip = m.guest.vmcb.RIP if not self._sev_es() else None
        budget = max(0, self.max_exits - self.exits)
        self._running.set()
        try:
            if self._stop.is_set():
                return StopEvent(StopKind.INTERRUPTED)
            r = m.run(max_insns=1 if step else 0, timeout=0, max_exits=budget)
        finally:
            self._running.clear()
        self._skip = None
        self.absorb(r)
        if self._hit is not None:
            kind = StopKind.HW_BREAKPOINT if self._hit[0] is BreakpointType.HARDWARE else StopKind.BREAKPOINT
            return StopEvent(kind)
        if self._exit_hit is not None and r.reason == StopReason.EXIT:
            e = self._exit_hit
            return StopEvent(StopKind.EXIT, message=f"#VMEXIT {exit_name(e.exitcode)} at {e.rip:#x} "
                             f"(exitinfo1 {e.exitinfo1:#x}, exitinfo2 {e.exitinfo2:#x}); handled, "
                             f"the guest continues at {m.guest.vmcb.RIP:#x}")
        if r.reason == StopReason.INSN_BUDGET and step:
            return StopEvent(StopKind.STEP)
        if r.reason == StopReason.STOPPED:
            return StopEvent(StopKind.INTERRUPTED)
        self.ended = True
        return self._ended_event()

    def _ended_event(self) -> StopEvent:
        r = self.last
        assert r is not None
        detail = f" - {r.detail}" if r.detail else ""
        msg = f"run ended: {r.reason}{detail}; {self.exits} exits"
        if r.reason in (StopReason.GUEST_EXIT, StopReason.HALT):
            return StopEvent(StopKind.ENDED, exit_code=(r.exit_code or 0) & 0xFF, message=msg)
        return StopEvent(StopKind.ENDED, exit_code=None, signal=SIGKILL, message=msg)

    # -- monitor ------------------------------------------------------------------------
    def monitor(self, command: str) -> str:
        return self.monitor_table.dispatch(command)

    def absorb(self, r: RunResult) -> None:
        """Add one :meth:`Machine.run` (a resume) to the debugged run's figures."""
        self.exits += r.exits
        self.counts.update(r.counts)
        self.walk.update(r.walk)
        self.tlb.update(r.tlb)
        self.console += r.console
        self.last = r

    def result(self) -> RunResult | None:
        """The debugged run as one :class:`RunResult` (figures summed over the resumes)."""
        r = self.last
        if r is None:
            return None
        r.exits, r.counts, r.console = self.exits, dict(self.counts), self.console
        r.walk, r.tlb = dict(self.walk), dict(self.tlb)
        return r

