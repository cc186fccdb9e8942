"""The generator's draws are the standard library's: a seed gives the cases it gave
when they were drawn with ``Random.choice``/``randrange`` (corpora and the seeds the
planted-bug tests pin stay meaningful)."""
import random

from sandbox.fuzz.generate import sensitive
from sandbox.fuzz.table import TABLE, below, filler, modrm_mem, pick


def test_below_and_pick_draw_what_random_draws():
    sizes = [1, 2, 3, 4, 7, 8, 9, 16, 53, 128, 256, 0x800, 0x1000, 10**6]
    for seed in range(20):
        mine, ref = random.Random(seed), random.Random(seed)
        for i in range(500):
            n = sizes[i % len(sizes)]
            seq = tuple(range(100, 100 + n)) if n < 5000 else None
            if seq is not None and i % 2:
                assert pick(mine, seq) == ref.choice(seq)
            else:
                assert below(mine, n) == ref.randrange(n)
            assert mine.random() == ref.random()          # the streams stay in step


def _ref_modrm_mem(rng, reg):
    mod = rng.choice((0, 1, 2))
    form = rng.random()
    if form < 0.15:
        return bytes([(reg << 3) | 5]) + (rng.randrange(128) - 64).to_bytes(4, "little", signed=True)
    if form < 0.45:
        base, idx = rng.choice((3, 6, 7)), rng.choice((0, 1, 2, 4))
        m = bytes([(mod << 6) | (reg << 3) | 4, (rng.randrange(4) << 6) | (idx << 3) | base])
    else:
        m = bytes([(mod << 6) | (reg << 3) | rng.choice((3, 6, 7))])
    if mod == 1:
        m += bytes([rng.randrange(256)])
    elif mod == 2:
        m += rng.randrange(0x800).to_bytes(4, "little")
    return m


def _ref_filler(rng):
    """The filler as plain ``choice``/``randrange`` code (an independent statement of its draws)."""
    r = rng.randrange(9)
    if r == 0:
        return bytes([0x48, 0xC7, 0xC0 | rng.choice((0, 1, 2)), *rng.randrange(0x1000).to_bytes(4, "little")])
    if r == 1:
        return bytes([0x48, 0x01, 0xC0 | (rng.randrange(8) << 3) | rng.choice((0, 1, 2, 0))])
    if r == 2:
        return b"\x90"
    if r == 3:
        return bytes([0x50 + rng.choice((0, 1, 3)), 0x58 + rng.choice((0, 1, 3))])
    if r == 4:
        return b"\x48\x89" + _ref_modrm_mem(rng, rng.choice((0, 1, 2)))
    if r == 5:
        return b"\xeb\x00"
    if r == 6:
        return bytes([0x31, 0xC0 | (rng.choice((0, 1, 2)) * 9)])
    if r == 7:
        return b"\x48\x8b" + _ref_modrm_mem(rng, rng.choice((0, 1, 2)))
    return bytes([0x66, 0xBA, *rng.choice((0x80, 0x60, 0x3F8, 0x7FF, 0xFFFF, 0x1F0)).to_bytes(2, "little")])


def test_filler_and_modrm_draw_what_plain_code_draws():
    for seed in range(30):
        mine, ref = random.Random(seed), random.Random(seed)
        for i in range(300):
            if i % 3:
                assert filler(mine) == _ref_filler(ref)
            else:
                assert modrm_mem(mine, i % 8) == _ref_modrm_mem(ref, i % 8)
            assert mine.random() == ref.random()


def test_sensitive_draws_template_build_then_prefixes():
    """``sensitive`` = a template by ``choice``, its build, then its prefixes as ``choice`` draws."""
    for seed in range(30):
        mine, ref = random.Random(seed), random.Random(seed)
        for _ in range(200):
            got = sensitive(mine)
            t = ref.choice(TABLE)
            body = t.build(ref)
            pre = bytes(ref.choice(t.prefixes) for _ in range(ref.choice((0, 0, 0, 1, 1, 2, 3))))
            if t.rex and ref.random() < 0.25:
                pre += bytes([0x40 | ref.randrange(16)])
            assert got == pre + body
            assert mine.random() == ref.random()


def test_random_regs_and_config_draw_what_plain_code_draws():
    from sandbox.fuzz.case import DATA_BASE
    from sandbox.fuzz.generate import INTERESTING_PORTS, MSR_VALUES, random_config, random_regs

    def ref_regs(rng):
        regs = {n: DATA_BASE + 8 * rng.randrange(0x100) for n in ("rbx", "rsi", "rdi", "rbp")}
        regs["rax"] = rng.choice((0, 1, 7, 0x8000_0000, 0x4000_0000, DATA_BASE, rng.getrandbits(64)))
        regs["rcx"] = rng.choice(MSR_VALUES + (0, 1, 3, 0x10000, rng.getrandbits(32)))
        regs["rdx"] = rng.choice(INTERESTING_PORTS + (rng.getrandbits(16), rng.getrandbits(64)))
        return regs

    def ref_words(rng):
        w = [0] * 6
        for word, bits, p in ((0, [b + n for n in (0, 3, 4, 8) for b in (0, 16)], 0.3),
                              (1, [b + n for n in range(8) for b in (0, 16)], 0.15), (2, range(32), 0.12),
                              (3, range(5, 31), 0.45)):
            for b in bits:
                if rng.random() < p:
                    w[word] |= 1 << b
        if rng.random() < 0.9:
            w[3] |= 1 << 31
        for b in range(1, 15):
            if rng.random() < 0.45:
                w[4] |= 1 << b
        for word, bit, p in ((4, 0, 0.98), (4, 1, 0.7), (5, 2, 0.5)):
            if rng.random() < p:
                w[word] |= 1 << bit
        return w

    for seed in range(40):
        mine, ref = random.Random(seed), random.Random(seed)
        assert random_regs(mine) == ref_regs(ref)
        assert random_config(mine).intercepts == ref_words(ref)
