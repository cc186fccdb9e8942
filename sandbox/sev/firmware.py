"""SEV: the secure processor (AMD-SP) and the launch flow of an encrypted guest.

The :class:`SecureProcessor` generates and holds one memory-encryption key
per guest ASID (APM vol. 2 §15.34.2: "the ASID indexes the key") and runs
the firmware commands the hypervisor uses to launch a guest, modelled on the
SEV firmware API (AMD pub. 55766): LAUNCH_START, LAUNCH_UPDATE_DATA,
LAUNCH_UPDATE_VMSA (SEV-ES), LAUNCH_MEASURE, LAUNCH_FINISH, DECOMMISSION, and
a firmware page move for migrating a private page (SNP's PAGE_MOVE; a raw copy
by the hypervisor decrypts to garbage at the new address).

No method a hypervisor calls returns a key.  The only accessor,
:meth:`SecureProcessor._testing_key`, exists so that tests can check the
ciphertext against an independent AES implementation.

Measurement (SEV API §6.5 LAUNCH_MEASURE)::

    MEASURE = HMAC-SHA256(TIK, 0x04 || API_MAJOR || API_MINOR || BUILD
                               || POLICY (u32 LE) || LD || MNONCE)

where LD (the launch digest) is SHA-256 over the plaintext of every
LAUNCH_UPDATE_DATA (and, for SEV-ES, LAUNCH_UPDATE_VMSA) region, in order,
and TIK is a key shared only by the secure processor and the guest owner:
both derive it from an X25519 exchange between the platform's PDH key and
the owner's session key (HKDF-SHA256 over the shared secret, salted with the
owner's session nonce).  The hypervisor relays public keys and cannot
compute it.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from enum import Enum, IntFlag
from typing import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..memory.hostmem import PAGE_SIZE, HostMemory
from .memctl import MemoryController, XexEngine
from .rmp import ReverseMapTable

# ----------------------------------------------------------- capabilities
#: C-bit position in guest page-table entries (CPUID Fn8000_001F EBX[5:0]).
#: 47 is what EPYC (Zen 2/3) parts report.
C_BIT = 47
#: physical-address-bit reduction when memory encryption is on (EBX[11:6]);
#: EPYC reports 5 (MAXPHYADDR 48 -> 43 usable).
PHYS_ADDR_REDUCTION = 5
NUM_VMPLS = 4
#: number of encrypted guests supported at once = the largest SEV ASID (ECX)
MAX_SEV_ASID = 15
#: minimum ASID of a plain SEV guest (EDX); ASIDs 1..MIN_SEV_ASID-1 must enable SEV-ES
MIN_SEV_ASID = 5
C_BIT_MASK = 1 << C_BIT


class Fn8000_001F_EAX(IntFlag):
    """CPUID Fn8000_001F EAX (APM vol. 3 appendix E; vol. 2 §15.34.1)."""
    SME = 1 << 0
    SEV = 1 << 1
    PAGE_FLUSH_MSR = 1 << 2
    SEV_ES = 1 << 3
    SEV_SNP = 1 << 4
    VMPL = 1 << 5


def cpuid_8000_001f() -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX of CPUID Fn8000_001F for this platform."""
    eax = Fn8000_001F_EAX.SME | Fn8000_001F_EAX.SEV | Fn8000_001F_EAX.SEV_ES | Fn8000_001F_EAX.SEV_SNP \
        | Fn8000_001F_EAX.VMPL
    ebx = C_BIT | (PHYS_ADDR_REDUCTION << 6) | (NUM_VMPLS << 12)
    return int(eax), ebx, MAX_SEV_ASID, MIN_SEV_ASID


# VMCB 090h (APM Table B-1)
NP_CONTROL_SEV_ENABLE = 1 << 1
NP_CONTROL_SEV_ES_ENABLE = 1 << 2
MSR_SEV_STATUS = 0xC001_0131          # bit 0 SEV, 1 SEV-ES, 2 SNP
MSR_GHCB = 0xC001_0130


class SevError(Exception):
    """A firmware command failed; ``status`` is the SEV API status name."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status


class GuestState(Enum):
    """Guest states of the SEV firmware API (SEV API §5.1)."""
    LUPDATE = "LUPDATE"          # after LAUNCH_START, accepting LAUNCH_UPDATE_*
    LSECRET = "LSECRET"          # measured; LAUNCH_UPDATE_DATA no longer allowed
    RUNNING = "RUNNING"          # LAUNCH_FINISH done


class Policy(IntFlag):
    """Guest policy bits (SEV API §3): only the ones the model honours."""
    NODBG = 1 << 0
    NOKS = 1 << 1
    ES = 1 << 2


API_MAJOR, API_MINOR, BUILD = 1, 55, 21


@dataclass
class Measurement:
    measure: bytes          # 32-byte HMAC
    mnonce: bytes           # 16-byte nonce chosen by the firmware


@dataclass
class _GuestContext:
    handle: int
    asid: int
    policy: int
    state: GuestState
    tik: bytes
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    launched_pages: int = 0


def _derive_tik(shared: bytes, nonce: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=nonce, info=b"SEV launch TIK").derive(shared)


def measurement_message(policy: int, launch_digest: bytes, mnonce: bytes) -> bytes:
    """The bytes LAUNCH_MEASURE authenticates (SEV API §6.5)."""
    return bytes([0x04, API_MAJOR, API_MINOR, BUILD]) + struct.pack("<I", policy) + launch_digest + mnonce


class GuestOwner:
    """The party that owns the guest image and verifies its launch.

    It never talks to the hypervisor except through public values: its
    session (public key + nonce) goes into LAUNCH_START, and it receives the
    measurement from LAUNCH_MEASURE.
    """

    def __init__(self, platform_pdh: bytes) -> None:
        self._key = X25519PrivateKey.generate()
        self.nonce = os.urandom(16)
        shared = self._key.exchange(X25519PublicKey.from_public_bytes(platform_pdh))
        self._tik = _derive_tik(shared, self.nonce)

    def session(self) -> tuple[bytes, bytes]:
        pub = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return pub, self.nonce

    @staticmethod
    def launch_digest(regions: list[bytes]) -> bytes:
        h = hashlib.sha256()
        for r in regions:
            h.update(r)
        return h.digest()

    def verify(self, m: Measurement, policy: int, expected_regions: list[bytes]) -> bool:
        """True when ``m`` proves the firmware launched exactly ``expected_regions``."""
        msg = measurement_message(policy, self.launch_digest(expected_regions), m.mnonce)
        return hmac.compare_digest(hmac.new(self._tik, msg, hashlib.sha256).digest(), m.measure)


class SecureProcessor:
    """The AMD secure processor: keys per ASID and the SEV firmware commands."""

    def __init__(self, mem: HostMemory, max_asid: int = MAX_SEV_ASID, min_sev_asid: int = MIN_SEV_ASID) -> None:
        self.mem = mem
        self.max_asid, self.min_sev_asid = max_asid, min_sev_asid
        self._pdh = X25519PrivateKey.generate()
        self._guests: dict[int, _GuestContext] = {}
        self._by_asid: dict[int, int] = {}           # ASID -> handle
        self._keys: dict[int, bytes] = {}            # ASID -> 32-byte XEX key pair (never returned)
        self._engines: dict[int, XexEngine] = {}
        self._next_handle = 1
        #: optional SNP reverse-map table; firmware writes consult it
        self.rmp: ReverseMapTable | None = None
        #: the memory controller, kept coherent with the firmware's own DRAM writes
        self.memctl: MemoryController | None = None
        #: where LAUNCH_START's memory-encryption keys come from (``n -> n bytes``); a
        #: recording swaps in a seeded source so that a replay encrypts to the same DRAM
        self.key_source: Callable[[int], bytes] = os.urandom

    # ------------------------------------------------------------ platform
    def pdh_public(self) -> bytes:
        """The platform Diffie-Hellman public key (PDH_CERT_EXPORT)."""
        return self._pdh.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def engine_for(self, asid: int) -> XexEngine | None:
        """The memory controller's key slot for ``asid`` (hardware path only: the
        engine encrypts and decrypts, it does not expose its key)."""
        h = self._by_asid.get(asid)
        if h is None or self._guests[h].state is not GuestState.RUNNING:
            return None
        return self._engines[asid]

    def cpuid_8000_001f(self) -> tuple[int, int, int, int]:
        """CPUID Fn8000_001F as this platform reports it (what a hypervisor passes on)."""
        return cpuid_8000_001f()

    def is_es(self, asid: int) -> bool:
        h = self._by_asid.get(asid)
        return h is not None and bool(self._guests[h].policy & Policy.ES)

    def _ctx(self, handle: int, *states: GuestState) -> _GuestContext:
        g = self._guests.get(handle)
        if g is None:
            raise SevError("INVALID_GUEST", f"no guest with handle {handle}")
        if states and g.state not in states:
            raise SevError("INVALID_GUEST_STATE", f"guest {handle} is in state {g.state.value}, "
                           f"the command needs {' or '.join(s.value for s in states)}")
        return g

    def _check_page_range(self, hpa: int, length: int) -> None:
        if hpa & 0xFFF or length <= 0 or length % PAGE_SIZE or hpa + length > self.mem.size:
            raise SevError("INVALID_ADDRESS", f"region {hpa:#x}+{length:#x} is not whole pages inside DRAM")

    # ------------------------------------------------------------ launch
    def launch_start(self, asid: int, policy: int, session: tuple[bytes, bytes]) -> int:
        """LAUNCH_START (+ ACTIVATE): new guest context bound to ``asid`` with a fresh key."""
        if not 1 <= asid <= self.max_asid:
            raise SevError("INVALID_ASID", f"ASID {asid} is outside 1..{self.max_asid}")
        if asid in self._by_asid:
            raise SevError("ASID_OWNED", f"ASID {asid} already belongs to guest {self._by_asid[asid]}; "
                           "DECOMMISSION it first")
        es = bool(policy & Policy.ES)
        if es and asid >= self.min_sev_asid:
            raise SevError("INVALID_ASID", f"an SEV-ES guest needs an ASID below {self.min_sev_asid}")
        if not es and asid < self.min_sev_asid:
            raise SevError("INVALID_ASID", f"ASIDs below {self.min_sev_asid} are for SEV-ES guests only")
        owner_pub, nonce = session
        try:
            shared = self._pdh.exchange(X25519PublicKey.from_public_bytes(owner_pub))
        except ValueError as e:
            raise SevError("INVALID_CERTIFICATE", f"bad owner session key: {e}") from None
        handle = self._next_handle
        self._next_handle += 1
        self._guests[handle] = _GuestContext(handle, asid, int(policy), GuestState.LUPDATE,
                                             _derive_tik(shared, nonce))
        self._by_asid[asid] = handle
        key = self.key_source(32)
        while key[:16] == key[16:]:
            key = self.key_source(32)
        self._keys[asid] = key
        self._engines[asid] = XexEngine(key)
        return handle

    def launch_update_data(self, handle: int, hpa: int, length: int, gpa: int | None = None) -> None:
        """LAUNCH_UPDATE_DATA: measure the plaintext and encrypt it in place.
        With SNP (SNP_LAUNCH_UPDATE) the pages are assigned to the guest at ``gpa``
        in the RMP and marked validated."""
        g = self._ctx(handle, GuestState.LUPDATE)
        self._check_page_range(hpa, length)
        if self.rmp is not None and gpa is None:
            raise SevError("INVALID_PARAM", "SNP launch update needs the pages' GPA")
        eng = self._engines[g.asid]
        mv = self.mem.view
        for p in range(hpa, hpa + length, PAGE_SIZE):
            pt = bytes(mv[p:p + PAGE_SIZE])
            g.digest.update(pt)
            mv[p:p + PAGE_SIZE] = eng.encrypt_page(p, pt)
            g.launched_pages += 1
            if self.rmp is not None:
                self.rmp.firmware_assign(p, g.asid, gpa + (p - hpa), validated=True)

    def launch_update_vmsa(self, handle: int, hpa: int) -> None:
        """LAUNCH_UPDATE_VMSA (SEV-ES): measure and encrypt the initial VMSA page."""
        g = self._ctx(handle, GuestState.LUPDATE)
        if not g.policy & Policy.ES:
            raise SevError("POLICY_FAILURE", "LAUNCH_UPDATE_VMSA for a guest without SEV-ES")
        self.launch_update_data(handle, hpa, PAGE_SIZE, gpa=0)
        if self.rmp is not None:
            self.rmp.firmware_assign(hpa, g.asid, 0, validated=True, vmsa=True)

    def launch_measure(self, handle: int) -> Measurement:
        g = self._ctx(handle, GuestState.LUPDATE, GuestState.LSECRET)
        g.state = GuestState.LSECRET
        mnonce = os.urandom(16)
        msg = measurement_message(g.policy, g.digest.copy().digest(), mnonce)
        return Measurement(hmac.new(g.tik, msg, hashlib.sha256).digest(), mnonce)

    def launch_finish(self, handle: int) -> None:
        g = self._ctx(handle, GuestState.LSECRET)
        g.state = GuestState.RUNNING

    def decommission(self, handle: int) -> None:
        g = self._ctx(handle)
        del self._guests[handle]
        self._by_asid.pop(g.asid, None)
        self._keys.pop(g.asid, None)
        self._engines.pop(g.asid, None)

    def state(self, handle: int) -> GuestState:
        return self._ctx(handle).state

    # ------------------------------------------------------------ migration
    def page_move(self, handle: int, src_hpa: int, dst_hpa: int) -> None:
        """Move one private page to another host page (SNP_PAGE_MOVE): the
        firmware decrypts with the source address's tweak and re-encrypts for
        the destination.  The source is zeroed."""
        g = self._ctx(handle, GuestState.RUNNING)
        for a in (src_hpa, dst_hpa):
            self._check_page_range(a, PAGE_SIZE)
        if src_hpa == dst_hpa:
            raise SevError("INVALID_ADDRESS", "source and destination are the same page")
        # the hypervisor's host-memory accesses keep the processor's cache coherent
        self.mem.read(src_hpa, PAGE_SIZE)
        if self.rmp is not None and self.rmp.entry(dst_hpa).assigned:
            raise SevError("INVALID_PAGE_STATE", f"destination {dst_hpa:#x} is not a hypervisor page")
        eng = self._engines[g.asid]
        mv = self.mem.view
        pt = eng.decrypt_page(src_hpa, bytes(mv[src_hpa:src_hpa + PAGE_SIZE]))
        mv[dst_hpa:dst_hpa + PAGE_SIZE] = eng.encrypt_page(dst_hpa, pt)
        mv[src_hpa:src_hpa + PAGE_SIZE] = bytes(PAGE_SIZE)
        if self.memctl is not None:
            self.memctl.invalidate(src_hpa)
            self.memctl.invalidate(dst_hpa)
        if self.rmp is not None:
            self.rmp.firmware_move(src_hpa, dst_hpa)

    # ------------------------------------------------------------ testing
    def _testing_key(self, asid: int) -> bytes:
        """TESTING ONLY: the XEX key pair of ``asid``, so a test can recompute
        ciphertext with an independent AES implementation.  No hypervisor path
        calls this."""
        return self._keys[asid]
