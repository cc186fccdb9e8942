"""Self-modifying code: stepping a guest store to a scanned code page.

Scanned code pages are never writable in Unicorn's soft TLB, and Unicorn's
own detection of self-modifying code cannot be relied on for them: in
Unicorn 2.1.4 ``notdirty_write()`` calls ``tlb_set_dirty()`` when the TLB
entry has no execute permission, so after one store no later store to the
page is checked, and ``store_helper()`` splits an unaligned store into byte
stores of which only the first reaches the check.  So a write fill to a
scanned code page is refused (:class:`CodeStore`, raised by the fill as its
pending fault) and the store is single-stepped:

- :meth:`SmcStepper.begin` (from the run loop's memory fault): the page is
  opened for writing and RFLAGS.TF set, so Unicorn translates the storing
  instruction as a one-instruction block and traps after it;
- :meth:`SmcStepper.end` (the trap, an exit, an event delivered, a fault, or
  the end of the run): the guest's TF back, W revoked (the soft-TLB entries
  the store was granted dropped, :meth:`TlbFill.revoke_code_writes`), and
  each opened page rescanned where its bytes changed, with the stale
  translated blocks dropped (:meth:`SmcStepper.code_changed`).

The processor's own stores into guest memory (event frames, a virtual
VMSAVE) go through :meth:`SmcStepper.processor_wrote`.  Nothing here runs
on the fill or candidate hot paths while no code store is open.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from unicorn import UC_PROT_EXEC, UC_PROT_READ, Uc
from unicorn import x86_const as X

from . import decode as D
from ..memory.hostmem import PAGE_SIZE
from .cpustate import CpuState, code_size
from .engine import TbInvalidator
from .events import Vec

if TYPE_CHECKING:
    from .events import GuestAccess
    from .fill import TlbFill
    from .scanner import Scanner

RFLAGS_TF = 1 << 8
#: stepped stores after which a code page is demoted to data (:meth:`SmcStepper.demote`)
DEMOTE_AFTER = 64
#: stepped stores to one code page after which the instructions that follow a
#: stepped store are stepped too (:meth:`SmcStepper.trap`)
HOT_AFTER = 2
#: instructions stepped past the last code store before stepping stops ...
HOT_RUN = 2
#: ... doubled, up to this, each time the instruction where it stopped stores to
#: the page again (a run of stores that leave the bytes as they were, which
#: stepping cannot tell from no store at all)
HOT_RUN_MAX = 512
#: a non-canonical address for resolving host pages in Unicorn (:meth:`SmcStepper.invalidate_code`)
TB_PROBE_VA = 0x5A5A_0000_0000_0000
_RFLAGS, _DR6, _DR7, _RSP, _RIP = (X.UC_X86_REG_RFLAGS, X.UC_X86_REG_DR6, X.UC_X86_REG_DR7, X.UC_X86_REG_RSP,
                                  X.UC_X86_REG_RIP)


class CodeStore(Exception):
    """A guest store hit a scanned code page (a refused TLB fill)."""

    def __init__(self, hpa: int) -> None:
        super().__init__(hpa)
        self.hpa = hpa


class SmcStepper:
    """Refused stores to code pages, single-stepped and then rescanned."""

    def __init__(self, uc: Uc, st: CpuState) -> None:
        self._uc, self._st = uc, st
        self._tb_inv = TbInvalidator(uc)
        #: code pages (hpa) the single-stepped store may write
        self.open: set[int] = set()
        #: (guest RFLAGS.TF, DR6, RIP) while a store is stepped, else None
        self.step: tuple[int, int, int] | None = None
        #: told the host page of every store the processor model makes from Python
        self.write_observers: list[Callable[[int], None]] = []
        #: stepped stores per code page since it was last made code
        self.stores: dict[int, int] = {}
        #: instructions still to step after the last stepped store to a hot page
        self._hot_left = 0
        #: a refused store opened :attr:`open` in the step now running (not a page kept open)
        self._fresh = False
        #: the idle steps a hot run allows now (:data:`HOT_RUN` .. :data:`HOT_RUN_MAX`), and
        #: the RIP where the last hot run stopped for want of stores (None: it did not)
        self._run = HOT_RUN
        self._idle_end: int | None = None

    def connect(self, fill: "TlbFill", scanner: "Scanner", access: "GuestAccess") -> None:
        """Bind the fill (soft-TLB flush, fetched bytes, the probe fill), the
        scanner (rescan, pass_once) and the supervisor guest access."""
        self._fill = fill
        self._scanner = scanner
        self._access = access

    # ------------------------------------------------------------ stepping
    def begin(self, hpa: int, rip: int) -> None:
        """A guest store to the scanned code page ``hpa`` was refused by its TLB
        fill; nothing was written and RIP is the storing instruction.

        The instruction runs again, alone, with ``hpa`` writable: RFLAGS.TF makes
        Unicorn translate it as a one-instruction block and trap after it, where
        :meth:`end` looks at what changed, rescans and drops the stale translated
        blocks before anything after the store is translated or executed.  A store
        that straddles into a second code page comes back here once more for that page."""
        self.open.add(hpa)
        self._fresh = True
        # the first instruction after a hot run stopped stores again: the run was too short
        self._run = min(2 * self._run, HOT_RUN_MAX) if rip == self._idle_end else HOT_RUN
        self._idle_end = None
        if self.step is None:
            self._step_next(self._fill.insn_bytes(rip))
        sc = self._scanner
        if sc.pass_used == rip:
            sc.pass_once(rip)          # the hypervisor's one unintercepted execution is still due

    def end(self, trapped: bool = False) -> bool:
        """The stepped instruction completed or faulted: guest TF back and each
        opened page re-examined where its bytes changed.  Returns whether any did.
        ``trapped``: ended by the model's own trap after the instruction; the
        pages stay open for :meth:`trap`, which keeps them open while it steps
        on (a store to a hot page, see :meth:`trap`) and else closes them.
        Otherwise they are closed here: their writable soft-TLB entries go."""
        guest_tf = self.step[0]
        self.step = None
        st = self._st
        if not guest_tf:
            st.reg_write(_RFLAGS, st.reg_read(_RFLAGS) & ~RFLAGS_TF)
        if not trapped:
            self._hot_left = 0
        fresh, self._fresh = self._fresh, False
        if not self.open:
            return False                    # a step past a store that stored nowhere: nothing to revoke
        opened = list(self.open)
        if not trapped:
            self.close()
        changed = False
        for hpa in opened:
            changed |= self.code_changed(hpa)
            if not fresh:
                continue                    # kept open from an earlier step: no refused store to count
            n = self.stores.get(hpa, 0) + 1
            if trapped and n >= HOT_AFTER:
                self._hot_left = self._run
            if n >= DEMOTE_AFTER:
                # no longer code: its next fetch must be a fill, which scans it again,
                # so no entry kept open may serve that fetch
                self.close()
                self.demote(hpa)
            else:
                self.stores[hpa] = n
        return changed

    def close(self) -> None:
        """No stepped instruction may write the opened code pages any more: the
        soft TLB's writable entries for them go (:meth:`TlbFill.revoke_code_writes`)."""
        if self.open:
            self.open.clear()               # in place: the fill holds this set
            self._fill.revoke_code_writes()

    def demote(self, hpa: int) -> None:
        """A code page the guest keeps storing to (code and data sharing a page,
        e.g. boot code in a data section) stops being code: its scans and
        translated blocks go, so its stores run at full speed.  Executing it again
        is a fetch fill, which scans it before any of its instructions runs."""
        self.stores.pop(hpa, None)
        if self._scanner.forget_page(hpa):
            self.invalidate_code(hpa, hpa + PAGE_SIZE)

    def trap(self, intno: int) -> bool:
        """An exception while a store is stepped: end the step.  True when it is
        the model's own #DB after the store, which the guest must not see (a
        breakpoint that matched as well is still delivered).

        A guest that keeps storing into the code page it runs from (a loop
        patching itself) would otherwise have its next translated block -- up
        to 512 instructions, all translated again after every store -- thrown
        away one instruction later by the next store.  Once a page has taken
        :data:`HOT_AFTER` stepped stores, the instructions after a stepped store
        are stepped too (one-instruction blocks), the pages it opened staying
        writable, until :data:`HOT_RUN` of them in a row change no code byte
        (more when the guest stores again just where that stopped)."""
        guest_tf, dr6, pushf = self.step
        stored = self._fresh
        own = intno == Vec.DB and not guest_tf
        stored |= self.end(trapped=own)
        if not own:
            return False
        if pushf:
            self._unstep_pushf(pushf)
        st = self._st
        # B0-B3 the step set: QEMU sets one for every DRn that matches, enabled or not
        # (SDM vol. 3 §17.2.3 allows that); only an enabled one makes this a breakpoint's #DB
        new = st.reg_read(_DR6) & ~dr6 & 0xF
        dr7 = st.reg_read(_DR7)
        hit = new & sum(1 << i for i in range(4) if dr7 >> (2 * i) & 3)
        st.reg_write(_DR6, dr6 | (new if hit else 0))
        if hit:
            self._hot_left = 0
            self.close()
            return False
        if self._hot_left:
            # the run goes on for HOT_RUN instructions in a row that change no code byte
            self._hot_left = self._run if stored else self._hot_left - 1
            rip = st.reg_read(_RIP)
            if self._hot_left:
                code = self._fill.insn_bytes(rip)     # read once: TF check and PUSHF
                if not _loads_tf(code):
                    # the pages stay open: every instruction until the stepping stops
                    # is stepped and followed by end(), so none of their stores goes
                    # unexamined, and the next store to them is not refused again
                    self._step_next(code)
                    return True
            else:
                self._idle_end = rip
            self._hot_left = 0
        self.close()
        return True

    def _step_next(self, code: bytes) -> None:
        """Step the instruction at RIP, whose bytes are ``code``: the guest's TF
        and DR6 kept, the model's TF set."""
        st = self._st
        rflags = st.reg_read(_RFLAGS)
        self.step = (rflags & RFLAGS_TF, st.reg_read(_DR6), _pushf_bytes(code, code_size(st.hflags)))
        st.reg_write(_RFLAGS, rflags | RFLAGS_TF)

    def _unstep_pushf(self, n: int) -> None:
        """A stepped PUSHF pushed the model's RFLAGS.TF (``n`` bytes): the guest's image has TF clear."""
        rsp = self._st.reg_read(_RSP)
        v = int.from_bytes(self._access.read(rsp, n), "little")
        self._access.write(rsp, (v & ~RFLAGS_TF).to_bytes(n, "little"))

    # ------------------------------------------------------ changed code
    def processor_wrote(self, hpa: int) -> None:
        """The processor model itself stored into guest memory (an event frame,
        a VMSAVE): a code page it changed is rescanned and its blocks dropped --
        at once, even on a page open to stepped stores: a store the model makes
        in a candidate hook (a virtual VMSAVE) is no instruction QEMU runs, so
        no single-step trap follows it before the next instruction."""
        page = hpa & ~0xFFF
        for fn in self.write_observers:
            fn(page)
        if page in self._scanner.code_hpa:
            self.code_changed(page)

    def code_changed(self, hpa: int) -> bool:
        """Rescan the executable aliases of code page ``hpa`` where its bytes
        changed, then drop the translated blocks that hold the old bytes -- in
        that order, so a block translated afterwards carries the new hooks.
        Returns whether any byte changed."""
        changed = self._scanner.rescan_changed(hpa)
        if changed is None:
            return False
        self.invalidate_code(hpa + changed[0], hpa + changed[1])
        return True

    def invalidate_code(self, start: int, end: int) -> None:
        """Drop Unicorn's translated blocks holding host bytes [start, end) (one
        page): by host-physical range where libunicorn exports QEMU's
        ``tb_invalidate_phys_range`` (:class:`~.engine.TbInvalidator`).  Otherwise
        through ``ctl_remove_cache``, which takes a virtual address and resolves
        it with a fetch through the TLB: the probe address is non-canonical, so no
        guest access can share its entry, and the fill answers it with the host page."""
        if self._tb_inv.available:
            self._tb_inv.span(start, end)
            return
        page = start & ~0xFFF

        def probe_fill(vaddr: int, access: int, entry) -> bool:
            entry.paddr = page
            entry.perms = UC_PROT_READ | UC_PROT_EXEC
            return True

        fill = self._fill
        saved, fill.fill = fill.fill, probe_fill
        va = TB_PROBE_VA | (start & 0xFFF)
        try:
            self._uc.ctl_remove_cache(va, va + (end - start))
        finally:
            fill.fill = saved
            fill.flush_soft_tlb()

    def reset(self) -> None:
        """Forget an open store (the translation caches are being reset)."""
        self.open.clear()
        self.step = None
        self.stores.clear()
        self._hot_left = 0
        self._fresh = False
        self._run = HOT_RUN
        self._idle_end = None


def _loads_tf(code: bytes) -> bool:
    """Whether the instruction ``code`` may load RFLAGS.TF from the guest (POPF,
    IRET, SYSRET, RSM) -- or could not be read (empty): it is not stepped, so a
    TF the guest sets is never taken for the model's own."""
    k = 0
    while k < len(code) and code[k] in D.PREFIX_BYTES:
        k += 1
    if k >= len(code):
        return True
    op = code[k]
    return op in (0x9D, 0xCF) or (op == 0x0F and code[k + 1:k + 2] in (b"\x07", b"\xaa"))


def _pushf_bytes(code: bytes, mode: int) -> int:
    """The bytes a PUSHF whose bytes are ``code`` pushes, or 0 when it is not a
    PUSHF -- decided before the stepped instruction runs: a store may rewrite its
    own bytes (a MOV whose new bytes read as PUSHF did not push anything)."""
    insn = D.decode(code, mode)
    return insn.opsize // 8 if insn is not None and insn.kind == D.Kind.PUSHF else 0
