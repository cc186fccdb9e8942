"""A guest that keeps storing into the code page it runs from: past
``smc.HOT_AFTER`` stepped stores the instructions after each store are stepped
too, one-instruction blocks instead of a fresh 512-instruction translation per
store.  The guest must not be able to tell: its own RFLAGS.TF, PUSHF images and
single-step traps behave as the manual says (APM vol. 2 §13.1.4: a trap after
each instruction that began with TF set), and it computes what bare Unicorn
computes for the same code."""
from __future__ import annotations

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc

from conftest import BASE, assemble, hc_exit, install_reporting_idt

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
