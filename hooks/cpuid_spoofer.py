"""CPUID spoofer: hide the hypervisor and claim to be another CPU.

    sandbox run guest_images/popek_goldberg.S --hooks hooks/cpuid_spoofer.py
"""
import struct

from sandbox import RESUME, ExitCode, handlers


def setup(m):
    @m.on(ExitCode.CPUID)
    def spoof(m, e):
        leaf = m.regs.rax & 0xFFFFFFFF
        handlers.handle_cpuid(m, e)              # virtualized leaves, RIP advanced
        if leaf == 0:
            ebx, edx, ecx = struct.unpack("<III", b"GenuineIntel")
            m.regs.rbx, m.regs.rdx, m.regs.rcx = ebx, edx, ecx
        elif leaf == 1:
            m.regs.rcx = m.regs.rcx & ~(1 << 31)     # clear "hypervisor present"
        elif 0x4000_0000 <= leaf <= 0x4FFF_FFFF:
            m.regs.rax = m.regs.rbx = m.regs.rcx = m.regs.rdx = 0
        return RESUME
