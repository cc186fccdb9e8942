"""The memory controller's AES engine and the processor's plaintext cache (SEV).

On SEV hardware an AES engine in the memory controller encrypts every cache
line written to DRAM with the key of the guest's ASID and decrypts it on the
way back, with a tweak derived from the host-physical address so that equal
plaintext at two addresses gives unrelated ciphertext (APM vol. 2 §15.34.2;
AMD Memory Encryption whitepaper).  Keys are held by the secure processor
(:mod:`sandbox.sev.firmware`); nothing here returns one.

Cipher construction (this model's; AMD does not publish the exact tweak):
AES-128 in XEX form with a tweak per 16-byte block derived from that
block's host-physical address, the construction described for Zen 2 and
later parts.  The guest key is a pair (K1, K2) of independent AES-128 keys;
for the block at HPA ``a`` (16-byte aligned)::

    T(a) = AES_K2(le128(a))
    C    = AES_K1(P xor T(a)) xor T(a)
    P    = AES_K1^-1(C xor T(a)) xor T(a)

so equal plaintext at two addresses gives unrelated ciphertext, and a
ciphertext block moved to another address decrypts to garbage.  The tweaks
of a page (256 blocks) are computed once and cached; the XORs are done on
whole pages with numpy and the AES in ECB mode over every page written back
at once in a single call.

Plaintext while the guest runs: the host buffer's upper half
(``HostMemory.cache_base``) models the processor's caches.  A private page
(C-bit set in the guest's page table, or any instruction fetch or guest
page-table access) is decrypted there on first touch and the guest's TLB
entry points at that alias; shared pages map straight to DRAM, so DRAM
never holds a private page's plaintext.  The cache is write-back: a page the
guest changed is encrypted back into DRAM when the hypervisor first reads or
writes it through ``HostMemory`` (:meth:`MemoryController.host_access`, so
whatever the hypervisor sees of DRAM is current ciphertext), when another
key takes over, and when the run stops (:meth:`MemoryController.flush_dirty`)
-- not at every #VMEXIT, so exits whose handlers never look at guest memory
pay no AES.  A hypervisor write into DRAM drops the cached plaintext of that
page: the guest then decrypts whatever the hypervisor wrote.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..memory.hostmem import PAGE_SIZE, HostMemory
from .rmp import ReverseMapTable

if TYPE_CHECKING:
    from ..svm.cpu import SvmCpu
    from .vmsa import SevEsState

PAGE_MASK = ~(PAGE_SIZE - 1)


class XexEngine:
    """One guest key's AES-128-XEX engine (see the module docstring)."""

    __slots__ = ("_enc", "_dec", "_tweak_enc", "_tweaks", "_batch_tweaks")

    #: block offsets inside a page, as the low qword of each 128-bit address
    _OFFS = np.arange(0, PAGE_SIZE, 16, dtype="<u8")
    _TWEAK_CACHE = 8192

    def __init__(self, key_pair: bytes) -> None:
        if len(key_pair) != 32:
            raise ValueError("an XEX-AES-128 key is two 16-byte keys")
        k1 = Cipher(algorithms.AES(key_pair[:16]), modes.ECB())
        self._enc, self._dec = k1.encryptor(), k1.decryptor()
        self._tweak_enc = Cipher(algorithms.AES(key_pair[16:]), modes.ECB()).encryptor()
        self._tweaks: dict[int, np.ndarray] = {}
        self._batch_tweaks: dict[tuple[int, ...], np.ndarray] = {}   # the same pages at every exit

    def _tweak(self, page: int) -> np.ndarray:
        t = self._tweaks.get(page)
        if t is None:
            addr = np.zeros((PAGE_SIZE // 16, 2), dtype="<u8")
            addr[:, 0] = self._OFFS + np.uint64(page)
            t = np.frombuffer(self._tweak_enc.update(addr.tobytes()), dtype="<u8")
            if len(self._tweaks) >= self._TWEAK_CACHE:
                self._tweaks.clear()
            self._tweaks[page] = t
        return t

    def encrypt_pages(self, pages: list[tuple[int, bytes]]) -> bytes:
        """Encrypt several (HPA, plaintext page) pairs in one AES call; the
        result is the ciphertext pages concatenated in the same order."""
        if len(pages) == 1:
            hpa, pt = pages[0]
            t = self._tweak(hpa & PAGE_MASK)
            x = np.frombuffer(pt, dtype="<u8") ^ t
            return (np.frombuffer(self._enc.update(x.tobytes()), dtype="<u8") ^ t).tobytes()
        key = tuple(h for h, _ in pages)
        t = self._batch_tweaks.get(key)
        if t is None:
            t = np.concatenate([self._tweak(h & PAGE_MASK) for h in key])
            if len(self._batch_tweaks) >= 64:
                self._batch_tweaks.clear()
            self._batch_tweaks[key] = t
        x = np.frombuffer(b"".join(p for _, p in pages), dtype="<u8") ^ t
        return (np.frombuffer(self._enc.update(x.tobytes()), dtype="<u8") ^ t).tobytes()

    def encrypt_page(self, hpa: int, plaintext: bytes) -> bytes:
        return self.encrypt_pages([(hpa, plaintext)])

    def decrypt_page(self, hpa: int, ciphertext: bytes) -> bytes:
        t = self._tweak(hpa & PAGE_MASK)
        x = np.frombuffer(ciphertext, dtype="<u8") ^ t
        return (np.frombuffer(self._dec.update(x.tobytes()), dtype="<u8") ^ t).tobytes()


@dataclass
class MemCtlStats:
    decrypts: int = 0          # pages decrypted into the cache
    encrypts: int = 0          # pages written back encrypted
    flushes: int = 0           # flush_dirty calls (one per run stop)
    invalidations: int = 0     # cached pages dropped because the hypervisor wrote DRAM


class MemoryController:
    """Encrypts guest-private pages between the processor and DRAM.

    The processor calls :meth:`cpu_paddr` from its TLB fill (via the 2-D
    walker), :meth:`host_access` from the host-memory sync hook (which
    writes a changed page back, encrypted, before the hypervisor sees DRAM),
    :meth:`before_vmrun` at VMRUN and :meth:`flush_dirty` when the run
    stops.  DRAM never holds a private page's plaintext: that lives in the
    processor's cache (``mem.cache_base``), as on hardware.
    """

    def __init__(self, mem: HostMemory, engine_for: Callable[[int], XexEngine | None], cbit: int) -> None:
        self.mem = mem
        self._engine_for = engine_for
        #: the C-bit as a mask in guest page-table entries
        self.cbit_mask = 1 << cbit
        self._cb = mem.cache_base
        self._view = mem.view
        self.active = False
        self.asid = 0
        self._engine: XexEngine | None = None
        self._clean: dict[int, bytes] = {}     # cached page -> plaintext as last written to DRAM
        self._writable: set[int] = set()       # cached pages the guest may have written since
        self.stale = False                     # cached plaintext dropped: TLB/TBs need flushing
        self.stats = MemCtlStats()
        #: SEV-SNP: the reverse-map table, and whether the running guest is SNP-active
        self.rmp: ReverseMapTable | None = None
        self.snp = False
        #: SEV-ES: the guest's VMSA and GHCB MSR when it runs with SEV-ES
        self.es: SevEsState | None = None

    # ---------------------------------------------------------------- VMRUN
    def vmrun_check(self, asid: int, sev_enabled: bool, np_enabled: bool, es_enabled: bool = False) -> str:
        """VMRUN's SEV checks (APM §15.5.1); '' when legal.  Selects the key."""
        if not sev_enabled:
            if es_enabled:
                return "SEV-ES enable set without SEV enable"
            if self.active:
                self._drop_all()
            self.active = False
            return ""
        if not np_enabled:
            return "SEV is enabled without nested paging"
        if es_enabled and self.es is None:
            return "SEV-ES is enabled but the guest has no VMSA"
        if es_enabled and self.es.invalid:
            return self.es.invalid
        engine = self._engine_for(asid)
        if engine is None:
            return f"SEV is enabled but ASID {asid} has no launched SEV guest (no key)"
        if asid != self.asid or not self.active:
            self._drop_all()
        self.asid, self._engine, self.active = asid, engine, True
        return ""

    def before_vmrun(self, cpu: "SvmCpu") -> None:
        """The hypervisor replaced cached pages: the guest's TLB entries and
        translated blocks for their plaintext are stale."""
        if self.es is not None:
            self.es.on_vmrun(cpu)
        if self.stale:
            self.stale = False
            cpu.tlb.flush_asid(self.asid)       # an ASID-tagged TLB holds plaintext-cache addresses too
            cpu.flush_tlb()
            cpu.uc.ctl_flush_tb()

    # ----------------------------------------------------------- guest side
    def cpu_paddr(self, hpa: int, private: bool, writable: bool) -> int:
        """Where the processor accesses host page ``hpa`` for the guest."""
        page = hpa & PAGE_MASK
        if not private:
            if page in self._writable:
                self._write_back(page)      # C=0 after C=1: the private lines are written back first
            return hpa
        if page not in self._clean:
            self._fill(page)
        if writable:
            self._writable.add(page)
        return self._cb + hpa

    def check_access(self, hpa: int, gpa: int, access: int, private: bool) -> None:
        """SEV-SNP: the RMP check of a guest access (raises the NPF or #VC it takes)."""
        if self.snp:
            self.rmp.check_guest(hpa, gpa, access, private, self.asid, True)

    def pt_paddr(self, hpa: int, gpa: int) -> int:
        """A guest page-table access: always private (APM §15.34.6)."""
        if self.snp:
            self.rmp.check_guest(hpa, gpa, 1, True, self.asid, False)
        return self.cpu_paddr(hpa, True, True)

    def _fill(self, page: int) -> None:
        pt = self._engine.decrypt_page(page, self._view[page:page + PAGE_SIZE].tobytes())
        self._view[self._cb + page:self._cb + page + PAGE_SIZE] = pt
        self._clean[page] = pt
        self.stats.decrypts += 1

    def _write_back(self, page: int) -> bool:
        a = self._cb + page
        cur = self._view[a:a + PAGE_SIZE].tobytes()
        if cur == self._clean[page]:
            return False
        self._view[page:page + PAGE_SIZE] = self._engine.encrypt_page(page, cur)
        self._clean[page] = cur
        self.stats.encrypts += 1
        return True

    def flush_dirty(self) -> None:
        """Encrypt every page the guest changed back into DRAM (one AES call): at the end of a run."""
        self.stats.flushes += 1
        view, cb, clean = self._view, self._cb, self._clean
        changed = []
        for page in self._writable:
            cur = view[cb + page:cb + page + PAGE_SIZE].tobytes()
            if cur != clean[page]:
                changed.append((page, cur))
        if not changed:
            return
        ct = memoryview(self._engine.encrypt_pages(changed))
        o = 0
        for page, cur in changed:
            view[page:page + PAGE_SIZE] = ct[o:o + PAGE_SIZE]
            clean[page] = cur
            o += PAGE_SIZE
        self.stats.encrypts += len(changed)

    # ------------------------------------------------------ hypervisor side
    def host_access(self, hpa: int, n: int, write: bool) -> None:
        """A hypervisor access through HostMemory: DRAM must be current, and
        a write makes the cached plaintext of the pages it touches stale.
        With an RMP, writes to pages the hypervisor does not own are refused."""
        if write and self.rmp is not None:
            self.rmp.check_host_write(hpa, n)
        first, last = hpa & PAGE_MASK, (hpa + max(n, 1) - 1) & PAGE_MASK
        if first == last:
            if first not in self._clean:
                return
            pages = (first,)
        else:
            pages = [p for p in range(first, last + 1, PAGE_SIZE) if p in self._clean]
        for p in pages:
            if p in self._writable:
                self._write_back(p)
            if write:
                del self._clean[p]
                self._writable.discard(p)
                self.stale = True
                self.stats.invalidations += 1

    def invalidate(self, page: int) -> None:
        """The secure processor rewrote ``page`` in DRAM (firmware page move)."""
        if self._clean.pop(page, None) is not None:
            self._writable.discard(page)
            self.stale = True

    def _drop_all(self) -> None:
        if self._engine is not None:
            for p in self._writable:
                self._write_back(p)
        if self._clean:
            self.stale = True
        self._clean.clear()
        self._writable.clear()

    def cached_pages(self) -> list[int]:
        return sorted(self._clean)
