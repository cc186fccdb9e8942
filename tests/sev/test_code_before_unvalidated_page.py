"""An intercepted instruction in the last bytes of a page whose next page the
SEV-SNP guest has not validated.

To decide the instruction the processor reads up to 15 bytes from where it
starts; the bytes past the page end sit in a page whose fetch would raise #VC
(PAGE_NOT_VALIDATED, APM §15.36.10).  The instruction ends before that page,
so nothing is fetched from it: the CPUID exits as usual and the guest runs on.
"""
from __future__ import annotations

from sandbox.hypervisor.sev_launch import launch_snp
from sandbox.svm.exitcodes import ExitCode

from conftest import BASE, assemble, hc_exit

CPUID_AT = BASE + 0xFFA          # CPUID (2 bytes) and a short JMP (2 bytes) end 2 bytes before the page end
BACK = BASE + 0xF80


def test_cpuid_before_an_unvalidated_page(guest):
    m = guest(f"mov eax, {CPUID_AT:#x}\njmp rax\n")
    m.guest.write_phys(BACK, assemble(hc_exit(0), BACK))
    jmp_back = (BACK - (CPUID_AT + 4)) & 0xFF
    m.guest.write_phys(CPUID_AT, bytes([0x0F, 0xA2, 0xEB, jmp_back]))
    rep = launch_snp(m)
    nxt = BASE + 0x1000
    dst = m.mem.alloc_page()
    m.sev.rmp.rmpupdate(dst, assigned=True, asid=rep.asid, gpa=nxt)
    m.guest.npt.map(nxt, dst)
    assert not m.sev.rmp.entry(dst).validated
    seen = []

    @m.on(ExitCode.CPUID)
    def cpuid(m, e):
        seen.append(e.rip)
        m.advance(e)
    r = m.run(timeout=5)
    assert r.ok, (r.reason, r.detail)
    assert seen == [CPUID_AT]
