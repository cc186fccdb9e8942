"""Every path by which the guest writes processor state either loads a value
VMRUN would accept or raises the architectural exception -- with the path's
intercept clear (the processor model and Unicorn execute it) and armed (the
default hypervisor handles the exit: it re-executes the instruction, or
emulates it as for WRMSR, as KVM does).

Each row of TABLE is one path and one value: the instruction, the expected
outcome from the manual (AMD APM vol. 2/3, section cited; KVM's behaviour
where the APM leaves a choice) and, for a value that loads, what the state
must hold afterwards.  After the write the guest makes a hypercall whose
handler touches the VMCB, which forces the next VMRUN to take every
consistency check of APM §15.5.1 on the state the guest left: a value that
should have faulted but loaded ends the run as invalid-vmcb.

Exceptions are reported by the conftest stubs: the run ends with EXIT(0x100 +
vector), RDX = the pushed RIP for vectors with an error code, RSI otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from conftest import BASE, VMMCALL, assemble, hc_exit, install_reporting_idt

DONE = 0x55
FULL_VMRUN = 0x77          # hypercall number whose handler dirties the VMCB
GP, UD = "gp", "ud"


@dataclass
class Row:
    id: str
    pre: str                  # setup
    insn: str                 # the state write under test
    arm: str                  # the intercept of the path ("" if none)
    exit: int | None          # its exit code (APM Table C-1)
    expect: str               # GP, UD, or "ok"
    apm: str                  # where the manual says so
    check: Callable | None = None     # for "ok": (machine) -> None, on the state after the run


def vmcb(field: str, value: int) -> Callable:
    def check(m):
        assert getattr(m.guest.vmcb, field) == value, f"{field} = {getattr(m.guest.vmcb, field):#x}, want {value:#x}"
    return check


def reg(name: str, value: int) -> Callable:
    def check(m):
        got = getattr(m.regs, name)
        assert got == value, f"{name} = {got:#x}, want {value:#x}"
    return check


TABLE = [
    # -- MOV DRn (APM vol. 3 "MOV DRn"; vol. 2 §13.1.1: DR6/DR7 bits 63:32 MBZ) -----------------
    Row("mov-dr6-bit32", "mov rax, 0x100000000", "mov dr6, rax", "dr6_write", 0x36, GP, "vol. 3 MOV DRn; vol. 2 §13.1.1"),
    Row("mov-dr6-bit63", "mov rax, 0x8000000000000000", "mov dr6, rax", "dr6_write", 0x36, GP, "vol. 2 §13.1.1"),
    Row("mov-dr4-alias-bit32", "mov rax, 0x100000000", "mov dr4, rax", "dr4_write", 0x34, GP,
        "vol. 2 §13.1.1: DR4 is DR6 while CR4.DE = 0"),
    Row("mov-dr7-bit32", "mov rax, 0x100000400", "mov dr7, rax", "dr7_write", 0x37, GP, "vol. 3 MOV DRn; vol. 2 §13.1.1"),
    Row("mov-dr5-alias-bit63", "mov rax, 0x8000000000000400", "mov dr5, rax", "dr5_write", 0x35, GP,
        "vol. 2 §13.1.1: DR5 is DR7 while CR4.DE = 0"),
    Row("mov-dr7-low-bits", "mov rax, 0xffffffff", "mov dr7, rax", "dr7_write", 0x37, "ok",
        "vol. 2 §13.1.1: bits 31:0 load; VMRUN checks 63:32 only", check=lambda m: _dr_upper_clear(m)),
    Row("mov-dr6-low-bits", "mov rax, 0xffffffff", "mov dr6, rax", "dr6_write", 0x36, "ok",
        "vol. 2 §13.1.1", check=lambda m: _dr_upper_clear(m)),
    Row("mov-dr0-any", "mov rax, 0x8000000000000000", "mov dr0, rax", "dr0_write", 0x30, "ok",
        "vol. 2 §13.1.1: DR0-DR3 hold any 64-bit address"),
    Row("mov-dr4-with-cr4-de", "mov rax, cr4\nor rax, 8\nmov cr4, rax\nxor eax, eax", "mov dr4, rax",
        "dr4_write", 0x34, UD, "vol. 3 MOV DRn: DR4/DR5 are #UD while CR4.DE = 1"),
]


def _wrmsr(msr: int, value: int, rmw: bool = False) -> tuple[str, str]:
    """(setup, insn) for WRMSR of ``value`` to ``msr`` (or of EFER | value when ``rmw``)."""
    if rmw:
        return (f"mov ecx, {msr:#x}\nrdmsr\nor eax, {value & 0xFFFFFFFF:#x}\nor edx, {value >> 32:#x}", "wrmsr")
    return (f"mov ecx, {msr:#x}\nmov eax, {value & 0xFFFFFFFF:#x}\nmov edx, {value >> 32:#x}", "wrmsr")


def _msr_row(id_: str, msr: int, value: int, expect: str, apm: str, check=None, rmw=False) -> Row:
    pre, insn = _wrmsr(msr, value, rmw)
    return Row(id_, pre, insn, "msr", 0x7C, expect, apm, check)


EFER, PAT, APIC_BASE, TSC_AUX, VM_HSAVE_PA = 0xC0000080, 0x277, 0x1B, 0xC0000103, 0xC0010117
NONCANONICAL = 0x0000_8000_0000_0000
TABLE += [
    # -- WRMSR EFER (vol. 2 §3.1.7; VMRUN MBZ bits §15.5.1): the processor implements SCE, LME,
    #    LMA (read-only), NXE, SVME (CPUID Fn8000_0001); KVM's efer_reserved_bits ------------------
    _msr_row("efer-mbz-bit9", EFER, 1 << 9, GP, "vol. 2 §3.1.7: bit 9 MBZ", rmw=True),
    _msr_row("efer-mbz-bit16", EFER, 1 << 16, GP, "vol. 2 §3.1.7: bits 63:16 MBZ", rmw=True),
    _msr_row("efer-mbz-bit63", EFER, 1 << 63, GP, "vol. 2 §3.1.7: bits 63:16 MBZ", rmw=True),
    _msr_row("efer-ffxsr-not-implemented", EFER, 1 << 14, GP,
             "vol. 2 §3.1.7: FFXSR absent from CPUID Fn8000_0001_EDX[25]", rmw=True),
    Row("efer-clear-lme-with-paging", "mov ecx, 0xc0000080\nrdmsr\nand eax, 0xfffffeff", "wrmsr", "msr", 0x7C, GP,
        "vol. 2 §14.6.1: LME changes only while paging is off"),
    Row("efer-lma-is-read-only", "mov ecx, 0xc0000080\nrdmsr\nand eax, 0xfffffbff", "wrmsr", "msr", 0x7C, "ok",
        "vol. 2 §3.1.7: LMA is read-only", check=lambda m: _efer_has(m, 0x500)),
    _msr_row("efer-set-sce", EFER, 1, "ok", "vol. 2 §3.1.7", check=lambda m: _efer_has(m, 0x501), rmw=True),
    # -- WRMSR PAT (vol. 2 §7.8.1: encodings 2 and 3 reserved) -----------------------------------
    _msr_row("pat-type-2", PAT, 0x0007040600070402, GP, "vol. 2 §7.8.1"),
    _msr_row("pat-type-3-in-pa7", PAT, 0x0307040600070406, GP, "vol. 2 §7.8.1"),
    _msr_row("pat-type-8", PAT, 0x0007040600070408, GP, "vol. 2 §7.8.1"),
    _msr_row("pat-default", PAT, 0x0007040600070406, "ok", "vol. 2 §7.8.1"),
    # -- WRMSR APIC_BASE (vol. 2 §16.3.1; KVM kvm_apic_set_base) --------------------------------
    _msr_row("apic-base-bit9", APIC_BASE, 0xFEE00B00, GP, "vol. 2 §16.3.1: bit 9 reserved"),
    _msr_row("apic-base-x2apic", APIC_BASE, 0xFEE00D00, GP, "x2APIC (bit 10) absent: CPUID Fn0000_0001_ECX[21] = 0"),
    _msr_row("apic-base-beyond-maxphyaddr", APIC_BASE, (1 << 48) | 0xFEE00900, GP,
             "vol. 2 §16.3.1: base within MAXPHYADDR (48, CPUID Fn8000_0008)"),
    _msr_row("apic-base-default", APIC_BASE, 0xFEE00900, "ok", "vol. 2 §16.3.1"),
    # -- WRMSR TSC_AUX: AMD ignores bits 63:32 (KVM svm_set_msr: no #GP on AMD, reads back 32 bits)
    Row("tsc-aux-high-bits", "mov ecx, 0xc0000103\nmov eax, 0x1234\nmov edx, 1",
        "wrmsr\nrdmsr\nmov r12, rdx\nmov r13, rax", "msr", 0x7C, "ok", "vol. 3 RDTSCP: TSC_AUX[31:0]",
        check=lambda m: (reg("r12", 0)(m), reg("r13", 0x1234)(m))),
    # -- WRMSR of a linear address (vol. 3 WRMSR; KVM __kvm_set_msr): canonical or #GP ---------
    *[_msr_row(f"{name}-noncanonical", msr, NONCANONICAL, GP, "vol. 3 WRMSR: non-canonical address")
      for name, msr in (("fs-base", 0xC0000100), ("gs-base", 0xC0000101), ("kernel-gs-base", 0xC0000102),
                        ("lstar", 0xC0000082), ("cstar", 0xC0000083), ("sysenter-esp", 0x175),
                        ("sysenter-eip", 0x176))],
    _msr_row("kernel-gs-base-canonical", 0xC0000102, 0xFFFF_8000_0000_0000, "ok", "vol. 3 WRMSR"),
    # -- WRMSR VM_HSAVE_PA (vol. 2 §15.30.4: a page-aligned physical address) -----------------
    _msr_row("vm-hsave-pa-unaligned", VM_HSAVE_PA, 0x1800, GP, "vol. 2 §15.30.4: bits 11:0 MBZ"),
    _msr_row("vm-hsave-pa-beyond-maxphyaddr", VM_HSAVE_PA, 1 << 48, GP, "vol. 2 §15.30.4"),
]


def _efer_has(m, bits: int):
    assert m.guest.vmcb.EFER & (bits | 0x1000) == bits | 0x1000, hex(m.guest.vmcb.EFER)


def _dr_upper_clear(m):
    assert m.guest.vmcb.DR6 >> 32 == 0 and m.guest.vmcb.DR7 >> 32 == 0


# -- MOV CRn (APM vol. 2 §3.1.1-3.1.3, §3.7.1; vol. 3 "MOV CRn") -----------------------------------
def _cr(n: int, op: str) -> str:
    return f"mov rax, cr{n}\n{op}"


TABLE += [
    Row("mov-cr0-bit32", _cr(0, "bts rax, 32"), "mov cr0, rax", "cr0_write", 0x10, GP, "vol. 2 §3.1.1: CR0[63:32] MBZ"),
    Row("mov-cr0-nw-without-cd", _cr(0, "bts rax, 29\nbtr rax, 30"), "mov cr0, rax", "cr0_write", 0x10, GP,
        "vol. 2 §3.1.1: NW = 1 with CD = 0"),
    Row("mov-cr0-clear-pg-in-long-mode", _cr(0, "btr rax, 31"), "mov cr0, rax", "cr0_write", 0x10, GP,
        "vol. 2 §14.7: paging cannot be disabled in 64-bit mode"),
    Row("mov-cr3-bit52", _cr(3, "bts rax, 52"), "mov cr3, rax", "cr3_write", 0x13, GP,
        "vol. 2 §3.1.2: CR3[63:52] MBZ in long mode"),
    Row("mov-cr3-bit48", _cr(3, "bts rax, 48"), "mov cr3, rax", "cr3_write", 0x13, GP,
        "vol. 2 §3.1.2: bits 51:MAXPHYADDR reserved (MAXPHYADDR 48, CPUID Fn8000_0008)"),
    Row("mov-cr4-bit13", _cr(4, "bts rax, 13"), "mov cr4, rax", "cr4_write", 0x14, GP, "vol. 2 §3.7.1: reserved"),
    Row("mov-cr4-la57", _cr(4, "bts rax, 12"), "mov cr4, rax", "cr4_write", 0x14, GP,
        "vol. 2 §3.7.1: LA57 not implemented, and fixed while long mode is active"),
    Row("mov-cr4-pcide", _cr(4, "bts rax, 17"), "mov cr4, rax", "cr4_write", 0x14, GP,
        "vol. 2 §3.7.1: PCID not implemented (CPUID Fn0000_0001_ECX[17] = 0)"),
    Row("mov-cr4-smap", _cr(4, "bts rax, 21"), "mov cr4, rax", "cr4_write", 0x14, GP,
        "vol. 2 §3.7.1: SMAP not implemented (CPUID Fn0000_0007_EBX[20] = 0)"),
    Row("mov-cr4-clear-pae-in-long-mode", _cr(4, "btr rax, 5"), "mov cr4, rax", "cr4_write", 0x14, GP,
        "vol. 2 §14.7: PAE cannot be cleared while long mode is active"),
    Row("mov-cr4-osxsave", _cr(4, "bts rax, 18"), "mov cr4, rax", "cr4_write", 0x14, "ok", "vol. 2 §3.7.1",
        check=lambda m: assert_bits(m.guest.vmcb.CR4, 1 << 18)),
    Row("mov-cr8-bit4", "mov eax, 0x10", "mov cr8, rax", "cr8_write", 0x18, GP, "vol. 2 §3.1.5: CR8[63:4] reserved"),
    # -- LMSW (vol. 3 "LMSW"): loads CR0[3:0], can set PE but never clear it --------------------
    Row("lmsw-zero-keeps-pe", "xor eax, eax", "lmsw ax", "cr0_write", 0x10, "ok", "vol. 3 LMSW",
        check=lambda m: _low_cr0(m, 0x1)),
    Row("lmsw-all-ones", "mov eax, 0xffff", "lmsw ax", "cr0_write", 0x10, "ok", "vol. 3 LMSW: bits 3:0 only",
        check=lambda m: _low_cr0(m, 0xF)),
]


def assert_bits(value: int, bits: int) -> None:
    assert value & bits == bits, hex(value)


def _low_cr0(m, nibble: int) -> None:
    cr0 = m.guest.vmcb.CR0
    assert cr0 & 0xF == nibble and cr0 & ~0xF == 0x8001_0030, hex(cr0)     # the loader's CR0 above bit 3


# -- XSETBV (vol. 3 "XSETBV"; vol. 2 §11.5.2) --------------------------------------------------------
OSXSAVE = "mov rax, cr4\nbts rax, 18\nmov cr4, rax\n"
TABLE += [
    Row("xsetbv-xcr1", OSXSAVE + "mov ecx, 1\nmov eax, 3\nxor edx, edx", "xsetbv", "xsetbv", 0x8D, GP,
        "vol. 3 XSETBV: only XCR0 exists"),
    Row("xsetbv-x87-disabled", OSXSAVE + "xor ecx, ecx\nmov eax, 2\nxor edx, edx", "xsetbv", "xsetbv", 0x8D, GP,
        "vol. 2 §11.5.2: XCR0[0] must be 1"),
    Row("xsetbv-ymm-without-sse", OSXSAVE + "xor ecx, ecx\nmov eax, 5\nxor edx, edx", "xsetbv", "xsetbv", 0x8D, GP,
        "vol. 2 §11.5.2: YMM requires SSE"),
    Row("xsetbv-bit62", OSXSAVE + "xor ecx, ecx\nmov eax, 3\nmov edx, 0x40000000", "xsetbv", "xsetbv", 0x8D, GP,
        "vol. 3 XSETBV: a bit CPUID Fn0000_000D does not report"),
    Row("xsetbv-x87-sse", OSXSAVE + "xor ecx, ecx\nmov eax, 3\nxor edx, edx", "xsetbv\nxgetbv\nmov r12, rax",
        "xsetbv", 0x8D, "ok", "vol. 3 XSETBV", check=lambda m: reg("r12", 3)(m)),
]

# -- POPF, IRET: RFLAGS images (vol. 3 "POPF", "IRET"; vol. 2 §3.1.6) ---------------------------------
# What an instruction at CPL 0 can set: CF PF AF ZF SF TF IF DF OF IOPL NT AC ID; bit 1 reads as 1,
# bits 3, 5, 15, 22-63 are reserved (0). POPF leaves VM, VIF, VIP and clears RF; PUSHF clears RF and
# VM in its image. The images below leave TF clear (no single-step trap) and, for IRET, RF, VM, VIF
# and VIP: Unicorn's IRET does not load VIF/VIP at CPL 0, and its PUSHF copies RF into the image --
# deviations in flags that are not reserved, outside what this table checks.
SETTABLE = sum(1 << b for b in (0, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 18, 21))
TF, RF, VM, VIF, VIP = 1 << 8, 1 << 16, 1 << 17, 1 << 19, 1 << 20
POPF_IMAGE = ((1 << 64) - 1) & ~TF
IRET_IMAGE = ((1 << 64) - 1) & ~(TF | RF | VM | VIF | VIP)
RFLAGS_AFTER = 0x2 | (POPF_IMAGE & SETTABLE)
READ_BACK = "pushfq\npop r12\npush 2\npopfq"


def _iret_frame(rip: str, rflags: int) -> str:
    return (f"mov rax, rsp\npush 0x10\npush rax\nmovabs rcx, {rflags:#x}\npush rcx\npush 8\n"
            f"movabs rcx, {rip}\npush rcx")


def _iret_row(id_: str, rflags: int, expect: str, apm: str, check=None, target: int | None = None) -> Row:
    pre = _iret_frame("0x0", rflags)
    here = BASE + len(assemble(pre))
    nxt = here + len(assemble("iretq", here)) if target is None else target
    return Row(id_, _iret_frame(f"{nxt:#x}", rflags), "iretq\n" + READ_BACK, "iret", 0x74, expect, apm, check)


TABLE += [
    Row("popf-all-flags", f"movabs rax, {POPF_IMAGE:#x}\npush rax", "popfq\n" + READ_BACK, "popf", 0x71, "ok",
        "vol. 3 POPF (CPL 0): reserved bits stay 0, VM/VIF/VIP unchanged, RF cleared",
        check=lambda m: reg("r12", RFLAGS_AFTER)(m)),
    _iret_row("iret-all-flags", IRET_IMAGE, "ok", "vol. 3 IRET (CPL 0, 64-bit): reserved bits stay 0",
              check=lambda m: reg("r12", 0x2 | (IRET_IMAGE & SETTABLE))(m)),
    _iret_row("iret-noncanonical-rip", 2, GP, "vol. 3 IRET: #GP(0) if the return RIP is non-canonical",
              target=0x8000_0000_0000_0000),
]


# -- descriptor tables and segment bases (vol. 3 "LGDT", "LIDT", "WRFSBASE", "SWAPGS") ---------------
def _dtr(insn: str, base: int) -> str:
    return f"mov rax, {DATA_PAGE:#x}\nmov word ptr [rax], 0xfff\nmovabs rcx, {base:#x}\nmov [rax + 2], rcx"


DATA_PAGE = 0x1C0000
FSGSBASE = "mov rax, cr4\nbts rax, 16\nmov cr4, rax\n"
TABLE += [
    Row("lgdt-noncanonical-base", _dtr("lgdt", NONCANONICAL), "lgdt [rax]", "gdtr_write", 0x6B, GP,
        "vol. 3 LGDT: #GP(0) if the new base is non-canonical"),
    Row("lidt-noncanonical-base", _dtr("lidt", NONCANONICAL), "lidt [rax]", "idtr_write", 0x6A, GP,
        "vol. 3 LIDT: #GP(0) if the new base is non-canonical"),
    Row("lidt-canonical-base", _dtr("lidt", 0xFFFF_8000_0000_0000), "lidt [rax]", "idtr_write", 0x6A, "ok",
        "vol. 3 LIDT", check=lambda m: _dtr_base(m, "IDTR", 0xFFFF_8000_0000_0000)),
    Row("wrfsbase-noncanonical", FSGSBASE + f"movabs rax, {NONCANONICAL:#x}", "wrfsbase rax", "", None, GP,
        "vol. 3 WRFSBASE: #GP(0) if the address is non-canonical"),
    Row("wrgsbase-noncanonical", FSGSBASE + f"movabs rax, {NONCANONICAL:#x}", "wrgsbase rax", "", None, GP,
        "vol. 3 WRGSBASE: #GP(0) if the address is non-canonical"),
    Row("wrfsbase-canonical", FSGSBASE + "mov eax, 0x7000", "wrfsbase rax\nmov ecx, 0xc0000100\nrdmsr\nmov r12, rax",
        "", None, "ok", "vol. 3 WRFSBASE", check=lambda m: reg("r12", 0x7000)(m)),
    Row("wrgsbase-32-bit-operand", FSGSBASE + "mov eax, 0xffffffff",
        "wrgsbase eax\nmov ecx, 0xc0000101\nrdmsr\nmov r12, rdx", "", None, "ok",
        "vol. 3 WRGSBASE: a 32-bit operand is zero-extended", check=lambda m: reg("r12", 0)(m)),
    Row("swapgs", "mov ecx, 0xc0000102\nmov eax, 0x5000\nxor edx, edx\nwrmsr",
        "swapgs\nmov ecx, 0xc0000101\nrdmsr\nmov r12, rax", "", None, "ok",
        "vol. 3 SWAPGS: exchanges GS.base and KernelGSbase (both checked when written)",
        check=lambda m: reg("r12", 0x5000)(m)),
]


def _dtr_base(m, name: str, base: int) -> None:
    assert m.guest.vmcb.seg(name).base == base, hex(m.guest.vmcb.seg(name).base)


def build(guest, row: Row, armed: bool):
    pre = row.pre
    rip = BASE + len(assemble(pre)) if pre else BASE
    src = (pre + "\n" if pre else "") + row.insn + f"\nmov eax, {FULL_VMRUN}\n{VMMCALL}\n" + hc_exit(DONE)
    m = guest(src)
    install_reporting_idt(m)
    if armed and row.arm:
        m.intercept(row.arm)
    default = m.handlers[0x81]

    def vmmcall(m, e):
        if m.regs.rax == FULL_VMRUN:
            m.guest.vmcb.CR2 = m.guest.vmcb.CR2     # the VMCB was written: the next VMRUN checks it all
            m.advance(e)
            return None
        return default(m, e)
    m.on(0x81)(vmmcall)
    return m, rip


@pytest.mark.parametrize("armed", [False, True], ids=["native", "intercepted"])
@pytest.mark.parametrize("row", TABLE, ids=[r.id for r in TABLE])
def test_guest_state_write(guest, row: Row, armed: bool):
    if armed and not row.arm:
        pytest.skip("no intercept for this path")
    m, rip = build(guest, row, armed)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit", (row.apm, r.reason, r.detail)
    if armed and row.exit is not None:
        assert m.counts.get(row.exit), f"the {row.arm} intercept did not exit"
    if row.expect == GP:
        assert (r.exit_code, r.regs["rdx"], r.regs["rsi"]) == (0x10D, rip, 0), \
            (row.apm, hex(r.exit_code), hex(r.regs["rdx"]))
    elif row.expect == UD:
        assert (r.exit_code, r.regs["rsi"]) == (0x106, rip), (row.apm, hex(r.exit_code))
    else:
        assert r.exit_code == DONE, (row.apm, hex(r.exit_code))
        if row.check is not None:
            row.check(m)
