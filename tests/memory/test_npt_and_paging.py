"""Nested paging (kvm-unit-tests svm_npt ports), guest #PF, A/D bits, and
the shared 4-level walker.

NPF EXITINFO1 (APM §15.25.6): bit 0 P, 1 RW, 2 US, 3 RSV, 4 ID,
32 final GPA translation, 33 guest page-table walk; EXITINFO2 = the
faulting guest-physical address.  Nested accesses are user accesses and a
guest page-table access is a nested write (§3, §8).  #PF error codes: APM
vol. 2 §8.4.2 (P 0, W/R 1, U/S 2, RSV 3, I/D 4).
"""
from __future__ import annotations

import pytest

from sandbox.memory.paging import PTE, Access, PFErr, canonical, walk

from conftest import asm_set_gate, BASE, DATA, PT_ROOT, assemble, capture, hc_exit, user_code_addr, user_guest

P, RW, US, RSV, ID = 1, 2, 4, 8, 0x10
FINAL, GPT = 1 << 32, 1 << 33
NPF = 0x400
ADDR = 0x000F_FFFF_FFFF_F000


def walk_entries(m, va: int) -> list[int]:
    """GPAs of the PML4E, PDPTE, PDE and PTE for ``va`` (APM vol. 2 §5.3.3),
    following the guest's identity tables from CR3."""
    table = m.guest.vmcb.CR3 & ~0xFFF
    out = []
    for shift in (39, 30, 21, 12):
        ea = table + ((va >> shift) & 0x1FF) * 8
        out.append(ea)
        e = int.from_bytes(m.guest.read_phys(ea, 8), "little")
        table = e & ADDR
    return out


def entry(m, gpa: int) -> int:
    return int.from_bytes(m.guest.read_phys(gpa, 8), "little")


def npf_run(guest, body: str, prepare, ram=None):
    m = guest(body + "\n" + hc_exit(0x55)) if ram is None else guest(body + "\n" + hc_exit(0x55), ram=ram)
    prepare(m)
    rec = capture(m, NPF)
    r = m.run(timeout=5)
    assert r.reason == "captured", (r.reason, r.detail)
    assert r.counts == {NPF: 1}
    return m, rec[0]


# ============================================================ svm_npt ports
@pytest.mark.parametrize("access,insn,bits", [
    ("read", "mov rax, [rbx]", US),               # KUT npt_np: 0x100000004
    ("write", "mov qword ptr [rbx], 0", US | RW),
])
def test_npt_np(guest, access, insn, bits):
    pre = f"mov rbx, {DATA:#x}"
    m, e = npf_run(guest, pre + "\n" + insn, lambda m: m.guest.npt.protect(DATA, present=False))
    assert e.info1 == FINAL | bits
    if access == "read":
        assert e.info1 == 0x100000004
    assert e.info2 == DATA
    assert e.rip == BASE + len(assemble(pre))
    assert e.nrip == 0                                   # not an instruction intercept (APM §15.7.1)



def test_npf_exitinfo2_is_the_exact_gpa(guest):
    m, e = npf_run(guest, f"mov rbx, {DATA + 0x18:#x}\nmov rax, [rbx]",
                   lambda m: m.guest.npt.protect(DATA, present=False))
    assert e.info1 == 0x100000004
    assert e.info2 == DATA + 0x18


def test_npt_np_unmapped_page(guest):
    m, e = npf_run(guest, f"mov rbx, {DATA:#x}\nmov rax, [rbx]", lambda m: m.guest.npt.unmap(DATA))
    assert (e.info1, e.info2) == (0x100000004, DATA)


def test_npt_us(guest):
    """KUT npt_us: nPTE U=0, guest read -> 0x100000005."""
    m, e = npf_run(guest, f"mov rbx, {DATA:#x}\nmov rax, [rbx]", lambda m: m.guest.npt.protect(DATA, user=False))
    assert (e.info1, e.info2) == (0x100000005, DATA)


def test_npt_rw(guest):
    """KUT npt_rw: nPTE W=0 on 0x80000, guest write -> 0x100000007."""
    m, e = npf_run(guest, "mov rbx, 0x80000\nmov qword ptr [rbx], 0", lambda m: m.guest.npt.protect(0x80000, write=False))
    assert (e.info1, e.info2) == (0x100000007, 0x80000)


def test_npt_rw_read_is_allowed(guest):
    m = guest("mov rbx, 0x80000\nmov rax, [rbx]\n" + hc_exit(0x55))
    m.guest.npt.protect(0x80000, write=False)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 0x55 and NPF not in r.counts


@pytest.mark.parametrize("guest_nxe", [False, True])
def test_npt_nx(guest, guest_nxe):
    """KUT npt_nx: nested NX on a code page, guest EFER.NX=0 -> 0x100000015."""
    body = f"mov rax, {DATA:#x}\nmov byte ptr [rax], 0xc3\ncall rax"

    def prep(m):
        m.guest.npt.protect(DATA, execute=False)
        if not guest_nxe:
            m.guest.vmcb.EFER &= ~(1 << 11)
    m, e = npf_run(guest, body, prep)
    assert (e.info1, e.info2) == (0x100000015, DATA)
    assert e.rip == DATA


def test_npt_rw_pfwalk(guest):
    """KUT npt_rw_pfwalk: the nPTE of the guest's CR3 page read-only -> 0x200000007,
    EXITINFO2 = CR3 (the PML4 entry for the low 512 GiB is at CR3 + 0)."""
    m, e = npf_run(guest, "nop", lambda m: m.guest.npt.protect(PT_ROOT, write=False))
    assert (e.info1, e.info2) == (0x200000007, PT_ROOT)
    assert e.rip == BASE


def test_npt_pfwalk_on_a_leaf_table_reports_the_pte_gpa(guest):
    """The page holding the PTEs of [2 MiB, 4 MiB) read-only in the nPT: a guest read
    of 0x205000 faults on the walk with EXITINFO2 = the GPA of its PTE."""
    va = 0x205000
    holder = {}

    def prep(m):
        pte = walk_entries(m, va)[3]
        holder["pte"] = pte
        assert pte & ~0xFFF != walk_entries(m, BASE)[3] & ~0xFFF     # not the code's PT page
        m.guest.npt.protect(pte & ~0xFFF, write=False)
    m, e = npf_run(guest, f"mov rbx, {va:#x}\nmov rax, [rbx]", prep, ram=4 << 20)
    assert e.info1 == GPT | P | RW | US
    assert e.info2 == holder["pte"] == (holder["pte"] & ~0xFFF) + ((va >> 12) & 0x1FF) * 8


def test_npt_reserved_bit_in_a_leaf(guest):
    """svm_npt_rsvd_bits_test: a reserved bit (51) in the final nPTE -> P|RSV|US|final (+W on write)."""
    def prep(m):
        slot = m.guest.npt.entry_addr(DATA)
        m.mem.write_u64(slot, m.mem.read_u64(slot) | (1 << 51))
    m, e = npf_run(guest, f"mov rbx, {DATA:#x}\nmov qword ptr [rbx], 1", prep)
    assert e.info1 == FINAL | P | RW | US | RSV           # KUT: 0x10000000D (| 0x2 for the write)


def test_npf_then_fixup_resumes(guest):
    """A hypervisor fixes the nPTE in its NPF handler and the guest completes the write."""
    m = guest(f"mov rbx, {DATA:#x}\nmov qword ptr [rbx], 0x1234\nmov rax, [rbx]\nmov rdi, rax\n"
              f"xor eax, eax\n.byte 0x0f,0x01,0xd9")
    m.guest.npt.protect(DATA, write=False)
    seen = []

    @m.on(NPF)
    def h(m, e):
        seen.append((e.exitinfo1, e.exitinfo2))
        m.guest.npt.protect(DATA, write=True)
    r = m.run(timeout=5)
    assert seen == [(0x100000007, DATA)]
    assert r.reason == "guest-exit" and r.exit_code == 0x1234


def test_npt_remap_is_seen_by_the_guest(guest):
    """map(gpa, hpa) redirects the guest-physical page (TLB flushed for the guest)."""
    m = guest(f"mov rbx, {DATA:#x}\nmov rdi, [rbx]\n" + "xor eax, eax\n.byte 0x0f,0x01,0xd9")
    other = m.mem.alloc_page()
    m.mem.write(other, (0xC0FFEE).to_bytes(8, "little"))
    m.guest.npt.map(DATA, other)
    r = m.run(timeout=5)
    assert r.exit_code == 0xC0FFEE


# ============================================================ nested A/D bits
def test_nested_accessed_dirty_bits(guest):
    """Guest-PT reads are nested writes (A+D on the nPTE of the PML4 page); a guest
    data read sets nested A only, a write A and D."""
    rd, wr = DATA, DATA + 0x1000
    m = guest(f"mov rbx, {rd:#x}\nmov rax, [rbx]\nmov rbx, {wr:#x}\nmov [rbx], rax\n" + hc_exit(0x55))
    for g in (rd, wr, PT_ROOT):
        slot = m.guest.npt.entry_addr(g)
        m.mem.write_u64(slot, m.mem.read_u64(slot) & ~(PTE.A | PTE.D))
    r = m.run(timeout=5)
    assert r.reason == "guest-exit"
    ne = m.guest.npt.entry
    assert ne(rd) & PTE.A and not ne(rd) & PTE.D
    assert ne(wr) & PTE.A and ne(wr) & PTE.D
    assert ne(PT_ROOT) & PTE.A and ne(PT_ROOT) & PTE.D


# ============================================================ guest #PF
IDT = 0x60000


def pf_guest_src(body: str) -> str:
    """A guest that builds its own IDT (vector 14 only), then runs ``body``;
    the handler reports RSI = error code, RDX = faulting RIP, R8 = CR2."""
    return asm_set_gate(IDT, 14, "pf_handler") + f"""
    mov rax, idtr
    lidt [rax]
{body}
fault:
    {{insn}}
{hc_exit(0x99)}
pf_handler:
    mov rsi, [rsp]
    mov rdx, [rsp+8]
    mov r8, cr2
{hc_exit(0x0E)}
idtr:
    .word 0xfff
    .quad {IDT:#x}
"""


def fault_rip(src: str) -> int:
    # the labels referenced before ``fault:`` are defined after it; defining them
    # right after the prefix does not change the prefix's encoding (imm32 forms)
    return BASE + len(assemble(src.split("fault:")[0] + "\npf_handler:\nidtr:\n"))


PF_CASES = [
    # (id, setup body, faulting instruction, address, expected error code)
    ("np-write", "mov rbx, 0x400000", "mov byte ptr [rbx], 1", 0x400000, RW),            # P=0 W=1 U=0 -> 2
    ("np-read", "mov rbx, 0x400000", "mov al, [rbx]", 0x400000, 0),
    ("np-fetch", "mov rbx, 0x400000", "call rbx", 0x400000, ID),                          # EFER.NXE=1 -> I/D
    ("np-read-pdpt", "mov rbx, 0x8000000000", "mov al, [rbx]", 0x8000000000, 0),
]


@pytest.mark.parametrize("id_,body,insn,addr,err", PF_CASES, ids=[c[0] for c in PF_CASES])
def test_guest_pf_handled_by_its_own_idt(guest, id_, body, insn, addr, err):
    src = pf_guest_src(body).replace("{insn}", insn)
    m = guest(src)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit" and r.exit_code == 0x0E, (r.reason, r.detail, r.exit_code)
    assert r.regs["rsi"] == err
    assert r.regs["r8"] == addr
    expected_rip = addr if id_ == "np-fetch" else fault_rip(src)
    assert r.regs["rdx"] == expected_rip
    assert 0x4E not in r.counts


def test_guest_pf_cr2_is_the_exact_address(guest):
    src = pf_guest_src("mov rbx, 0x400123").replace("{insn}", "mov byte ptr [rbx], 1")
    r = guest(src).run(timeout=5)
    assert r.exit_code == 0x0E and r.regs["rsi"] == RW
    assert r.regs["r8"] == 0x400123


def test_pf_intercept_exitinfo2_is_the_exact_address(guest):
    src = pf_guest_src("mov rbx, 0x400123").replace("{insn}", "mov byte ptr [rbx], 1")
    m = guest(src)
    m.intercept("excp14")
    rec = capture(m, 0x4E)
    m.run(timeout=5)
    assert (rec[0].info1, rec[0].info2) == (RW, 0x400123)


def test_guest_pf_protection_fault_write_to_read_only_pte(guest):
    """A present read-only guest PTE with CR0.WP=1: supervisor write -> error code P|W = 3."""
    src = pf_guest_src(f"mov rbx, {DATA:#x}").replace("{insn}", "mov byte ptr [rbx], 1")
    m = guest(src)
    pte = walk_entries(m, DATA)[3]
    m.guest.write_phys(pte, (entry(m, pte) & ~PTE.RW).to_bytes(8, "little"))
    r = m.run(timeout=5)
    assert r.exit_code == 0x0E and r.regs["rsi"] == P | RW and r.regs["r8"] == DATA
    assert r.regs["rdx"] == fault_rip(src)


def test_guest_pf_reserved_bit(guest):
    """Bit 51 set in a guest PTE (MAXPHYADDR 48) -> error code P|RSV (read)."""
    src = pf_guest_src(f"mov rbx, {DATA:#x}").replace("{insn}", "mov al, [rbx]")
    m = guest(src)
    pte = walk_entries(m, DATA)[3]
    m.guest.write_phys(pte, (entry(m, pte) | (1 << 51)).to_bytes(8, "little"))
    r = m.run(timeout=5)
    assert r.exit_code == 0x0E and r.regs["rsi"] == P | RSV


def test_guest_pf_nx_fetch(guest):
    """Guest PTE with NX (EFER.NXE = 1): instruction fetch -> error code P|I/D = 0x11, at the target."""
    src = pf_guest_src(f"mov rbx, {DATA:#x}\nmov byte ptr [rbx], 0xc3").replace("{insn}", "call rbx")
    m = guest(src)
    pte = walk_entries(m, DATA)[3]
    m.guest.write_phys(pte, (entry(m, pte) | PTE.NX).to_bytes(8, "little"))
    r = m.run(timeout=5)
    assert r.exit_code == 0x0E and (r.regs["rsi"], r.regs["r8"], r.regs["rdx"]) == (P | ID, DATA, DATA)


def test_cr0_wp_clear_lets_supervisor_write_read_only_pages(guest):
    m = guest(f"mov rbx, {DATA:#x}\nmov byte ptr [rbx], 0x5a\n" + hc_exit(0x55))
    pte = walk_entries(m, DATA)[3]
    m.guest.write_phys(pte, (entry(m, pte) & ~PTE.RW).to_bytes(8, "little"))
    m.guest.vmcb.CR0 &= ~(1 << 16)
    r = m.run(timeout=5)
    assert r.exit_code == 0x55 and m.guest.read_phys(DATA, 1) == b"\x5a"


@pytest.mark.parametrize("insn,err", [("mov al, [rbx]", P | US), ("mov byte ptr [rbx], 1", P | RW | US)])
def test_user_access_to_a_supervisor_page(guest, insn, err):
    """CPL 3 touching a U/S = 0 page: #PF with U/S = 1 in the error code."""
    va = DATA + 0x1000
    m = user_guest(guest, f"mov rbx, {va:#x}\n{insn}")
    r = m.run(timeout=5)
    assert r.exit_code == 0x10E, (r.reason, r.detail, r.exit_code)
    assert (r.regs["rsi"], r.regs["r8"]) == (err, va)
    assert r.regs["rdx"] == user_code_addr(f"mov rbx, {va:#x}")


@pytest.mark.parametrize("insn,err", [("mov byte ptr [rbx], 1", RW), ("mov al, [rbx]", 0)])
def test_pf_intercept(guest, insn, err):
    """excp14 armed: exit 0x4E, EXITINFO1 = error code, EXITINFO2 = faulting address,
    CR2 not written (§3), NRIP = 0."""
    src = pf_guest_src("mov rbx, 0x400000").replace("{insn}", insn)
    m = guest(src)
    m.intercept("excp14")
    rec = capture(m, 0x4E)
    r = m.run(timeout=5)
    assert r.reason == "captured" and r.counts == {0x4E: 1}
    e = rec[0]
    assert (e.info1, e.info2, e.rip, e.nrip) == (err, 0x400000, fault_rip(src), 0)
    assert m.guest.vmcb.CR2 == 0


def test_pf_intercept_reflected_by_the_default_handler(guest):
    """The default #PF handler reflects the fault into the guest with CR2 set."""
    src = pf_guest_src("mov rbx, 0x400000").replace("{insn}", "mov byte ptr [rbx], 1")
    m = guest(src)
    m.intercept("excp14")
    r = m.run(timeout=5)
    assert r.exit_code == 0x0E and r.regs["rsi"] == RW and r.regs["r8"] == 0x400000
    assert r.counts[0x4E] == 1


# ============================================================ guest A/D bits
def test_guest_accessed_and_dirty_bits(guest):
    rd, wr, untouched = DATA, DATA + 0x1000, DATA + 0x2000
    m = guest(f"mov rbx, {rd:#x}\nmov rax, [rbx]\nmov rbx, {wr:#x}\nmov [rbx], rax\n" + hc_exit(0x55))
    ptes = {va: walk_entries(m, va) for va in (rd, wr, untouched)}
    for va in (rd, wr, untouched):
        assert not entry(m, ptes[va][3]) & (PTE.A | PTE.D)        # the loader leaves A/D clear
    r = m.run(timeout=5)
    assert r.reason == "guest-exit"
    e_rd, e_wr, e_un = (entry(m, ptes[va][3]) for va in (rd, wr, untouched))
    assert e_rd & PTE.A and not e_rd & PTE.D                       # read: A only
    assert e_wr & PTE.A and e_wr & PTE.D                           # write: A and D
    assert not e_un & (PTE.A | PTE.D)
    for upper in ptes[rd][:3]:                                     # A on every level walked
        assert entry(m, upper) & PTE.A


def test_read_then_write_sets_dirty(guest):
    """A page first read (TLB filled read-only) and then written must get D."""
    va = DATA + 0x3000
    m = guest(f"mov rbx, {va:#x}\nmov rax, [rbx]\nmov [rbx], rax\n" + hc_exit(0x55))
    pte = walk_entries(m, va)[3]
    m.run(timeout=5)
    assert entry(m, pte) & PTE.D


def test_code_fetch_sets_accessed_only(guest):
    m = guest(hc_exit(0x55))
    pte = walk_entries(m, BASE)[3]
    m.run(timeout=5)
    assert entry(m, pte) & PTE.A and not entry(m, pte) & PTE.D


# ============================================================ paging.walk unit tests
class Mem(dict):
    def read(self, a):
        return self.get(a, 0)

    def write(self, a, v):
        self[a] = v


ROOT, L3, L2, L1, FRAME = 0x1000, 0x2000, 0x3000, 0x4000, 0x0000_00AB_CDEF_0000
VA = (0x0F1 << 39) | (0x0A2 << 30) | (0x1B3 << 21) | (0x0C4 << 12) | 0xABC


def four_level(leaf_flags=P | RW | US, upper=P | RW | US):
    m = Mem()
    m.write(ROOT + 0x0F1 * 8, L3 | upper)
    m.write(L3 + 0x0A2 * 8, L2 | upper)
    m.write(L2 + 0x1B3 * 8, L1 | upper)
    m.write(L1 + 0x0C4 * 8, FRAME | leaf_flags)
    return m


def do_walk(m, va=VA, access=Access.READ, user=False, **kw):
    return walk(ROOT, va, access, user, m.read, m.write, **kw)


def test_walk_translates_a_4k_page():
    m = four_level()
    r = do_walk(m)
    assert r.fault is None and r.phys == FRAME | 0xABC and r.page_size == 4096 and r.entries == 4
    assert r.writable and r.user and r.executable


@pytest.mark.parametrize("level_addr", [ROOT + 0x0F1 * 8, L3 + 0x0A2 * 8, L2 + 0x1B3 * 8, L1 + 0x0C4 * 8])
@pytest.mark.parametrize("access,user,err", [(Access.READ, False, 0), (Access.WRITE, False, RW),
                                             (Access.READ, True, US), (Access.FETCH, True, US | ID)])
def test_walk_not_present_at_each_level(level_addr, access, user, err):
    m = four_level()
    m.write(level_addr, m.read(level_addr) & ~P)
    r = do_walk(m, access=access, user=user)
    assert r.fault == err


def test_walk_fetch_without_nxe_has_no_id_bit():
    m = four_level()
    m.write(L1 + 0x0C4 * 8, 0)
    assert do_walk(m, access=Access.FETCH, nxe=False).fault == 0


@pytest.mark.parametrize("wp,user,faults", [(True, False, True), (False, False, False), (False, True, True)])
def test_walk_write_to_read_only(wp, user, faults):
    m = four_level(leaf_flags=P | US)
    r = do_walk(m, access=Access.WRITE, user=user, wp=wp)
    assert (r.fault == (P | RW | (US if user else 0))) if faults else r.fault is None


def test_walk_read_only_in_an_upper_level_applies():
    m = four_level(upper=P | US)
    assert do_walk(m, access=Access.WRITE).fault == P | RW


def test_walk_user_access_to_supervisor_page():
    m = four_level(leaf_flags=P | RW)
    assert do_walk(m, user=True).fault == P | US
    assert do_walk(m, user=False).fault is None


def test_walk_nx():
    m = four_level(leaf_flags=P | RW | US | PTE.NX)
    assert do_walk(m, access=Access.FETCH).fault == P | ID
    assert do_walk(m, access=Access.READ).fault is None
    # EFER.NXE = 0: bit 63 is reserved (APM vol. 2 §5.3.1)
    assert do_walk(m, access=Access.READ, nxe=False).fault == P | RSV


@pytest.mark.parametrize("bit", [51, 48])
def test_walk_reserved_address_bits(bit):
    m = four_level()
    m.write(L2 + 0x1B3 * 8, m.read(L2 + 0x1B3 * 8) | (1 << bit))
    assert do_walk(m, access=Access.WRITE).fault == P | RW | RSV


def test_walk_2m_page():
    m = four_level()
    big = 0x0000_0012_3440_0000
    m.write(L2 + 0x1B3 * 8, big | P | RW | US | PTE.PS)
    r = do_walk(m)
    assert r.fault is None and r.page_size == 2 << 20
    assert r.phys == big | (VA & 0x1F_FFFF) and r.entries == 3


def test_walk_2m_page_with_reserved_low_bits():
    m = four_level()
    m.write(L2 + 0x1B3 * 8, 0x0000_0012_3440_0000 | (1 << 13) | P | RW | US | PTE.PS)
    assert do_walk(m).fault == P | RSV


def test_walk_1g_page():
    m = four_level()
    big = 0x0000_0040_0000_0000
    m.write(L3 + 0x0A2 * 8, big | P | RW | US | PTE.PS)
    r = do_walk(m)
    assert r.fault is None and r.page_size == 1 << 30 and r.phys == big | (VA & 0x3FFF_FFFF)


def test_walk_ps_in_pml4e_is_reserved():
    m = four_level()
    m.write(ROOT + 0x0F1 * 8, m.read(ROOT + 0x0F1 * 8) | PTE.PS)
    assert do_walk(m).fault == P | RSV


def test_walk_bit_8_in_pml4e_is_reserved():
    """A PML4E's bits 8:7 are MBZ on AMD (APM vol. 2 Figure 5-18; KVM reserves non-leaf
    bit 8 on AMD, kvm-unit-tests svm_npt_rsvd_bits_test wants an NPF for it)."""
    m = four_level()
    m.write(ROOT + 0x0F1 * 8, m.read(ROOT + 0x0F1 * 8) | (1 << 8))
    assert do_walk(m, access=Access.WRITE, user=True).fault == P | RW | US | RSV


def test_walk_bit_8_of_a_leaf_is_global_not_reserved():
    m = four_level(leaf_flags=P | RW | US | PTE.G)
    r = do_walk(m)
    assert r.fault is None and r.global_


@pytest.mark.parametrize("nxe,smep,id_bit", [(False, False, 0), (True, False, ID), (False, True, ID),
                                             (True, True, ID)])
def test_walk_fetch_fault_id_bit_with_nxe_or_smep(nxe, smep, id_bit):
    """I/D is reported for a fetch only when EFER.NXE or CR4.SMEP is set (APM vol. 2 §8.4.2;
    kvm-unit-tests svm_npt_rsvd_bits_test: "PFEC.FETCH=1 if NX=1 *or* SMEP=1")."""
    m = four_level()
    m.write(L1 + 0x0C4 * 8, m.read(L1 + 0x0C4 * 8) | (1 << 50))      # a reserved address bit
    assert do_walk(m, access=Access.FETCH, user=True, nxe=nxe, smep=smep).fault == P | US | RSV | id_bit


def test_walk_sets_accessed_and_dirty():
    m = four_level()
    addrs = [ROOT + 0x0F1 * 8, L3 + 0x0A2 * 8, L2 + 0x1B3 * 8, L1 + 0x0C4 * 8]
    do_walk(m, access=Access.READ)
    assert all(m.read(a) & PTE.A for a in addrs)
    assert not any(m.read(a) & PTE.D for a in addrs)
    do_walk(m, access=Access.WRITE)
    assert m.read(addrs[3]) & PTE.D
    assert not any(m.read(a) & PTE.D for a in addrs[:3])


def test_walk_without_set_ad_leaves_entries_alone():
    m = four_level()
    before = dict(m)
    do_walk(m, access=Access.WRITE, set_ad=False)
    assert dict(m) == before


def test_walk_fault_leaves_the_leaf_accessed_bit_clear():
    m = four_level(leaf_flags=P | US)
    do_walk(m, access=Access.WRITE)
    assert not m.read(L1 + 0x0C4 * 8) & PTE.A


@pytest.mark.parametrize("va,ok", [(0, True), (0x0000_7FFF_FFFF_FFFF, True), (0x0000_8000_0000_0000, False),
                                   (0xFFFF_8000_0000_0000, True), (0xFFFF_7FFF_FFFF_FFFF, False),
                                   (0xFFFF_FFFF_FFFF_FFFF, True)])
def test_canonical(va, ok):
    assert canonical(va) == ok


def test_pferr_bit_values():
    assert (PFErr.P, PFErr.W, PFErr.U, PFErr.RSVD, PFErr.ID) == (1, 2, 4, 8, 0x10)
    assert (PFErr.FINAL, PFErr.PT_WALK) == (1 << 32, 1 << 33)
