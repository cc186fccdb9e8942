"""Self-modifying code: what changes the bytes of a code page, and the rescan that follows.

A code page (one the processor fetched from, scanned for candidates) is at
any moment executable or writable in Unicorn's soft TLB, never both
(:class:`~.fill.TlbFill`):

- a guest store to it is a write fill, which takes every executable entry of
  the page away and grants write access; QEMU then checks every store to the
  page against its translated blocks and drops each block a store overwrites
  (the page is watched, :class:`~.engine.StoreWatch`: Unicorn 2.1.4 stops
  checking a page mapped without execute permission after its first store),
  the block that is running included (QEMU's precise self-modifying code:
  the store is redone as a block of its own and the rest retranslated);
- the next block translated from it needs a fetch fill, which takes the
  writable entries away and rescans the bytes that changed, before the block
  is built, so the block carries the hooks of any new candidate.

A block that no store overwrote holds the bytes its page was scanned with, so
it may go on running -- chained to, or from QEMU's jump cache -- while the
page is writable.  A store to a code page thus costs a fill or two, not a
single step, and a loop that stores into its own page runs at QEMU's speed.

The processor model's own stores into guest memory (event frames, a
virtual VMSAVE) are no instruction QEMU runs and pass no fill: they go
through :meth:`CodeChanges.processor_wrote`, which rescans at once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from unicorn import UC_PROT_EXEC, UC_PROT_READ, Uc

from .engine import TbInvalidator

if TYPE_CHECKING:
    from .fill import TlbFill
    from .scanner import Scanner

#: a non-canonical address for resolving host pages in Unicorn (:meth:`CodeChanges.invalidate_code`)
TB_PROBE_VA = 0x5A5A_0000_0000_0000


class CodeChanges:
    """Code bytes the processor model itself changed: rescanned, their blocks dropped."""

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._tb_inv = TbInvalidator(uc)
        #: told the host page of every store the processor model makes from Python
        self.write_observers: list[Callable[[int], None]] = []

    def connect(self, fill: "TlbFill", scanner: "Scanner") -> None:
        """Bind the fill (the probe fill, the soft-TLB flush) and the scanner (rescan)."""
        self._fill = fill
        self._scanner = scanner

    def processor_wrote(self, hpa: int) -> None:
        """The processor model itself stored into guest memory (an event frame,
        a VMSAVE): a code page it changed is rescanned and its blocks dropped --
        at once, even on a page the guest may write: a store the model makes in
        a candidate hook (a virtual VMSAVE) is no instruction QEMU runs, so no
        fill or check of QEMU's comes between it and the next instruction."""
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
