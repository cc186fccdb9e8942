"""Memory encryption as a layer of the translation stack (APM vol. 2 §15.34.5-8).

The stack is guest tables (:class:`~sandbox.memory.mmu.GuestLayer`) over the
nested tables (:class:`~sandbox.memory.mmu.NestedLayer`); with SEV active,
:class:`EncryptionLayer` sits on top and makes the last step of every walk.
The guest's C-bit is taken out of the guest-physical address before the
nested walk and decides, with the access type, whether the access is
private: instruction fetches and guest page-table accesses are always
private; data accesses are private when the guest's page-table entry has
the C-bit (or the guest runs without paging).  A private access reaches the
page through the memory controller's plaintext cache; a shared one reaches
DRAM directly.

What encrypts is not here: :class:`MemoryEncryption` is the interface the
memory controller (:mod:`sandbox.sev.memctl`) provides.
"""
from __future__ import annotations

from typing import Protocol

from .mmu import GuestLayer, NestedFault, NestedLayer, Translation, WalkStats
from .paging import Access, PFErr, WalkResult

#: VMEXIT_NPF EXITINFO1 bit 34: the faulting access was encrypted (APM §15.36.10)
NPF_ENC = int(PFErr.ENC)


class MemoryEncryption(Protocol):
    """What the walk needs from a memory controller that encrypts guest pages."""

    #: the C-bit as a mask in guest page-table entries and guest-physical addresses
    cbit_mask: int

    def cpu_paddr(self, hpa: int, private: bool, writable: bool) -> int:
        """Where the processor accesses host page ``hpa`` for the guest."""

    def pt_paddr(self, hpa: int, gpa: int) -> int:
        """Where a guest page-table entry at ``hpa`` (guest-physical ``gpa``) is read."""

    def check_access(self, hpa: int, gpa: int, access: int, private: bool) -> None:
        """Raise the fault an access to ``hpa`` must take (SEV-SNP's RMP check); else nothing."""


class EncryptionLayer:
    """The final step of the 2-D walk for an encrypted guest."""

    def __init__(self, enc: MemoryEncryption, guest: GuestLayer, nested: NestedLayer, stats: WalkStats) -> None:
        self.enc, self.guest, self.nested, self.stats = enc, guest, nested, stats

    def final(self, gva: int, g: WalkResult, access: int, set_ad: bool) -> Translation:
        """GPA (with the guest's C-bit) -> the address the processor uses."""
        enc = self.enc
        private = bool(g.phys & enc.cbit_mask) or access == Access.FETCH or not self.guest.paging
        gpa = g.phys & ~enc.cbit_mask
        try:
            n = self.nested.translate(gpa, access, final=True, set_ad=set_ad)
        except NestedFault as f:
            if private:
                f.exitinfo1 |= NPF_ENC
            raise
        writable = g.writable and n.writable
        enc.check_access(n.phys, gpa, access, private)
        hpa = enc.cpu_paddr(n.phys, private, writable)
        self.stats.data_refs += 1
        return Translation(gva=gva, gpa=gpa, hpa=hpa, writable=writable,
                           executable=g.executable and n.executable, dirty=g.dirty and n.dirty, user=g.user,
                           global_=g.global_ and self.guest.pge, private=private, dram=n.phys)
