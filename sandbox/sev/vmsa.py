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

What the hypervisor does with this -- launching the VMSA, answering VMGEXIT
through the GHCB -- is :mod:`sandbox.hypervisor.sev_launch` and
:mod:`sandbox.hypervisor.ghcb`.
"""
from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING, Callable

from unicorn import x86_const as X

from ..arch import VEC_VC
from ..memory.hostmem import PAGE_SIZE
from ..svm.exitcodes import ExitCode
from ..svm.vmcb import FIELDS, GUEST_INSN_MAX, SAVE_AREA
from .firmware import MSR_GHCB
from .memctl import XexEngine

if TYPE_CHECKING:
    from ..svm.cpu import ExitRecord, SvmCpu

#: the VMCB state-save area [SAVE_LO, SAVE_HI) is what the VMSA holds from offset 0
SAVE_LO, SAVE_HI = SAVE_AREA, 0x700
#: VMSA offset of RIP (the VMCB's RIP, relative to the save area)
VMSA_RIP = FIELDS["RIP"].offset - SAVE_AREA
_GHCB_PA, _NRIP = FIELDS["GHCB_PA"].offset, FIELDS["NRIP"].offset
_INSN = FIELDS["GUEST_INSN_LEN"].offset          # length byte and the instruction bytes after it
#: automatic exits (APM §15.35.5); NPF only when not a reserved-bit fault
AUTOMATIC_EXITS = frozenset({
    ExitCode.EXCP_MC, ExitCode.INTR, ExitCode.NMI, ExitCode.SMI, ExitCode.INIT, ExitCode.VINTR,
    ExitCode.PAUSE, ExitCode.HLT, ExitCode.SHUTDOWN, *range(ExitCode.EFER_WRITE_TRAP, 0xA0),
    ExitCode.BUSLOCK, ExitCode.IDLE_HLT, ExitCode.NPF, ExitCode.VMGEXIT, ExitCode.INVALID})
#: VMSA offsets of the GPRs (QEMU/Unicorn order rax rcx rdx rbx rsp rbp rsi rdi r8-r15)
GPR_VMSA = (0x1F8, 0x308, 0x310, 0x318, 0x1D8, 0x328, 0x330, 0x338,
            0x340, 0x348, 0x350, 0x358, 0x360, 0x368, 0x370, 0x378)
#: VMGEXIT is VMMCALL with a REP prefix; WRMSR is the one MSR instruction that writes
VMGEXIT_BYTES = bytes.fromhex("f30f01d9")
WRMSR_BYTES = bytes.fromhex("0f30")
_Q = struct.Struct("<Q")


class SevEsState:
    """The processor's SEV-ES behaviour for one guest: its VMSA and GHCB MSR.

    ``engine_for(asid)`` is the secure processor's key-slot lookup (the
    engine that encrypts with the guest's key, or None before launch).
    """

    def __init__(self, engine_for: Callable[[int], XexEngine | None], vmsa_hpa: int) -> None:
        self.engine_for = engine_for
        self.vmsa_hpa = vmsa_hpa
        self.ghcb_msr = 0
        self.saved = False            # the VMSA holds the state VMRUN must load
        self.vc_count = 0
        self.asid = 0                 # set at launch: whose key encrypts the VMSA
        self._digest: bytes | None = None   # held by the processor, never in DRAM
        #: why the last VMRUN's VMSA check failed ('' when it passed)
        self.invalid = ""

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
        if rec.exitcode == ExitCode.VMGEXIT:
            _Q.pack_into(vmsa, VMSA_RIP, rec.nrip)        # the guest resumes after VMGEXIT
            _Q.pack_into(mv, b + _GHCB_PA, self.ghcb_msr)  # GHCB_PA <- GHCB MSR
        self._digest = hashlib.sha256(vmsa).digest()
        mv[self.vmsa_hpa:self.vmsa_hpa + PAGE_SIZE] = self.engine_for(self.asid).encrypt_page(self.vmsa_hpa,
                                                                                              bytes(vmsa))
        mv[b + SAVE_LO:b + SAVE_HI] = bytes(SAVE_HI - SAVE_LO)
        _Q.pack_into(mv, b + _NRIP, 0)                    # nRIP not saved
        mv[b + _INSN:b + _INSN + 1 + GUEST_INSN_MAX] = bytes(1 + GUEST_INSN_MAX)   # nor instruction bytes
        rec.rip = rec.nrip = 0
        rec.insn = b""
        self.saved = True

    def on_vmrun(self, cpu: "SvmCpu") -> None:
        """VMRUN: the state-save area comes back from the VMSA (whatever the
        hypervisor wrote into the VMCB's copy is ignored)."""
        eng = self.engine_for(self.asid)
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
        if exitcode == ExitCode.MSR and st.reg_read(X.UC_X86_REG_RCX) & 0xFFFFFFFF == MSR_GHCB:
            if cpu.insn_bytes(rip)[:2] == WRMSR_BYTES:
                self.ghcb_msr = (st.reg_read(X.UC_X86_REG_RAX) & 0xFFFFFFFF) | \
                    (st.reg_read(X.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32
            else:
                st.reg_write(X.UC_X86_REG_RAX, self.ghcb_msr & 0xFFFFFFFF)
                st.reg_write(X.UC_X86_REG_RDX, self.ghcb_msr >> 32)
            st.reg_write(X.UC_X86_REG_RIP, rip + length)
            return True
        if exitcode == ExitCode.VMMCALL and cpu.insn_bytes(rip)[:4] == VMGEXIT_BYTES:
            cpu.take_vmexit(ExitCode.VMGEXIT, 0, 0, rip=rip, nrip=rip + len(VMGEXIT_BYTES))
            return True
        if exitcode in AUTOMATIC_EXITS:
            return False
        self.vc_count += 1
        cpu.raise_exception(VEC_VC, exitcode, rip)
        return True
