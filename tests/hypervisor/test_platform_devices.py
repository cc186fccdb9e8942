"""The PC platform's devices, one by one, against their specifications.

Expected values come from the documents, not from the implementation:
Intel SDM vol. 3A ch. 11 (local APIC: register reset values §11.4.7.1 /
§11.12.5.1, version register §11.4.8, TPR/PPR §11.8.3.1, EOI §11.8.5, ICR
§11.6.1, timer §11.5.4, x2APIC MSR map Table 11-6 and state transitions
§11.12.5); QEMU docs/specs/fw_cfg.rst (selector/data ports, item numbers);
QEMU hw/misc/debugexit.c (exit status (value << 1) | 1); the 8259A data sheet.
"""
from __future__ import annotations

import struct

import pytest

from sandbox.hypervisor.devices import MsrFault
from sandbox.hypervisor.platform.apic import LocalApic
from sandbox.hypervisor.platform.debug_exit import IsaDebugExit
from sandbox.hypervisor.platform.fw_cfg import FwCfg
from sandbox.hypervisor.platform.pic import LegacyPic


# ---------------------------------------------------------------- isa-debug-exit
def test_debug_exit_status_is_value_shifted_or_one():
    d = IsaDebugExit()
    assert d.owns(0xF4) and d.owns(0xF7) and not d.owns(0xF8)     # iobase=0xf4, iosize=4
    assert d.status is None
    d.write(0xF4, 4, 0)
    assert d.status == 1                      # QEMU: exit((val << 1) | 1); 1 = kvm-unit-tests success


def test_debug_exit_keeps_the_first_write_and_its_width():
    d = IsaDebugExit()
    d.write(0xF4, 1, 0x1FF)                   # a byte write carries 8 bits
    d.write(0xF4, 4, 5)
    assert d.value == 0xFF and d.status == 0x1FF


# ----------------------------------------------------------------------- fw_cfg
def _item(fw: FwCfg, key: int, n: int) -> bytes:
    fw.write(0x510, 2, key)                   # 16-bit selector write
    return bytes(fw.read(0x511, 1) for _ in range(n))


def test_fw_cfg_signature_and_numeric_items():
    fw = FwCfg(ram_size=256 << 20, cmdline=b"-x y")
    assert _item(fw, 0x00, 4) == b"QEMU"                               # FW_CFG_SIGNATURE
    assert struct.unpack("<Q", _item(fw, 0x03, 8))[0] == 256 << 20     # FW_CFG_RAM_SIZE
    assert struct.unpack("<H", _item(fw, 0x05, 2))[0] == 1             # FW_CFG_NB_CPUS
    assert struct.unpack("<H", _item(fw, 0x0F, 2))[0] == 1             # FW_CFG_MAX_CPUS
    size = struct.unpack("<I", _item(fw, 0x14, 4))[0]                  # FW_CFG_CMDLINE_SIZE, NUL included
    assert size == 5 and _item(fw, 0x15, size) == b"-x y\x00"          # FW_CFG_CMDLINE_DATA


def test_fw_cfg_selector_resets_offset_and_reads_past_end_are_zero():
    fw = FwCfg(ram_size=1 << 20)
    assert _item(fw, 0x00, 6) == b"QEMU\x00\x00"
    assert _item(fw, 0x00, 2) == b"QE"         # a new selector write restarts the item
    assert _item(fw, 0x1234, 3) == b"\x00\x00\x00"   # no such item


def test_fw_cfg_what_kvm_unit_tests_reads():
    # lib/x86/fwcfg.c: out %ax to 0x510, then one inb from 0x511 per byte, little-endian
    fw = FwCfg(ram_size=128 << 20)
    assert fw.owns(0x510) and fw.owns(0x511) and not fw.owns(0x512)
    fw.write(0x510, 2, 0x05)
    assert fw.read(0x511, 1) | fw.read(0x511, 1) << 8 == 1


# -------------------------------------------------------------------------- PIC
def test_pic_masked_at_reset_and_ocw1_reads_back():
    p = LegacyPic()
    assert p.read(0x21, 1) == 0xFF and p.read(0xA1, 1) == 0xFF
    p.write(0x21, 1, 0xFB)
    assert p.read(0x21, 1) == 0xFB and p.read(0xA1, 1) == 0xFF


def test_pic_initialization_sequence_then_mask():
    p = LegacyPic()
    for port, v in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01)):   # ICW1-ICW4
        p.write(port, 1, v)
    assert p.master.vector_base == 0x20
    p.write(0x21, 1, 0xFF)                    # OCW1 after ICW4
    assert p.read(0x21, 1) == 0xFF


# ------------------------------------------------------------------- local APIC
class Clock:
    def __init__(self) -> None:
        self.ns = 0
        self.tsc = 1_000_000

    def now(self) -> int:
        return self.ns


def apic(clock: Clock | None = None) -> LocalApic:
    c = clock or Clock()
    return LocalApic(now_ns=c.now, tsc=lambda: c.tsc, tsc_hz=1_000_000_000)


def x2(a: LocalApic) -> LocalApic:
    a.wrmsr(0x1B, 0xFEE00000 | (1 << 11) | (1 << 10))
    return a


def test_apic_base_msr_reset_value():
    # SDM §11.4.4: base 0xFEE00000, BSP (bit 8) and global enable (bit 11) set at power-up
    assert apic().rdmsr(0x1B) == 0xFEE00900


def test_xapic_reset_registers():
    a = apic()
    assert a.mmio_read(0x20, 4) == 0                     # ID 0 in bits 31:24
    assert a.mmio_read(0x30, 4) & 0xFF == 0x14           # version 0x14: integrated APIC
    assert (a.mmio_read(0x30, 4) >> 16) & 0xFF == 5      # max LVT entry = 6 entries - 1
    assert a.mmio_read(0xE0, 4) == 0xFFFFFFFF            # DFR reset: flat model
    assert a.mmio_read(0xF0, 4) == 0xFF                  # SVR reset: 0xFF, software-disabled
    for lvt in (0x320, 0x330, 0x340, 0x350, 0x360, 0x370):
        assert a.mmio_read(lvt, 4) == 0x10000              # every LVT masked


def test_x2apic_mode_transitions():
    a = apic()
    with pytest.raises(MsrFault):
        a.wrmsr(0x1B, 0xFEE00000 | (1 << 10))            # EXTD without EN: invalid
    x2(a)
    assert a.mode == "x2apic" and a.rdmsr(0x802) == 0    # x2APIC ID is the 32-bit ID
    with pytest.raises(MsrFault):
        a.wrmsr(0x1B, 0xFEE00000 | (1 << 11))            # x2APIC -> xAPIC is #GP
    a.wrmsr(0x1B, 0xFEE00000)                            # -> disabled
    with pytest.raises(MsrFault):
        a.wrmsr(0x1B, 0xFEE00000 | (1 << 11) | (1 << 10))   # disabled -> x2APIC is #GP
    a.wrmsr(0x1B, 0xFEE00000 | (1 << 11))                # disabled -> xAPIC
    assert a.mode == "xapic" and a.mmio_read(0xF0, 4) == 0xFF   # state reset by the disable


def test_x2apic_msrs_fault_unless_x2apic_mode():
    a = apic()
    with pytest.raises(MsrFault):
        a.rdmsr(0x808)                                   # xAPIC mode: the MSR interface is off
    x2(a)
    assert a.rdmsr(0x808) == 0


@pytest.mark.parametrize("off,readable,writable", [
    (0x20, True, False), (0x30, True, False), (0x80, True, True), (0x90, False, False),
    (0xA0, True, False), (0xB0, False, True), (0xC0, False, False), (0xD0, True, False),
    (0xE0, False, False), (0xF0, True, True), (0x100, True, False), (0x200, True, False),
    (0x280, True, True), (0x2F0, False, False), (0x300, True, True), (0x310, False, False),
    (0x320, True, True), (0x380, True, True), (0x390, True, False), (0x3E0, True, True),
    (0x3F0, False, True)])
def test_x2apic_msr_map(off, readable, writable):
    # SDM Table 11-6 (x2APIC register address space); no CMCI with 6 LVT entries
    a = x2(apic())
    msr = 0x800 + (off >> 4)
    if readable:
        assert a.rdmsr(msr) >> 32 == 0
    else:
        with pytest.raises(MsrFault):
            a.rdmsr(msr)
    if writable:
        a.wrmsr(msr, a.rdmsr(msr) & 0xFFFFFFFF if readable and off != 0x300 else 0)
    else:
        with pytest.raises(MsrFault):
            a.wrmsr(msr, 0)


def test_x2apic_reserved_bits_fault():
    a = x2(apic())
    with pytest.raises(MsrFault):
        a.wrmsr(0x808, 1 << 32)                          # bits 63:32 reserved except ICR
    for v in (0x100, 0xFF00, 0xFF000000):
        with pytest.raises(MsrFault):
            a.wrmsr(0x83F, v)                            # self-IPI: bits 31:8 reserved
    with pytest.raises(MsrFault):
        a.wrmsr(0x80B, 1)                                # EOI takes 0 in x2APIC mode


def test_x2apic_ldr_derived_from_id():
    # SDM §11.12.10.2: LDR = (x2APIC ID[19:4] << 16) | (1 << x2APIC ID[3:0])
    assert x2(apic()).rdmsr(0x80D) == 1


def _enable(a: LocalApic) -> None:
    a.write_reg(0xF0, 0x1FF)


def test_tpr_ppr_and_delivery_priority():
    a = apic()
    _enable(a)
    a.write_reg(0x80, 0xF0)                              # TPR class 15 blocks everything
    a.set_irr(0x40)
    assert a.pending_vector() is None
    assert a.read_reg(0xA0) == 0xF0                      # PPR = TPR when nothing in service
    a.write_reg(0x80, 0x30)
    assert a.pending_vector() == 0x40                    # class 4 > class 3
    a.accept(0x40)
    assert a.read_reg(0x100 + 0x20) == 1                 # ISR bit 0x40 -> register 2, bit 0
    assert a.read_reg(0xA0) == 0x40                      # PPR = ISRV class (above TPR)
    a.set_irr(0x45)
    assert a.pending_vector() is None                    # same class as the one in service
    a.set_irr(0x51)
    assert a.pending_vector() == 0x51
    a.write_reg(0xB0, 0)                                 # EOI clears the highest ISR bit
    assert a.isr == 0


def test_self_ipi_icr_shorthand_and_physical_destination():
    a = apic()
    _enable(a)
    a.write_reg(0x300, (1 << 18) | 0x40)                 # shorthand self, fixed, vector 0x40
    a.write_reg(0x310, 0xFF << 24)
    a.write_reg(0x300, (1 << 14) | 0x41)                 # physical destination 0xFF: broadcast
    a.write_reg(0x310, 0x00 << 24)
    a.write_reg(0x300, (1 << 14) | 0x42)                 # physical destination 0 = our ID
    a.write_reg(0x310, 0x01 << 24)
    a.write_reg(0x300, (1 << 14) | 0x43)                 # another APIC: not us
    a.write_reg(0x300, (3 << 18) | 0x44)                 # all excluding self
    assert a.irr == (1 << 0x40) | (1 << 0x41) | (1 << 0x42)
    assert a.read_reg(0x300) & (1 << 12) == 0            # delivery status idle


def test_illegal_vector_sets_esr():
    a = apic()
    _enable(a)
    a.write_reg(0x300, (1 << 18) | 0x05)                 # vectors 0-15 are illegal (SDM §11.5.3)
    assert a.irr == 0
    a.write_reg(0x280, 0)                                # a write latches the errors
    assert a.read_reg(0x280) & (1 << 5)                  # send illegal vector


def test_nmi_ipi_and_x2apic_self_ipi():
    a = x2(apic())
    _enable(a)
    a.wrmsr(0x830, (1 << 18) | (4 << 8))                 # self, delivery mode NMI
    assert a.nmi_pending
    a.wrmsr(0x83F, 0x50)
    assert a.irr == 1 << 0x50


def test_timer_one_shot_counts_down_at_bus_clock_over_divisor():
    c = Clock()
    a = apic(c)
    _enable(a)
    a.write_reg(0x3E0, 0x3)                              # divide by 16 (SDM Figure 11-10)
    a.write_reg(0x320, 0x30)                             # one-shot, vector 0x30, unmasked
    a.write_reg(0x380, 1000)
    assert a.deadline_ns == 16_000                       # 1000 ticks x 16 at 1 GHz
    c.ns = 8_000
    assert a.read_reg(0x390) == 500
    c.ns = 16_000
    a.timer_fired()
    assert a.irr == 1 << 0x30 and a.deadline_ns is None and a.read_reg(0x390) == 0


def test_timer_periodic_reloads():
    c = Clock()
    a = apic(c)
    _enable(a)
    a.write_reg(0x3E0, 0xB)                              # divide by 1
    a.write_reg(0x320, (1 << 17) | 0x31)                 # periodic
    a.write_reg(0x380, 100)
    c.ns = 100
    a.timer_fired()
    assert a.deadline_ns == 200 and a.irr == 1 << 0x31


def test_timer_masked_does_not_interrupt():
    c = Clock()
    a = apic(c)
    _enable(a)
    a.write_reg(0x320, (1 << 16) | 0x32)
    a.write_reg(0x380, 10)
    c.ns = 100
    a.timer_fired()
    assert a.irr == 0


def test_tsc_deadline_mode():
    c = Clock()
    a = apic(c)
    _enable(a)
    a.write_reg(0x320, (2 << 17) | 0x33)                 # TSC-deadline mode
    a.write_reg(0x380, 50)                               # TMICT ignored in this mode
    assert a.deadline_ns is None
    a.wrmsr(0x6E0, c.tsc + 3000)                         # tsc_hz = 1 GHz: 3000 ns away
    assert a.deadline_ns == 3000 and a.rdmsr(0x6E0) == c.tsc + 3000
    c.ns = 3000
    a.timer_fired()
    assert a.irr == 1 << 0x33 and a.rdmsr(0x6E0) == 0    # the MSR reads 0 once it fired
    a.wrmsr(0x6E0, c.tsc - 1)                            # in the past: due at once
    assert a.deadline_ns == c.ns


def test_timer_mode_change_disarms():
    a = apic()
    _enable(a)
    a.write_reg(0x320, 0x34)
    a.write_reg(0x380, 100)
    assert a.deadline_ns is not None
    a.write_reg(0x320, (1 << 17) | 0x34)
    assert a.deadline_ns is None and a.read_reg(0x380) == 0


def test_software_disable_masks_lvts_and_blocks_delivery():
    a = apic()
    _enable(a)
    a.write_reg(0x350, 0x700)                            # LINT0 ExtINT, unmasked
    a.set_irr(0x60)
    a.write_reg(0xF0, 0xFF)                              # SVR bit 8 clear (SDM §11.4.7.2)
    assert a.read_reg(0x350) & (1 << 16) and a.pending_vector() is None


def test_xapic_window_closed_in_x2apic_mode():
    a = x2(apic())
    assert a.mmio_read(0x30, 4) == 0xFFFFFFFF


# ------------------------------------------------------------ machine-check MSRs
def test_machine_check_banks():
    # SDM vol. 3B §16.3.1: MCG_CAP[7:0] = bank count, bit 8 MCG_CTL_P; banks from 0x400, 4 MSRs each.
    # Write rules as kvm-unit-tests' msr.flat expects them of KVM: MCi_CTL 0 or all ones,
    # MCi_STATUS only 0, the MSRs of banks past the count #GP.
    from sandbox.hypervisor.platform.msrs import MachineCheckBanks
    mc = MachineCheckBanks(banks=10)
    cap = mc.rdmsr(0x179)
    assert cap & 0xFF == 10 and cap & (1 << 8)
    for v in (0, (1 << 64) - 1):
        mc.wrmsr(0x400, v)
        assert mc.rdmsr(0x400) == v
    with pytest.raises(MsrFault):
        mc.wrmsr(0x400, 0xAAAA_AAAA_AAAA_AAAA)
    with pytest.raises(MsrFault):
        mc.wrmsr(0x401, 1)
    mc.wrmsr(0x402, 0xAAAA_AAAA_AAAA_AAAA)              # ADDR: any value
    for msr in (0x400 + 4 * 10, 0x400 + 4 * 31 + 3):
        assert mc.owns_msr(msr)
        with pytest.raises(MsrFault):
            mc.rdmsr(msr)


# ------------------------------------------------------------------------ ACPI
def test_acpi_tables_are_found_the_bios_way_and_checksum():
    # ACPI 6.x §5.2.5.3: "RSD PTR " on a 16-byte boundary in 0xE0000-0xFFFFF, 20 bytes summing to 0;
    # §5.2.6: every table's bytes sum to 0; §5.2.9: FADT PM_TMR_BLK at offset 76, PM_TMR_LEN at 91
    from sandbox.hypervisor.platform.acpi import tables
    mem = dict(tables())
    (rsdp_at, rsdp), = [(a, d) for a, d in mem.items() if d[:8] == b"RSD PTR "]
    assert 0xE0000 <= rsdp_at < 0x100000 and rsdp_at % 16 == 0 and sum(rsdp[:20]) % 256 == 0
    rsdt = mem[struct.unpack_from("<I", rsdp, 16)[0]]
    assert rsdt[:4] == b"RSDT" and sum(rsdt) % 256 == 0
    length = struct.unpack_from("<I", rsdt, 4)[0]
    entries = struct.unpack_from(f"<{(length - 36) // 4}I", rsdt, 36)
    fadt = mem[entries[0]]
    assert fadt[:4] == b"FACP" and sum(fadt) % 256 == 0 and len(fadt) >= 116
    assert struct.unpack_from("<I", fadt, 76)[0] == 0x608 and fadt[91] == 4


def test_pm_timer_counts_at_3_579545_mhz_in_24_bits():
    from sandbox.hypervisor.platform.acpi import AcpiPmTimer
    t = {"ns": 1_000_000_000}
    pm = AcpiPmTimer(lambda: t["ns"])
    assert pm.read(0x608, 4) == 3_579_545 & 0xFFFFFF           # one second of ticks, 24 bits
    t["ns"] = 10_000_000_000
    assert pm.read(0x608, 4) == 35_795_450 & 0xFFFFFF
