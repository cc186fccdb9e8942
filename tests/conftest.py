"""Shared helpers for the SVM sandbox tests.

Expected values in the tests come from the AMD APM (vol. 2 ch. 15 and
appendices B/C) and kvm-unit-tests, or from an independent
computation in the test -- instruction lengths from capstone, addresses from
keystone -- never from the implementation's own output.
"""
from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from sandbox import Machine

BASE = 0x100000            # loader: .S images are loaded and entered here
STACK = 0x90000            # loader: initial RSP
PT_ROOT = 0x2000           # loader: CR3 of the identity tables
SMALL_RAM = 2 << 20        # the minimum guest RAM; keeps Machine() + load cheap (~0.1 s)
SMALL_DRAM = 8 << 20
DATA = 0x1C0000            # a scratch data page inside every guest's RAM

# SVM instruction opcodes (APM vol. 3, "VMRUN" ... "INVLPGA"); keystone does
# not assemble all of them, so guests carry them as raw bytes.
OP = {
    "vmrun": bytes.fromhex("0f01d8"), "vmmcall": bytes.fromhex("0f01d9"),
    "vmload": bytes.fromhex("0f01da"), "vmsave": bytes.fromhex("0f01db"),
    "stgi": bytes.fromhex("0f01dc"), "clgi": bytes.fromhex("0f01dd"),
    "skinit": bytes.fromhex("0f01de"), "invlpga": bytes.fromhex("0f01df"),
}

_ks = Ks(KS_ARCH_X86, KS_MODE_64)
_cs = Cs(CS_ARCH_X86, CS_MODE_64)


def db(b: bytes) -> str:
    """An assembler ``.byte`` line for raw bytes."""
    return ".byte " + ",".join(f"0x{x:02x}" for x in b)


VMMCALL = db(OP["vmmcall"])


def asm_set_gate(idt: int, vector: int, label: str) -> str:
    """Guest assembly that writes a 64-bit interrupt gate (selector 0x08, DPL 0,
    type 0xE) for ``vector`` at ``idt``, pointing at ``label`` (clobbers RAX, RCX, RDX, RDI)."""
    return f"""
    mov rdi, {idt:#x}
    mov rax, {label}
    mov rdx, rax
    and edx, 0xffff
    mov rcx, 0x00008e0000080000
    or rdx, rcx
    mov rcx, rax
    shr rcx, 16
    shl rcx, 48
    or rdx, rcx
    mov [rdi + {vector}*16], rdx
    mov qword ptr [rdi + {vector}*16 + 8], 0
"""


def wrmsr(msr: int, value: int) -> str:
    """Guest code writing ``value`` to MSR ``msr`` (ECX, EDX:EAX, WRMSR)."""
    return f"mov ecx, {msr:#x}\nmov eax, {value & 0xFFFFFFFF:#x}\nmov edx, {value >> 32:#x}\nwrmsr\n"


def hc_exit(code: int) -> str:
    """The EXIT hypercall: RAX = 0, RDI = code, VMMCALL."""
    return f"mov edi, {code:#x}\nxor eax, eax\n{VMMCALL}\n"


def assemble(src: str, base: int = BASE) -> bytes:
    enc, _ = _ks.asm(src, base)
    return bytes(enc or b"")


def insn_length(code: bytes, addr: int = 0) -> int:
    """Length of the first instruction in ``code`` according to capstone."""
    for i in _cs.disasm(code, addr):
        return i.size
    raise AssertionError(f"capstone cannot decode {code.hex()}")


def new_machine(ram: int = SMALL_RAM) -> Machine:
    if ram == 16 << 20:
        return Machine()
    return Machine(dram=max(SMALL_DRAM, 4 * ram), ram=ram)


@dataclass
class Exit:
    code: int
    info1: int
    info2: int
    rip: int
    nrip: int
    exitintinfo: int


def capture(m: Machine, *codes: int) -> list[Exit]:
    """Stop the run at the first exit with one of ``codes``; record what the
    VMCB says about it (EXITCODE, EXITINFO1/2, RIP, NRIP, EXITINTINFO)."""
    recs: list[Exit] = []

    def h(m, e):
        v = m.guest.vmcb
        recs.append(Exit(v.EXITCODE, v.EXITINFO1, v.EXITINFO2, v.RIP, v.NRIP, v.EXITINTINFO))
        return m.stop("captured")
    for c in codes:
        m.on(c)(h)
    return recs


_counter = itertools.count()


@pytest.fixture
def guest(tmp_path):
    """``guest(src, ram=...)`` -> a Machine with ``src`` loaded as a .S image."""
    def make(src: str, ram: int = SMALL_RAM) -> Machine:
        m = new_machine(ram)
        p = tmp_path / f"g{next(_counter)}.S"
        p.write_text(src)
        m.load(str(p))
        return m
    return make


# -- a guest IDT built from the host side -------------------------------------------
IDT_BASE = 0x60000
STUBS = 0x180000
STUB_SIZE = 64


def idt_gate(handler: int, selector: int = 0x08, ist: int = 0, gtype: int = 0xE, dpl: int = 0) -> bytes:
    """A 16-byte long-mode interrupt/trap gate (APM vol. 2 §4.8.4, Fig. 4-24)."""
    lo = (handler & 0xFFFF) | (selector << 16) | (ist << 32) | (gtype << 40) | (dpl << 45) | (1 << 47) \
        | (((handler >> 16) & 0xFFFF) << 48)
    hi = handler >> 32
    return struct.pack("<QQ", lo, hi)


_STUB_CODE: dict[int, bytes] = {}


def _stub(v: int) -> bytes:
    if v not in _STUB_CODE:
        src = ("mov rsi, [rsp]\nmov rdx, [rsp+8]\nmov rcx, [rsp+16]\nmov r10, [rsp+24]\n"
               "mov r11, [rsp+32]\nmov r12, [rsp+40]\nmov r8, cr2\nmov r9, rsp\n" + hc_exit(0x100 + v))
        _STUB_CODE[v] = assemble(src, STUBS + v * STUB_SIZE)
        assert len(_STUB_CODE[v]) <= STUB_SIZE
    return _STUB_CODE[v]


def install_reporting_idt(m: Machine, vectors=range(256)) -> None:
    """Every vector gets a stub that ends the run with EXIT(0x100 + vector),
    reporting RSI, RDX, RCX, R10, R11, R12 = [rsp], [rsp+8] ... [rsp+40],
    R8 = CR2 and R9 = RSP."""
    idt = bytearray(256 * 16)
    stubs = bytearray(256 * STUB_SIZE)
    for v in vectors:
        addr = STUBS + v * STUB_SIZE
        code = _stub(v)
        stubs[v * STUB_SIZE:v * STUB_SIZE + len(code)] = code
        idt[v * 16:v * 16 + 16] = idt_gate(addr)
    m.guest.write_phys(STUBS, bytes(stubs))
    m.guest.write_phys(IDT_BASE, bytes(idt))
    from sandbox import Segment
    m.guest.vmcb.set_seg("IDTR", Segment(0, 0, len(idt) - 1, IDT_BASE))


# -- a CPL-3 guest ----------------------------------------------------------------------
TSS_BASE = 0x1100
USER_STACK = 0x70000
KERNEL_STACK = 0x80000
USER_CS, USER_SS, TSS_SEL = 0x1B, 0x23, 0x28


def leaf_pte(m: Machine, va: int) -> int:
    """GPA of the 4 KiB leaf entry for ``va`` in the guest's tables (APM vol. 2 §5.3)."""
    table = m.guest.vmcb.CR3 & ~0xFFF
    for shift in (39, 30, 21):
        e = int.from_bytes(m.guest.read_phys(table + ((va >> shift) & 0x1FF) * 8, 8), "little")
        assert e & 1 and not e & 0x80
        table = e & 0x000F_FFFF_FFFF_F000
    return table + ((va >> 12) & 0x1FF) * 8


def user_guest(guest, body: str, rflags: int = 0x2, done: int = 0x55, prelude: str = "") -> Machine:
    """A guest that runs ``prelude`` at CPL 0, loads TR, then IRETQs to ``body`` at CPL 3
    (CS 0x1B, SS 0x23, RSP 0x70000).  GDT: the loader's three entries, 64-bit code and data at DPL 3,
    and a 64-bit TSS (RSP0 = 0x80000, no I/O bitmap: its offset is past the limit).
    The code, user-stack and DATA pages get U/S = 1.  Every vector has a
    reporting stub (install_reporting_idt)."""
    src = (f"{prelude}\nmov ax, {TSS_SEL:#x}\nltr ax\npush {USER_SS:#x}\npush {USER_STACK:#x}\npush {rflags:#x}\n"
           f"push {USER_CS:#x}\nmov rax, user_code\npush rax\niretq\nuser_code:\n{body}\n" + hc_exit(done))
    m = guest(src)
    gdt = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00AFFB000000FFFF, 0x00CFF3000000FFFF]
    tss_lo = 0x67 | ((TSS_BASE & 0xFFFFFF) << 16) | (0x89 << 40) | ((TSS_BASE >> 24) << 56)
    m.guest.write_phys(0x1000, struct.pack("<7Q", *gdt, tss_lo, TSS_BASE >> 32))
    tss = bytearray(0x68)
    struct.pack_into("<Q", tss, 4, KERNEL_STACK)          # RSP0
    struct.pack_into("<H", tss, 0x66, 0x68)               # I/O map base beyond the limit: no bitmap
    m.guest.write_phys(TSS_BASE, bytes(tss))
    from sandbox import Segment
    m.guest.vmcb.set_seg("GDTR", Segment(0, 0, 7 * 8 - 1, 0x1000))
    for va in (BASE, BASE + 0x1000, USER_STACK - 0x1000, DATA):
        a = leaf_pte(m, va)
        m.guest.write_phys(a, (int.from_bytes(m.guest.read_phys(a, 8), "little") | 4).to_bytes(8, "little"))
    install_reporting_idt(m)
    return m


def user_code_addr(body_before: str = "") -> int:
    """Guest-virtual address of the CPL-3 body's first instruction (plus ``body_before``)."""
    pre = (f"mov ax, {TSS_SEL:#x}\nltr ax\npush {USER_SS:#x}\npush {USER_STACK:#x}\npush 0x2\n"
           f"push {USER_CS:#x}\nmov rax, 0x100000\npush rax\niretq\n")
    return BASE + len(assemble(pre)) + len(assemble(body_before, 0x100000) if body_before else b"")
