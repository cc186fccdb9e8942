"""A guest that keeps storing into the code page it runs from: past
``smc.HOT_AFTER`` stepped stores the instructions after each store are stepped
too, one-instruction blocks instead of a fresh 512-instruction translation per
store.  The guest must not be able to tell: its own RFLAGS.TF, PUSHF images and
single-step traps behave as the manual says (APM vol. 2 §13.1.4: a trap after
each instruction that began with TF set), and it computes what bare Unicorn
computes for the same code."""
from __future__ import annotations

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc

import pytest

from conftest import BASE, OP, VMMCALL, assemble, hc_exit, install_reporting_idt

from sandbox.svm import smc

COUNTER = BASE + 0xC00                  # on the code's own page
LOOPS = 3 * smc.HOT_AFTER               # well past the threshold, below demotion
assert LOOPS < smc.DEMOTE_AFTER


def _hot_loop() -> str:
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
    that follows POPF, with the stepped loop's stepping over by then."""
    src = _hot_loop() + """
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


def test_pushf_right_after_hot_stores_shows_the_guests_tf(guest):
    """The model's own TF never shows in an RFLAGS image the guest reads."""
    src = _hot_loop() + "pushfq\npop rdx\ninc qword ptr [rbx]\npushfq\npop rsi\n" + hc_exit(0x55)
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


def _runs_the_stored_smsw(guest, src: str) -> None:
    """Run ``src``, which stores SMSW r12d over the four NOPs at its label
    ``target`` and runs on into them, with the CR0-read intercept armed: the
    intercept fires once, there, and the guest's exit code (R12) is CR0."""
    m = guest(src)
    seen = _cr0_reads(m)
    r = m.run(timeout=20)
    assert r.reason == "guest-exit", (r.reason, r.detail)
    target = BASE + assemble(src).index(bytes([0x90] * 4) + assemble("mov edi, r12d", 0))
    assert m.guest.read_phys(target, 4) == SMSW_R12
    assert [hex(a) for a in seen] == [hex(target)]
    assert r.exit_code == m.guest.vmcb.CR0 & 0xFFFF_FFFF != 0


@pytest.mark.parametrize("gap,after", [(0, 0), (0, smc.HOT_RUN + 4), (40, 0), (40, smc.HOT_RUN + 4)])
def test_store_of_an_armed_instruction_on_a_hot_page_exits(guest, gap, after):
    """Once the page is hot it stays writable while the instructions after a
    store are stepped.  A store right after the hot loop (``after`` = 0) or
    well past it (``after`` idle instructions: the page closed in between)
    writes SMSW r12d ``gap`` bytes after itself, into code the guest then
    runs, stepped or not: the intercept fires there, and R12 = CR0 shows the
    new bytes ran."""
    tail = "target:\nnop\nnop\nnop\nnop\nmov edi, r12d\nxor eax, eax\n" + VMMCALL
    src = (_hot_loop() + "nop\n" * after + "lea rbx, [rip + target]\nmov dword ptr [rbx], 0xe4010f41\n"
           + "nop\n" * gap + tail)
    _runs_the_stored_smsw(guest, src)


def test_a_page_demoted_while_kept_open_is_scanned_before_it_runs_again(guest):
    """The refused store that demotes a hot page to data (``smc.DEMOTE_AFTER``)
    comes in a stepped run that keeps the page writable.  The page is no longer
    scanned, so the run must close it: the next store writes SMSW r12d into
    it, and the intercept still fires where the guest then runs it."""
    idle = "nop\n" * (smc.HOT_RUN + 4)        # each store refused again: the run closes between them
    src = f"""
    lea rdx, [rip + target]
    mov rbx, {COUNTER:#x}
    mov ecx, {smc.DEMOTE_AFTER - 1}
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


def test_stores_that_change_nothing_keep_a_hot_page_stepped(guest, monkeypatch):
    """ADD [RAX], AL with AL = 0 over its own page (the fuzzer's zero-page
    sled): each store leaves the bytes as they were, which a stepped run cannot
    tell from no store.  The run is doubled each time the instruction where it
    stopped stores again, so the sled is refused a handful of times, not once
    every ``smc.HOT_RUN`` instructions; and it still computes what bare Unicorn
    computes."""
    n = 600
    src = f"mov rax, {COUNTER:#x}\nxor edx, edx\n" + "add byte ptr [rax], dl\n" * n
    refused = []
    begin = smc.SmcStepper.begin
    monkeypatch.setattr(smc.SmcStepper, "begin", lambda self, hpa, rip: (refused.append(rip), begin(self, hpa, rip)))
    m = guest(src + hc_exit(0x55))
    r = m.run(timeout=60)
    assert r.reason == "guest-exit", (r.reason, r.detail)
    assert smc.HOT_AFTER <= len(refused) <= smc.HOT_AFTER + 8, len(refused)
    code = assemble(src)
    assert m.guest.read_phys(BASE, len(code)) == _bare_unicorn(code, BASE)[:len(code)]


def test_a_virtual_vmsave_onto_an_open_page_rescans_before_the_next_instruction(guest):
    """A virtualized VMSAVE (VIRT_EXT bit 1) is carried out by the model in
    its candidate hook, so QEMU never runs it and no single-step trap follows
    it.  Stepped right after a store, with the page kept open, it writes
    KernelGsBase (offset 620h of the page at rAX, APM §15.5.2 / Table B-4)
    over the very next instruction: SMSW r12d, then JMP back.  The write must
    be rescanned at once, so the CR0-read intercept fires there."""
    smsw_jmp = bytes.fromhex("410f01e4eb8affff")       # SMSW r12d; JMP 5B0h (from 626h); canonical high bytes
    gsbase = int.from_bytes(smsw_jmp, "little")
    src = _hot_loop() + f"""
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
    seen = _cr0_reads(m)
    r = m.run(timeout=20)
    assert r.reason == "guest-exit", (r.reason, r.detail)
    assert m.guest.read_phys(BASE + 0x620, 8) == smsw_jmp
    assert [hex(a) for a in seen] == [hex(BASE + 0x620)]
    assert r.exit_code == m.guest.vmcb.CR0 & 0xFFFF_FFFF != 0
