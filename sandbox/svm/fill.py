"""The TLB fill: every miss of Unicorn's soft TLB, answered like the hardware's page walker.

Unicorn runs with a virtual TLB, so each soft-TLB miss comes here.  The
ASID-tagged TLB model (:class:`~sandbox.memory.tlb.Tlb`) answers it when it
holds a translation good enough for the access; otherwise the 2-D walk
(:mod:`sandbox.memory.mmu`, APM §15.25) makes one.  A failed walk is kept
in :attr:`TlbFill.pending_fault` for the run loop, which raises the #PF (or
#NPF) once Unicorn has stopped.

The fill also keeps the code-page bookkeeping the scanner depends on: a
fetch fill scans the page (rescans what changed), and a scanned page is
executable or writable in the soft TLB, never both: a guest store to one
comes back here as a write fill, which takes its executable entries away, and
the next block translated from it as a fetch fill, which takes the writable
ones away and rescans first (:mod:`.smc`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from unicorn import UC_MEM_FETCH, UC_MEM_WRITE, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, Uc

from ..arch import CR0_PG, CR0_WP, CR4_PAE, CR4_PGE, CR4_PSE, CR4_SMEP, EFER_LMA, EFER_NXE
from ..memory.encryption import EncryptionLayer
from ..memory.fastwalk import FastTranslate, fast_translator
from ..memory.hostmem import PAGE_SIZE, HostMemory
from ..memory.mmu import (GuestException, GuestGP, GuestLayer, GuestPageFault, IdentityNested, NestedFault,
                          NestedLayer, TwoDimWalker, WalkStats)
from ..memory.paging import Access
from ..memory.tlb import DIRTY, EXECUTABLE, HPA, USER_PAGE, WRITABLE, Tlb
from .controls import GuestControls
from .cpustate import HF_CPL_MASK, OFF_CR, OFF_EFER, OFF_EIP, OFF_HFLAGS, CpuState
from .decode import MAX_INSN
from .engine import StoreWatch, flush_soft_tlb
from .extension import NO_EXTENSION, ProcessorExtension
from .one_insn_block import OneInsnBlock
from .soft_tlb import page_flusher

if TYPE_CHECKING:
    from .scanner import Scanner

#: QEMU's soft TLB: 2**8 entries per MMU index at first, at most 2**22
#: (CPU_TLB_DYN_DEFAULT_BITS, CPU_TLB_DYN_MAX_BITS for a 64-bit guest on a 64-bit host)
SOFT_TLB_INITIAL = 1 << 8
SOFT_TLB_MAX = 1 << 22
#: QEMU doubles the soft TLB at a flush when more than 70% of it was used
#: (tlb_mmu_resize_locked); a little margin over that for the count's slack
SOFT_TLB_GROW_PERCENT = 72

#: code pages' entries flushed one by one (:meth:`TlbFill._drop_entries`); more: all of them
_PAGE_FLUSHES_MAX = 8

#: code pages watched for stores (:class:`StoreWatch`) before the watches are dropped at a reset
WATCHED_MAX = 64

#: blocks cut to one instruction after QEMU gave up a store into the running block (:meth:`TlbFill._after_stores`)
ONE_INSN_RUN = 64

#: guest contexts whose walkers are kept (all are dropped when one more comes)
WALKERS_KEPT = 4

#: ``fn(gva, access, hpa, perms)``: ``access`` is the UC_MEM_* type Unicorn
#: asked for, ``hpa`` and ``perms`` (UC_PROT_*) what the fill granted
FillObserver = Callable[[int, int, int, int], None]

_READ, _WRITE, _FETCH = Access.READ, Access.WRITE, Access.FETCH
#: what a walk raises for a fault the guest takes
_FAULTS = (GuestPageFault, NestedFault, GuestGP, GuestException)
#: the control bits a walker depends on (:class:`~sandbox.memory.mmu.GuestLayer`)
_CR0_WALK, _CR4_WALK, _EFER_WALK = CR0_PG | CR0_WP, CR4_PAE | CR4_PSE | CR4_SMEP | CR4_PGE, EFER_LMA | EFER_NXE
#: where the fill reads the CPL (hflags), CR4 and EFER in the CPU state's 64-bit words
_Q_HFLAGS, _Q_CR0, _Q_EFER, _Q_EIP = OFF_HFLAGS // 8, OFF_CR // 8, OFF_EFER // 8, OFF_EIP // 8
_Q_CR3, _Q_CR4 = _Q_CR0 + 3, _Q_CR0 + 4
assert OFF_HFLAGS % 8 == 0 and OFF_CR % 8 == 0 and OFF_EFER % 8 == 0 and OFF_EIP % 8 == 0


class TlbFill:
    """Answers Unicorn's TLB misses from the tagged TLB or a 2-D walk."""

    def __init__(self, uc: Uc, st: CpuState, mem: HostMemory, tlb: Tlb, ctl: GuestControls,
                 stats: WalkStats) -> None:
        self._uc, self._st, self._mem, self._tlb, self._ctl = uc, st, mem, tlb, ctl
        self._mm = mem.raw
        self._view = mem.view
        #: where the processor's own walks count their memory references
        self.stats = stats
        self.ext: ProcessorExtension = NO_EXTENSION
        #: gva page -> hpa page of the last fetch fill (what the processor fetched)
        self.fetch_map: dict[int, int] = {}
        #: the fault of the last failed fill, and its page, for the run loop
        self.pending_fault: Exception | None = None
        self.fault_page = 0
        #: whether that fill was an instruction fetch's
        self.fault_fetch = False
        self._walker: TwoDimWalker | None = None
        #: the walkers of the last few guest contexts (:meth:`_walker_context`), with their
        #: fast paths, the current one among them: a context comes back (the host's, for
        #: fills outside a run, between two of the guest's; a guest's two CR3s)
        self._walkers: dict[tuple, tuple[TwoDimWalker, FastTranslate | None]] = {}
        #: the walker must be checked against the guest context before its next use
        self._walker_stale = True
        self._walker_efer = 0
        #: the walker's fast path for the common walk (None: the general walker only)
        self._fast: FastTranslate | None = None
        self._q = st.q
        self._observers: list[FillObserver] = []
        #: hpa pages Unicorn's soft TLB may hold writable (emptied with it)
        self.wgrant: set[int] = set()
        #: code pages (hpa) the guest stores to, and the GVA pages granted write access to
        #: each: none of their soft-TLB entries may execute them (:meth:`_to_stores`)
        self.code_stores: dict[int, set[int]] = {}
        self._watch = StoreWatch(uc)
        #: the next block cut to one instruction (shared with the scanner's pass_once)
        self.one_insn_block = OneInsnBlock(uc)
        #: RIP at the write fill that last made a code page writable (where QEMU syncs
        #: it before every instruction: always under an instruction budget), and per
        #: page the blocks still to be cut to one instruction (:meth:`_after_stores`)
        self._store_rip = -1
        self._one_insn_left: dict[int, int] = {}
        #: that write fill's point in a counted slice (``insn_mark()``, bound by the
        #: processor: None uncounted), and what is told when QEMU gave its store up
        #: there (:meth:`_after_stores`)
        self._store_mark: tuple[int, int] | None = None
        self.insn_mark: Callable[[], tuple[int, int] | None] = lambda: None
        self.store_given_up: Callable[[], None] = lambda: None
        #: ``flush(gva)`` of one soft-TLB page, or None (:mod:`.soft_tlb`)
        self._flush_page = page_flusher(uc)
        #: the fill in use: :meth:`_fill`, or the observed one once an observer is registered
        self.fill = self._fill
        #: what Unicorn's soft TLB has grown to (an estimate), and the fills
        #: since it was last flushed: past the growth threshold a flush lets
        #: QEMU double it (it resizes only at a flush)
        self.soft_tlb_size = SOFT_TLB_INITIAL
        self.soft_fills = 0
        #: no fill reached Unicorn since the soft TLB was last flushed: it is empty, and so
        #: is QEMU's jump cache (an entry there comes from a block lookup, which resolves
        #: the block's page through the TLB: a fill), so another flush would change nothing
        self._soft_empty = False
        self._grow_at = SOFT_TLB_INITIAL * SOFT_TLB_GROW_PERCENT // 100 + 1

    def connect(self, scanner: "Scanner", fail: Callable[[str, BaseException | None], None]) -> None:
        """Bind what a fill calls: the page scanner and its code-page maps, and
        the run's failure stop."""
        self._scan = scanner.scan
        self._code_hpa = scanner.code_hpa
        self._fail = fail

    # ------------------------------------------------------------ the hook
    def on_tlb_fill(self, handle, vaddr: int, access: int, entry, ud) -> bool:
        """Unicorn's UC_HOOK_TLB_FILL callback, called from C (see
        :func:`~sandbox.svm.engine.add_raw_tlb_fill_hook`): ``entry`` points to the entry to fill."""
        try:
            return self.fill(vaddr, access, entry[0])
        except BaseException as e:           # never let an exception unwind through C
            self._fail(f"internal error in the TLB fill for {vaddr:#x}: {type(e).__name__}: {e}", e)
            return False
        finally:
            self._soft_empty = False         # after the fill: it may flush before it fills the entry

    def _fill(self, vaddr: int, access: int, entry) -> bool:
        """One miss in Unicorn's soft TLB: answered by the ASID-tagged TLB
        model, or by a 2-D walk; then the code-page bookkeeping."""
        self.soft_fills += 1
        if self.soft_fills > self._grow_at:
            self.flush_soft_tlb()        # QEMU grows the soft TLB at this flush (the page refills)
            self.soft_fills = 1
        q = self._q                      # the CPL, CR4 and EFER as they are at this access
        user = q[_Q_HFLAGS] & HF_CPL_MASK == 3
        acc = _FETCH if access == UC_MEM_FETCH else (_WRITE if access == UC_MEM_WRITE else _READ)
        gva = vaddr & ~0xFFF
        tlb = self._tlb
        key = (self._ctl.asid, user, gva)
        e = tlb.find(key)
        if e is not None and (
                (acc == _WRITE and not (e[WRITABLE] and e[DIRTY]))
                or (acc == _FETCH and (not e[EXECUTABLE] or (e[USER_PAGE] and not user and q[_Q_CR4] & CR4_SMEP)))):
            # Not enough for this access: the processor walks again before it
            # faults, and a first write walks to set the Dirty bits (§5.4.2).
            e = None
        if e is None:
            tlb.stats.misses += 1
            if self._walker_stale or q[_Q_EFER] != self._walker_efer:
                self.guest_walker()
            fast = self._fast
            e = fast(vaddr, acc, user) if fast is not None else None
            if e is None:
                # anything unusual, a fault included: the general walker decides
                try:
                    w = self.guest_walker().translate(vaddr, acc, user)
                except (GuestPageFault, NestedFault, GuestGP, GuestException) as f:
                    # without its traceback: the frames it holds lead back here, to the
                    # fault, a reference cycle only the garbage collector would free
                    self.pending_fault = f.with_traceback(None)
                    self.fault_page = gva
                    self.fault_fetch = acc == _FETCH
                    return False
                e = (w.hpa & ~0xFFF, w.writable, w.executable, w.dirty, w.global_, w.user)
            tlb.insert_key(key, e)
        else:
            tlb.stats.hits += 1
        hpa = e[HPA]
        perms = UC_PROT_READ
        if acc == _FETCH:
            if hpa in self.wgrant:
                stores = self.code_stores.pop(hpa, None)
                if stores is not None:
                    # a code page the guest stored to goes back to execution: its
                    # writable entries go first, so its next store is a fill again
                    self._drop_entries(stores)
                    self._after_stores(hpa)
                elif hpa not in self._code_hpa:
                    # the page becomes code while a soft-TLB entry (this or another
                    # GVA) may still write it unobserved: drop those entries
                    self.flush_soft_tlb()
            self.fetch_map[gva] = hpa
            self._scan(gva, hpa)            # the bytes stored since the last scan are rescanned
            perms |= UC_PROT_EXEC
        else:
            is_code = hpa in self._code_hpa
            if acc == _WRITE:
                if is_code:
                    stores = self.code_stores.get(hpa)
                    if stores is None:
                        stores = self._to_stores(hpa)
                        self._store_rip = q[_Q_EIP]
                        self._store_mark = self.insn_mark()
                    stores.add(gva)
                perms |= UC_PROT_WRITE
                self.wgrant.add(hpa)
            elif e[WRITABLE] and e[DIRTY] and not is_code:
                perms |= UC_PROT_WRITE
                self.wgrant.add(hpa)
        entry.paddr = hpa
        entry.perms = perms
        return True

    # ----------------------------------------------------------- observers
    def add_observer(self, fn: FillObserver) -> None:
        """Call ``fn`` after every successful fill (nothing is paid while none is registered)."""
        self._observers.append(fn)
        self.fill = self._observed_fill

    def _observed_fill(self, vaddr: int, access: int, entry) -> bool:
        ok = self._fill(vaddr, access, entry)
        if ok:
            for fn in self._observers:
                fn(vaddr, access, entry.paddr, entry.perms)
        return ok

    # -------------------------------------------------------------- walkers
    def build_walker(self, stats: WalkStats) -> TwoDimWalker:
        """A 2-D walker for the guest context as the loaded CPU state and the
        latched controls describe it, counting into ``stats``."""
        st, ctl, mem = self._st, self._ctl, self._mem
        nested = NestedLayer(mem, ctl.n_cr3, stats) if ctl.np else IdentityNested(mem, stats)
        enc = self.ext.encryption()
        guest = GuestLayer(nested, st.cr(0), st.cr(3), st.cr(4), st.efer, stats, enc)
        return TwoDimWalker(guest, nested, stats,
                            EncryptionLayer(enc, guest, nested, stats) if enc is not None else None)

    def _walker_context(self) -> tuple:
        """What a walker is built from (:meth:`build_walker`): the guest's paging
        controls in the CPU state, the latched nested-paging controls and the
        memory encryption."""
        q, ctl = self._q, self._ctl
        enc = None if self.ext is NO_EXTENSION else self.ext.encryption()
        return (q[_Q_CR0] & _CR0_WALK, q[_Q_CR3], q[_Q_CR4] & _CR4_WALK, q[_Q_EFER] & _EFER_WALK, ctl.np,
                ctl.n_cr3 if ctl.np else 0, enc, 0 if enc is None else enc.cbit_mask)

    def guest_walker(self) -> TwoDimWalker:
        """The processor's own walker, for the guest context as it is now.

        The world switch drops it at every guest entry, the MOV-to-CR observer
        when the guest rewrites CR0/CR3/CR4; a WRMSR to EFER (NXE) is not
        observed when the MSR intercept is off, so EFER is compared at every
        fill.  A dropped walker is kept when the context it was built for is
        the current one and the nested entries its caches rest on are
        unchanged (:meth:`~sandbox.memory.mmu.GuestLayer.tables_current`):
        it then walks exactly as a new one would, with its caches of the
        guest's table pages warm (a fuzz case's fills would otherwise start
        every VMRUN with a walk through the general walker).
        """
        w = self._walker
        efer = self._q[_Q_EFER]
        if self._walker_stale or efer != self._walker_efer:
            ctx = self._walker_context()
            kept = self._walkers.get(ctx)
            if kept is not None and kept[0].guest.tables_current():
                w, self._fast = kept
            else:
                w = self.build_walker(self.stats)
                self._fast = fast_translator(w)
                if len(self._walkers) >= WALKERS_KEPT:
                    self._walkers.clear()
                self._walkers[ctx] = (w, self._fast)
            self._walker = w
            self._walker_efer = efer
            self._walker_stale = False
        return w

    def drop_walker(self) -> None:
        """The guest's paging controls or the nested tables may have changed: the
        walker is checked (and rebuilt if need be) before its next use."""
        self._walker_stale = True

    def set_stats(self, stats: WalkStats) -> None:
        """The processor's walks count into ``stats`` from now on (the walkers' caches stay)."""
        self.stats = stats
        for w, _ in self._walkers.values():      # (the current walker is one of them)
            w.count_into(stats)

    # ------------------------------------------------------------ fetches
    def insn_bytes(self, addr: int) -> bytes:
        """Up to 15 bytes of guest code at ``addr``, as the processor fetched them."""
        gva = addr & ~0xFFF
        hpa = self.fetch_map.get(gva)
        if hpa is None:
            # a soft-TLB flush emptied the map while a translated block of this
            # page still runs: the bytes are where a fetch finds them now
            hpa = self._fetch_page(gva)
            if hpa is None:
                return b""
        off = addr & 0xFFF
        if off <= PAGE_SIZE - MAX_INSN:
            return self._mm[hpa + off:hpa + off + MAX_INSN]
        b = self._mm[hpa + off:hpa + PAGE_SIZE]
        if len(b) < MAX_INSN:
            nxt = self.fetch_map.get(gva + PAGE_SIZE)
            if nxt is None:
                # (the instruction may end before it: a page whose fetch faults only has no bytes here)
                nxt = self._fetch_page(gva + PAGE_SIZE)
            if nxt is not None:
                b += bytes(self._view[nxt:nxt + MAX_INSN - len(b)])
        return b

    def code_page(self, gva: int) -> bytes | None:
        """The bytes of the code page at ``gva`` as the processor fetches them
        (None when a fetch from it would fault)."""
        hpa = self.fetch_map.get(gva & ~0xFFF)
        if hpa is None:
            hpa = self._fetch_page(gva & ~0xFFF)
            if hpa is None:
                return None
        return bytes(self._mm[hpa:hpa + PAGE_SIZE])

    def hypervisor_page(self, gva: int, access: int, set_ad: bool) -> int | None:
        """The host page a supervisor ``access`` to ``gva`` reaches, for the
        hypervisor acting on the guest's behalf (an emulated string I/O, a
        handler reading guest memory): the fast path of the processor's own
        walker, with Accessed/Dirty bits only when ``set_ad`` and nothing
        counted, since it is no memory reference of the processor's.  None when
        the fast path does not decide (a fault, paging off, encrypted memory):
        the caller takes the general walker."""
        w = self.guest_walker()
        fast = self._fast
        # (a handler may have just remapped a guest table page in the nested
        # tables: the walker's cache of where those pages are must still hold)
        if fast is None or not w.guest.tables_current():
            return None
        e = fast(gva, access, False, set_ad, False)
        return None if e is None else e[HPA]

    def _fetch_page(self, gva: int) -> int | None:
        """The host page a fetch from page ``gva`` reaches now, walked as the
        processor's own walk but with no Accessed or Dirty bit set (the fast
        path when it decides, else the general walker); None when the fetch
        would fault (an SEV-SNP #VC included)."""
        user = self._st.cpl == 3
        w = self.guest_walker()
        fast = self._fast
        e = fast(gva, _FETCH, user, False) if fast is not None else None
        if e is not None:
            return e[HPA]
        try:
            return w.translate(gva, _FETCH, user, set_ad=False).hpa & ~0xFFF
        except _FAULTS:
            return None

    def fetched_bytes(self, addr: int) -> bytes | None:
        """Up to 15 bytes of guest code at ``addr`` through the translations the
        processor fetched with (no walk, nothing counted), or None when a page
        they need is not in Unicorn's soft TLB for fetches any more."""
        gva = addr & ~0xFFF
        hpa = self.fetch_map.get(gva)
        if hpa is None:
            return None
        off = addr & 0xFFF
        if off <= PAGE_SIZE - MAX_INSN:
            return bytes(self._mm[hpa + off:hpa + off + MAX_INSN])
        nxt = self.fetch_map.get(gva + PAGE_SIZE)
        if nxt is None:
            return None
        return bytes(self._mm[hpa + off:hpa + PAGE_SIZE]) + bytes(self._view[nxt:nxt + MAX_INSN - (PAGE_SIZE - off)])

    def flush_soft_tlb(self) -> None:
        """Empty Unicorn's soft TLB, the untagged cache in front of the tagged TLB.

        QEMU resizes it at every flush: it doubles when the fills since the
        last flush filled more than 70% of it, so a guest whose working set
        outgrows it does not refill through Python on every access.  A flush
        with no fill since the last one is skipped (a VMRUN right after a
        reset of the translation caches asks for one, for instance)."""
        if self._soft_empty:
            return
        flush_soft_tlb(self._uc)
        self._soft_empty = True
        self.fetch_map.clear()
        if self.soft_fills > self._grow_at and self.soft_tlb_size < SOFT_TLB_MAX:
            self.soft_tlb_size *= 2
            self._grow_at = (self.soft_tlb_size * SOFT_TLB_GROW_PERCENT // 100 + 1
                             if self.soft_tlb_size < SOFT_TLB_MAX else 1 << 62)
        self.soft_fills = 0
        self.wgrant.clear()
        self.code_stores.clear()

    def _to_stores(self, hpa: int) -> set[int]:
        """Code page ``hpa`` leaves execution for the guest's stores (a write fill):
        every soft-TLB entry that may execute it goes, so the next block translated
        from it is a fetch fill, which rescans what the stores changed before the
        block is built (with the new candidates' hooks in it); and QEMU is made to
        check every store to it against its translated blocks (:class:`StoreWatch`),
        so no block holding bytes a store changed survives it.  Returns the GVA
        pages that will be granted write access to it (filled in by the caller)."""
        self._drop_entries(self._code_hpa[hpa])
        self._watch.watch(hpa)
        stores = self.code_stores[hpa] = set()
        return stores

    @property
    def watched_pages(self) -> frozenset[int]:
        """The code pages QEMU checks every store to (:class:`StoreWatch`)."""
        return frozenset(self._watch.pages)

    def after_reset(self) -> None:
        """The translation caches were just reset: no code page is left, nor any
        count of blocks still to cut (:meth:`_after_stores`); and every watch goes
        once more than :data:`WATCHED_MAX` pages are watched (each is one more hook
        on Unicorn's list) -- only with the soft TLB empty, i.e. no page writable."""
        self._one_insn_left.clear()
        if len(self._watch.pages) > WATCHED_MAX and self._soft_empty:
            self._watch.clear()

    def _after_stores(self, hpa: int) -> None:
        """A block is built from code page ``hpa`` after stores to it.  When it
        starts at the instruction whose store made the page writable (RIP, which
        QEMU has just reset to the block's start), QEMU gave
        that store up, as it does with a store into the running block, and
        reruns it as a block of its own; a guest doing that once tends to do it
        at every instruction (a sled storing into the code ahead of it), and each
        time QEMU first translates a block of up to 512 instructions only to run
        one.  So for the next :data:`ONE_INSN_RUN` times the page goes back to
        execution, the block after this one holds one instruction (which QEMU
        never gives up).  Only the size of blocks changes, never what runs.

        In a counted slice, the same instruction fetched again with no
        instruction started since its store (Unicorn's count unchanged) is
        certainly that given-up store: QEMU restored the state at it, with the
        lazy flags the run loop puts right (``RunLoop.store_given_up``)."""
        if self._q[_Q_EIP] == self._store_rip:
            mark = self._store_mark
            if mark is not None and mark == self.insn_mark():
                self.store_given_up()
            self._one_insn_left[hpa] = ONE_INSN_RUN
        left = self._one_insn_left.get(hpa)
        if left:
            self._one_insn_left[hpa] = left - 1
            self.one_insn_block.next()

    def _drop_entries(self, gvas) -> None:
        """Drop the soft-TLB entries of the GVA pages ``gvas`` (every MMU index):
        one by one where QEMU's per-page flush is at hand, else the whole soft TLB."""
        if self._flush_page is None or len(gvas) > _PAGE_FLUSHES_MAX:
            self.flush_soft_tlb()
            return
        for g in gvas:
            self._flush_page(g)
