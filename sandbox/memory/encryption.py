"""The last step of the 2-D walk for an SEV guest (APM vol. 2 §15.34.5-8).

The guest's C-bit is taken out of the guest-physical address before the
nested walk and decides, with the access type, whether the access is
private: instruction fetches and guest page-table accesses are always
private; data accesses are private when the guest's page-table entry has
the C-bit (or the guest runs without paging).  A private access reaches the
page through the memory controller's plaintext cache; a shared one reaches
DRAM directly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .mmu import NestedFault, Translation
from .paging import Access, WalkResult

if TYPE_CHECKING:
    from .mmu import TwoDimWalker

#: VMEXIT_NPF EXITINFO1 bit 34: the faulting access was encrypted (APM §15.36.10)
NPF_ENC = 1 << 34


def sev_final(w: "TwoDimWalker", gva: int, g: WalkResult, access: int, set_ad: bool) -> Translation:
    enc = w.guest.enc
    private = bool(g.phys & enc.cbit_mask) or access == Access.FETCH or not w.guest.paging
    gpa = g.phys & ~enc.cbit_mask
    try:
        n = w.nested.translate(gpa, access, final=True, set_ad=set_ad)
    except NestedFault as f:
        if private:
            f.exitinfo1 |= NPF_ENC
        raise
    writable = g.writable and n.writable
    if enc.snp:
        enc.rmp.check_guest(n.phys, gpa, access, private, enc.asid, True)
    hpa = enc.cpu_paddr(n.phys, private, writable)
    w.stats.data_refs += 1
    return Translation(gva=gva, gpa=gpa, hpa=hpa, writable=writable, executable=g.executable and n.executable,
                       dirty=g.dirty and n.dirty, user=g.user, global_=g.global_ and w.guest.pge,
                       private=private, dram=n.phys)
