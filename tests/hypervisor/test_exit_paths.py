"""The exit path the hypervisor sees is the same whichever way the processor takes it.

The processor has a fused round trip for the common intercepted instruction
(#VMEXIT, handler, fast VMRUN in one frame) and the general functions
(``vmexit``, the dispatch loop, ``enter``) for everything else.  A processor
extension that does nothing (``ProcessorExtension()``, which is not the shared
``NO_EXTENSION``) sends every exit down the general path, so the two runs below
differ only in the path taken: the VMCB page at every exit, the exit records,
``Machine.counts``, the trace, what ``on_exit_record`` sees, the guest's final
registers and the final VMCB must all agree.  The architectural fields are
also checked against the APM (vol. 2 §15.6, §15.10.2, Appendix C).
"""
from __future__ import annotations

import dataclasses

import pytest

from sandbox import ExitCode
from sandbox.svm.extension import ProcessorExtension
from sandbox.svm.vmcb import OFF_EVENTINJ, OFF_EXITCODE, OFF_GUEST_INSN_LEN, OFF_NRIP, OFF_RAX, OFF_RIP

from conftest import BASE, assemble, hc_exit, insn_length

N = 7
CPUID_LOOP = f"""
    mov r12, {N}
again:
    mov eax, r12d
    xor ecx, ecx
    cpuid
    dec r12
    jnz again
""" + hc_exit(0)
OUT_LOOP = f"""
    mov r12, {N}
    mov edx, 0x3f8
again:
    mov eax, r12d
    add al, 0x30
    out dx, al
    dec r12
    jnz again
""" + hc_exit(0)


def _q(page: bytes, off: int) -> int:
    return int.from_bytes(page[off:off + 8], "little")


def _run(guest, src: str, code: int, general: bool, full_read_every: int):
    m = guest(src)
    if code == ExitCode.CPUID:
        m.intercept("cpuid")
    if general:
        m.cpu.ext = ProcessorExtension()      # every exit through vmexit / dispatch_loop / enter
    pages: list[bytes] = []
    eager: list[tuple[int, int, int]] = []
    seen: list[tuple] = []
    default = m.handlers[code]

    def handler(m, e):
        if len(eager) % full_read_every == 0:
            # the whole page through host memory: the lazily saved state is written back first
            pages.append(bytes(m.mem.read(m.guest.vmcb_hpa, 4096)))
        eager.append((m.regs.rax, m.regs.rip, m.regs.rsp))
        if len(eager) % 2 == 0:
            # leave stale values where the next #VMEXIT must write: the instruction-byte
            # count, and an EVENTINJ without its valid bit (VMRUN injects nothing)
            m.mem.write(m.guest.vmcb_hpa + OFF_GUEST_INSN_LEN, b"\x03")
            m.mem.write(m.guest.vmcb_hpa + OFF_EVENTINJ, (3).to_bytes(8, "little"))
        return default(m, e)

    m.handlers[code] = handler
    m.on_exit_record = lambda rec: seen.append(dataclasses.astuple(rec))
    r = m.run(timeout=30)
    assert r.reason == "guest-exit", r.detail
    trace = [dataclasses.astuple(rec) for rec in m.trace]
    final = bytes(m.mem.read(m.guest.vmcb_hpa, 4096))
    return r, pages, eager, seen, trace, final, dict(m.counts)


@pytest.mark.parametrize("code, src", [(ExitCode.CPUID, CPUID_LOOP), (ExitCode.IOIO, OUT_LOOP)],
                         ids=["cpuid", "out"])
@pytest.mark.parametrize("full_read_every", [1, 3])
def test_fused_round_trip_matches_the_general_path(guest, code, src, full_read_every):
    fast = _run(guest, src, code, False, full_read_every)
    slow = _run(guest, src, code, True, full_read_every)
    rf, rs = fast[0], slow[0]
    assert (rf.regs, rf.rip, rf.rflags, rf.console, rf.counts, rf.exits) == \
        (rs.regs, rs.rip, rs.rflags, rs.console, rs.counts, rs.exits)
    names = ("VMCB pages at the exits", "RAX/RIP/RSP at the exits", "on_exit_record", "trace",
             "final VMCB", "Machine.counts")
    for name, a, b in zip(names, fast[1:], slow[1:]):
        assert a == b, f"{name} differ between the fused and the general exit path"


@pytest.mark.parametrize("general", [False, True], ids=["fused", "general"])
def test_cpuid_and_out_exits_as_the_apm_writes_them(guest, general):
    """EXITCODE, EXITINFO1/2, EXITINTINFO, nRIP, EVENTINJ and the saved RIP/RAX
    of each exit, from the APM and the assembled guest (not the model)."""
    for code, src, opcode in ((ExitCode.CPUID, CPUID_LOOP, b"\x0f\xa2"), (ExitCode.IOIO, OUT_LOOP, b"\xee")):
        image = assemble(src)
        at = BASE + image.index(opcode)
        nxt = at + insn_length(image[at - BASE:])
        _, pages, eager, _, trace, _, counts = _run(guest, src, code, general, 1)
        assert counts[code] == N and counts[ExitCode.VMMCALL] == 1
        assert len(pages) == N and len(trace) == N + 1
        for i, page in enumerate(pages):
            r12 = N - i
            want_rax = r12 + (0x30 if code == ExitCode.IOIO else 0)
            # APM Appendix C: VMEXIT_CPUID = 72h, VMEXIT_IOIO = 7Bh
            assert _q(page, OFF_EXITCODE) == {ExitCode.CPUID: 0x72, ExitCode.IOIO: 0x7B}[code]
            if code == ExitCode.CPUID:
                assert (_q(page, OFF_EXITCODE + 8), _q(page, OFF_EXITCODE + 16)) == (0, 0)
            else:
                # §15.10.2: port in 31:16, SZ8 (bit 4), TYPE 0 = OUT; EXITINFO2 = the next RIP
                info1 = _q(page, OFF_EXITCODE + 8)
                assert (info1 >> 16, info1 & 1, info1 & 0x70) == (0x3F8, 0, 0x10)
                assert _q(page, OFF_EXITCODE + 16) == nxt
            assert _q(page, OFF_EXITCODE + 24) == 0          # EXITINTINFO: nothing in delivery
            assert _q(page, OFF_EVENTINJ) == 0               # EVENTINJ consumed by VMRUN
            assert _q(page, OFF_NRIP) == nxt
            assert (_q(page, OFF_RIP), _q(page, OFF_RAX)) == (at, want_rax)
            assert page[OFF_GUEST_INSN_LEN] & 0xF == 0       # no decode assist bytes for these exits
            assert eager[i][:2] == (want_rax, at)
            rec = trace[i]
            assert rec[:6] == (int(code), _q(page, OFF_EXITCODE + 8), _q(page, OFF_EXITCODE + 16), 0, at, nxt)
            assert rec[7] == i + 1                           # the exit's index in this run
