"""SEV-ES: guest register state encrypted in the VMSA, #VC and VMGEXIT (APM vol. 2 §15.35).

At #VMEXIT of an SEV-ES guest the processor saves the whole guest state --
the state-save area and every general register -- into the VMSA page
(pointer at VMCB 108h), encrypted with the guest's key, and the hypervisor's
VMCB save area holds nothing (zeros).  VMRUN reloads the state from the VMSA.
The VMSA uses the layout of the VMCB state-save area (offsets from 400h in
the VMCB become offsets from 0 in the VMSA) plus the general registers at
the SEV-ES save-area offsets (RCX 308h, RDX 310h, RBX 318h, RBP 328h,
RSI 330h, RDI 338h, R8-R15 340h-378h; RAX 1F8h and RSP 1D8h as in the VMCB).

Exits are split (§15.35.5): automatic exits (AE) -- HLT, PAUSE, INTR, NMI,
SMI, INIT, VINTR, SHUTDOWN, CR/EFER write traps, bus lock, idle HLT, NPF,
VMGEXIT -- still exit; every other intercept (non-automatic, NAE) raises #VC
(vector 29) in the guest with the exit code as its error code.  The GHCB MSR
(C001_0130h) belongs to the guest's state: RDMSR/WRMSR of it never exit, and
VMGEXIT copies it to the VMCB's GHCB_PA.

The VMCB's nRIP and guest instruction bytes are not saved (§15.35.8), and the
hypervisor's exit record carries no guest RIP.  The VMSA is integrity-checked:
the processor keeps a SHA-256 of the state it saved, and a VMRUN whose VMSA
no longer decrypts to that state fails with VMEXIT_INVALID (§15.35.8).
"""
from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING

from unicorn import x86_const as X

from ..arch import VEC_VC
from ..hypervisor.ghcb import VMEXIT_VMGEXIT, VMGEXIT_BYTES, handle_vmgexit
from ..memory.hostmem import PAGE_SIZE
from .firmware import MSR_GHCB, Policy
from ..svm.vmcb import NpControl

if TYPE_CHECKING:
    from ..svm.cpu import ExitRecord, SvmCpu
    from ..hypervisor.machine import Machine

SAVE_LO, SAVE_HI = 0x400, 0x700          # VMCB state-save area copied into the VMSA
#: automatic exits (APM §15.35.5); NPF only when not a reserved-bit fault
AUTOMATIC_EXITS = frozenset({0x52, 0x60, 0x61, 0x62, 0x63, 0x64, 0x77, 0x78, 0x7F, *range(0x8F, 0xA0), 0xA5, 0xA6,
                             0x400, VMEXIT_VMGEXIT, 0xFFFF_FFFF_FFFF_FFFF})
#: VMSA offsets of the GPRs (QEMU/Unicorn order rax rcx rdx rbx rsp rbp rsi rdi r8-r15)
GPR_VMSA = (0x1F8, 0x308, 0x310, 0x318, 0x1D8, 0x328, 0x330, 0x338,
            0x340, 0x348, 0x350, 0x358, 0x360, 0x368, 0x370, 0x378)
_Q = struct.Struct("<Q")


class SevEsRegisterError(Exception):
    """The hypervisor asked for an SEV-ES guest's registers: they are in the encrypted VMSA."""


class SevEsState:
    """The processor's SEV-ES behaviour for one guest (its VMSA and GHCB MSR)."""

    def __init__(self, m: "Machine", vmsa_hpa: int) -> None:
        self.m = m
        self.vmsa_hpa = vmsa_hpa
        self.ghcb_msr = 0
        self.saved = False            # the VMSA holds the state VMRUN must load
        self.vc_count = 0
        self.asid = 0                 # set at launch: whose key encrypts the VMSA
        self._digest: bytes | None = None   # held by the processor, never in DRAM
        #: why the last VMRUN's VMSA check failed ('' when it passed)
        self.invalid = ""

    def _engine(self):
        return self.m.sp.engine_for(self.asid)

    # --------------------------------------------------------- world switch
    def on_vmexit(self, cpu: "SvmCpu", rec: "ExitRecord") -> None:
        """#VMEXIT: guest state into the encrypted VMSA; the VMCB save area is cleared."""
        cpu.flush_guest_state()
        mv = cpu.mem.view
        b = cpu.vmcb_hpa
        vmsa = bytearray(PAGE_SIZE)
        vmsa[0:SAVE_HI - SAVE_LO] = mv[b + SAVE_LO:b + SAVE_HI]
        for i, off in enumerate(GPR_VMSA):
            _Q.pack_into(vmsa, off, cpu.guest_gpr(i))
        if rec.exitcode == VMEXIT_VMGEXIT:
            _Q.pack_into(vmsa, 0x178, rec.nrip)           # the guest resumes after VMGEXIT
            _Q.pack_into(mv, b + 0xA0, self.ghcb_msr)     # GHCB_PA <- GHCB MSR
        eng = self._engine()
        self._digest = hashlib.sha256(vmsa).digest()
        mv[self.vmsa_hpa:self.vmsa_hpa + PAGE_SIZE] = eng.encrypt_page(self.vmsa_hpa, bytes(vmsa))
        mv[b + SAVE_LO:b + SAVE_HI] = bytes(SAVE_HI - SAVE_LO)
        _Q.pack_into(mv, b + 0xC8, 0)                     # nRIP not saved
        mv[b + 0xD0:b + 0xE0] = bytes(16)                 # nor instruction bytes
        rec.rip = rec.nrip = 0
        rec.insn = b""
        self.saved = True

    def on_vmrun(self, cpu: "SvmCpu") -> None:
        """VMRUN: the state-save area comes back from the VMSA (whatever the
        hypervisor wrote into the VMCB's copy is ignored)."""
        eng = self._engine()
        if not self.saved or eng is None:
            return                        # no key: VMRUN's SEV check fails the run
        mv = cpu.mem.view
        b = cpu.vmcb_hpa
        vmsa = eng.decrypt_page(self.vmsa_hpa, bytes(mv[self.vmsa_hpa:self.vmsa_hpa + PAGE_SIZE]))
        if self._digest is not None and hashlib.sha256(vmsa).digest() != self._digest:
            self.invalid = f"SEV-ES VMSA integrity check failed (VMSA at {self.vmsa_hpa:#x} was modified)"
            cpu.require_full_vmrun()         # take VMRUN's full check path, which fails on ``invalid``
            return                        # nothing is loaded
        self.invalid = ""
        mv[b + SAVE_LO:b + SAVE_HI] = vmsa[0:SAVE_HI - SAVE_LO]
        self.saved = False

    # ------------------------------------------------------------ intercepts
    def intercept(self, cpu: "SvmCpu", exitcode: int, rip: int, length: int) -> bool:
        """An intercepted instruction of an SEV-ES guest.  True when handled here
        (GHCB MSR, VMGEXIT, or #VC for a non-automatic exit)."""
        st = cpu.st
        if exitcode == 0x7C and st.reg_read(X.UC_X86_REG_RCX) & 0xFFFFFFFF == MSR_GHCB:
            if cpu.insn_bytes(rip)[:2] == b"\x0f\x30":   # WRMSR
                self.ghcb_msr = (st.reg_read(X.UC_X86_REG_RAX) & 0xFFFFFFFF) | \
                    (st.reg_read(X.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32
            else:
                st.reg_write(X.UC_X86_REG_RAX, self.ghcb_msr & 0xFFFFFFFF)
                st.reg_write(X.UC_X86_REG_RDX, self.ghcb_msr >> 32)
            st.reg_write(X.UC_X86_REG_RIP, rip + length)
            return True
        if exitcode == 0x81 and cpu.insn_bytes(rip)[:4] == VMGEXIT_BYTES:
            cpu.take_vmexit(VMEXIT_VMGEXIT, 0, 0, rip=rip, nrip=rip + 4)
            return True
        if exitcode in AUTOMATIC_EXITS:
            return False
        self.vc_count += 1
        cpu.raise_exception(VEC_VC, exitcode, rip)
        return True


def launch_sev_es(m: "Machine", *, snp: bool = False, **kw):
    """Launch the loaded guest with SEV-ES (optionally SNP): its initial
    register state goes into a VMSA page that LAUNCH_UPDATE_VMSA measures and
    encrypts; VMGEXIT is handled through the GHCB."""
    from ..hypervisor.sev_launch import attach_secure_processor, launch_sev
    attach_secure_processor(m)
    if snp:
        from .rmp import attach_rmp, handle_npf_snp
        attach_rmp(m)
        m.sp.memctl.snp = True
        m.on(0x400)(handle_npf_snp)
    vmsa_hpa = m.mem.alloc_page()
    es = SevEsState(m, vmsa_hpa)
    v = m.guest.vmcb

    def update_vmsa(handle: int, expected: list[bytes]) -> None:
        # the initial VMSA: the VMCB save area as the loader set it up
        img = bytearray(PAGE_SIZE)
        img[0:SAVE_HI - SAVE_LO] = m.mem.read(m.guest.vmcb_hpa + SAVE_LO, SAVE_HI - SAVE_LO)
        m.mem.write(vmsa_hpa, bytes(img))
        expected.append(bytes(img))
        m.sp.launch_update_vmsa(handle, vmsa_hpa)
        m.mem.fill(m.guest.vmcb_hpa + SAVE_LO, SAVE_HI - SAVE_LO, 0)
    m._sev_es_vmsa_hook = update_vmsa
    policy = kw.pop("policy", Policy.NODBG) | Policy.ES
    try:
        rep = launch_sev(m, policy=policy, **kw)
    finally:
        m._sev_es_vmsa_hook = None
    es.saved = True
    es.asid = rep.asid
    v.VMSA_PA = vmsa_hpa
    v.NP_CONTROL = v.NP_CONTROL | NpControl.SEV_ES_ENABLE
    v.VIRT_EXT = v.VIRT_EXT | 1                   # SEV-ES requires LBR virtualization (§15.35.2)
    # every MSR access of the guest is a #VC (the GHCB MSR is the processor's)
    m.guest.msrpm.set_all(True)
    v.set_intercept(0x7C)
    m.sp.memctl.es = es
    m.sev_es = es
    m.ghcb_log = []
    m.on(VMEXIT_VMGEXIT)(handle_vmgexit)
    return rep
