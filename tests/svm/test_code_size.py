"""Instructions are decoded for the code segment they run in (APM vol. 3 §1.2): outside
64-bit mode 40-4F are INC/DEC, not REX, and the default operand and address sizes are
the segment's (32 for CS.D = 1, 16 for CS.D = 0); 67 and 66 switch to the other one.

What an intercept reports follows: IOIO's EXITINFO1 names the operand size (SZ8/16/32)
and the address size (A16/A32/A64, one-hot; APM vol. 2 §15.10.2 Figure 15-2), INVLPG's
the linear address (APM vol. 2 "Decode Assists"; KVM reads it as such).  The
guests here far-return from 64-bit code into a 32-bit (compatibility mode) or a 16-bit
code segment, as kvm-unit-tests' svm_exception_test does for INTO."""
from __future__ import annotations

import struct

from conftest import BASE, assemble, capture, hc_exit

from sandbox import RESUME, Segment
from sandbox.svm import decode as D
from sandbox.svm.iopm import IoioInfo

CODE32, CODE16 = 0x18, 0x20
#: null, 64-bit code (0x08), data (0x10), 32-bit code (0x18), 16-bit code (0x20); every base 0
GDT = struct.pack("<5Q", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CF9B000000FFFF, 0x008F9B000000FFFF)
GDT_AT = 0x1000
DATA = 0x4000
IOIO, INVLPG = 0x7B, 0x79


def _far(guest, selector: int, body: str):
    """64-bit code far-returns to ``body`` in the code segment ``selector``; returns the
    machine and the address of ``body``'s first instruction."""
    head = f"push {selector:#x}\nmov rax, far\npush rax\nretfq\nfar:\n"
    m = guest(head + body + "\n" + hc_exit(0x55))
    m.guest.write_phys(GDT_AT, GDT)
    m.guest.vmcb.set_seg("GDTR", Segment(0, 0, len(GDT) - 1, GDT_AT))
    return m, BASE + len(assemble(head))


def _ioio(m, ports=(0x80,)):
    m.set_ports(list(ports))
    return capture(m, IOIO)


def test_rep_outsb_in_compatibility_mode_reports_a32(guest):
    m, at = _far(guest, CODE32, f"mov esi, {DATA:#x}\nmov ecx, 3\nmov edx, 0x80\nrep outsb")
    recs = _ioio(m)
    m.run(timeout=20)
    assert recs, "the OUTS exited"
    info = recs[0].info1
    assert info & IoioInfo.A32 and not info & (IoioInfo.A64 | IoioInfo.A16)
    assert info == IoioInfo.encode(0x80, 1, False, string=True, rep=True, addr_size=32, seg=3)


def test_a_67_prefix_in_compatibility_mode_is_a16(guest):
    m, at = _far(guest, CODE32, f"mov esi, {DATA:#x}\nmov edx, 0x80\n.byte 0x67, 0x6e")     # outsb, A16
    recs = _ioio(m)
    m.run(timeout=20)
    assert recs and recs[0].info1 & IoioInfo.A16


def test_in_a_16_bit_code_segment_the_operand_size_is_16_and_66_makes_it_32(guest):
    # mov dx, 0x80 (BA 80 00 in 16-bit code) ; in ax, dx (ED) ; in eax, dx (66 ED)
    m, at = _far(guest, CODE16, ".byte 0xba, 0x80, 0x00\n.byte 0xed\n.byte 0x66, 0xed")
    recs = []
    m.set_ports([0x80])

    @m.on(IOIO)
    def io(m, e):
        recs.append(m.guest.vmcb.EXITINFO1)
        m.advance(e)
        return RESUME if len(recs) < 2 else m.stop("both")
    m.run(timeout=20)
    assert len(recs) == 2
    sizes = [(i >> 4) & 7 for i in recs]           # SZ8/SZ16/SZ32: bits 4-6
    assert sizes == [IoioInfo.SZ16 >> 4, IoioInfo.SZ32 >> 4]
    assert all(i & IoioInfo.A16 for i in recs)


def test_a_dec_before_an_intercepted_instruction_is_not_a_rex_prefix(guest):
    """48 0F A2 in 32-bit code is DEC EAX then CPUID: the CPUID exits at its own address."""
    m, at = _far(guest, CODE32, "mov eax, 1\n.byte 0x48\ncpuid")
    m.intercept("cpuid")
    recs = capture(m, 0x72)
    m.run(timeout=20)
    assert recs and recs[0].rip == at + 5 + 1


def test_invlpg_in_compatibility_mode_reports_the_32_bit_linear_address(guest):
    # ebx = 0xFFFFFFF0; invlpg [ebx + 0x20] (0F 01 7B 20: no 67, which would make it 16-bit
    # addressing here) wraps at 32 bits to 0x10 (DS base 0)
    m, at = _far(guest, CODE32, "mov ebx, 0xfffffff0\n.byte 0x0f, 0x01, 0x7b, 0x20")
    m.intercept("invlpg")
    recs = capture(m, INVLPG)
    m.run(timeout=20)
    assert recs and recs[0].info1 == 0x10


def test_mov_to_cr4_in_compatibility_mode_takes_32_bits(guest):
    """RBX's upper half, set in 64-bit code, is not part of a compatibility-mode MOV CR4's
    operand: no #GP for reserved bits 63:32 (the run reaches its exit)."""
    m = guest(f"mov rbx, cr4\nmov rcx, {1 << 40:#x}\nor rbx, rcx\n"
              f"push {CODE32:#x}\nmov rax, far\npush rax\nretfq\nfar:\n"
              ".byte 0x0f, 0x22, 0xe3\n" + hc_exit(0x55))                 # mov cr4, ebx
    m.guest.write_phys(GDT_AT, GDT)
    m.guest.vmcb.set_seg("GDTR", Segment(0, 0, len(GDT) - 1, GDT_AT))
    r = m.run(timeout=20)
    assert r.exit_code == 0x55, (r.reason, r.detail, r.exit_code)


def test_the_decoder_takes_the_segments_sizes():
    nop = b"\x90" * 8
    assert D.decode(b"\xed" + nop, 16).opsize == 16
    assert D.decode(b"\x66\xed" + nop, 16).opsize == 32
    assert D.decode(b"\x66\xed" + nop, 32).opsize == 16
    assert D.decode(b"\xf3\x6e" + nop, 32).addrsize == 32
    assert D.decode(b"\x67\xf3\x6e" + nop, 32).addrsize == 16
    assert D.decode(b"\x67\xf3\x6e" + nop, 16).addrsize == 32
    assert D.decode(b"\x48\x0f\xa2" + nop, 32) is None                  # DEC EAX
    assert D.decode(b"\x48\x0f\xa2" + nop, 64).kind == D.Kind.CPUID      # REX.W CPUID
    # INVLPG [0x1234] in 16-bit addressing: 0F 01 3E disp16 (ModRM 00 111 110)
    i = D.decode(b"\x0f\x01\x3e\x34\x12" + nop, 16)
    assert (i.kind, i.length) == (D.Kind.INVLPG, 5)
    # C4 with ModRM.mod != 11 is LES outside 64-bit mode
    assert D.decode(b"\xc4\x00\x0f" + nop, 32) is None
    assert D.decode(b"\x9c" + nop, 32).opsize == 32                      # PUSHFD
    assert D.decode(b"\x9c" + nop, 64).opsize == 64                      # PUSHFQ
    assert D.decode(b"\xcf" + nop, 16).opsize == 16                      # IRET


class _Reg:
    """An MMIO register file: reads return 0x11223344 at the access size; writes are kept."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def mmio_read(self, off: int, size: int) -> int:
        return 0x11223344 & ((1 << (8 * size)) - 1)

    def mmio_write(self, off: int, size: int, value: int) -> None:
        self.writes.append((off, size, value))


def test_mmio_from_32_bit_code_is_decoded_as_32_bit_code(guest):
    """A1 moffs32 (MOV EAX, [moffs]) is 5 bytes in a 32-bit code segment, 9 in 64-bit
    mode; 66 A3 moffs32 stores AX.  The run resumes after each one at the right place."""
    win = 0x1E0000
    body = (f".byte 0xa1\n.long {win + 8:#x}\n"             # mov eax, [win + 8]
            "mov ebx, eax\n"
            f".byte 0x66, 0xa3\n.long {win + 0x10:#x}\n")   # mov [win + 0x10], ax
    m, at = _far(guest, CODE32, body)
    dev = _Reg()
    m.map_mmio(win, 0x1000, dev)
    r = m.run(timeout=20)
    assert r.exit_code == 0x55, (r.reason, r.detail, r.exit_code)
    assert r.regs["rbx"] & 0xFFFF_FFFF == 0x11223344
    assert dev.writes == [(0x10, 2, 0x3344)]


# -- the interrupt window and the alignment check, outside 64-bit mode --------------------------
V_IRQ, V_INTR_MASKING = 1 << 8, 1 << 24


def _virq_guest(guest, body32: bytes):
    m, at = _far(guest, CODE32, ".byte " + ",".join(f"{b:#x}" for b in body32))
    from conftest import install_reporting_idt
    install_reporting_idt(m)
    v = m.guest.vmcb
    v.RFLAGS = 0x2                                  # IF = 0: the V_IRQ waits (APM vol. 2 §15.21.4)
    v.V_INTR = V_IRQ | V_INTR_MASKING | (0xF << 16)
    v.V_INTR_VECTOR = 0x40
    return m, at


def test_a_virtual_interrupt_waits_for_the_instruction_in_stis_shadow_in_32_bit_code(guest):
    """STI; INC EAX (40: one byte in 32-bit code); NOP: the V_IRQ is taken after the INC."""
    m, at = _virq_guest(guest, bytes([0xFB, 0x40, 0x90, 0x90]))
    r = m.run(timeout=10)
    assert r.exit_code == 0x140, (r.reason, r.detail, r.exit_code)
    assert r.regs["rsi"] == at + 2


def test_a_virtual_interrupt_is_taken_at_an_iretds_return_address(guest):
    """PUSH 202h (IF), PUSH 18h (CS), PUSH target, IRETD: a 32-bit frame (APM vol. 3 "IRET")."""
    m, at = _virq_guest(guest, b"")
    target = at + 5 + 2 + 5 + 1
    m, _ = _virq_guest(guest, b"\x68" + struct.pack("<I", 0x202) + b"\x6a\x18" + b"\x68"
                       + struct.pack("<I", target) + b"\xcf\x90\x90")
    r = m.run(timeout=10)
    assert r.exit_code == 0x140, (r.reason, r.detail, r.exit_code)
    assert r.regs["rsi"] == target


def test_push_eax_in_32_bit_user_code_checks_a_4_byte_slot(guest):
    """CPL 3 with CR0.AM and RFLAGS.AC in a 32-bit code segment: PUSH EAX writes 4 bytes at
    ESP-4; two from a 16-aligned ESP are aligned (no #AC, APM vol. 2 §8.2.18)."""
    from conftest import user_guest
    body = "push 0x3b\nmov rax, c32\npush rax\nretfq\nc32:\n.byte 0x50, 0x50"
    m = user_guest(guest, body, rflags=0x2 | (1 << 18))
    m.guest.write_phys(0x1000 + 0x38, struct.pack("<Q", 0x00CFFB000000FFFF))     # 32-bit code, DPL 3
    m.guest.vmcb.set_seg("GDTR", Segment(0, 0, 0x3F, 0x1000))
    m.guest.vmcb.CR0 |= 1 << 18
    r = m.run(timeout=20)
    assert r.exit_code == 0x55, (r.reason, r.detail, r.exit_code)
