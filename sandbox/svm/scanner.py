"""The intercept scanner: finds the instructions that may #VMEXIT without a per-instruction callback.

When a code page is first fetched, :meth:`Scanner.scan` looks at every byte
offset where an armed instruction could begin -- legal prefixes included, and
the last bytes of the page treated as the possible start of an instruction
that straddles into the next page -- and puts an address-ranged code hook on
each candidate.  A hook where no instruction begins never fires, so over-
approximating is sound.  When a hook fires, :meth:`Scanner.candidate` decodes
the instruction (cached per address), asks the decision function whether it
exits, and either takes the #VMEXIT or hands the instruction to the parts
that emulate what Unicorn does not (:mod:`.native`).

Code the guest writes is caught by the TLB fill (scanned pages are never
writable in Unicorn's soft TLB); code the hypervisor writes is
cross-modifying code (:meth:`Scanner.hypervisor_wrote`, APM vol. 2 §7.6.1).
"""
from __future__ import annotations

import functools
import struct
from typing import TYPE_CHECKING, Callable

from unicorn import Uc
from unicorn import x86_const as X

from ..arch import EFER_SVME, M64
from ..memory.hostmem import PAGE_SIZE, HostMemory
from ..memory.mmu import GuestGP, GuestPageFault, NestedFault
from . import decode as D
from .controls import GuestControls
from .cpustate import HF_CPL_MASK, HF_CS64, OFF_EIP, OFF_HFLAGS, OFF_REGS, R_CS, CpuState, code_size
from .decision import ALWAYS, IRQ_WINDOW, STATE_FREE, ExitInfo, VectorsOnly, kinds_for_bits
from .decision import decide as default_decide
from .engine import TCG_BUFFER_SMALL, CodeHooks, SelfTest, TbInvalidator, x86_64_engine
from .events import GuestAccess, Vec
from .exitcodes import ExitCode
from .extension import NO_EXTENSION, ProcessorExtension
from .vmcb import OFF_EFER, OFF_V_INTR, VIntr

if TYPE_CHECKING:
    from .cpu import SvmCpu
    from .fill import TlbFill
    from .interrupts import Interrupts
    from .native import NativeInsns
    from .pause_filter import PauseFilter
    from .world_switch import SwitchState, WorldSwitch

#: ``decide(insn, view, rip, code)``: the #VMEXIT an instruction causes, or None
Decide = Callable[[D.Insn, "DecisionView", int, bytes], ExitInfo | None]

NO_EXIT = ExitInfo(-1)          # cached "this instruction does not exit"
#: instructions the processor watches although they may not exit: their TLB
#: side effects reach the tagged TLB model (Unicorn only flushes its own)
TLB_OBSERVED = frozenset({D.Kind.MOV_TO_CR, D.Kind.INVLPG})
IO_KINDS = frozenset({D.Kind.IN, D.Kind.OUT, D.Kind.INS, D.Kind.OUTS})
_Q = struct.Struct("<Q")
_VIRQ_OR_AVIC = int(VIntr.V_IRQ | VIntr.AVIC_ENABLE)
_PAUSE = int(ExitCode.PAUSE)
_TSS_IOMAP_BASE = 0x66          # 64-bit TSS: I/O map base address (APM vol. 2 §12.2.5)
#: decode caches kept for distinct intercept vectors before they are all dropped
_DECODE_CACHES = 8
_MAX_INSN = D.MAX_INSN
_QHFLAGS = OFF_HFLAGS >> 3             # CpuState.q index of the qword holding hflags
_QEIP = OFF_EIP >> 3                   # CpuState.q index of RIP (synced by Unicorn before a code hook)
assert OFF_HFLAGS % 8 == 0 and OFF_REGS == 0
#: QEMU 5.0's eflags (the bits the lazy flags do not hold), right after eip in
#: CPUX86State, then its lazy flags: cc_dst, cc_src, cc_src2, then the 32-bit cc_op
#: (all checked once: :data:`LAZY_FLAGS`); the run loop repairs them after a restart
#: inside a hooked instruction (``RunLoop.fault_flags``)
QEFLAGS = (OFF_EIP + 8) >> 3
QCC_SRC = (OFF_EIP + 24) >> 3
QCC_OP = (OFF_EIP + 40) >> 3
CC_OP_EFLAGS, _CC_OP_ADDQ = 1, 9
#: the flags CC_OP_EFLAGS keeps in cc_src: OF SF ZF AF PF CF
CC_ARITH = 0x8D5


def _lazy_flags_layout() -> bool:
    """After ``add rax, rbx`` QEMU holds cc_op = CC_OP_ADDQ and cc_src = RBX where
    :data:`QCC_OP` and :data:`QCC_SRC` say, and RFLAGS's IF where :data:`QEFLAGS` says."""
    uc = x86_64_engine(TCG_BUFFER_SMALL)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, bytes.fromhex("4801d8f4"))          # add rax, rbx ; hlt
    uc.reg_write(X.UC_X86_REG_RBX, 0x1C01C0)
    uc.reg_write(X.UC_X86_REG_RFLAGS, 0x202)
    uc.emu_start(0x1000, 0x1003)
    q = CpuState(uc).q
    return q[QCC_OP] & 0xFFFF_FFFF == _CC_OP_ADDQ and q[QCC_SRC] == 0x1C01C0 and q[QEFLAGS] & ~CC_ARITH == 0x202


LAZY_FLAGS = SelfTest(_lazy_flags_layout)
_LAST_WHOLE = PAGE_SIZE - D.MAX_INSN   # the last offset where 15 bytes fit in the page
#: a reset drops the blocks of at most this many code pages one page at a time;
#: past it (or every _FLUSH_EVERY resets, so Unicorn's code buffer is reused from
#: its start rather than filled page after page) it flushes every block
_TB_PAGES_MAX = 64
_FLUSH_EVERY = 32


#: :func:`changed_span` halves the range until it is this short, then XORs it
_SPAN_WINDOW = 256


def changed_span(old: bytes, new: bytes) -> tuple[int, int]:
    """``(lo, hi)``: the first byte where two equal-length byte strings differ and
    one past the last (they differ).  Each end is found by halving the range with
    slice comparisons (``memcmp``, no Python loop over the bytes) down to
    :data:`_SPAN_WINDOW` bytes, which one XOR of them as integers resolves: about
    a third of the cost of converting whole pages to integers."""
    lo, hi = 0, len(old)
    while hi - lo > _SPAN_WINDOW:
        mid = (lo + hi) >> 1
        if old[lo:mid] == new[lo:mid]:
            lo = mid
        else:
            hi = mid
    x = int.from_bytes(old[lo:hi], "little") ^ int.from_bytes(new[lo:hi], "little")
    first = lo + (((x & -x).bit_length() - 1) >> 3)
    lo, hi = first, len(old)
    while hi - lo > _SPAN_WINDOW:
        mid = (lo + hi) >> 1
        if old[mid:hi] == new[mid:hi]:
            hi = mid
        else:
            lo = mid
    x = int.from_bytes(old[lo:hi], "little") ^ int.from_bytes(new[lo:hi], "little")
    return first, lo + ((x.bit_length() + 7) >> 3)


def straddling(page: bytes) -> list[int]:
    """Offsets where an instruction straddling into the next page may begin:
    any run of prefix bytes (or a lone 0F) reaching the end of the page."""
    hits = []
    k = PAGE_SIZE - 1
    if page[k] == 0x0F:
        hits.append(k)
        k -= 1
    while k >= PAGE_SIZE - D.MAX_INSN and page[k] in D.PREFIX_BYTES:
        hits.append(k)
        k -= 1
    return hits



#: the instruction kinds each intercept-vector bit makes interesting (bit 32*w + b)
_BIT_KINDS = tuple(frozenset(kinds_for_bits({b})) for b in range(6 * 32))
#: (byte index, byte value) -> the union of its bits' kinds, filled as vectors are seen
_BYTE_KINDS: dict[tuple[int, int], frozenset] = {}
_BASE_KINDS = frozenset(ALWAYS | TLB_OBSERVED)


def _byte_kinds(j: int, v: int) -> frozenset:
    k = _BYTE_KINDS.get((j, v))
    if k is None:
        k = _BYTE_KINDS[(j, v)] = frozenset().union(*(_BIT_KINDS[8 * j + i] for i in range(8) if v >> i & 1))
    return k


@functools.lru_cache(maxsize=4096)
def kinds_to_scan(ivec: tuple[int, ...], virq: bool) -> frozenset:
    """The instruction kinds to hook under intercept vectors ``ivec``: the union
    of what each set bit asks for (:func:`~.decision.kinds_for_bits`), taken a
    byte at a time (a fuzz campaign arms new vectors at every case)."""
    parts = [_BASE_KINDS, IRQ_WINDOW] if virq else [_BASE_KINDS]
    for w, word in enumerate(ivec):
        j = 4 * w
        while word:
            v = word & 0xFF
            if v:
                parts.append(_byte_kinds(j, v))
            word >>= 8
            j += 1
    return frozenset().union(*parts)

def _plain(info: ExitInfo | None) -> ExitInfo | None:
    """``info`` as the world switch takes it: a plain int EXITCODE, EXITINFO1/2 in 64 bits."""
    if info is None:
        return None
    return ExitInfo(int(info.exitcode), info.exitinfo1 & M64, info.exitinfo2 & M64)


class Scanner:
    """Code-page scans, candidate hooks, the decode cache and cross-modifying code."""

    def __init__(self, uc: Uc, st: CpuState, mem: HostMemory, ctl: GuestControls, sw: "SwitchState") -> None:
        self._uc, self._st, self._sw = uc, st, sw
        #: the controls the last full VMRUN latched (read, never written, here)
        self.ctl = ctl
        self.view = mem.view
        self._mm = mem.raw
        self.hooks = CodeHooks(uc, self.on_candidate)
        self.ext: ProcessorExtension = NO_EXTENSION
        #: the decision function (see :data:`Decide`); replaceable, e.g. by a fuzzer's planted bug
        self.decide: Decide = default_decide
        self.scan_kinds: frozenset = frozenset()
        #: instruction kinds of features the processor was built without: #UD before any intercept
        self.undefined: frozenset = frozenset()
        self._one = self._two = frozenset()
        self._armed_key: tuple | None = None
        #: every intercept-vector bit, and whether a pending V_IRQ, armed so far (None: nothing yet)
        self._armed_bits: tuple[int, ...] | None = None
        self._armed_virq = False
        self.code_pages: dict[int, tuple[int, bytes]] = {}   # gva page -> (hpa page, bytes scanned)
        #: gva page -> (hpa page, bytes) of its last scan, every candidate of which is
        #: still hooked: kept across resets (hooks outlive them) and dropped with the
        #: hooks, so a page fetched again after a reset is scanned only where it changed
        self._hooked_scan: dict[int, tuple[int, bytes]] = {}
        self.code_hpa: dict[int, set[int]] = {}              # hpa page -> gva pages
        #: hpa pages fetched since every translated block was last flushed: every
        #: block lies on these (Unicorn grants execute only to a fetch fill, which scans)
        self.tb_pages: set[int] = set()
        self._tb_inv = TbInvalidator(uc)
        self._resets = 0
        #: address -> (bytes, the decode or None, the cached decision or None, port I/O?,
        #: the code segment's size the decode is for: 64, 32 or 16)
        self.decoded: dict[int, tuple[bytes, D.Insn | None, ExitInfo | None, bool, int]] = {}
        #: port I/O decisions at CPL 0: address -> (decoded entry, key, decision); see _io_decision
        self.io_decided: dict[int, tuple[tuple, tuple, ExitInfo | None]] = {}
        #: the decode caches of the intercept vectors armed so far (``decoded`` is the current one)
        self._decoded_by_key: dict[tuple, dict[int, tuple[bytes, D.Insn | None, ExitInfo | None, bool, int]]] = {}
        self.xmod_pages: set[int] = set()   # GVAs of executed pages the hypervisor wrote
        self.irq_window: set[int] = set()   # addresses where a pending V_IRQ may become deliverable
        self.pass_once_rip: int | None = None
        #: the candidate whose slice was last ended for stale lazy flags (see on_candidate)
        self._stale_at: int | None = None
        self._restart_slice: Callable[[], bool] = lambda: False
        self._check_flags = False
        #: the address of the last candidate-hook call: Unicorn's hook prologue ran
        #: there, its lazy flags now computed (:meth:`hook_ran`)
        self._last_hook = -1

    def connect(self, cpu: "SvmCpu", fill: "TlbFill", ws: "WorldSwitch", native: "NativeInsns",
                interrupts: "Interrupts", pause: "PauseFilter",
                fail: Callable[[str, BaseException | None], None],
                restart_slice: Callable[[], bool]) -> None:
        """Bind what a candidate calls: fetched bytes, the #VMEXIT, the
        emulation of instructions that do not exit, the interrupt window,
        the PAUSE filter, the one-instruction block of :meth:`pass_once`, and
        ending the slice (a candidate that finds the lazy flags stale)."""
        self._cpu = cpu
        self._pause_exits = pause.exits
        self._insn_bytes = fill.insn_bytes
        self._fetch_map = fill.fetch_map
        self._flush_soft_tlb = fill.flush_soft_tlb
        self._one_insn_block = fill.one_insn_block
        self._exit_in_hook = ws.exit_in_hook
        self._native = native.handle
        self._window_open = interrupts.window_open
        self._raise = interrupts.raise_exception
        self.guest_access: GuestAccess = interrupts.access
        self._fail = fail
        self._restart_slice = restart_slice
        self._check_flags = LAZY_FLAGS.passed()

    # ---------------------------------------------------------------- arming
    def arm(self) -> None:
        """Scan for what the latched intercept vectors (and a pending V_IRQ) make interesting."""
        ctl = self.ctl
        # a pending V_IRQ, or AVIC (whose virtual IRR may be pending at any time), makes
        # the instructions that set RFLAGS.IF interesting
        virq = bool(_Q.unpack_from(self.view, ctl.vmcb_hpa + OFF_V_INTR)[0] & _VIRQ_OR_AVIC)
        ivec = ctl.ivec
        key = (ivec, virq)
        if key == self._armed_key:
            return
        self._armed_key = key
        # the kinds are a union over the set bits, so vectors within the bits
        # armed so far ask for nothing the scan set lacks (a campaign arms new
        # vectors at every case, nearly always within those)
        seen = self._armed_bits
        if seen is None or (virq and not self._armed_virq) or any(w & ~s for w, s in zip(ivec, seen)):
            self._armed_bits = tuple(w | s for w, s in zip(ivec, seen or (0,) * 6))
            self._armed_virq = self._armed_virq or virq
            self._grow_scan(kinds_to_scan(tuple(ivec), virq))
        # cached decisions depend on the vectors: one cache per armed key (each
        # entry is checked against the bytes at the address when it is used)
        dec = self._decoded_by_key.get(key)
        if dec is None:
            if len(self._decoded_by_key) >= _DECODE_CACHES:
                self._decoded_by_key.clear()
            dec = self._decoded_by_key[key] = {}
        self.decoded = dec

    def undefine(self, kinds: frozenset) -> None:
        """Instructions of ``kinds`` are #UD from now on, whatever the intercepts
        (a processor without their feature: :mod:`.features`)."""
        self.undefined = self.undefined | kinds
        self._drop_decodes()
        self._grow_scan(frozenset(kinds))

    def hook_kinds(self, kinds: frozenset) -> None:
        """Hook ``kinds`` from now on whatever the intercept vectors (the scan set
        only grows: see :meth:`_grow_scan`); each hook's decision still follows
        the vectors, and one that does not exit goes to the native handlers."""
        self._grow_scan(frozenset(kinds))

    def _grow_scan(self, kinds: frozenset) -> None:
        """Scan for ``kinds`` too from now on (every page is scanned anew)."""
        if not kinds <= self.scan_kinds:
            # Hooks are only ever added: the scan set grows to the union of every
            # set armed so far, so VMCBs that alternate (nested SVM's L1 and L2)
            # rescan and retranslate once, not at every world switch.  A hook on
            # an instruction the current vectors do not intercept is a decision
            # that says "no exit" -- sound, as any over-approximation.
            self.scan_kinds = kinds | self.scan_kinds
            self._one, self._two = D.opcode_starts(set(self.scan_kinds))
            self.code_pages.clear()
            self.code_hpa.clear()
            self._hooked_scan.clear()
            self._decoded_by_key.clear()
            self._flush_tb()
            # and the soft TLB: a block translated again through an entry still
            # executable would not pass the fetch fill that rescans its page
            self._flush_soft_tlb()
            self._flush_soft_tlb()

    def scan(self, gva: int, hpa: int) -> None:
        """A fetch fill of page ``gva`` (at ``hpa``): hook every candidate on it.

        When the page's last scan at this address is still hooked (no shed
        since; a reset keeps hooks), only the bytes that differ from it are
        scanned again: the candidates elsewhere are unchanged and hooked.  A
        fuzz case rewrites a few hundred bytes of a code page each time."""
        self.tb_pages.add(hpa)
        # A block translated from this page may run on into the next one.  QEMU asks
        # whether a code hook covers an instruction before it fetches it, so the first
        # instruction of the next page is looked at before the fetch fill that scans
        # that page: a candidate there would run unhooked.  It is hooked now, whatever
        # it turns out to be (the hook decodes it).
        self.hooks.add((gva + PAGE_SIZE) & M64)
        cur = self.code_pages.get(gva)
        page = bytes(self.view[hpa:hpa + PAGE_SIZE])
        if cur is not None and cur[0] == hpa and cur[1] == page:
            return
        last = self._hooked_scan.get(gva)
        if last is None or last[0] != hpa:
            hits = D.scan(page, PAGE_SIZE, self._one, self._two) + straddling(page)
        elif last[1] != page:
            hits = self._changed_hits(last[1], page)[2]
        else:
            hits = ()
        if hits:
            self.hooks.add_new([gva + off for off in hits])
        self._hooked_scan[gva] = (hpa, page)
        self.code_pages[gva] = (hpa, page)
        self.code_hpa.setdefault(hpa, set()).add(gva)
        # the page's cached decodes stay: each is checked against the 15 bytes at
        # its address when used (on_candidate), so a fuzz case that rewrites the
        # page decodes only the instructions that changed

    def watch(self, addr: int) -> None:
        """A one-shot interrupt-window check at ``addr`` (see :mod:`.interrupts`)."""
        self.irq_window.add(addr)
        self.hooks.add(addr)
        self._uc.ctl_remove_cache(addr, addr + 1)     # recompile with the hook

    def pass_once(self, rip: int | None) -> None:
        """Execute the instruction at ``rip`` once without the intercept check (None: cancel).

        It runs as a block of its own (:mod:`.one_insn_block`): QEMU never gives up
        a store of such a block that overwrites it, which would run the instruction
        -- and this hook -- again, now intercepted."""
        self.pass_once_rip = rip
        if rip is not None:
            self._one_insn_block.next()

    # -------------------------------------------------------- candidate hook
    def on_candidate(self, handle, address: int, size: int, user_data) -> None:
        """The C callback of every candidate hook: an instruction that may exit
        is about to execute at ``address``.

        This is the first step of every intercepted instruction's round trip,
        so the common case is written out here (the fetched bytes, the
        state) rather than spread over helper calls."""
        self._last_hook = address
        try:
            if self._sw.stop is not None:
                return
            q = self._st.q
            if self._check_flags and q[QCC_OP] & 0xFFFF_FFFF == CC_OP_EFLAGS and q[QCC_SRC] & ~CC_ARITH:
                # Unicorn syncs the lazy flags before a code hook only when the block's
                # operation differs from the one its previous hook saw, and an
                # instruction in between (PUSHF) may have stored another: RFLAGS read
                # here would take an operand for flags.  Ending the slice makes QEMU
                # restore the state at this instruction, and the block translated for
                # the next slice begins here, where it is current.
                if self._stale_at != address and self._restart_slice():
                    self._stale_at = address
                    return
            self._stale_at = None
            irq = self.irq_window
            if irq and address in irq:
                irq.discard(address)
                if self._window_open():
                    return
            hpa = self._fetch_map.get(address & ~0xFFF)
            off = address & 0xFFF
            if hpa is not None and off <= _LAST_WHOLE:
                code = self._mm[hpa + off:hpa + off + _MAX_INSN]      # as insn_bytes, inline
            else:
                code = self._insn_bytes(address)
            st = self._st
            hflags = q[_QHFLAGS]             # low half: hflags (the high half is hflags2)
            eip = q[_QEIP]
            if eip != address and (hflags & HF_CS64 or eip + st.seg(R_CS)[1] != address):
                return      # a hook before this one on the instruction delivered an event (#AC): control moved
            mode = code_size(hflags)
            ent = self.decoded.get(address)
            if ent is None or ent[0] != code or ent[4] != mode:
                ent = self._decode(address, code, mode)
            insn = ent[1]
            if insn is None:
                return
            if self.undefined and insn.kind in self.undefined:
                self._raise(Vec.UD, None, address)      # no such instruction here: nothing to intercept
                return
            if insn.lock and insn.kind not in D.LOCK_LEGAL:
                # LOCK on an instruction that cannot take it: #UD at decode, before any
                # intercept (APM vol. 3 §1.2.5); QEMU would run it as if unprefixed
                self._raise(Vec.UD, None, address)
                return
            view = None
            if self.pass_once_rip == address:
                self.pass_once_rip = None
                info = None
            else:
                info = ent[2]
                if info is NO_EXIT:
                    info = None
                elif info is None:
                    if ent[3] and self.decide is default_decide and not hflags & HF_CPL_MASK:
                        info = self._io_decision(ent, insn, st, address, code)
                    else:
                        view = DecisionView(self, st)
                        info = _plain(self.decide(insn, view, address, code))
            if info is not None:
                if info.exitcode == _PAUSE and self.ctl.pause_filter_count and not self._pause_exits(self.ctl):
                    return                      # the PAUSE filter lets this one run (APM §15.14.4)
                ext = self.ext
                if ext is not NO_EXTENSION and ext.intercept(self._cpu, info.exitcode, address, insn.length):
                    return                      # SEV-ES: GHCB MSR, VMGEXIT, or #VC for a non-automatic exit
                self._exit_in_hook(info.exitcode, info.exitinfo1, info.exitinfo2, address,
                                   (address + insn.length) & M64)
                return
            # not intercepted: the model handles what Unicorn cannot do natively (port I/O at CPL 0: nothing)
            if not ent[3] or hflags & HF_CPL_MASK:
                self._native(address, insn, st, view or DecisionView(self, st), code)
        except BaseException as e:          # never let an exception unwind through C
            self._fail(f"internal error at guest RIP {address:#x}: {type(e).__name__}: {e}", e)

    def hook_ran(self, rip: int) -> bool:
        """Whether the instruction at ``rip`` had Unicorn's hook prologue: the
        last candidate-hook call was there, and a hook still covers it.  (A block
        translated before the hook was placed runs the address without the
        prologue and without a call: the last call elsewhere tells it, unless
        the same address ran hooked from another block just before, with no
        candidate in between.)"""
        return self._last_hook == rip and rip in self.hooks

    def _io_decision(self, ent: tuple, insn: D.Insn, st: CpuState, address: int, code: bytes) -> ExitInfo | None:
        """Port I/O at CPL 0, decided once per instruction and remembered.

        At CPL 0 no IOPL or TSS check applies (APM §15.10.2), so the decision
        depends only on the instruction (``ent``: a new decode or a rescan
        makes a new entry), its port, the intercept vectors and the IOPM's
        bits for the port -- the cache key, read afresh on every execution."""
        port = insn.imm
        if port is None:
            port = st.q[2] & 0xFFFF          # DX (QEMU order: rax rcx rdx)
        ctl, view = self.ctl, self.view
        a = ctl.iopm_hpa + (port >> 3)
        key = (port, ctl.ivec, a, view[a], view[a + 1])     # an access of <= 4 ports spans <= 2 bytes
        hit = self.io_decided.get(address)
        if hit is not None and hit[0] is ent and hit[1] == key:
            return hit[2]
        info = _plain(self.decide(insn, DecisionView(self, st), address, code))
        self.io_decided[address] = (ent, key, info)
        return info

    def _decode(self, address: int, code: bytes, mode: int) -> tuple[bytes, D.Insn | None, ExitInfo | None, bool, int]:
        insn = D.decode(code, mode)
        if insn is not None and insn.kind not in self.scan_kinds and not (insn.lock and insn.kind not in D.LOCK_LEGAL):
            insn = None                 # not armed (a LOCK it cannot take is #UD whatever is armed)
        fast = None
        if insn is not None and insn.kind in STATE_FREE:
            # the decision depends on the intercept vectors alone: cache it
            fast = _plain(self.decide(insn, VectorsOnly(self.ctl.ivec), address, code)) or NO_EXIT
        ent = self.decoded[address] = (code, insn, fast, insn is not None and insn.kind in IO_KINDS, mode)
        return ent

    def set_decide(self, fn: Decide) -> None:
        """Use ``fn`` for intercept decisions from now on (cached ones are dropped)."""
        if fn is not self.decide:
            self.decide = fn
            self._drop_decodes()

    def _changed_hits(self, old: bytes, page: bytes) -> tuple[int, int, list[int]]:
        """``(lo, hi, hits)``: the byte range [lo, hi) from the first to the last
        byte where ``page`` differs from ``old`` (they differ), and the
        candidates of ``page`` that a scan of ``old`` may lack.  An instruction
        that uses a changed byte begins at most ``MAX_INSN - 1`` bytes before
        it: only offsets from ``MAX_INSN`` before ``lo`` to ``hi`` are scanned,
        with the bytes after it that their opcodes may reach (the two ends:
        :func:`changed_span`); between two changed runs (a fuzz case's code
        and the previous case's, restored) the unchanged bytes are scanned too,
        which finds only candidates already hooked, and costs little: the
        scan's work is per opcode byte, and the bytes between are mostly zeros."""
        lo, hi = changed_span(old, page)
        ws = max(0, lo - D.MAX_INSN)
        hits = [ws + o for o in D.scan(page[ws:hi + D.MAX_INSN + 1], hi - ws, self._one, self._two)]
        if hi > PAGE_SIZE - D.MAX_INSN:
            hits += straddling(page)
        return lo, hi, hits

    def rescan_changed(self, hpa: int) -> tuple[int, int] | None:
        """Self-modifying code: rescan every executable alias of code page
        ``hpa`` whose bytes differ from its last scan.  Only an instruction
        that begins at most 15 bytes before a changed byte can have become a
        candidate: that window is scanned.  Returns the changed byte range
        [first, last) within the page, or None when nothing changed."""
        page = bytes(self.view[hpa:hpa + PAGE_SIZE])
        first, last = PAGE_SIZE, 0
        add_new = self.hooks.add_new
        for g in list(self.code_hpa.get(hpa, ())):
            cur = self.code_pages.get(g)
            if cur is None or cur[0] != hpa or cur[1] == page:
                continue
            lo, hi, hits = self._changed_hits(cur[1], page)
            add_new([g + off for off in hits])
            self.code_pages[g] = self._hooked_scan[g] = (hpa, page)
            first, last = min(first, lo), max(last, hi)
        return (first, last) if last else None

    # ------------------------------------------------- cross-modifying code
    def hypervisor_wrote(self, hpa: int, n: int) -> None:
        """Cross-modifying code (APM vol. 2 §7.6.1): the hypervisor wrote into a
        page the guest executed.  Once the write lands, Unicorn's translated
        blocks for it are invalidated (through its own physical-write path) and
        the TLB is flushed, so the next fetch is a fill that rescans the page."""
        p = hpa & ~0xFFF
        pages = [q for q in range(p, hpa + n, PAGE_SIZE) if q in self.code_hpa]
        for q in pages:
            for g in self.code_hpa.pop(q, ()):
                self.code_pages.pop(g, None)
                self.xmod_pages.add(g)

    def xmod_commit(self) -> None:
        """At VMRUN, after any TLB flush: drop what the hypervisor's writes made stale."""
        self._drop_decodes()
        self._flush_soft_tlb()
        for g in self.xmod_pages:
            # drops the translated blocks of that page (Unicorn walks it through
            # the TLB-fill hook, which rescans it)
            self._uc.ctl_remove_cache(g, g + PAGE_SIZE)
        self.xmod_pages.clear()

    # ---------------------------------------------------------------- resets
    def _drop_decodes(self) -> None:
        """Empty every decode cache (the current one and those of other vectors)."""
        for d in self._decoded_by_key.values():
            d.clear()
        self.decoded.clear()

    def _flush_tb(self) -> None:
        """Drop every translated block."""
        self._uc.ctl_flush_tb()
        self.tb_pages.clear()
        self._resets = 0

    def drop_translations(self) -> None:
        """Drop every translated block: by page when few pages held code since
        the last flush (QEMU's full flush resets its whole block hash table, about
        ten times the cost of dropping a few pages' blocks), else all at once."""
        self._resets += 1
        if self._tb_inv.available and len(self.tb_pages) <= _TB_PAGES_MAX and self._resets < _FLUSH_EVERY:
            self._tb_inv.pages(self.tb_pages)
            self.tb_pages.clear()
        else:
            self._flush_tb()

    def reset(self) -> None:
        """Forget every scan, decode and pending watch; drop the translated
        blocks and Unicorn's soft TLB, so every page is fetched and scanned anew."""
        self.drop_translations()
        self.code_pages.clear()
        self.code_hpa.clear()
        self._drop_decodes()
        self.io_decided.clear()
        self.xmod_pages.clear()
        self.irq_window.clear()
        self.pass_once_rip = None
        self._flush_soft_tlb()

    def shed_hooks(self) -> int:
        """Delete every candidate hook and :meth:`reset`; returns how many were deleted."""
        n = self.hooks.shed()
        self._hooked_scan.clear()
        self.reset()
        return n


class DecisionView:
    """What the intercept decision reads of the guest (:class:`~sandbox.svm.decision.GuestView`)."""

    __slots__ = ("_sc", "st", "cpl", "intercepts", "_rflags")

    def __init__(self, scanner: Scanner, st: CpuState) -> None:
        self._sc, self.st = scanner, st
        self.cpl = st.cpl
        self.intercepts = scanner.ctl.ivec
        self._rflags = None

    def gpr(self, i: int) -> int:
        return self.st.gpr(i)

    def cr(self, n: int) -> int:
        return self.st.cr(n)

    def rflags(self) -> int:
        if self._rflags is None:
            self._rflags = self.st.reg_read(X.UC_X86_REG_RFLAGS)
        return self._rflags

    def efer_svme(self) -> bool:
        # the guest runs with EFER.SVME as the VMCB says (Unicorn's copy has it cleared)
        sc = self._sc
        return bool(sc.view[sc.ctl.vmcb_hpa + OFF_EFER + 1] & (EFER_SVME >> 8))

    def iopm_bit(self, port: int) -> bool:
        sc = self._sc
        return bool(sc.view[sc.ctl.iopm_hpa + (port >> 3)] >> (port & 7) & 1)

    def msrpm_byte(self, off: int) -> int:
        sc = self._sc
        return sc.view[sc.ctl.msrpm_hpa + off]

    def seg_base(self, idx: int) -> int:
        return self.st.seg(idx)[1]

    def io_allowed_by_tss(self, port: int, size: int) -> bool:
        sel, base, limit, _ = self.st.tr()
        try:
            acc = self._sc.guest_access
            if limit < 0x67:
                return False
            iomap = struct.unpack("<H", acc.read(base + _TSS_IOMAP_BASE, 2))[0]
            if iomap + (port >> 3) + 1 > limit:
                return False
            bits = int.from_bytes(acc.read(base + iomap + (port >> 3), 2), "little")
            return not (bits >> (port & 7)) & ((1 << size) - 1)
        except (GuestPageFault, NestedFault, GuestGP):
            return False
