"""An independent model of VMRUN's verdict on a VMCB: VMEXIT_INVALID or entry.

Written from the APM (vol. 2 §15.5.1 "Canonicalization and Consistency
Checks", §15.20 "Event Injection", §15.25.3, §15.34), not from the sandbox's
``svm/consistency.py``: the masks are spelled out here from the register
figures of vol. 2 ch. 3, and the rules are one table, each with its source.

The APM leaves some outcomes to the implementation; the model says so
(:attr:`Verdict.unspecified`) instead of guessing, and the fuzzer does not
compare those states:

* CR4 bits of features this processor does not offer (LA57, PCIDE, SMEP,
  SMAP, PKE, CET, PKS, FSGSBASE): "reserved" only when CPUID says the
  feature is absent -- a property of the processor, not of §15.5.1;
* EFER bits 15:13 (TCE, FFXSR, LMSLE) and 7:1 (reserved, read as zero): the
  figure marks them feature-dependent / RAZ, not MBZ;
* an IOPM or MSRPM that ends beyond the machine's DRAM but below
  2^MAXPHYADDR: legal per §15.5.1, but there is no memory to read it from;
* EVENTINJ exception #OF / #BR in 64-bit mode: §15.20 lists no such rule
  (Bochs enters), the sandbox rejects it;
* AVIC enable on a processor without AVIC (CPUID Fn8000_000A_EDX[13] = 0);
* EFER.LMA differing from EFER.LME & CR0.PG: VMRUN loads EFER as given.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .vmrun_state import PHYS_BITS, VmrunState

# bits, from the APM's register figures (vol. 2 §3.1, Figures 3-1..3-8, §13.1.1)
CR0_PE, CR0_NW, CR0_CD, CR0_PG = 1 << 0, 1 << 29, 1 << 30, 1 << 31
CR0_MBZ = ((1 << 64) - 1) ^ ((1 << 32) - 1)                 # CR0[63:32]
CR3_LONG_MBZ = ((1 << 64) - 1) ^ ((1 << 52) - 1)            # long-mode CR3[63:52]
CR4_PAE = 1 << 5
#: CR4 bits no AMD64 processor defines: 63:25, 19, 15:13 (Figure 3-7)
CR4_MBZ = (((1 << 64) - 1) ^ ((1 << 25) - 1)) | 1 << 19 | 0b111 << 13
#: CR4 bits of features this processor model does not report in CPUID
CR4_FEATURE = 1 << 12 | 1 << 16 | 1 << 17 | 1 << 20 | 1 << 21 | 1 << 22 | 1 << 23 | 1 << 24
DR_HIGH = CR0_MBZ                                           # DR6[63:32], DR7[63:32]
EFER_SVME, EFER_LME, EFER_LMA = 1 << 12, 1 << 8, 1 << 10
EFER_MBZ = (((1 << 64) - 1) ^ ((1 << 16) - 1)) | 1 << 9     # EFER[63:16], EFER[9] (Figure 3-8)
EFER_FEATURE_OR_RAZ = 0b111 << 13 | 0b1111111 << 1
CS_L, CS_D = 1 << 9, 1 << 10                                # VMCB segment attrib: L and D/B
VMRUN_BIT, IOIO_BIT, MSR_BIT = 0x80, 0x7B, 0x7C
IOPM_BYTES, MSRPM_BYTES = 0x3000, 0x2000                    # §15.10.1, §15.11
NP_ENABLE, SEV_ENABLE, SEV_ES_ENABLE = 1, 2, 4
AVIC_ENABLE = 1 << 31                                        # V_INTR (060h) bit 31, §15.29.3
EVENT_VALID, EVENT_EV = 1 << 31, 1 << 11
TYPE_INTR, TYPE_NMI, TYPE_EXCEPTION, TYPE_SOFT = 0, 2, 3, 4


@dataclass
class Verdict:
    """The model's answer: the rules the state breaks, and what the APM leaves open."""
    violations: list[str] = field(default_factory=list)
    unspecified: list[str] = field(default_factory=list)

    @property
    def expect_invalid(self) -> bool | None:
        """True: VMEXIT_INVALID; False: the guest is entered; None: either is allowed."""
        if self.violations:
            return True
        return None if self.unspecified else False


def _bit(words: list[int], b: int) -> bool:
    return bool(words[b >> 5] >> (b & 31) & 1)


def _table_rule(v: Verdict, name: str, base: int, size: int, dram: int) -> None:
    """§15.5.1: "the MSR or IOIO intercept tables extend to a physical address that is
    greater than or equal to the maximum supported physical address" (bits 11:0 ignored)."""
    start = base & ~0xFFF
    last = start + size - 1
    if last >= 1 << PHYS_BITS:
        v.violations.append(f"{name} extends to or beyond 2^{PHYS_BITS}")
    elif last >= dram:
        v.unspecified.append(f"{name} lies beyond the machine's DRAM (below 2^{PHYS_BITS}: nothing to read)")


def verdict(s: VmrunState, dram: int, sev_supported: bool = False) -> Verdict:
    """What VMRUN of ``s`` must do, on a machine with ``dram`` bytes of DRAM.
    ``s.iopm_base`` / ``s.msrpm_base`` are the effective addresses."""
    v = Verdict()
    bad = v.violations.append
    long_mode = bool(s.efer & EFER_LME and s.cr0 & CR0_PG)       # §14.6.1: LMA = LME & PG
    if not s.efer & EFER_SVME:
        bad("EFER.SVME is zero")
    if s.cr0 & CR0_NW and not s.cr0 & CR0_CD:
        bad("CR0.CD is zero and CR0.NW is set")
    if s.cr0 & CR0_MBZ:
        bad("CR0[63:32] are not zero")
    if long_mode and s.cr3 & CR3_LONG_MBZ:
        bad("an MBZ bit of CR3 (long mode, 63:52) is set")
    elif s.cr0 & CR0_PG and s.cr3 >> PHYS_BITS:
        # bits 51:MAXPHYADDR (long mode) or 63:MAXPHYADDR (legacy paging): the figures call
        # them reserved, not MBZ; KVM (kvm_vcpu_is_legal_cr3) and kvm-unit-tests' svm_pae /
        # svm_pse tests expect VMEXIT_INVALID, the APM's §15.5.1 list does not say
        v.unspecified.append("CR3 sets bits at or beyond MAXPHYADDR in a paging mode")
    if s.cr4 & CR4_MBZ:
        bad("an MBZ bit of CR4 is set")
    if s.cr4 & CR4_FEATURE:
        v.unspecified.append("CR4 sets a bit of a feature this processor does not report")
    if s.dr6 & DR_HIGH:
        bad("DR6[63:32] are not zero")
    if s.dr7 & DR_HIGH:
        bad("DR7[63:32] are not zero")
    if s.efer & EFER_MBZ:
        bad("an MBZ bit of EFER is set")
    if s.efer & EFER_FEATURE_OR_RAZ:
        v.unspecified.append("EFER sets a feature-dependent or read-as-zero bit")
    if bool(s.efer & EFER_LMA) != long_mode:
        v.unspecified.append("EFER.LMA differs from EFER.LME & CR0.PG")
    if long_mode and not s.cr4 & CR4_PAE:
        bad("EFER.LME and CR0.PG are set and CR4.PAE is zero")
    if long_mode and not s.cr0 & CR0_PE:
        bad("EFER.LME and CR0.PG are set and CR0.PE is zero")
    if long_mode and s.cr4 & CR4_PAE and s.cs_attr & CS_L and s.cs_attr & CS_D:
        bad("EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D are all set")
    if not _bit(s.intercepts, VMRUN_BIT):
        bad("the VMRUN intercept bit is clear")
    _table_rule(v, "the MSRPM", s.msrpm_base, MSRPM_BYTES, dram)
    _table_rule(v, "the IOPM", s.iopm_base, IOPM_BYTES, dram)
    if s.asid == 0:
        bad("ASID is zero")
    _event_rules(v, s, long_mode)
    _np_sev_avic_rules(v, s, sev_supported)
    return v


def _event_rules(v: Verdict, s: VmrunState, long_mode: bool) -> None:
    """§15.20: reserved TYPE values, and TYPE 3 with a vector that is not an exception."""
    ev = s.eventinj
    if not ev & EVENT_VALID:
        return                                                   # V = 0: the field is ignored
    ty, vec = ev >> 8 & 7, ev & 0xFF
    if ty not in (TYPE_INTR, TYPE_NMI, TYPE_EXCEPTION, TYPE_SOFT):
        v.violations.append(f"EVENTINJ TYPE {ty} is reserved")
    elif ty == TYPE_EXCEPTION and (vec == 2 or vec >= 32):
        v.violations.append(f"EVENTINJ TYPE 3 (exception) with vector {vec}, which is not an exception")
    elif ty == TYPE_EXCEPTION and vec in (4, 5) and long_mode and s.cs_attr & CS_L:
        v.unspecified.append("EVENTINJ injects #OF/#BR in 64-bit mode")


def _np_sev_avic_rules(v: Verdict, s: VmrunState, sev_supported: bool) -> None:
    if s.np_control & NP_ENABLE and s.n_cr3 & CR3_LONG_MBZ:
        v.violations.append("an MBZ bit of N_CR3 is set")                 # §15.25.3
    if s.np_control & (SEV_ENABLE | SEV_ES_ENABLE) and not sev_supported:
        v.violations.append("SEV enabled in the VMCB on a processor without SEV")   # §15.34.3
    if s.np_control & SEV_ES_ENABLE and not s.np_control & SEV_ENABLE:
        v.violations.append("SEV-ES enabled without SEV")                  # §15.35.2
    if s.v_intr & AVIC_ENABLE:
        v.unspecified.append("AVIC enabled on a processor that does not offer AVIC")


#: EVENTINJ types whose vector field the processor uses as given (§15.20: an NMI is vector 2)
def delivered_vector(eventinj: int) -> int:
    """The IDT vector an injected event is delivered through (§15.20: "if TYPE is 2 (NMI),
    the VECTOR field is ignored")."""
    return 2 if (eventinj >> 8 & 7) == TYPE_NMI else eventinj & 0xFF


def pushes_error_code(eventinj: int) -> bool:
    """§15.20: EV set means the processor pushes ERRORCODE (EVENTINJ[63:32])."""
    return bool(eventinj & EVENT_EV)
