"""Event injection and exception delivery.

EVENTINJ / EXITINTINFO layout: APM §15.20 Fig. 15-5.
Exception intercepts: exit code 0x40 + vector, EXITINFO1 = error code for
#GP/#NP/..., NRIP only for INT3 (§3, §15.12).  Guest delivery follows the
long-mode interrupt frame (APM vol. 2 §8.9.3: RSP aligned to 16, then SS, RSP,
RFLAGS, CS, RIP and the error code pushed); #NP/#GP error codes for IDT gates
use the selector format (vector * 8 + IDT bit 2 + EXT bit 1, §8.4.1).
Shutdown: kvm-unit-tests svm_shutdown_intercept_test.
"""
from __future__ import annotations

import pytest

from sandbox import Event, EventType, Segment

from conftest import (asm_set_gate, BASE, DATA, IDT_BASE, STUB_SIZE, STUBS, TSS_BASE, VMMCALL, assemble, capture, hc_exit,
                      idt_gate, install_reporting_idt, user_code_addr, user_guest)

V = 1 << 31
RSP0 = 0x90000            # loader: initial RSP
CS_SEL, SS_SEL = 0x08, 0x10


# ============================================================ KUT exc_inject
def exc_inject_src() -> str:
    """The guest builds an IDT with its own #DE handler (vector 0), which counts
    at DATA and returns with IRETQ; then it executes VMMCALL twice."""
    return asm_set_gate(IDT_BASE, 0, "de_handler") + f"""
    mov rax, idtr
    lidt [rax]
    mov eax, 0x10
    {VMMCALL}
    {VMMCALL}
{hc_exit(0x55)}
de_handler:
    inc qword ptr [{DATA:#x}]
    iretq
idtr:
    .word 0xfff
    .quad {IDT_BASE:#x}
"""


def count(m) -> int:
    return int.from_bytes(m.guest.read_phys(DATA, 8), "little")


def test_exc_inject(guest):
    """kvm-unit-tests exc_inject: vector 2 as an exception is VMEXIT_INVALID and
    not injected; #DE is injected, the guest handler runs, EVENTINJ.V is cleared."""
    m = guest(exc_inject_src())
    stage = []

    @m.on(0x81)
    def vmmcall(m, e):
        stage.append(count(m))
        m.advance(e)
        if len(stage) == 1:
            m.guest.vmcb.EVENTINJ = 2 | (3 << 8) | V          # NMI vector as an exception
            return None
        stage.append(m.guest.vmcb.EVENTINJ)
        return m.stop("second-vmmcall")
    r = m.run(timeout=5)
    assert r.reason == "invalid-vmcb" and m.guest.vmcb.EXITCODE == 0xFFFF_FFFF_FFFF_FFFF
    assert count(m) == 0, "exception with vector 2 not injected"
    m.guest.vmcb.EVENTINJ = 0 | (3 << 8) | V                  # #DE
    r = m.run(timeout=5)
    assert r.reason == "second-vmmcall"
    assert stage[1] == 1, "divide error injected"
    assert not stage[2] & V, "EVENTINJ.V cleared"




def test_exc_inject_in_one_run(guest):
    m = guest(exc_inject_src())
    seen = []

    @m.on(0x81)
    def vmmcall(m, e):
        m.advance(e)
        if not seen:
            seen.append("first")
            m.guest.vmcb.EVENTINJ = 2 | (3 << 8) | V
            return None
        seen.append(count(m))
        return m.stop("second-vmmcall")

    @m.on(0xFFFF_FFFF_FFFF_FFFF)
    def invalid(m, e):
        seen.append("invalid")
        m.guest.vmcb.EVENTINJ = 0 | (3 << 8) | V
        return None
    r = m.run(timeout=5)
    assert seen == ["first", "invalid", 1]
    assert r.reason == "second-vmmcall"


# ============================================================ EVENTINJ into a reporting IDT
def injected(guest, ev: Event, pre: str = "nop"):
    m = guest(pre + "\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.guest.vmcb.EVENTINJ = ev.encode()
    r = m.run(timeout=5)
    return m, r


def test_inject_gp_with_error_code(guest):
    m, r = injected(guest, Event(13, EventType.EXCEPTION, 0x1234))
    assert r.exit_code == 0x10D
    # [rsp] error code, RIP, CS, RFLAGS, RSP, SS; RSP 16-aligned then 6 qwords
    assert (r.regs["rsi"], r.regs["rdx"], r.regs["rcx"]) == (0x1234, BASE, CS_SEL)
    assert r.regs["r10"] & 0x2 and (r.regs["r11"], r.regs["r12"]) == (RSP0, SS_SEL)
    assert r.regs["r9"] == RSP0 - 48
    assert not m.guest.vmcb.EVENTINJ & V


def test_inject_external_interrupt(guest):
    m, r = injected(guest, Event(0x30, EventType.INTR))
    assert r.exit_code == 0x130
    assert (r.regs["rsi"], r.regs["rdx"], r.regs["r11"]) == (BASE, CS_SEL, SS_SEL)
    assert r.regs["r9"] == RSP0 - 40


def test_inject_nmi(guest):
    m, r = injected(guest, Event(2, EventType.NMI))
    assert r.exit_code == 0x102 and r.regs["rsi"] == BASE


def test_injected_event_skips_the_exception_intercept(guest):
    """§4: injected events skip intercept checks."""
    m = guest("nop\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.intercept("excp0")
    m.guest.vmcb.EVENTINJ = Event(0, EventType.EXCEPTION).encode()
    r = m.run(timeout=5)
    assert r.exit_code == 0x100 and 0x40 not in r.counts


def test_invalid_eventinj_is_not_delivered(guest):
    m = guest(f"mov byte ptr [{DATA:#x}], 1\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.guest.vmcb.EVENTINJ = 2 | (3 << 8) | V
    r = m.run(timeout=5)
    assert r.reason == "invalid-vmcb" and m.guest.read_phys(DATA, 1) == b"\x00"


# ============================================================ guest-raised, through the guest IDT
def rip_after(pre: str) -> int:
    return BASE + len(assemble(pre))


GUEST_EXC = [
    # (id, code before, faulting/trapping instruction, vector, error code or None, reported RIP: "at"/"after")
    ("ud", "nop", "ud2", 6, None, "at"),
    ("de", "xor edx, edx\nxor ecx, ecx\nmov eax, 1", "div rcx", 0, None, "at"),
    ("gp-noncanonical", "mov rax, 0x8000000000000000", "mov rbx, [rax]", 13, 0, "at"),
    ("gp-selector", "mov ax, 0x18", "mov ds, ax", 13, 0x18, "at"),
    ("bp", "nop", "int3", 3, None, "after"),
    ("nm", "mov rax, cr0\nor eax, 8\nmov cr0, rax", "fnop", 7, None, "at"),
    ("db-single-step", "pushfq\nor qword ptr [rsp], 0x100\npopfq", "nop", 1, None, "after"),
]


@pytest.mark.parametrize("id_,pre,insn,vec,err,where", GUEST_EXC, ids=[c[0] for c in GUEST_EXC])
def test_guest_exception_through_its_idt(guest, id_, pre, insn, vec, err, where):
    m = guest(pre + "\n" + insn + "\n" + hc_exit(0x55))
    install_reporting_idt(m)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 0x100 + vec, (r.reason, r.detail, r.exit_code)
    at = rip_after(pre)
    rip = at if where == "at" else at + len(assemble(insn, at))
    frame = [r.regs[k] for k in ("rsi", "rdx", "rcx", "r10", "r11", "r12")]
    if err is not None:
        assert frame[0] == err
        frame = frame[1:]
    assert frame[0] == rip
    assert frame[1] == CS_SEL
    assert frame[3] == RSP0 and frame[4] == SS_SEL
    assert r.regs["r9"] == RSP0 - (48 if err is not None else 40)
    assert 0x40 + vec not in r.counts


def test_frame_is_pushed_on_a_16_byte_aligned_stack(guest):
    m = guest("sub rsp, 8\nud2\n" + hc_exit(0x55))
    install_reporting_idt(m)
    r = m.run(timeout=5)
    assert r.exit_code == 0x106
    assert r.regs["r10"] == RSP0 - 8                    # saved RSP is the unaligned one
    assert r.regs["r11"] == SS_SEL
    assert r.regs["r9"] == (RSP0 - 8) // 16 * 16 - 40


# ============================================================ triple fault / shutdown
def test_no_idt_triple_fault_is_shutdown(guest):
    m = guest("ud2\n" + hc_exit(0x55))
    rec = capture(m, 0x7F)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].code == 0x7F and r.counts == {0x7F: 1}


def test_no_idt_triple_fault_default_handler(guest):
    m = guest("ud2\n" + hc_exit(0x55))
    r = m.run(timeout=5)
    assert r.reason == "shutdown" and r.counts == {0x7F: 1}


def test_shutdown_without_intercept_stops_the_machine(guest):
    m = guest("ud2\n" + hc_exit(0x55))
    m.intercept("shutdown", on=False)
    r = m.run(timeout=5)
    assert r.reason == "shutdown" and 0x7F not in r.counts


def test_kut_shutdown_intercept_with_unmapped_idt(guest):
    """svm_shutdown_intercept_test: UD2 with IDTR.base on an unmapped page -> 0x7F."""
    m = guest("ud2\n" + hc_exit(0x55))
    m.guest.vmcb.set_seg("IDTR", Segment(0, 0, 0xFFF, 0x40000000))     # beyond the guest's tables
    rec = capture(m, 0x7F)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].code == 0x7F


def test_double_fault_handler_runs(guest):
    """#GP while delivering #GP (gate type invalid) escalates to #DF (error code 0)."""
    m = guest("mov rax, 0x8000000000000000\nmov rbx, [rax]\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.guest.write_phys(IDT_BASE + 13 * 16, bytes(16))                 # #GP gate: type 0
    r = m.run(timeout=5)
    assert r.exit_code == 0x108 and r.regs["rsi"] == 0


# ============================================================ exception intercepts
EXC_INTERCEPT = [
    # (id, pre, insn, vector, EXITINFO1 (None: undefined), NRIP "0"/"next")
    ("ud", "nop", "ud2", 6, None, "0"),
    ("de", "xor edx, edx\nxor ecx, ecx\nmov eax, 1", "div rcx", 0, None, "0"),
    ("gp", "mov rax, 0x8000000000000000", "mov rbx, [rax]", 13, 0, "0"),
    ("gp-selector", "mov ax, 0x18", "mov ds, ax", 13, 0x18, "0"),
    ("bp", "nop", "int3", 3, None, "next"),
    ("nm", "mov rax, cr0\nor eax, 8\nmov cr0, rax", "fnop", 7, None, "0"),
]


@pytest.mark.parametrize("id_,pre,insn,vec,info1,nrip", EXC_INTERCEPT, ids=[c[0] for c in EXC_INTERCEPT])
def test_exception_intercept(guest, id_, pre, insn, vec, info1, nrip):
    """svm_exception_test "handled by L1": exit 0x40 + vector at the instruction."""
    m = guest(pre + "\n" + insn + "\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.intercept(f"excp{vec}")
    rec = capture(m, 0x40 + vec)
    r = m.run(timeout=5)
    assert r.reason == "captured" and r.counts == {0x40 + vec: 1}, (r.reason, r.counts)
    e = rec[0]
    at = rip_after(pre)
    assert e.rip == at
    assert e.nrip == (0 if nrip == "0" else at + len(assemble(insn, at)))
    if info1 is not None:
        assert e.info1 == info1


def test_db_intercept_single_step(guest):
    pre = "pushfq\nor qword ptr [rsp], 0x100\npopfq"
    m = guest(pre + "\nnop\n" + hc_exit(0x55))
    m.intercept("excp1")
    rec = capture(m, 0x41)
    r = m.run(timeout=5)
    assert r.reason == "captured"
    assert rec[0].rip == rip_after(pre) + 1            # trap after the NOP that follows POPF


def test_icebp_does_not_hit_the_db_intercept(guest):
    """§3: ICEBP (F1) does not trigger the #DB intercept; the guest gets #DB."""
    m = guest("int1\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.intercept("excp1")
    r = m.run(timeout=5)
    assert 0x41 not in r.counts and r.exit_code == 0x101


def test_exception_intercept_default_handler_reflects(guest):
    """The default exception handler re-injects the intercepted #UD into the guest."""
    m = guest("ud2\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.intercept("excp6")
    r = m.run(timeout=5)
    assert r.counts.get(0x46) == 1 and r.exit_code == 0x106 and r.regs["rsi"] == BASE


# ============================================================ EXITINTINFO
def not_present_gate(m, vec):
    g = bytearray(idt_gate(STUBS + vec * STUB_SIZE))
    g[5] &= 0x7F                          # clear P (bit 47)
    m.guest.write_phys(IDT_BASE + vec * 16, bytes(g))


def np_exit(guest, src, vec, inject: Event | None = None):
    m = guest(src + "\n" + hc_exit(0x55))
    install_reporting_idt(m)
    not_present_gate(m, vec)
    m.intercept("excp11")
    if inject is not None:
        m.guest.vmcb.EVENTINJ = inject.encode()
    rec = capture(m, 0x4B)
    r = m.run(timeout=5)
    assert r.reason == "captured", (r.reason, r.detail)
    return rec[0]


# (id, source, vector, injected event, #NP error code = vector*8 + 2 (IDT) + EXT, EXITINTINFO)
NP_CASES = [
    ("ud2", "ud2", 6, None, 6 * 8 + 3, V | (3 << 8) | 6),
    ("inject-intr", "nop", 0x30, Event(0x30, EventType.INTR), 0x30 * 8 + 3, V | (0 << 8) | 0x30),
    ("inject-nmi", "nop", 2, Event(2, EventType.NMI), 2 * 8 + 3, V | (2 << 8) | 2),
    ("int-0x80", "int 0x80", 0x80, None, 0x80 * 8 + 2, V | (4 << 8) | 0x80),
]


@pytest.mark.parametrize("id_,src,vec,inj,err,intinfo", NP_CASES, ids=[c[0] for c in NP_CASES])
def test_np_during_delivery_error_code(guest, id_, src, vec, inj, err, intinfo):
    e = np_exit(guest, src, vec, inj)
    assert (e.code, e.info1, e.rip) == (0x4B, err, BASE)
    assert e.exitintinfo & V and e.exitintinfo & 0xFF == vec


def test_exitintinfo_of_an_exception(guest):
    e = np_exit(guest, "ud2", 6)
    assert e.exitintinfo == V | (3 << 8) | 6




@pytest.mark.parametrize("id_,src,vec,inj,err,intinfo", NP_CASES[1:], ids=[c[0] for c in NP_CASES[1:]])
def test_exitintinfo_type_of_interrupts(guest, id_, src, vec, inj, err, intinfo):
    e = np_exit(guest, src, vec, inj)
    assert e.exitintinfo == intinfo


# ============================================================ virtual interrupts (§7, KUT virq_inject)
V_IRQ, V_IGN_TPR, V_INTR_MASKING = 1 << 8, 1 << 20, 1 << 24


def virq_guest(guest, body: str, prio: int = 0xF, tpr: int = 0, ign_tpr: bool = False, rflags: int = 0x2,
               vector: int = 0x40):
    m = guest(body + "\n" + hc_exit(0x55))
    install_reporting_idt(m)
    v = m.guest.vmcb
    v.RFLAGS = rflags
    v.V_INTR = V_IRQ | V_INTR_MASKING | (prio << 16) | tpr | (V_IGN_TPR if ign_tpr else 0)
    v.V_INTR_VECTOR = vector
    return m


def test_virq_taken_at_vmrun_when_if_is_set(guest):
    m = virq_guest(guest, "nop\nnop", rflags=0x202)
    r = m.run(timeout=5)
    assert r.exit_code == 0x140 and r.regs["rsi"] == BASE
    assert not m.guest.vmcb.V_INTR & V_IRQ, "V_IRQ cleared when the interrupt is taken"


def test_virq_held_while_if_is_clear(guest):
    m = virq_guest(guest, "nop\nnop", rflags=0x2)
    r = m.run(timeout=5)
    assert r.exit_code == 0x55
    assert m.guest.vmcb.V_INTR & V_IRQ


def test_virq_ign_tpr(guest):
    m = virq_guest(guest, "nop", prio=0x8, tpr=0xA, ign_tpr=True, rflags=0x202)
    assert m.run(timeout=5).exit_code == 0x140




@pytest.mark.parametrize("body", ["nop\nsti\nnop\nnop\nnop", "push 0x202\npopfq\nnop\nnop"], ids=["sti", "popf"])
def test_virq_taken_after_the_guest_sets_if(guest, body):
    m = virq_guest(guest, body, rflags=0x2)
    r = m.run(timeout=5)
    assert r.exit_code == 0x140




def test_virq_blocked_by_v_tpr(guest):
    m = virq_guest(guest, "nop\nnop", prio=0x8, tpr=0xA, rflags=0x202)
    r = m.run(timeout=5)
    assert r.exit_code == 0x55 and m.guest.vmcb.V_INTR & V_IRQ




def test_vintr_intercept_exit_reaches_the_hypervisor(guest):
    m = virq_guest(guest, "nop", rflags=0x202)
    m.intercept("vintr")
    rec = capture(m, 0x64)
    r = m.run(timeout=5)
    assert r.reason == "captured" and r.counts == {0x64: 1} and rec[0].code == 0x64


def test_vintr_exit_after_a_resumed_exit_reaches_the_hypervisor(guest):
    m = guest(f"sti\nmov eax, 5\n{VMMCALL}\nnop\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.intercept("vintr")
    default = m.handlers[0x81]

    @m.on(0x81)
    def h(m, e):
        if m.regs.rax == 5:
            m.guest.vmcb.V_INTR = V_IRQ | V_INTR_MASKING | (0xF << 16)
            m.guest.vmcb.V_INTR_VECTOR = 0x41
            m.advance(e)
            return None
        return default(m, e)
    rec = capture(m, 0x64)
    r = m.run(timeout=5)
    assert r.reason == "captured" and rec[0].code == 0x64



# ============================================================ IDT limit, IST, NPF during delivery
@pytest.mark.parametrize("src,inj,err", [
    ("int 0x20", None, 0x20 * 8 + 2),                                  # software: EXT = 0
    ("nop", Event(0x30, EventType.INTR), 0x30 * 8 + 2 + 1),            # external: EXT = 1
])
def test_vector_beyond_the_idt_limit_is_gp(guest, src, inj, err):
    m = guest(src + "\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.guest.vmcb.set_seg("IDTR", Segment(0, 0, 14 * 16 - 1, IDT_BASE))      # vectors 0-13 only
    if inj is not None:
        m.guest.vmcb.EVENTINJ = inj.encode()
    r = m.run(timeout=5)
    assert r.exit_code == 0x10D and r.regs["rsi"] == err and r.regs["rdx"] == BASE


def test_ist_stack(guest):
    """A #UD gate with IST = 1: the frame goes on TSS.IST1 (APM vol. 2 §8.9.4)."""
    ist1 = 0x7C000
    m = user_guest(guest, "ud2")
    m.guest.write_phys(TSS_BASE + 0x24, ist1.to_bytes(8, "little"))
    m.guest.write_phys(IDT_BASE + 6 * 16, idt_gate(STUBS + 6 * STUB_SIZE, ist=1))
    r = m.run(timeout=5)
    assert r.exit_code == 0x106 and r.regs["rsi"] == user_code_addr()
    assert r.regs["r9"] == ist1 - 40


def test_npf_while_reading_the_idt(guest):
    """The IDT page not present in the nPT: delivering #UD faults on the final GPA of
    the gate read -> NPF, EXITINTINFO = the #UD being delivered."""
    m = guest("ud2\n" + hc_exit(0x55))
    install_reporting_idt(m)
    m.guest.npt.protect(IDT_BASE, present=False)
    rec = capture(m, 0x400)
    r = m.run(timeout=5)
    assert r.reason == "captured"
    e = rec[0]
    assert e.info1 == (1 << 32) | 0x4 and e.info2 == IDT_BASE + 6 * 16          # the #UD gate
    assert e.exitintinfo == V | (3 << 8) | 6 and e.rip == BASE


def test_reflected_exceptions_combine_into_df_then_shutdown(guest):
    """No IDT, #UD and #GP intercepted, the default handler reflecting both.
    Each delivery faults (#GP, IDT limit) and exits as #GP with EXITINTINFO =
    the event being delivered (APM §15.7.2); the hypervisor then applies the
    double-fault rules (Table 8-7): #UD is benign, so #GP is delivered; #GP
    during #GP is #DF; #GP during #DF is a shutdown.  (Without the rules the
    reflected #GP bounced between the intercept and delivery forever.)"""
    m = guest("ud2\n" + hc_exit(0))
    from sandbox import Segment
    m.guest.vmcb.set_seg("IDTR", Segment(0, 0, 0, 0))
    m.intercept("excp6,excp13")
    seen = []
    m.on_exit_record = lambda rec: seen.append((rec.exitcode, rec.exitintinfo & 0xFF if rec.exitintinfo >> 31 & 1
                                                else None))
    r = m.run(timeout=5, max_exits=50)
    assert r.reason == "shutdown", r
    assert seen == [(0x46, None), (0x4D, 6), (0x4D, 13), (0x4D, 8)]
