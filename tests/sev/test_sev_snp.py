"""SEV-SNP: the reverse-map table stops the remap, move and replay attacks.

Bit positions of RMP entries are Linux's ``struct rmpentry_raw`` (assigned 0,
pagesize 1, immutable 2, gpa 50:12, asid 60:51, vmsa 61, validated 62);
NPF EXITINFO1 bits from APM §15.36.10 (bit 31 RMP, 32 final, 34 ENC);
#VC error code 0x404 = PAGE_NOT_VALIDATED.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.svm.exitcodes import ExitCode
from sandbox.hypervisor.handlers import RESUME, handle_vmmcall
from sandbox.hypervisor.sev_launch import launch_snp
from sandbox.sev.rmp import RmpEntry, RmpError, RmpViolation

from conftest import hc_exit
from test_sev import HV_TURN, PAGE_A, PAGE_B, READ_AB, SECRET_A, SECRET_B, write_ab

ROOT = Path(__file__).resolve().parents[2]
PVALIDATE = ".byte 0xf2,0x0f,0x01,0xff"
PAGE_C = 0x1C2000


def snp_staged(guest, body, actions):
    m = guest(body + hc_exit(0))
    rep = launch_snp(m)
    it = iter(actions)
    seen: list[dict[str, int]] = []
    stops: list[tuple[int, int, int]] = []

    def hv(m, e):
        if m.regs.rax == 2:
            seen.append({"r8": m.regs.r8, "r9": m.regs.r9, "r10": m.regs.r10, "rflags": m.regs.rflags})
            next(it)(m)
            m.advance(e)
            return RESUME
        return handle_vmmcall(m, e)
    m.on(ExitCode.VMMCALL)(hv)
    m.guest.vmcb.set_intercept(0x40 + 29)             # observe #VC (exit 0x5D)

    def vc(m, e):
        stops.append((e.exitcode, e.exitinfo1, e.exitinfo2))
        return m.stop("vc")
    m.on(0x40 + 29)(vc)
    return m, rep, seen, stops


def test_rmp_entry_layout():
    raw = (1 << 0) | (0x1C0 << 12) | (5 << 51) | (1 << 62)
    e = RmpEntry.decode(raw)
    assert (e.assigned, e.gpa, e.asid, e.validated, e.immutable, e.vmsa) == (True, 0x1C0000, 5, True, False, False)
    assert e.encode() == raw


def test_launch_assigns_and_validates_every_guest_page(guest):
    m = guest(hc_exit(0))
    rep = launch_snp(m)
    for gpa, hpa in m.guest.ram.items():
        e = m.sev.rmp.entry(hpa)
        assert e.assigned and e.asid == rep.asid and e.gpa == gpa and e.validated
    assert not m.sev.rmp.entry(m.guest.vmcb_hpa).assigned          # hypervisor pages stay the hypervisor's
    rmp_page = m.sev.rmp.entry(m.sev.rmp.base)
    assert rmp_page.assigned and rmp_page.immutable and rmp_page.asid == 0
    with pytest.raises(RmpError, match="FAIL_PERMISSION"):
        m.sev.rmp.rmpupdate(m.sev.rmp.base, assigned=False)
    with pytest.raises(RmpViolation):
        m.mem.write(m.sev.rmp.base + 0x4000, b"\0" * 16)            # nor can it edit the RMP itself
    assert m.run().ok


def test_hypervisor_cannot_write_guest_pages(guest):
    refused = []

    def attack(m):
        with pytest.raises(RmpViolation) as e:
            m.guest.write_phys(PAGE_A, b"HV-WROTE")
        refused.append(str(e.value))
    m, _, seen, _ = snp_staged(guest, write_ab() + HV_TURN + READ_AB + HV_TURN, [attack, lambda m: None])
    assert m.run().ok
    assert "RMP violation" in refused[0]
    assert seen[1]["r8"] == SECRET_A and seen[1]["r9"] == SECRET_B


@pytest.mark.parametrize("attack", ["swap", "move"])
def test_remap_and_move_fault_with_rmp_npf(guest, attack):
    def act(m):
        ha, hb = m.guest.ram[PAGE_A], m.guest.ram[PAGE_B]
        if attack == "swap":
            m.guest.npt.map(PAGE_A, hb)
            m.guest.npt.map(PAGE_B, ha)
        else:
            dst = m.mem.alloc_page()
            m.mem.write(dst, m.mem.read(ha, 4096))
            m.guest.npt.map(PAGE_A, dst)
    m, _, seen, _ = snp_staged(guest, write_ab() + HV_TURN + READ_AB + HV_TURN, [act])
    npf = []
    m.on(ExitCode.NPF)(lambda m, e: (npf.append((e.exitinfo1, e.exitinfo2)), m.stop("npf"))[1])
    r = m.run()
    assert r.reason == "npf" and len(seen) == 1          # the guest never read the swapped data
    info1, gpa = npf[0]
    assert info1 & (1 << 31) and info1 & (1 << 32) and info1 & (1 << 34)
    assert gpa == PAGE_A


def test_replay_through_rmpupdate_is_caught_as_unvalidated(guest):
    saved = {}

    def record(m):
        saved["c"] = m.mem.read(m.guest.ram[PAGE_A], 4096)

    def replay(m):
        hpa = m.guest.ram[PAGE_A]
        m.sev.rmp.rmpupdate(hpa, assigned=False)
        m.mem.write(hpa, saved["c"])
        m.sev.rmp.rmpupdate(hpa, assigned=True, asid=m.sev.memctl.asid, gpa=PAGE_A)
    body = write_ab(1) + HV_TURN + write_ab(2) + HV_TURN + READ_AB + HV_TURN
    m, _, seen, stops = snp_staged(guest, body, [record, replay])
    r = m.run()
    assert r.reason == "vc" and len(seen) == 2
    assert stops == [(0x5D, 0x404, 0)]


def test_pvalidate_makes_a_new_page_usable(guest):
    body = f"""
    {HV_TURN}
    mov rax, {PAGE_C:#x}
    xor ecx, ecx
    mov edx, 1
    {PVALIDATE}
    mov r8, rax
    pushfq
    pop r10
    mov rax, {PAGE_C:#x}
    mov rbx, {SECRET_A:#x}
    mov [rax], rbx
    mov r9, [rax]
    {HV_TURN}
    mov rax, {PAGE_C:#x}
    xor ecx, ecx
    mov edx, 1
    {PVALIDATE}
    mov r8, rax
    pushfq
    pop r10
    mov rax, {PAGE_C:#x}
    mov ecx, 1
    mov edx, 1
    {PVALIDATE}
    mov r9, rax
    {HV_TURN}
    """

    def give(m):
        dst = m.mem.alloc_page()
        m.sev.rmp.rmpupdate(dst, assigned=True, asid=m.sev.memctl.asid, gpa=PAGE_C)
        m.guest.npt.map(PAGE_C, dst)
        assert not m.sev.rmp.entry(dst).validated
    m, _, seen, stops = snp_staged(guest, body, [give, lambda m: None, lambda m: None])
    r = m.run()
    assert r.ok, (r.reason, r.detail, stops)
    assert seen[1]["r8"] == 0 and not seen[1]["r10"] & 1 and seen[1]["r9"] == SECRET_A   # validated: CF = 0
    assert seen[2]["r8"] == 0 and seen[2]["r10"] & 1          # already validated: CF = 1
    assert seen[2]["r9"] == 6                                  # ECX = 1 (2 MiB) on a 4 KiB page: FAIL_SIZEMISMATCH


def test_unvalidated_page_raises_vc(guest):
    body = f"{HV_TURN}mov rax, {PAGE_C:#x}\nmov r8, [rax]\n{HV_TURN}"

    def give(m):
        dst = m.mem.alloc_page()
        m.sev.rmp.rmpupdate(dst, assigned=True, asid=m.sev.memctl.asid, gpa=PAGE_C)
        m.guest.npt.map(PAGE_C, dst)
    m, _, seen, stops = snp_staged(guest, body, [give])
    assert m.run().reason == "vc"
    assert stops == [(0x5D, 0x404, 0)]


def test_cli_snp_dump(tmp_path, capsys):
    from sandbox.cli import main
    dump = tmp_path / "d.bin"
    code = main(["run", str(ROOT / "guest_images" / "sev_secrets.S"), "--snp", "--ram", "4", "--dram", "16",
                 "--dump-host-memory", str(dump)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "shared page: SHARED-BOUNCE-1b2e" in out.out and "private page: FORTRESS-PRIVATE-7f3a9c5e" in out.out
    data = dump.read_bytes()
    assert b"SHARED-BOUNCE-1b2e" in data and b"FORTRESS-PRIVATE" not in data
