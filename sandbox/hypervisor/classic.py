"""Classic trap-and-emulate: the guest kernel deprivileged to ring 3, no SVM
instruction intercepts, privileged instructions emulated from their faults.

This is the pre-VT/AMD-V monitor of Popek and Goldberg's theorem (seed 000,
"The Classical Dream and its Flaw"; seed 002, "The Illusionist's
Dilemma"), built from the sandbox's parts without touching the processor:

* **Deprivileging** (:meth:`ClassicMonitor.attach`, after ``m.load``): the
  guest runs at CPL 3 on the monitor's own descriptor tables -- a GDT page
  holding a copy of the guest's descriptors (verbatim, DPL 0 included) and,
  at its end, the monitor's ring-3 code and data descriptors, which the
  guest's CS and SS really are.  Its virtual CPU state (CPL 0, IF, CR0,
  CR2, CR4, GDTR, IDTR, LDTR, TR) lives in :class:`VirtualCpu`.
* **Memory** goes through the existing shadow paging
  (``Machine(paging="shadow")``); the classic shadow walks the guest's
  tables as a supervisor access (its virtual CPL is 0) and maps every page
  user-accessible, since the real CPL is 3 (:class:`ClassicShadow`).
* **Traps**: every SVM instruction intercept is cleared (VMRUN's own bit
  stays: VMRUN refuses a VMCB without it) and every exception is
  intercepted.  A privileged instruction at CPL 3 raises #GP (VMMCALL
  without its intercept, #UD); the monitor decodes it at the faulting RIP
  and emulates it against the virtual state: CLI/STI (virtual IF), HLT,
  MOV to/from CR0/2/3/4/8, CLTS, LMSW, LGDT/LIDT/LLDT/LTR, IN/OUT,
  RDMSR/WRMSR, INVLPG, WBINVD/INVD, and VMMCALL as the hypercall.
  Emulated port I/O, MSRs, INVLPG and hypercalls go to the machine's
  ordinary handlers (``m.handlers``), so devices and hooks work unchanged.

What it cannot do is the point: sensitive instructions that do not fault
at CPL 3 (SGDT, SIDT, SLDT, STR, SMSW, PUSHF/POPF's IF, LAR, LSL, VERR,
VERW, the RPL of CS and SS) run natively and show the guest the monitor's
state, not its own -- ``sandbox experiment popek-goldberg`` measures it.

Limits: an exception the guest itself should handle (a #PF its own tables
raise, a #GP that is not a privileged instruction, #UD, #BP ...) would have
to be delivered through the guest's *virtual* IDT at a virtual CPL change;
the monitor does not do that, and stops the run naming the exception.
Segment-register loads, SYSCALL/SYSRET, IRET to a virtual CPL and guest
writes to its GDT after LGDT are not emulated either.
"""
from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone import x86_const as CX

from ..memory.hostmem import PAGE_SIZE
from ..svm.cpu import ExitRecord
from ..svm.exitcodes import ExitCode, excp
from ..svm.iopm import IoioInfo
from ..svm.stop import StopReason
from ..svm.vmcb import Segment
from .handlers import RESUME, Action
from .shadow import ShadowPager

if TYPE_CHECKING:
    from .machine import Machine

#: the monitor's descriptor-table page (guest-physical; the guest must leave it alone)
MONITOR_GDT = 0xFF000
#: the monitor's ring-3 code and data descriptors, at the end of its GDT page
MON_CS, MON_DS = 0xFF0, 0xFF8
RING3_CODE = 0x00AFFB000000FFFF        # 64-bit code, DPL 3
RING3_DATA = 0x00CFF3000000FFFF        # data, writable, DPL 3
CS3_ATTRIB, DS3_ATTRIB = 0x2FB, 0xCF3  # their VMCB attributes (type, S, DPL 3, P, L / D/B, G)
RFLAGS_IF = 1 << 9
CR0_TS = 1 << 3
M64 = (1 << 64) - 1

_cs = Cs(CS_ARCH_X86, CS_MODE_64)
_cs.detail = True


@dataclass
class VirtualCpu:
    """What the guest kernel believes its processor holds."""
    cpl: int = 0
    if_: bool = False
    cr0: int = 0
    cr2: int = 0
    cr4: int = 0
    cr8: int = 0
    gdtr: tuple[int, int] = (0, 0)     # (base, limit)
    idtr: tuple[int, int] = (0, 0)
    ldtr: int = 0
    tr: int = 0


class ClassicShadow(ShadowPager):
    """Shadow paging for a guest kernel that really runs at CPL 3: its
    accesses are walked in its tables as supervisor accesses, and the
    shadow entries are user-accessible."""

    def on_page_fault(self, m: "Machine", e: ExitRecord) -> Action | None:
        # the fault's U/S bit says CPL 3; the guest's own view is its virtual CPL 0
        return super().on_page_fault(m, dataclasses.replace(e, exitinfo1=e.exitinfo1 & ~0x4))

    def _install(self, gva: int, gpa: int, r) -> None:
        writable = r.writable and r.dirty and (gpa not in self.protected or gpa in self._unsynced)
        self._builder.map(gva & ~(PAGE_SIZE - 1) & M64, self.guest.ram[gpa], write=writable, user=True,
                          execute=r.executable)
        if writable:
            self._writable.add(gpa)

    def _reflect(self, e: ExitRecord, err: int) -> Action | None:
        return self.m.stop(StopReason.SHADOW_ERROR, f"the guest's own #PF at {e.exitinfo2:#x} (error {err:#x}): "
                                                    "classic mode does not deliver exceptions to the virtual IDT")


def _reg64(name: str) -> tuple[str, int]:
    """capstone register name -> (64-bit register, width in bits)."""
    legacy = {"al": ("rax", 8), "ax": ("rax", 16), "eax": ("rax", 32), "cl": ("rcx", 8), "cx": ("rcx", 16),
              "ecx": ("rcx", 32), "dl": ("rdx", 8), "dx": ("rdx", 16), "edx": ("rdx", 32), "bl": ("rbx", 8),
              "bx": ("rbx", 16), "ebx": ("rbx", 32), "si": ("rsi", 16), "esi": ("rsi", 32), "di": ("rdi", 16),
              "edi": ("rdi", 32), "bp": ("rbp", 16), "ebp": ("rbp", 32), "sp": ("rsp", 16), "esp": ("rsp", 32)}
    if name in legacy:
        return legacy[name]
    if name.startswith("r") and name[1:].isdigit():
        return name, 64
    for suffix, width in (("d", 32), ("w", 16), ("b", 8)):
        if name.startswith("r") and name.endswith(suffix) and name[1:-1].isdigit():
            return name[:-1], width
    return name, 64


class ClassicMonitor:
    """A trap-and-emulate monitor for ``m``'s guest (see the module docstring)."""

    def __init__(self, m: "Machine") -> None:
        if m.shadow is None:
            raise ValueError("classic mode needs shadow paging: Machine(paging='shadow')")
        self.m = m
        self.virtual = VirtualCpu()
        #: emulated instructions by mnemonic
        self.emulated: dict[str, int] = {}
        #: (RIP, vector) of every exception that reached the monitor
        self.traps: list[tuple[int, int]] = []

    # -- set-up -------------------------------------------------------------------
    def attach(self) -> "ClassicMonitor":
        """Deprivilege the loaded guest: virtual state from the VMCB, the
        guest at CPL 3 on the monitor's tables, intercepts for classic mode."""
        m, v = self.m, self.m.guest.vmcb
        gdtr, idtr = v.seg("GDTR"), v.seg("IDTR")
        self.virtual = VirtualCpu(cpl=0, if_=bool(v.RFLAGS & RFLAGS_IF), cr0=v.CR0, cr2=v.CR2, cr4=v.CR4,
                                  gdtr=(gdtr.base, gdtr.limit), idtr=(idtr.base, idtr.limit))
        old = m.shadow
        m.shadow = ClassicShadow(m)
        m.shadow.attach_cr3(old.guest_cr3)
        self._build_gdt()
        v.set_seg("CS", Segment(MON_CS | 3, CS3_ATTRIB, 0xFFFFFFFF, 0))
        for s in ("SS", "DS", "ES"):
            v.set_seg(s, Segment(MON_DS | 3, DS3_ATTRIB, 0xFFFFFFFF, 0))
        v.set_seg("GDTR", Segment(0, 0, PAGE_SIZE - 1, MONITOR_GDT))
        v.set_seg("IDTR", Segment(0, 0, 0, 0))             # every exception exits before delivery
        v.CPL = 3
        v.RFLAGS = (v.RFLAGS | RFLAGS_IF) & ~(3 << 12)      # the real IF stays set; IOPL 0
        for bit in range(6 * 32):                           # no instruction intercepts at all ...
            v.set_intercept(bit, False)
        for bit in (ExitCode.VMRUN, ExitCode.SHUTDOWN):     # ... but VMRUN's (required) and shutdown
            v.set_intercept(bit)
        v.INTERCEPT_EXCEPTIONS = 0xFFFF_FFFF                # every exception is a trap to the monitor
        if m.cpu.timer_period:
            v.set_intercept(ExitCode.INTR)
        for vec in range(32):
            m.handlers[excp(vec)] = self.on_exception
        m.handlers[ExitCode.EXCP_PF] = m.shadow.on_page_fault
        return self

    def _build_gdt(self) -> None:
        """The monitor's GDT: the guest's descriptors copied verbatim, its own at the end."""
        g = self.m.guest
        base, limit = self.virtual.gdtr
        n = min(limit + 1, MON_CS)
        try:
            copy = self.m.read_virt(base, n) if n > 0 else b""
        except Exception:                    # a GDTR pointing nowhere: an empty copy
            copy = b""
        page = bytearray(PAGE_SIZE)
        page[:len(copy)] = copy
        struct.pack_into("<QQ", page, MON_CS, RING3_CODE, RING3_DATA)
        g.write_phys(MONITOR_GDT, bytes(page))

    # -- traps ----------------------------------------------------------------------
    def on_exception(self, m: "Machine", e: ExitRecord) -> Action | None:
        vec = e.exitcode - excp(0)
        self.traps.append((e.rip, vec))
        if vec == 13 or vec == 6:
            code = m.read_virt(e.rip, 15)
            insn = next(_cs.disasm(code, e.rip, 1), None)
            if insn is not None:
                act = self.emulate(insn, e)
                if act is not None:
                    return act
        return m.stop(StopReason.UNHANDLED_EXIT,
                      f"classic mode: exception {vec} at {e.rip:#x} is the guest's own; delivery through its "
                      "virtual IDT is not modelled")

    def _next(self, insn) -> int:
        return insn.address + insn.size

    def _done(self, insn) -> Action:
        self.emulated[insn.mnemonic] = self.emulated.get(insn.mnemonic, 0) + 1
        self.m.guest.vmcb.RIP = self._next(insn)
        return RESUME

    def _get(self, reg: str) -> int:
        r, width = _reg64(reg)
        return getattr(self.m.regs, r) & ((1 << width) - 1)

    def _set(self, reg: str, value: int) -> None:
        r, width = _reg64(reg)
        if width >= 32:
            setattr(self.m.regs, r, value & ((1 << width) - 1))
        else:
            old = getattr(self.m.regs, r)
            mask = (1 << width) - 1
            setattr(self.m.regs, r, (old & ~mask) | (value & mask))

    def _ea(self, insn, op) -> int:
        mem = op.mem
        ea = mem.disp
        if mem.base == CX.X86_REG_RIP:
            ea += self._next(insn)
        elif mem.base:
            ea += self._get(insn.reg_name(mem.base))
        if mem.index:
            ea += self._get(insn.reg_name(mem.index)) * mem.scale
        return ea & M64

    def _operand16(self, insn) -> int:
        op = insn.operands[0]
        if op.type == CX.X86_OP_REG:
            return self._get(insn.reg_name(op.reg)) & 0xFFFF
        return int.from_bytes(self.m.read_virt(self._ea(insn, op), 2), "little")

    def _forward(self, code: int, insn, exitinfo1: int = 0, exitinfo2: int = 0) -> Action:
        """Hand an emulated instruction to the machine's ordinary handler for ``code``."""
        rec = ExitRecord(code, exitinfo1, exitinfo2, 0, insn.address, self._next(insn), bytes(insn.bytes))
        self.emulated[insn.mnemonic] = self.emulated.get(insn.mnemonic, 0) + 1
        return self.m.handlers[code](self.m, rec) or RESUME

    def emulate(self, insn, e: ExitRecord) -> Action | None:
        """Emulate a privileged instruction the deprivileged kernel executed;
        None when it is not one the monitor knows."""
        v, mn, ops = self.virtual, insn.mnemonic, insn.operands
        if mn == "cli":
            v.if_ = False
        elif mn == "sti":
            v.if_ = True
        elif mn == "hlt":
            self._done(insn)
            return self.m.stop(StopReason.HALT, f"guest executed HLT at {insn.address:#x}")
        elif mn in ("lgdt", "lidt"):
            raw = self.m.read_virt(self._ea(insn, ops[0]), 10)
            limit, base = struct.unpack("<HQ", raw)
            if mn == "lgdt":
                v.gdtr = (base, limit)
                self._build_gdt()
            else:
                v.idtr = (base, limit)
        elif mn == "lldt":
            v.ldtr = self._operand16(insn)
        elif mn == "ltr":
            v.tr = self._operand16(insn)
        elif mn == "clts":
            v.cr0 &= ~CR0_TS
        elif mn == "lmsw":
            v.cr0 = (v.cr0 & ~0xE) | (self._operand16(insn) & 0xF) | (v.cr0 & 1)
        elif mn == "mov" and len(ops) == 2 and ops[0].type == CX.X86_OP_REG and ops[1].type == CX.X86_OP_REG \
                and (insn.reg_name(ops[0].reg).startswith("cr") or insn.reg_name(ops[1].reg).startswith("cr")):
            dst, src = insn.reg_name(ops[0].reg), insn.reg_name(ops[1].reg)
            if dst.startswith("cr"):
                self._write_cr(int(dst[2:]), self._get(src))
            else:
                self._set(dst, self._read_cr(int(src[2:])))
        elif mn in ("in", "out"):
            port_op, data_op = (ops[1], ops[0]) if mn == "in" else (ops[0], ops[1])
            port = port_op.imm if port_op.type == CX.X86_OP_IMM else self._get("dx")
            size = _reg64(insn.reg_name(data_op.reg))[1] // 8
            info = IoioInfo.encode(port & 0xFFFF, size, mn == "in")
            return self._forward(ExitCode.IOIO, insn, info, self._next(insn))
        elif mn in ("rdmsr", "wrmsr"):
            return self._forward(ExitCode.MSR, insn, int(mn == "wrmsr"))
        elif mn == "invlpg":
            return self._forward(ExitCode.INVLPG, insn, self._ea(insn, ops[0]))
        elif mn in ("wbinvd", "invd"):
            pass
        elif insn.bytes[:3] == b"\x0f\x01\xd9":                 # VMMCALL: #UD without its intercept
            return self._forward(ExitCode.VMMCALL, insn)
        else:
            return None
        return self._done(insn)

    def _read_cr(self, n: int) -> int:
        v = self.virtual
        if n == 3:
            return self.m.shadow.guest_cr3
        return {0: v.cr0, 2: v.cr2, 4: v.cr4, 8: v.cr8}[n]

    def _write_cr(self, n: int, value: int) -> None:
        v = self.virtual
        if n == 0:
            v.cr0 = value
        elif n == 2:
            v.cr2 = value
        elif n == 3:
            self.m.shadow.stats.cr3_writes += 1
            self.m.shadow.attach_cr3(value & 0x000F_FFFF_FFFF_F018)
        elif n == 4:
            v.cr4 = value
        elif n == 8:
            v.cr8 = value & 0xF
