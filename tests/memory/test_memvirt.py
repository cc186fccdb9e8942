"""Memory virtualization in depth: walk accounting, large pages at both
levels, hardware A/D bits in the nested tables, the ASID-tagged TLB with
TLB_CONTROL / INVLPGA / INVLPG / MOV CR3, and malformed tables.

References: APM vol. 2 §5.3-5.5 (long-mode paging, TLB, global pages),
§15.16 (ASIDs, TLB_CONTROL, INVLPGA), §15.25 (nested paging; nested
accesses are user accesses; a guest page-table access is a nested write;
NPF EXITINFO1 bits 32/33).  Expected counts are derived in the tests.
"""
from __future__ import annotations

import pytest

from sandbox import Machine
from sandbox.memory.hostmem import HostMemory
from sandbox.memory.mmu import GuestLayer, NestedLayer, TwoDimWalker, WalkStats
from sandbox.memory.npt import NestedPageTable
from sandbox.memory.paging import PTE, Access, TableBuilder
from sandbox.memory.tlb import TlbMode
from sandbox.svm.vmcb import TlbControl

from conftest import BASE, DATA, capture, hc_exit, leaf_pte, new_machine

P, RW, US, RSV, ID = 1, 2, 4, 8, 0x10
FINAL, GPT = 1 << 32, 1 << 33
NPF = 0x400
KIB4, MIB2, GIB1 = 1 << 12, 1 << 21, 1 << 30
LEVELS_FOR = {KIB4: 4, MIB2: 3, GIB1: 2}       # table levels a walk reads down to a leaf of that size


def expected_refs(guest_levels: int, nested_levels: int) -> int:
    """Figure 15-13's count, derived: each guest table entry is itself a GPA,
    so reading it costs a nested walk plus the read; the final GPA costs one
    more nested walk."""
    return guest_levels * (nested_levels + 1) + nested_levels


# ============================================================ walk accounting
@pytest.mark.parametrize("guest_page", [KIB4, MIB2, GIB1])
@pytest.mark.parametrize("nested_page", [KIB4, MIB2, GIB1])
def test_walk_references(guest_page, nested_page):
    """One cold 2-D walk reads exactly the derived number of table entries
    (24 for 4 KiB pages at both levels) and makes one data reference."""
    mem = HostMemory(64 << 20)
    npt = NestedPageTable(mem)
    off = 0 if nested_page == GIB1 else 0x0200_0000        # HPA = GPA + off
    if nested_page == GIB1:
        npt.map(0, 0, size=GIB1)

    def nmap(gpa: int) -> None:
        if nested_page != GIB1:
            base = gpa & ~(nested_page - 1)
            if base not in npt.leaves:
                npt.map(base, base + off, size=nested_page)
    tables = []

    def gpa_alloc() -> int:
        gpa = 0x0100_0000 + len(tables) * KIB4
        tables.append(gpa)
        nmap(gpa)
        return gpa
    rd = lambda gpa: mem.read_u64(gpa + off)
    wr = lambda gpa, v: mem.write_u64(gpa + off, v)
    root = gpa_alloc()
    tb = TableBuilder(root, gpa_alloc, rd, wr)
    gva = 0x7F80_0000_0000
    data_gpa = 0 if guest_page == GIB1 else 0x0140_0000
    nmap(data_gpa)
    tb.map(gva, data_gpa, size=guest_page)
    stats = WalkStats()
    nested = NestedLayer(mem, npt.n_cr3, stats)
    guest = GuestLayer(nested, cr0=0x8001_0001, cr3=root, cr4=0x20, efer=0xD00, stats=stats)
    t = TwoDimWalker(guest, nested, stats).translate(gva + 0x123, Access.READ, False)
    lg, ln = LEVELS_FOR[guest_page], LEVELS_FOR[nested_page]
    assert t.gpa == data_gpa + 0x123 and t.hpa == data_gpa + off + 0x123
    assert stats.guest_entries == lg
    assert stats.nested_entries == lg * ln + ln
    assert stats.table_refs == expected_refs(lg, ln)
    assert stats.data_refs == 1 and stats.walks == 1
    if guest_page == KIB4 and nested_page == KIB4:
        assert stats.table_refs == 24          # the figure the APM and the seeds quote


#: read one qword of each of 16 pages from 0x150000 (the code page is a 17th)
TOUCH_16 = """
    mov rbx, 0x150000
    mov ecx, 16
touch:
    mov rax, [rbx]
    add rbx, 0x1000
    dec ecx
    jnz touch
"""
HELLO_LOOP = TOUCH_16 + hc_exit(0)


@pytest.mark.parametrize("npt_page", [KIB4, MIB2])
def test_run_summary_counts_walks(tmp_path, npt_page):
    """A run reports its walks: with no page-walk cache every walk costs the
    derived 24 (4 KiB nested) or 19 (2 MiB nested) references, and each TLB
    miss is one walk."""
    p = tmp_path / "g.S"
    p.write_text(HELLO_LOOP)
    m = Machine(dram=16 << 20, ram=4 << 20, npt_page=npt_page)
    m.load(str(p))
    r = m.run(timeout=5)
    assert r.reason == "guest-exit", r.detail
    w = r.walk
    assert w["walks"] >= 17                          # 16 data pages + the code page
    assert w["table_refs"] == expected_refs(4, LEVELS_FOR[npt_page]) * w["walks"]
    assert w["data_refs"] == w["walks"]
    assert r.tlb["misses"] == w["walks"]


# ============================================================ large pages, permissions
def _map_guest_large(m: Machine, gva: int, gpa: int, size: int, **kw) -> None:
    """Add a large leaf to the guest's own tables (built in guest RAM)."""
    free = [0x80000 - 0x1000 * i for i in range(1, 16)]
    tb = TableBuilder(m.guest.vmcb.CR3, lambda: free.pop(0),
                      lambda a: int.from_bytes(m.guest.read_phys(a, 8), "little"),
                      lambda a, v: m.guest.write_phys(a, v.to_bytes(8, "little")))
    for a in free:
        m.guest.write_phys(a, bytes(4096))
    tb.map(gva, gpa, size=size, **kw)


@pytest.mark.parametrize("size,gva", [(MIB2, 0x4000_0000), (GIB1, 0x80_0000_0000)])
def test_guest_large_pages_read_write_and_ad(guest, size, gva):
    src = f"""
    mov rbx, {gva + DATA:#x}
    mov rsi, [rbx]
    mov qword ptr [rbx + 8], 0x77
""" + hc_exit(0)
    m = guest(src)
    m.guest.write_phys(DATA, (0x1122334455667788).to_bytes(8, "little"))
    _map_guest_large(m, gva, 0, size)
    r = m.run(timeout=5)
    assert r.reason == "guest-exit", r.detail
    assert r.regs["rsi"] == 0x1122334455667788
    assert m.guest.read_phys(DATA + 8, 8) == (0x77).to_bytes(8, "little")
    # the large leaf got A and D (APM §5.4.2); find it by walking from CR3
    table = m.guest.vmcb.CR3
    for shift in (39, 30, 21):
        e = int.from_bytes(m.guest.read_phys(table + ((gva >> shift) & 0x1FF) * 8, 8), "little")
        if e & PTE.PS:
            break
        table = e & 0x000F_FFFF_FFFF_F000
    assert e & PTE.PS and e & PTE.A and e & PTE.D


def test_guest_large_page_reserved_bit_faults_rsvd(guest):
    """Bits 20:13 of a 2 MiB PDE's address field are reserved (APM §5.4.1)."""
    from conftest import install_reporting_idt
    m = guest("mov rbx, 0x40000000\nmov rax, [rbx]\n" + hc_exit(0))
    install_reporting_idt(m)
    _map_guest_large(m, 0x4000_0000, 0, MIB2, extra=1 << 13)
    r = m.run(timeout=5)
    assert r.exit_code == 0x100 + 14, r
    assert r.regs["rsi"] == P | RSV                 # error code: present, reserved bit, read, supervisor
    assert r.regs["r8"] == 0x4000_0000


def _npf(m: Machine):
    rec = capture(m, NPF)
    r = m.run(timeout=5)
    assert r.reason == "captured", (r.reason, r.detail)
    return rec[0]


@pytest.mark.parametrize("what,insn,bits", [
    ("readonly", "mov qword ptr [rbx], 1", P | RW | US),
    ("supervisor", "mov rax, [rbx]", P | US),      # nested accesses are user accesses (§15.25.5)
    ("nx", "call rbx", P | US | ID),
])
def test_nested_2m_page_permissions(tmp_path, what, insn, bits):
    m = Machine(dram=16 << 20, ram=4 << 20, npt_page=MIB2)
    target = 0x300123 if what != "nx" else 0x200000
    p = tmp_path / "g.S"
    p.write_text(f"mov rbx, {target:#x}\n{insn}\n" + hc_exit(0))
    m.load(str(p))
    if what == "nx":
        m.guest.write_phys(0x200000, b"\xc3")
    kw = {"readonly": {"write": False}, "supervisor": {"user": False}, "nx": {"execute": False}}[what]
    m.guest.npt.map(0x200000, m.guest.ram[0x200000], size=MIB2, **kw)
    e = _npf(m)
    assert e.info1 == FINAL | bits
    assert e.info2 == target


def test_nested_2m_reserved_bit_is_rsvd_npf(tmp_path):
    m = Machine(dram=16 << 20, ram=4 << 20, npt_page=MIB2)
    p = tmp_path / "g.S"
    p.write_text("mov rbx, 0x300000\nmov rax, [rbx]\n" + hc_exit(0))
    m.load(str(p))
    slot = m.guest.npt.entry_addr(0x200000)
    m.mem.write_u64(slot, m.mem.read_u64(slot) | (1 << 14))     # inside bits 20:13
    m.guest.vmcb.TLB_CONTROL = TlbControl.FLUSH_ASID
    e = _npf(m)
    assert e.info1 == FINAL | P | RSV | US
    assert e.info2 == 0x300000


def test_nested_fault_on_guest_table_sets_bit_33(tmp_path):
    """A guest page-table page behind a not-present 2 MiB nested leaf: the
    NPF is for the table access (bit 33), a nested write (§15.25.6), with
    EXITINFO2 the GPA of the guest table entry."""
    m = Machine(dram=16 << 20, ram=4 << 20, npt_page=MIB2)
    p = tmp_path / "g.S"
    p.write_text("mov rbx, 0x40000000\nmov rax, [rbx]\n" + hc_exit(0))
    m.load(str(p))
    # a guest PD for GVA 1 GiB placed in the second 2 MiB of guest RAM
    pd = 0x3FF000
    m.guest.write_phys(pd, (0x200000 | P | RW | PTE.PS).to_bytes(8, "little"))
    pdpt_slot = (m.guest.vmcb.CR3 & ~0xFFF)
    pml4e = int.from_bytes(m.guest.read_phys(pdpt_slot, 8), "little")
    pdpt = pml4e & 0x000F_FFFF_FFFF_F000
    m.guest.write_phys(pdpt + 8, (pd | P | RW).to_bytes(8, "little"))
    m.guest.npt.protect(0x200000, present=False)
    e = _npf(m)
    assert e.info1 == GPT | US | RW
    assert e.info2 == pd


# ============================================================ A/D in the nested tables
AD_GUEST = """
    mov rax, [0x150000]          # R: read only
    mov rax, [0x151000]          # W1: read first (a read translation is cached) ...
    mov qword ptr [0x151000], 1  # ... then written
    mov qword ptr [0x152000], 2  # W2
    hlt
    mov qword ptr [0x152000], 3  # second phase: W2 only
    hlt
"""


def test_nested_dirty_bits_tell_the_hypervisor_what_was_written(guest):
    m = guest(AD_GUEST)
    npt = m.guest.npt
    R, W1, W2 = 0x150000, 0x151000, 0x152000
    npt.harvest_dirty()                  # the loader's writes do not count
    r = m.run(timeout=5)
    assert r.reason == "halt"
    dirty = set(npt.dirty_pages())
    assert {W1, W2} <= dirty and R not in dirty
    assert R in npt.accessed_pages()
    # the guest's own PTEs agree (hardware A/D at both levels)
    pte = lambda va: int.from_bytes(m.guest.read_phys(leaf_pte(m, va), 8), "little")
    assert pte(W1) & PTE.D and not pte(R) & PTE.D and pte(R) & PTE.A
    # dirty logging: clear, run the second phase, harvest again
    assert {W1, W2} <= set(npt.harvest_dirty())
    r = m.run(timeout=5)
    assert r.reason == "halt"
    again = set(npt.harvest_dirty())
    assert W2 in again and W1 not in again and R not in again


# ============================================================ the ASID-tagged TLB
TOUCH = "start:" + TOUCH_16 + """    hlt
{extra}
    jmp start
"""


def _two_guests(tmp_path, extra: str = "", mode: TlbMode = TlbMode.TAGGED, extra_b: str | None = None):
    """Guests A (ASID 1) and B (ASID 2) running TOUCH; B's ``extra`` is
    ``extra_b`` when given."""
    m = Machine(dram=16 << 20, ram=2 << 20, tlb_mode=mode)
    a = m.guest
    b = m.add_guest(asid=2)
    for g, x in ((a, extra), (b, extra if extra_b is None else extra_b)):
        p = tmp_path / f"t{g.vmcb.GUEST_ASID}.S"
        p.write_text(TOUCH.format(extra=x))
        m.use(g)
        m.load(str(p))
    return m, a, b


def _run(m, g) -> dict:
    m.use(g)
    r = m.run(timeout=5)
    assert r.reason == "halt", r.detail
    return r.tlb


def test_world_switches_keep_each_asids_translations(tmp_path):
    m, a, b = _two_guests(tmp_path)
    first = _run(m, a)
    assert first["misses"] >= 17
    _run(m, b)
    again = _run(m, a)                # A's 17 pages are still tagged with its ASID
    assert again["misses"] == 0 and again["hits"] >= 17


def test_flush_on_every_world_switch_mode(tmp_path):
    m, a, b = _two_guests(tmp_path, mode=TlbMode.FLUSH_ON_SWITCH)
    _run(m, a)
    _run(m, b)
    again = _run(m, a)
    assert again["misses"] == 17      # code page + 16 data pages, all walked again


@pytest.mark.parametrize("ctl,a_misses,b_misses", [
    (TlbControl.DO_NOTHING, 0, 0),
    (TlbControl.FLUSH_ASID, 17, 0),   # only this guest's ASID
    (TlbControl.FLUSH_ALL, 17, 17),   # every ASID
])
def test_tlb_control(tmp_path, ctl, a_misses, b_misses):
    m, a, b = _two_guests(tmp_path)
    _run(m, a)
    _run(m, b)
    a.vmcb.TLB_CONTROL = ctl
    assert _run(m, a)["misses"] == a_misses
    assert _run(m, b)["misses"] == b_misses


def _make_code_global(m, g) -> None:
    """G on the code page's guest PTE, and CR4.PGE (APM §5.5.2)."""
    m.use(g)
    a = leaf_pte(m, BASE)
    e = int.from_bytes(g.read_phys(a, 8), "little") | PTE.G
    g.write_phys(a, e.to_bytes(8, "little"))
    g.vmcb.CR4 = g.vmcb.CR4 | (1 << 7)


def test_tlb_control_non_global_keeps_global_entries(tmp_path):
    m, a, b = _two_guests(tmp_path)
    _make_code_global(m, a)
    _run(m, a)
    a.vmcb.TLB_CONTROL = TlbControl.FLUSH_ASID_LOCAL
    assert _run(m, a)["misses"] == 16          # the global code page survived
    a.vmcb.TLB_CONTROL = TlbControl.FLUSH_ASID
    assert _run(m, a)["misses"] == 17          # a full ASID flush drops it too


def test_guest_mov_cr3_flushes_non_global(tmp_path):
    m, a, b = _two_guests(tmp_path, extra="mov rax, cr3\nmov cr3, rax")
    _make_code_global(m, a)
    _run(m, a)
    assert _run(m, a)["misses"] == 16


def test_guest_invlpg_drops_one_page(tmp_path):
    m, a, b = _two_guests(tmp_path, extra="mov rdx, 0x155000\ninvlpg [rdx]")
    _run(m, a)
    assert _run(m, a)["misses"] == 1


def test_invlpga_drops_one_page_of_another_asid(tmp_path):
    """INVLPGA rAX=page, ECX=ASID (APM §15.16.3), run unintercepted by guest A
    against guest B's ASID: B walks that one page again, A none."""
    m, a, b = _two_guests(tmp_path, extra="mov eax, 0x157000\nmov ecx, 2\n.byte 0x0f,0x01,0xdf", extra_b="")
    a.vmcb.set_intercept(0x7A, False)           # INVLPGA
    _run(m, a)
    _run(m, b)
    assert _run(m, a)["misses"] == 0            # A ran INVLPGA for ASID 2
    assert _run(m, b)["misses"] == 1


def test_add_guest_rejects_a_reused_asid():
    m = new_machine()
    with pytest.raises(ValueError, match="ASID 1"):
        m.add_guest(asid=1)


# ============================================================ malformed tables
def test_self_referencing_nested_table_resolves_to_itself(guest):
    """A nested PML4 entry pointing at the PML4 (a recursive mapping) is legal:
    the walk is always four levels, so GPA 0xFFFF_FFFF_F000 resolves to the
    PML4 page itself (APM §5.3.3) -- no loop, no crash."""
    m = guest("mov rbx, 0x40000000\nmov rsi, [rbx]\n" + hc_exit(0))
    npt = m.guest.npt
    root = npt.n_cr3
    m.mem.write_u64(root + 511 * 8, root | P | RW | US)
    _map_guest_large(m, 0x4000_0000, 0xFFFF_FFE0_0000, MIB2)     # guest GPA in the recursive slot
    r = m.run(timeout=5)
    assert r.reason == "guest-exit", r.detail
    # GPA 0xFFFF_FFE0_0000 walks indices 511, 511, 511, 0: the leaf is root[0],
    # so the data page is the nested PDPT and the guest reads its entry 0
    pdpt = m.mem.read_u64(root) & 0x000F_FFFF_FFFF_F000
    assert r.regs["rsi"] == m.mem.read_u64(pdpt)


@pytest.mark.parametrize("where", ["leaf", "table"])
def test_nested_entry_outside_host_memory_is_rsvd_npf(guest, where):
    """Host memory beyond DRAM reads as all ones (a master abort), which has
    reserved bits set: the model raises VMEXIT_NPF with P and RSV, never
    touching memory outside DRAM."""
    target = DATA if where == "leaf" else 0x4000_0000
    m = guest(f"mov rbx, {target:#x}\nmov rax, [rbx]\n" + hc_exit(0))
    outside = m.mem.size + 0x10_0000
    if where == "leaf":
        m.guest.npt.map(DATA, outside)
    else:
        # guest 2 MiB page GVA = GPA 1 GiB; the nested PDPT entry for it points outside DRAM
        _map_guest_large(m, 0x4000_0000, 0x4000_0000, MIB2)
        root = m.guest.npt.n_cr3
        pdpt = m.mem.read_u64(root) & 0x000F_FFFF_FFFF_F000
        m.mem.write_u64(pdpt + 8, outside | P | RW | US)
    e = _npf(m)
    assert e.info1 & (FINAL | GPT | P | RSV) == FINAL | P | RSV
    assert e.info2 == target


def test_guest_recursive_and_aliased_tables(guest):
    """Guest tables that loop (PML4[511] -> PML4) and map one page 512 times
    behave as the APM's walk says: the recursive address reads the PML4 and
    every alias reaches the same page."""
    m = guest("""
    mov rbx, 0xFFFFFFFFFFFFF000
    mov rsi, [rbx]                  # PML4 entry 0, through the recursive slot
    mov rcx, 0x40000000
    mov qword ptr [rcx + 0x5000], 0x99
    mov rdx, [rcx + 0x1ff000]       # alias 511 of the same page
""" + hc_exit(0))
    cr3 = m.guest.vmcb.CR3 & ~0xFFF
    m.guest.write_phys(cr3 + 511 * 8, (cr3 | P | RW).to_bytes(8, "little"))
    # a PD for GVA 1 GiB whose single PT maps all 512 slots to DATA
    pd, pt = 0x7E000, 0x7D000
    m.guest.write_phys(pd, (pt | P | RW).to_bytes(8, "little") + bytes(4088))
    m.guest.write_phys(pt, b"".join((DATA | P | RW).to_bytes(8, "little") for _ in range(512)))
    pdpt = int.from_bytes(m.guest.read_phys(cr3, 8), "little") & 0x000F_FFFF_FFFF_F000
    m.guest.write_phys(pdpt + 8, (pd | P | RW).to_bytes(8, "little"))
    r = m.run(timeout=5)
    assert r.reason == "guest-exit", r.detail
    assert r.regs["rsi"] == int.from_bytes(m.guest.read_phys(cr3, 8), "little")
    assert r.regs["rdx"] == 0x99
