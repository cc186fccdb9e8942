"""MOV to CR0 that clears PG: how long mode is left (APM vol. 2 §14.7, "Leaving Long Mode").

Software leaves long mode by clearing CR0.PG while in compatibility mode (EFER.LMA = 1,
CS.L = 0); the same write in 64-bit mode is #GP(0).  kvm-unit-tests' svm ``mode_switch``
does it in L2 (32-bit compatibility code segment, then real mode and back).
"""
from sandbox.svm.decision import mov_to_cr_faults

CR0_LONG = 0x8001_0033      # PG PE MP ET NE WP


def test_clearing_pg_in_compatibility_mode_is_legal():
    assert not mov_to_cr_faults(0, CR0_LONG & ~(1 << 31), CR0_LONG, long_mode=True, cs64=False)


def test_clearing_pg_in_64_bit_mode_is_gp():
    assert mov_to_cr_faults(0, CR0_LONG & ~(1 << 31), CR0_LONG, long_mode=True, cs64=True)


def test_pg_without_pe_is_gp_in_either_mode():
    for cs64 in (False, True):
        assert mov_to_cr_faults(0, CR0_LONG & ~1, CR0_LONG, long_mode=True, cs64=cs64)
