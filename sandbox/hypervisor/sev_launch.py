"""Launching a loaded guest encrypted: what a hypervisor does with the SEV firmware.

:func:`launch_sev` takes a :class:`~sandbox.hypervisor.machine.Machine` whose
guest image is loaded (plaintext, as the hypervisor received it) and:

1. attaches a secure processor and the memory controller to the machine
   (``m.sev``, a :class:`SevGuest`);
2. sets the C-bit in every entry of the loader's page tables and in CR3, so
   all guest memory starts private (a guest shares a page by clearing the
   C-bit in its own page table, as Linux's ``set_memory_decrypted`` does);
3. runs LAUNCH_START, LAUNCH_UPDATE_DATA over every guest RAM page (in
   guest-physical order), LAUNCH_MEASURE, the guest owner's check of the
   measurement, and LAUNCH_FINISH;
4. sets SEV enable in the VMCB (090h bit 1).

:func:`launch_sev_es` adds the encrypted VMSA (LAUNCH_UPDATE_VMSA) and the
GHCB protocol (:mod:`sandbox.hypervisor.ghcb`); :func:`launch_snp` the
reverse-map table.  The silicon and firmware they drive are in
:mod:`sandbox.sev`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..memory.encryption import NPF_ENC
from ..memory.hostmem import PAGE_SIZE
from ..memory.paging import ADDR_MASK, PTE
from ..sev.firmware import C_BIT, C_BIT_MASK, MIN_SEV_ASID, GuestOwner, Measurement, Policy, SecureProcessor
from ..sev.memctl import MemoryController
from ..sev.processor import SevExtension
from ..sev.rmp import MSR_RMP_BASE, MSR_RMP_END, NPF_RMP, ReverseMapTable
from ..sev.vmsa import SAVE_HI, SAVE_LO, SevEsState
from ..svm.cpu import ExitRecord
from ..svm.exitcodes import ExitCode
from ..svm.stop import StopReason
from ..svm.vmcb import NpControl
from .ghcb import handle_vmgexit
from .handlers import RESUME, Action, handle_npf
from .machine import SealedRegs

if TYPE_CHECKING:
    from .machine import Machine

#: VMCB 0B8h bit 0: SEV-ES requires LBR virtualization (APM §15.35.2)
VIRT_EXT_LBR = 1


@dataclass
class SevGuest:
    """``Machine.sev``: the machine's secure processor and the guest launched on it.

    ``None`` on a machine without SEV.  ``handle`` is the firmware's handle
    of the launched guest (None until its launch finishes); ``es`` the
    processor's SEV-ES state (VMSA, GHCB MSR) of an SEV-ES guest; ``rmp``
    the reverse-map table once SNP is enabled; ``ghcb_log`` the
    (SW_EXITCODE, SW_EXITINFO1, SW_EXITINFO2) of every VMGEXIT request.
    """
    sp: SecureProcessor
    handle: int | None = None
    es: SevEsState | None = None
    rmp: ReverseMapTable | None = None
    ghcb_log: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def memctl(self) -> MemoryController:
        """The memory controller the secure processor keys."""
        return self.sp.memctl


@dataclass
class LaunchReport:
    handle: int
    asid: int
    policy: int
    measurement: Measurement
    verified: bool
    owner: GuestOwner
    pages: int


def attach_sev(m: "Machine") -> SevGuest:
    """Give the machine its AMD-SP and memory controller (once): ``m.sev``."""
    if m.sev is None:
        sp = SecureProcessor(m.mem)
        sp.memctl = MemoryController(m.mem, sp.engine_for, C_BIT)
        m.sev = SevGuest(sp)
        m.cpu.ext = SevExtension(sp.memctl)
        if m.mem.sync is None:
            m.mem.sync = m.cpu.host_access        # host-memory accesses go through the memory controller
    return m.sev


def attach_rmp(m: "Machine") -> ReverseMapTable:
    """SEV-SNP: the reverse-map table, in firmware-owned DRAM (once)."""
    sev = attach_sev(m)
    if sev.rmp is None:
        sev.rmp = sev.sp.rmp = sev.memctl.rmp = ReverseMapTable(m.mem)
        m.msrs[MSR_RMP_BASE], m.msrs[MSR_RMP_END] = sev.rmp.base, sev.rmp.end
    return sev.rmp


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


# ------------------------------------------------------------------ launch
def launch_sev(m: "Machine", *, asid: int | None = None, policy: int = Policy.NODBG,
               owner: GuestOwner | None = None, expected: list[bytes] | None = None,
               tamper: Callable[["Machine"], None] | None = None) -> LaunchReport:
    """Encrypt and measure the loaded guest and enable SEV in its VMCB.

    ``expected`` is what the guest owner believes the launched pages hold
    (default: the pages as loaded); ``tamper(machine)`` runs after the C-bit
    setup and before LAUNCH_START, as a malicious hypervisor would.
    """
    return _launch(m, asid=asid, policy=policy, owner=owner, expected=expected, tamper=tamper)


def launch_sev_es(m: "Machine", *, snp: bool = False, policy: int = Policy.NODBG, **kw) -> LaunchReport:
    """Launch the loaded guest with SEV-ES (optionally SNP): its initial
    register state goes into a VMSA page that LAUNCH_UPDATE_VMSA measures and
    encrypts; VMGEXIT is served through the GHCB.  ``kw`` as :func:`launch_sev`."""
    sev = attach_sev(m)
    if snp:
        _enable_snp(m)
    vmsa_hpa = m.mem.alloc_page()
    rep = _launch(m, policy=policy | Policy.ES, vmsa_hpa=vmsa_hpa, **kw)
    es = SevEsState(sev.sp.engine_for, vmsa_hpa)
    es.saved = True
    es.asid = rep.asid
    v = m.guest.vmcb
    v.VMSA_PA = vmsa_hpa
    v.NP_CONTROL = v.NP_CONTROL | NpControl.SEV_ES_ENABLE
    v.VIRT_EXT = v.VIRT_EXT | VIRT_EXT_LBR
    # every MSR access of the guest is a #VC (the GHCB MSR is the processor's)
    m.guest.msrpm.set_all(True)
    v.set_intercept(ExitCode.MSR)
    sev.es = sev.memctl.es = es
    m.regs = SealedRegs(m)
    m.on(ExitCode.VMGEXIT)(handle_vmgexit)
    return rep


def launch_snp(m: "Machine", **kw) -> LaunchReport:
    """Launch the loaded guest as SNP-active: every launched page is assigned to
    the guest in the RMP at its GPA and validated (as SNP_LAUNCH_UPDATE does).
    ``kw`` as :func:`launch_sev`."""
    _enable_snp(m)
    return _launch(m, **kw)


def _enable_snp(m: "Machine") -> None:
    attach_rmp(m)
    m.sev.memctl.snp = True
    m.on(ExitCode.NPF)(handle_npf_snp)


def _launch(m: "Machine", *, asid: int | None = None, policy: int = Policy.NODBG,
            owner: GuestOwner | None = None, expected: list[bytes] | None = None,
            tamper: Callable[["Machine"], None] | None = None, vmsa_hpa: int | None = None) -> LaunchReport:
    """The launch flow; with ``vmsa_hpa``, LAUNCH_UPDATE_VMSA of the initial VMSA there."""
    sev = attach_sev(m)
    sp = sev.sp
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
    if vmsa_hpa is not None:
        expected.append(_update_vmsa(m, handle, vmsa_hpa))
    meas = sp.launch_measure(handle)
    verified = owner.verify(meas, policy, expected)
    sp.launch_finish(handle)
    g.vmcb.GUEST_ASID = asid
    g.vmcb.NP_CONTROL = g.vmcb.NP_CONTROL | NpControl.SEV_ENABLE
    if m.handlers.get(ExitCode.NPF) in (None, handle_npf):
        m.on(ExitCode.NPF)(handle_npf_sev)
    sev.handle = handle
    return LaunchReport(handle, asid, int(policy), meas, verified, owner, len(g.ram))


def _update_vmsa(m: "Machine", handle: int, vmsa_hpa: int) -> bytes:
    """LAUNCH_UPDATE_VMSA of the initial VMSA -- the VMCB save area as the
    loader set it up, which the hypervisor then clears; returns the plaintext."""
    img = bytearray(PAGE_SIZE)
    img[0:SAVE_HI - SAVE_LO] = m.mem.read(m.guest.vmcb_hpa + SAVE_LO, SAVE_HI - SAVE_LO)
    m.mem.write(vmsa_hpa, bytes(img))
    m.sev.sp.launch_update_vmsa(handle, vmsa_hpa)
    m.mem.fill(m.guest.vmcb_hpa + SAVE_LO, SAVE_HI - SAVE_LO, 0)
    return bytes(img)


# ------------------------------------------------------------------ nested page faults
def handle_npf_sev(m: "Machine", e: ExitRecord) -> Action:
    """VMEXIT_NPF of an SEV guest.  An encrypted access (EXITINFO1 bit 34, ENC)
    to a GPA the hypervisor left unmapped for MMIO cannot be emulated: the
    hypervisor would see only ciphertext.  The run stops and says so; a guest
    must map MMIO shared (C-bit clear).  Everything else is the default handler."""
    if e.exitinfo1 & NPF_ENC and m.guest.npt.lookup(e.exitinfo2 & ~0xFFF) is None:
        return m.stop(StopReason.NPF, f"encrypted (C-bit) access to GPA {e.exitinfo2:#x}, which the hypervisor "
                                      f"treats as MMIO: MMIO must be mapped shared (RIP {e.rip:#x})")
    return handle_npf(m, e)


def handle_npf_snp(m: "Machine", e: ExitRecord) -> Action:
    """VMEXIT_NPF for an SNP guest.  A shared (C=0) access to a page the guest
    owns is an implicit page-state change to shared, as KVM treats it: the
    hypervisor takes the page back with RMPUPDATE and resumes.  An RMP fault
    on a private access is a violation: the run stops and says so."""
    if not e.exitinfo1 & NPF_RMP:
        return handle_npf_sev(m, e)
    sev = m.sev
    if not e.exitinfo1 & NPF_ENC:
        hpa = m.guest.npt.lookup(e.exitinfo2 & ~0xFFF)
        if hpa is not None and sev.rmp.entry(hpa).asid == sev.memctl.asid:
            sev.rmp.rmpupdate(hpa, assigned=False)
            sev.memctl.stale = True
            return RESUME
    return m.stop(StopReason.NPF, f"RMP violation: nested page fault with the RMP bit at GPA {e.exitinfo2:#x} "
                                  f"(EXITINFO1 {e.exitinfo1:#x}) from RIP {e.rip:#x}")
