"""``sandbox fuzz --target vmrun``: run VMRUN on generated VMCB states and judge it.

:class:`VmrunHarness` prepares one machine (a 64-bit guest whose first
instruction is a HLT the HLT intercept stops before it runs, every exception
intercepted, an IDT whose vector ``v`` leads to a HLT at ``HANDLERS + v``),
snapshots it, and per state writes the VMCB, runs VMRUN and restores.  What
the processor did is judged by:

* the rule model (:mod:`.vmrun_model`, written from the APM): VMEXIT_INVALID
  exactly when a §15.5.1 / §15.20 rule is broken;
* for states that enter, the state the first #VMEXIT saved (no guest
  instruction ran before it) must be the state the VMCB held: the guest
  state VMRUN loaded;
* for an EVENTINJ in 64-bit mode, the handler of the described vector ran
  first, with the error code (EV) and the VMCB's RIP on its stack, or the
  exit that interrupted the delivery carries the event in EXITINTINFO;
* robustness (no Python exception, no internal error) and isolation (no host
  page outside guest RAM, the VMCB and the nested tables changed).

:mod:`.vmrun_qemu` runs the same state under Unicorn's bundled QEMU SVM.
"""
from __future__ import annotations

import struct
import traceback
from dataclasses import dataclass, field, replace

from ..hypervisor.machine import Machine
from ..memory.hostmem import PAGE_SIZE
from ..svm.exitcodes import ExitCode, exit_name, is_excp
from ..svm.stop import StopReason
from ..svm.vmcb import Segment
from .oracle import Finding
from .vmrun_model import delivered_vector, pushes_error_code, verdict
from .vmrun_state import ENTRY, HANDLERS, IDT_BASE, VmrunState

HLT = 0xF4
CS_SEL = 0x08
MAX_INSNS = 64
#: what #VMEXIT saves that VMRUN loaded: VMCB accessor name -> VmrunState field
ROUND_TRIP = (("CR0", "cr0"), ("CR3", "cr3"), ("CR4", "cr4"), ("EFER", "efer"), ("DR6", "dr6"),
              ("DR7", "dr7"), ("RFLAGS", "rflags"), ("RSP", "rsp"), ("RAX", "rax"))


def idt_gate(offset: int, selector: int = CS_SEL) -> bytes:
    """A 64-bit interrupt gate, present, DPL 3 (vol. 2 §4.8.4, Figure 4-24)."""
    return struct.pack("<HHBBHII", offset & 0xFFFF, selector, 0, 0xEE, offset >> 16 & 0xFFFF, offset >> 32, 0)


def guest_image() -> list[tuple[int, bytes]]:
    """(GPA, bytes) the guest needs: the HLT at ENTRY, the IDT and its HLT handlers."""
    idt = b"".join(idt_gate(HANDLERS + v) for v in range(256))
    return [(ENTRY, bytes([HLT])), (IDT_BASE, idt), (HANDLERS, bytes([HLT]) * 256)]


@dataclass
class VmrunOutcome:
    """What one VMRUN did."""
    invalid: bool = False
    reason: str = ""                       # the sandbox's VMEXIT_INVALID reason
    first: object = None                   # the first ExitRecord, if any
    saved: dict = field(default_factory=dict)   # VMCB state-save fields after the run
    stack: bytes = b""                     # 48 bytes at the saved RSP (an event's frame)
    result: object = None
    crash: str = ""
    isolation: list[str] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)   # (kind, message) a harness adds


class VmrunHarness:
    """One machine, prepared once, restored after every VMRUN."""

    def __init__(self, dram: int = 4 << 20, ram: int = 2 << 20) -> None:
        self.m = m = Machine(dram=dram, ram=ram)
        g = m.guest
        g.setup_long_mode(ENTRY)
        for gpa, data in guest_image():
            g.write_phys(gpa, data)
        v = g.vmcb
        v.set_seg("IDTR", Segment(0, 0, 256 * 16 - 1, IDT_BASE))
        m.handlers = {}                      # every exit stops the run, untouched by a handler
        self.dram = dram
        self.own_iopm, self.own_msrpm, self.own_ncr3 = v.IOPM_BASE_PA, v.MSRPM_BASE_PA, v.N_CR3
        self.cpu = m.cpu
        self.mm = m.mem.raw
        guest_pages = set(g.ram.values())
        fixed = {g.iopm.hpa + i * PAGE_SIZE for i in range(3)} | {g.msrpm.hpa + i * PAGE_SIZE for i in range(2)}
        fixed |= {self.cpu.vm_hsave_pa, g.vmcb_hpa}
        self.pages = sorted(m.mem.pages())
        npt = set(self.pages) - guest_pages - fixed
        self.allowed = frozenset(guest_pages | npt | {g.vmcb_hpa, self.cpu.vm_hsave_pa})
        self._base = bytes(self.mm)
        self._ctx = self.cpu.uc.context_save()
        self._first: list = []
        m.on_exit_record = lambda rec: self._first.append(rec) if not self._first else None

    def resolve(self, s: VmrunState) -> VmrunState:
        """The state with the harness's own table and nested-table addresses filled in
        where ``s`` leaves them 0 (bits 11:0 kept: VMRUN ignores them)."""
        def own(val: int, mine: int) -> int:
            return (mine | val) if val & ~0xFFF == 0 else val
        return replace(s, iopm_base=own(s.iopm_base, self.own_iopm), msrpm_base=own(s.msrpm_base, self.own_msrpm),
                       n_cr3=self.own_ncr3 if s.n_cr3 == 0 else s.n_cr3)

    def write(self, s: VmrunState) -> None:
        """Write a resolved state into the guest's VMCB."""
        m = self.m
        m.mem.sync = None
        v = m.guest.vmcb
        v.EFER, v.CR0, v.CR3, v.CR4 = s.efer, s.cr0, s.cr3, s.cr4
        v.DR6, v.DR7, v.RFLAGS, v.RIP, v.RSP, v.RAX = s.dr6, s.dr7, s.rflags, s.rip, s.rsp, s.rax
        cs = v.seg("CS")
        v.set_seg("CS", Segment(CS_SEL, s.cs_attr, cs.limit, cs.base))
        v.CPL, v.GUEST_ASID = s.cpl, s.asid
        for i, w in enumerate(s.intercepts):
            for b in range(32):
                v.set_intercept(i * 32 + b, bool(w >> b & 1))
        v.IOPM_BASE_PA, v.MSRPM_BASE_PA = s.iopm_base, s.msrpm_base
        v.EVENTINJ, v.NP_CONTROL, v.N_CR3, v.V_INTR = s.eventinj, s.np_control, s.n_cr3, s.v_intr
        v.AVIC_BACKING_PAGE, v.AVIC_LOGICAL_TABLE, v.AVIC_PHYSICAL_TABLE = (s.avic_backing, s.avic_logical,
                                                                           s.avic_physical)
        cpu = self.cpu
        cpu.reset_translation_caches()
        cpu.gif = True
        cpu.tlb.flush_all()

    def run(self, s: VmrunState) -> VmrunOutcome:
        """VMRUN of the resolved state ``s``; the machine is restored afterwards."""
        out = VmrunOutcome()
        self._first.clear()
        m = self.m
        m.counts = {}
        self.cpu.exit_count = 0
        try:
            self.write(s)
            out.result = r = m.run(max_insns=MAX_INSNS, timeout=5.0, max_exits=1)
            if r.reason == StopReason.ERROR and ("internal error" in r.detail or "emulation error" in r.detail):
                out.crash = r.detail
            first = out.first = self._first[0] if self._first else None
            out.invalid = first is not None and first.exitcode == ExitCode.INVALID
            out.reason = self.cpu.invalid_reason if out.invalid else ""
            v = m.guest.vmcb
            out.saved = {name: getattr(v, name) for name, _ in ROUND_TRIP}
            out.saved["CS_ATTR"] = v.seg("CS").attrib
            out.saved["EXITINTINFO"] = v.EXITINTINFO
            rsp = out.saved["RSP"]
            if first is not None and not out.invalid and ENTRY - 0x20000 < rsp < ENTRY:
                out.stack = m.guest.read_phys(rsp, 48)
        except Exception as e:             # robustness: nothing may escape the processor or Machine.run
            tb = traceback.extract_tb(e.__traceback__)[-1]
            out.crash = f"exception escaped VMRUN: {type(e).__name__}: {e} ({tb.filename}:{tb.lineno})"
        out.isolation = self.restore()
        return out

    def restore(self) -> list[str]:
        mm, base, bad = self.mm, self._base, []
        for p in self.pages:
            if mm[p:p + PAGE_SIZE] != base[p:p + PAGE_SIZE]:
                if p not in self.allowed:
                    bad.append(f"host page {p:#x} outside the guest's memory, VMCB and tables changed")
                mm[p:p + PAGE_SIZE] = base[p:p + PAGE_SIZE]
        self.cpu.uc.context_restore(self._ctx)
        return bad


def long64(s: VmrunState) -> bool:
    """The guest starts in 64-bit mode: EFER.LME, LMA, CR0.PG, PE, CR4.PAE and CS.L, not CS.D."""
    return (s.efer & 0x500 == 0x500 and s.cr0 & 0x8000_0001 == 0x8000_0001 and s.cr4 & 0x20
            and s.cs_attr & 0x600 == 0x200)


def judge(s: VmrunState, out: VmrunOutcome, dram: int) -> list[Finding]:
    """Every oracle on one VMRUN of the resolved state ``s``."""
    fs: list[Finding] = []
    if out.crash:
        fs.append(Finding("crash", out.crash))
    fs += [Finding("isolation", msg) for msg in out.isolation]
    fs += [Finding(kind, msg) for kind, msg in out.notes]
    if out.crash or out.first is None:
        return fs
    want = verdict(s, dram).expect_invalid
    if want is True and not out.invalid:
        fs.append(Finding("vmrun-model", f"entered although {verdict(s, dram).violations[0]}"))
    elif want is False and out.invalid:
        fs.append(Finding("vmrun-model", f"VMEXIT_INVALID for a legal state ({out.reason})"))
    if not out.invalid:
        fs += _loaded_state(s, out) + _event(s, out)
    return fs


def _no_insn_ran(s: VmrunState, out: VmrunOutcome) -> bool:
    """The first exit came before any guest instruction or event delivery changed state."""
    e = out.first
    return e.rip == s.rip and not s.eventinj & (1 << 31) and (e.exitcode == ExitCode.HLT or is_excp(e.exitcode))


def _loaded_state(s: VmrunState, out: VmrunOutcome) -> list[Finding]:
    """APM §15.5.1 / §15.6: VMRUN loads these from the VMCB and #VMEXIT saves them back."""
    if not _no_insn_ran(s, out):
        return []
    bad = [f"{name} {getattr(s, attr):#x} -> {out.saved[name]:#x}"
           for name, attr in ROUND_TRIP if out.saved[name] != getattr(s, attr)]
    if out.saved["CS_ATTR"] != s.cs_attr:
        bad.append(f"CS.attrib {s.cs_attr:#x} -> {out.saved['CS_ATTR']:#x}")
    return [Finding("vmrun-state", f"guest state not loaded as the VMCB holds it: {m}") for m in bad]


def _event(s: VmrunState, out: VmrunOutcome) -> list[Finding]:
    """APM §15.20: the guest takes the injected event before its first instruction."""
    ev = s.eventinj
    if not ev & (1 << 31) or not long64(s):
        return []
    e, vec = out.first, delivered_vector(ev)
    if e.exitcode == ExitCode.HLT and e.rip == s.rip:
        return [Finding("vmrun-event", f"EVENTINJ {ev & 0xFFFF_FFFF:#x} was not delivered")]
    if e.exitcode == ExitCode.HLT and HANDLERS <= e.rip < HANDLERS + 256:
        got = e.rip - HANDLERS
        if got != vec:
            return [Finding("vmrun-event", f"EVENTINJ type {ev >> 8 & 7}: delivered through vector {got:#x}, "
                                           f"the fields describe {vec:#x}")]
        frame = out.stack
        words = struct.unpack("<6Q", frame) if len(frame) == 48 else ()
        if not words:
            return []
        if pushes_error_code(ev):
            if words[0] & 0xFFFF_FFFF != ev >> 32:
                return [Finding("vmrun-event", f"EVENTINJ error code {ev >> 32:#x} pushed as {words[0]:#x}")]
            words = words[1:]
        elif words[0] != s.rip:
            return [Finding("vmrun-event", f"EVENTINJ type {ev >> 8 & 7} vector {vec:#x}: return RIP "
                                           f"{words[0]:#x} on the stack, the VMCB's RIP is {s.rip:#x}")]
        return []
    info = out.saved["EXITINTINFO"]
    if (is_excp(e.exitcode) or e.exitcode == ExitCode.NPF) and info & (1 << 31):
        if info & 0xFF != vec or (info >> 8 & 7) != (ev >> 8 & 7):
            return [Finding("vmrun-event", f"EXITINTINFO {info & 0xFFFF_FFFF:#x} after {exit_name(e.exitcode)} "
                                           f"does not describe the injected event {ev & 0xFFFF_FFFF:#x}")]
    return []

