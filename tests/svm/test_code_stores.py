"""A guest that keeps storing into the code page it runs from (sandbox.svm.smc):
the page is writable between the fills that rescan it, and QEMU drops every
block a store overwrites.  The guest must not be able to tell: its own
RFLAGS.TF, PUSHF images and single-step traps behave as the manual says (APM
vol. 2 §13.1.4: a trap after each instruction that began with TF set), every
armed instruction it writes exits where it runs, and it computes what bare
Unicorn computes for the same code."""
from __future__ import annotations

import pytest
from unicorn import UC_ARCH_X86, UC_MEM_WRITE, UC_MODE_64, UC_PROT_ALL, Uc

from conftest import BASE, DATA, OP, VMMCALL, assemble, hc_exit, install_reporting_idt

from sandbox.svm import engine

COUNTER = BASE + 0xC00                  # on the code's own page
LOOPS = 6


def _store_loop() -> str:
    return f"""
    mov rbx, {COUNTER:#x}
    mov ecx, {LOOPS}
again:
    inc qword ptr [rbx]
    dec ecx
    jnz again
    """


def test_guest_popf_setting_tf_traps_after_the_next_instruction(guest):
    """POPF loads TF = 1: the guest's single-step #DB comes after the instruction
    that follows POPF."""
    src = _store_loop() + """
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    nop
after:
    nop
    """ + hc_exit(0x55)
    m = guest(src)
    install_reporting_idt(m, [1])
    r = m.run(timeout=20)
    assert r.reason == "guest-exit" and r.exit_code == 0x101, (r.reason, r.detail, r.exit_code)
    code = assemble(src)
    after = BASE + code.index(bytes.fromhex("9d90")) + 2          # past popfq; nop
    assert r.regs["rsi"] == after                                  # the #DB frame's RIP
    assert int.from_bytes(m.guest.read_phys(COUNTER, 8), "little") == LOOPS


def test_pushf_right_after_code_stores_shows_the_guests_tf(guest):
    """No TF shows in an RFLAGS image the guest reads: stores to the code page
    are not single-stepped."""
    src = _store_loop() + "pushfq\npop rdx\ninc qword ptr [rbx]\npushfq\npop rsi\n" + hc_exit(0x55)
    m = guest(src)
    r = m.run(timeout=20)
    assert r.reason == "guest-exit", (r.reason, r.detail)
    assert r.regs["rdx"] & 0x100 == 0 and r.regs["rsi"] & 0x100 == 0
    assert int.from_bytes(m.guest.read_phys(COUNTER, 8), "little") == LOOPS + 1


def _bare_unicorn(code: bytes, page: int) -> bytes:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(BASE & ~0xFFFFF, 0x200000, UC_PROT_ALL)
    uc.mem_write(BASE, code)
    uc.emu_start(BASE, BASE + len(code))
    return bytes(uc.mem_read(page, 0x1000))


def test_dense_self_modifying_loop_computes_what_bare_unicorn_computes(guest):
    """Every instruction of the loop stores into the page it runs from (the
    fuzzer's slowest cases: ADD [RAX], AL over its own code)."""
    body = "add byte ptr [rax + 0xe00], dl\nadd byte ptr [rax + 0xe01], cl\n" * 8
    src = f"mov rax, {BASE:#x}\nmov edx, 3\nmov ecx, 200\nagain:\n{body}dec ecx\njnz again\n"
    m = guest(src + hc_exit(0x55))
    r = m.run(timeout=60)
    assert r.reason == "guest-exit", (r.reason, r.detail)
    want = _bare_unicorn(assemble(src), BASE)
    assert m.guest.read_phys(BASE + 0xE00, 0x100) == want[0xE00:0xF00]



SMSW_R12 = bytes.fromhex("41 0f 01 e4")    # SMSW r12d: intercepted as a CR0 read (exit 0, APM Table C-1)


def _cr0_reads(m) -> list[int]:
    """Arm the CR0-read intercept; returns the list the RIPs of its exits go
    into (the default handler still handles each)."""
    m.intercept("cr0_read")
    seen: list[int] = []
    default = m.handlers[0x00]

    def h(m, e):
        seen.append(e.rip)
        return default(m, e)
    m.on(0x00)(h)
    return seen


def _smsw_exits_once_at(m, at: int, n: int, stored: bytes) -> None:
    """Run ``m`` with the CR0-read intercept armed: the ``n`` bytes at ``at`` end
    up as ``stored``, whose SMSW r12d exits once, there, and the guest's exit
    code (R12) is CR0."""
    seen = _cr0_reads(m)
    r = m.run(timeout=20)
    assert r.reason == "guest-exit", (r.reason, r.detail)
    assert m.guest.read_phys(at, n) == stored
    assert [hex(a) for a in seen] == [hex(at)]
    assert r.exit_code == m.guest.vmcb.CR0 & 0xFFFF_FFFF != 0


def _runs_the_stored_smsw(guest, src: str) -> None:
    """Run ``src``, which stores SMSW r12d over the four NOPs at its label
    ``target`` and runs on into them, with the CR0-read intercept armed: the
    intercept fires once, there, and the guest's exit code (R12) is CR0."""
    target = BASE + assemble(src).index(bytes([0x90] * 4) + assemble("mov edi, r12d", 0))
    _smsw_exits_once_at(guest(src), target, 4, SMSW_R12)


@pytest.mark.parametrize("gap,after", [(0, 0), (0, 8), (40, 0), (40, 8)])
def test_store_of_an_armed_instruction_on_a_written_page_exits(guest, gap, after):
    """After a loop that stores into its own page, a store right after it
    (``after`` = 0) or past a few NOPs writes SMSW r12d ``gap`` bytes after
    itself -- into the running block or the next -- and the guest runs on
    into it: the intercept fires there, and R12 = CR0 shows the new bytes ran."""
    tail = "target:\nnop\nnop\nnop\nnop\nmov edi, r12d\nxor eax, eax\n" + VMMCALL
    src = (_store_loop() + "nop\n" * after + "lea rbx, [rip + target]\nmov dword ptr [rbx], 0xe4010f41\n"
           + "nop\n" * gap + tail)
    _runs_the_stored_smsw(guest, src)


def test_an_armed_instruction_stored_after_many_stores_exits(guest):
    """Sixty-four iterations of a loop that stores into its own page and runs
    idle instructions between the stores, then a store of SMSW r12d into the
    code ahead: the intercept still fires where the guest runs it."""
    idle = "nop\n" * 6
    src = f"""
    lea rdx, [rip + target]
    mov rbx, {COUNTER:#x}
    mov ecx, 63
again:
    inc qword ptr [rbx]
    {idle}
    dec ecx
    jnz again
    inc qword ptr [rbx]
    mov dword ptr [rdx], 0xe4010f41
target:
    nop
    nop
    nop
    nop
    mov edi, r12d
    xor eax, eax
    """ + VMMCALL
    _runs_the_stored_smsw(guest, src)


def test_a_sled_of_stores_into_its_own_page_runs_without_a_fill_per_store(guest):
    """ADD [RAX], AL over its own page, 600 times (the fuzzer's zero-page sled,
    once its slowest cases): stores that leave the bytes as they were, then
    stores that change a byte already run.  The page becomes writable once per
    block translated from it, not once per store, and the guest computes what
    bare Unicorn computes."""
    n = 600
    for al in (0, 1):
        src = f"mov rax, {COUNTER:#x}\nmov edx, {al}\n" + "add byte ptr [rax], dl\n" * n
        m = guest(src + hc_exit(0x55))
        code_writes = []
        m.cpu.add_fill_observer(lambda gva, access, hpa, perms: code_writes.append(gva)
                                if access == UC_MEM_WRITE and gva >> 12 == BASE >> 12 else None)
        r = m.run(timeout=60)
        assert r.reason == "guest-exit", (r.reason, r.detail)
        assert 1 <= len(code_writes) <= 8, len(code_writes)
        code = assemble(src)
        assert m.guest.read_phys(BASE, len(code)) == _bare_unicorn(code, BASE)[:len(code)]
        assert m.guest.read_phys(COUNTER, 1)[0] == (al * n) & 0xFF


def test_a_virtual_vmsave_onto_a_written_page_rescans_before_the_next_instruction(guest):
    """A virtualized VMSAVE (VIRT_EXT bit 1) is carried out by the model in
    its candidate hook, so QEMU never runs it and neither a fill nor QEMU's
    own check follows it.  Right after a store, with the page writable, it writes
    KernelGsBase (offset 620h of the page at rAX, APM §15.5.2 / Table B-4)
    over the very next instruction: SMSW r12d, then JMP back.  The write must
    be rescanned at once, so the CR0-read intercept fires there."""
    smsw_jmp = bytes.fromhex("410f01e4eb8affff")       # SMSW r12d; JMP 5B0h (from 626h); canonical high bytes
    gsbase = int.from_bytes(smsw_jmp, "little")
    src = _store_loop() + f"""
    mov ecx, 0xC0000102
    mov eax, {gsbase & 0xFFFF_FFFF:#x}
    mov edx, {gsbase >> 32:#x}
    wrmsr
    mov eax, {BASE:#x}
    inc qword ptr [rbx]
    jmp {BASE + 0x61D:#x}
    """
    code = bytearray(assemble(src))
    assert len(code) < 0x400
    tail = assemble("mov edi, r12d\nxor eax, eax", BASE + 0x5B0) + OP["vmmcall"]
    page = code + bytes(0x5B0 - len(code)) + tail
    page += bytes(0x61D - len(page)) + bytes.fromhex("0f01db") + bytes([0x90] * 8)     # VMSAVE at 61Dh
    m = guest("nop")
    m.guest.write_phys(BASE, bytes(page))
    m.intercept("vmsave", on=False)
    m.guest.vmcb.VIRT_EXT |= 2
    _smsw_exits_once_at(m, BASE + 0x620, 8, smsw_jmp)


#: a function called, its immediate overwritten by the second of two stores to its page, and called again
TWO_STORES = """
    lea rbx, [rip + fn]
    call rbx
    mov byte ptr [rip + scratch], 1
    mov byte ptr [rbx + 1], 2
    call rbx
    mov edi, eax
    xor eax, eax
    """ + VMMCALL + """
fn:
    mov eax, 1
    ret
scratch:
    nop
    """


def test_a_second_store_drops_the_block_it_overwrites(guest):
    """A function is run (its block translated), then the page takes two
    stores: one to a byte no block holds, which makes the page writable, and
    one over the function's immediate.  Unicorn alone checks only the first
    store to a page mapped without execute permission; the page is watched
    (engine.StoreWatch), so the second drops the function's block too, and
    calling it again returns the new value, as on the processor."""
    r = guest(TWO_STORES).run(timeout=20)
    assert r.reason == "guest-exit", (r.reason, r.detail)
    assert r.exit_code == 2


def test_without_the_store_watch_the_overwritten_block_would_run(guest, monkeypatch):
    """The watch is what makes the test above pass: with it off, the stale
    block of the function runs (this Unicorn's ``notdirty_write``)."""
    monkeypatch.setattr(engine.StoreWatch, "watch", lambda self, hpa: None)
    r = guest(TWO_STORES).run(timeout=20)
    assert r.reason == "guest-exit" and r.exit_code == 1


@pytest.mark.parametrize("written_first", [False, True])
def test_store_straddling_from_a_data_page_into_a_code_page_exits(guest, written_first):
    """An 8-byte store at BASE - 2 -- two bytes on the data page below the code,
    six on the code page -- writes SMSW r12d over four NOPs at BASE + 2, which
    the guest then jumps to.  The code page is executable when the store comes
    (it needs a write fill), or already writable after a store of its own
    (``written_first``: the straddle's bytes land with no fill): either way the
    block translated at BASE + 2 rescans the page first, and the intercept fires
    there."""
    value = int.from_bytes(bytes.fromhex("0000eb06" "410f01e4"), "little")   # keeps "jmp main" at BASE
    src = f"""
    jmp main
    nop
    nop
    nop
    nop
    jmp finish
main:
    {"mov byte ptr [rip + scratch], 1" if written_first else "nop"}
    mov rax, {value:#x}
    mov rbx, {BASE - 2:#x}
    mov [rbx], rax
    mov rcx, {BASE + 2:#x}
    jmp rcx
finish:
    mov edi, r12d
    xor eax, eax
    """ + VMMCALL + """
scratch:
    nop
    """
    code = assemble(src)
    assert code[:2] == bytes.fromhex("eb06") and code[2:6] == b"\x90" * 4 and code[6] == 0xEB
    _smsw_exits_once_at(guest(src), BASE + 2, 4, SMSW_R12)


def test_an_instruction_run_once_unintercepted_that_overwrites_its_own_block(guest):
    """SGDT [RIP] with the GDTR-read intercept armed: one exit, whose default
    handler lets the instruction run once unintercepted.  Its store lands on
    the ten bytes right after it, in the block it runs in, which QEMU would
    give up and run again as a block of its own -- firing the candidate hook a
    second time, and exiting again for ever.  It runs as a block of its own
    from the start, so there is one exit, and the guest runs the bytes it
    stored: the GDTR (limit, then base: APM vol. 3 "SGDT"), set here to read as
    eight NOPs and ADD [RAX], AL."""
    src = f"mov rax, {DATA:#x}\nsgdt [rip]\n" + "nop\n" * 10 + hc_exit(0x55)
    code = assemble(src)
    at = code.index(bytes.fromhex("0f0105"))                   # SGDT [RIP + disp32]: 7 bytes
    assert code[at + 3:at + 7] == bytes(4)
    m = guest(src)
    gdtr = bytes.fromhex("9090" "909090909090" "0000")         # limit, then a canonical base
    m.mem.write(m.guest.vmcb_hpa + 0x464, gdtr[:2])            # APM Table B-2: GDTR limit at 464h,
    m.mem.write(m.guest.vmcb_hpa + 0x468, gdtr[2:])            # base at 468h
    m.intercept("gdtr_read")
    r = m.run(timeout=20)
    assert r.reason == "guest-exit" and r.exit_code == 0x55, (r.reason, r.detail)
    assert r.counts == {0x67: 1, 0x81: 1}                     # GDTR_READ once, then the exit hypercall
    assert m.guest.read_phys(BASE + at + 7, 10) == gdtr


def test_watches_are_dropped_past_the_limit(guest):
    """Each code page the guest stores to is watched (one hook on Unicorn's list
    each): 65 pages, each written (a RET), called, then stored to.  Past
    ``fill.WATCHED_MAX`` a reset of the translation caches drops the watches."""
    from sandbox.svm.fill import WATCHED_MAX
    n = WATCHED_MAX + 1
    src = f"""
    mov rbx, 0x110000
    mov ecx, {n}
again:
    mov byte ptr [rbx], 0xc3
    call rbx
    mov byte ptr [rbx + 1], 0x90
    add rbx, 0x1000
    dec ecx
    jnz again
    """ + hc_exit(0x55)
    m = guest(src)
    r = m.run(timeout=20)
    assert r.reason == "guest-exit" and r.exit_code == 0x55, (r.reason, r.detail)
    pages = m.cpu.watched_code_pages
    assert len(pages) == n and all(m.guest.read_phys(0x110000 + i * 0x1000, 2) == b"\xc3\x90" for i in range(n))
    m.cpu.reset_translation_caches()
    assert m.cpu.watched_code_pages == frozenset()


def test_a_sled_storing_into_the_code_ahead_of_it_is_not_retranslated_per_store(guest):
    """ADD [RAX], DL with DL = 0 and RAX in the middle of the sled: each store
    lands in the block that runs it, which QEMU gives up to redo the store as a
    block of its own -- after translating up to 512 instructions for it, and
    counting the instruction twice.  Once that is seen at a page, the blocks
    after its next stores hold one instruction, which QEMU never gives up: the
    600 stores are started about 600 times, not once more each (as in Unicorn
    alone), and the guest gets to its exit with its code as it was."""
    n = 600
    src = f"mov rax, {BASE + 0x300:#x}\nxor edx, edx\n" + "add byte ptr [rax], dl\n" * n
    code = assemble(src)
    m = guest(src + hc_exit(0x55))
    r = m.run(timeout=60, max_insns=100_000)
    assert r.reason == "guest-exit" and r.exit_code == 0x55, (r.reason, r.detail)
    assert m.guest.read_phys(BASE, len(code)) == code
    assert r.insns <= n + 2 + 3 + 16, r.insns               # the sled, its two MOVs, the exit, a few redone
