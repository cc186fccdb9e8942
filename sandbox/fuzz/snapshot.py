"""A prepared machine that runs one case after another from a snapshot.

The snapshot is taken once, after the guest's long-mode entry state is built:
host DRAM (a copy outside the Python heap) and Unicorn's CPU context.  After
every case the harness writes back the pages that differ from the copy, then
restores the CPU context.

Which pages to compare is tracked, writer by writer: guest stores can only go
through soft-TLB entries a fill made writable (a fill observer), the
processor model's own Python stores (event frames, VMSAVE) are reported by
the processor (a write observer), the hypervisor writes through its
``HostMemory`` (a subclass here records the pages), and the harness writes
the code window and the configuration itself.  The processor's A/D-bit
updates land in page-table pages, which are compared on every case with the
VMCB, the nested tables and the IOPM/MSRPM.  Each candidate page is one
``memcmp`` against the copy (no slices, no allocation).  Every
``check_free_every`` cases all of DRAM is compared instead -- 64 KiB chunks,
then the pages of a chunk that differs -- which restores and counts
(:attr:`Harness.untracked`) anything the tracking missed.  A change the
tracking missed may have been made by any case since the last full
comparison, so those cases are replayed from the snapshot one by one, each
followed by a full comparison, and the change is blamed on the case whose
replay makes it (cases are deterministic from the snapshot).

The same comparison is the isolation oracle: a changed page that is neither
guest RAM, the VMCB nor a nested-table page means guest activity reached host
memory it must not (APM §15.25: guest accesses go through the nested
mappings only).  A TLB-fill wrapper checks every fill the guest causes lands
on one of its own pages (a fill observer on the processor).
"""
from __future__ import annotations

import ctypes
import struct
import threading
import time
import traceback
from dataclasses import dataclass, field

from unicorn import UC_PROT_WRITE, UcError

from ..arch import M64
from ..hypervisor.machine import PAGING_MODES, Machine, RunResult
from ..hypervisor.sev_launch import launch_sev
from ..hypervisor.image import GDT_BASE
from ..memory.hostmem import PAGE_SIZE, HostMemory
from ..memory.paging import ADDR_MASK, PTE
from ..svm.engine import pointer_arg
from ..svm.exitcodes import ExitCode
from ..svm.msrpm import msrpm_bit
from ..svm.stop import StopReason
from ..svm.vmcb import OFF_INTERCEPTS, OFF_RAX, OFF_RIP
from . import planted
from .audit import Auditor
from .case import CODE_BASE, GPRS, Case

_I6 = struct.Struct("<6I")
_Q = struct.Struct("<Q")
#: a case's GPRs set in the processor's state (RAX and RSP go in the VMCB)
_GPR_INDEX = {n: i for i, n in enumerate(GPRS) if n not in ("rax", "rsp")}

#: instruction budget per case: enough for a 64-instruction stream with its handler round trips
DEFAULT_MAX_INSNS = 1024
DEFAULT_MAX_EXITS = 64
#: wall-clock limit per case: a safety net only (a watchdog thread), since the instruction and
#: exit budgets bound every case.  The slowest cases seen (handlers emulating huge REP counts)
#: take about 0.5 s; a limit near that made a seeded campaign's results depend on the
#: machine's load, so it sits an order of magnitude above.
DEFAULT_TIMEOUT_S = 5.0
#: what the shadow MMU intercepts to keep its tables in step with the guest's
#: (sandbox.hypervisor.shadow.ShadowPager): MOV from/to CR3, INVLPG, #PF
SHADOW_INTERCEPTS = (ExitCode.CR3_READ, ExitCode.CR3_WRITE, ExitCode.INVLPG, ExitCode.EXCP_PF)
#: the loader's area (GDT, page tables) below this guest-physical address: its
#: non-zero pages are compared on every case (the processor sets A/D bits there)
LOADER_AREA_END = 0x80000
#: candidate hooks after which they are shed: Unicorn checks every code hook, parked
#: ones included, on each instruction a run with an instruction budget executes, and
#: a shed only parks them (about 26 new ones a case)
MAX_HOOKS = 100
#: pages compared in one ``memcmp`` before the pages of a differing chunk are compared one by one
CHUNK_PAGES = 16
#: a case's virtual host TSC (:meth:`Harness._case_tsc`): its value when the case
#: begins (above 32 bits, so EDX is not zero) and its ticks per ns of guest time (2 GHz)
CASE_TSC_BASE = 0x1_2345_6789_0000
CASE_TSC_PER_NS = 2

_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int
_memmove = ctypes.memmove
# the per-page calls of every case: no argument conversion (the pointers prepared once
# per page with engine.pointer_arg, the size a c_size_t), the GIL kept (they copy or compare 4 KiB)
_page_memcmp = ctypes.PYFUNCTYPE(ctypes.c_int)(ctypes.cast(_libc.memcmp, ctypes.c_void_p).value)
_page_memmove = ctypes.PYFUNCTYPE(ctypes.c_void_p)(ctypes.cast(_libc.memmove, ctypes.c_void_p).value)
_PAGE_BYTES = ctypes.c_size_t(PAGE_SIZE)


@dataclass
class Outcome:
    """What one case did: the run result, its exits, and anything an oracle flagged."""
    result: RunResult | None
    exits: list = field(default_factory=list)          # ExitRecords in order
    handlers: list[str] = field(default_factory=list)  # handler name per exit
    crash: str = ""                                    # robustness: a Python exception escaped
    isolation: list[str] = field(default_factory=list)
    audit: list = field(default_factory=list)          # AuditFindings (audit mode)
    dirty_pages: int = 0
    #: isolation findings of earlier cases, found by this case's full comparison and
    #: pinned on them by replaying the cases since the previous one: (case, messages)
    earlier: list = field(default_factory=list)
    #: whether the case read the time-stamp counter (a value counted in instructions)
    read_time: bool = False
    #: whether a guest or nested table page changed during the case, or the guest
    #: could store to one (granted writable): its outcome may then depend on what
    #: the TLB held when it began (APM vol. 2 §5.5.3), which the harness keeps
    #: across cases
    wrote_tables: bool = False


class Harness:
    """One Machine, prepared once and restored per case."""

    def __init__(self, dram: int = 4 << 20, ram: int = 2 << 20, max_insns: int = DEFAULT_MAX_INSNS,
                 max_exits: int = DEFAULT_MAX_EXITS, check_free_every: int = 16, audit: bool = False,
                 paging: str = "nested", sev: bool = False) -> None:
        """``paging``: how the hypervisor virtualizes guest memory, ``"nested"``
        (the processor's nested paging) or ``"shadow"`` (the hypervisor's shadow
        tables: every case starts on an empty shadow, and the CR3, INVLPG and
        #PF intercepts the shadow MMU needs stay armed whatever the case arms).
        ``sev``: the guest is launched as an SEV guest (its RAM encrypted in
        DRAM, its tables with the C-bit; nested paging only); each case's code
        is written encrypted, as the guest's own stores would leave it."""
        if paging not in PAGING_MODES:
            raise ValueError(f"paging must be one of {', '.join(PAGING_MODES)}, not {paging!r}")
        if sev and paging != "nested":
            raise ValueError("SEV needs nested paging")
        self.paging, self.sev = paging, sev
        self.max_insns, self.max_exits = max_insns, max_exits
        #: compare all of DRAM every N cases (0: never; :meth:`run` can ask for it on a case)
        self.check_free_every = check_free_every
        self._since_full = 0
        #: the cases run since the last full comparison (what a change it finds is blamed on)
        self._window: list[Case] = []
        self._replaying = False
        #: cases run (replays not counted): names the cases a finding could not be pinned on
        self.cases_run = 0
        #: pages the full comparison found changed that the tracking had missed
        self.untracked = 0
        self._missed: list[int] = []
        self._dram, self._ram, self._audit = dram, ram, audit
        #: the guest's RAM in bytes (guest-physical 0 up)
        self.ram_size = ram
        self.rebuilds = 0
        self._time_reads = 0
        self._watch = _Watchdog()
        self._build()

    def _build(self) -> None:
        """A new Machine, prepared and snapshotted."""
        self._written: set[int] = set()
        mem = _TrackedMemory(self._dram, self._written)
        m = self.m = Machine(dram=self._dram, ram=self._ram, mem=mem, paging=self.paging)
        g = m.guest
        g.setup_long_mode(CODE_BASE)
        #: the guest's own CR3 (under shadow paging the VMCB holds the shadow root)
        self._guest_cr3 = g.vmcb.CR3
        if m.shadow is not None:
            m.shadow.attach_cr3(self._guest_cr3)
        if m.shadow is None and not self.sev:
            # as if every page had been touched once: the walks of a case then
            # write no Accessed/Dirty bit, so the tables stay as snapshotted and
            # the TLB's entries stay good from one case to the next
            _set_accessed_dirty(m.mem, g.ram[self._guest_cr3 & ~0xFFF], lambda gpa: g.ram.get(gpa & ~0xFFF))
            _set_accessed_dirty(m.mem, g.npt.root, lambda hpa: hpa)
        self._engine = None
        if self.sev:
            rep = launch_sev(m)
            self._engine = m.sev.sp.engine_for(rep.asid)
            m.mem.sync = None
        #: intercepts the hypervisor itself needs (the shadow MMU's), or'ed into every case's
        self._required = _words(SHADOW_INTERCEPTS if m.shadow is not None else ())
        self.cpu = cpu = m.cpu
        self.uc = cpu.uc
        self.mm = m.mem.raw
        self.guest_pages = frozenset(g.ram.values())
        self.vmcb_hpa = g.vmcb_hpa
        fixed = {g.iopm.hpa + i * PAGE_SIZE for i in range(3)} | {g.msrpm.hpa + i * PAGE_SIZE for i in range(2)}
        fixed.add(cpu.vm_hsave_pa)
        allocated = set(m.mem.pages())
        self._allocated = frozenset(allocated)
        # what is left of the allocation: the VMCB and the nested page tables
        self.npt_pages = frozenset(allocated - self.guest_pages - fixed - {self.vmcb_hpa})
        self.allowed = self.guest_pages | self.npt_pages | {self.vmcb_hpa}
        self.config_pages = frozenset(fixed - {cpu.vm_hsave_pa})
        self.pages = sorted(allocated)
        self.free_ranges = _ranges(sorted(set(range(0, m.mem.size, PAGE_SIZE)) - allocated))
        self._gpa_hpa = dict(g.ram)
        self._fills_outside: list[int] = []
        self._watch_fills()
        self._base = _Snapshot(m.mem.address, m.mem.size)
        self._written.clear()      # what setup wrote is in the snapshot: not a case's writes
        self._alloc_runs = _ranges(self.pages)
        loader = {g.ram[gpa] for gpa in range(GDT_BASE, LOADER_AREA_END, PAGE_SIZE)
                  if gpa in g.ram and any(self.mm[g.ram[gpa]:g.ram[gpa] + PAGE_SIZE])}
        #: compared on every case: all but guest RAM (VMCB, tables, IOPM/MSRPM) and the loader's tables
        self._always = frozenset((allocated - self.guest_pages) | loader)
        #: pages whose change makes the TLB's translations stale: guest and nested tables
        self._table_pages = frozenset(loader | self.npt_pages)
        self._tlb_good = False
        self._wrote_tables = False
        cpu.add_write_observer(self._written.add)
        self._ctx = self.uc.context_save()
        self._restore_ctx = cpu.st.context_restorer(self._ctx)
        #: (msr, write) -> its MSRPM bit or None (msrpm_bit, remembered)
        self._msr_bits: dict[tuple[int, bool], int | None] = {}
        self._msrs = dict(m.msrs)
        self._cur_exits: list = []
        self._cur_handlers: list[str] = []
        m.on_exit_record = self._record
        self.auditor = None
        if self._audit:
            self.auditor = Auditor(self)
        self._tsc_t0 = 0
        cpu.virtualize_tsc(self._case_tsc)

    def _case_tsc(self) -> int:
        """The host time-stamp counter a case reads (a RDTSC it does not intercept,
        or the hypervisor's handler for one it does): :data:`CASE_TSC_BASE` plus
        :data:`CASE_TSC_PER_NS` ticks per nanosecond of guest time since the case
        began, guest time being counted in retired instructions.  A function of
        the case alone, so a seeded campaign, a minimization and a saved case's
        replay see the same values (the host's clock would differ every run)."""
        self._time_reads += 1
        return CASE_TSC_BASE + (self.cpu.guest_time_ns - self._tsc_t0) * CASE_TSC_PER_NS

    def hypervisor_exits(self, case: Case) -> frozenset[int]:
        """Exit codes the hypervisor arms for itself and ``case`` does not (the
        shadow MMU's CR3, INVLPG and #PF intercepts): exits a reference that
        runs the case's own intercepts never sees."""
        return frozenset(32 * w + b for w in range(6) for b in range(32)
                         if self._required[w] >> b & 1 and not case.config.intercepts[w] >> b & 1)

    # -- isolation: every TLB fill must land on a guest page -------------------------
    def _watch_fills(self) -> None:
        cpu, guest_pages, out, written = self.cpu, self.guest_pages, self._fills_outside, self._written
        cache = self.m.mem.cache_base

        def on_fill(gva: int, access: int, hpa: int, perms: int) -> None:
            if perms & UC_PROT_WRITE:
                written.add(hpa & ~0xFFF)          # guest stores can reach this page
            # an SEV-private page is reached through the processor's plaintext cache
            page = (hpa if hpa < cache else hpa - cache) & ~0xFFF
            if cpu.nested_paging and page not in guest_pages:
                out.append(hpa)
        cpu.add_fill_observer(on_fill)

    def _shed_hooks(self) -> None:
        """Delete the per-address candidate hooks cases left behind (every translated
        block is checked against every hook, so thousands of them slow Unicorn down).
        Unicorn resolves the hooks' pages through the TLB fill as it deletes them,
        outside any run and with the snapshot's (host) context loaded, so whatever
        those fills put in the ASID-tagged TLB is dropped before the next case."""
        self.cpu.shed_candidate_hooks()
        self._tlb_good = False
        self.rebuilds += 1

    def forget_tlb(self) -> None:
        """Start the next case with an empty TLB, as a new harness would."""
        self._tlb_good = False

    def _record(self, rec) -> None:
        self._cur_exits.append(rec)
        if self.auditor is not None:
            self.auditor.on_exit(rec)
        h = self.m.handlers.get(rec.exitcode)
        self._cur_handlers.append(getattr(h, "__name__", "none") if h else "none")

    # -- per case ---------------------------------------------------------------------
    def apply(self, case: Case) -> None:
        """Write the case's code, registers and VMCB configuration into the restored machine."""
        m, cpu, mm = self.m, self.cpu, self.mm
        m.mem.sync = None
        entry = case.entry
        code = case.code
        at = 0
        while at < len(code):
            gpa = entry + at
            n = min(len(code) - at, PAGE_SIZE - (gpa & 0xFFF))
            hpa = self._gpa_hpa[gpa & ~0xFFF] + (gpa & 0xFFF)
            if self._engine is None:
                mm[hpa:hpa + n] = code[at:at + n]
            else:
                self._write_private(hpa, code[at:at + n])
            self._written.add(hpa & ~0xFFF)
            at += n
        if self.sev:
            # the code went into DRAM behind the memory controller: any plaintext it
            # cached since the restore (fills outside a run, e.g. Unicorn resolving
            # the pages of hooks being shed) is stale
            memctl = m.sev.memctl
            for p in memctl.cached_pages():
                memctl.invalidate(p)
        cfg = case.config
        v = self.vmcb_hpa
        req = self._required
        _I6.pack_into(mm, v + OFF_INTERCEPTS, *(cfg.intercepts if not any(req) else
                                                (a | b for a, b in zip(cfg.intercepts, req))))
        g = m.guest
        io = g.iopm.hpa
        configured = set()                    # the IOPM/MSRPM pages this case's configuration writes
        for p in cfg.iopm:
            a = io + (p >> 3)
            mm[a] |= 1 << (p & 7)
            configured.add(a & ~0xFFF)
        ms = g.msrpm.hpa
        bits = self._msr_bits
        for msr, r, w in cfg.msrpm:
            for on, wr in ((r, False), (w, True)):
                if not on:
                    continue
                bit = bits.get((msr, wr), -1)
                if bit == -1:
                    if len(bits) >= 4096:           # hand-edited cases may name any MSR
                        bits.clear()
                    bit = bits[msr, wr] = msrpm_bit(msr, wr)
                if bit is not None:
                    a = ms + (bit >> 3)
                    mm[a] |= 1 << (bit & 7)
                    configured.add(a & ~0xFFF)
        for gpa, present, write, execute in cfg.npt if m.shadow is None else ():
            if gpa in self._gpa_hpa:
                g.npt.protect(gpa, present=present, write=write, execute=execute)
        regs = case.regs
        _Q.pack_into(mm, v + OFF_RIP, entry)
        _Q.pack_into(mm, v + OFF_RAX, regs.get("rax", 0))
        # the other GPRs into the processor (GPR i in QEMU order is q[i]), where VMRUN finds them
        q = cpu.st.q
        for n, val in regs.items():
            i = _GPR_INDEX.get(n)
            if i is not None:
                q[i] = val & M64
        # stale translations of the previous case's code: the code window and
        # anything else the guest ran may have changed under Unicorn
        cpu.reset_translation_caches()
        cpu.gif = True
        if not cpu.branch_records.clear:
            cpu.branch_records.reset()           # DebugCtl and the records as snapshotted (zero)
        self._tsc_t0 = cpu.guest_time_ns         # the case's TSC starts at CASE_TSC_BASE
        self._time_reads = 0
        # and the ASID-tagged TLB behind it, unless it holds only what the
        # snapshot's tables give: the previous case changed no table page,
        # flushed nothing (no CR3/CR4/INVLPG/TLB_CONTROL) and this case edits no
        # nested entry (see restore)
        if not self._tlb_good or cfg.npt:
            cpu.tlb.flush_all()
        self._tlb_good = not cfg.npt
        if m.shadow is not None:
            m.shadow.attach_cr3(self._guest_cr3)      # an empty shadow: the previous case's tables are gone
        # the configured pages as the case starts (a configuration page it did not write
        # starts as snapshotted: a change to it is the guest's, whatever restore compares)
        self._after_config = {p: mm[p:p + PAGE_SIZE] for p in configured}

    def _write_private(self, hpa: int, data: bytes) -> None:
        """Store ``data`` (within one page) into SEV-private guest memory: DRAM
        gets the page's ciphertext under the guest's key."""
        page, o = hpa & ~0xFFF, hpa & 0xFFF
        pt = bytearray(self._engine.decrypt_page(page, bytes(self.mm[page:page + PAGE_SIZE])))
        pt[o:o + len(data)] = data
        self.mm[page:page + PAGE_SIZE] = self._engine.encrypt_page(page, bytes(pt))

    def unmapped_edits(self, case: Case) -> list[int]:
        """The guest-physical pages ``case``'s nested-page edits name that are not
        guest RAM (no nested mapping to edit: :meth:`apply` passes them by)."""
        return [gpa for gpa, *_ in case.config.npt if gpa not in self._gpa_hpa]

    def run(self, case: Case, full: bool | None = None, audit: bool = True) -> Outcome:
        """Run ``case`` from the snapshot and restore it.  ``full``: compare all of
        DRAM afterwards (None: every :attr:`check_free_every` cases); a replayed
        saved case asks for it, so its isolation check is exact.  ``audit``: an
        audit harness audits this case (False: it runs as a fast harness would,
        with the audit's per-instruction hook off)."""
        try:
            if self.cpu.candidate_hook_count > MAX_HOOKS or \
                    (audit and self.auditor is not None and not self.auditor.placed):
                # the audit's hook must run before any candidate hook of an instruction
                # (Unicorn calls code hooks in the order they were added): placing it
                # after cases that ran unaudited sheds the candidate hooks first (off, it
                # is parked in its place)
                self._shed_hooks()
        except Exception as e:     # robustness: the processor failing here is a finding, not the end
            tb = traceback.extract_tb(e.__traceback__)[-1]
            self._tlb_good = False
            return Outcome(None, crash=f"exception escaped shedding candidate hooks: {type(e).__name__}: {e} "
                                      f"({tb.filename}:{tb.lineno})")
        self.cpu.decide = planted.decision()        # a planted bug, in processes that run one
        m = self.m
        self._cur_exits, self._cur_handlers = [], []
        self._fills_outside.clear()
        m.counts = {}
        self.cpu.exit_count = 0        # Machine.run's max_exits counts from the processor's total
        m.trace.clear()
        m.serial.output = bytearray()
        m.msrs = dict(self._msrs)
        out = Outcome(None)
        try:
            self.apply(case)
            if self.auditor is not None:
                if audit:
                    self.auditor.begin()
                else:
                    self.auditor.rest()
            self._watch.arm(self.cpu, DEFAULT_TIMEOUT_S)
            try:
                out.result = m.run(max_insns=self.max_insns, timeout=0, max_exits=self.max_exits)
            finally:
                self._watch.disarm()
            if out.result.reason == StopReason.HANDLER_ERROR:
                out.crash = f"{out.result.reason}: {out.result.detail}"
        except Exception as e:        # robustness: nothing may escape the hypervisor
            tb = traceback.extract_tb(e.__traceback__)[-1]
            out.crash = f"exception escaped Machine.run: {type(e).__name__}: {e} ({tb.filename}:{tb.lineno})"
        out.exits, out.handlers = self._cur_exits, self._cur_handlers
        out.read_time = self._time_reads > 0
        if self.auditor is not None and self.auditor.enabled:
            out.audit = self.auditor.end()
        for a in self._fills_outside:
            out.isolation.append(f"guest TLB fill reached host page {a & ~0xFFF:#x} outside its nested mappings")
        if not self._replaying:
            self.cases_run += 1
            self._window.append(case)
        window = self._window
        out.dirty_pages, bad = self._restore(full)
        out.wrote_tables = self._wrote_tables
        missed = self._missed
        if missed and len(window) > 1 and not self._replaying and not set(missed).isdisjoint(bad):
            # (a missed change to the guest's own memory is counted, not blamed: no replay for it)
            bad, out.earlier = self._localize(window, bad, missed)
        out.isolation += [_outside(p) if isinstance(p, int) else p for p in bad]
        return out

    def _localize(self, window: list[Case], bad: list[int], missed: list[int]) -> tuple[list, list]:
        """The full comparison after the last of ``window`` found ``missed``: pages
        the tracking missed, which any of those cases may have changed (a missed
        page is not restored until a full comparison sees it).  DRAM is back at
        the snapshot now; each case is replayed alone from it with a full
        comparison after it, and a missed page outside the guest's memory is
        blamed on the cases whose replay changes it.  Returns the last case's
        own ``bad`` (pages, or a message naming the window for a page no replay
        changed) and the earlier cases' isolation messages, (case, messages)."""
        missed_bad = set(missed).intersection(bad)
        own = [p for p in bad if p not in missed_bad]
        counted = self.untracked
        self._replaying = True
        blamed: set[int] = set()
        earlier = []
        try:
            for i, c in enumerate(window):
                self.run(c, full=True)
                mine = sorted(missed_bad.intersection(self._missed))
                blamed.update(mine)
                if i == len(window) - 1:
                    own += mine
                elif mine:
                    earlier.append((c, [_outside(p) for p in mine]))
        finally:
            self._replaying = False
            self.untracked = counted          # the replays found again what was counted once
            self._missed = []
        first = self.cases_run - len(window) + 1
        own += [f"{_outside(p)} during one of cases {first}-{self.cases_run} of this machine (replaying each "
                f"alone from the snapshot did not change it)" for p in sorted(missed_bad - blamed)]
        return own, earlier

    def _dirty_free(self) -> list[int]:
        """Changed pages among those the allocator never handed out (megabytes that
        almost never change: one ``memcmp`` per chunk)."""
        return self._base.changed(self.free_ranges)

    def restore(self, full: bool | None = None) -> tuple[int, list[str]]:
        """Write back the pages that differ from the snapshot; restore the CPU context.
        ``full``: compare all of DRAM (None: when :attr:`check_free_every` cases
        have passed since the last time).  Returns (pages restored, isolation
        findings)."""
        n, bad = self._restore(full)
        return n, [_outside(p) for p in bad]

    def _restore(self, full: bool | None) -> tuple[int, list[int]]:
        """:meth:`restore`, with the isolation findings as page addresses; the pages
        a full comparison found that the tracking missed are left in :attr:`_missed`."""
        base, size = self._base, self.m.mem.size
        # a page of the processor's plaintext cache (SEV) stands for its DRAM page
        written = {p if p < size else p - size for p in self._written}
        cand = self._always | written
        self._written.clear()
        tables = frozenset()
        if self.m.shadow is not None:
            # the shadow tables the hypervisor allocated for this case (the processor
            # sets A/D bits in them): compared, restored, and its own to write
            mem = self.m.mem
            tables = (frozenset(mem.pages()) - self._allocated) | mem.handed_out
            mem.handed_out.clear()
            cand |= tables
        dirty = base.changed_pages(cand)
        self._since_full += 1
        if full is None:
            full = bool(self.check_free_every) and self._since_full >= self.check_free_every
        self._missed = []
        if full:
            every = base.changed(self._alloc_runs) + self._dirty_free()
            self._missed = sorted(set(every) - set(dirty))
            self.untracked += len(self._missed)
            dirty = every
            self._since_full = 0
            self._window = []
        bad = []
        after = getattr(self, "_after_config", {})
        mm = self.mm
        for p in dirty:
            if p in self.allowed or p in tables:
                continue
            if p in after and mm[p:p + PAGE_SIZE] == after[p]:
                continue          # the hypervisor's own IOPM/MSRPM configuration for this case
            bad.append(p)
        for p in dirty:
            base.put_back(p)
        # the TLB is kept only while it holds nothing but the snapshot's translations:
        # a table page the guest could store to may have been edited, used (a TLB
        # entry made from the edit) and put back -- equal bytes, a stale entry that
        # no invalidation dropped (APM vol. 2 §5.5.3), which the next case would see
        self._wrote_tables = not (self._table_pages.isdisjoint(dirty) and self._table_pages.isdisjoint(written))
        self._tlb_good = self._tlb_good and self.cpu.tlb.stats.flushes == 0 and \
            self.m.shadow is None and not self.sev and not self._wrote_tables
        if self.sev:
            memctl = self.m.sev.memctl
            for p in memctl.cached_pages():        # plaintext of the case's pages: decrypted anew
                memctl.invalidate(p)
        err = self._restore_ctx()
        if err:
            raise UcError(err)
        return len(dirty), bad


class _TrackedMemory(HostMemory):
    """Host DRAM that records the pages the hypervisor writes (into ``written``)
    and the pages it allocates (into :attr:`handed_out`, until cleared)."""

    def __init__(self, size: int, written: set[int]) -> None:
        super().__init__(size)
        self._written = written
        self.handed_out: set[int] = set()

    def alloc_page(self, zero: bool = True) -> int:
        hpa = super().alloc_page(zero)
        self.handed_out.add(hpa)
        self._written.add(hpa)
        return hpa

    def _note(self, hpa: int, n: int) -> None:
        self._written.update(range(hpa & ~0xFFF, hpa + max(n, 1), PAGE_SIZE))

    def write(self, hpa: int, data) -> None:
        super().write(hpa, data)
        self._note(hpa, len(data))

    def write_u64(self, hpa: int, value: int) -> None:
        super().write_u64(hpa, value)
        self._note(hpa, 8)

    def write_u32(self, hpa: int, value: int) -> None:
        super().write_u32(hpa, value)
        self._note(hpa, 4)

    def write_u8(self, hpa: int, value: int) -> None:
        super().write_u8(hpa, value)
        self._note(hpa, 1)


class _Snapshot:
    """A copy of DRAM outside the Python heap, compared and copied back with
    ``memcmp``/``memmove`` on addresses (no slices, no allocations per case)."""

    def __init__(self, address: int, size: int) -> None:
        self._live = address
        self._buf = ctypes.create_string_buffer(size)
        self._copy = ctypes.addressof(self._buf)
        _memmove(self._copy, address, size)
        # most of DRAM is zero in the copy: a chunk of zero pages is compared
        # against one small zero buffer, which reads half the memory a
        # live-against-copy compare does (and that buffer stays in cache)
        self._zero = ctypes.create_string_buffer(CHUNK_PAGES * PAGE_SIZE)
        self._zaddr = ctypes.addressof(self._zero)
        nz = [0]
        for p in range(0, size, PAGE_SIZE):
            nz.append(nz[-1] + (ctypes.string_at(self._copy + p, PAGE_SIZE).count(0) != PAGE_SIZE))
        #: non-zero pages of the copy below page i: ``nonzero_below[i]``
        self._nonzero_below = nz
        #: page -> its prepared pointer arguments (:meth:`_args`)
        self._page_args: dict[int, tuple[object, object]] = {}

    def changed(self, ranges: list[tuple[int, int]]) -> list[int]:
        """The pages within ``ranges`` (page-aligned [lo, hi) pairs) that differ from the copy."""
        live, copy, zero, nz, out = self._live, self._copy, self._zaddr, self._nonzero_below, []
        step = CHUNK_PAGES * PAGE_SIZE
        for lo, hi in ranges:
            for c in range(lo, hi, step):
                n = min(step, hi - c)
                ref = zero if nz[(c + n) // PAGE_SIZE] == nz[c // PAGE_SIZE] else copy + c
                if _memcmp(live + c, ref, n):
                    out += [p for p in range(c, c + n, PAGE_SIZE) if _memcmp(live + p, copy + p, PAGE_SIZE)]
        return out

    def _args(self, page: int) -> tuple[object, object]:
        """The prepared pointer arguments of ``page`` in DRAM and in the copy."""
        a = self._page_args.get(page)
        if a is None:
            a = self._page_args[page] = (pointer_arg(self._live + page), pointer_arg(self._copy + page))
        return a

    def changed_pages(self, pages) -> list[int]:
        """Those of ``pages`` (page addresses) that differ from the copy, in order."""
        args, cmp, n = self._page_args, _page_memcmp, _PAGE_BYTES
        out = []
        for p in sorted(pages):
            a = args.get(p) or self._args(p)
            if cmp(a[0], a[1], n):
                out.append(p)
        return out

    def put_back(self, page: int) -> None:
        a = self._page_args.get(page) or self._args(page)
        _page_memmove(a[0], a[1], _PAGE_BYTES)


class _Watchdog:
    """One long-lived thread that ends a case running past its wall-clock limit.
    (``Machine.run``'s own timeout starts a thread per run: about 1 ms a case.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cpu = None
        self._deadline = 0.0
        self._thread: threading.Thread | None = None

    def arm(self, cpu, seconds: float) -> None:
        with self._lock:
            self._cpu, self._deadline = cpu, time.monotonic() + seconds
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="fuzz-watchdog")
            self._thread.start()

    def disarm(self) -> None:
        with self._lock:
            self._cpu = None

    def _loop(self) -> None:
        while True:
            time.sleep(0.02)
            with self._lock:
                cpu = self._cpu
                if cpu is not None and time.monotonic() > self._deadline:
                    self._cpu = None
                    cpu.expire_timeout()     # as Machine.run's own timeout: flag, then emu_stop


def _set_accessed_dirty(mem: HostMemory, root_hpa: int, to_hpa) -> None:
    """Set A on every present entry of the 4-level tables at ``root_hpa``, and D
    on every leaf; ``to_hpa(address)`` maps a table address to its host page."""
    def visit(table: int, level: int) -> None:
        for i in range(512):
            a = table + 8 * i
            e = mem.read_u64(a)
            if not e & PTE.P:
                continue
            leaf = level == 1 or (level in (2, 3) and e & PTE.PS)
            mem.write_u64(a, e | PTE.A | (PTE.D if leaf else 0))
            if not leaf:
                nxt = to_hpa(e & ADDR_MASK)
                if nxt is not None:
                    visit(nxt, level - 1)
    visit(root_hpa, 4)


def _outside(page: int) -> str:
    """The isolation finding for a changed host page the guest may not write."""
    return f"host page {page:#x} outside the guest's memory, VMCB and tables changed"


def _words(codes) -> tuple[int, ...]:
    """The six intercept words with the bits of ``codes`` set."""
    w = [0] * 6
    for c in codes:
        w[c >> 5] |= 1 << (c & 31)
    return tuple(w)


def _ranges(pages: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + PAGE_SIZE)
        else:
            out.append((p, p + PAGE_SIZE))
    return out
