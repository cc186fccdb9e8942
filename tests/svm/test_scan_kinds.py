"""The scanner's per-vector kind set is the union of what each set intercept bit asks for."""
import random

from sandbox.svm import decode as D
from sandbox.svm.decision import ALWAYS, IRQ_WINDOW, kinds_for_bits
from sandbox.svm.exitcodes import ExitCode
from sandbox.svm.scanner import TLB_OBSERVED, kinds_to_scan


def _reference(ivec: tuple[int, ...], virq: bool) -> frozenset:
    bits = {32 * w + b for w in range(6) for b in range(32) if ivec[w] >> b & 1}
    return frozenset(kinds_for_bits(bits)) | ALWAYS | TLB_OBSERVED | (IRQ_WINDOW if virq else frozenset())


def test_random_vectors_match_the_bit_by_bit_definition():
    rng = random.Random(11)
    for _ in range(500):
        ivec = tuple(rng.getrandbits(32) & (rng.getrandbits(32) if rng.random() < 0.5 else 0xFFFF_FFFF)
                     for _ in range(6))
        virq = rng.random() < 0.5
        assert kinds_to_scan.__wrapped__(ivec, virq) == _reference(ivec, virq)


def test_single_intercepts_name_their_instructions():
    # APM vol. 2 §15.9-15.13: CPUID is intercept vector 3 bit 18 (exit code 72h); IOIO vector 3
    # bit 27 (7Bh) covers IN/OUT/INS/OUTS; a CR8 write is vector 0 bit 24 (exit code 18h)
    def vec(code: int) -> tuple[int, ...]:
        v = [0] * 6
        v[code >> 5] |= 1 << (code & 31)
        return tuple(v)
    none = kinds_to_scan.__wrapped__((0,) * 6, False)
    assert D.Kind.CPUID not in none and D.Kind.CPUID in kinds_to_scan.__wrapped__(vec(0x72), False)
    assert {D.Kind.IN, D.Kind.OUT, D.Kind.INS, D.Kind.OUTS} <= kinds_to_scan.__wrapped__(vec(0x7B), False)
    assert D.Kind.MOV_TO_CR in kinds_to_scan.__wrapped__(vec(0x18), False)
    assert IRQ_WINDOW <= kinds_to_scan.__wrapped__((0,) * 6, True)
    assert ExitCode.CPUID == 0x72 and ExitCode.IOIO == 0x7B
