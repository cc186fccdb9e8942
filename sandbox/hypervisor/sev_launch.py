"""Launching a loaded guest encrypted: what a hypervisor does with the SEV firmware.

:func:`launch_sev` takes a :class:`~sandbox.hypervisor.machine.Machine` whose guest
image is loaded (plaintext, as the hypervisor received it) and:

1. attaches a secure processor and the memory controller to the machine;
2. sets the C-bit in every entry of the loader's page tables and in CR3, so
   all guest memory starts private (a guest shares a page by clearing the
   C-bit in its own page table, as Linux's ``set_memory_decrypted`` does);
3. runs LAUNCH_START, LAUNCH_UPDATE_DATA over every guest RAM page (in
   guest-physical order), LAUNCH_MEASURE, the guest owner's check of the
   measurement, and LAUNCH_FINISH;
4. sets SEV enable in the VMCB (090h bit 1).

SEV-ES and SNP add to this in :mod:`sandbox.sev.vmsa` and :mod:`sandbox.sev.rmp`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..memory.hostmem import PAGE_SIZE
from ..sev.memctl import MemoryController
from ..sev.processor import SevExtension
from ..memory.paging import ADDR_MASK, PTE
from ..sev.firmware import C_BIT, C_BIT_MASK, MIN_SEV_ASID, GuestOwner, Measurement, Policy, SecureProcessor
from ..svm.vmcb import NpControl
from ..svm.stop import StopReason

if TYPE_CHECKING:
    from .machine import Machine


@dataclass
class LaunchReport:
    handle: int
    asid: int
    policy: int
    measurement: Measurement
    verified: bool
    owner: GuestOwner
    pages: int


def attach_secure_processor(m: "Machine") -> SecureProcessor:
    """Give the machine its AMD-SP and memory controller (once)."""
    sp = getattr(m, "sp", None)
    if sp is None:
        sp = SecureProcessor(m.mem)
        m.sp = sp
        sp.memctl = MemoryController(m.mem, sp.engine_for, C_BIT)
        m.cpu.ext = SevExtension(sp.memctl)
        if m.mem.sync is None:
            m.mem.sync = m.cpu.host_access        # host-memory accesses go through the memory controller
    return sp


def set_cbit_in_page_tables(m: "Machine") -> None:
    """Set the C-bit in every present entry of the guest's 4-level tables and in CR3."""
    g = m.guest
    cr3 = g.vmcb.CR3
    seen: set[int] = set()

    def visit(table: int, level: int) -> None:
        if table in seen:
            return
        seen.add(table)
        raw = bytearray(g.read_phys(table, PAGE_SIZE))
        for i in range(512):
            e = int.from_bytes(raw[i * 8:i * 8 + 8], "little")
            if not e & PTE.P:
                continue
            if level > 1 and not e & PTE.PS:
                visit(e & ADDR_MASK & ~C_BIT_MASK, level - 1)
            raw[i * 8:i * 8 + 8] = (e | C_BIT_MASK).to_bytes(8, "little")
        g.write_phys(table, bytes(raw))
    visit(cr3 & ADDR_MASK & ~C_BIT_MASK, 4)
    g.vmcb.CR3 = cr3 | C_BIT_MASK


def handle_npf_sev(m: "Machine", e) -> object:
    """VMEXIT_NPF of an SEV guest.  An encrypted access (EXITINFO1 bit 34, ENC)
    to a GPA the hypervisor left unmapped for MMIO cannot be emulated: the
    hypervisor would see only ciphertext.  The run stops and says so; a guest
    must map MMIO shared (C-bit clear).  Everything else is the default handler."""
    from .machine import handle_npf
    from ..memory.encryption import NPF_ENC
    if e.exitinfo1 & NPF_ENC and m.guest.npt.lookup(e.exitinfo2 & ~0xFFF) is None:
        return m.stop(StopReason.NPF, f"encrypted (C-bit) access to GPA {e.exitinfo2:#x}, which the hypervisor "
                             f"treats as MMIO: MMIO must be mapped shared (RIP {e.rip:#x})")
    return handle_npf(m, e)


def launch_sev(m: "Machine", *, asid: int | None = None, policy: int = Policy.NODBG,
               owner: GuestOwner | None = None, expected: list[bytes] | None = None,
               tamper=None) -> LaunchReport:
    """Encrypt and measure the loaded guest and enable SEV in its VMCB.

    ``expected`` is what the guest owner believes the launched pages hold
    (default: the pages as loaded); ``tamper(machine)`` runs after the C-bit
    setup and before LAUNCH_START, as a malicious hypervisor would.
    """
    sp = attach_secure_processor(m)
    if asid is None:
        asid = 1 if policy & Policy.ES else MIN_SEV_ASID
    set_cbit_in_page_tables(m)
    g = m.guest
    if expected is None:
        expected = [g.read_phys(gpa, PAGE_SIZE) for gpa in sorted(g.ram)]
    if tamper is not None:
        tamper(m)
    owner = owner or GuestOwner(sp.pdh_public())
    handle = sp.launch_start(asid, policy, owner.session())
    for gpa in sorted(g.ram):
        sp.launch_update_data(handle, g.ram[gpa], PAGE_SIZE, gpa)
    vmsa = getattr(m, "_sev_es_vmsa_hook", None)
    if vmsa is not None:
        vmsa(handle, expected)
    meas = sp.launch_measure(handle)
    verified = owner.verify(meas, policy, expected)
    sp.launch_finish(handle)
    g.vmcb.GUEST_ASID = asid
    g.vmcb.NP_CONTROL = g.vmcb.NP_CONTROL | NpControl.SEV_ENABLE
    if m.handlers.get(0x400) is None or m.handlers[0x400].__name__ == "handle_npf":
        m.on(0x400)(handle_npf_sev)
    m.sev_handle = handle
    return LaunchReport(handle, asid, int(policy), meas, verified, owner, len(g.ram))
