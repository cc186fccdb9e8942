"""A deliberately buggy set of exit handlers: a target for ``sandbox fuzz --hooks``.

Each handler looks plausible and has one planted bug, each of a different kind:

* ``cpuid_from_table`` answers the basic CPUID leaves from a table that holds
  leaves 0 and 1 only: any other basic leaf raises IndexError (*raises*);
* ``io_ports`` ignores an access to a port it has no device for by resuming
  the guest -- without advancing RIP, so the guest runs the same IN/OUT again
  forever (*livelock*);
* ``msr_logger`` appends every WRMSR to a log it keeps in the page just past
  the guest's last RAM page: host memory that is not the guest's (*host
  memory outside the guest*).

    sandbox fuzz --seconds 30 --seed 1 --hooks hooks/buggy_handlers.py --crashes crashes/
    sandbox run crashes/hook-raised-0123456789ab.case --hooks hooks/buggy_handlers.py
"""
import struct

from sandbox import RESUME, ExitCode, handlers

#: (EAX, EBX, ECX, EDX) for basic leaves 0 and 1
BASIC_LEAVES = [(0x1, 0x68747541, 0x444D4163, 0x69746E65), (0x00800F12, 0, 0x1, 0x0183F3FF)]
#: ports this hypervisor emulates: the COM1 console, passed to the default handler
DEVICES = range(0x3F8, 0x400)
_log = {"n": 0}


def cpuid_from_table(m, e):
    leaf = m.regs.rax & 0xFFFFFFFF
    if leaf >= 0x8000_0000:
        return handlers.handle_cpuid(m, e)
    a, b, c, d = BASIC_LEAVES[leaf]                      # BUG: leaves 2..0x7FFFFFFF are not in the table
    m.regs.rax, m.regs.rbx, m.regs.rcx, m.regs.rdx = a, b, c, d
    m.advance(e)
    return RESUME


def io_ports(m, e):
    port = e.exitinfo1 >> 16
    if port in DEVICES:
        return handlers.handle_ioio(m, e)
    return RESUME                                        # BUG: "ignore" the access, but RIP is not advanced


def msr_logger(m, e):
    if e.exitinfo1 == 1:                                 # WRMSR: log (MSR, value)
        g = m.guest
        log_page = g.ram[max(g.ram)] + 0x1000            # BUG: one page past the guest's last RAM page
        slot = log_page + 16 * (_log["n"] % 256)
        m.mem.write(slot, struct.pack("<QQ", m.regs.rcx & 0xFFFFFFFF,
                                      (m.regs.rdx & 0xFFFFFFFF) << 32 | (m.regs.rax & 0xFFFFFFFF)))
        _log["n"] += 1
    return handlers.handle_msr(m, e)


HANDLERS = {ExitCode.CPUID: cpuid_from_table, ExitCode.IOIO: io_ports, ExitCode.MSR: msr_logger}
