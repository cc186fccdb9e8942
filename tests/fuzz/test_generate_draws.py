"""The generator's draws are the standard library's: a seed gives the cases it gave
when they were drawn with ``Random.choice``/``randrange`` (corpora and the seeds the
planted-bug tests pin stay meaningful)."""
import random

from sandbox.fuzz.table import below, pick


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
