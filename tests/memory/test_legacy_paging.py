"""Legacy-mode walks: 32-bit paging and PAE paging (APM vol. 2 §5.2-5.3).

Entry formats from the APM's figures: 32-bit PDE/PTE (4-byte, Figures 5-6 to 5-9, PSE-36 puts
PA bits 39:32 of a 4 MiB page in PDE bits 20:13, bit 21 reserved), PAE PDPTE (bits 63:52,
51:MAXPHYADDR, 8:5 and 2:1 MBZ), PAE PDE/PTE (bits 62:MAXPHYADDR MBZ in legacy mode, NX
reserved without EFER.NXE; a 2 MiB PDE has bits 20:13 MBZ).  #PF error-code bits: §8.4.2.
"""
from __future__ import annotations

import pytest

from sandbox.memory.legacy_paging import walk_legacy
from sandbox.memory.paging import PTE, Access

P, RW, US, RSV, ID = 1, 2, 4, 8, 0x10
PS, A, D, NX = int(PTE.PS), int(PTE.A), int(PTE.D), 1 << 63


class Mem(dict):
    def read(self, a):
        return self.get(a, 0)

    def write(self, a, v):
        self[a] = v


CR3, PD, PT = 0x1000, 0x2000, 0x3000
VA = (2 << 30) | (0x1B3 << 21) | (0x0C4 << 12) | 0xABC       # PAE: PDPTE 2, PDE 0x1B3, PTE 0xC4
FRAME = 0x0000_00AB_CDEF_0000


def pae(leaf=P | RW | US, pde=P | RW | US, pdpte=P):
    m = Mem()
    m.write(CR3 + 2 * 8, PD | pdpte)
    m.write(PD + 0x1B3 * 8, PT | pde)
    m.write(PT + 0xC4 * 8, FRAME | leaf)
    return m


def do_pae(m, va=VA, access=Access.READ, user=False, **kw):
    return walk_legacy(CR3, va, access, user, m.read, m.write, pae=True, **kw)


def test_pae_translates_through_three_levels():
    r = do_pae(pae(), nxe=True)
    assert r.fault is None and r.phys == FRAME | 0xABC and r.entries == 3 and r.page_size == 4096


def test_pae_pdpt_base_is_cr3_bits_31_5():
    m = Mem()
    m.write(0x1020 + 2 * 8, PD | P)
    m.write(PD + 0x1B3 * 8, PT | P | RW)
    m.write(PT + 0xC4 * 8, FRAME | P | RW)
    assert walk_legacy(0x1020 | 0x1F, VA, Access.READ, False, m.read, m.write, pae=True).phys == FRAME | 0xABC


@pytest.mark.parametrize("bit", list(range(52, 64)) + [48, 51, 5, 6, 7, 8, 1, 2])
def test_pae_pdpte_reserved_bits(bit):
    """kvm-unit-tests svm_pae_test: bits 62:52 of PDPTE0 make the first fetch a #PF."""
    m = pae()
    m.write(CR3 + 2 * 8, m.read(CR3 + 2 * 8) | (1 << bit))
    assert do_pae(m, access=Access.FETCH, nxe=True).fault == P | RSV | ID


@pytest.mark.parametrize("bit", [9, 10, 11])
def test_pae_pdpte_ignored_bits(bit):
    m = pae(pdpte=P | (1 << bit))
    assert do_pae(m).fault is None


def test_pae_pdpte_not_present_and_no_accessed_bit():
    m = pae()
    m.write(CR3 + 2 * 8, PD)
    assert do_pae(m, access=Access.WRITE).fault == RW
    m = pae()
    do_pae(m)
    assert m.read(CR3 + 2 * 8) == PD | P                      # a PDPTE has no A bit
    assert m.read(PD + 0x1B3 * 8) & A and m.read(PT + 0xC4 * 8) & A


@pytest.mark.parametrize("bit", [52, 62])
def test_pae_pte_bits_62_52_are_reserved_in_legacy_mode(bit):
    m = pae(leaf=P | RW | (1 << bit))
    assert do_pae(m).fault == P | RSV


def test_pae_nx():
    m = pae(leaf=P | RW | US | NX)
    assert do_pae(m, access=Access.FETCH, nxe=True).fault == P | ID
    assert do_pae(m, access=Access.READ, nxe=False).fault == P | RSV


def test_pae_2m_page():
    m = pae()
    m.write(PD + 0x1B3 * 8, 0x1240_0000 | P | RW | PS)
    r = do_pae(m)
    assert r.fault is None and r.page_size == 2 << 20 and r.phys == 0x1240_0000 | (VA & 0x1F_FFFF)
    m.write(PD + 0x1B3 * 8, 0x1240_0000 | (1 << 13) | P | RW | PS)
    assert do_pae(m).fault == P | RSV


def test_pae_write_sets_dirty_on_the_leaf_only():
    m = pae()
    do_pae(m, access=Access.WRITE)
    assert m.read(PT + 0xC4 * 8) & D and not m.read(PD + 0x1B3 * 8) & D


# ------------------------------------------------------------------- 32-bit paging
VA32 = (0x2C5 << 22) | (0x0C4 << 12) | 0xABC


def two_level(leaf=P | RW | US, pde=P | RW | US):
    m = Mem()
    m.write(CR3 + 0x2C5 * 4, PT | pde)
    m.write(PT + 0xC4 * 4, 0x00AB_C000 | leaf)
    return m


def do_32(m, va=VA32, access=Access.READ, user=False, **kw):
    return walk_legacy(CR3, va, access, user, m.read, m.write, pae=False, **kw)


def test_32bit_translates_through_two_levels():
    r = do_32(two_level())
    assert r.fault is None and r.phys == 0x00AB_CABC and r.entries == 2


def test_32bit_4m_page_needs_cr4_pse_and_takes_pse36_bits():
    m = Mem()
    m.write(CR3 + 0x2C5 * 4, 0x1240_0000 | (0x3 << 13) | P | RW | PS)     # PA bits 39:32 = 3
    r = do_32(m, pse=True)
    assert r.fault is None and r.page_size == 4 << 20
    assert r.phys == (3 << 32) | 0x1240_0000 | (VA32 & 0x3F_FFFF)
    m.write(CR3 + 0x2C5 * 4, 0x1240_0000 | (1 << 21) | P | RW | PS)
    assert do_32(m, pse=True).fault == P | RSV


def test_32bit_without_pse_ps_is_ignored():
    m = two_level(pde=P | RW | US | PS)
    assert do_32(m, pse=False).phys == 0x00AB_CABC


def test_32bit_user_and_write_protection():
    m = two_level(leaf=P | US)
    assert do_32(m, access=Access.WRITE, user=True).fault == P | RW | US
    assert do_32(m, access=Access.WRITE, wp=False).fault is None
    m = two_level(leaf=P | RW)
    assert do_32(m, user=True).fault == P | US


def test_32bit_fetch_id_only_with_smep():
    """32-bit paging has no NX: a fetch fault reports I/D only with CR4.SMEP (§8.4.2)."""
    m = two_level()
    m.write(PT + 0xC4 * 4, 0)
    assert do_32(m, access=Access.FETCH, nxe=True).fault == 0
    assert do_32(m, access=Access.FETCH, smep=True).fault == ID
