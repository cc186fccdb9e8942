"""AVIC (APM vol. 2 §15.29) in the processor model: guest APIC-page accesses
by class, delivery from the virtual IRR, IPIs through the APIC ID tables, and
the AVIC_NOACCEL / AVIC_INCOMPLETE_IPI exits with their EXITINFO.

Expected values come from the APM: exit codes 401h/402h (Appendix C);
AVIC_NOACCEL EXITINFO1 = write (bit 32) | offset (11:4), a trap leaving RIP
after the instruction and a fault at it, EXITINFO2 = the vector of a trapped
EOI; AVIC_INCOMPLETE_IPI EXITINFO1 = ICRH:ICRL, EXITINFO2 = cause ID (63:32:
0 invalid type, 1 not running, 2 invalid target, 3 invalid backing page, 4
invalid vector) | table index; physical table entries (host APIC ID 7:0,
backing page 51:12, IsRunning 62, valid 63), logical entries (guest physical
ID 7:0, valid 31); the xAPIC register offsets and priority rules of the SDM
(ch. 11) -- and instruction bytes from keystone.
"""
from __future__ import annotations

import struct

from sandbox.svm.exitcodes import ExitCode
from sandbox.svm.vmcb import VIntr
from tests.conftest import DATA, asm_set_gate, assemble, capture, hc_exit

BAR = 0x300000                 # the guest-physical APIC page (identity-mapped by the loader's tables)
IDT = 0x60000
VEC = 0x41
ICR_LO, ICR_HI, TPR, EOI, PPR, SVR, ISR, TMR, IRR, ID = 0x300, 0x310, 0x80, 0xB0, 0xA0, 0xF0, 0x100, 0x180, 0x200, 0x20


class _NoDevice:
    """The APIC page is taken out of the NPT (map_mmio); no device answers it."""
    def mmio_read(self, off, size):
        raise AssertionError("the hypervisor's MMIO path must not see an AVIC access")
    mmio_write = mmio_read


def avic_guest(guest, body: str, *, max_index: int = 0, avic: bool = True):
    """A guest with AVIC on: APIC ID 0, backing page, physical table entry 0
    (valid, running on host APIC 0), an empty logical table, an IDT gate for
    VEC whose handler counts into DATA+8.  ``body`` runs with RBX = the APIC page."""
    src = f"""
    {asm_set_gate(IDT, VEC, "handler")}
    sub rsp, 16
    mov word ptr [rsp], 4095
    mov qword ptr [rsp + 2], {IDT:#x}
    lidt [rsp]
    add rsp, 16
    mov rbx, {BAR:#x}
    mov rsi, {DATA:#x}
    {body}
    {hc_exit(0)}
handler:
    inc qword ptr [rsi + 8]
    mov dword ptr [rbx + {EOI:#x}], 0
    iretq
"""
    m = guest(src, ram=4 << 20)
    m.map_mmio(BAR, 0x1000, _NoDevice())
    mem = m.mem
    pages = {k: mem.alloc_page() for k in ("backing", "physical", "logical", "other")}
    v = m.guest.vmcb
    v.AVIC_APIC_BAR = BAR
    v.AVIC_BACKING_PAGE = pages["backing"]
    v.AVIC_LOGICAL_TABLE = pages["logical"]
    v.AVIC_PHYSICAL_TABLE = pages["physical"] | max_index
    if avic:
        v.V_INTR = v.V_INTR | VIntr.AVIC_ENABLE
    set_phys(m, pages, 0, pages["backing"], running=True)
    bp(m, pages, "backing", ID, 0)
    bp(m, pages, "backing", 0xE0, 0xFFFFFFFF)          # DFR: flat model
    return m, pages


def set_phys(m, pages, index, backing, running=True, valid=True, host_id=0):
    e = host_id | backing | (1 << 62 if running else 0) | (1 << 63 if valid else 0)
    m.mem.view[pages["physical"] + 8 * index:pages["physical"] + 8 * index + 8] = struct.pack("<Q", e)


def set_logical(m, pages, index, guest_id, valid=True):
    e = guest_id | (1 << 31 if valid else 0)
    m.mem.view[pages["logical"] + 4 * index:pages["logical"] + 4 * index + 4] = struct.pack("<I", e)


def bp(m, pages, page, off, value=None):
    """Read (or write) a 32-bit register in one of the pages."""
    a = pages[page] + off
    if value is None:
        return struct.unpack("<I", bytes(m.mem.view[a:a + 4]))[0]
    m.mem.view[a:a + 4] = struct.pack("<I", value)


def data(m, i=0):
    return struct.unpack("<Q", m.guest.read_phys(DATA + 8 * i, 8))[0]


# ------------------------------------------------------------------ access classes
def test_accelerated_reads_come_from_the_backing_page_without_exits(guest):
    m, pages = avic_guest(guest, f"""
    mov eax, dword ptr [rbx + {TPR:#x}]
    mov qword ptr [rsi + 16], rax
    mov eax, dword ptr [rbx + {IRR + 0x20:#x}]
    mov qword ptr [rsi + 24], rax
    mov eax, dword ptr [rbx + 0x30]
    mov qword ptr [rsi + 32], rax
    """)
    bp(m, pages, "backing", 0x30, 0x50014)
    bp(m, pages, "backing", IRR + 0x20, 1 << 3)       # vector 0x43 (IF = 0: not delivered)
    bp(m, pages, "backing", TPR, 0x50)
    r = m.run(timeout=20)
    assert r.exit_code == 0
    assert set(r.counts) == {ExitCode.VMMCALL}        # no AVIC exit, no NPF
    assert (data(m, 2), data(m, 3), data(m, 4)) == (0x50, 1 << 3, 0x50014)
    assert m.cpu.avic.stats.reads == 3


def test_tpr_write_is_accelerated_and_unblocks_a_pending_interrupt(guest):
    """SDM §11.8.3.1: a vector is delivered when its class beats the PPR; lowering
    the TPR with an accelerated write makes the processor evaluate the IRR."""
    m, pages = avic_guest(guest, f"""
    sti
    mov dword ptr [rbx + {TPR:#x}], 0x50
    mov rax, qword ptr [rsi + 8]
    mov qword ptr [rsi + 16], rax
    mov dword ptr [rbx + {TPR:#x}], 0x10
    nop
    mov rax, qword ptr [rsi + 8]
    mov qword ptr [rsi + 24], rax
    cli
    """)
    bp(m, pages, "backing", IRR + 0x20, 1 << (VEC & 31))
    bp(m, pages, "backing", TPR, 0x50)
    r = m.run(timeout=20)
    assert r.exit_code == 0 and set(r.counts) == {ExitCode.VMMCALL}
    assert data(m, 2) == 0 and data(m, 3) == 1          # held by TPR 0x50, taken after TPR 0x10
    assert bp(m, pages, "backing", TPR) == 0x10
    assert bp(m, pages, "backing", IRR + 0x20) == 0 and bp(m, pages, "backing", ISR + 0x20) == 0   # EOI'd
    assert bp(m, pages, "backing", PPR) == 0x10


def test_trap_write_completes_then_exits_after_the_instruction(guest):
    m, pages = avic_guest(guest, f"mov dword ptr [rbx + {SVR:#x}], 0x1FF")
    recs = capture(m, ExitCode.AVIC_NOACCEL)
    m.run(timeout=20)
    (e,) = recs
    assert e.code == ExitCode.AVIC_NOACCEL == 0x402
    assert e.info1 == (1 << 32) | SVR and e.info2 == 0
    assert bp(m, pages, "backing", SVR) == 0x1FF          # the write completed
    store = assemble(f"mov dword ptr [rbx + {SVR:#x}], 0x1FF", 0)
    assert m.guest.read_phys(e.rip - len(store), len(store)) == store   # RIP is past the store


def test_fault_read_exits_at_the_instruction(guest):
    m, pages = avic_guest(guest, "mov eax, dword ptr [rbx + 0x390]")      # timer current count
    recs = capture(m, ExitCode.AVIC_NOACCEL)
    m.run(timeout=20)
    (e,) = recs
    assert e.info1 == 0x390 and e.info2 == 0
    load = assemble("mov eax, dword ptr [rbx + 0x390]", e.rip)
    assert m.guest.read_phys(e.rip, len(load)) == load


def test_fault_write_to_a_read_only_register_leaves_the_page_alone(guest):
    m, pages = avic_guest(guest, f"mov dword ptr [rbx + {PPR:#x}], 0x77")
    recs = capture(m, ExitCode.AVIC_NOACCEL)
    m.run(timeout=20)
    (e,) = recs
    assert e.info1 == (1 << 32) | PPR
    store = assemble(f"mov dword ptr [rbx + {PPR:#x}], 0x77", e.rip)
    assert m.guest.read_phys(e.rip, len(store)) == store         # a fault: RIP at the store
    assert bp(m, pages, "backing", PPR) == 0


def test_unaligned_access_faults(guest):
    m, pages = avic_guest(guest, f"mov byte ptr [rbx + {TPR + 1:#x}], 0x10")
    recs = capture(m, ExitCode.AVIC_NOACCEL)
    m.run(timeout=20)
    (e,) = recs
    assert e.info1 == (1 << 32) | TPR
    assert bp(m, pages, "backing", TPR) == 0


def test_without_avic_enable_the_access_is_an_npf(guest):
    m, pages = avic_guest(guest, f"mov dword ptr [rbx + {TPR:#x}], 0x10", avic=False)
    recs = capture(m, ExitCode.NPF)
    m.run(timeout=20)
    (e,) = recs
    assert e.info2 == BAR + TPR


# ------------------------------------------------------------------ delivery and EOI
def test_pending_irr_is_delivered_when_the_guest_sets_if_and_eoi_is_accelerated(guest):
    m, pages = avic_guest(guest, "sti\nnop\nnop\ncli\nmov eax, dword ptr [rbx + 0xA0]\nmov qword ptr [rsi + 16], rax")
    bp(m, pages, "backing", IRR + 0x20, 1 << (VEC & 31))
    r = m.run(timeout=20)
    assert r.exit_code == 0 and set(r.counts) == {ExitCode.VMMCALL}
    assert data(m, 1) == 1
    assert bp(m, pages, "backing", IRR + 0x20) == 0 and bp(m, pages, "backing", ISR + 0x20) == 0
    assert data(m, 2) == 0                                # PPR after the EOI
    assert m.cpu.avic.stats.delivered == 1 and m.cpu.avic.stats.eois == 1


def test_irr_posted_during_an_exit_is_delivered_at_vmrun(guest):
    """The hypervisor sets the IRR while it handles an exit: the next VMRUN delivers it."""
    m, pages = avic_guest(guest, "sti\ncpuid\nmov rax, qword ptr [rsi + 8]\nmov qword ptr [rsi + 16], rax\ncli")
    m.intercept("cpuid")
    handler = m.handlers[ExitCode.CPUID]

    def post(m, e):
        bp(m, pages, "backing", IRR + 0x20, 1 << (VEC & 31))
        return handler(m, e)
    m.handlers[ExitCode.CPUID] = post
    r = m.run(timeout=20)
    assert r.exit_code == 0 and r.counts == {ExitCode.CPUID: 1, ExitCode.VMMCALL: 1}
    assert data(m, 2) == 1                                # taken right after CPUID, before the next load


def test_level_triggered_eoi_traps_with_the_vector(guest):
    m, pages = avic_guest(guest, "sti\nnop\ncli")
    bp(m, pages, "backing", IRR + 0x20, 1 << (VEC & 31))
    bp(m, pages, "backing", TMR + 0x20, 1 << (VEC & 31))
    recs = capture(m, ExitCode.AVIC_NOACCEL)
    m.run(timeout=20)
    (e,) = recs
    assert e.info1 == (1 << 32) | EOI and e.info2 == VEC
    assert bp(m, pages, "backing", ISR + 0x20) == 1 << (VEC & 31)    # left for the hypervisor
    assert m.guest.read_phys(e.rip, 2) == b"\x48\xcf"   # a trap: RIP is the handler's IRETQ, after the EOI


def test_v_irq_is_ignored_with_avic(guest):
    m, pages = avic_guest(guest, "sti\nnop\nnop\ncli")
    v = m.guest.vmcb
    v.V_INTR = v.V_INTR | VIntr.V_IRQ | VIntr.V_IGN_TPR
    v.V_INTR_VECTOR = VEC
    r = m.run(timeout=20)
    assert r.exit_code == 0 and data(m, 1) == 0


# ------------------------------------------------------------------ IPIs
def _ipi_body(lo: int, hi: int = 0) -> str:
    return f"mov dword ptr [rbx + {ICR_HI:#x}], {hi:#x}\nmov dword ptr [rbx + {ICR_LO:#x}], {lo:#x}\nnop"


def test_self_ipi_is_delivered_without_an_exit(guest):
    m, pages = avic_guest(guest, "sti\n" + _ipi_body((1 << 18) | VEC) + "\nnop\ncli")
    r = m.run(timeout=20)
    assert r.exit_code == 0 and set(r.counts) == {ExitCode.VMMCALL}
    assert data(m, 1) == 1 and m.cpu.avic.stats.ipis == 1


def test_physical_ipi_to_itself_is_delivered(guest):
    m, pages = avic_guest(guest, "sti\n" + _ipi_body(VEC, 0 << 24) + "\nnop\ncli")
    r = m.run(timeout=20)
    assert r.exit_code == 0 and set(r.counts) == {ExitCode.VMMCALL} and data(m, 1) == 1


def test_ipi_to_a_target_not_running_sets_its_irr_and_exits(guest):
    lo, hi = VEC, 1 << 24
    m, pages = avic_guest(guest, _ipi_body(lo, hi), max_index=1)
    set_phys(m, pages, 1, pages["other"], running=False)
    recs = capture(m, ExitCode.AVIC_INCOMPLETE_IPI)
    m.run(timeout=20)
    (e,) = recs
    assert e.code == 0x401
    assert e.info1 == (hi << 32) | lo and e.info2 == (1 << 32) | 1
    assert bp(m, pages, "other", IRR + 0x20) == 1 << (VEC & 31)
    assert bp(m, pages, "backing", ICR_LO) == lo            # a trap: the ICR holds the value


def test_ipi_to_a_running_target_elsewhere_rings_its_doorbell(guest):
    m, pages = avic_guest(guest, _ipi_body(VEC, 1 << 24), max_index=1)
    set_phys(m, pages, 1, pages["other"], running=True, host_id=7)
    r = m.run(timeout=20)
    assert r.exit_code == 0 and set(r.counts) == {ExitCode.VMMCALL}
    assert m.cpu.avic.stats.doorbells_sent == [7]
    assert bp(m, pages, "other", IRR + 0x20) == 1 << (VEC & 31)


def test_ipi_beyond_the_max_index_is_an_invalid_target(guest):
    lo, hi = VEC, 5 << 24
    m, pages = avic_guest(guest, _ipi_body(lo, hi), max_index=1)
    recs = capture(m, ExitCode.AVIC_INCOMPLETE_IPI)
    m.run(timeout=20)
    (e,) = recs
    assert e.info2 == (2 << 32) | 5


def test_ipi_to_an_invalid_physical_entry_is_an_invalid_backing_page(guest):
    m, pages = avic_guest(guest, _ipi_body(VEC, 1 << 24), max_index=1)
    set_phys(m, pages, 1, pages["other"], valid=False)
    recs = capture(m, ExitCode.AVIC_INCOMPLETE_IPI)
    m.run(timeout=20)
    (e,) = recs
    assert e.info2 == (3 << 32) | 1


def test_nmi_ipi_is_an_invalid_interrupt_type(guest):
    lo = (4 << 8) | (1 << 18)                               # delivery mode NMI, to self
    m, pages = avic_guest(guest, _ipi_body(lo))
    recs = capture(m, ExitCode.AVIC_INCOMPLETE_IPI)
    m.run(timeout=20)
    (e,) = recs
    assert e.info1 == lo and e.info2 == 0


def test_ipi_with_an_illegal_vector(guest):
    m, pages = avic_guest(guest, _ipi_body(0x05 | (1 << 18)))
    recs = capture(m, ExitCode.AVIC_INCOMPLETE_IPI)
    m.run(timeout=20)
    (e,) = recs
    assert e.info2 >> 32 == 4


def test_logical_ipi_goes_through_the_logical_table(guest):
    """Flat model (DFR 0xFFFFFFFF): destination bit b is logical table index b."""
    m, pages = avic_guest(guest, "sti\n" + _ipi_body(VEC | (1 << 11), 0x04 << 24) + "\nnop\ncli", max_index=1)
    set_logical(m, pages, 2, 1)
    set_phys(m, pages, 1, pages["other"], running=True, host_id=3)
    r = m.run(timeout=20)
    assert r.exit_code == 0 and m.cpu.avic.stats.doorbells_sent == [3]
    assert bp(m, pages, "other", IRR + 0x20) == 1 << (VEC & 31)


def test_logical_ipi_to_an_invalid_entry_is_an_invalid_target(guest):
    m, pages = avic_guest(guest, _ipi_body(VEC | (1 << 11), 0x08 << 24))
    recs = capture(m, ExitCode.AVIC_INCOMPLETE_IPI)
    m.run(timeout=20)
    (e,) = recs
    assert e.info2 == (2 << 32) | 3


# ------------------------------------------------------------------ doorbells
def test_doorbell_while_running_delivers_without_an_exit(guest):
    """A device on another processor posts the IRR and rings the doorbell at a
    point of guest time; the spinning guest takes it with no exit."""
    m, pages = avic_guest(guest, """
    sti
spin:
    pause
    cmp qword ptr [rsi + 8], 3
    jb spin
    cli
    """)
    posted = []

    def device():
        if len(posted) < 3:
            posted.append(1)
            bp(m, pages, "backing", IRR + 0x20, 1 << (VEC & 31))
            m.cpu.avic_doorbell(0)
    m.cpu.schedule_remote(5_000, device)
    r = m.run(max_insns=1 << 40, timeout=20)
    assert r.exit_code == 0 and set(r.counts) == {ExitCode.VMMCALL}
    assert data(m, 1) == 3 and m.cpu.avic.stats.doorbells_received == 3


def test_doorbell_for_another_processor_does_not_deliver_here(guest):
    m, pages = avic_guest(guest, "sti\nspin:\npause\njmp spin")
    def device():
        bp(m, pages, "backing", IRR + 0x20, 1 << (VEC & 31))
        m.cpu.avic_doorbell(9)
    m.cpu.schedule_remote(5_000, device)
    m.run(max_insns=200_000, timeout=20)
    assert data(m, 1) == 0 and m.cpu.avic.stats.doorbells_sent[:1] == [9]


def test_avic_vmcb_fields_and_exit_codes_match_the_apm():
    """APM Table B-1: V_INTR bit 31 AVIC enable, bit 30 x2AVIC; AVIC_APIC_BAR 098h,
    backing page 0E0h, logical table 0F0h, physical table 0F8h; Appendix C: 401h, 402h."""
    from sandbox.svm import vmcb as V
    assert VIntr.AVIC_ENABLE == 1 << 31 and VIntr.X2AVIC_ENABLE == 1 << 30
    assert (V.OFF_AVIC_APIC_BAR, V.OFF_AVIC_BACKING_PAGE, V.OFF_AVIC_LOGICAL_TABLE,
            V.OFF_AVIC_PHYSICAL_TABLE) == (0x98, 0xE0, 0xF0, 0xF8)
    assert (ExitCode.AVIC_INCOMPLETE_IPI, ExitCode.AVIC_NOACCEL) == (0x401, 0x402)
