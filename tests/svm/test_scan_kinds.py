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


def _capstone_pause_offsets(window: bytes) -> set[int]:
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    cs = Cs(CS_ARCH_X86, CS_MODE_64)
    return {o for o in range(len(window)) for i in cs.disasm(window[o:o + 15], 0, 1) if i.mnemonic == "pause"}


def test_page_scan_hooks_pause_not_bare_nops():
    """PAUSE is F3 90 (APM vol. 3, PAUSE), legacy prefixes allowed around the F3: a bare
    90 (NOP) or one behind prefixes without an F3 is no candidate; capstone is the reference."""
    one, two = D.opcode_starts({D.Kind.PAUSE})
    window = bytes.fromhex("9090f390 66f390 f36690 6690 2ef390 f32e90 90") + bytes(32)
    hits = set(D.scan(window, len(window), one, two))
    assert _capstone_pause_offsets(window) == {2, 5, 12, 13, 15} <= hits
    # prefix order is free (APM vol. 3 §1.2): 66 F3 90 and F3 66 90 may be PAUSE too
    assert hits == {2, 4, 5, 7, 12, 13, 15}


def test_page_scan_finds_every_instruction_start():
    """Over random windows dense in prefixes and sensitive opcodes, every offset where an
    instruction of the scanned kinds begins is a candidate, for random kind sets; and every
    PAUSE capstone finds is one."""
    rng = random.Random(3)
    kinds = list(D.Kind)
    alphabet = [0x90, 0xF3, 0xF2, 0x66, 0x67, 0x2E, 0x41, 0x48, 0x0F, 0x01, 0xD9, 0xA2, 0x31, 0xC4, 0xC5,
                0xE4, 0xEC, 0x6C, 0xF4, 0x9C, 0xCD, 0x20, 0x22, 0xAE, 0xD8, 0x00]
    for _ in range(60):
        ks = set(rng.sample(kinds, rng.randrange(1, len(kinds) + 1)))
        one, two = D.opcode_starts(ks)
        window = bytes(rng.choice(alphabet) if rng.random() < 0.8 else rng.randrange(256) for _ in range(400))
        hits = set(D.scan(window, len(window), one, two))
        for o in range(len(window)):
            insn = D.decode(window[o:o + 15])
            if insn is not None and insn.kind in ks:
                assert o in hits, (window[o:o + 15].hex(), insn.kind)
        if D.Kind.PAUSE in ks:
            assert _capstone_pause_offsets(window) <= hits


def test_rescanning_only_the_changed_bytes_keeps_every_candidate():
    """A page fetched again after a reset is scanned only where it differs from its last
    (still hooked) scan: the old candidates plus the new window's must cover every offset
    where an armed instruction of the new bytes begins (decoded with the page's end
    treated as unknown), and every prefix run that may straddle into the next page."""
    from types import SimpleNamespace

    from sandbox.memory.hostmem import PAGE_SIZE
    from sandbox.svm.scanner import Scanner, straddling
    rng = random.Random(5)
    kinds = list(D.Kind)
    alphabet = [0x90, 0xF3, 0x66, 0x2E, 0x41, 0x48, 0x0F, 0x01, 0xD9, 0xA2, 0x31, 0xC4, 0xC5, 0xE4, 0xEC,
                0xF4, 0xCD, 0x22, 0xAE, 0x00]
    for trial in range(40):
        ks = set(rng.sample(kinds, rng.randrange(1, len(kinds) + 1)))
        one, two = D.opcode_starts(ks)
        sc = SimpleNamespace(_one=one, _two=two)
        old = bytearray(rng.choice(alphabet) if rng.random() < 0.7 else rng.randrange(256) for _ in range(PAGE_SIZE))
        new = bytearray(old)
        # a rewritten run, at the page's start, its end, or anywhere (a fuzz case's code)
        n = rng.randrange(1, 300)
        at = (0, PAGE_SIZE - n, rng.randrange(PAGE_SIZE - n))[trial % 3]
        for i in range(at, at + n):
            new[i] = rng.choice(alphabet)
        if trial % 2:
            # unchanged prefix bytes in front of the rewrite: a new opcode at its start
            # makes candidates of the 14 bytes before it
            for i in range(max(0, at - 14), at):
                old[i] = new[i] = rng.choice((0xF3, 0x66, 0x2E, 0x41, 0x48))
            new[at] = old[at] ^ 0x0F if old[at] != 0x0F else 0xA2
        if trial % 4 < 2:
            # and a second run (the previous case's code restored), with prefixes before it
            b = rng.randrange(14, PAGE_SIZE - 20)
            for i in range(b - 14, b):
                old[i] = new[i] = rng.choice((0xF3, 0x66, 0x2E, 0x41, 0x48))
            for i in range(b, b + rng.randrange(1, 20)):
                new[i] = rng.choice(alphabet)
            new[b] = old[b] ^ 0x0F if old[b] != 0x0F else 0xA2
        old, new = bytes(old), bytes(new)
        if old == new:
            continue
        lo, hi, added = Scanner._changed_hits(sc, old, new)
        assert old[:lo] == new[:lo] and old[hi:] == new[hi:] and old[lo] != new[lo] and old[hi - 1] != new[hi - 1]
        changed = [i for i in range(PAGE_SIZE) if old[i] != new[i]]
        have = set(D.scan(old, PAGE_SIZE, one, two) + straddling(old)) | set(added)
        for o in range(PAGE_SIZE):
            insn = D.decode(new[o:o + 15])
            if insn is not None and insn.kind in ks:
                assert o in have, (trial, o, new[o:o + 15].hex(), insn.kind)
        assert set(straddling(new)) <= have
        # a full scan of the new bytes finds nothing more in the window that was rescanned
        full = set(D.scan(new, PAGE_SIZE, one, two) + straddling(new))
        near = {o for i in changed for o in range(i - D.MAX_INSN, i + 1)}
        assert {o for o in full if o in near} <= have


def test_changed_span_is_the_first_and_last_differing_byte():
    """changed_span against a byte-by-byte comparison: pages of zeros or noise,
    one to a few changed bytes anywhere (both ends of the page included)."""
    from sandbox.svm.scanner import changed_span
    rng = random.Random(7)
    size = 4096
    for trial in range(3000):
        old = bytearray(rng.randbytes(size) if trial % 2 else bytes(size))
        new = bytearray(old)
        spots = [rng.choice((0, size - 1, 255, 256, 257, rng.randrange(size))) for _ in range(rng.randrange(1, 4))]
        for i in spots:
            new[i] ^= 1 << rng.randrange(8)
        if old == new:
            continue
        diff = [i for i in range(size) if old[i] != new[i]]
        assert changed_span(bytes(old), bytes(new)) == (diff[0], diff[-1] + 1), (trial, spots)
