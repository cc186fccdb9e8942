"""Shadow paging: the same guests run unchanged without nested paging, the
hypervisor keeps the shadow in sync through #PF, MOV CR3 and INVLPG
intercepts, and write-protects the guest's page tables.  Every expectation
is the nested-paging run of the same guest (an independent path through
the processor's own 2-D walk) or the architecture's rule."""
from __future__ import annotations

import pytest

from sandbox import Machine

from conftest import DATA, hc_exit, install_reporting_idt

GUESTS = ["hello.S", "kernel.S", "cguest.elf", "popek_goldberg.S"]


def run_both(load, ram: int = 4 << 20) -> dict[str, tuple]:
    out = {}
    for paging in ("nested", "shadow"):
        m = Machine(dram=max(32 << 20, 4 * ram), ram=ram, paging=paging)
        load(m)
        r = m.run(timeout=10)
        out[paging] = (m, r)
    return out


@pytest.mark.parametrize("image", GUESTS)
def test_bundled_guests_run_unchanged_under_shadow_paging(image):
    res = run_both(lambda m: m.load(f"guest_images/{image}"), ram=16 << 20)
    (_, rn), (ms, rs) = res["nested"], res["shadow"]
    assert rn.reason == rs.reason == "guest-exit", (rn.detail, rs.detail)
    assert rs.exit_code == rn.exit_code == 0
    assert rs.console == rn.console
    # the shadow run pays in exits the nested run does not have: #PF intercepts
    assert rs.counts.get(0x4E, 0) >= 1 and 0x4E not in rn.counts
    assert ms.shadow.stats.shadow_faults >= 1
    # one-dimensional walks of the shadow: 4 references each, no nested ones
    # (a shadow miss stops the walk at the missing level: 1 to 4 references)
    w = rs.walk
    assert w["nested_pte_refs"] == 0
    assert 4 * w["data_refs"] + (w["walks"] - w["data_refs"]) <= w["guest_pte_refs"] <= 4 * w["walks"]
    # completed 2-D walks cost 24 references; a faulting one fewer
    assert 24 * rn.walk["data_refs"] <= rn.walk["table_refs"] <= 24 * rn.walk["walks"]


REMAP = f"""
    mov rbx, {DATA:#x}
    mov qword ptr [rbx], 0xAAAA            # page A = DATA
    mov qword ptr [rbx + 0x1000], 0xBBBB   # page B = DATA + 4 KiB
    mov rax, cr3
    mov r15, rax                           # the guest's own CR3 value
    mov rsi, [rbx]                         # through the original mapping: A
    mov rdi, {{pte:#x}}                     # the guest PTE of DATA (identity tables)
    mov rax, [rdi]
    add rax, 0x1000                        # point DATA at page B
    mov [rdi], rax
    invlpg [rbx]
    mov rdx, [rbx]                         # now B
    sub rax, 0x1000
    mov [rdi], rax                         # and back to A
    mov rax, cr3
    mov cr3, rax                           # a full flush this time
    mov rcx, [rbx]
""" + hc_exit(0)


def test_live_page_table_edits_are_seen(tmp_path):
    from conftest import leaf_pte
    p = tmp_path / "remap.S"
    p.write_text("nop\n")
    probe = Machine(dram=32 << 20, ram=4 << 20)
    probe.load(str(p))
    p.write_text(REMAP.format(pte=leaf_pte(probe, DATA)))    # the loader's tables are the same in both modes

    def load(m):
        m.load(str(p))
    res = run_both(load)
    for paging, (m, r) in res.items():
        assert r.reason == "guest-exit", (paging, r.detail)
        assert (r.regs["rsi"], r.regs["rdx"], r.regs["rcx"]) == (0xAAAA, 0xBBBB, 0xAAAA), paging
        assert r.regs["r15"] == 0x2000                  # MOV from CR3 shows the guest's CR3
    s = res["shadow"][0].shadow.stats
    assert s.pt_write_faults >= 1 and s.cr3_writes == 1 and s.invlpg == 1


def test_guest_page_fault_is_reflected_identically(tmp_path):
    src = "mov rbx, 0x40000000\nmov qword ptr [rbx], 1\n" + hc_exit(0)

    def load(m):
        p = tmp_path / "pf.S"
        p.write_text(src)
        m.load(str(p))
        install_reporting_idt(m)
    res = run_both(load)
    (_, rn), (_, rs) = res["nested"], res["shadow"]
    assert rn.exit_code == rs.exit_code == 0x100 + 14
    for k in ("rsi", "r8", "rdx"):            # error code, CR2, return RIP
        assert rn.regs[k] == rs.regs[k], k
    assert rs.regs["rsi"] == 0x2 and rs.regs["r8"] == 0x40000000     # not present, write, supervisor


def test_shadow_sets_the_guests_accessed_and_dirty_bits(tmp_path):
    from sandbox.memory.paging import PTE
    p = tmp_path / "ad.S"
    p.write_text(f"mov rbx, {DATA:#x}\nmov rax, [rbx + 0x1000]\nmov qword ptr [rbx], 5\n" + hc_exit(0))
    m = Machine(dram=32 << 20, ram=4 << 20, paging="shadow")
    m.load(str(p))
    r = m.run(timeout=5)
    assert r.reason == "guest-exit"
    sh = m.shadow

    def guest_pte(va):
        sh.guest_walk(va, 0, False, set_ad=False)
        return m.mem.read_u64(sh._gpa_to_hpa(sh._seen[-1] + ((va >> 12) & 0x1FF) * 8))
    assert guest_pte(DATA) & PTE.D and guest_pte(DATA) & PTE.A
    assert guest_pte(DATA + 0x1000) & PTE.A and not guest_pte(DATA + 0x1000) & PTE.D


def test_shadow_rejects_large_nested_backing():
    with pytest.raises(ValueError, match="4 KiB"):
        Machine(dram=32 << 20, ram=4 << 20, paging="shadow", npt_page=2 << 20)


def test_unknown_paging_mode():
    with pytest.raises(ValueError, match="paging must be"):
        Machine(paging="magic")


class _Recorder:
    """A device window that logs every access and answers reads with 0x40 + offset."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def mmio_read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return 0x40 + offset

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


MMIO_GPA = 0x1F0000
MMIO_GUEST = f"""
    mov rbx, {MMIO_GPA:#x}
    mov dword ptr [rbx + 0x10], 0x1234
    mov eax, dword ptr [rbx + 0x8]
    mov r12, rax
    mov dword ptr [rbx + 0x10], 0x5678
    movzx ecx, byte ptr [rbx + 0x4]
    mov r13, rcx
""" + hc_exit(0)


def test_device_window_is_emulated_from_the_page_fault(tmp_path):
    """A device window inside the guest's mappings: nested paging exits with
    NPF on each access; shadow paging never shadows the page, so each access
    is a #PF exit that the hypervisor emulates the same way.  Four accesses
    in the guest's code, four exits and the same device traffic both ways."""
    p = tmp_path / "mmio.S"
    p.write_text(MMIO_GUEST)
    devs = {}

    def load(m):
        m.load(str(p))
        devs[m.shadow is not None] = dev = _Recorder()
        m.map_mmio(MMIO_GPA, 0x1000, dev)
    res = run_both(load)
    want = [("w", 0x10, 4, 0x1234), ("r", 0x8, 4), ("w", 0x10, 4, 0x5678), ("r", 0x4, 1)]
    assert devs[False].log == devs[True].log == want
    for paging, (m, r) in res.items():
        assert r.reason == "guest-exit", (paging, r.detail)
        assert (r.regs["r12"], r.regs["r13"]) == (0x48, 0x44), paging
    (_, rn), (ms, rs) = res["nested"], res["shadow"]
    assert rn.counts.get(0x400, 0) == 4 and 0x400 not in rs.counts          # VMEXIT_NPF
    assert ms.shadow.stats.mmio_faults == 4
    assert rs.counts[0x4E] == ms.shadow.stats.shadow_faults + ms.shadow.stats.guest_faults + \
        ms.shadow.stats.pt_write_faults + 4
