"""Self-modifying code: an armed instruction the guest writes into code it runs
must exit, and the guest must run the bytes it wrote -- whatever the width and
alignment of the store, when the store straddles the instruction's start or a
page boundary, when it lands in the very translated block that is running,
and whoever stores (another guest-virtual alias, event delivery).

Unicorn's own self-modifying-code check does not cover these: a store through
a soft-TLB entry without execute permission turns the check off for the rest
of that entry's life, and an unaligned store is checked at its first byte only
(Unicorn 2.1.4, ``notdirty_write`` and ``store_helper``).  Before the fix a
CLTS written with an 8-byte store at an address that is not a multiple of 8
ran the page's old bytes with no #VMEXIT (issue 10).

The instruction under test in the sweeps is SMSW r12d (41 0F 01 E4, APM vol. 3
"SMSW"): its intercept is CR0 read (exit code 0, APM Table C-1), the default
handler re-executes it unintercepted, and its native effect -- R12 = CR0 --
shows that the guest ran the new bytes, not a stale translation.
"""
from __future__ import annotations


import pytest

from conftest import (BASE, DATA, STUBS, assemble, capture, db, hc_exit, insn_length,
                      install_reporting_idt)

SMSW_R12 = bytes.fromhex("41 0f 01 e4")
NOP = 0x90
CR0_READ = 0x00
CR0_WRITE = 0x10
RUN_S = 10


def _asm(src: str, at: int) -> bytes:
    code = assemble(src, at)
    assert code, src
    return code


# -- a guest made of "sites": each runs twice through one translated block; the
#    second time it stores SMSW into that block, ahead of itself, and runs on
#    into it ---------------------------------------------------------------------
NOPS = DATA + 0x100          # what the first pass stores: the NOPs already there


def _stores(width: str, start: int, n: int) -> str:
    """Guest code that copies ``n`` bytes from [RSI] to ``start`` with stores of
    ``width`` (1, 2, 4, 8, 16 bytes, or one ``rep movsb``)."""
    lines = [f"movabs rdi, {start:#x}"]
    if width == "movsb":
        return "\n".join(lines + [f"mov ecx, {n}", "rep movsb"])
    w = int(width)
    reg = {1: "al", 2: "ax", 4: "eax", 8: "rax"}
    for off in range(0, n, w):
        if w == 16:
            lines += [f"movdqu xmm0, [rsi + {off}]", f"movdqu [rdi + {off}], xmm0"]
        else:
            lines += [f"mov {reg[w]}, [rsi + {off}]", f"mov [rdi + {off}], {reg[w]}"]
    return "\n".join(lines)


def _payload(width: str, pre: int) -> bytes:
    """What a site writes: ``pre`` bytes before the instruction (NOPs, as they
    already are), SMSW r12d, NOPs up to a whole number of stores."""
    body = bytes([NOP]) * pre + SMSW_R12
    w = 1 if width == "movsb" else int(width)
    return body + bytes([NOP]) * (-len(body) % w)


COUNT = "test r12d, r12d\nsetnz r14b\nadd r13, r14\nxor r12d, r12d\nxor r14d, r14d"


def _site(width: str, t: int, pre: int, at: int, tail: int) -> bytes:
    """The site's loop at ``at``.  Each pass first rewrites a NOP with a NOP in
    bytes no block holds (``at - 1`` and ``tail``, on the pages it writes):
    before the fix that turned Unicorn's check off for those pages, so the store
    that follows went unseen.  Pass 1 copies NOPs, pass 2 SMSW r12d."""
    n = len(_payload(width, pre))
    src = f"""
        mov r15d, 2
    again:
        movabs rbx, {at - 1:#x}
        mov byte ptr [rbx], 0x90
        movabs rbx, {tail:#x}
        mov byte ptr [rbx], 0x90
        movabs rsi, {DATA:#x}
        movabs rbx, {NOPS:#x}
        cmp r15d, 2
        cmove rsi, rbx
        {_stores(width, t - pre, n)}
    """
    return _asm(src, at)


def build(sites: list[tuple[str, int, int]]) -> tuple[bytes, list[int]]:
    """Guest code for ``sites`` = [(width, T, pre)]: SMSW r12d is stored to start
    at T (the store starts at T - pre) by a block that runs on into it.  Returns
    the code (at BASE) and each T."""
    code = bytearray(_asm("xor r12d, r12d\nxor r13d, r13d\nxor r14d, r14d", BASE))
    targets = []
    for width, t, pre in sites:
        n = len(_payload(width, pre))
        tail = ((t + n) & ~0xFFF) + 0xF80
        size = len(_site(width, t, pre, BASE, tail))
        at = t - pre - 8 - size
        here = BASE + len(code)
        assert at - 8 - 5 >= here, (hex(here), hex(t))
        code += _asm(f"jmp {at:#x}", here)
        code += bytes([NOP]) * (at - BASE - len(code))     # at - 1: a byte no block holds
        site = _site(width, t, pre, at, tail)
        assert len(site) == size
        code += site
        code += bytes([NOP]) * (t - BASE - len(code) + n + 8)
        back = _asm(f"dec r15d\njnz {at + 6:#x}", BASE + len(code))
        assert _asm("mov r15d, 2", 0) == site[:6]
        code += back + _asm(COUNT, BASE + len(code) + len(back))
        targets.append(t)
    code += _asm("mov edi, r13d\nxor eax, eax", BASE + len(code)) + bytes.fromhex("0f01d9")
    code += _asm("jmp 0", BASE + len(code))       # never runs: ends the last block before the tails
    top = max(((t + 16) & ~0xFFF) + 0x1000 for t in targets)
    code += bytes([NOP]) * (top - BASE - len(code))
    return bytes(code), targets


def run_sites(guest, sites, pre: int = 0, width: str = "1"):
    code, targets = build(sites)
    m = guest("nop")
    m.guest.write_phys(BASE, code)
    payload = _payload(width, pre)
    m.guest.write_phys(DATA, payload)
    m.guest.write_phys(NOPS, bytes([NOP]) * len(payload))
    m.intercept("cr0_read")
    seen = []
    default = m.handlers[CR0_READ]

    def h(m, e):
        seen.append((e.rip, e.nrip))
        return default(m, e)
    m.on(CR0_READ)(h)
    r = m.run(timeout=RUN_S)
    assert r.reason == "guest-exit", (r.reason, r.detail)
    # the intercept fired at each T, NRIP = T + the length capstone finds in memory
    expect = [(t, t + insn_length(m.guest.read_phys(t, 15), t)) for t in targets]
    assert [(hex(a), hex(b)) for a, b in seen] == [(hex(a), hex(b)) for a, b in expect]
    # ... and the guest ran the new bytes: SMSW set R12 at every site
    assert r.exit_code == len(targets)


WIDTHS = ["1", "2", "4", "8", "16", "movsb"]


@pytest.mark.parametrize("width", WIDTHS)
def test_store_of_every_width_at_every_alignment(guest, width):
    """16 sites, the instruction at T = 0 .. 15 (mod 16), each stored ahead of
    the running block with a store of ``width``."""
    sites, t = [], BASE + 0x100
    for align in range(16):
        t = (t + 0xC0) & ~0xF | align
        sites.append((width, t, 0))
    run_sites(guest, sites, 0, width)


@pytest.mark.parametrize("width", ["2", "4", "8", "16", "movsb"])
@pytest.mark.parametrize("pre", [1, 3])
def test_store_straddling_the_instruction_start(guest, width, pre):
    """The store begins ``pre`` bytes before the instruction."""
    sites, t = [], BASE + 0x100
    for align in (0, 1, 7, 13):
        t = (t + 0xC0) & ~0xF | align
        sites.append((width, t, pre))
    run_sites(guest, sites, pre, width)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("k,pre", [(1, 0), (2, 0), (3, 0), (1, 2), (3, 5)])
def test_store_straddling_a_page_boundary(guest, width, k, pre):
    """The instruction starts ``k`` bytes before a page boundary (it straddles
    into the next page), the store ``pre`` bytes before it."""
    run_sites(guest, [(width, BASE + 0x1000 - k, pre)], pre, width)


def exit_r12_nonzero() -> str:
    return "xor edi, edi\ntest r12d, r12d\nsetnz dil\nxor eax, eax\n" + db(bytes.fromhex("0f01d9"))


def run_smsw(m, t: int) -> None:
    m.intercept("cr0_read")
    rec = []
    default = m.handlers[CR0_READ]
    m.on(CR0_READ)(lambda m, e: (rec.append(e.rip), default(m, e))[1])
    r = m.run(timeout=RUN_S)
    assert r.reason == "guest-exit", (r.reason, r.detail)
    assert [hex(x) for x in rec] == [hex(t)]
    assert r.exit_code == 1                       # SMSW r12d ran: the guest saw the new bytes


def test_store_into_a_block_run_before_and_jumped_back_to(guest):
    """The bytes ran once as NOPs (their block is translated and cached); the
    guest patches them and jumps back: the jump must not reach the old block."""
    src = f"""
        xor r12d, r12d
        xor ebx, ebx
    again:
        inc ebx
        cmp ebx, 3
        je done
        cmp ebx, 2
        jne go
        mov rsi, scratch
        mov byte ptr [rsi], 0x90
        mov rdi, target
        mov eax, 0xe4010f41
        mov [rdi], eax
    go:
        jmp target
    target:
        nop
        nop
        nop
        nop
        jmp again
    done:
        {exit_r12_nonzero()}
    scratch:
        nop
    """
    code = assemble(src)
    t = BASE + code.index(bytes([NOP] * 4) + b"\xeb")
    run_smsw(guest(src), t)


# -- the issue's reproducer ---------------------------------------------------------
ISSUE_IMAGE = bytes.fromhex(
    "90515848b80f06909090909090488d3d05000000488907eb00909090909090909048890f9090505950594801d848890d0600000031d2"
    "4801f14889941731c031ff0f01d9")


@pytest.mark.parametrize("offset", range(16))
def test_issue_clts_written_with_an_8_byte_store_at_every_load_offset(guest, offset):
    """The guest stores CLTS (0F 06) with 8-byte stores and runs it, twice: both
    must exit with CR0_WRITE (APM §15.9: CLTS is a CR0 write).  The image is
    placed at BASE + offset; the CLTS run at image offsets 0x19 and 0x39 (the
    second with a REX.W prefix, after a store into the running block)."""
    m = guest("nop")
    m.guest.write_phys(BASE + offset, ISSUE_IMAGE)
    m.guest.vmcb.RIP = BASE + offset
    m.intercept("cr0_write")
    rec = []
    default = m.handlers[CR0_WRITE]

    def h(m, e):
        rec.append(e.rip)
        return m.stop("done") if len(rec) == 2 else default(m, e)
    m.on(CR0_WRITE)(h)
    r = m.run(timeout=RUN_S)
    assert [hex(x - BASE - offset) for x in rec] == ["0x19", "0x39"], (r.reason, r.detail)


# -- other writers ------------------------------------------------------------------
def test_store_through_another_alias_in_the_running_block(guest):
    """The code page is mapped at a second GVA that the guest's data stores
    use; the store lands ahead of the running block, after an earlier store
    through the alias that did not touch code."""
    alias = 0x1F0000
    src = f"""
        xor r12d, r12d
        mov rdi, target
        and edi, 0xfff
        add rdi, {alias}
        mov rsi, scratch
        and esi, 0xfff
        add rsi, {alias}
        mov byte ptr [rsi], 0x90
        mov eax, 0xe4010f41
        mov [rdi], eax
    target:
        nop
        nop
        nop
        nop
        {exit_r12_nonzero()}
    scratch:
        nop
    """
    code = assemble(src)
    t = BASE + code.index(bytes([NOP] * 4))
    m = guest(src)
    from test_intercepts import walk_to_pte
    pte = walk_to_pte(m, alias)
    old = int.from_bytes(m.guest.read_phys(pte, 8), "little")
    m.guest.write_phys(pte, ((old & ~0x000F_FFFF_FFFF_F000) | (t & ~0xFFF)).to_bytes(8, "little"))
    run_smsw(m, t)


def test_event_delivery_pushing_onto_code(guest):
    """An INT3 frame is pushed onto a stack that overlaps code the guest ran:
    the pushed old RSP, 0x10A20F, is stored as the bytes 0F A2 (CPUID) at
    0x10A1F0 (64-bit delivery aligns RSP down to 16 and pushes five quadwords,
    APM vol. 2 §8.9.3).  The #BP handler jumps there: CPUID must exit."""
    code_page = 0x10A000
    slot = 0x10A1F0                      # [RSP before delivery aligned down] - 16: the pushed RSP
    handler = STUBS
    src = f"""
        movabs rax, {slot:#x}
        call rax
        mov rsp, 0x10A20F
        int3
    """
    m = guest(src)
    # the code at the slot: NOPs and RET; it runs once (translated, scanned)
    m.guest.write_phys(code_page + 0x1C0, bytes([NOP]) * 0x40)
    m.guest.write_phys(slot + 8, b"\xc3")
    install_reporting_idt(m)
    m.guest.write_phys(handler + 3 * 64, _asm(f"movabs rax, {slot:#x}\njmp rax", handler + 3 * 64))
    rec = capture(m, 0x72)
    r = m.run(timeout=RUN_S)
    assert r.reason == "captured", (r.reason, r.detail)
    assert rec[0].rip == slot and m.guest.read_phys(slot, 2) == b"\x0f\xa2"


def test_pushf_onto_code_pushes_the_guests_rflags(guest):
    """PUSHFQ whose stack slot is in a code page the guest ran: the image
    pushed is the guest's RFLAGS (TF clear, APM vol. 3 "PUSHF"), not the
    processor model's own single-stepping state."""
    src = f"""
        mov rax, slot
        call rax
        lea rsp, [rax + 8]
        pushfq
        pop rdi
        and edi, 0x100
        or edi, 0x50
        xor eax, eax
        {db(bytes.fromhex("0f01d9"))}
    slot:
        ret
        nop
        nop
        nop
        nop
        nop
        nop
        nop
    """
    r = guest(src).run(timeout=RUN_S)
    assert r.reason == "guest-exit" and r.exit_code == 0x50, (r.reason, r.detail, r.exit_code)


def _code_store_then(guest, before: str, store: str):
    """A guest that runs ``slot`` (making its page code), then ``before``, then
    ``store`` into slot; every vector has a reporting stub (conftest)."""
    src = f"""
        mov rax, slot
        call rax
        mov rdi, slot
        {before}
        {store}
        {hc_exit(0x55)}
    slot:
        ret
        nop
        nop
        nop
        nop
        nop
        nop
        nop
    """
    m = guest(src)
    install_reporting_idt(m)
    code = assemble(src)
    after = BASE + code.index(assemble("mov edi, 0x55"))
    return m, after


def test_guests_own_single_step_trap_after_a_code_store(guest):
    """The guest single-steps itself (TF set by POPF): the #DB after its store
    into code is delivered, with RIP after the store (APM vol. 2 §13.1.5)."""
    m, after = _code_store_then(guest, "pushfq\nor qword ptr [rsp], 0x100\npopfq",
                                   "mov dword ptr [rdi + 1], 0x90909090")
    r = m.run(timeout=RUN_S)
    assert r.reason == "guest-exit" and r.exit_code == 0x101, (r.reason, r.detail, r.exit_code)
    assert r.regs["rsi"] == after                    # the stub reports [RSP] = the pushed RIP


def test_code_store_that_faults_leaves_no_trace_of_stepping(guest):
    """An 8-byte store from the code page's last bytes into a page the guest
    cannot write: #PF (W, P) with RIP = the store and the guest's RFLAGS in the frame."""
    m, after = _code_store_then(guest, "", "mov rsi, 0x100ffc\nmov qword ptr [rsi], rdi")
    from conftest import leaf_pte
    a = leaf_pte(m, 0x101000)
    m.guest.write_phys(a, (int.from_bytes(m.guest.read_phys(a, 8), "little") & ~2).to_bytes(8, "little"))
    r = m.run(timeout=RUN_S)
    assert r.reason == "guest-exit" and r.exit_code == 0x10E, (r.reason, r.detail, r.exit_code)
    store_rip = after - insn_length(assemble("mov qword ptr [rsi], rdi"))
    assert r.regs["rsi"] == 0x3                      # error code: P | W
    assert r.regs["rdx"] == store_rip                # the faulting store
    assert r.regs["r10"] & 0x100 == 0                # RFLAGS image: TF clear
    assert r.regs["r8"] == 0x101000                  # CR2
