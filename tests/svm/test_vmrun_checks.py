"""VMRUN consistency checks (APM §15.5.1 "Canonicalization and
Consistency Checks"; kvm-unit-tests svm_guest_state_test, asid_zero, vmrun
intercept check, exc_inject).

An illegal VMCB makes VMRUN exit at once with EXITCODE = VMEXIT_INVALID (-1,
i.e. 0xFFFF_FFFF_FFFF_FFFF as a 64-bit EXITCODE, §3); no guest instruction runs.
"""
from __future__ import annotations

import pytest

from sandbox import Event, EventType, Segment

from conftest import DATA, hc_exit

INVALID = 0xFFFF_FFFF_FFFF_FFFF
MARK = 0xA5
CR0_PE, CR0_NW, CR0_CD, CR0_PG = 1, 1 << 29, 1 << 30, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_SVME = 1 << 8, 1 << 12
CS_L, CS_D = 1 << 9, 1 << 10


@pytest.fixture
def marked(guest):
    """A guest whose first instruction writes a marker byte and whose second sets RAX."""
    def make():
        m = guest(f"mov byte ptr [{DATA:#x}], {MARK:#x}\nmov eax, 0x1234\n" + hc_exit(0x55))
        m.guest.vmcb.RAX = 0x77
        return m
    return make


def assert_invalid(m, r):
    assert r.reason == "invalid-vmcb", (r.reason, r.detail)
    assert m.guest.vmcb.EXITCODE == INVALID
    assert m.guest.read_phys(DATA, 1) == b"\x00", "a guest instruction ran"
    assert m.guest.vmcb.RAX == 0x77
    assert r.counts == {INVALID: 1}


def assert_runs(m, r):
    assert r.reason == "guest-exit" and r.exit_code == 0x55, (r.reason, r.detail)
    assert m.guest.read_phys(DATA, 1) == bytes([MARK])


def cs_attrib_plus(m, bits):
    s = m.guest.vmcb.seg("CS")
    m.guest.vmcb.set_seg("CS", Segment(s.selector, s.attrib | bits, s.limit, s.base))


def _set(field, fn):
    def apply(m):
        v = m.guest.vmcb
        setattr(v, field, fn(getattr(v, field)))
    return apply


ILLEGAL = {
    # TCE is MBZ on a processor whose CPUID Fn8000_0001_ECX[17] is clear (APM §3.1.7)
    "efer-bit15-tce-unimplemented": _set("EFER", lambda x: x | (1 << 15)),
    "efer-svme-clear": _set("EFER", lambda x: x & ~EFER_SVME),
    "cr0-cd0-nw1": _set("CR0", lambda x: (x & ~CR0_CD) | CR0_NW),
    "cr0-bit32": _set("CR0", lambda x: x | (1 << 32)),
    "cr0-bit63": _set("CR0", lambda x: x | (1 << 63)),
    "cr3-bit52-long-mode": _set("CR3", lambda x: x | (1 << 52)),
    "cr3-bit63-long-mode": _set("CR3", lambda x: x | (1 << 63)),
    # bits 51:MAXPHYADDR (48) are beyond the physical address width (KUT svm_pae/pse_test)
    "cr3-bit48-beyond-maxphyaddr": _set("CR3", lambda x: x | (1 << 48)),
    "cr4-bit13": _set("CR4", lambda x: x | (1 << 13)),
    "cr4-bit15": _set("CR4", lambda x: x | (1 << 15)),
    "cr4-bit19": _set("CR4", lambda x: x | (1 << 19)),
    "cr4-bit25": _set("CR4", lambda x: x | (1 << 25)),
    "cr4-bit31": _set("CR4", lambda x: x | (1 << 31)),
    "cr4-bit32": _set("CR4", lambda x: x | (1 << 32)),
    "cr4-bit63": _set("CR4", lambda x: x | (1 << 63)),
    "dr6-bit32": _set("DR6", lambda x: x | (1 << 32)),
    "dr6-bit63": _set("DR6", lambda x: x | (1 << 63)),
    "dr7-bit32": _set("DR7", lambda x: x | (1 << 32)),
    "dr7-bit63": _set("DR7", lambda x: x | (1 << 63)),
    "efer-bit9": _set("EFER", lambda x: x | (1 << 9)),
    "efer-bit16": _set("EFER", lambda x: x | (1 << 16)),
    "efer-bit40": _set("EFER", lambda x: x | (1 << 40)),
    "efer-bit63": _set("EFER", lambda x: x | (1 << 63)),
    "asid-zero": _set("GUEST_ASID", lambda x: 0),
    "vmrun-intercept-clear": lambda m: m.guest.vmcb.set_intercept(0x80, False),
    "lme-pg-without-pae": _set("CR4", lambda x: x & ~CR4_PAE),
    "lme-pg-without-pe": _set("CR0", lambda x: x & ~CR0_PE),
    "lme-pg-pae-cs-l-and-d": lambda m: cs_attrib_plus(m, CS_L | CS_D),
    "msrpm-beyond-maxphyaddr": lambda m: (m.guest.vmcb.set_intercept(0x7C),
                                          setattr(m.guest.vmcb, "MSRPM_BASE_PA", (1 << 48) - 0x1000)),
    "iopm-beyond-maxphyaddr": lambda m: setattr(m.guest.vmcb, "IOPM_BASE_PA", (1 << 48) - 0x2000),
    "eventinj-type1": _set("EVENTINJ", lambda x: (1 << 31) | (1 << 8) | 0x20),
    "eventinj-type5": _set("EVENTINJ", lambda x: (1 << 31) | (5 << 8) | 0x20),
    "eventinj-type6": _set("EVENTINJ", lambda x: (1 << 31) | (6 << 8) | 0x20),
    "eventinj-type7": _set("EVENTINJ", lambda x: (1 << 31) | (7 << 8) | 0x20),
    "eventinj-exception-vector2": _set("EVENTINJ", lambda x: Event(2, EventType.EXCEPTION).encode()),
    "eventinj-exception-vector32": _set("EVENTINJ", lambda x: Event(32, EventType.EXCEPTION).encode()),
    "eventinj-exception-vector255": _set("EVENTINJ", lambda x: Event(255, EventType.EXCEPTION).encode()),
    "eventinj-br-in-64-bit-mode": _set("EVENTINJ", lambda x: Event(5, EventType.EXCEPTION).encode()),
}


@pytest.mark.parametrize("name", list(ILLEGAL))
def test_illegal_vmcb_is_vmexit_invalid(marked, name):
    m = marked()
    ILLEGAL[name](m)
    r = m.run(timeout=5)
    assert_invalid(m, r)


LEGAL = {
    "default": lambda m: None,
    "cr0-cd1-nw0": _set("CR0", lambda x: x | CR0_CD),
    "cr0-cd1-nw1": _set("CR0", lambda x: x | CR0_CD | CR0_NW),               # KUT test_cr0: legal
    "cr3-bit51": _set("CR3", lambda x: x & ~0xFFF),                            # no MBZ bit touched
    "cr4-osxsave": _set("CR4", lambda x: x | (1 << 18)),
    "dr6-low-bits": _set("DR6", lambda x: 0xFFFF0FF0),
    "dr7-low-bits": _set("DR7", lambda x: 0x400),
    "cs-l-without-d": lambda m: cs_attrib_plus(m, CS_L),
    "asid-2": _set("GUEST_ASID", lambda x: 2),
    "msrpm-bits-11-0-ignored": lambda m: setattr(m.guest.vmcb, "MSRPM_BASE_PA", m.guest.vmcb.MSRPM_BASE_PA | 0xFFF),
    "eventinj-not-valid": _set("EVENTINJ", lambda x: (7 << 8) | 2),             # V=0: ignored
}


@pytest.mark.parametrize("name", list(LEGAL))
def test_legal_vmcb_runs(marked, name):
    m = marked()
    LEGAL[name](m)
    r = m.run(timeout=5)
    assert_runs(m, r)


def test_invalid_then_fixed_vmcb_runs(marked):
    """kvm-unit-tests asid_zero / vmrun intercept check: the hypervisor repairs the VMCB
    and VMRUN succeeds."""
    m = marked()
    m.guest.vmcb.GUEST_ASID = 0
    assert_invalid(m, m.run(timeout=5))
    m.guest.vmcb.GUEST_ASID = 1
    assert_runs(m, m.run(timeout=5))


def test_invalid_vmcb_handler_sees_minus_one(marked):
    m = marked()
    m.guest.vmcb.set_intercept(0x80, False)
    seen = []

    @m.on(INVALID)
    def h(m, e):
        seen.append((e.exitcode, m.guest.vmcb.EXITCODE))
        return m.stop("saw-invalid")
    r = m.run(timeout=5)
    assert r.reason == "saw-invalid" and seen == [(INVALID, INVALID)]
    assert m.guest.read_phys(DATA, 1) == b"\x00"


def test_vmexit_invalid_from_a_resumed_exit(guest):
    """The checks apply at every VMRUN: a handler that breaks the VMCB before
    resuming gets VMEXIT_INVALID, and the rest of the guest does not run."""
    m = guest(f"xor eax, eax\ncpuid\nmov byte ptr [{DATA:#x}], {MARK:#x}\n" + hc_exit(0x55))

    @m.on(0x72)
    def h(m, e):
        m.advance(e)
        m.guest.vmcb.CR0 |= 1 << 40
    r = m.run(timeout=5)
    assert r.reason == "invalid-vmcb"
    assert m.guest.vmcb.EXITCODE == INVALID
    assert m.guest.read_phys(DATA, 1) == b"\x00"


def test_vmcb_image_reads_the_apm_offsets():
    """VmcbImage.read takes each field from its offset in APM vol. 2 Appendix B
    (Tables B-1 and B-2), with IOPM_BASE_PA/MSRPM_BASE_PA bits 11:0 ignored."""
    import struct
    from sandbox.svm.consistency import VmcbImage
    base = 0x1000
    buf = bytearray(0x3000)
    fields = {       # APM offset: (struct format, value); every value distinct
        0x000: ("<6I", tuple(0x1111_0000 + i for i in range(6))),
        0x040: ("<Q", 0x0012_3FFF), 0x048: ("<Q", 0x0045_6ABC), 0x050: ("<Q", 0xFEDC_BA98_7654_3210),
        0x058: ("<I", 0x0000_0007), 0x05C: ("<B", 0x03), 0x090: ("<Q", 0x5), 0x0A8: ("<Q", 0x8000_0B0E),
        0x0B0: ("<Q", 0x0000_0000_0ABC_D000), 0x412: ("<H", 0x0A9B), 0x4D0: ("<Q", 0x1D01),
        0x548: ("<Q", 0x20), 0x550: ("<Q", 0x0000_1000), 0x558: ("<Q", 0x8000_0011), 0x560: ("<Q", 0x400),
        0x568: ("<Q", 0xFFFF_0FF0), 0x570: ("<Q", 0x202), 0x578: ("<Q", 0x40_1000), 0x5D8: ("<Q", 0x7FF0),
        0x5F8: ("<Q", 0xAAAA_BBBB_CCCC_DDDD), 0x640: ("<Q", 0xDEAD_B000),
    }
    for off, (fmt, val) in fields.items():
        struct.pack_into(fmt, buf, base + off, *(val if isinstance(val, tuple) else (val,)))
    v = VmcbImage.read(memoryview(buf), base)
    want = dict(ivec=fields[0x000][1], iopm=0x0012_3000, msrpm=0x0045_6000, tsc_offset=0xFEDC_BA98_7654_3210,
                asid=7, tlb_control=3, np_control=5, eventinj=0x8000_0B0E, n_cr3=0x0ABC_D000, cs_attr=0x0A9B,
                efer=0x1D01, cr4=0x20, cr3=0x1000, cr0=0x8000_0011, dr7=0x400, dr6=0xFFFF_0FF0, rflags=0x202,
                rip=0x40_1000, rsp=0x7FF0, rax=0xAAAA_BBBB_CCCC_DDDD, cr2=0xDEAD_B000)
    assert {k: getattr(v, k) for k in want} == want
