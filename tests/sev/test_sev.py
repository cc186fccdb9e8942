"""SEV: encrypted guest memory and what a hypervisor can and cannot do to it.

Expected values come from the guest's own view (what it wrote, what it reads
back), from scanning the raw DRAM buffer, and from an independent XEX/XTS
computation written here over plain AES-ECB (XEX with each 16-byte block's
HPA as the tweak, the construction documented in sandbox/sev/memctl.py).
"""
from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sandbox.svm.exitcodes import ExitCode
from sandbox.hypervisor.handlers import RESUME, handle_vmmcall
from sandbox.sev.firmware import C_BIT, GuestOwner, GuestState, Policy, SecureProcessor, SevError, cpuid_8000_001f
from sandbox.hypervisor.sev_launch import launch_sev

from conftest import VMMCALL, hc_exit

PAGE_A, PAGE_B = 0x1C0000, 0x1C1000
SECRET_A = 0x5345_4352_4554_4141       # "AATERCES"
SECRET_B = 0x5345_4352_4554_4242
OLD, NEW = 0x0123_4567_89AB_CDEF, 0x7EDC_BA98_7654_3210
HV_TURN = f"mov eax, 2\n{VMMCALL}\n"    # hypercall 2: the hypervisor acts, then the guest resumes


def le(v: int) -> bytes:
    return v.to_bytes(8, "little")


def staged(guest, body: str, actions, ram: int = 2 << 20):
    """An SEV guest running ``body``; at each HV_TURN the next action runs as the hypervisor.
    Returns (machine, launch report, list of guest R8/R9 seen at each turn)."""
    m = guest(body + hc_exit(0), ram=ram)
    rep = launch_sev(m)
    it = iter(actions)
    seen: list[dict[str, int]] = []

    def hv(m, e):
        if m.regs.rax == 2:
            seen.append({"r8": m.regs.r8, "r9": m.regs.r9})
            next(it)(m)
            m.advance(e)
            return RESUME
        return handle_vmmcall(m, e)
    m.on(ExitCode.VMMCALL)(hv)
    return m, rep, seen


def write_ab(a: int = SECRET_A, b: int = SECRET_B) -> str:
    return f"mov rax, {PAGE_A:#x}\nmov rbx, {a:#x}\nmov [rax], rbx\nmov rax, {PAGE_B:#x}\nmov rbx, {b:#x}\nmov [rax], rbx\n"


READ_AB = f"mov rax, {PAGE_A:#x}\nmov r8, [rax]\nmov rax, {PAGE_B:#x}\nmov r9, [rax]\n"


def xex_reference(key: bytes, hpa: int, plaintext: bytes) -> bytes:
    """XEX-AES-128 with a per-block address tweak, block by block from AES-ECB:
    T(a) = AES_K2(le128(a)), C = AES_K1(P ^ T(a)) ^ T(a) for the block at HPA a."""
    k1 = Cipher(algorithms.AES(key[:16]), modes.ECB()).encryptor()
    k2 = Cipher(algorithms.AES(key[16:]), modes.ECB()).encryptor()
    out = b""
    for j in range(0, len(plaintext), 16):
        t = int.from_bytes(k2.update((hpa + j).to_bytes(16, "little")), "little")
        p = int.from_bytes(plaintext[j:j + 16], "little")
        out += (int.from_bytes(k1.update((p ^ t).to_bytes(16, "little")), "little") ^ t).to_bytes(16, "little")
    return out


# ------------------------------------------------------------------ capability
def test_cpuid_8000_001f_layout():
    eax, ebx, ecx, edx = cpuid_8000_001f()
    assert eax & (1 << 1) and eax & (1 << 3) and eax & (1 << 4)        # SEV, SEV-ES, SNP (APM §15.34.1)
    assert ebx & 0x3F == 47 == C_BIT                                    # C-bit position
    assert (ebx >> 6) & 0x3F == 5                                       # 48 -> 43 physical bits
    assert 0 < edx <= ecx


def test_guest_sees_cpuid_8000_001f(guest):
    src = f"mov eax, 0x8000001f\nxor ecx, ecx\ncpuid\nmov r8, rbx\nmov r9, rax\n{HV_TURN}"
    m, _, seen = staged(guest, src, [lambda m: None])
    assert m.run().ok
    assert seen[0]["r8"] & 0x3F == 47 and seen[0]["r9"] & 0x1A == 0x1A


# ------------------------------------------------------------ the memory controller
def test_dram_holds_only_ciphertext_after_every_exit(guest):
    body = write_ab() + "mov ecx, 5\nspin:\npush rcx\nmov eax, 0\ncpuid\npop rcx\ndec ecx\njnz spin\n" + READ_AB + HV_TURN
    m, rep, seen = staged(guest, body, [lambda m: None])
    leaks = []
    m.on_exit_record = lambda rec: leaks.append(le(SECRET_A) in m.mem.dump() or le(SECRET_B) in m.mem.dump())
    assert m.run().ok
    assert seen == [{"r8": SECRET_A, "r9": SECRET_B}]      # the guest reads its plaintext
    assert len(leaks) >= 7 and not any(leaks)
    assert le(SECRET_A) not in m.mem.dump()


def test_ciphertext_is_xex_of_the_plaintext_under_the_asid_key(guest):
    m, rep, seen = staged(guest, write_ab() + HV_TURN, [lambda m: None])
    assert m.run().ok
    hpa = m.guest.ram[PAGE_A]
    expect = bytearray(4096)
    expect[:8] = le(SECRET_A)
    key = m.sev.sp._testing_key(rep.asid)
    assert m.mem.read(hpa, 4096) == xex_reference(key, hpa, bytes(expect))


def test_same_plaintext_at_two_addresses_gives_different_ciphertext(guest):
    m, rep, _ = staged(guest, write_ab(SECRET_A, SECRET_A) + HV_TURN, [lambda m: None])
    assert m.run().ok
    ca = m.mem.read(m.guest.ram[PAGE_A], 4096)
    cb = m.mem.read(m.guest.ram[PAGE_B], 4096)
    assert ca[:16] != cb[:16] and ca != cb
    # and within one page, equal blocks (all zero here) encrypt differently too
    assert ca[16:32] != ca[32:48]


def test_launch_encrypts_the_image(guest):
    m = guest("mov eax, 0x12345678\n" + hc_exit(0))
    code = m.guest.read_phys(0x100000, 16)
    launch_sev(m)
    assert m.guest.read_phys(0x100000, 16) != code
    assert code not in m.mem.dump()
    r = m.run()
    assert r.ok and r.regs["rax"] == 0              # the guest still runs its code: EXIT sets RAX = 0


# ------------------------------------------------------- what the hypervisor can do
def test_hypervisor_reads_ciphertext_of_private_and_plaintext_of_shared(guest):
    snap = {}
    body = write_ab() + f"mov rdi, {PAGE_B:#x}\n" + MAKE_SHARED + f"mov rax, {PAGE_B:#x}\nmov rbx, {SECRET_B:#x}\nmov [rax], rbx\n" + HV_TURN

    def look(m):
        snap["a"] = m.guest.read_phys(PAGE_A, 8)
        snap["b"] = m.guest.read_phys(PAGE_B, 8)
    m, _, _ = staged(guest, body, [look])
    assert m.run().ok
    assert snap["a"] != le(SECRET_A)
    assert snap["b"] == le(SECRET_B)


MAKE_SHARED = """
mov rax, cr3
mov rdx, 0x00007ffffffff000
and rax, rdx
mov rcx, rdi
shr rcx, 39
and ecx, 0x1ff
mov rax, [rax + rcx*8]
and rax, rdx
mov rcx, rdi
shr rcx, 30
and ecx, 0x1ff
mov rax, [rax + rcx*8]
and rax, rdx
mov rcx, rdi
shr rcx, 21
and ecx, 0x1ff
mov rax, [rax + rcx*8]
and rax, rdx
mov rcx, rdi
shr rcx, 12
and ecx, 0x1ff
lea rax, [rax + rcx*8]
mov rcx, 1
shl rcx, 47
not rcx
and [rax], rcx
invlpg [rdi]
"""


def test_hypervisor_write_into_private_page_gives_guest_garbage(guest):
    garbage = b"HV-WROTE"

    def attack(m):
        m.guest.write_phys(PAGE_A, garbage)
    m, _, seen = staged(guest, write_ab() + HV_TURN + READ_AB + HV_TURN, [attack, lambda m: None])
    assert m.run().ok
    got = seen[1]["r8"]
    assert got != SECRET_A and le(got) != garbage
    assert seen[1]["r9"] == SECRET_B                 # the page it did not touch is intact


def test_moving_ciphertext_to_another_page_corrupts_it(guest):
    def move(m):
        src = m.guest.ram[PAGE_A]
        dst = m.mem.alloc_page()
        m.mem.write(dst, m.mem.read(src, 4096))    # a raw copy of the ciphertext
        m.guest.npt.map(PAGE_A, dst)
    m, _, seen = staged(guest, write_ab() + HV_TURN + READ_AB + HV_TURN, [move, lambda m: None])
    assert m.run().ok
    assert seen[1]["r8"] != SECRET_A and seen[1]["r9"] == SECRET_B


def test_firmware_page_move_keeps_the_data(guest):
    def move(m):
        src = m.guest.ram[PAGE_A]
        dst = m.mem.alloc_page()
        m.sev.sp.page_move(m.sev.handle, src, dst)
        m.guest.npt.map(PAGE_A, dst)
        m.guest.ram[PAGE_A] = dst
    m, _, seen = staged(guest, write_ab() + HV_TURN + READ_AB + HV_TURN, [move, lambda m: None])
    assert m.run().ok
    assert seen[1] == {"r8": SECRET_A, "r9": SECRET_B}


def test_remapping_two_private_pages_swaps_them(guest):
    def swap(m):
        ha, hb = m.guest.ram[PAGE_A], m.guest.ram[PAGE_B]
        m.guest.npt.map(PAGE_A, hb)
        m.guest.npt.map(PAGE_B, ha)
    m, _, seen = staged(guest, write_ab() + HV_TURN + READ_AB + HV_TURN, [swap, lambda m: None])
    assert m.run().ok
    assert seen[1] == {"r8": SECRET_B, "r9": SECRET_A}     # SEV has no integrity: a silent swap


def test_replaying_old_ciphertext_restores_old_data(guest):
    saved = {}

    def record(m):
        saved["c"] = m.mem.read(m.guest.ram[PAGE_A], 4096)

    def replay(m):
        m.mem.write(m.guest.ram[PAGE_A], saved["c"])
    body = write_ab(OLD) + HV_TURN + write_ab(NEW) + HV_TURN + READ_AB + HV_TURN
    m, _, seen = staged(guest, body, [record, replay, lambda m: None])
    assert m.run().ok
    assert seen[2]["r8"] == OLD


# ------------------------------------------------------------------ launch flow
def _sp(guest):
    m = guest(hc_exit(0))
    return m, SecureProcessor(m.mem)


def test_measurement_verifies_and_detects_a_one_byte_tamper(guest):
    src = "mov eax, 1\n" + hc_exit(0)
    # the guest owner's expectation: the same image built independently, C-bits set, never launched
    from sandbox.hypervisor.sev_launch import set_cbit_in_page_tables
    ref = guest(src)
    set_cbit_in_page_tables(ref)
    expected = [ref.guest.read_phys(gpa, 4096) for gpa in sorted(ref.guest.ram)]
    assert launch_sev(guest(src), expected=expected).verified

    def flip(m):                      # the hypervisor flips one bit of the code before LAUNCH_START
        b = m.guest.read_phys(0x100001, 1)[0]
        m.guest.write_phys(0x100001, bytes([b ^ 1]))
    assert not launch_sev(guest(src), expected=expected, tamper=flip).verified


def test_measurement_is_hmac_over_the_sev_api_message(guest):
    import hashlib
    import hmac
    m, sp = _sp(guest)
    owner = GuestOwner(sp.pdh_public())
    h = sp.launch_start(5, Policy.NODBG, owner.session())
    page = m.guest.ram[0x100000]
    plain = m.mem.read(page, 4096)
    sp.launch_update_data(h, page, 4096)
    meas = sp.launch_measure(h)
    tik = owner._tik
    msg = bytes([4, 1, 55, 21]) + struct.pack("<I", int(Policy.NODBG)) + hashlib.sha256(plain).digest() + meas.mnonce
    assert hmac.new(tik, msg, hashlib.sha256).digest() == meas.measure
    # another owner (or the hypervisor) holding a different TIK cannot forge it
    other = GuestOwner(sp.pdh_public())
    assert not other.verify(meas, int(Policy.NODBG), [plain])


def test_launch_commands_out_of_order(guest):
    m, sp = _sp(guest)
    owner = GuestOwner(sp.pdh_public())
    h = sp.launch_start(5, Policy.NODBG, owner.session())
    with pytest.raises(SevError) as e:
        sp.launch_finish(h)                           # FINISH before MEASURE
    assert e.value.status == "INVALID_GUEST_STATE"
    sp.launch_measure(h)
    with pytest.raises(SevError) as e:
        sp.launch_update_data(h, m.guest.ram[0], 4096)    # UPDATE after MEASURE
    assert e.value.status == "INVALID_GUEST_STATE"
    sp.launch_finish(h)
    assert sp.state(h) is GuestState.RUNNING
    with pytest.raises(SevError) as e:
        sp.launch_measure(h)
    assert e.value.status == "INVALID_GUEST_STATE"
    with pytest.raises(SevError) as e:
        sp.launch_update_data(999, m.guest.ram[0], 4096)
    assert e.value.status == "INVALID_GUEST"


def test_reused_and_invalid_asids(guest):
    m, sp = _sp(guest)
    s = GuestOwner(sp.pdh_public()).session()
    sp.launch_start(6, Policy.NODBG, s)
    with pytest.raises(SevError) as e:
        sp.launch_start(6, Policy.NODBG, s)
    assert e.value.status == "ASID_OWNED"
    for asid, pol in ((0, Policy.NODBG), (16, Policy.NODBG), (2, Policy.NODBG), (7, Policy.ES)):
        with pytest.raises(SevError) as e:
            sp.launch_start(asid, pol, s)
        assert e.value.status == "INVALID_ASID"


def test_bad_update_region(guest):
    m, sp = _sp(guest)
    h = sp.launch_start(5, Policy.NODBG, GuestOwner(sp.pdh_public()).session())
    for hpa, n in ((0x1001, 4096), (0, 100), (m.mem.size, 4096)):
        with pytest.raises(SevError) as e:
            sp.launch_update_data(h, hpa, n)
        assert e.value.status == "INVALID_ADDRESS"


def test_vmrun_with_sev_but_no_launched_guest_is_invalid(guest):
    m = guest(hc_exit(0))
    launch_sev(m)
    m.sev.sp.decommission(m.sev.handle)
    r = m.run()
    assert r.reason == "invalid-vmcb" and "no launched SEV guest" in r.detail
    assert not r.ok


def test_no_api_returns_the_key(guest):
    m = guest(hc_exit(0))
    rep = launch_sev(m)
    key = m.sev.sp._testing_key(rep.asid)
    for obj in (m.sev.sp, m.sev.memctl):
        for name in dir(obj):
            if name.startswith("_"):
                continue
            attr = getattr(obj, name)
            if callable(attr):
                continue
            assert key[:16] not in repr(attr).encode("latin-1", "replace")


# ------------------------------------------------------------------ MMIO
MMIO_GPA = 0x1C5000


def test_cbit_on_a_page_the_hypervisor_marked_mmio(guest):
    m = guest(f"mov rax, {MMIO_GPA:#x}\nmov rbx, [rax]\n" + hc_exit(0))
    launch_sev(m)
    m.guest.npt.unmap(MMIO_GPA)                 # the hypervisor emulates this GPA as MMIO
    r = m.run()
    assert r.reason == "npf" and "encrypted (C-bit) access" in r.detail and f"{MMIO_GPA:#x}" in r.detail
    assert not r.ok


def test_shared_access_to_mmio_is_an_ordinary_npf(guest):
    m = guest(f"mov rdi, {MMIO_GPA:#x}\n{MAKE_SHARED}\nmov rax, {MMIO_GPA:#x}\nmov rbx, [rax]\n" + hc_exit(0))
    launch_sev(m)
    m.guest.npt.unmap(MMIO_GPA)
    seen = []
    m.on(ExitCode.NPF)(lambda m, e: (seen.append(e.exitinfo1), m.stop("npf"))[1])
    r = m.run()
    assert r.reason == "npf" and seen and not seen[0] & (1 << 34)      # C=0: no ENC bit


def test_attack_script_runs(capsys, monkeypatch):
    import runpy
    import sys
    from pathlib import Path
    script = str(Path(__file__).resolve().parents[2] / "scripts" / "sev_attacks.py")
    for extra in ([], ["--snp"]):
        monkeypatch.setattr(sys, "argv", ["sev_attacks.py", *extra])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(script, run_name="__main__")
        assert e.value.code == 0
        out = capsys.readouterr().out
        if extra:
            assert out.count("RMP violation") >= 3 and "PAGE_NOT_VALIDATED" in out
        else:
            assert "guest reads A = 0x5345435245544242" in out       # the swap
            assert "guest reads A = 0x0123456789abcdef" in out       # the replay


def test_sev_bit_without_a_secure_processor_is_invalid(guest):
    m = guest(hc_exit(0))
    m.guest.vmcb.NP_CONTROL = m.guest.vmcb.NP_CONTROL | 2        # VMCB 090h bit 1: SEV enable
    r = m.run()
    assert r.reason == "invalid-vmcb" and "secure processor" in r.detail


def test_sev_without_nested_paging_is_invalid(guest):
    m = guest(hc_exit(0))
    launch_sev(m)
    m.guest.vmcb.NP_CONTROL = 2                                  # SEV on, NP_ENABLE off
    r = m.run()
    assert r.reason == "invalid-vmcb" and "nested paging" in r.detail


# ------------------------------------------------------------ the engine alone
from hypothesis import given, settings, strategies as st  # noqa: E402

from sandbox.sev.memctl import XexEngine  # noqa: E402

_KEY = bytes(range(32))
_ENGINE = XexEngine(_KEY)


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=(1 << 32) - 1), st.integers(min_value=1, max_value=(1 << 20) - 1),
       st.integers(min_value=1, max_value=(1 << 20) - 1))
def test_engine_matches_reference_and_round_trips(seed, pfn_a, pfn_b):
    import random
    page = random.Random(seed).randbytes(4096)
    a, b = pfn_a << 12, pfn_b << 12
    c = _ENGINE.encrypt_page(a, page)
    assert c == xex_reference(_KEY, a, page)
    assert _ENGINE.decrypt_page(a, c) == page
    batch = _ENGINE.encrypt_pages([(a, page), (b, page)])
    assert batch[:4096] == c
    if a != b:
        assert batch[4096:] != c                         # the same page at another address
        assert _ENGINE.decrypt_page(b, c) != page        # a moved ciphertext does not decrypt


def test_guest_asid_selects_the_key(guest):
    """VMCB GUEST_ASID picks the key: pointing it at another launched guest's ASID
    makes the processor decrypt this guest's code with the wrong key."""
    m = guest(f"mov rax, {PAGE_A:#x}\nmov rbx, {SECRET_A:#x}\nmov [rax], rbx\n" + hc_exit(0))
    rep = launch_sev(m)
    other = GuestOwner(m.sev.sp.pdh_public())
    h = m.sev.sp.launch_start(rep.asid + 1, Policy.NODBG, other.session())
    m.sev.sp.launch_measure(h)
    m.sev.sp.launch_finish(h)
    m.guest.vmcb.GUEST_ASID = rep.asid + 1
    r = m.run(max_exits=50)
    assert r.reason != "guest-exit"                        # garbage code: it never reaches EXIT
    assert le(SECRET_A) not in m.mem.dump()
