#!/usr/bin/env python3
"""What an SEV hypervisor can and cannot do to a guest's private memory.

Each experiment runs a small SEV guest that writes known values into two
private pages (A and B), hands control to the hypervisor (hypercall 2), and
then reads the pages back.  The hypervisor's action happens in between; the
script prints what the hypervisor saw in DRAM and what the guest read.

    python scripts/sev_attacks.py [--snp]

With --snp the guest runs SEV-SNP: the remap and replay attacks then end in a
nested page fault with the RMP bit instead of succeeding silently.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sandbox import RESUME, ExitCode, Machine, handlers                  # noqa: E402
from sandbox.cli.helpfmt import Parser                                    # noqa: E402
from sandbox.hypervisor.sev_launch import launch_sev, launch_snp          # noqa: E402
from sandbox.sev.rmp import VC_PAGE_NOT_VALIDATED                         # noqa: E402
from sandbox.svm.stop import StopReason                                   # noqa: E402

PAGE_A, PAGE_B = 0x1C0000, 0x1C1000
SECRET_A, SECRET_B = 0x5345_4352_4554_4141, 0x5345_4352_4554_4242
OLD, NEW = 0x0123_4567_89AB_CDEF, 0x7EDC_BA98_7654_3210
VMMCALL = ".byte 0x0f,0x01,0xd9"
HV_TURN = f"mov eax, 2\n{VMMCALL}\n"
READ_AB = f"mov rax, {PAGE_A:#x}\nmov r8, [rax]\nmov rax, {PAGE_B:#x}\nmov r9, [rax]\n"
EXIT = f"xor edi, edi\nxor eax, eax\n{VMMCALL}\n"


def write_ab(a: int, b: int) -> str:
    return f"mov rax, {PAGE_A:#x}\nmov rbx, {a:#x}\nmov [rax], rbx\nmov rax, {PAGE_B:#x}\nmov rbx, {b:#x}\nmov [rax], rbx\n"


def run(body: str, actions, snp: bool):
    with tempfile.NamedTemporaryFile("w", suffix=".S", delete=False) as f:
        f.write(body + EXIT)
    m = Machine(dram=8 << 20, ram=2 << 20)
    m.load(f.name)
    os.unlink(f.name)
    if snp:
        launch_snp(m)
    else:
        launch_sev(m)
    it = iter(actions)
    seen = []
    if snp:
        m.guest.vmcb.set_intercept(ExitCode.EXCP_VC)      # watch the guest's #VC
        m.on(ExitCode.EXCP_VC)(lambda m, e: m.stop("vc", f"guest took #VC with error code {e.exitinfo1:#x}" + (
            " (PAGE_NOT_VALIDATED)" if e.exitinfo1 == VC_PAGE_NOT_VALIDATED else "")))

    def hv(m, e):
        if m.regs.rax == 2:
            seen.append((m.regs.r8, m.regs.r9))
            next(it)(m)
            m.advance(e)
            return RESUME
        return handlers.handle_vmmcall(m, e)
    m.on(ExitCode.VMMCALL)(hv)
    r = m.run()
    return m, r, seen


def show(v: int) -> str:
    return f"{v:#018x}" + (f" ({v.to_bytes(8, 'little')!r})" if all(32 <= c < 127 for c in v.to_bytes(8, "little")) else "")


def outcome(r, seen, idx: int) -> str:
    if r.reason != StopReason.GUEST_EXIT or len(seen) <= idx:
        return f"run stopped ({r.reason}): {r.detail}"
    a, b = seen[idx]
    return f"guest reads A = {show(a)}, B = {show(b)}"


def main() -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--snp", action="store_true", help="run the guests as SEV-SNP guests")
    snp = ap.parse_args().snp
    print(f"guest wrote A = {show(SECRET_A)}, B = {show(SECRET_B)}\n")
    noop = lambda m: None           # noqa: E731

    # 1. read
    got = {}

    def read(m):
        got["a"] = m.guest.read_phys(PAGE_A, 16)
    m, r, seen = run(write_ab(SECRET_A, SECRET_B) + HV_TURN, [read], snp)
    print("1. hypervisor reads private page A through host memory:")
    print(f"   it sees {got['a'].hex()}  (plaintext {SECRET_A.to_bytes(8, 'little').hex()} "
          f"{'FOUND' if SECRET_A.to_bytes(8, 'little') in m.mem.dump() else 'nowhere'} in DRAM)\n")

    # 2. write
    refused = []

    def write(m):
        try:
            m.guest.write_phys(PAGE_A, b"HV-WROTE")
        except Exception as e:          # SNP: the RMP refuses the write
            refused.append(str(e))
    m, r, seen = run(write_ab(SECRET_A, SECRET_B) + HV_TURN + READ_AB + HV_TURN, [write, noop], snp)
    print("2. hypervisor writes b'HV-WROTE' into private page A:")
    if refused:
        print(f"   refused: {refused[0]}")
    print(f"   {outcome(r, seen, 1)}\n")

    # 3. move
    def move(m):
        src, dst = m.guest.ram[PAGE_A], m.mem.alloc_page()
        m.mem.write(dst, m.mem.read(src, 4096))
        m.guest.npt.map(PAGE_A, dst)
    m, r, seen = run(write_ab(SECRET_A, SECRET_B) + HV_TURN + READ_AB + HV_TURN, [move, noop], snp)
    print("3. hypervisor copies A's ciphertext to another host page and remaps A there:")
    print(f"   {outcome(r, seen, 1)}\n")

    # 4. remap
    def swap(m):
        ha, hb = m.guest.ram[PAGE_A], m.guest.ram[PAGE_B]
        m.guest.npt.map(PAGE_A, hb)
        m.guest.npt.map(PAGE_B, ha)
    m, r, seen = run(write_ab(SECRET_A, SECRET_B) + HV_TURN + READ_AB + HV_TURN, [swap, noop], snp)
    print("4. hypervisor swaps A and B in the nested page table (no data moved):")
    print(f"   {outcome(r, seen, 1)}\n")

    # 5. replay
    saved = {}

    def record(m):
        saved["c"] = m.mem.read(m.guest.ram[PAGE_A], 4096)

    def replay(m):
        hpa = m.guest.ram[PAGE_A]
        try:
            m.mem.write(hpa, saved["c"])
        except Exception as e:          # SNP: take the page back with RMPUPDATE, write, give it back
            print(f"   (direct write refused: {e};\n    the hypervisor RMPUPDATEs the page to itself, "
                  "writes, and RMPUPDATEs it back to the guest)")
            m.sev.rmp.rmpupdate(hpa, assigned=False)
            m.mem.write(hpa, saved["c"])
            m.sev.rmp.rmpupdate(hpa, assigned=True, asid=m.sev.memctl.asid, gpa=PAGE_A)
            m.sev.memctl.stale = True
    print(f"5. guest writes A = {show(OLD)}, hypervisor records the ciphertext; guest writes A = {show(NEW)};")
    print("   hypervisor writes the recorded ciphertext back:")
    m, r, seen = run(write_ab(OLD, SECRET_B) + HV_TURN + write_ab(NEW, SECRET_B) + HV_TURN + READ_AB + HV_TURN,
                     [record, replay, noop], snp)
    print(f"   {outcome(r, seen, 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
