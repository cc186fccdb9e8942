"""The SVM processor model: VMRUN, the guest run, and #VMEXIT.

:class:`SvmCpu` is the "silicon".  It owns the Unicorn engine, maps host
DRAM as the host-physical address space, resolves every guest TLB fill
through the 2-D walker (:mod:`sandbox.memory.mmu`), finds intercept-enabled
instructions with address-ranged code hooks placed by a page scanner
(:mod:`sandbox.svm.decode`), and performs the world switch in both directions
against a VMCB in host memory.

Exits that the hypervisor handles and resumes are processed inside the
Unicorn hook that detected them (the world switch is a state transfer, not
an ``emu_start`` round trip), which keeps an intercepted CPUID round trip in
the microseconds.
"""
from __future__ import annotations

import ctypes
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from unicorn import (UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_INTR, UC_HOOK_TLB_FILL,
                     UC_MEM_FETCH, UC_MEM_WRITE, UC_MODE_64, UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ,
                     UC_PROT_WRITE, UC_TLB_VIRTUAL, Uc, UcError)
from unicorn import unicorn_const as UCC
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib, HOOK_CODE_CFUNC, uc_hook_h
from unicorn.unicorn_py3.arch.intel import HOOK_INSN_CPUID_CFUNC

from ..arch import (CR0_RESERVED, CR3_LONG_MBZ, CR4_RESERVED, CR4_SMEP, DR6_RESERVED, DR7_RESERVED,
                    EFER_LMA, EFER_LME, EFER_NXE, EFER_RESERVED, EFER_SVME, M64, MSR_EFER, MSR_VM_HSAVE_PA,
                    RFLAGS_IF)
from . import decode as D
from .cpustate import (HF_CS64, emu_counter, invalid_addr, R_FS, R_GS, SEG_INDEX, CpuState, attrib_to_flags,
                       flags_to_attrib)
from .decision import (ALWAYS, IRQ_WINDOW, STATE_FREE, ExitInfo, VectorsOnly, decide, effective_address,
                       kinds_for_bits, mov_to_cr_faults, svm_rax_faults)

NO_EXIT = ExitInfo(-1)          # cached "this instruction does not exit"
#: instructions CR4.UMIP restricts to CPL 0 (seen when their intercept is armed)
UMIP_KINDS = frozenset({D.Kind.SGDT, D.Kind.SIDT, D.Kind.SLDT, D.Kind.STR, D.Kind.SMSW})
CR4_UMIP = 1 << 11
#: instructions the processor watches although they may not exit: their TLB
#: side effects reach the tagged TLB model (Unicorn only flushes its own)
TLB_OBSERVED = frozenset({D.Kind.MOV_TO_CR, D.Kind.INVLPG})
from ..memory.encryption import EncryptionLayer
from .extension import NO_EXTENSION, ProcessorExtension
from .events import DeliveryFault, GuestAccess, HAS_ERROR_CODE, Vec, combine, deliver
from .exitcodes import ExitCode
from ..memory.hostmem import PAGE_SIZE, HostMemory
from ..memory.mmu import (GuestException, GuestGP, GuestLayer, GuestPageFault, NestedFault, NestedLayer, TwoDimWalker,
                  WalkStats)
from ..memory.tlb import Tlb, TlbEntry, TlbMode
from ..memory.paging import Access, PFErr, WalkResult
from .vmcb import GUEST_INSN_BYTES, SEGMENTS, VMCB, Event, EventType, NpControl, TlbControl, VIntr
from .stop import StopReason

TSC_HZ = 2_500_000_000
#: the guest clock's nominal rate: one retired instruction is 10 ns of guest time
GUEST_IPS = 100_000_000
_Q = struct.Struct("<Q")
_EXIT4 = struct.Struct("<QQQQ")
_SEGREC = struct.Struct("<HHIQ")     # VMCB segment record: selector, attrib, limit, base


def _put_seg(mv, at: int, seg: tuple[int, int, int, int]) -> None:
    """Store a (selector, base, limit, QEMU flags) segment as a VMCB record at ``at``."""
    sel, base, limit, flags = seg
    _SEGREC.pack_into(mv, at, sel, flags_to_attrib(flags), limit, base)


def _get_seg(mv, at: int) -> tuple[int, int, int, int]:
    """The VMCB segment record at ``at`` as (selector, base, limit, QEMU flags)."""
    sel, attr, limit, base = _SEGREC.unpack_from(mv, at)
    return sel, base, limit, attrib_to_flags(attr)



@dataclass(slots=True)
class ExitRecord:
    """One #VMEXIT as the hypervisor sees it (mirrors the VMCB's exit fields)."""
    exitcode: int
    exitinfo1: int
    exitinfo2: int
    exitintinfo: int
    rip: int
    nrip: int
    insn: bytes = b""
    index: int = 0

    @property
    def name(self) -> str:
        from .exitcodes import exit_name
        return exit_name(self.exitcode)


class VmrunError(Exception):
    """VMRUN itself faulted in the host (#UD / #GP), before any guest state load."""


@dataclass
class RunLimits:
    max_insns: int = 0            # 0: not counted
    timeout_s: float = 10.0
    max_exits: int = 10_000_000


@dataclass
class StopInfo:
    reason: StopReason
    detail: str = ""


class SvmCpu:
    """One AMD64 processor with SVM, executing guest code through Unicorn."""

    def __init__(self, mem: HostMemory) -> None:
        self.mem = mem
        self._mm = mem._mm               # raw DRAM for the processor's own accesses
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        # DRAM, and above it the plaintext cache of SEV pages (HostMemory.cache_base)
        uc.mem_map_ptr(0, 2 * mem.size, UC_PROT_ALL, mem.address)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        # No exit address: with an ``until`` address Unicorn probes that page
        # through the TLB-fill hook after every emu_start, which is not a guest
        # access (and would overwrite the exact address of a real fault).
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self.uc = uc
        self.st = CpuState(uc)
        self._h = uc._uch
        # host (root-mode) state the hypervisor sets up, as by WRMSR
        self.host_efer = EFER_LME | EFER_LMA | EFER_NXE
        self.vm_hsave_pa = 0
        self.gif = True
        self.cycles_base = time.perf_counter_ns()
        # current guest
        self.vmcb: VMCB | None = None
        self._vmcb_hpa = 0
        self._ivec: tuple[int, ...] = (0,) * 6
        self._iopm_hpa = self._msrpm_hpa = 0
        self._n_cr3 = 0
        self._np = False
        self._asid = 0
        self.stats = WalkStats()
        #: the ASID-tagged TLB (Unicorn's soft TLB is a cache in front of it)
        self.tlb = Tlb()
        #: what plugs in from above (SEV); the default does nothing
        self.ext: ProcessorExtension = NO_EXTENSION
        self.exit_count = 0
        self.on_exit: Callable[[ExitRecord], bool] | None = None
        self.io_passthrough: Callable[[int, int, bool, int], int] | None = None
        self.tsc_offset = 0
        # scanner state
        self._scan_kinds: frozenset = frozenset()
        self._one = self._two = frozenset()
        self._hooked: set[int] = set()
        self._code_pages: dict[int, tuple[int, bytes]] = {}   # gva page -> (hpa page, bytes scanned)
        self._code_hpa: dict[int, set[int]] = {}              # hpa page -> gva pages
        self._fetch_map: dict[int, int] = {}                  # gva page -> hpa page (last fetch fill)
        self._decoded: dict[int, tuple[bytes, D.Insn | None]] = {}
        self._pending_fault: Exception | None = None
        self._exit: ExitRecord | None = None
        self._stop: StopInfo | None = None
        self._pass_once: int | None = None
        #: instructions started in the last run (counted only with an instruction budget)
        self.insns: int | None = None
        self._fault_page = 0
        self._defer_dispatch = False      # exits raised during VMRUN are dispatched by its caller
        self._xmod_pages: set[int] = set()   # GVAs of executed pages the hypervisor wrote
        self._irq_window: set[int] = set()   # addresses where a pending V_IRQ may become deliverable
        self._exit_resumable = True
        self._last_exit_rip: int | None = None
        self._armed_ivec: tuple[int, ...] | None = None
        self._fast_ok = False             # last VMRUN fully checked and loaded this VMCB
        self._vmcb_written = False        # the hypervisor wrote the VMCB since the last exit
        self._saved_regs = (0, 0)
        self._lazy_pending = False
        self._snap_valid = False
        #: set when a VMRUN carried out a TLB_CONTROL flush request
        self.tlb_control_done = False
        #: guest time: instructions retired in counted slices (see :meth:`arm_timer`)
        self.guest_clock = 0
        self.timer_period = self.timer_next = 0
        self.timer_ticks = self.timer_masked = 0
        self._slice_budget = 0            # instructions the running emu_start may count (0: not counting)
        self._in_emu = False
        self._rearm = False               # the timer was re-armed while a slice ran
        self._install_hooks()

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        uc = self.uc
        uc.hook_add(UC_HOOK_TLB_FILL, self._tlb_fill)
        uc.hook_add(UC_HOOK_INTR, self._intr)
        uc.hook_add(UCC.UC_HOOK_INSN_INVALID, self._invalid_opcode)
        uc.hook_add(UC_HOOK_INSN, self._insn_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._insn_out, None, 1, 0, X.UC_X86_INS_OUT)
        # one C callback shared by every per-address candidate hook
        self._code_cb = HOOK_CODE_CFUNC(self._candidate_raw)
        self._hook_add = uclib.uc_hook_add
        # RDTSC/RDTSCP honour TSC_OFFSET even when not intercepted (the binding
        # only wraps CPUID's callback type, which RDTSC shares)
        self._tsc_cbs = [HOOK_INSN_CPUID_CFUNC(lambda h, ud: self._insn_rdtsc()),
                         HOOK_INSN_CPUID_CFUNC(lambda h, ud: self._insn_rdtscp())]
        for cb, ins in zip(self._tsc_cbs, (X.UC_X86_INS_RDTSC, X.UC_X86_INS_RDTSCP)):
            hh = uc_hook_h()
            err = self._hook_add(self._h, ctypes.byref(hh), UC_HOOK_INSN, cb, None, ctypes.c_uint64(1),
                                 ctypes.c_uint64(0), ctypes.c_int(ins))
            if err:
                raise UcError(err)

    def _add_candidate_hook(self, addr: int) -> None:
        if addr in self._hooked:
            return
        hh = uc_hook_h()
        err = self._hook_add(self._h, ctypes.byref(hh), UC_HOOK_CODE, self._code_cb, None,
                             ctypes.c_uint64(addr), ctypes.c_uint64(addr))
        if err:
            raise UcError(err)
        self._hooked.add(addr)

    # ------------------------------------------------------------------ TSC
    def host_tsc(self) -> int:
        return (time.perf_counter_ns() - self.cycles_base) * (TSC_HZ // 1_000_000) // 1000

    def _insn_rdtsc(self) -> int:
        tsc = (self.host_tsc() + self.tsc_offset) & 0xFFFF_FFFF_FFFF_FFFF
        self.st.reg_write(X.UC_X86_REG_RAX, tsc & 0xFFFFFFFF)
        self.st.reg_write(X.UC_X86_REG_RDX, tsc >> 32)
        return 1

    def _insn_rdtscp(self) -> int:
        self._insn_rdtsc()
        self.st.reg_write(X.UC_X86_REG_RCX, self.uc.reg_read(X.UC_X86_REG_MSR, 0xC000_0103) & 0xFFFFFFFF)
        return 1

    # not-intercepted port I/O reaches the platform (pass-through devices)
    def _insn_in(self, uc, port, size, ud) -> int:
        if self.io_passthrough is None:
            return (1 << (8 * size)) - 1
        return self.io_passthrough(port, size, True, 0)

    def _insn_out(self, uc, port, size, value, ud) -> None:
        if self.io_passthrough is not None:
            self.io_passthrough(port, size, False, value)

    # ------------------------------------------------------------- 2-D walker
    def walker(self, stats: WalkStats | None = None) -> TwoDimWalker:
        """The 2-D walker for the current guest context.  The processor's own
        walks count into ``self.stats``; pass ``stats`` for walks made on the
        hypervisor's behalf, which are not guest memory references."""
        st = self.st
        stats = self.stats if stats is None else stats
        nested = NestedLayer(self.mem, self._n_cr3, stats) if self._np else _IdentityNested(self.mem, stats)
        enc = self.ext.encryption()
        guest = GuestLayer(nested, st.cr(0), st.cr(3), st.cr(4), st.efer, stats, enc)
        return TwoDimWalker(guest, nested, stats,
                            EncryptionLayer(enc, guest, nested, stats) if enc is not None else None)

    def _tlb_fill(self, uc, vaddr, access, entry, ud) -> bool:
        try:
            return self._fill(vaddr, access, entry)
        except BaseException as e:           # never let an exception unwind through C
            self._fail(f"internal error in the TLB fill for {vaddr:#x}: {type(e).__name__}: {e}", e)
            return False

    def _fill(self, vaddr: int, access: int, entry) -> bool:
        """One miss in Unicorn's soft TLB: answered by the ASID-tagged TLB
        model, or by a 2-D walk; then the code-page bookkeeping."""
        st = self.st.load()
        user = st.cpl == 3
        acc = Access.FETCH if access == UC_MEM_FETCH else (Access.WRITE if access == UC_MEM_WRITE else Access.READ)
        gva = vaddr & ~0xFFF
        tlb = self.tlb
        e = tlb.lookup(self._asid, user, gva)
        if e is not None and (
                (acc == Access.WRITE and not (e.writable and e.dirty))
                or (acc == Access.FETCH and (not e.executable or (e.user_page and not user and st.cr(4) & CR4_SMEP)))):
            # Not enough for this access: the processor walks again before it
            # faults, and a first write walks to set the Dirty bits (§5.4.2).
            e = None
        if e is None:
            tlb.stats.misses += 1
            try:
                t = self.walker().translate(vaddr, acc, user)
            except (GuestPageFault, NestedFault, GuestGP, GuestException) as f:
                self._pending_fault = f
                self._fault_page = gva
                return False
            e = TlbEntry(t.hpa & ~0xFFF, t.writable, t.executable, t.dirty, t.global_, t.user)
            tlb.insert(self._asid, user, gva, e)
        else:
            tlb.stats.hits += 1
        hpa = e.hpa
        perms = UC_PROT_READ
        if acc == Access.FETCH:
            self._fetch_map[gva] = hpa
            self._scan(gva, hpa)
            perms |= UC_PROT_EXEC
        else:
            is_code = hpa in self._code_hpa
            if acc == Access.WRITE:
                if is_code:
                    # a write to a scanned code page: drop its scans; the next fetch rescans
                    aliases = self._code_hpa.pop(hpa, ())
                    for g in aliases:
                        self._code_pages.pop(g, None)
                    if any(g != gva for g in aliases):
                        # another GVA maps this page with execute permission: drop
                        # those entries too, so its next fetch is a fill that rescans
                        self.flush_tlb()
                perms |= UC_PROT_WRITE
            elif e.writable and e.dirty and not is_code:
                perms |= UC_PROT_WRITE
        entry.paddr = hpa
        entry.perms = perms
        return True

    # --------------------------------------------------------------- scanner
    def _arm_scanner(self) -> None:
        virq = bool(_Q.unpack_from(self.mem.view, self._vmcb_hpa + 0x60)[0] & VIntr.V_IRQ)
        key = (self._ivec, virq)
        if key == self._armed_ivec:
            return
        self._armed_ivec = key
        self._decoded.clear()           # cached decisions depend on the vectors
        bits = {b for b in range(6 * 32) if self._ivec[b >> 5] >> (b & 31) & 1}
        kinds = frozenset(kinds_for_bits(bits) | ALWAYS | TLB_OBSERVED | (IRQ_WINDOW if virq else frozenset()))
        if kinds != self._scan_kinds:
            self._scan_kinds = kinds
            self._one, self._two = D.opcode_starts(set(kinds))
            self._code_pages.clear()
            self._code_hpa.clear()
            self._decoded.clear()
            self.uc.ctl_flush_tb()
            self.flush_tlb()

    def _scan(self, gva: int, hpa: int) -> None:
        cur = self._code_pages.get(gva)
        page = bytes(self.mem.view[hpa:hpa + PAGE_SIZE])
        if cur is not None and cur[0] == hpa and cur[1] == page:
            return
        hits = D.scan(page, PAGE_SIZE, self._one, self._two)
        # instructions that may straddle into the next page: any run of prefix
        # bytes (or a lone 0F) reaching the end of the page could begin one
        k = PAGE_SIZE - 1
        if page[k] == 0x0F:
            hits.append(k)
            k -= 1
        while k >= PAGE_SIZE - D.MAX_INSN and page[k] in D.PREFIX_BYTES:
            hits.append(k)
            k -= 1
        for off in hits:
            self._add_candidate_hook(gva + off)
        self._code_pages[gva] = (hpa, page)
        self._code_hpa.setdefault(hpa, set()).add(gva)
        # drop stale decodes for this page
        for a in [a for a in self._decoded if gva - D.MAX_INSN <= a < gva + PAGE_SIZE]:
            del self._decoded[a]

    def insn_bytes(self, addr: int) -> bytes:
        """Up to 15 bytes of guest code at ``addr``, as the processor fetched them."""
        gva = addr & ~0xFFF
        hpa = self._fetch_map.get(gva)
        if hpa is None:
            return b""
        off = addr & 0xFFF
        if off <= PAGE_SIZE - D.MAX_INSN:
            return self._mm[hpa + off:hpa + off + D.MAX_INSN]
        b = self._mm[hpa + off:hpa + PAGE_SIZE]
        if len(b) < D.MAX_INSN:
            nxt = self._fetch_map.get(gva + PAGE_SIZE)
            if nxt is None:
                try:
                    t = self.walker().translate(gva + PAGE_SIZE, Access.FETCH, self.st.cpl == 3, set_ad=False)
                    nxt = t.hpa & ~0xFFF
                except (GuestPageFault, NestedFault, GuestGP):
                    nxt = None
            if nxt is not None:
                b += bytes(self.mem.view[nxt:nxt + D.MAX_INSN - len(b)])
        return b

    # ------------------------------------------------------- candidate hook
    def _candidate_raw(self, handle, address, size, user_data) -> None:
        try:
            self._candidate(address)
        except BaseException as e:          # never let an exception unwind through C
            self._fail(f"internal error at guest RIP {address:#x}: {type(e).__name__}: {e}", e)


    def pass_once(self, rip: int) -> None:
        """Execute the instruction at ``rip`` once without the intercept check."""
        self._pass_once = rip

    @property
    def invalid_reason(self) -> str:
        """Why the last VMRUN failed with VMEXIT_INVALID."""
        return self._invalid_reason

    def _candidate(self, address: int) -> None:
        if self._stop is not None:
            return
        if self._irq_window and address in self._irq_window:
            self._irq_window.discard(address)
            if self._window_open():
                return
        code = self.insn_bytes(address)
        ent = self._decoded.get(address)
        if ent is None or ent[0] != code:
            insn = D.decode(code)
            if insn is not None and insn.kind not in self._scan_kinds:
                insn = None
            fast = None
            if insn is not None and insn.kind in STATE_FREE:
                # the decision depends on the intercept vectors alone: cache it
                fast = decide(insn, VectorsOnly(self._ivec), address, code) or NO_EXIT
            ent = self._decoded[address] = (code, insn, fast)
        insn = ent[1]
        if insn is None:
            return
        st = self.st.load()
        if 0x40 <= code[0] <= 0x4F and not st.hflags & HF_CS64:
            return      # outside 64-bit mode 40-4F is INC/DEC, not a REX prefix (the next byte has its own hook)
        view = None
        if self._pass_once == address:
            self._pass_once = None
            info = None
        elif ent[2] is not None:
            info = ent[2] if ent[2] is not NO_EXIT else None
        else:
            view = _GuestView(self, st)
            info = decide(insn, view, address, code)
        if info is not None:
            if self.ext.intercept(self, info.exitcode, address, insn.length):
                return                      # SEV-ES: GHCB MSR, VMGEXIT, or #VC for a non-automatic exit
            self._vmexit(info.exitcode, info.exitinfo1, info.exitinfo2, rip=address, nrip=address + insn.length,
                         fresh=True)
            self._after_exit_in_hook(address)
            return
        if view is None:
            view = _GuestView(self, st)
        # not intercepted: the model handles what Unicorn cannot do natively
        k = insn.kind
        if k in IRQ_WINDOW:
            self._watch_irq_window(address, insn, st, view)
        elif k in (D.Kind.IN, D.Kind.OUT, D.Kind.INS, D.Kind.OUTS):
            # not intercepted: only the I/O-permission #GP is the model's to raise
            # (Unicorn does not check IOPL or the TSS bitmap)
            port = insn.imm if insn.imm is not None else st.gpr(2) & 0xFFFF
            if view.cpl > (view.rflags() >> 12) & 3 and not view.io_allowed_by_tss(port, insn.opsize // 8):
                self.raise_exception(Vec.GP, 0, address)
        elif k == D.Kind.HLT:
            if view.cpl:
                self.raise_exception(Vec.GP, 0, address)      # privileged: #GP before the intercept
            else:
                self._native_hlt(address, insn)
        elif k in (D.Kind.INTN, D.Kind.INT3, D.Kind.ICEBP):
            vec = insn.imm if k == D.Kind.INTN else (3 if k == D.Kind.INT3 else 1)
            self._deliver_in_hook(vec, None, software=(k == D.Kind.INTN) or k == D.Kind.INT3,
                                  rip_after=address + insn.length, fault_rip=address)
        elif k == D.Kind.MOV_TO_CR:
            if view.cpl == 0 and mov_to_cr_faults(insn.reg, st.gpr(insn.rm), st.cr(0), bool(st.efer & EFER_LMA)):
                self.raise_exception(Vec.GP, 0, address)      # Unicorn would load the illegal value
            else:
                self._observe_cr_write(insn.reg)
        elif k == D.Kind.INVLPG:
            # INVLPG drops the page in the current ASID, global or not (APM §5.5.3)
            va = effective_address(code, insn, view, address + insn.length)
            self.tlb.flush_page(self._asid, va & ~0xFFF)
        elif k == D.Kind.INTO:
            self.raise_exception(Vec.UD, None, address)
        elif k in UMIP_KINDS and view.cpl and st.cr(4) & CR4_UMIP:
            # UMIP (APM vol. 2 §3.1.3): #GP at CPL > 0; Unicorn does not implement it
            self.raise_exception(Vec.GP, 0, address)
        elif k in (D.Kind.VMLOAD, D.Kind.VMSAVE, D.Kind.SKINIT, D.Kind.VMRUN, D.Kind.STGI, D.Kind.CLGI,
                   D.Kind.INVLPGA, D.Kind.VMMCALL):
            # SVM instructions the VMCB does not intercept.  VMMCALL and SKINIT
            # raise #UD (APM §15.4, §15.18); the rest need EFER.SVME and CPL 0.
            if k in (D.Kind.VMMCALL, D.Kind.SKINIT) or not view.efer_svme():
                self.raise_exception(Vec.UD, None, address)
            elif view.cpl:
                self.raise_exception(Vec.GP, 0, address)
            elif k in (D.Kind.VMRUN, D.Kind.VMLOAD, D.Kind.VMSAVE) and svm_rax_faults(insn, st.gpr(0)):
                self.raise_exception(Vec.GP, 0, address)      # rAX check precedes the intercept
            elif k in (D.Kind.STGI, D.Kind.CLGI):
                self._guest_gif(k == D.Kind.STGI)
                self._set_rip(address + insn.length)
            elif k == D.Kind.INVLPGA:
                va = st.gpr(0) if insn.addrsize == 64 else st.gpr(0) & 0xFFFF_FFFF
                self.invlpga(va, st.gpr(1) & 0xFFFF_FFFF)
                self._set_rip(address + insn.length)
            else:
                self._virtual_vmload_vmsave(address, insn, st)

    def _observe_cr_write(self, cr: int) -> None:
        """A MOV to CR0/CR3/CR4 about to run: its TLB side effect (APM §5.5.2).
        Unicorn flushes its own soft TLB when it executes the move; the tagged
        model behind it is updated here.  MOV CR3 keeps global entries; a CR0 or
        CR4 write may change PG/WP/PGE/SMEP and drops the ASID's entries."""
        if cr == 3:
            self.tlb.flush_asid(self._asid, keep_global=True)
        elif cr in (0, 4):
            self.tlb.flush_asid(self._asid)

    # ---------------------------------------------- virtual interrupt window
    def _watch_irq_window(self, address: int, insn: D.Insn, st: CpuState, view: "_GuestView") -> None:
        """STI / POPF / IRET while a V_IRQ waits for RFLAGS.IF (APM §15.21.4).

        Finds where the interrupt can first be taken -- after the instruction
        following STI (its interrupt shadow), after POPF, at IRET's return
        address -- and watches that address with a one-shot check.
        """
        if not _Q.unpack_from(self.mem.view, self._vmcb_hpa + 0x60)[0] & VIntr.V_IRQ:
            return
        try:
            if insn.kind == D.Kind.STI:
                nxt = address + insn.length
                shadowed = D.length_of(self._insn_bytes_at(nxt))
                if shadowed is None:
                    return
                target = nxt + shadowed
            elif insn.kind == D.Kind.POPF:
                target = address + insn.length
            else:
                target = _Q.unpack(self._guest_access().read(st.gpr(4), 8))[0]
        except (GuestPageFault, NestedFault, GuestGP):
            return
        self._irq_window.add(target)
        self._add_candidate_hook(target)
        self.uc.ctl_remove_cache(target, target + 1)     # recompile with the hook

    def _insn_bytes_at(self, addr: int) -> bytes:
        acc = self._guest_access()
        return acc.read(addr, D.MAX_INSN)

    def _window_open(self) -> bool:
        """At a watched address: take the pending virtual interrupt if it is
        deliverable now (or exit on VINTR).  True when control moved."""
        rflags = self.st.reg_read(X.UC_X86_REG_RFLAGS)
        if not self._virq_deliverable(rflags):
            return False
        rip = self.st.reg_read(X.UC_X86_REG_RIP)
        if self._ivec[3] >> 4 & 1:           # VINTR intercept
            self._vmexit(ExitCode.VINTR, 0, 0, rip=rip, nrip=0)
            self._after_exit_in_hook(rip)
            return True
        self._inject_virq()
        return True

    def _guest_gif(self, on: bool) -> None:
        """STGI/CLGI not intercepted: with vGIF they set V_GIF (APM §15.33.2);
        without it they would act on the physical GIF, which this model keeps."""
        b = self._vmcb_hpa
        v = _Q.unpack_from(self.mem.view, b + 0x60)[0]
        if v & VIntr.V_GIF_ENABLE:
            _Q.pack_into(self.mem.view, b + 0x60, (v | VIntr.V_GIF) if on else (v & ~VIntr.V_GIF))
        else:
            self.gif = on

    # VMLOAD/VMSAVE state: FS GS TR LDTR (with hidden parts) + MSRs (APM §15.5.2)
    _VMSAVE_MSRS = ((0x620, 0xC000_0102), (0x600, 0xC000_0081), (0x608, 0xC000_0082),
                    (0x610, 0xC000_0083), (0x618, 0xC000_0084), (0x628, 0x174), (0x630, 0x175),
                    (0x638, 0x176))

    def _virtual_vmload_vmsave(self, address: int, insn: D.Insn, st: CpuState) -> None:
        """VMLOAD/VMSAVE the VMCB does not intercept.

        With VMSAVE/VMLOAD virtualization (VIRT_EXT bit 1, APM §15.33.1) rAX is
        a guest-physical address, translated through the nested page table.
        Without it the hardware would use rAX as a *host*-physical address; the
        sandbox never lets a guest reach host memory outside its nested
        mappings, so it stops the run and names the misconfiguration.
        """
        virt = _Q.unpack_from(self.mem.view, self._vmcb_hpa + 0xB8)[0] & 2
        name = insn.kind.name
        if not virt:
            self._halt(StopReason.ERROR, f"{name} at {address:#x} is not intercepted and VMSAVE/VMLOAD "
                       "virtualization is off: the guest would access host-physical memory")
            return
        gpa = st.gpr(0) & ~0xFFF if not st.gpr(0) & 0xFFF else None
        if gpa is None:
            self.raise_exception(Vec.GP, 0, address)
            return
        nested = NestedLayer(self.mem, self._n_cr3, self.stats)
        try:
            hpa = nested.translate(gpa, Access.WRITE if insn.kind == D.Kind.VMSAVE else Access.READ).phys
        except NestedFault as f:
            self._vmexit(ExitCode.NPF, f.exitinfo1, f.gpa, rip=address, nrip=0)
            self._after_exit_in_hook(address)
            return
        mv = self.mem.view
        segs = (("FS", R_FS), ("GS", R_GS))
        if insn.kind == D.Kind.VMSAVE:
            for name_, idx in segs:
                _put_seg(mv, hpa + SEGMENTS[name_], st.seg(idx))
            _put_seg(mv, hpa + SEGMENTS["TR"], st.tr())
            _put_seg(mv, hpa + SEGMENTS["LDTR"], st.ldt())
            for off, msr in self._VMSAVE_MSRS:
                _Q.pack_into(mv, hpa + off, self.uc.reg_read(X.UC_X86_REG_MSR, msr))
        else:
            for name_, idx in segs:
                st.set_seg(idx, *_get_seg(mv, hpa + SEGMENTS[name_]))
            for name_ in ("TR", "LDTR"):
                st.set_system_seg(name_, *_get_seg(mv, hpa + SEGMENTS[name_]))
            st.store()
            for off, msr in self._VMSAVE_MSRS:
                self.uc.reg_write(X.UC_X86_REG_MSR, (msr, _Q.unpack_from(mv, hpa + off)[0]))
        self._set_rip(address + insn.length)

    def _native_hlt(self, address: int, insn: D.Insn) -> None:
        rflags = self.st.reg_read(X.UC_X86_REG_RFLAGS)
        if self._virq_deliverable(rflags):
            self._set_rip(address + insn.length)
            self._inject_virq()
            return
        self._set_rip(address + insn.length)
        self._halt(StopReason.HALT, f"HLT at {address:#x} with no pending interrupt")

    def _set_rip(self, rip: int) -> None:
        self.st.reg_write(X.UC_X86_REG_RIP, rip)

    def _halt(self, reason: str, detail: str = "") -> None:
        self._stop = StopInfo(reason, detail)
        self.uc.emu_stop()

    def _fail(self, msg: str, exc: BaseException | None = None) -> None:
        self._stop = StopInfo(StopReason.ERROR, msg)
        self._error = exc
        try:
            self.uc.emu_stop()
        except UcError:
            pass

    # ------------------------------------------------------------- exceptions
    def _intr(self, uc, intno, ud) -> None:
        try:
            rip = self.st.reg_read(X.UC_X86_REG_RIP)
            st = self.st.load()
            err = st.error_code if intno in HAS_ERROR_CODE else None
            st.clear_old_exception()        # the model delivers it: nothing stays "in flight" for QEMU
            if intno >= 32:
                # a software interrupt the scanner did not see (cannot happen
                # with INT n always hooked); deliver it like INT n
                self._deliver_in_hook(intno, None, software=True, rip_after=rip, fault_rip=rip - 2)
                return
            self.raise_exception(intno, err, rip)
        except BaseException as e:
            self._fail(f"internal error delivering vector {intno}: {type(e).__name__}: {e}", e)

    def _invalid_opcode(self, uc, ud) -> bool:
        """#UD reaches Unicorn's invalid-instruction hook, not the interrupt hook."""
        try:
            rip = self.st.reg_read(X.UC_X86_REG_RIP)
            if self.ext.emulate_invalid(self, rip):
                return True                           # an SEV instruction Unicorn does not know (PVALIDATE)
            self.raise_exception(Vec.UD, None, rip)
        except BaseException as e:
            self._fail(f"internal error delivering #UD: {type(e).__name__}: {e}", e)
        return True

    def raise_exception(self, vector: int, err: int | None, rip: int, cr2: int | None = None) -> None:
        """An exception raised by guest execution at ``rip``: intercept or deliver."""
        if self._ivec[2] >> vector & 1:
            info1 = err if err is not None else 0
            info2 = cr2 if (vector == Vec.PF and cr2 is not None) else 0
            insn = b""
            if vector == Vec.PF:
                insn = self.insn_bytes(rip)
            self._vmexit(0x40 + vector, info1, info2, rip=rip, nrip=0, insn=insn)
            self._after_exit_in_hook(rip)
            return
        if cr2 is not None:
            self.st.reg_write(X.UC_X86_REG_CR2, cr2)
        self._deliver_in_hook(vector, err, software=False, rip_after=rip, fault_rip=rip)

    def _deliver_in_hook(self, vector: int, err: int | None, *, software: bool, rip_after: int,
                         fault_rip: int, external: bool = False, etype: int | None = None) -> None:
        """Vector an event through the guest IDT, escalating to #DF and shutdown.

        A fault during delivery that the VMCB intercepts exits with EXITINTINFO
        describing the event being delivered (APM §15.7.2): TYPE 0 for an
        external interrupt, 2 NMI, 4 INT n, 3 for exceptions (INT3/INT1 too).
        """
        if etype is None:
            etype = (EventType.INTR if external else
                     EventType.SOFT_INT if software and vector not in (1, 3) else EventType.EXCEPTION)
        cur_vec, cur_err, cur_sw, cur_type = vector, err, software, int(etype)
        ret_rip = rip_after
        for _ in range(3):
            st = self.st.load()
            rflags = self.st.reg_read(X.UC_X86_REG_RFLAGS)
            rsp = st.gpr(4)
            try:
                new_rip, new_rsp, new_flags = deliver(st, self._guest_access(), cur_vec, cur_err,
                                                      software=cur_sw, rip=ret_rip, rflags=rflags, rsp=rsp,
                                                      external=external)
            except (DeliveryFault, GuestPageFault, GuestGP) as f:
                # a non-canonical IDT/GDT/TSS address read during delivery is #GP(0)
                fvec, ferr = ((Vec.PF, f.error_code) if isinstance(f, GuestPageFault) else
                              (Vec.GP, 0) if isinstance(f, GuestGP) else (f.vector, f.error_code))
                intinfo = Event(cur_vec, EventType(cur_type), cur_err if cur_vec in HAS_ERROR_CODE else None)
                # The new exception's own intercept comes first (APM §15.7.2: e.g.
                # a #PF intercepted while delivering another event exits as #PF
                # with EXITINTINFO = that event -- what shadow paging relies on);
                # only an unintercepted one combines into #DF or shutdown.
                nxt = fvec if self._ivec[2] >> fvec & 1 else combine(cur_vec, fvec)
                if nxt is None:
                    return self._shutdown(fault_rip)
                if self._ivec[2] >> nxt & 1:
                    info2 = f.address if nxt == Vec.PF else 0
                    self._vmexit(0x40 + nxt, (0 if nxt == Vec.DF else ferr) or 0, info2, rip=fault_rip, nrip=0,
                                 exitintinfo=intinfo.encode())
                    return self._after_exit_in_hook(fault_rip)
                if nxt == Vec.PF:
                    self.st.reg_write(X.UC_X86_REG_CR2, f.address)
                cur_vec, cur_err, cur_sw, ret_rip = nxt, (0 if nxt == Vec.DF else ferr), False, fault_rip
                cur_type, external = EventType.EXCEPTION, False
                continue
            except NestedFault as f:
                intinfo = Event(cur_vec, EventType(cur_type), cur_err if cur_vec in HAS_ERROR_CODE else None)
                self._vmexit(ExitCode.NPF, f.exitinfo1, f.gpa, rip=fault_rip, nrip=0, exitintinfo=intinfo.encode())
                return self._after_exit_in_hook(fault_rip)
            st.store()
            self.st.reg_write(X.UC_X86_REG_RSP, new_rsp)
            self.st.reg_write(X.UC_X86_REG_RFLAGS, new_flags)
            self._set_rip(new_rip)
            return None
        return self._shutdown(fault_rip)

    def _shutdown(self, rip: int) -> None:
        if self._ivec[3] >> 31 & 1:
            self._vmexit(ExitCode.SHUTDOWN, 0, 0, rip=rip, nrip=0)
            self._after_exit_in_hook(rip, resumable=False)
        else:
            # shutdown without the intercept: the machine stops (APM §15.12)
            self._halt(StopReason.SHUTDOWN, f"triple fault at {rip:#x}")

    def _guest_access(self) -> GuestAccess:
        def tr(gva: int, acc: int) -> int:
            return self.walker().translate(gva, acc, False).hpa

        def read(gva: int, n: int) -> bytes:
            out = b""
            while n:
                chunk = min(n, PAGE_SIZE - (gva & 0xFFF))
                h = tr(gva, Access.READ)
                out += bytes(self.mem.view[h:h + chunk])
                gva, n = gva + chunk, n - chunk
            return out

        def write(gva: int, data: bytes) -> None:
            while data:
                chunk = min(len(data), PAGE_SIZE - (gva & 0xFFF))
                h = tr(gva, Access.WRITE)
                self.mem.view[h:h + chunk] = data[:chunk]
                gva, data = gva + chunk, data[chunk:]
        return GuestAccess(read, write)

    def _inject_virq(self) -> None:
        """Take the pending virtual interrupt: V_IRQ is cleared as it is dispatched (§15.21.4)."""
        mv, b = self.mem.view, self._vmcb_hpa
        v = _Q.unpack_from(mv, b + 0x60)[0]
        vec = mv[b + 0x64]
        _Q.pack_into(mv, b + 0x60, v & ~VIntr.V_IRQ)
        rip = self.st.reg_read(X.UC_X86_REG_RIP)
        self._deliver_in_hook(vec, None, software=False, rip_after=rip, fault_rip=rip, external=True)

    # -------------------------------------------------- GPRs for the hypervisor
    def guest_gpr(self, i: int) -> int:
        """Guest GPR ``i`` (QEMU order: rax rcx rdx rbx rsp rbp rsi rdi r8-r15).

        The state snapshot taken at #VMEXIT is current while the hypervisor
        runs; writes patch it and are stored at the next VMRUN."""
        if not self._snap_valid:
            self.st.load()
            self._snap_valid = True
        return self.st.gpr(i)

    def set_guest_gpr(self, i: int, v: int) -> None:
        if not self._snap_valid:
            self.st.load()
            self._snap_valid = True
        self.st.set_gpr(i, v)

    # ------------------------------------------------------------- #VMEXIT
    def _vmexit(self, code: int, info1: int, info2: int, *, rip: int, nrip: int, insn: bytes = b"",
                exitintinfo: int = 0, fresh: bool = False) -> ExitRecord:
        """#VMEXIT (APM §15.6): save guest state and the exit information into the VMCB.

        RIP, RSP and RAX -- the fields a handler touches on nearly every exit --
        are written at once; the rest (RFLAGS included, which Unicorn computes
        lazily and costs a call to read) of the state-save area is written
        back lazily, before the hypervisor's first access to it through
        HostMemory (``_sync``).  Either way nothing that reads host memory can
        see the VMCB before it holds the guest state.
        """
        st = self.st if fresh else self.st.load()
        self.ext.at_vmexit(self)              # SEV: DRAM holds ciphertext before the hypervisor runs
        mv = self.mem.view
        b = self._vmcb_hpa
        rax, rsp = st.gpr(0), st.gpr(4)
        _Q.pack_into(mv, b + 0x578, rip)
        _Q.pack_into(mv, b + 0x5D8, rsp)
        _Q.pack_into(mv, b + 0x5F8, rax)
        self._saved_regs = (rax, rsp)
        self._snap_valid = True
        self._lazy_pending = True
        self._vmcb_written = False
        self.mem.sync = self.host_access
        _EXIT4.pack_into(mv, b + 0x70, code & M64, info1 & M64, info2 & M64, exitintinfo)
        _Q.pack_into(mv, b + 0xC8, nrip)
        _Q.pack_into(mv, b + 0xA8, 0)          # EVENTINJ consumed
        mv[b + 0xD0] = len(insn) & 0xF
        if insn:
            mv[b + GUEST_INSN_BYTES:b + GUEST_INSN_BYTES + len(insn)] = insn
        self.exit_count += 1
        rec = ExitRecord(int(code), info1, info2, exitintinfo, rip, nrip, insn, self.exit_count)
        self._exit = rec
        self.gif = False        # #VMEXIT clears GIF
        self.ext.after_vmexit(self, rec)      # SEV-ES: state into the encrypted VMSA
        return rec

    _EAGER = ((0x578, 0x580), (0x5D8, 0x5E0), (0x5F8, 0x600))     # RIP, RSP, RAX
    _EAGER_QWORDS = frozenset({0x578, 0x5D8, 0x5F8})

    def host_access(self, hpa: int, n: int, write: bool = False) -> None:
        """The hypervisor reads or writes host memory (``HostMemory.sync``):
        the VMCB must hold the guest state first, and a write to a page the
        guest executed is cross-modifying code."""
        self.ext.host_access(hpa, n, write)
        off = hpa - self._vmcb_hpa
        if off + n <= 0 or off >= 0x1000:
            if write and self._code_hpa:
                self._hypervisor_wrote(hpa, n)
            return
        if n == 8 and off in self._EAGER_QWORDS:
            return
        for lo, hi in self._EAGER:
            if lo <= off and off + n <= hi:
                return
        if write and not (0x70 <= off and off + n <= 0x90):
            self._vmcb_written = True      # anything but the exit fields: reload at VMRUN
        if off + n > 0x400:
            self.flush_guest_state()

    def _hypervisor_wrote(self, hpa: int, n: int) -> None:
        """Cross-modifying code (APM vol. 2 §7.6.1): the hypervisor wrote into a
        page the guest executed.  Once the write lands, Unicorn's translated
        blocks for it are invalidated (through its own physical-write path) and
        the TLB is flushed, so the next fetch is a fill that rescans the page."""
        p = hpa & ~0xFFF
        pages = [q for q in range(p, hpa + n, PAGE_SIZE) if q in self._code_hpa]
        if not pages:
            return
        for q in pages:
            for g in self._code_hpa.pop(q, ()):
                self._code_pages.pop(g, None)
                self._xmod_pages.add(g)

    def _xmod_commit(self) -> None:
        self._decoded.clear()
        self.flush_tlb()
        for g in self._xmod_pages:
            # drops the translated blocks of that page (Unicorn walks it through
            # the TLB-fill hook, which rescans it)
            self.uc.ctl_remove_cache(g, g + PAGE_SIZE)
        self._xmod_pages.clear()

    def flush_guest_state(self) -> None:
        """Write the lazily saved part of the guest state into the VMCB."""
        if not self._lazy_pending:
            return
        self._lazy_pending = False
        st = self.st.load()
        mv = self.mem.view
        b = self._vmcb_hpa
        for name in ("ES", "CS", "SS", "DS"):
            _put_seg(mv, b + SEGMENTS[name], st.seg(SEG_INDEX[name]))
        for name, (base, limit) in (("GDTR", st.gdt()), ("IDTR", st.idt())):
            _put_seg(mv, b + SEGMENTS[name], (0, base, limit, 0))
        mv[b + 0x4CB] = st.cpl
        struct.pack_into("<Q", mv, b + 0x4D0, st.efer | EFER_SVME)
        struct.pack_into("<5Q", mv, b + 0x548, st.cr(4), st.cr(3), st.cr(0), st.dr(7), st.dr(6))
        struct.pack_into("<Q", mv, b + 0x640, st.cr(2))
        _Q.pack_into(mv, b + 0x570, st.reg_read(X.UC_X86_REG_RFLAGS))
        self._loaded = self._snapshot_vmcb()

    def _after_exit_in_hook(self, rip: int, resumable: bool = True) -> None:
        """Hand the exit to the hypervisor; resume in place or stop the run."""
        self._exit_resumable = resumable
        if self._defer_dispatch:
            return                    # inside VMRUN itself: the caller dispatches
        if self._dispatch_loop():
            self._set_rip(self._entry_rip)
            return
        try:
            self.uc.emu_stop()
        except UcError:
            pass
        # the intercepted instruction must not execute; RIP is the last exit's
        self._set_rip(self._last_exit_rip if self._last_exit_rip is not None else rip)

    def _dispatch_loop(self) -> bool:
        """The hypervisor loop: hand ``self._exit`` to the handler and VMRUN again
        while it resumes.  True when the guest continues at ``_entry_rip``."""
        while True:
            rec = self._exit
            self._last_exit_rip = rec.rip
            if self.exit_count >= self.limits.max_exits:
                self._stop = StopInfo(StopReason.EXIT_BUDGET, f"{self.exit_count} exits")
                return False
            resume = False
            if self.on_exit is not None:
                resume = bool(self.on_exit(rec)) and self._exit_resumable
                if self._stop is not None:
                    return False
            if not resume:
                self._stop = StopInfo(StopReason.EXIT)
                return False
            self._exit = None
            self._defer_dispatch = True
            try:
                self._enter(in_hook=True)
            finally:
                self._defer_dispatch = False
            if self._stop is not None:
                return False
            if self._exit is None:
                return True

    # -------------------------------------------------------------- VMRUN
    def vmrun(self, vmcb_hpa: int, on_exit: Callable[[ExitRecord], bool] | None = None,
              limits: RunLimits | None = None) -> StopInfo:
        """Execute VMRUN with rAX = ``vmcb_hpa`` (APM §15.5).

        Runs the guest until an exit the hypervisor does not resume (then
        returns with the VMCB holding the exit), or until the run stops
        (budget, timeout, halt, shutdown).  ``on_exit(record)`` is the
        hypervisor's exit handler; returning True means "VMRUN again".
        """
        if not self.host_efer & EFER_SVME:
            raise VmrunError("#UD: VMRUN with host EFER.SVME = 0")
        if vmcb_hpa & 0xFFF or vmcb_hpa + PAGE_SIZE > self.mem.size:
            raise VmrunError(f"#GP: VMCB address {vmcb_hpa:#x} is not a page-aligned address in DRAM")
        if not self.vm_hsave_pa or self.vm_hsave_pa & 0xFFF:
            raise VmrunError("#GP: VM_HSAVE_PA is not set to a page-aligned address")
        self.limits = limits or RunLimits()
        self._vmcb_hpa = vmcb_hpa
        self.vmcb = VMCB(self.mem, vmcb_hpa)
        self._fast_ok = False
        self.mem.sync = self.host_access
        self.on_exit = on_exit
        self._stop = None
        self._exit = None
        self._error = None
        self._snap_valid = False
        self._loaded = None
        self._last_exit_rip = None
        self._defer_dispatch = True
        try:
            self._enter(in_hook=False)
        finally:
            self._defer_dispatch = False
        if self._exit is not None and self._stop is None and not self._dispatch_loop():
            return self._finish()
        if self._stop is not None:
            return self._finish()
        self.st.reg_write(X.UC_X86_REG_RIP, self._entry_rip)
        # The wall-clock limit is a sleeping watchdog thread, not emu_start's
        # ``timeout``: Unicorn's timer thread polls every 2 us and steals a
        # core from the guest on a small machine.
        self._timed_out = False
        self.insns = None
        watchdog = None
        if self.limits.timeout_s:
            watchdog = threading.Timer(self.limits.timeout_s, self._watchdog)
            watchdog.daemon = True
            watchdog.start()
        try:
            self._run_slices()
        finally:
            if watchdog is not None:
                watchdog.cancel()
        return self._finish()

    def _finish(self) -> StopInfo:
        self.ext.at_stop(self)
        self.flush_guest_state()
        if self.st.dirty:
            self.st.store()
        return self._stop

    def _watchdog(self) -> None:
        self._timed_out = True
        self.uc.emu_stop()

    def _slice_ended(self) -> StopInfo:
        if self._timed_out:
            return StopInfo(StopReason.TIMEOUT, f"wall-clock limit of {self.limits.timeout_s:g} s reached")
        if self.limits.max_insns:
            return StopInfo(StopReason.INSN_BUDGET, f"instruction budget of {self.limits.max_insns} reached")
        return StopInfo(StopReason.STOPPED, "emulation stopped")

    def _count_slice(self, budget: int) -> None:
        if budget:
            n = emu_counter(self.uc)
            if n is not None:
                n = min(n, budget)
                self.guest_clock += n
                if self.limits.max_insns:
                    self.insns = (self.insns or 0) + n

    # -------------------------------------------------------- virtual timer
    def arm_timer(self, period_ns: int) -> None:
        """A periodic physical interrupt in guest time (0 disarms it).

        Guest time is counted in retired guest instructions at the model's
        nominal :data:`GUEST_IPS`; the run is sliced at each deadline with
        Unicorn's instruction count, so a timer costs nothing per instruction
        in Python.  At a deadline the processor takes the interrupt: a
        #VMEXIT(INTR) when the VMCB intercepts INTR (APM §15.13.1)."""
        if period_ns < 0:
            raise ValueError("timer period must be positive")
        self.timer_period = max(1, period_ns * GUEST_IPS // 1_000_000_000) if period_ns else 0
        self.timer_next = self._clock_now() + self.timer_period
        if self._in_emu:
            # armed by a hypervisor handling an exit inside the run: end this
            # slice, so the next one is bounded by the new deadline
            self._rearm = True
            self.uc.emu_stop()

    def _clock_now(self) -> int:
        """Guest time in instructions, including the running slice's progress."""
        if self._in_emu and self._slice_budget:
            n = emu_counter(self.uc)
            if n is not None:
                return self.guest_clock + min(n, self._slice_budget)
        return self.guest_clock

    @property
    def guest_time_ns(self) -> int:
        return self._clock_now() * 1_000_000_000 // GUEST_IPS

    def _timer_interrupt(self) -> None:
        self.timer_next = self.guest_clock + self.timer_period
        self.timer_ticks += 1
        rip = self.st.reg_read(X.UC_X86_REG_RIP)
        self._entry_rip = rip
        if not self._ivec[ExitCode.INTR >> 5] >> (ExitCode.INTR & 31) & 1:
            self.timer_masked += 1      # not intercepted: the host would field it; the guest never sees it
            return
        self._vmexit(ExitCode.INTR, 0, 0, rip=rip, nrip=0)
        self._after_exit_outside(rip)

    def _run_slices(self) -> None:
        """emu_start until the run stops; restart after page faults.

        With an instruction budget, Unicorn counts every instruction it starts
        (an intercepted one included); the budget spans all slices of the run.
        """
        while self._stop is None:
            if self._timed_out:
                self._stop = self._slice_ended()
                break
            budget = 0
            if self.limits.max_insns:
                budget = self.limits.max_insns - (self.insns or 0)
                if budget <= 0:
                    self._stop = StopInfo(StopReason.INSN_BUDGET, f"instruction budget of {self.limits.max_insns} reached")
                    break
            if self.timer_period:
                due = max(1, self.timer_next - self.guest_clock)
                budget = min(budget, due) if budget else due
            self._pending_fault = None
            self._slice_budget, self._in_emu, self._rearm = budget, True, False
            try:
                try:
                    self.uc.emu_start(self._entry_rip, 0xFFFF_FFFF_FFFF_FFFF, count=budget)
                finally:
                    self._in_emu = False
                    self._count_slice(budget)
            except UcError as e:
                if self._stop is not None:
                    break
                f = self._pending_fault
                if f is None:
                    self._stop = StopInfo(StopReason.ERROR, f"emulation error: {e}")
                    break
                self._memory_fault(f)
                if self._stop is None and self._exit is None:
                    self._entry_rip = self.st.reg_read(X.UC_X86_REG_RIP)
                continue
            if self._stop is not None:
                break
            if self._rearm and not self._timed_out:
                self._entry_rip = self.st.reg_read(X.UC_X86_REG_RIP)
                continue
            # emu_start returned by itself: a timer deadline, the budget, or the watchdog's emu_stop
            if not self._timed_out and self.timer_period and self.guest_clock >= self.timer_next:
                self._timer_interrupt()
                continue
            if not self._timed_out and self.limits.max_insns and self.insns is not None \
                    and self.insns < self.limits.max_insns:
                self._entry_rip = self.st.reg_read(X.UC_X86_REG_RIP)
                continue
            self._stop = self._slice_ended()

    def _memory_fault(self, f: Exception) -> None:
        """A TLB fill failed: #PF into the guest (or its intercept) or VMEXIT_NPF."""
        self.st.load().clear_old_exception()
        rip = self.st.reg_read(X.UC_X86_REG_RIP)
        # the fill saw only the page; Unicorn kept the exact faulting address
        exact = invalid_addr(self.uc)
        off = exact & 0xFFF if exact is not None and exact & ~0xFFF == self._fault_page else 0
        if isinstance(f, NestedFault):
            gpa = f.gpa | off if f.exitinfo1 & PFErr.FINAL else f.gpa
            insn = self.insn_bytes(rip)
            self._vmexit(ExitCode.NPF, f.exitinfo1, gpa, rip=rip, nrip=0, insn=insn)
            self._after_exit_outside(rip)
        elif isinstance(f, GuestPageFault):
            self._exception_outside(Vec.PF, f.error_code, rip, cr2=f.address | off)
        elif isinstance(f, GuestGP):
            self._exception_outside(Vec.GP, 0, rip)
        elif isinstance(f, GuestException):          # SEV-SNP #VC raised by the memory system
            self._exception_outside(f.vector, f.error_code, rip)

    def _exception_outside(self, vec: int, err: int | None, rip: int, cr2: int | None = None) -> None:
        self.raise_exception(vec, err, rip, cr2)
        if self._exit is None and self._stop is None:
            self._entry_rip = self.st.reg_read(X.UC_X86_REG_RIP)

    def _after_exit_outside(self, rip: int) -> None:
        self._after_exit_in_hook(rip)
        if self._stop is None:
            self._entry_rip = self.st.reg_read(X.UC_X86_REG_RIP)

    # ------------------------------------------------------ state transfer
    _SNAP_FIELDS = ("CR0", "CR3", "CR4", "EFER", "CR2", "DR6", "DR7")

    def _snapshot_vmcb(self) -> bytes:
        b = self._vmcb_hpa
        mv = self.mem.view
        return bytes(mv[b + 0x400:b + 0x4A0]) + bytes(mv[b + 0x4C8:b + 0x4D8]) + bytes(mv[b + 0x540:b + 0x570]) \
            + bytes(mv[b + 0x640:b + 0x648])

    def _enter(self, in_hook: bool) -> bool:
        """VMRUN's checks and guest-state load; False after VMEXIT_INVALID."""
        self.ext.before_vmrun(self)
        mv = self.mem.view
        b = self._vmcb_hpa
        if in_hook and self._fast_ok and not self._vmcb_written:
            # Re-entry after an exit whose handler touched only RAX/RSP/RIP
            # (never-cached fields, APM §15.15.3): everything else was checked and
            # loaded at the last VMRUN and is still what the processor holds.
            rip = _Q.unpack_from(mv, b + 0x578)[0]
            rsp = _Q.unpack_from(mv, b + 0x5D8)[0]
            rax = _Q.unpack_from(mv, b + 0x5F8)[0]
            o_rax, o_rsp = self._saved_regs
            st = self.st
            if self._snap_valid and (st.dirty or rax != o_rax or rsp != o_rsp):
                if rax != o_rax:              # the snapshot is current: patch and store once
                    st.set_gpr(0, rax)
                if rsp != o_rsp:
                    st.set_gpr(4, rsp)
                st.store()
            else:
                if st.dirty:
                    st.store()
                if rax != o_rax:
                    st.reg_write(X.UC_X86_REG_RAX, rax)
                if rsp != o_rsp:
                    st.reg_write(X.UC_X86_REG_RSP, rsp)
            self._snap_valid = False
            if mv[b + 0x5C] or self.tlb.mode is TlbMode.FLUSH_ON_SWITCH:
                self._tlb_control(mv[b + 0x5C])      # TLB_CONTROL acts on every VMRUN
            if self._xmod_pages:
                self._xmod_commit()      # after the flush: it refills through current translations
            self.gif = True
            self._entry_rip = rip
            return True
        self._fast_ok = False
        self.flush_guest_state()
        if self.st.dirty:
            self.st.store()
        self._snap_valid = False
        ivec = struct.unpack_from("<6I", mv, b)
        cr4, cr3, cr0, dr7, dr6, rflags, rip = struct.unpack_from("<7Q", mv, b + 0x548)
        efer = struct.unpack_from("<Q", mv, b + 0x4D0)[0]
        rsp = struct.unpack_from("<Q", mv, b + 0x5D8)[0]
        rax = struct.unpack_from("<Q", mv, b + 0x5F8)[0]
        asid = struct.unpack_from("<I", mv, b + 0x58)[0]
        tlb_ctl = mv[b + 0x5C]
        npc = struct.unpack_from("<Q", mv, b + 0x90)[0]
        n_cr3 = struct.unpack_from("<Q", mv, b + 0xB0)[0]
        iopm = struct.unpack_from("<Q", mv, b + 0x40)[0] & ~0xFFF
        msrpm = struct.unpack_from("<Q", mv, b + 0x48)[0] & ~0xFFF
        eventinj = struct.unpack_from("<Q", mv, b + 0xA8)[0]
        cs_attr = struct.unpack_from("<H", mv, b + 0x412)[0]
        # SEV first: an SEV-ES guest's state comes from its VMSA (APM §15.35.8)
        why = self.ext.vmrun_check(self, asid, npc) or self._consistency(ivec, cr0, cr3, cr4, efer, dr6, dr7, asid, npc, n_cr3, iopm, msrpm,
                                       eventinj, cs_attr)
        if why:
            # VMEXIT_INVALID: no guest state was loaded and no instruction runs
            self._invalid_reason = why
            struct.pack_into("<QQQ", mv, b + 0x70, ExitCode.INVALID, 0, 0)
            self.exit_count += 1
            self._exit = ExitRecord(int(ExitCode.INVALID), 0, 0, 0, rip, 0, b"", self.exit_count)
            self._exit_resumable = True
            return False
        # host state goes to VM_HSAVE_PA (format is implementation-specific)
        self.gif = True
        self._ivec = ivec
        self._iopm_hpa, self._msrpm_hpa = iopm, msrpm
        np_on = bool(npc & NpControl.NP_ENABLE)
        # Unicorn's soft TLB is untagged: empty it whenever the translation
        # context changes; the ASID-tagged model behind it keeps its entries.
        flush = asid != self._asid or np_on != self._np or (np_on and n_cr3 != self._n_cr3)
        self._np, self._n_cr3, self._asid = np_on, n_cr3 & 0x000F_FFFF_FFFF_F000, asid
        self.tsc_offset = struct.unpack_from("<Q", mv, b + 0x50)[0]
        snap = self._snapshot_vmcb()
        st = self.st
        if snap != self._loaded:
            # full load of control and segment state (first run, or the hypervisor changed it)
            st.reg_write(X.UC_X86_REG_CR0, cr0)
            st.reg_write(X.UC_X86_REG_CR4, cr4)
            self.uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, efer & ~EFER_SVME))
            st.reg_write(X.UC_X86_REG_CR3, cr3)
            st.reg_write(X.UC_X86_REG_CR2, struct.unpack_from("<Q", mv, b + 0x640)[0])
            st.reg_write(X.UC_X86_REG_DR6, dr6)
            st.reg_write(X.UC_X86_REG_DR7, dr7)
            st.load()
            if bool(st.efer & EFER_LMA) != bool(efer & EFER_LMA):
                st.set_lma(bool(efer & EFER_LMA))    # e.g. a legacy-mode guest after a long-mode one
            for name in ("ES", "CS", "SS", "DS"):
                st.set_seg(SEG_INDEX[name], *_get_seg(mv, b + SEGMENTS[name]))
            for name in ("GDTR", "IDTR"):
                _, base, limit, _ = _get_seg(mv, b + SEGMENTS[name])
                st.set_dtable(name, base, limit)
            cpl = mv[b + 0x4CB]
            if not cr0 & 1:
                cpl = 0
            st.set_cpl(cpl)
            st.store()
            self._loaded = snap
            flush = True
        st.reg_write(X.UC_X86_REG_RAX, rax)
        st.reg_write(X.UC_X86_REG_RSP, rsp)
        st.reg_write(X.UC_X86_REG_RFLAGS, rflags)
        self._entry_rip = rip
        if not in_hook:
            st.reg_write(X.UC_X86_REG_RIP, rip)
        if tlb_ctl or self.tlb.mode is TlbMode.FLUSH_ON_SWITCH:
            self._tlb_control(tlb_ctl)
        elif flush:
            self.flush_tlb()
        if self._xmod_pages:
            self._xmod_commit()          # after the flush: it refills through current translations
        self._arm_scanner()
        # event injection (APM §15.20)
        if not eventinj & Event.VALID and not struct.unpack_from("<Q", mv, b + 0x60)[0] & VIntr.V_IRQ:
            self._fast_ok = True
        defer, self._defer_dispatch = self._defer_dispatch, True
        try:
            self._entry_events(eventinj, ivec, rip, rflags)
        finally:
            self._defer_dispatch = defer
        return self._exit is None and self._stop is None

    def _entry_events(self, eventinj: int, ivec: tuple[int, ...], rip: int, rflags: int) -> None:
        """EVENTINJ (APM §15.20) and a pending virtual interrupt (§15.21.4) at VMRUN.
        An exit raised while delivering them is left in ``self._exit``."""
        mv = self.mem.view
        b = self._vmcb_hpa
        st = self.st
        if eventinj & Event.VALID:
            ev = Event.decode(eventinj)
            struct.pack_into("<Q", mv, b + 0xA8, eventinj & ~Event.VALID)
            st.reg_write(X.UC_X86_REG_RIP, rip)
            self._deliver_in_hook(ev.vector, ev.error_code, software=(ev.type == EventType.SOFT_INT),
                                  rip_after=rip, fault_rip=rip, external=(ev.type == EventType.INTR),
                                  etype=int(ev.type))
            if self._exit is None and self._stop is None:
                self._entry_rip = st.reg_read(X.UC_X86_REG_RIP)
        elif self._virq_deliverable(rflags) and not struct.unpack_from("<Q", mv, b + 0x68)[0] & 1:
            if ivec[3] >> 4 & 1:       # VINTR intercept
                self._vmexit(ExitCode.VINTR, 0, 0, rip=rip, nrip=0)
                self._after_exit_in_hook(rip)
                return
            st.reg_write(X.UC_X86_REG_RIP, rip)
            self._inject_virq()
            if self._exit is None and self._stop is None:
                self._entry_rip = st.reg_read(X.UC_X86_REG_RIP)

    def _virq_deliverable(self, rflags: int) -> bool:
        """V_IRQ pending, IF set, and its priority beats V_TPR unless V_IGN_TPR (§15.21.4)."""
        v = _Q.unpack_from(self.mem.view, self._vmcb_hpa + 0x60)[0]
        if not v & VIntr.V_IRQ or not rflags & RFLAGS_IF:
            return False
        return bool(v & VIntr.V_IGN_TPR) or ((v >> 16) & 0xF) > (v & 0xF)

    def _consistency(self, ivec, cr0, cr3, cr4, efer, dr6, dr7, asid, npc, n_cr3, iopm, msrpm, eventinj,
                     cs_attr) -> str:
        """APM §15.5.1 "Canonicalization and Consistency Checks"; '' when legal."""
        if not efer & EFER_SVME:
            return "guest EFER.SVME is zero"
        if not cr0 & (1 << 30) and cr0 & (1 << 29):
            return "CR0.CD = 0 and CR0.NW = 1"
        if cr0 & CR0_RESERVED:
            return "CR0[63:32] is not zero"
        if cr3 & CR3_LONG_MBZ and efer & EFER_LMA:
            return "CR3 MBZ bits set"
        if cr4 & CR4_RESERVED:
            return "CR4 MBZ bits set"
        if dr6 & DR6_RESERVED:
            return "DR6[63:32] is not zero"
        if dr7 & DR7_RESERVED:
            return "DR7[63:32] is not zero"
        if efer & EFER_RESERVED:
            return "EFER MBZ bits set"
        lme_pg = efer & EFER_LME and cr0 & (1 << 31)
        if lme_pg and not cr4 & (1 << 5):
            return "EFER.LME and CR0.PG with CR4.PAE = 0"
        if lme_pg and not cr0 & 1:
            return "EFER.LME and CR0.PG with CR0.PE = 0"
        if lme_pg and cs_attr & 0x200 and cs_attr & 0x400:
            return "EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D all set"
        if not ivec[4] & 1:
            return "the VMRUN intercept bit is clear"
        if asid == 0:
            return "ASID is zero"
        if ivec[3] >> 28 & 1 and msrpm + 0x2000 > self.mem.size:
            return "MSRPM extends past the end of physical memory"
        if ivec[3] >> 27 & 1 and iopm + 0x3000 > self.mem.size:
            return "IOPM extends past the end of physical memory"
        if npc & NpControl.NP_ENABLE and n_cr3 & 0xFFF0_0000_0000_0000:
            return "N_CR3 MBZ bits set"
        if eventinj & Event.VALID:
            ty = (eventinj >> 8) & 7
            vec = eventinj & 0xFF
            if ty not in (0, 2, 3, 4):
                return "EVENTINJ TYPE is reserved"
            if ty == 3 and (vec == 2 or vec > 31):
                return "EVENTINJ injects a non-exception vector as an exception"
            if ty == 3 and vec in (4, 5) and efer & EFER_LMA:
                return "EVENTINJ injects #OF/#BR in 64-bit mode"
        return ""

    # ------------------------------------------------------------ utilities
    def _tlb_control(self, tlb_ctl: int) -> None:
        """VMRUN carries out TLB_CONTROL (APM §15.16.2, Table 15-11); in
        pre-ASID mode every world switch flushes everything."""
        if self.tlb.mode is TlbMode.FLUSH_ON_SWITCH or tlb_ctl == TlbControl.FLUSH_ALL:
            self.tlb.flush_all()
        elif tlb_ctl == TlbControl.FLUSH_ASID:
            self.tlb.flush_asid(self._asid)
        elif tlb_ctl == TlbControl.FLUSH_ASID_LOCAL:
            self.tlb.flush_asid(self._asid, keep_global=True)
        elif tlb_ctl:
            self.tlb.flush_all()          # reserved encodings: the safe superset
        self.flush_tlb()
        self.tlb_control_done = bool(tlb_ctl)

    def invlpga(self, va: int, asid: int) -> None:
        """INVLPGA: rAX = the virtual page, ECX = the ASID whose translation
        goes (APM §15.16.3); the hypervisor's way to drop one guest page."""
        self.tlb.flush_page(asid, va & ~0xFFF)
        if asid == self._asid:
            self.flush_tlb()

    def flush_tlb(self) -> None:
        """Empty Unicorn's soft TLB, the untagged cache in front of :attr:`tlb`."""
        self.uc.ctl(UCC.UC_CTL_TLB_FLUSH, UCC.UC_CTL_IO_WRITE)
        self._fetch_map.clear()

    def take_vmexit(self, code: int, info1: int, info2: int, *, rip: int, nrip: int) -> None:
        """#VMEXIT from inside the guest run (an extension's intercept or an
        instruction it emulates): save the state, then hand the exit to the
        hypervisor; the guest resumes or the run stops as it decides."""
        self._vmexit(code, info1, info2, rip=rip, nrip=nrip)
        self._after_exit_in_hook(rip)

    def require_full_vmrun(self) -> None:
        """Make the next VMRUN take every check and reload the whole VMCB."""
        self._fast_ok = False

    @property
    def vmcb_hpa(self) -> int:
        """Host-physical address of the VMCB of the current (or last) VMRUN."""
        return self._vmcb_hpa

    @property
    def iopm_hpa(self) -> int:
        return self._iopm_hpa

    @property
    def msrpm_hpa(self) -> int:
        return self._msrpm_hpa


class _IdentityNested(NestedLayer):
    """NP_ENABLE = 0: guest-physical is host-physical (no nested translation)."""

    def __init__(self, mem: HostMemory, stats: WalkStats) -> None:
        super().__init__(mem, 0, stats)

    def translate(self, gpa: int, access: int, *, final: bool = True, set_ad: bool = True) -> WalkResult:
        if gpa + 1 > self._size:
            raise NestedFault(int(PFErr.U | (PFErr.FINAL if final else PFErr.PT_WALK)), gpa)
        return WalkResult(phys=gpa, writable=True, user=True, executable=True, dirty=True)


class _GuestView:
    """Adapter the intercept decision reads the guest through."""

    __slots__ = ("cpu", "st", "cpl", "intercepts", "_rflags")

    def __init__(self, cpu: SvmCpu, st: CpuState) -> None:
        self.cpu, self.st = cpu, st
        self.cpl = st.cpl
        self.intercepts = cpu._ivec
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
        return bool(self.cpu.mem.view[self.cpu._vmcb_hpa + 0x4D1] & (EFER_SVME >> 8))

    def iopm_bit(self, port: int) -> bool:
        return bool(self.cpu.mem.view[self.cpu._iopm_hpa + (port >> 3)] >> (port & 7) & 1)

    def msrpm_byte(self, off: int) -> int:
        return self.cpu.mem.view[self.cpu._msrpm_hpa + off]

    def seg_base(self, idx: int) -> int:
        return self.st.seg(idx)[1]

    def io_allowed_by_tss(self, port: int, size: int) -> bool:
        sel, base, limit, _ = self.st.tr()
        try:
            acc = self.cpu._guest_access()
            if limit < 0x67:
                return False
            iomap = struct.unpack("<H", acc.read(base + 0x66, 2))[0]
            if iomap + (port >> 3) + 1 > limit:
                return False
            bits = int.from_bytes(acc.read(base + iomap + (port >> 3), 2), "little")
            return not (bits >> (port & 7)) & ((1 << size) - 1)
        except (GuestPageFault, NestedFault, GuestGP):
            return False
