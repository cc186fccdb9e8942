"""SEV-SNP: the reverse-map table (RMP), RMPUPDATE and PVALIDATE (APM vol. 2 §15.36).

The RMP has one 16-byte entry per host page, after a 16 KiB bookkeeping
area, in DRAM pages the secure processor owns (RMP_BASE/RMP_END, MSRs
C001_0132h/C001_0133h).  The low quadword uses the layout Linux reads
(``struct rmpentry_raw``)::

    bit 0 ASSIGNED, 1 PAGE_SIZE, 2 IMMUTABLE, 50:12 GPA[50:12],
    60:51 ASID, 61 VMSA, 62 VALIDATED

Owners: hypervisor (ASSIGNED = 0), a guest (ASSIGNED = 1, its ASID), the
secure processor (ASSIGNED = 1, ASID = 0, IMMUTABLE = 1).

Checks on a guest access of an SNP-active guest, in the APM's priority order
(§15.36.10): the page must be assigned to the guest's ASID for a private
access and not guest-owned for a shared one, and the RMP's GPA must match
the GPA being accessed (the reverse-map check) -- otherwise VMEXIT_NPF with
EXITINFO1 bit 31 (RMP); then a private page must be VALIDATED -- otherwise
#VC with error code 0x404 (PAGE_NOT_VALIDATED).  RMPUPDATE always clears
VALIDATED, so a remapped or replayed page is detected the next time the
guest touches it.  Hypervisor writes to guest-owned or firmware-owned pages
are refused (on hardware: a #PF with the RMP bit in the host).

PVALIDATE (F2 0F 01 FF) is executed by the guest: RAX = GVA, ECX = page size
(0 = 4 KiB), EDX = 1 validate / 0 rescind; RAX returns 0 (success),
1 (FAIL_INPUT) or 6 (FAIL_SIZEMISMATCH); RFLAGS.CF = 1 when VALIDATED did not
change (APM vol. 3 PVALIDATE).

Attaching the RMP to a machine and launching an SNP guest are the
hypervisor's part: :mod:`sandbox.hypervisor.sev_launch`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unicorn import x86_const as X

from ..arch import VEC_VC
from ..memory.encryption import NPF_ENC
from ..memory.hostmem import PAGE_SIZE, HostMemory, HostMemoryError
from ..memory.mmu import GuestException, GuestGP, GuestPageFault, NestedFault
from ..memory.paging import Access, PFErr
from ..svm.events import Vec
from ..svm.exitcodes import ExitCode

if TYPE_CHECKING:
    from ..svm.cpu import SvmCpu
    from .memctl import MemoryController

RMP_BOOKKEEPING = 0x4000
ENTRY_SIZE = 16
MSR_RMP_BASE, MSR_RMP_END = 0xC001_0132, 0xC001_0133
NPF_RMP = 1 << 31                    # EXITINFO1 bit 31 (APM §15.36.10)
VC_PAGE_NOT_VALIDATED = 0x404        # #VC error code (SVM_EXIT_... 0x404)
PVALIDATE = bytes.fromhex("f20f01ff")
PVALIDATE_FAIL_INPUT, PVALIDATE_FAIL_SIZEMISMATCH = 1, 6

_A, _PS, _IMM = 1 << 0, 1 << 1, 1 << 2
_GPA_MASK = ((1 << 51) - 1) & ~0xFFF
_ASID_SHIFT, _ASID_MASK = 51, 0x3FF
_VMSA, _VALIDATED = 1 << 61, 1 << 62


class RmpViolation(HostMemoryError):
    """The hypervisor touched a page the RMP does not let it write."""


class RmpError(Exception):
    """RMPUPDATE refused (FAIL_INPUT / FAIL_PERMISSION)."""


@dataclass(frozen=True)
class RmpEntry:
    assigned: bool = False
    asid: int = 0
    gpa: int = 0
    validated: bool = False
    immutable: bool = False
    vmsa: bool = False

    def encode(self) -> int:
        v = (_A if self.assigned else 0) | (_IMM if self.immutable else 0) | (self.gpa & _GPA_MASK)
        v |= (self.asid & _ASID_MASK) << _ASID_SHIFT
        v |= (_VMSA if self.vmsa else 0) | (_VALIDATED if self.validated else 0)
        return v

    @classmethod
    def decode(cls, v: int) -> "RmpEntry":
        return cls(bool(v & _A), (v >> _ASID_SHIFT) & _ASID_MASK, v & _GPA_MASK, bool(v & _VALIDATED),
                   bool(v & _IMM), bool(v & _VMSA))


class ReverseMapTable:
    """The RMP, in DRAM pages owned by the secure processor."""

    def __init__(self, mem: HostMemory) -> None:
        self.mem = mem
        n = RMP_BOOKKEEPING + (mem.size // PAGE_SIZE) * ENTRY_SIZE
        self.npages = (n + PAGE_SIZE - 1) // PAGE_SIZE
        self.base = mem.alloc_contiguous(self.npages)
        self.end = self.base + self.npages * PAGE_SIZE - 1
        self._view = mem.view
        for p in range(self.base, self.base + self.npages * PAGE_SIZE, PAGE_SIZE):
            self._set(p, RmpEntry(assigned=True, asid=0, immutable=True))

    def _addr(self, hpa: int) -> int:
        return self.base + RMP_BOOKKEEPING + (hpa // PAGE_SIZE) * ENTRY_SIZE

    def entry(self, hpa: int) -> RmpEntry:
        return RmpEntry.decode(struct.unpack_from("<Q", self._view, self._addr(hpa))[0])

    def _set(self, hpa: int, e: RmpEntry) -> None:
        struct.pack_into("<QQ", self._view, self._addr(hpa), e.encode(), 0)

    # ----------------------------------------------------------- firmware
    def firmware_assign(self, hpa: int, asid: int, gpa: int, validated: bool, vmsa: bool = False) -> None:
        self._set(hpa, RmpEntry(assigned=True, asid=asid, gpa=gpa, validated=validated, vmsa=vmsa))

    def firmware_move(self, src: int, dst: int) -> None:
        e = self.entry(src)
        self._set(dst, e)
        self._set(src, RmpEntry())

    # --------------------------------------------------------- hypervisor
    def rmpupdate(self, hpa: int, *, assigned: bool, asid: int = 0, gpa: int = 0) -> None:
        """RMPUPDATE: the hypervisor (re)assigns a page.  VALIDATED is always cleared."""
        if hpa & 0xFFF or not 0 <= hpa < self.mem.size:
            raise RmpError(f"FAIL_INPUT: {hpa:#x} is not a page address in DRAM")
        cur = self.entry(hpa)
        if cur.immutable:
            raise RmpError(f"FAIL_PERMISSION: page {hpa:#x} is immutable (owned by the secure processor)")
        if assigned and not asid:
            raise RmpError("FAIL_INPUT: a guest-assigned page needs a non-zero ASID")
        self._set(hpa, RmpEntry(assigned=assigned, asid=asid if assigned else 0, gpa=gpa if assigned else 0))

    def check_host_write(self, hpa: int, n: int) -> None:
        for p in range(hpa & ~0xFFF, hpa + max(n, 1), PAGE_SIZE):
            if p >= self.mem.size:
                return
            e = self.entry(p)
            if e.assigned:
                owner = "the secure processor" if e.immutable else f"ASID {e.asid}"
                raise RmpViolation(f"RMP violation: host write to page {p:#x}, which is owned by {owner}")

    # --------------------------------------------------------------- guest
    def check_guest(self, hpa: int, gpa: int, access: int, private: bool, asid: int, final: bool) -> None:
        """Raise NestedFault (RMP) or #VC(PAGE_NOT_VALIDATED) for a refused access."""
        e = self.entry(hpa & ~0xFFF)
        page_gpa = gpa & ~0xFFF
        ok = (e.assigned and not e.immutable and e.asid == asid and e.gpa == page_gpa) if private \
            else not e.assigned
        if not ok:
            bits = PFErr.P | PFErr.U | (PFErr.W if access == Access.WRITE else 0) | \
                (PFErr.ID if access == Access.FETCH else 0)
            bits |= PFErr.FINAL if final else PFErr.PT_WALK
            raise NestedFault(int(bits) | NPF_RMP | (NPF_ENC if private else 0), gpa)
        if private and not e.validated:
            raise GuestException(VEC_VC, VC_PAGE_NOT_VALIDATED)

    def pvalidate(self, hpa: int, gpa: int, asid: int, validate: bool) -> tuple[int, bool]:
        """PVALIDATE of one 4 KiB page: (RAX status, CF)."""
        e = self.entry(hpa)
        if not e.assigned or e.immutable or e.asid != asid or e.gpa != gpa & ~0xFFF:
            raise NestedFault(int(PFErr.P | PFErr.U | PFErr.FINAL) | NPF_RMP, gpa)
        if e.validated == validate:
            return 0, True
        self._set(hpa, RmpEntry(True, asid, e.gpa, validate, False, e.vmsa))
        return 0, False


def emulate_pvalidate(cpu: "SvmCpu", mc: "MemoryController", rip: int) -> bool:
    """Called from the processor's invalid-opcode path: executes PVALIDATE for
    an SNP-active guest.  False when the bytes at RIP are not PVALIDATE."""
    if cpu.insn_bytes(rip)[:4] != PVALIDATE:
        return False
    st = cpu.st
    gva, size, validate = (st.reg_read(X.UC_X86_REG_RAX), st.reg_read(X.UC_X86_REG_RCX) & 0xFFFFFFFF,
                           bool(st.reg_read(X.UC_X86_REG_RDX) & 1))
    rflags = st.reg_read(X.UC_X86_REG_RFLAGS) & ~1
    if size != 0 or gva & 0xFFF:
        status, cf = (PVALIDATE_FAIL_SIZEMISMATCH if size else PVALIDATE_FAIL_INPUT), False
    else:
        try:
            w = cpu.walker()
            g = w.guest.translate(gva, Access.READ, False, set_ad=False)
            gpa = g.phys & ~mc.cbit_mask
            n = w.nested.translate(gpa, Access.READ, final=True, set_ad=False)
            status, cf = mc.rmp.pvalidate(n.phys & ~0xFFF, gpa, mc.asid, validate)
        except GuestPageFault as f:
            cpu.raise_exception(Vec.PF, f.error_code, rip, cr2=f.address)
            return True
        except GuestGP:
            cpu.raise_exception(Vec.GP, 0, rip)
            return True
        except NestedFault as f:
            cpu.take_vmexit(ExitCode.NPF, f.exitinfo1, f.gpa, rip=rip, nrip=0)
            return True
        mc.stale = True            # translations of that page must recheck the RMP
    st.reg_write(X.UC_X86_REG_RAX, status)
    st.reg_write(X.UC_X86_REG_RFLAGS, rflags | (1 if cf else 0))
    st.reg_write(X.UC_X86_REG_RIP, rip + len(PVALIDATE))
    return True
