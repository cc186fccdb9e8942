"""gdb ``monitor`` commands on a real machine: break-exit, vmcb, exits, npt, walk.

Each command reads the machine the way the hypervisor can: the VMCB in host
memory, the exit counts, and the page tables, walked here by hand with every
table reference shown (``walk`` reads each guest entry at its GPA through a
nested walk of its own, as the processor's 2-D walk does, APM §15.25.5). The
walks set no Accessed/Dirty bits and are not counted in the run's figures.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..memory.paging import Access, PFErr, walk
from ..svm.exitcodes import ExitCode, exit_name
from .gdbstub import MonitorError, MonitorRegistry, parse_int

if TYPE_CHECKING:
    from .target import MachineTarget

_LEVELS = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
_VMCB_CONTROL = ("INTERCEPT_CR", "INTERCEPT_DR", "INTERCEPT_EXCEPTIONS", "INTERCEPT_MISC1", "INTERCEPT_MISC2",
                 "INTERCEPT_MISC3", "IOPM_BASE_PA", "MSRPM_BASE_PA", "TSC_OFFSET", "GUEST_ASID", "TLB_CONTROL",
                 "V_INTR", "INTERRUPT_SHADOW", "EXITCODE", "EXITINFO1", "EXITINFO2", "EXITINTINFO",
                 "NP_CONTROL", "EVENTINJ", "N_CR3", "NRIP")
_VMCB_STATE = ("CPL", "EFER", "CR0", "CR2", "CR3", "CR4", "DR6", "DR7", "RFLAGS", "RIP", "RSP", "RAX")


class _Recorder:
    """A table reader for :func:`walk` that keeps every entry it reads."""

    def __init__(self, read) -> None:
        self.read, self.refs = read, []

    def __call__(self, addr: int) -> int:
        v = self.read(addr)
        self.refs.append((addr, v))
        return v


def _no_write(addr: int, value: int) -> None:     # the monitor's walks leave A/D bits alone
    pass


def exit_code_of(name: str) -> int:
    """An exit by APM name (``CPUID``, ``VMEXIT_CPUID``, ``cpuid``) or number."""
    t = name.strip().upper().removeprefix("VMEXIT_")
    try:
        return int(t, 0)
    except ValueError:
        pass
    try:
        return int(ExitCode[t])
    except KeyError:
        raise ValueError(f"unknown exit {name.strip()!r}") from None


class MachineMonitor:
    """The standard monitor commands over a :class:`~.target.MachineTarget`'s machine."""

    def __init__(self, t: "MachineTarget") -> None:
        self.t, self.m = t, t.m
        self._nested_refs = 0

    def registry(self) -> MonitorRegistry:
        reg = MonitorRegistry()
        reg.bind("break-exit", self.break_exit,
                 "break-exit NAME|CODE [off]  stop after a #VMEXIT of this kind is handled (APM name, e.g. "
                 "CPUID, or code); 'break-exit' alone lists them")
        reg.bind("vmcb", self.vmcb)
        reg.bind("exits", self.exits)
        reg.bind("npt", self.npt)
        reg.bind("walk", self.walk)
        return reg

    # -- reading the machine ------------------------------------------------------------
    def _read_host(self, hpa: int) -> int:
        if hpa + 8 > self.m.mem.size:
            raise LookupError(hpa)
        return int.from_bytes(self.m.mem.read(hpa, 8), "little")

    def _nested(self, gpa: int, indent: str = "  ") -> tuple[int | None, list[str]]:
        """GPA -> HPA through the NPT, with each entry read; (None, lines) on a fault."""
        v = self.m.guest.vmcb
        if not v.NP_CONTROL & 1:
            return gpa, [f"{indent}nested paging off: HPA = GPA {gpa:#x}"]
        rec = _Recorder(self._read_host)
        r = walk(v.N_CR3, gpa, Access.READ, True, rec, _no_write, set_ad=False)
        self._nested_refs += len(rec.refs)
        lines = [f"{indent}N_CR3 {v.N_CR3:#x}"]
        for i, (addr, val) in enumerate(rec.refs):
            lines.append(f"{indent}{_LEVELS[4 - i]} @HPA {addr:#x} = {val:#018x}")
        if r.fault is not None:
            lines.append(f"{indent}-> nested page fault (error code {r.fault | PFErr.FINAL:#x})")
            return None, lines
        lines.append(f"{indent}-> HPA {r.phys:#x} ({r.page_size >> 10} KiB page, "
                     f"{'writable' if r.writable else 'read-only'}, {'exec' if r.executable else 'no-exec'})")
        return r.phys, lines

    # -- the commands ----------------------------------------------------------------------
    def break_exit(self, args: str) -> str:
        words = args.split()
        if not words:
            armed = sorted(self.t.break_exits)
            return "stopping at: " + (", ".join(exit_name(c) for c in armed) if armed else "no exit")
        try:
            code = exit_code_of(words[0])
        except ValueError as e:
            raise MonitorError(str(e)) from None
        on = not (len(words) > 1 and words[1].lower() in ("off", "no", "0"))
        self.t.break_on_exit(code, on)
        return (f"will stop at #VMEXIT {exit_name(code)} ({code:#x}), after its handler" if on
                else f"no longer stopping at #VMEXIT {exit_name(code)}")

    def vmcb(self, args: str) -> str:
        v = self.m.guest.vmcb
        lines = [f"VMCB at HPA {self.m.guest.vmcb_hpa:#x}", "control area:"]
        lines += [f"  {n:<22}{getattr(v, n):#x}" for n in _VMCB_CONTROL]
        lines.append(f"  {'':<22}(last exit: {exit_name(v.EXITCODE)})")
        lines.append("state-save area:")
        for s in ("CS", "SS", "DS", "ES", "FS", "GS", "GDTR", "IDTR", "LDTR", "TR"):
            seg = v.seg(s)
            lines.append(f"  {s:<6}selector {seg.selector:#06x} attrib {seg.attrib:#05x} "
                         f"limit {seg.limit:#x} base {seg.base:#x}")
        lines += [f"  {n:<22}{getattr(v, n):#x}" for n in _VMCB_STATE]
        return "\n".join(lines)

    def exits(self, args: str) -> str:
        t = self.t
        if not t.counts:
            return "no #VMEXITs yet"
        lines = [f"  {code:#06x} {exit_name(code):<16}{n}" for code, n in sorted(t.counts.items())]
        return "\n".join([f"{t.exits} #VMEXITs:"] + lines)

    def npt(self, args: str) -> str:
        if not args.strip():
            raise MonitorError("needs a guest-physical address, e.g. monitor npt 0x100000")
        gpa = parse_int(args)
        _, lines = self._nested(gpa)
        return "\n".join([f"nested walk of GPA {gpa:#x}:"] + lines)

    def walk(self, args: str) -> str:
        if not args.strip():
            raise MonitorError("needs a guest-virtual address, e.g. monitor walk 0x100000")
        gva = parse_int(args)
        v = self.m.guest.vmcb
        if not v.CR0 & (1 << 31):
            _, lines = self._nested(gva)
            return "\n".join([f"paging off: GVA {gva:#x} = GPA", *lines])
        out = [f"2-D walk of GVA {gva:#x} (guest CR3 {v.CR3:#x}); each guest entry is a GPA, read "
               f"through a nested walk:"]
        self._nested_refs = 0
        per_read: list[list[str]] = []

        def read_guest(gpa: int) -> int:
            hpa, lines = self._nested(gpa, "      ")
            per_read.append(lines)
            if hpa is None:
                raise LookupError(gpa)
            return self._read_host(hpa)

        rec = _Recorder(read_guest)
        try:
            r = walk(v.CR3, gva, Access.READ, False, rec, _no_write, set_ad=False)
        except LookupError:
            for lines in per_read:
                out.extend(lines)
            return "\n".join(out + ["-> the walk faults in the nested tables (VMEXIT_NPF)"])
        for i, ((gpa, val), lines) in enumerate(zip(rec.refs, per_read)):
            out.append(f"  {_LEVELS[4 - i]} @GPA {gpa:#x} = {val:#018x}")
            out.extend(lines)
        if r.fault is not None:
            return "\n".join(out + [f"-> guest #PF (error code {r.fault:#x})"])
        out.append(f"  final GPA {r.phys:#x}:")
        hpa, lines = self._nested(r.phys, "      ")
        out.extend(lines)
        out.append(f"-> GVA {gva:#x} = GPA {r.phys:#x} = HPA {hpa:#x}" if hpa is not None else
                   f"-> GVA {gva:#x} = GPA {r.phys:#x}, not mapped in the NPT (VMEXIT_NPF)")
        out.append(f"   {len(rec.refs)} guest entries + {self._nested_refs} nested entries read "
                   f"= {len(rec.refs) + self._nested_refs} table references")
        return "\n".join(out)


def bind_monitor(t: "MachineTarget") -> MonitorRegistry:
    """The standard monitor commands, bound to ``t``'s machine."""
    return MachineMonitor(t).registry()
