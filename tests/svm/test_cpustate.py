"""sandbox.svm.cpustate on a bare Unicorn CPU: every field it models, both ways.

Each expected value comes from outside the module: Unicorn's own register API
(``reg_read`` / ``reg_write``), or the x86 instruction semantics of guest code
the test runs (SDM vol. 3 §3.4.5 descriptor format, §3.5.1 / APM vol. 2 §4.8
long-mode system descriptors, §15.5.1 VMCB segment attributes).  Addresses
and opcodes come from keystone, never from cpustate's own helpers.
"""
from __future__ import annotations

import ctypes
import dataclasses
import struct
import subprocess
import sys

import pytest
from keystone import KS_ARCH_X86, KS_MODE_64, Ks
from unicorn import (UC_ARCH_X86, UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_MODE_64, UC_PROT_ALL,
                     UC_TLB_VIRTUAL, Uc, UcError)
from unicorn import x86_const as X

from sandbox.svm import cpustate as C
from sandbox.svm.cpustate import CpuState, R_CS, R_DS, R_ES, R_FS, R_GS, R_SS

_ks = Ks(KS_ARCH_X86, KS_MODE_64)
CODE = 0x1000
GDT, IDT, PSEUDO, DATA = 0x4000, 0x5000, 0x3000, 0x8000
MSR_EFER = 0xC0000080

#: the x86 register numbers 0-15 (SDM vol. 2 Table 2-2, REX.B/R extended)
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
UC_GPR = [getattr(X, f"UC_X86_REG_{n.upper()}") for n in GPRS]


def asm(src: str, at: int = CODE) -> bytes:
    enc, _ = _ks.asm(src, at)
    return bytes(enc)


def attrib(type_: int, s: int = 1, dpl: int = 0, p: int = 1, l: int = 0, db: int = 0,
           g: int = 0) -> int:
    """The 12-bit VMCB segment attribute (APM §15.5.1): descriptor bits 47:40 and 55:52."""
    return type_ | s << 4 | dpl << 5 | p << 7 | l << 9 | db << 10 | g << 11


def descriptor(base: int, limit: int, attr: int) -> bytes:
    """An 8-byte segment descriptor (SDM §3.4.5)."""
    lo = limit & 0xFFFF | (base & 0xFFFF) << 16
    hi = (base >> 16 & 0xFF | (attr & 0xFF) << 8 | (limit >> 16 & 0xF) << 16
          | (attr >> 8 & 0xF) << 20 | base & 0xFF00_0000)
    return struct.pack("<II", lo, hi)


def system_descriptor(base: int, limit: int, attr: int) -> bytes:
    """A 16-byte long-mode LDT/TSS descriptor (APM vol. 2 §4.8.3)."""
    return descriptor(base & 0xFFFF_FFFF, limit, attr) + struct.pack("<II", base >> 32, 0)


def cached_limit(limit: int, attr: int) -> int:
    return (limit << 12 | 0xFFF) if attr & 1 << 11 else limit


# selector -> (base, limit, attrib); the accessed bit is already set, so loading
# one does not change it
KCODE = (0x08, 0, 0xFFFFF, attrib(0xB, l=1, g=1))
KDATA = (0x10, 0x00AB_C000, 0x0FFFF, attrib(0x3, db=1))
UCODE = (0x18, 0, 0xFFFFF, attrib(0xB, dpl=3, l=1, g=1))
UDATA = (0x20, 0, 0xFFFFF, attrib(0x3, dpl=3, db=1, g=1))
TSS = (0x28, 0x0000_7F12_3456_7000, 0x67, attrib(0x9, s=0))          # available 64-bit TSS
LDT = (0x38, 0x0000_0001_2345_8000, 0xFFF, attrib(0x2, s=0))         # LDT
FSDATA = (0x48, 0x0000_6000, 0x0FFF, attrib(0x3, db=1))


def gdt_bytes() -> bytes:
    table = bytearray(0x50)
    for sel, base, limit, attr in (KCODE, KDATA, UCODE, UDATA, FSDATA):
        table[sel:sel + 8] = descriptor(base, limit, attr)
    for sel, base, limit, attr in (TSS, LDT):
        table[sel:sel + 16] = system_descriptor(base, limit, attr)
    return bytes(table)


def cpu(code: bytes = b"") -> Uc:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    uc.mem_write(CODE, code)
    return uc


def run(uc: Uc, code: bytes, at: int = CODE) -> None:
    uc.mem_write(at, code)
    uc.emu_start(at, at + len(code))


def interrupts(uc: Uc) -> list[tuple[int, int]]:
    """(vector, cpustate's error code) of each exception, each one stopping the run."""
    seen: list[tuple[int, int]] = []

    def hook(u, intno, ud):
        seen.append((intno, CpuState(u).error_code))
        u.emu_stop()
    uc.hook_add(UC_HOOK_INTR, hook)
    return seen


# -- load: Unicorn's state as cpustate reads it ----------------------------------------
def test_gprs_and_rip_read_what_unicorn_wrote():
    uc = cpu()
    values = [0x0123_4567_89AB_CDEF ^ (i * 0x1111_1111_1111_1111) for i in range(16)]
    for rid, v in zip(UC_GPR, values):
        uc.reg_write(rid, v)
    uc.reg_write(X.UC_X86_REG_RIP, 0x7FFF_1234_5678)
    st = CpuState(uc)
    assert list(st.gprs()) == values
    assert [st.gpr(i) for i in range(16)] == values
    assert st.rip == 0x7FFF_1234_5678


def test_gprs_read_what_the_guest_computed():
    src = "\n".join(f"mov {n}, {0x1000 + 7 * i:#x}" for i, n in enumerate(GPRS))
    uc = cpu()
    run(uc, asm(src))
    assert CpuState(uc).gprs() == tuple(0x1000 + 7 * i for i in range(16))


def test_control_registers_and_efer():
    uc = cpu()
    uc.reg_write(X.UC_X86_REG_CR2, 0xFFFF_8000_DEAD_B000)
    uc.reg_write(X.UC_X86_REG_CR3, 0x0000_0012_3456_7000)
    uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, uc.reg_read(X.UC_X86_REG_MSR, MSR_EFER) | 1 << 11))
    st = CpuState(uc)
    for n, rid in ((0, X.UC_X86_REG_CR0), (2, X.UC_X86_REG_CR2), (3, X.UC_X86_REG_CR3),
                   (4, X.UC_X86_REG_CR4)):
        assert st.cr(n) == uc.reg_read(rid), f"CR{n}"
    assert st.cr(2) == 0xFFFF_8000_DEAD_B000
    assert st.efer == uc.reg_read(X.UC_X86_REG_MSR, MSR_EFER)
    assert st.efer & 1 << 11 and st.efer & 1 << 10        # NXE as written; LMA of 64-bit mode


def test_guest_writes_to_cr_and_dr_registers():
    uc = cpu()
    run(uc, asm("mov rax, 0x5000; mov cr3, rax; mov rax, 0x1111; mov dr0, rax;"
                "mov rax, 0x2222; mov dr3, rax; mov rax, 0x401; mov dr7, rax"))
    st = CpuState(uc)
    assert st.cr(3) == 0x5000
    assert (st.dr(0), st.dr(3), st.dr(7)) == (0x1111, 0x2222, 0x401)


def test_debug_registers_read_what_unicorn_wrote():
    uc = cpu()
    values = {0: 0xFFFF_8000_0000_1000, 1: 0x2000, 2: 0x3000, 3: 0x4000,
              6: 0xFFFF_4FF1, 7: 0x0000_0455}
    ids = {0: X.UC_X86_REG_DR0, 1: X.UC_X86_REG_DR1, 2: X.UC_X86_REG_DR2, 3: X.UC_X86_REG_DR3,
           6: X.UC_X86_REG_DR6, 7: X.UC_X86_REG_DR7}
    for n, v in values.items():
        uc.reg_write(ids[n], v)
    st = CpuState(uc)
    assert {n: st.dr(n) for n in values} == {n: uc.reg_read(ids[n]) for n in values} == values


def _loaded_cpu() -> tuple[Uc, CpuState]:
    """A CPU whose guest loaded GDTR, IDTR, DS/ES/SS/FS, CS (far return), TR and LDTR."""
    uc = cpu()
    uc.mem_write(GDT, gdt_bytes())
    uc.mem_write(PSEUDO, struct.pack("<HQ", len(gdt_bytes()) - 1, GDT))
    uc.mem_write(PSEUDO + 0x10, struct.pack("<HQ", 0xFFF, IDT))
    code = asm(f"""
        lgdt [{PSEUDO:#x}]
        lidt [{PSEUDO + 0x10:#x}]
        mov ax, {KDATA[0]:#x}
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov ax, {FSDATA[0]:#x}
        mov fs, ax
        mov ax, {TSS[0]:#x}
        ltr ax
        mov ax, {LDT[0]:#x}
        lldt ax
        push {KCODE[0]:#x}
        lea rax, [rip + 3]
        push rax
        """) + b"\x48\xcb"                      # retfq: CS from the GDT
    uc.reg_write(X.UC_X86_REG_RSP, 0xF000)
    run(uc, code)
    return uc, CpuState(uc)


def test_descriptor_tables_loaded_by_the_guest():
    uc, st = _loaded_cpu()
    assert st.gdt() == (GDT, len(gdt_bytes()) - 1)
    assert st.idt() == (IDT, 0xFFF)
    assert st.gdt() == uc.reg_read(X.UC_X86_REG_GDTR)[1:3]


@pytest.mark.parametrize("seg, desc", [(R_DS, KDATA), (R_ES, KDATA), (R_SS, KDATA),
                                       (R_FS, FSDATA), (R_CS, KCODE)])
def test_segment_hidden_parts_loaded_by_the_guest(seg, desc):
    uc, st = _loaded_cpu()
    sel, base, limit, attr = desc
    got_sel, got_base, got_limit, flags = st.seg(seg)
    assert (got_sel, got_base, got_limit) == (sel, base, cached_limit(limit, attr))
    assert C.flags_to_attrib(flags) == attr


def test_fs_base_agrees_with_unicorn():
    uc, st = _loaded_cpu()
    assert st.seg(R_FS)[1] == uc.reg_read(X.UC_X86_REG_FS_BASE) == FSDATA[1]


@pytest.mark.parametrize("which, desc, reg", [("tr", TSS, X.UC_X86_REG_TR),
                                              ("ldt", LDT, X.UC_X86_REG_LDTR)])
def test_system_segments_loaded_by_the_guest(which, desc, reg):
    uc, st = _loaded_cpu()
    sel, base, limit, attr = desc
    got = getattr(st, which)()
    assert got[:3] == (sel, base, limit)
    assert got == uc.reg_read(reg)
    # LTR marks the TSS busy (type 9 -> 11); the cache may hold either
    assert C.flags_to_attrib(got[3]) & ~0x2 == attr & ~0x2


def test_cpl_and_segments_after_iretq_to_user_mode():
    uc = cpu()
    uc.mem_write(GDT, gdt_bytes())
    uc.mem_write(PSEUDO, struct.pack("<HQ", len(gdt_bytes()) - 1, GDT))
    user = 0x2000
    code = asm(f"""
        lgdt [{PSEUDO:#x}]
        push {UDATA[0] | 3:#x}
        push 0x7000
        push 0x2
        push {UCODE[0] | 3:#x}
        push {user:#x}
        iretq
        """)
    uc.mem_write(user, b"\x90")
    uc.reg_write(X.UC_X86_REG_RSP, 0xF000)
    uc.mem_write(CODE, code)
    uc.emu_start(CODE, user + 1)
    st = CpuState(uc)
    assert st.cpl == 3
    assert st.seg(R_CS)[0] == UCODE[0] | 3 and C.flags_to_attrib(st.seg(R_CS)[3]) == UCODE[3]
    assert st.seg(R_SS)[0] == UDATA[0] | 3 and C.flags_to_attrib(st.seg(R_SS)[3]) == UDATA[3]
    assert st.gpr(4) == 0x7000


def test_fresh_cpu_is_at_cpl0_with_gif_set():
    st = CpuState(cpu())
    assert st.cpl == 0
    assert st.hflags2 & C.HF2_GIF               # QEMU's reset value (x86_cpu_reset)


@pytest.mark.parametrize("selector", [0x0010, 0x1230, 0xFFF8, 0x000C])
def test_error_code_of_gp_on_a_bad_selector(selector):
    """MOV DS with a selector beyond the (empty) GDT or LDT: #GP(selector & ~3),
    SDM vol. 2 'MOV' protected-mode exceptions."""
    uc = cpu()
    seen = interrupts(uc)
    code = asm(f"mov ax, {selector:#x}; mov ds, ax")
    uc.mem_write(CODE, code)
    uc.emu_start(CODE, CODE + len(code))
    assert seen == [(13, selector & 0xFFFC)]


# -- the live state: Unicorn's own CPUX86State, no copy ----------------------------------
def test_the_state_is_the_cpu_itself_not_a_copy():
    """A register written through Unicorn's API is in the state at once, and one
    written into the state is what the API and the guest read: no save or
    restore between (a copy of the context would hold the old values)."""
    uc = cpu()
    st = CpuState(uc)
    uc.reg_write(X.UC_X86_REG_R9, 0x1111_2222_3333_4444)
    assert st.q[9] == st.gpr(9) == 0x1111_2222_3333_4444
    st.q[3] = 0x0123_4567_89AB_CDEF
    assert uc.reg_read(X.UC_X86_REG_RBX) == 0x0123_4567_89AB_CDEF
    run(uc, asm("mov rax, rbx; add rax, r9"))
    assert st.q[0] == uc.reg_read(X.UC_X86_REG_RAX) == (0x0123_4567_89AB_CDEF + 0x1111_2222_3333_4444) % 2**64


def test_each_engine_has_its_own_state():
    a, b = cpu(), cpu()
    sa, sb = CpuState(a), CpuState(b)
    a.reg_write(X.UC_X86_REG_RAX, 0xAAAA)
    b.reg_write(X.UC_X86_REG_RAX, 0xBBBB)
    assert (sa.q[0], sb.q[0]) == (0xAAAA, 0xBBBB)
    assert C.live_env(a) != C.live_env(b)


def test_the_state_keeps_its_engine_alive():
    """A view of the state outlives every other reference to its engine (else
    it would read freed memory, or the next engine's)."""
    import gc
    uc = cpu()
    uc.reg_write(X.UC_X86_REG_RDI, 0x5AFE_0000_0000_0007)
    q = CpuState(uc).q
    del uc
    gc.collect()
    other = cpu()
    other.reg_write(X.UC_X86_REG_RDI, 0xBAD)
    assert q[7] == 0x5AFE_0000_0000_0007


def test_no_proc_mem_is_one_clear_import_error(monkeypatch):
    monkeypatch.setattr(C, "read_process", lambda address, n: None)
    with pytest.raises(ImportError, match="cannot read /proc/self/mem"):
        C._locate_env()


def test_read_process_reads_mapped_memory_and_refuses_unmapped():
    buf = ctypes.create_string_buffer(b"live state", 16)
    assert C.read_process(ctypes.addressof(buf), 10) == b"live state"
    for address in (0, 8, 1 << 63, -4096):
        assert C.read_process(address, 8) is None


# -- writes: cpustate's writes as Unicorn and the guest see them -------------------------
def test_set_gpr_reaches_unicorn_and_the_guest():
    uc = cpu()
    st = CpuState(uc)
    values = [0xA5A5_0000_0000_0000 + 0x1_0001 * i for i in range(16)]
    for i, v in enumerate(values):
        st.set_gpr(i, v)
    assert [uc.reg_read(r) for r in UC_GPR] == values
    run(uc, asm("add rax, rbx; add r15, r8"))
    assert uc.reg_read(X.UC_X86_REG_RAX) == (values[0] + values[3]) % 2**64
    assert uc.reg_read(X.UC_X86_REG_R15) == (values[15] + values[8]) % 2**64


def test_reg_write_goes_through_unicorn():
    uc = cpu()
    st = CpuState(uc)
    st.reg_write(X.UC_X86_REG_CR3, 0x7000)
    st.reg_write(X.UC_X86_REG_RIP, 0x1234)
    assert uc.reg_read(X.UC_X86_REG_CR3) == st.reg_read(X.UC_X86_REG_CR3) == 0x7000
    assert st.rip == 0x1234 and st.cr(3) == 0x7000


def test_set_dtable_seen_by_unicorn_and_sgdt_sidt():
    uc = cpu()
    st = CpuState(uc)
    st.set_dtable("GDTR", 0xFFFF_8000_0012_3000, 0x7F)
    st.set_dtable("IDTR", 0x0000_0000_0045_6000, 0xFFF)
    assert uc.reg_read(X.UC_X86_REG_GDTR)[1:3] == (0xFFFF_8000_0012_3000, 0x7F)
    assert uc.reg_read(X.UC_X86_REG_IDTR)[1:3] == (0x0000_0000_0045_6000, 0xFFF)
    run(uc, asm(f"sgdt [{DATA:#x}]; sidt [{DATA + 0x10:#x}]"))
    assert struct.unpack("<HQ", uc.mem_read(DATA, 10)) == (0x7F, 0xFFFF_8000_0012_3000)
    assert struct.unpack("<HQ", uc.mem_read(DATA + 0x10, 10)) == (0xFFF, 0x456000)


@pytest.mark.parametrize("which, reg, insn", [("TR", X.UC_X86_REG_TR, "str"),
                                              ("LDTR", X.UC_X86_REG_LDTR, "sldt")])
def test_set_system_seg_seen_by_unicorn_and_str_sldt(which, reg, insn):
    uc = cpu()
    st = CpuState(uc)
    value = (0x58, 0xFFFF_8000_0000_9000, 0x2067, C.attrib_to_flags(attrib(0xB, s=0)))
    st.set_system_seg(which, *value)
    assert uc.reg_read(reg) == value
    run(uc, asm(f"{insn} ax"))
    assert uc.reg_read(X.UC_X86_REG_AX) == 0x58


def test_set_seg_fs_base_used_by_fs_relative_loads():
    uc = cpu()
    uc.mem_write(0x9010, struct.pack("<Q", 0x0BAD_F00D_CAFE_BEEF))
    st = CpuState(uc)
    st.set_seg(R_FS, 0x48, 0x9000, 0xFFFF, C.attrib_to_flags(attrib(0x3, db=1)))
    st.set_seg(R_GS, 0, 0x1234_5678_9000, 0, 0)
    assert uc.reg_read(X.UC_X86_REG_FS_BASE) == 0x9000
    assert uc.reg_read(X.UC_X86_REG_GS_BASE) == 0x1234_5678_9000
    assert uc.reg_read(X.UC_X86_REG_FS) == 0x48
    run(uc, asm("mov rax, qword ptr fs:[0x10]"))
    assert uc.reg_read(X.UC_X86_REG_RAX) == 0x0BAD_F00D_CAFE_BEEF
    assert st.seg(R_FS) == (0x48, 0x9000, 0xFFFF, C.attrib_to_flags(attrib(0x3, db=1)))


@pytest.mark.parametrize("l, expect_rax", [(1, 0x1_0000_0006), (0, 0x5)])
def test_set_seg_cs_mode_decides_decoding(l, expect_rax):
    """48 FF C0 is INC RAX in 64-bit mode; in compatibility mode (CS.L = 0,
    CS.D = 1) it is DEC EAX; INC EAX, which also clears RAX[63:32]."""
    uc = cpu()
    uc.reg_write(X.UC_X86_REG_RAX, 0x1_0000_0005)
    st = CpuState(uc)
    st.set_seg(R_CS, 0x08, 0, 0xFFFFFFFF, C.attrib_to_flags(attrib(0xB, l=l, db=1 - l, g=1)))
    run(uc, bytes.fromhex("48ffc0"))
    assert uc.reg_read(X.UC_X86_REG_RAX) == expect_rax


@pytest.mark.parametrize("how", ["set_cpl", "ss_dpl"])
@pytest.mark.parametrize("cpl", [0, 3])
def test_cpl_written_rules_privileged_instructions(how, cpl):
    """MOV from CR0 runs at CPL 0 and is #GP(0) at CPL 3 (SDM 'MOV - Move to/from
    Control Registers'); the CPL comes from set_cpl, or from SS.DPL as QEMU's
    cpu_x86_load_seg_cache takes it."""
    uc = cpu()
    seen = interrupts(uc)
    st = CpuState(uc)
    if how == "set_cpl":
        st.set_cpl(cpl)
    else:
        st.set_seg(R_SS, 0x20 | cpl, 0, 0xFFFFFFFF, C.attrib_to_flags(attrib(0x3, dpl=cpl, db=1, g=1)))
    assert st.cpl == cpl
    run(uc, asm("mov rax, cr0"))
    assert seen == ([(13, 0)] if cpl == 3 else [])


def test_set_gif_round_trip():
    uc = cpu()
    st = CpuState(uc)
    st.set_gif(False)
    assert not CpuState(uc).hflags2 & C.HF2_GIF
    st.set_gif(True)
    assert CpuState(uc).hflags2 & C.HF2_GIF


# -- the values in Unicorn's engine struct ----------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_emu_counter_when_the_count_runs_out(n):
    """``inc rax; jmp`` forever: after emu_start(count=N) the guest executed N
    instructions (RAX counts the INCs); Unicorn counted those and the one it stopped at."""
    uc = cpu(bytes.fromhex("48ffc0ebfb"))              # inc rax ; jmp -5
    uc.emu_start(CODE, CODE + 0x100, count=n)
    assert uc.reg_read(X.UC_X86_REG_RAX) == (n + 1) // 2
    assert C.emu_counter(uc) == n + 1


@pytest.mark.parametrize("k", [1, 5, 33])
def test_emu_counter_when_the_code_ends_first(k):
    code = asm("nop\n" * k)
    uc = cpu(code)
    uc.emu_start(CODE, CODE + len(code), count=k + 10)
    assert C.emu_counter(uc) == k


def test_the_engine_cell_follows_every_run():
    """One cell made before any run reads each later run's count (the cell is
    the engine's memory, not a copy)."""
    code = asm("nop\n" * 9)
    uc = cpu(code)
    cell = C.engine_cell(uc, C.OFF_EMU_COUNTER)
    for count, counted in ((3, 4), (20, 9)):      # the budget runs out (one more: the stop), the code ends
        uc.emu_start(CODE, CODE + 9, count=count)
        assert cell.value == counted == C.emu_counter(uc)


def _refusing(code: bytes, refused_page: int) -> Uc:
    uc = cpu(code)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)

    def fill(u, vaddr, access, entry, ud):
        if vaddr == refused_page:
            return False
        entry.paddr = vaddr
        entry.perms = UC_PROT_ALL
        return True
    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    with pytest.raises(UcError):
        uc.emu_start(CODE, CODE + len(code))
    return uc


@pytest.mark.parametrize("src, page, expect", [
    ("mov rax, [0x5123]", 0x5000, 0x5123),
    ("mov qword ptr [0x6ea8], rbx", 0x6000, 0x6EA8),
    ("mov byte ptr [0x7fff], 1", 0x7000, 0x7FFF),
    ("mov rax, [0x8ffc]", 0x9000, 0x9000),          # the access crosses into the refused page
    ("jmp 0xa010", 0xA000, 0xA010),                 # instruction fetch
])
def test_invalid_addr_is_the_address_the_guest_accessed(src, page, expect):
    assert C.invalid_addr(_refusing(asm(src), page)) == expect


# -- verification: a mismatch fails the import -------------------------------------------
def test_verification_passes_on_the_located_values():
    assert dataclasses.astuple(C.locate_internals()) == dataclasses.astuple(C.INTERNALS)
    C.verify_internals(C.INTERNALS)
    assert None not in dataclasses.astuple(C.INTERNALS)
    assert (C.OFF_DR, C.OFF_ERROR_CODE, C.OFF_EMU_COUNTER, C.OFF_INVALID_ADDR) == (
        C.INTERNALS.dr, C.INTERNALS.error_code, C.INTERNALS.emu_counter, C.INTERNALS.invalid_addr)


@pytest.mark.parametrize("delta", [-8, -4, 4, 8])
@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(C.Internals)])
def test_a_wrong_offset_is_named(field, delta):
    wrong = dataclasses.replace(C.INTERNALS, **{field: getattr(C.INTERNALS, field) + delta})
    with pytest.raises(ImportError) as e:
        C.verify_internals(wrong)
    msg = str(e.value)
    assert f"'{C.NAMES[field]}'" in msg
    assert msg.startswith("sandbox: Unicorn internal")
    assert "not found at import (unicorn 2.1.4 expected" in msg


def test_every_internal_has_a_name():
    assert set(C.NAMES) == {f.name for f in dataclasses.fields(C.Internals)}


def test_error_message():
    assert str(C.missing("exception error_code")).startswith(
        "sandbox: Unicorn internal 'exception error_code' not found at import (unicorn 2.1.4 expected")


@pytest.mark.parametrize("locate, reads, name", [
    (C._locate_dr, "_context_bytes", "dr"),
    (C._locate_error_code, "_context_bytes", "error_code"),
    (C._locate_emu_counter, "_engine_bytes", "emu_counter"),
    (C._locate_invalid_addr, "_engine_bytes", "invalid_addr"),
    (C._locate_env, "_engine_bytes", "engine_cpu"),
])
def test_a_calibration_that_finds_nothing_is_named(monkeypatch, locate, reads, name):
    """As if Unicorn had moved the value: the state the calibration scans is zeros."""
    real = getattr(C, reads)
    monkeypatch.setattr(C, reads, lambda uc, *a: bytes(len(real(uc, *a))))
    with pytest.raises(ImportError, match=f"'{C.NAMES[name]}' not found at import"):
        locate()


def test_a_missing_engine_handle_is_named():
    class NoHandle:
        pass
    with pytest.raises(ImportError, match=f"'{C.HANDLE}' not found at import"):
        C._engine_bytes(NoHandle())


def test_the_import_itself_fails(tmp_path):
    """The checks run at import: a Unicorn whose engine struct reads as zeros
    makes ``import sandbox.svm.cpustate`` raise ImportError naming the value."""
    prog = ("import ctypes\n"
            "real = ctypes.string_at\n"
            "ctypes.string_at = lambda a, n=-1: bytes(n) if n == 2048 else real(a, n)\n"
            "try:\n"
            "    import sandbox.svm.cpustate\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sandbox: Unicorn internal 'emu_counter' not found at import "
                                 "(unicorn 2.1.4 expected"), out.stdout


# -- TSC_OFFSET: where Unicorn's RDTSC adds it -----------------------------------------
def test_tsc_offset_written_in_the_state_is_added_by_rdtsc():
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    uc.mem_write(0x1000, b"\x0f\x31\x0f\x31")        # rdtsc ; rdtsc
    st = C.CpuState(uc)
    assert st.tsc_offset == 0
    uc.emu_start(0x1000, 0x1002)
    before = uc.reg_read(X.UC_X86_REG_RDX) << 32 | uc.reg_read(X.UC_X86_REG_RAX)
    st.tsc_offset = 7 << 60
    uc.emu_start(0x1002, 0x1004)
    after = uc.reg_read(X.UC_X86_REG_RDX) << 32 | uc.reg_read(X.UC_X86_REG_RAX)
    assert 0 <= ((after - before) & (2**64 - 1)) - (7 << 60) < 1 << 40
    assert C.CpuState(uc).tsc_offset == 7 << 60
