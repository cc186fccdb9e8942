"""VMCB layout, exit codes, intercept numbering and EVENTINJ encoding.

Every expected number below is transcribed from the APM: Table B-1
(control area), Table B-2 (state-save area), Table C-1 (exit codes) and
§15.20 Fig. 15-5 (EVENTINJ).
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from sandbox import VMCB, Event, EventType, ExitCode, Segment, exit_name
from sandbox.svm import intercepts as I
from sandbox.svm import vmcb as V
from sandbox.memory.hostmem import HostMemory

# -- §1 control area (offset, size in bytes) -------------------------------------
CONTROL = {
    "INTERCEPT_CR": (0x000, 4),
    "INTERCEPT_DR": (0x004, 4),
    "INTERCEPT_EXCEPTIONS": (0x008, 4),
    "INTERCEPT_MISC1": (0x00C, 4),
    "INTERCEPT_MISC2": (0x010, 4),
    "INTERCEPT_MISC3": (0x014, 4),
    "PAUSE_FILTER_THRESHOLD": (0x03C, 2),
    "PAUSE_FILTER_COUNT": (0x03E, 2),
    "IOPM_BASE_PA": (0x040, 8),
    "MSRPM_BASE_PA": (0x048, 8),
    "TSC_OFFSET": (0x050, 8),
    "GUEST_ASID": (0x058, 4),
    "TLB_CONTROL": (0x05C, 1),           # bits 39:32 of the quadword at 058h
    "V_INTR": (0x060, 8),
    "V_TPR": (0x060, 1),
    "V_INTR_VECTOR": (0x064, 1),         # bits 39:32 of the quadword at 060h
    "INTERRUPT_SHADOW": (0x068, 8),
    "EXITCODE": (0x070, 8),
    "EXITINFO1": (0x078, 8),
    "EXITINFO2": (0x080, 8),
    "EXITINTINFO": (0x088, 8),
    "NP_CONTROL": (0x090, 8),
    "AVIC_APIC_BAR": (0x098, 8),
    "GHCB_PA": (0x0A0, 8),
    "EVENTINJ": (0x0A8, 8),
    "N_CR3": (0x0B0, 8),
    "VIRT_EXT": (0x0B8, 8),
    "VMCB_CLEAN": (0x0C0, 4),
    "NRIP": (0x0C8, 8),
    "GUEST_INSN_LEN": (0x0D0, 1),
    "AVIC_BACKING_PAGE": (0x0E0, 8),
    "AVIC_LOGICAL_TABLE": (0x0F0, 8),
    "AVIC_PHYSICAL_TABLE": (0x0F8, 8),
    "VMSA_PA": (0x108, 8),
}
# -- §2 state-save area (absolute offsets) -----------------------------------------
SAVE = {
    "CPL": (0x4CB, 1),
    "EFER": (0x4D0, 8),
    "CR4": (0x548, 8), "CR3": (0x550, 8), "CR0": (0x558, 8), "DR7": (0x560, 8), "DR6": (0x568, 8),
    "RFLAGS": (0x570, 8), "RIP": (0x578, 8),
    "RSP": (0x5D8, 8), "S_CET": (0x5E0, 8), "SSP": (0x5E8, 8), "ISST_ADDR": (0x5F0, 8), "RAX": (0x5F8, 8),
    "STAR": (0x600, 8), "LSTAR": (0x608, 8), "CSTAR": (0x610, 8), "SFMASK": (0x618, 8),
    "KERNEL_GS_BASE": (0x620, 8), "SYSENTER_CS": (0x628, 8), "SYSENTER_ESP": (0x630, 8),
    "SYSENTER_EIP": (0x638, 8), "CR2": (0x640, 8),
    "G_PAT": (0x668, 8), "DBGCTL": (0x670, 8), "BR_FROM": (0x678, 8), "BR_TO": (0x680, 8),
    "LASTEXCPFROM": (0x688, 8), "LASTEXCPTO": (0x690, 8), "SPEC_CTRL": (0x6E0, 8),
}
TABLE = {**CONTROL, **SAVE}
SEGS = {"ES": 0x400, "CS": 0x410, "SS": 0x420, "DS": 0x430, "FS": 0x440, "GS": 0x450,
        "GDTR": 0x460, "LDTR": 0x470, "IDTR": 0x480, "TR": 0x490}


def test_field_names_match_the_transcribed_table():
    assert set(V.FIELDS) == set(TABLE)
    assert set(V.SEGMENTS) == set(SEGS)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_field_offset_and_size(name):
    f = V.FIELDS[name]
    assert (f.offset, f.size) == TABLE[name], name


@pytest.mark.parametrize("name", sorted(SEGS))
def test_segment_offset(name):
    assert V.SEGMENTS[name] == SEGS[name]


def test_decode_assist_bytes_follow_the_count_byte():
    # §1: 0D0h = number of bytes fetched, 0D1h-0DFh = up to 15 instruction bytes
    assert V.GUEST_INSN_BYTES == 0x0D1 and V.GUEST_INSN_MAX == 15


def test_control_area_and_save_area_bounds():
    assert V.VMCB_SIZE == 0x1000 and V.SAVE_AREA == 0x400 and V.CONTROL_AREA_SIZE == 0x400


@pytest.fixture(scope="module")
def mem():
    return HostMemory(1 << 20)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_write_through_vmcb_lands_at_the_apm_offset(mem, name):
    off, size = TABLE[name]
    hpa = 0x3000
    v = VMCB(mem, hpa)
    mem.write(hpa, bytes(0x1000))
    value = int.from_bytes(bytes(range(0xA1, 0xA1 + size)), "little")
    setattr(v, name, value)
    page = mem.read(hpa, 0x1000)
    assert page[off:off + size] == bytes(range(0xA1, 0xA1 + size))
    # nothing else on the page changed
    assert page[:off] == bytes(off) and page[off + size:] == bytes(0x1000 - off - size)
    assert getattr(v, name) == value
    # values are truncated to the field's width
    setattr(v, name, (1 << (8 * size)) | 0x5A)
    assert mem.read(hpa + off, size) == bytes([0x5A]) + bytes(size - 1)
    assert mem.read(hpa + off + size, 1) == b"\x00"


def test_vmcb_of_a_machine_guest_is_a_window_on_host_memory():
    """The guest's VMCB page in DRAM holds what is written through VMCB (m.mem.read)."""
    from sandbox import Machine
    m = Machine(dram=8 << 20, ram=2 << 20)
    v = m.guest.vmcb
    v.TSC_OFFSET = 0x1122334455667788
    v.N_CR3 = 0x0000_0000_0012_3000
    v.CR2 = 0xDEAD_BEEF_0000_1000
    assert m.mem.read(m.guest.vmcb_hpa + 0x050, 8) == struct.pack("<Q", 0x1122334455667788)
    assert m.mem.read(m.guest.vmcb_hpa + 0x0B0, 8) == struct.pack("<Q", 0x123000)
    assert m.mem.read(m.guest.vmcb_hpa + 0x640, 8) == struct.pack("<Q", 0xDEAD_BEEF_0000_1000)
    # the other direction: raw DRAM writes are seen by the typed accessors
    m.mem.write(m.guest.vmcb_hpa + 0x0A8, struct.pack("<Q", 0x8000_0B0E))
    assert v.EVENTINJ == 0x8000_0B0E


@pytest.mark.parametrize("name", sorted(SEGS))
def test_segment_record_layout(mem, name):
    # §2: selector u16 @+0, attrib u16 @+2, limit u32 @+4, base u64 @+8
    hpa = 0x5000
    v = VMCB(mem, hpa)
    mem.write(hpa, bytes(0x1000))
    v.set_seg(name, Segment(selector=0x1234, attrib=0x0A9B, limit=0x89ABCDEF, base=0x0102030405060708))
    off = SEGS[name]
    raw = mem.read(hpa + off, 16)
    assert raw == bytes.fromhex("3412" "9b0a" "efcdab89" "0807060504030201")
    page = mem.read(hpa, 0x1000)
    assert page[:off] == bytes(off) and page[off + 16:] == bytes(0x1000 - off - 16)
    s = v.seg(name)
    assert (s.selector, s.attrib, s.limit, s.base) == (0x1234, 0x0A9B, 0x89ABCDEF, 0x0102030405060708)


@pytest.mark.parametrize("attrib,dpl,p,l,db", [
    (0x29B, 0, True, True, False),     # 64-bit code: type B, S, P, L
    (0xC93, 0, True, False, True),     # data: type 3, S, P, D/B, G
    (0x0F3, 3, True, False, False),    # DPL 3 data
    (0x040, 2, False, False, False),   # DPL 2, not present
])
def test_segment_attrib_bits(attrib, dpl, p, l, db):
    # §2: type 3:0, S 4, DPL 6:5, P 7, AVL 8, L 9, D/B 10, G 11
    s = Segment(attrib=attrib)
    assert (s.dpl, s.present, s.long, s.db) == (dpl, p, l, db)


def test_vmcb_rejects_misaligned_or_outside_pages(mem):
    with pytest.raises(ValueError):
        VMCB(mem, 0x3008)
    with pytest.raises(ValueError):
        VMCB(mem, mem.size)


# -- §3 exit codes ----------------------------------------------------------------
EXIT_CODES = {
    "CR0_READ": 0x00, "CR3_READ": 0x03, "CR4_READ": 0x04, "CR8_READ": 0x08,
    "CR0_WRITE": 0x10, "CR3_WRITE": 0x13, "CR4_WRITE": 0x14, "CR8_WRITE": 0x18,
    "DR0_READ": 0x20, "DR7_READ": 0x27, "DR0_WRITE": 0x30, "DR7_WRITE": 0x37,
    "EXCP_DE": 0x40, "EXCP_DB": 0x41, "EXCP_BP": 0x43, "EXCP_UD": 0x46, "EXCP_GP": 0x4D,
    "EXCP_PF": 0x4E, "EXCP_AC": 0x51, "EXCP_MC": 0x52,
    "INTR": 0x60, "NMI": 0x61, "SMI": 0x62, "INIT": 0x63, "VINTR": 0x64, "CR0_SEL_WRITE": 0x65,
    "IDTR_READ": 0x66, "GDTR_READ": 0x67, "LDTR_READ": 0x68, "TR_READ": 0x69,
    "IDTR_WRITE": 0x6A, "GDTR_WRITE": 0x6B, "LDTR_WRITE": 0x6C, "TR_WRITE": 0x6D,
    "RDTSC": 0x6E, "RDPMC": 0x6F, "PUSHF": 0x70, "POPF": 0x71, "CPUID": 0x72, "RSM": 0x73,
    "IRET": 0x74, "SWINT": 0x75, "INVD": 0x76, "PAUSE": 0x77, "HLT": 0x78, "INVLPG": 0x79,
    "INVLPGA": 0x7A, "IOIO": 0x7B, "MSR": 0x7C, "TASK_SWITCH": 0x7D, "FERR_FREEZE": 0x7E,
    "SHUTDOWN": 0x7F,
    "VMRUN": 0x80, "VMMCALL": 0x81, "VMLOAD": 0x82, "VMSAVE": 0x83, "STGI": 0x84, "CLGI": 0x85,
    "SKINIT": 0x86, "RDTSCP": 0x87, "ICEBP": 0x88, "WBINVD": 0x89, "MONITOR": 0x8A, "MWAIT": 0x8B,
    "MWAIT_CONDITIONAL": 0x8C, "XSETBV": 0x8D, "RDPRU": 0x8E, "EFER_WRITE_TRAP": 0x8F,
    "CR0_WRITE_TRAP": 0x90,
    "INVLPGB": 0xA0, "INVLPGB_ILLEGAL": 0xA1, "INVPCID": 0xA2, "MCOMMIT": 0xA3, "TLBSYNC": 0xA4,
    "BUSLOCK": 0xA5, "IDLE_HLT": 0xA6,
    "NPF": 0x400, "AVIC_INCOMPLETE_IPI": 0x401, "AVIC_NOACCEL": 0x402, "VMGEXIT": 0x403,
    "INVALID": 0xFFFF_FFFF_FFFF_FFFF, "BUSY": 0xFFFF_FFFF_FFFF_FFFE,
    "IDLE_REQUIRED": 0xFFFF_FFFF_FFFF_FFFD, "INVALID_PMC": 0xFFFF_FFFF_FFFF_FFFC,
}
#: architectural exception vectors (APM vol. 2 §8.2, Table 8-1)
VECTORS = {"DE": 0, "DB": 1, "NMI": 2, "BP": 3, "OF": 4, "BR": 5, "UD": 6, "NM": 7, "DF": 8, "TS": 10,
           "NP": 11, "SS": 12, "GP": 13, "PF": 14, "MF": 16, "AC": 17, "MC": 18, "XF": 19, "VC": 29,
           "SX": 30}


@pytest.mark.parametrize("name", sorted(EXIT_CODES))
def test_exit_code_value(name):
    assert int(ExitCode[name]) == EXIT_CODES[name]


def test_invalid_is_minus_one_as_a_64_bit_exitcode():
    assert ExitCode.INVALID == (-1) & 0xFFFF_FFFF_FFFF_FFFF


def _expected_from_name(name: str) -> int | None:
    """An exit code derived from the member's name by §3's ranged rules."""
    import re
    if mo := re.fullmatch(r"CR(\d+)_READ", name):
        return int(mo[1])
    if mo := re.fullmatch(r"CR(\d+)_WRITE", name):
        return 0x10 + int(mo[1])
    if mo := re.fullmatch(r"DR(\d+)_READ", name):
        return 0x20 + int(mo[1])
    if mo := re.fullmatch(r"DR(\d+)_WRITE", name):
        return 0x30 + int(mo[1])
    if mo := re.fullmatch(r"CR(\d+)_WRITE_TRAP", name):
        return 0x90 + int(mo[1])
    if mo := re.fullmatch(r"EXCP_(\w+)", name):
        return 0x40 + VECTORS[mo[1]]
    return EXIT_CODES.get(name)


@pytest.mark.parametrize("member", list(ExitCode), ids=lambda m: m.name)
def test_every_exit_code_member_agrees_with_the_apm(member):
    exp = _expected_from_name(member.name)
    assert exp is not None, f"{member.name} is not an APM exit code"
    assert int(member) == exp


@pytest.mark.parametrize("code,name", [(0x05, "CR5_READ"), (0x1F, "CR15_WRITE"), (0x2A, "DR10_READ"),
                                       (0x3F, "DR15_WRITE"), (0x5F, "EXCP31"), (0x9F, "CR15_WRITE_TRAP")])
def test_exit_name_of_ranged_codes(code, name):
    assert exit_name(code) == name


# -- §1 + §3: intercept flat-bit numbering --------------------------------------------
MISC1 = ["intr", "nmi", "smi", "init", "vintr", "cr0_sel_write", "idtr_read", "gdtr_read", "ldtr_read",
         "tr_read", "idtr_write", "gdtr_write", "ldtr_write", "tr_write", "rdtsc", "rdpmc", "pushf", "popf",
         "cpuid", "rsm", "iret", "intn", "invd", "pause", "hlt", "invlpg", "invlpga", "ioio", "msr",
         "task_switch", "ferr_freeze", "shutdown"]
MISC2 = ["vmrun", "vmmcall", "vmload", "vmsave", "stgi", "clgi", "skinit", "rdtscp", "icebp", "wbinvd",
         "monitor", "mwait", "mwait_conditional", "xsetbv", "rdpru", "efer_write_trap"]
MISC3 = ["invlpgb", "invlpgb_illegal", "invpcid", "mcommit", "tlbsync", "buslock", "idle_hlt"]

#: (name, VMCB byte offset of its 32-bit word, bit in that word)
LOCATIONS = (
    [(f"cr{n}_read", 0x000, n) for n in range(16)] + [(f"cr{n}_write", 0x000, 16 + n) for n in range(16)]
    + [(f"dr{n}_read", 0x004, n) for n in range(16)] + [(f"dr{n}_write", 0x004, 16 + n) for n in range(16)]
    + [(f"excp{n}", 0x008, n) for n in range(32)]
    + [(n, 0x00C, b) for b, n in enumerate(MISC1)]
    + [(n, 0x010, b) for b, n in enumerate(MISC2)]
    + [(f"cr{n}_write_trap", 0x010, 16 + n) for n in range(16)]
    + [(n, 0x014, b) for b, n in enumerate(MISC3)]
)
#: the §3 exit code of each intercept, from the exit-code table (not from the bit position)
EXIT_OF = {
    **{f"cr{n}_read": n for n in range(16)}, **{f"cr{n}_write": 0x10 + n for n in range(16)},
    **{f"dr{n}_read": 0x20 + n for n in range(16)}, **{f"dr{n}_write": 0x30 + n for n in range(16)},
    **{f"excp{n}": 0x40 + n for n in range(32)}, **{f"cr{n}_write_trap": 0x90 + n for n in range(16)},
    "intr": 0x60, "nmi": 0x61, "smi": 0x62, "init": 0x63, "vintr": 0x64, "cr0_sel_write": 0x65,
    "idtr_read": 0x66, "gdtr_read": 0x67, "ldtr_read": 0x68, "tr_read": 0x69, "idtr_write": 0x6A,
    "gdtr_write": 0x6B, "ldtr_write": 0x6C, "tr_write": 0x6D, "rdtsc": 0x6E, "rdpmc": 0x6F, "pushf": 0x70,
    "popf": 0x71, "cpuid": 0x72, "rsm": 0x73, "iret": 0x74, "intn": 0x75, "invd": 0x76, "pause": 0x77,
    "hlt": 0x78, "invlpg": 0x79, "invlpga": 0x7A, "ioio": 0x7B, "msr": 0x7C, "task_switch": 0x7D,
    "ferr_freeze": 0x7E, "shutdown": 0x7F, "vmrun": 0x80, "vmmcall": 0x81, "vmload": 0x82, "vmsave": 0x83,
    "stgi": 0x84, "clgi": 0x85, "skinit": 0x86, "rdtscp": 0x87, "icebp": 0x88, "wbinvd": 0x89,
    "monitor": 0x8A, "mwait": 0x8B, "mwait_conditional": 0x8C, "xsetbv": 0x8D, "rdpru": 0x8E,
    "efer_write_trap": 0x8F, "invlpgb": 0xA0, "invlpgb_illegal": 0xA1, "invpcid": 0xA2, "mcommit": 0xA3,
    "tlbsync": 0xA4, "buslock": 0xA5, "idle_hlt": 0xA6,
}


@pytest.mark.parametrize("name,off,bit", LOCATIONS, ids=[n for n, _, _ in LOCATIONS])
def test_intercept_bits(name, off, bit):
    # APMC: the exit code equals the flat bit position (word * 32 + bit) -- both from our transcriptions
    assert (off // 4) * 32 + bit == EXIT_OF[name]
    assert I.INTERCEPT_BITS[name] == EXIT_OF[name]


def test_no_unknown_intercept_names():
    assert set(I.INTERCEPT_BITS) == set(EXIT_OF)


@pytest.mark.parametrize("name,off,bit", LOCATIONS[::3] + [l for l in LOCATIONS if l[0] in MISC1 + MISC2 + MISC3],
                         ids=lambda x: str(x))
def test_set_intercept_sets_the_raw_vmcb_bit(mem, name, off, bit):
    hpa = 0x7000
    v = VMCB(mem, hpa)
    mem.write(hpa, bytes(0x1000))
    v.set_intercept(I.INTERCEPT_BITS[name])
    words = struct.unpack("<6I", mem.read(hpa, 24))
    expect = [0] * 6
    expect[off // 4] = 1 << bit
    assert list(words) == expect
    assert mem.read(hpa + 24, 0x1000 - 24) == bytes(0x1000 - 24)
    assert v.intercept(I.INTERCEPT_BITS[name])
    v.set_intercept(I.INTERCEPT_BITS[name], False)
    assert mem.read(hpa, 24) == bytes(24)


def test_machine_intercept_by_name_arms_the_apm_bit():
    from sandbox import Machine
    m = Machine(dram=8 << 20, ram=2 << 20)
    hpa = m.guest.vmcb_hpa
    before = struct.unpack("<6I", m.mem.read(hpa, 24))
    m.intercept("rdtsc")                      # misc1 bit 14
    m.intercept("xsetbv")                     # misc2 bit 13
    m.intercept("cpuid", on=False)            # misc1 bit 18
    after = struct.unpack("<6I", m.mem.read(hpa, 24))
    assert after[3] == (before[3] | (1 << 14)) & ~(1 << 18)
    assert after[4] == before[4] | (1 << 13)
    # defaults (hypervisor.default_intercepts): VMRUN bit 0 and VMMCALL bit 1 of misc2, HLT bit 24 of misc1
    assert before[4] & 0b11 == 0b11 and before[3] >> 24 & 1


# -- §4 EVENTINJ / EXITINTINFO ----------------------------------------------------------
def test_event_type_values():
    assert (EventType.INTR, EventType.NMI, EventType.EXCEPTION, EventType.SOFT_INT) == (0, 2, 3, 4)


def _encode(vector, type_, err, valid):
    v = vector | (type_ << 8) | ((1 << 31) if valid else 0)
    if err is not None:
        v |= (1 << 11) | (err << 32)
    return v


@pytest.mark.parametrize("ev,raw", [
    (Event(0, EventType.EXCEPTION), 0x8000_0300),                         # #DE
    (Event(14, EventType.EXCEPTION, 0x2), 0x0000_0002_8000_0B0E),         # #PF, error 2
    (Event(2, EventType.NMI), 0x8000_0202),
    (Event(0x80, EventType.SOFT_INT), 0x8000_0480),
    (Event(0x20, EventType.INTR, valid=False), 0x20),
    (Event(13, EventType.EXCEPTION, 0xFFFF_FFFF), 0xFFFF_FFFF_8000_0B0D),
])
def test_event_encode_examples(ev, raw):
    assert ev.encode() == raw
    assert Event.decode(raw) == ev


@settings(max_examples=300, deadline=None)
@given(vector=st.integers(0, 255), type_=st.sampled_from(list(EventType)),
       err=st.none() | st.integers(0, 0xFFFF_FFFF), valid=st.booleans())
def test_event_round_trip(vector, type_, err, valid):
    ev = Event(vector, type_, err, valid)
    raw = ev.encode()
    assert raw == _encode(vector, int(type_), err, valid)
    assert raw & 0x7FFF_F000 == 0                # bits 30:12 reserved, SBZ
    assert Event.decode(raw) == ev


@settings(max_examples=300, deadline=None)
@given(raw=st.integers(0, (1 << 64) - 1))
def test_event_decode_extracts_the_fields(raw):
    ev = Event.decode(raw)
    assert ev.vector == raw & 0xFF
    assert int(ev.type) == (raw >> 8) & 7
    assert ev.valid == bool(raw >> 31 & 1)
    assert ev.error_code == ((raw >> 32) if raw >> 11 & 1 else None)


def test_inject_writes_eventinj(mem):
    hpa = 0x9000
    v = VMCB(mem, hpa)
    mem.write(hpa, bytes(0x1000))
    v.inject(Event(14, EventType.EXCEPTION, 0x6))
    assert mem.read(hpa + 0xA8, 8) == struct.pack("<Q", 0x0000_0006_8000_0B0E)
