"""``sandbox fuzz --target vmrun-nested``: the VMRUN generator through nested SVM.

As NecoFuzz does, the fuzzed VMCB is VMCB12: an L1 guest hypervisor (a
``Machine(nested=True)`` guest) sets EFER.SVME and VM_HSAVE_PA and executes
VMRUN on a VMCB in its own memory that holds the generated state.  L0 (the
sandbox's ``hypervisor/nested.py``) intercepts that VMRUN, checks VMCB12,
builds VMCB02 and runs L2; L2's first event (the HLT at the entry point, an
exception, an injected event's handler) is reflected to L1 as a #VMEXIT
into VMCB12.  The outcome -- VMEXIT_INVALID in VMCB12, or the reflected exit
and the L2 state saved there -- is judged by the same oracles as a direct
VMRUN (:func:`~sandbox.fuzz.vmrun_target.judge`), with L1's RAM as the
physical memory the tables must lie in.  A VMCB12 that L0 accepts but whose
VMCB02 the processor then refuses is a finding of its own: L1 would never
see its VMRUN complete.

L2 runs without nested paging of its own (L2 physical = L1 physical), on
L1's identity tables and the harness's IDT and HLTs, which L1's memory holds
at the same addresses as the direct harness.
"""
from __future__ import annotations

import traceback
from dataclasses import replace

from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from ..hypervisor.machine import Machine
from ..svm.exitcodes import ExitCode
from ..svm.stop import StopReason
from ..svm.vmcb import VMCB, Segment
from .vmrun_qemu import vmcb_bytes
from .vmrun_state import ENTRY, VmrunState
from .vmrun_target import ROUND_TRIP, VmrunOutcome, guest_image

L1_CODE = 0x110000
VMCB12, HSAVE12 = 0x1E0000, 0x1E1000
IOPM12, MSRPM12 = 0x1E2000, 0x1E5000
#: EXITCODE written into VMCB12 before the run: still there means no #VMEXIT reached L1
NO_EXIT = 0xDEAD
MAX_EXITS = 32


def l1_code() -> bytes:
    src = f"""
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x1000
    wrmsr
    mov ecx, 0xC0010117
    mov eax, {HSAVE12:#x}
    xor edx, edx
    wrmsr
    mov rax, {VMCB12:#x}
    .byte 0x0f, 0x01, 0xd8
    hlt
    """
    enc, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(src, L1_CODE)
    return bytes(enc)


_L1_CODE: bytes | None = None


class NestedVmrunHarness:
    """An L1 guest hypervisor that VMRUNs the state under test (a fresh machine per state:
    nested SVM keeps L1's SVM state in Python objects a memory snapshot would not restore)."""

    def __init__(self, ram: int = 2 << 20) -> None:
        self.ram = ram
        self.dram = ram                    # the physical memory VMCB12's tables must lie in: L1's RAM

    def resolve(self, s: VmrunState) -> VmrunState:
        """L1-physical table addresses where ``s`` leaves them 0; nested paging for L2 only
        when the state perturbs N_CR3 (L2 otherwise runs on L1's physical memory)."""
        def own(val: int, mine: int) -> int:
            return (mine | val) if val & ~0xFFF == 0 else val
        np = (s.np_control & ~1) | (1 if s.n_cr3 else 0)
        return replace(s, iopm_base=own(s.iopm_base, IOPM12), msrpm_base=own(s.msrpm_base, MSRPM12), np_control=np)

    def _machine(self, s: VmrunState) -> tuple[Machine, int]:
        global _L1_CODE
        if _L1_CODE is None:
            _L1_CODE = l1_code()
        m = Machine(dram=8 << 20, ram=self.ram, nested=True)
        g = m.guest
        g.setup_long_mode(L1_CODE)
        for gpa, data in guest_image():
            g.write_phys(gpa, data)
        g.write_phys(L1_CODE, _L1_CODE)
        g.write_phys(VMCB12, vmcb_bytes(s))
        v12 = VMCB(m.mem, g.gpa_to_hpa(VMCB12))
        v12.NP_CONTROL, v12.N_CR3 = s.np_control, s.n_cr3
        v12.AVIC_BACKING_PAGE, v12.AVIC_LOGICAL_TABLE, v12.AVIC_PHYSICAL_TABLE = (s.avic_backing, s.avic_logical,
                                                                                  s.avic_physical)
        v12.EXITCODE = NO_EXIT
        cs = v12.seg("CS")
        v12.set_seg("CS", Segment(cs.selector, s.cs_attr, cs.limit, cs.base))
        return m, g.gpa_to_hpa(VMCB12)

    def run(self, s: VmrunState) -> VmrunOutcome:
        out = VmrunOutcome()
        try:
            m, hpa12 = self._machine(s)
            out.result = r = m.run(max_insns=512, timeout=5.0, max_exits=MAX_EXITS)
            if r.reason == StopReason.ERROR and ("internal error" in r.detail or "emulation error" in r.detail):
                out.crash = r.detail
            v12 = VMCB(m.mem, hpa12)
            code = v12.EXITCODE
            if code == NO_EXIT:
                if r.reason == StopReason.INVALID_VMCB:
                    out.notes.append(("vmrun-nested", f"L0 accepted VMCB12 but the processor refused VMCB02 "
                                                      f"({r.detail}): L1's VMRUN never completes"))
                return out
            out.invalid = code == ExitCode.INVALID
            out.reason = getattr(m.nested, "invalid_reason", "") if out.invalid else ""
            out.first = _Reflected(code, v12.RIP, v12.EXITINFO1)
            out.saved = {name: getattr(v12, name) for name, _ in ROUND_TRIP}
            out.saved["CS_ATTR"] = v12.seg("CS").attrib
            out.saved["EXITINTINFO"] = v12.EXITINTINFO
            rsp = out.saved["RSP"]
            if not out.invalid and ENTRY - 0x20000 < rsp < ENTRY:
                out.stack = m.guest.read_phys(rsp, 48)
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)[-1]
            out.crash = f"exception escaped the nested VMRUN: {type(e).__name__}: {e} ({tb.filename}:{tb.lineno})"
        return out


class _Reflected:
    """The #VMEXIT L1 saw in VMCB12, shaped as the oracles read an exit."""

    def __init__(self, exitcode: int, rip: int, exitinfo1: int) -> None:
        self.exitcode, self.rip, self.exitinfo1 = exitcode, rip, exitinfo1

